#!/usr/bin/env bash
# Every dataset and model the tests use: MNIST, IMDB and MiniLM into
# ~/.cache/kiln, Fashion-MNIST from Debian.
set -euo pipefail
# Run from where the caller is, so a relative KILN_CACHE means the same
# folder here as to the tests.
scripts=$(dirname "$0")
"$scripts/fetch-mnist.sh"
"$scripts/fetch-fashion-mnist.sh"
"$scripts/fetch-imdb.sh"
"$scripts/fetch-minilm.sh"
