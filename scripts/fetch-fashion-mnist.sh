#!/usr/bin/env bash
# Installs Fashion-MNIST (Debian's dataset-fashion-mnist: the original gzipped
# IDX files under /usr/share/datasets/fashion-mnist) unless it is there already.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST already in $dir"
    exit 0
fi
# shellcheck source=scripts/require.sh
source "$(dirname "$0")/require.sh"
apt_install dataset-fashion-mnist
echo "Fashion-MNIST in $dir"
