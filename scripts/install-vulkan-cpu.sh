#!/usr/bin/env bash
# Installs Mesa's Vulkan CPU driver (lavapipe) unless a Vulkan driver is already
# present. On Debian 12 it takes Mesa from bookworm-backports: lavapipe in Mesa 25
# runs Kiln's kernels about 3x faster than bookworm's Mesa 22.3.
set -euo pipefail

if ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 && ldconfig -p | grep -q libvulkan.so.1; then
    echo "Vulkan driver present: $(ls /usr/share/vulkan/icd.d/ | tr '\n' ' ')"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "No Vulkan driver found and no apt-get: install Mesa's Vulkan drivers (lavapipe) with your package manager," >&2
    echo "e.g. 'dnf install mesa-vulkan-drivers' or 'pacman -S vulkan-swrast'." >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
target=()
if [ "$codename" = "bookworm" ]; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" |
        $sudo tee /etc/apt/sources.list.d/kiln-bookworm-backports.list >/dev/null
    target=(-t bookworm-backports)
fi
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${target[@]}" mesa-vulkan-drivers libvulkan1 >/dev/null
echo "installed: $(dpkg-query -W -f='${Package} ${Version}\n' mesa-vulkan-drivers)"
