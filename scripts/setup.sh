#!/usr/bin/env bash
# Installs what Strata needs on a Debian machine, then builds the guest plugins.
# Idempotent and quick when everything is already there. Run as root (or with sudo
# available) on a fresh machine.
#
#   host toolchain   cargo/rustc >= 1.95 (rustup's; or Debian's rustc-web/cargo-web 1.96)
#   guest toolchain  wasm32-unknown-unknown via rustup, or Debian's toolchain + build-std
#                    (scripts/build-plugins.sh chooses)
#   Python guests    componentize-py from PyPI (scripts/build-py-plugin.sh)
#   system           build-essential, pkg-config, python3-venv, fuse3, redis-server,
#                    systemd (systemd-analyze verifies the packaged unit)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf 'setup: %s\n' "$*" >&2; }

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null && SUDO="sudo" || log "not root and no sudo: apt packages cannot be installed"
fi

apt_updated=0
need_pkgs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if ((apt_updated == 0)); then
            log "apt-get update"
            $SUDO apt-get update -qq
            apt_updated=1
        fi
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

if command -v apt-get >/dev/null; then
    # redis-server: the peer the chunk-space benchmark measures against (it starts its own
    # instance on a Unix socket; a system service the package may start is left alone)
    need_pkgs build-essential pkg-config python3 python3-venv fuse3 procps redis-server systemd
fi

# Host toolchain: rustup's cargo if present, else Debian's (>= 1.95 needed by wasmtime 48).
if ! command -v cargo >/dev/null; then
    if [[ -x /usr/bin/cargo ]] && /usr/bin/rustc --version | grep -qE '1\.(9[5-9]|[1-9][0-9]{2})'; then
        :
    else
        log "no cargo found: installing Debian's rustc-web / cargo-web (1.96) with fmt and clippy"
        need_pkgs rustc-web cargo-web rustfmt-web rust-web-clippy
    fi
    export PATH="$PATH:/usr/bin"
fi
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null; then
        rustup component add rustfmt clippy || log "rustup could not add rustfmt/clippy"
    elif command -v apt-get >/dev/null; then
        need_pkgs rustfmt-web rust-web-clippy
    fi
fi

bash "$ROOT/scripts/build-plugins.sh"
bash "$ROOT/scripts/build-py-plugin.sh"
log "ready"
