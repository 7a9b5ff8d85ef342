#!/usr/bin/env bash
# The main job, on an embedded default (one host, local tier): set up, start a daemon,
# load the official plugins, swap one under load, and print what happened.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
cargo build --release --bins -q
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
W="${STRATA_COMPONENTS:-$ROOT/target/wasm-components}"
DIR="$(mktemp -d /tmp/strata-demo.XXXXXX)"
SOCK="$DIR/stratad.sock"
"$BIN/stratad" --data-dir "$DIR/data" --socket "$SOCK" 2>"$DIR/stratad.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do [[ -S "$SOCK" ]] && break; sleep 0.1; done
strata() { "$BIN/strata" --socket "$SOCK" "$@"; }
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }

say "daemon"
strata status
say "load the official plugins"
strata plugin load placement "$W/placement-rendezvous.wasm" --kind placement
strata plugin load hsm "$W/hsm-age-policy.wasm" --kind dm-policy --config $'tier=archive\nmin_size=1048576\nmin_age_secs=86400'
say "a placement decision (first host holds the alpha copy)"
strata place placement demo chunk-0001 --host alpha:500000000000 --host beta:200000000000 --host gamma:900000000000
say "swap the placement plugin under load: 4 clients, 20000 calls"
strata plugin bench placement --calls 20000 --concurrency 4 > "$DIR/bench.out" &
BENCH=$!
sleep 0.5
strata plugin swap placement "$W/placement-echo.wasm"
wait $BENCH
cat "$DIR/bench.out"
say "a bad new version is refused; the old one keeps serving"
strata plugin swap placement "$W/faulty-init.wasm" || true
say "a version that traps is rolled back automatically"
strata plugin swap placement "$W/faulty-panic.wasm"
strata plugin bench placement --calls 100 --concurrency 2
say "the HSM policy slot takes a Python policy (componentize-py) too"
strata plugin swap hsm "$W/hsm-py-policy.wasm" --deadline-ms 2000 --memory-limit 268435456
say "plugins, versions and counters"
strata plugin list
