#!/usr/bin/env bash
# Every dataset the tests use: MNIST and IMDB into ~/.cache/kiln, Fashion-MNIST
# from Debian.
set -euo pipefail
cd "$(dirname "$0")"
./fetch-mnist.sh
./fetch-fashion-mnist.sh
./fetch-imdb.sh
