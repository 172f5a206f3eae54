#!/usr/bin/env bash
# Installs the PyTorch CPU reference the benchmark suite compares against.
#
#   scripts/install-pytorch-cpu.sh             Debian's python3-torch with OpenBLAS
#                                              (no CUDA download; what the README's
#                                              figures used)
#   scripts/install-pytorch-cpu.sh --venv DIR  a virtual environment in DIR with the
#                                              CPU-only wheels of PyTorch and numpy;
#                                              then run the suite with
#                                              KILN_PYTHON=DIR/bin/python
#
# Without libopenblas0 Debian's torch multiplies matrices with the netlib
# reference BLAS, tens of times slower, which would flatter every ratio.
# Optional: nothing but the benchmarks needs it.
set -euo pipefail
# shellcheck source=scripts/require.sh
source "$(dirname "$0")/require.sh"
if [ "${1:-}" = "--venv" ]; then
    dir="${2:?usage: $0 --venv DIR}"
    # Debian splits venv's pip bootstrap into python3-venv.
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --upgrade pip
    # The CPU index carries torch without the multi-gigabyte CUDA libraries.
    "$dir/bin/pip" install --quiet numpy torch --extra-index-url https://download.pytorch.org/whl/cpu
    "$dir/bin/python" -c "import torch; print('PyTorch', torch.__version__, 'ready: KILN_PYTHON=$dir/bin/python')"
    exit 0
fi
apt_install python3-torch libopenblas0-pthread
/usr/bin/python3 -c "import torch; print('PyTorch', torch.__version__, 'ready')"
