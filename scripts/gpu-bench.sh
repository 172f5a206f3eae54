#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the benchmark suite against PyTorch on
# CUDA (TF32 off) with each model's step profiled by kernel, then the kernel
# tests on the GPU (Vulkan), then three comparison passes while time is left.
# Everything lands in OUTDIR (default target/gpu-bench):
#   gpu.txt        the GPU, driver, torch, Vulkan adapters, each step's exit
#   bench.log      the table and the profiles; latest.json its rows, for
#                  benches/RESULTS.md (scripts/bench-table.py OUTDIR/latest.json)
#   kernels.log    the kernel tests, every tiling the tuner can pick
#   unchecked.log  products, MLP and MiniLM without wgpu's runtime checks
#                  (loop counters and index clamps)
#   submit-batched.log  the MLP and CNN with a submit every 50 steps
#   lstm-sequence.log   the LSTM on its sequence kernels
#   tuning/        the autotuner's timings of every candidate, overall and
#                  on each large product shape (*-shapes.txt)
# Workload names after OUTDIR narrow the suite, as with cargo bench.
#
# Time: each step has its own limit, and the optional passes start only
# while KILN_BENCH_DEADLINE seconds (default 450) have not passed, so the
# script ends inside a 10-minute command. With KILN_BENCH_PACK=DIR, after
# every step the two summaries are copied to DIR and everything else packed
# into DIR/gpu-bench.tgz: few files (for a runner that returns a handful),
# and a run killed at its limit still returns what it measured.
#
# KILN_DEVICE and KILN_BENCH_REFERENCE override the GPU and CUDA defaults (to
# try the script on a CPU machine); KILN_PROFILE=0 skips the profiles. Uses
# the binaries in .gpu/ (scripts/build-gpu-binaries.sh) when they are there,
# else cargo. Needs the Vulkan loader (libvulkan1) and python3 with torch.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/gpu-bench}
shift || true
mkdir -p "$out"
deadline=${KILN_BENCH_DEADLINE:-450}
export KILN_DEVICE=${KILN_DEVICE:-gpu} KILN_BENCH_REFERENCE=${KILN_BENCH_REFERENCE:-cuda}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
# NVIDIA's driver may sit where the Vulkan loader does not look.
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ] && [ -f "$icd" ]; then
    export VK_DRIVER_FILES=$icd
fi
# The tuner's cache starts empty here, so the run tunes from scratch.
export KILN_CACHE=${KILN_CACHE:-$out/cache}
# Each model's step by kernel, timed by the GPU's clock, after its figures
# are measured: what to tune next comes back from the same run.
if [ "${KILN_PROFILE:-1}" = 0 ]; then unset KILN_PROFILE; else export KILN_PROFILE=1; fi

pack() {
    cp -r "$KILN_CACHE/tuning" "$out/" 2>/dev/null
    [ -n "${KILN_BENCH_PACK:-}" ] || return 0
    mkdir -p "$KILN_BENCH_PACK"
    cp "$out/gpu.txt" "$KILN_BENCH_PACK/" 2>/dev/null
    cp "$out/latest.json" "$KILN_BENCH_PACK/" 2>/dev/null
    # Written aside and renamed, so a kill mid-pack leaves the last archive.
    tar czf "$KILN_BENCH_PACK/.gpu-bench.tgz" --exclude=./cache -C "$out" . &&
        mv "$KILN_BENCH_PACK/.gpu-bench.tgz" "$KILN_BENCH_PACK/gpu-bench.tgz"
}
# step NAME SECONDS LOG COMMAND...: runs COMMAND under its limit, logs its
# exit (124: it hit the limit) and packs.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    echo "$name: exit $? after ${SECONDS}s" >>"$out/gpu.txt"
    pack
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
    echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-} VK_ICD_FILENAMES=${VK_ICD_FILENAMES:-}"
    ldconfig -p | grep -c libvulkan.so || echo "no Vulkan loader: unpack libvulkan1 first"
} >"$out/gpu.txt" 2>&1
if [ -x .gpu/suite ] && [ -x .gpu/kernels ]; then
    kiln=(.gpu/kiln)
    tests=(.gpu/kernels)
    bench=(.gpu/suite --bench)
    KILN_BENCH_COMMIT=$(cat .gpu/COMMIT 2>/dev/null || echo unknown)
    export KILN_BENCH_COMMIT
else
    kiln=(cargo run --release --quiet --)
    tests=(cargo test --release --test kernels --)
    bench=(cargo bench --bench suite --)
fi
export KILN_BENCH_OUT="$out"
# Which adapters Vulkan offers, and the one KILN_DEVICE picks.
"${kiln[@]}" info --all >>"$out/gpu.txt" 2>&1
echo "info: exit $?" >>"$out/gpu.txt"
pack
step bench 300 "$out/bench.log" "${bench[@]}" "$@"
step "kernel tests" 150 "$out/kernels.log" "${tests[@]}" --test-threads=1
# The products, the MLP and MiniLM again without wgpu's runtime checks: the
# counter in every loop (the products for GPUs have none already) and the
# clamp of every index into shared-memory tiles and register arrays (Kiln's
# figures only). What the checks left on still cost a GPU. This pass tunes
# its own choice (the cache is keyed by the settings).
if [ $SECONDS -lt "$deadline" ] && [ $# = 0 ]; then
    KILN_LOOP_COUNTERS=0 KILN_INDEX_CLAMPS=0 KILN_PYTHON=/nonexistent KILN_BENCH_OUT="$out/unchecked" \
        step "no runtime checks" 120 "$out/unchecked.log" "${bench[@]}" matmul mlp bert
fi
# The products again with every other candidate tiling at N=4096
# (KILN_BENCH_SWEEP=1; Kiln's figures only): how near the tuner's pick the
# other block shapes come, for the matmul item still short of its bar. Set
# KILN_BENCH_SWEEP to a comma-separated list of tilings to time those instead.
if [ $SECONDS -lt "$deadline" ] && [ $# = 0 ]; then
    KILN_BENCH_SWEEP=${KILN_BENCH_SWEEP:-1} KILN_PYTHON=/nonexistent KILN_BENCH_OUT="$out/sweep" \
        step "tiling sweep" 150 "$out/sweep.log" "${bench[@]}" matmul
fi
# The MLP and the CNN again submitting every 50 steps rather than each step
# (KILN_SUBMIT_BLOCKS=0, the default on CPU adapters; Kiln's figures only).
if [ $SECONDS -lt "$deadline" ] && [ $# = 0 ]; then
    KILN_SUBMIT_BLOCKS=0 KILN_PYTHON=/nonexistent KILN_BENCH_OUT="$out/submit-batched" \
        step "submit every 50 steps" 60 "$out/submit-batched.log" "${bench[@]}" mlp conv
fi
# The LSTM again on its sequence kernels (KILN_LSTM_SEQUENCE=1, the default
# on CPU adapters), to compare with the per-step kernels' figure above.
if [ $SECONDS -lt "$deadline" ] && { [ $# = 0 ] || [[ " $* " == *" lstm "* ]]; }; then
    KILN_LSTM_SEQUENCE=1 KILN_PYTHON=/nonexistent KILN_BENCH_OUT="$out/lstm-sequence" \
        step "lstm sequence kernels" 60 "$out/lstm-sequence.log" "${bench[@]}" lstm
fi
cat "$out/gpu.txt"
tail -n 25 "$out/bench.log"
