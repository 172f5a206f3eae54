#!/usr/bin/env bash
# Every dataset the tests use: MNIST into ~/.cache/kiln, Fashion-MNIST from Debian.
set -euo pipefail
cd "$(dirname "$0")"
./fetch-mnist.sh
./fetch-fashion-mnist.sh
