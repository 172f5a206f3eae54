#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the kernel tests on the GPU (Vulkan), then
# the benchmark suite against PyTorch on CUDA (TF32 off) with each model's
# step profiled by kernel, and the GPU's name and driver. Everything lands in
# OUTDIR (default target/gpu-bench): the table and profiles in bench.log, the
# rows in latest.json, for benches/RESULTS.md (scripts/bench-table.py
# OUTDIR/latest.json prints them as Markdown); the LSTM's per-step kernels
# in lstm-steps.log; without wgpu's loop counters in no-loop-counters.log;
# the autotuner's timings in tuning/. Workload names
# after OUTDIR narrow the suite, as with cargo bench. KILN_DEVICE and
# KILN_BENCH_REFERENCE override the GPU and CUDA defaults (to try the script
# on a CPU machine), KILN_PROFILE=0 skips the profiles.
# Uses the binaries in .gpu/ (scripts/build-gpu-binaries.sh) if there is no
# cargo. Needs the Vulkan loader (libvulkan1) and python3 with torch (CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/gpu-bench}
shift || true
mkdir -p "$out"
export KILN_DEVICE=${KILN_DEVICE:-gpu} KILN_BENCH_REFERENCE=${KILN_BENCH_REFERENCE:-cuda}
# Each model's step by kernel, timed by the GPU's clock, after its figures
# are measured: what to tune next comes back from the same run.
if [ "${KILN_PROFILE:-1}" = 0 ]; then unset KILN_PROFILE; else export KILN_PROFILE=1; fi
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' >>"$out/gpu.txt" 2>&1
if command -v cargo >/dev/null; then
    tests=(cargo test --release --test kernels --)
    bench=(cargo bench --bench suite --)
else
    tests=(.gpu/kernels)
    bench=(.gpu/suite --bench)
    KILN_BENCH_COMMIT=$(cat .gpu/COMMIT 2>/dev/null || echo unknown)
    export KILN_BENCH_COMMIT
fi
export KILN_BENCH_OUT="$out"
"${tests[@]}" --test-threads=1 >"$out/kernels.log" 2>&1
echo "kernel tests: exit $?" >>"$out/gpu.txt"
"${bench[@]}" "$@" >"$out/bench.log" 2>&1
echo "bench: exit $?" >>"$out/gpu.txt"
# The autotuner's cache file lists every candidate tiling's time over its
# probes, not only the winner's.
tuning=${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/tuning
cp -r "$tuning" "$out/" 2>/dev/null || echo "no tuning cache in $tuning" >>"$out/gpu.txt"
# The LSTM again on its per-step kernels, to compare with the sequence
# kernels' figure above (no reference: only Kiln's row matters here).
if [ $# = 0 ] || [[ " $* " == *" lstm "* ]]; then
    KILN_LSTM_SEQUENCE=0 KILN_PYTHON=/nonexistent KILN_BENCH_OUT="$out/lstm-steps" \
        "${bench[@]}" lstm >"$out/lstm-steps.log" 2>&1
    echo "lstm per step: exit $?" >>"$out/gpu.txt"
fi
# The products, the MLP and MiniLM again without wgpu's loop counters
# (Kiln's figures only): whether the counters cost a GPU anything.
if [ $# = 0 ]; then
    KILN_LOOP_COUNTERS=0 KILN_PYTHON=/nonexistent KILN_BENCH_OUT="$out/no-loop-counters" \
        "${bench[@]}" matmul mlp bert >"$out/no-loop-counters.log" 2>&1
    echo "no loop counters: exit $?" >>"$out/gpu.txt"
fi
# Again: the pass without loop counters tuned its own choice.
cp -r "$tuning" "$out/" 2>/dev/null
cat "$out/gpu.txt"
tail -n 25 "$out/bench.log"
