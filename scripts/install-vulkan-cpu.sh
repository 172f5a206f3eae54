#!/usr/bin/env bash
# Installs Mesa's CPU drivers where they are missing: lavapipe through Vulkan
# (what Kiln runs on without a GPU) and llvmpipe through EGL (wgpu's GL
# backend, which CI tests too). On Debian 12 it takes Mesa from
# bookworm-backports: lavapipe in Mesa 25 runs Kiln's kernels about 3x faster
# than bookworm's Mesa 22.3.
set -euo pipefail

# Whether the dynamic linker knows library $1. ldconfig lives in /sbin, off
# a normal user's PATH; its listing is taken whole, since `grep -q` closing
# the pipe early would fail the pipeline under pipefail.
has_lib() { [[ "$(/sbin/ldconfig -p 2>/dev/null)" == *"$1"* ]]; }
vulkan_present() { ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 && has_lib libvulkan.so.1; }
egl_present() { has_lib libEGL.so.1 && has_lib libEGL_mesa.so.0; }

packages=()
vulkan_present || packages+=(mesa-vulkan-drivers libvulkan1)
egl_present || packages+=(libegl1 libegl-mesa0 libgl1-mesa-dri)
if [ ${#packages[@]} -eq 0 ]; then
    echo "Vulkan driver present: $(ls /usr/share/vulkan/icd.d/ | tr '\n' ' ')"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    if vulkan_present; then
        echo "no Mesa EGL found: wgpu's GL backend will not run (Vulkan will)" >&2
        exit 0
    fi
    echo "No Vulkan driver found and no apt-get: install Mesa's Vulkan drivers (lavapipe) with your package manager," >&2
    echo "e.g. 'dnf install mesa-vulkan-drivers' or 'pacman -S vulkan-swrast'." >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
# Through env: sudo drops the caller's environment.
apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get)

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
target=()
if [ "$codename" = "bookworm" ]; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" |
        $sudo tee /etc/apt/sources.list.d/kiln-bookworm-backports.list >/dev/null
    target=(-t bookworm-backports)
fi
"${apt[@]}" update -qq
"${apt[@]}" install -y -qq "${target[@]}" "${packages[@]}" >/dev/null
echo "installed: $(dpkg-query -W -f='${Package} ${Version}\n' "${packages[@]}" | tr '\n' ' ')"
