#!/usr/bin/env bash
# Prepares a run of scripts/gpu-bench.sh on an x86-64 Linux machine with an
# NVIDIA driver and PyTorch (CUDA) but no Rust toolchain and no network:
# builds the benchmark suite, the kernel tests and the `kiln` command,
# stripped, into .gpu/ (with the commit they were built from), and downloads
# the Vulkan and GL loader packages into .gl/ (both ignored by git). There:
#   for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
#   KILN_BENCH_PACK=OUTDIR scripts/gpu-bench.sh /tmp/gpu-bench
set -euo pipefail
cd "$(dirname "$0")/.."
executable() { sed -n "s|.*Executable $1 (\(.*\))|\1|p"; }
bench=$(cargo bench --bench suite --no-run 2>&1 | executable benches/suite.rs)
tests=$(cargo test --release --test kernels --no-run 2>&1 | executable tests/kernels.rs)
cargo build --release --bin kiln
for built in "$bench" "$tests"; do
    [ -n "$built" ] && [ -x "$built" ] || {
        echo "no executable found in cargo's output (got '$built')" >&2
        exit 1
    }
done
mkdir -p .gpu
strip -o .gpu/suite "$bench"
strip -o .gpu/kernels "$tests"
strip -o .gpu/kiln target/release/kiln
# --dirty: binaries built from uncommitted changes say so in the results.
git describe --always --dirty --abbrev=7 >.gpu/COMMIT
if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
    mkdir -p .gl /tmp/amd64/partial
    o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
    apt-get "${o[@]}" update >/dev/null
    (cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi
ls -l .gpu .gl
du -sh .gpu .gl
