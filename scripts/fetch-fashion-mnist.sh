#!/usr/bin/env bash
# Installs Fashion-MNIST (Debian's dataset-fashion-mnist: the original gzipped
# IDX files under /usr/share/datasets/fashion-mnist) unless it is there already.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST already in $dir"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
echo "Fashion-MNIST in $dir"
