#!/usr/bin/env bash
# Builds the benchmark suite and the kernel tests and copies them, stripped,
# to .gpu/ (ignored by git), for a GPU machine without a Rust toolchain: an
# x86-64 Linux machine with an NVIDIA driver and PyTorch with CUDA. Run
# scripts/gpu-bench.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
executable() { sed -n "s|.*Executable $1 (\(.*\))|\1|p"; }
bench=$(cargo bench --bench suite --no-run 2>&1 | executable benches/suite.rs)
tests=$(cargo test --release --test kernels --no-run 2>&1 | executable tests/kernels.rs)
mkdir -p .gpu
strip -o .gpu/suite "$bench"
strip -o .gpu/kernels "$tests"
git rev-parse --short HEAD >.gpu/COMMIT
ls -l .gpu
