#!/usr/bin/env bash
# Installs the PyTorch CPU reference the benches compare against: Debian's
# python3-torch (no CUDA download) with OpenBLAS. Without libopenblas0 Debian's
# torch multiplies matrices with the netlib reference BLAS, tens of times
# slower, which would flatter every ratio. Optional: nothing else needs it.
set -euo pipefail
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
$sudo apt-get update -qq
$sudo apt-get install -y --no-install-recommends python3-torch libopenblas0-pthread
/usr/bin/python3 -c "import torch; print('PyTorch', torch.__version__, 'ready')"
