#!/usr/bin/env bash
# Every dataset and model the tests use: MNIST, IMDB and MiniLM into
# ~/.cache/kiln, Fashion-MNIST from Debian.
set -euo pipefail
cd "$(dirname "$0")"
./fetch-mnist.sh
./fetch-fashion-mnist.sh
./fetch-imdb.sh
./fetch-minilm.sh
