#!/usr/bin/env bash
# Builds the Debian package of Strata: target/deb/strata_<version>_<arch>.deb
#
#   /usr/bin/stratad, /usr/bin/strata            release binaries
#   /usr/lib/strata/plugins/*.wasm               the official plugins
#   /etc/strata/stratad.toml                     every setting documented (a conffile)
#   /lib/systemd/system/stratad.service          Type=notify, hardened, restart on failure
#   /usr/share/man/man1/*.1.gz                   generated from the CLIs (clap_mangen)
#   bash, zsh and fish completions               generated from the CLIs (clap_complete)
#
# Built with dpkg-deb (Debian's own packaging tool). The data and runtime directories
# (/var/lib/strata 0700, /run/strata) are made by systemd from the unit.
#
# STRATA_DEB_BIN_DIR=DIR packages the binaries already built in DIR (the tests use the
# debug ones) instead of building release binaries; STRATA_DEB_COMPRESS=gzip|xz (default
# xz) the compression (the tests use gzip: xz of debug binaries takes minutes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf 'build-deb: %s\n' "$*" >&2; }
command -v dpkg-deb >/dev/null || { log "dpkg-deb is missing (Debian's dpkg package)"; exit 1; }

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${STRATA_DEB_BIN_DIR:-}"
if [[ -z "$BIN" ]]; then
    log "cargo build --release (stratad, strata)"
    cargo build --release -p strata-runtime --bins
    BIN="$TARGET/release"
fi
COMPONENTS="${STRATA_COMPONENTS:-$TARGET/wasm-components}"
if [[ ! -f "$COMPONENTS/placement-rendezvous.wasm" ]]; then
    log "building the guest plugins"
    bash scripts/build-plugins.sh
fi

VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
ARCH="$(dpkg --print-architecture)"
OUT="$TARGET/deb"
PKG="$OUT/strata_${VERSION}_${ARCH}"
rm -rf "$PKG"
mkdir -p "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/usr/lib/strata/plugins" "$PKG/etc/strata" \
    "$PKG/lib/systemd/system" "$PKG/usr/share/man/man1" \
    "$PKG/usr/share/bash-completion/completions" "$PKG/usr/share/zsh/vendor-completions" \
    "$PKG/usr/share/fish/vendor_completions.d" "$PKG/usr/share/doc/strata"

install -m 0755 "$BIN/stratad" "$BIN/strata" "$PKG/usr/bin/"
for p in placement-rendezvous hsm-age-policy hsm-py-policy; do
    if [[ -f "$COMPONENTS/$p.wasm" ]]; then
        install -m 0644 "$COMPONENTS/$p.wasm" "$PKG/usr/lib/strata/plugins/"
    elif [[ "$p" != hsm-py-policy ]]; then
        log "missing official plugin $COMPONENTS/$p.wasm"; exit 1
    fi
done
install -m 0644 runtime/packaging/stratad.toml "$PKG/etc/strata/stratad.toml"
install -m 0644 runtime/packaging/stratad.service "$PKG/lib/systemd/system/stratad.service"
install -m 0644 README.md "$PKG/usr/share/doc/strata/README.md"

DOCS="$(mktemp -d)"
trap 'rm -rf "$DOCS"' EXIT
"$BIN/stratad" --generate-docs "$DOCS"
"$BIN/strata" --generate-docs "$DOCS"
for m in "$DOCS"/man/*.1; do
    gzip -9n -c "$m" > "$PKG/usr/share/man/man1/$(basename "$m").gz"
done
for b in strata stratad; do
    install -m 0644 "$DOCS/completions/$b.bash" "$PKG/usr/share/bash-completion/completions/$b"
    install -m 0644 "$DOCS/completions/_$b" "$PKG/usr/share/zsh/vendor-completions/_$b"
    install -m 0644 "$DOCS/completions/$b.fish" "$PKG/usr/share/fish/vendor_completions.d/$b.fish"
done

SIZE="$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)"
cat > "$PKG/DEBIAN/control" <<CONTROL
Package: strata
Version: $VERSION
Architecture: $ARCH
Maintainer: Strata developers <strata@localhost>
Installed-Size: $SIZE
Depends: libc6, fuse3
Section: admin
Priority: optional
Homepage: https://example.invalid/strata
Description: WebAssembly-pluggable storage runtime
 stratad serves chunk spaces with a shared-memory chunk cache, managed filesystems whose
 operations become DMAPI events, and hot-swappable Wasm policies; strata is its admin CLI.
CONTROL
echo "/etc/strata/stratad.toml" > "$PKG/DEBIAN/conffiles"
cat > "$PKG/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = "configure" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable stratad.service >/dev/null
    systemctl restart stratad.service
fi
POSTINST
cat > "$PKG/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = "remove" ]; then
    systemctl stop stratad.service || true
    systemctl disable stratad.service >/dev/null || true
fi
PRERM
cat > "$PKG/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
if [ "$1" = "purge" ]; then
    rm -rf /var/lib/strata
fi
POSTRM
chmod 0755 "$PKG/DEBIAN/postinst" "$PKG/DEBIAN/prerm" "$PKG/DEBIAN/postrm"
dpkg-deb --root-owner-group "-Z${STRATA_DEB_COMPRESS:-xz}" --build "$PKG" "$PKG.deb" >/dev/null
rm -rf "$PKG"
log "built $PKG.deb"
echo "$PKG.deb"
