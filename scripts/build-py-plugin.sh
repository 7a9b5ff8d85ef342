#!/usr/bin/env bash
# Builds the Python HSM policy (plugins/hsm-py-policy) into a WebAssembly component for the
# `dm-policy` world of wit/, with componentize-py:
#
#   target/wasm-components/hsm-py-policy.wasm
#
# Idempotent: installs componentize-py with pip when it is missing, and rebuilds from a copy
# of the sources so that nothing (bindings, __pycache__) is ever written into plugins/.
#
# Environment:
#   COMPONENTIZE_PY_VERSION  version pinned when installing (default 0.25.1; empty = latest)
#   PY_PLUGIN_BUILD_DIR      scratch directory (default target/py-build/hsm-py-policy)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="hsm-py-policy"
SRC="$ROOT/plugins/$NAME"
WIT="$ROOT/wit"
WORLD="dm-policy"
APP="app"
OUT_DIR="${STRATA_COMPONENTS:-$ROOT/target/wasm-components}"
OUT="$OUT_DIR/$NAME.wasm"
BUILD_DIR="${PY_PLUGIN_BUILD_DIR:-$ROOT/target/py-build/$NAME}"
VERSION="${COMPONENTIZE_PY_VERSION-0.25.1}"

log() { printf 'build-py-plugin: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Up to date: the component is newer than every source and WIT file (FORCE=1 rebuilds).
if [[ -z "${FORCE:-}" && -f "$OUT" ]] && [[ -z "$(find "$SRC" "$WIT" "${BASH_SOURCE[0]}" -newer "$OUT" -type f 2>/dev/null | head -n 1)" ]]; then
    printf '%s: up to date\n' "${OUT#"$ROOT"/}"
    exit 0
fi

# --- componentize-py -------------------------------------------------------------------------
PYTHON="$(command -v python3 || command -v python || true)"
CPY=()

find_componentize_py() {
    CPY=()
    if command -v componentize-py >/dev/null 2>&1 && componentize-py --version >/dev/null 2>&1; then
        CPY=(componentize-py)
    elif [[ -n "$PYTHON" ]] && "$PYTHON" -m componentize_py --version >/dev/null 2>&1; then
        CPY=("$PYTHON" -m componentize_py)
    fi
    [[ ${#CPY[@]} -gt 0 ]]
}

# A project venv (Debian's system Python refuses `pip install`: PEP 668).
VENV="${STRATA_PY_VENV:-$ROOT/target/py-venv}"
if [[ -x "$VENV/bin/componentize-py" ]]; then
    PATH="$VENV/bin:$PATH"
fi
if ! find_componentize_py; then
    spec="componentize-py${VERSION:+==$VERSION}"
    [[ -n "$PYTHON" ]] || die "no python3 to install $spec with"
    log "componentize-py not found; installing $spec into $VENV"
    if [[ ! -x "$VENV/bin/pip" ]]; then
        "$PYTHON" -m venv "$VENV" || die "cannot create a venv at $VENV (Debian: apt-get install python3-venv)"
    fi
    "$VENV/bin/pip" install --quiet "$spec" || die "cannot install $spec into $VENV"
    PATH="$VENV/bin:$PATH"
    hash -r
    find_componentize_py || die "componentize-py still not runnable after installing it"
fi
log "using $("${CPY[@]}" --version) (${CPY[*]})"

# --- sources into the build dir ----------------------------------------------------------------
[[ -f "$SRC/$APP.py" ]] || die "missing $SRC/$APP.py"
[[ -d "$WIT" ]] || die "missing $WIT"
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR/src" "$BUILD_DIR/bindings" "$OUT_DIR"
# Only the policy's own Python sources; never a stale __pycache__ or bindings.
find "$SRC" -maxdepth 1 -type f -name '*.py' -exec cp {} "$BUILD_DIR/src/" \;

start=$(date +%s.%N)

# Stub bindings (for IDEs and the quick native import check below). componentize-py
# generates the real bindings itself, inside the component, during `componentize`.
"${CPY[@]}" -q -d "$WIT" -w "$WORLD" bindings "$BUILD_DIR/bindings"
# (The stub bindings need Python >= 3.11: they import typing.Self.)
if [[ -n "$PYTHON" ]] && "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    # Fails fast, with a readable traceback, when app.py names something the WIT lacks.
    (cd "$BUILD_DIR" && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$BUILD_DIR/bindings:$BUILD_DIR/src" \
        "$PYTHON" -c "import $APP; assert $APP.wit_world.WitWorld in $APP.WitWorld.__mro__") \
        || die "app.py does not import against the generated bindings"
fi

# The component. Written beside the final path first so a failed build leaves no half file.
tmp_out="$OUT.tmp.$$"
trap 'rm -f "$tmp_out"' EXIT
(cd "$BUILD_DIR" && "${CPY[@]}" -d "$WIT" -w "$WORLD" componentize "$APP" -p "$BUILD_DIR/src" -o "$tmp_out")

# A component (not a core module): "\0asm", then version 0x0d and layer 1 (0d 00 01 00).
header="$(head -c 8 "$tmp_out" | od -An -tx1 | tr -d ' \n')"
[[ "$header" == "0061736d0d000100" ]] || die "output is not a wasm component (header $header)"
mv -f "$tmp_out" "$OUT"
trap - EXIT

end=$(date +%s.%N)
size=$(wc -c <"$OUT" | tr -d ' ')
elapsed=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
log "built $OUT"
printf '%s: %s bytes (%.1f MiB), %ss\n' "${OUT#"$ROOT"/}" "$size" \
    "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" "$elapsed"
