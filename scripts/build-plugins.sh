#!/usr/bin/env bash
# Build every Strata guest crate (official plugins and test plugins) into a WebAssembly
# component:
#
#     target/wasm-components/<crate-name>.wasm      (crate name with dashes, e.g. faulty-loop.wasm)
#
# ($STRATA_COMPONENTS instead of target/wasm-components when set, as the tests read it.)
#
# Usage: scripts/build-plugins.sh [CRATE...]      (default: all guest crates below)
#
# How: `cargo build --profile wasm --target wasm32-unknown-unknown -p CRATE`, one cargo
# invocation per crate (so the SDK's `placement` and `dm-policy` features never unify into
# one component), linked by `wasm-component-ld`, which runs wasm-ld and then turns the core
# module plus the WIT type sections emitted by wit-bindgen into a component. Guests use their
# own target dir (target/wasm-guest/<toolchain>), never the host's. Re-runs are incremental;
# an output is only rewritten when its bytes change.
#
# Toolchains (STRATA_WASM_TOOLCHAIN=auto|rustup|debian, default auto):
#   rustup  the rustup toolchain in PATH with the wasm32-unknown-unknown target (added with
#           `rustup target add` if missing) and its bundled wasm-component-ld and wasm-ld.
#   debian  Debian's rustc-web/cargo-web 1.96 with the standard library built from source
#           (rust-web-src, -Zbuild-std; RUSTC_BOOTSTRAP=1) and LLVM's wasm-ld (lld-22),
#           installed with apt-get if missing. For machines where rustup cannot fetch targets.
#   auto    rustup when the target is (or can be made) available, else debian.
#
# Every output is checked to be a component (magic `\0asm`, version/layer `0d 00 01 00`; a
# core module would be `01 00 00 00`); anything else fails the script.

set -euo pipefail

GUESTS=(
    placement-rendezvous # plugins/: official placement
    hsm-age-policy       # plugins/: official HSM policy
    placement-echo       # tests/plugins/: hosts in input order
    faulty-loop          # tests/plugins/: place never returns
    faulty-hog           # tests/plugins/: place allocates without bound
    faulty-panic         # tests/plugins/: place panics
    faulty-malformed     # tests/plugins/: answers that are not placements
    faulty-init          # tests/plugins/: init refuses every config
    wrong-version        # tests/plugins/: built against strata:plugin@0.2.0
    missing-export       # tests/plugins/: exports only init
)

TARGET=wasm32-unknown-unknown
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${STRATA_COMPONENTS:-$ROOT/target/wasm-components}"

die() {
    echo "build-plugins: error: $*" >&2
    exit 1
}
note() { echo "build-plugins: $*" >&2; }

if [[ $# -gt 0 ]]; then
    GUESTS=("$@")
fi

# Flags from the caller's environment would replace the per-target flags set below.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET

# --- toolchain route (a): rustup --------------------------------------------------------
rustup_ready() {
    command -v rustup >/dev/null 2>&1 || return 1
    command -v cargo >/dev/null 2>&1 || return 1
    if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
        note "adding the $TARGET target with rustup"
        timeout 300 rustup target add "$TARGET" >&2 || return 1
    fi
    local sysroot host
    sysroot="$(rustc --print sysroot)" || return 1
    host="$(rustc -vV | sed -n 's/^host: //p')"
    LINKER="$sysroot/lib/rustlib/$host/bin/wasm-component-ld"
    WASM_LD="$sysroot/lib/rustlib/$host/bin/gcc-ld/wasm-ld"
    [[ -x "$LINKER" && -x "$WASM_LD" ]] || return 1
    CARGO=(cargo)
    EXTRA=()
}

# --- toolchain route (b): Debian's rustc-web + build-std ---------------------------------
DEB_RUSTC=/usr/bin/rustc
DEB_CARGO=/usr/bin/cargo
DEB_LINKER=/usr/lib/rustlib/x86_64-unknown-linux-gnu/bin/wasm-component-ld
DEB_STD_SRC=/usr/lib/rustlib/src/rust/library

find_wasm_ld() {
    local candidate
    for candidate in /usr/lib/llvm-22/bin/wasm-ld $(ls -d /usr/lib/llvm-*/bin/wasm-ld 2>/dev/null | sort -rV); do
        if [[ -x "$candidate" ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

debian_ready() {
    if [[ ! -x $DEB_RUSTC || ! -x $DEB_CARGO || ! -x $DEB_LINKER || ! -d $DEB_STD_SRC ]] ||
        ! find_wasm_ld >/dev/null; then
        command -v apt-get >/dev/null 2>&1 || die "no rustup wasm target and no apt-get for the Debian toolchain"
        local sudo=()
        [[ $(id -u) -eq 0 ]] || sudo=(sudo)
        note "installing Debian's Rust toolchain (rustc-web cargo-web rust-web-src lld-22)"
        "${sudo[@]}" apt-get update >&2
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y rustc-web cargo-web rust-web-src lld-22 >&2
    fi
    [[ -x $DEB_LINKER ]] || die "$DEB_LINKER missing after installing rustc-web"
    WASM_LD="$(find_wasm_ld)" || die "wasm-ld missing after installing lld-22"
    LINKER=$DEB_LINKER
    CARGO=(env RUSTC=$DEB_RUSTC RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 $DEB_CARGO)
    EXTRA=(-Zbuild-std=std,panic_abort)
}

ROUTE="${STRATA_WASM_TOOLCHAIN:-auto}"
case "$ROUTE" in
auto)
    if rustup_ready; then ROUTE=rustup; else
        note "rustup cannot provide $TARGET; using Debian's toolchain"
        debian_ready
        ROUTE=debian
    fi
    ;;
rustup) rustup_ready || die "the rustup toolchain cannot build for $TARGET" ;;
debian) debian_ready ;;
*) die "STRATA_WASM_TOOLCHAIN must be auto, rustup or debian (not '$ROUTE')" ;;
esac

GUEST_TARGET_DIR="${STRATA_GUEST_TARGET:-$ROOT/target/wasm-guest}/$ROUTE"
note "toolchain: $ROUTE ($("${CARGO[@]}" --version)); target dir: ${GUEST_TARGET_DIR#"$ROOT/"}"

export CARGO_TARGET_DIR="$GUEST_TARGET_DIR"
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$LINKER"
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS="-C link-arg=--wasm-ld-path=$WASM_LD"

mkdir -p "$OUT"
cd "$ROOT"

is_component() {
    [[ "$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')" == "0061736d0d000100" ]]
}

for crate in "${GUESTS[@]}"; do
    "${CARGO[@]}" build --quiet --profile wasm --target "$TARGET" "${EXTRA[@]}" -p "$crate" ||
        die "cargo build of $crate failed"
    built="$GUEST_TARGET_DIR/$TARGET/wasm/${crate//-/_}.wasm"
    [[ -f "$built" ]] || die "$crate: no $built (is it a cdylib?)"
    if ! is_component "$built"; then
        die "$crate: $built is not a component (header $(head -c 8 "$built" | od -An -tx1)); is the linker wasm-component-ld?"
    fi
    dest="$OUT/$crate.wasm"
    if ! cmp -s "$built" "$dest"; then
        cp "$built" "$dest.tmp"
        mv "$dest.tmp" "$dest"
    fi
    printf '%-22s %8d bytes  %s\n' "$crate" "$(wc -c <"$dest")" "${dest#"$ROOT/"}"
done
