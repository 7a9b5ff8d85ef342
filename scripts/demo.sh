#!/usr/bin/env bash
# The main job, on an embedded default (one host, local tier): set up, start a daemon,
# use a chunk space (shared-memory cache, leases, durability across kill -9), load the
# official plugins, swap one under load, mount a managed filesystem whose READ events the
# HSM policy answers and whose creates a shell DM application vetoes, and print what
# happened.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
cargo build --release --bins -q
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
W="${STRATA_COMPONENTS:-$ROOT/target/wasm-components}"
DIR="$(mktemp -d /tmp/strata-demo.XXXXXX)"
SOCK="$DIR/stratad.sock"
mkdir -p "$DIR/shm"
SHM="$(mktemp -d /dev/shm/strata-demo.XXXXXX)"
printf '[spaces]\nshm_dir = "%s"\nspawn_allow = ["/usr/bin/env"]\n' "$SHM" > "$DIR/stratad.toml"
start() {
    "$BIN/stratad" --config "$DIR/stratad.toml" --data-dir "$DIR/data" --socket "$SOCK" 2>>"$DIR/stratad.log" &
    PID=$!
    for _ in $(seq 100); do "$BIN/strata" --socket "$SOCK" status >/dev/null 2>&1 && break; sleep 0.1; done
}
start
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR" "$SHM"' EXIT
strata() { "$BIN/strata" --socket "$SOCK" "$@"; }
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }

say "daemon"
strata status
say "a durable chunk space: write, read (from the shared-memory cache), write in place, list"
strata space create demo --slot-size 1048576 --slots 64
echo "hello, chunk" | strata chunk write demo greeting
strata chunk read demo greeting
head -c 1000000 /dev/urandom > "$DIR/big.bin"
strata chunk write demo data/big "$DIR/big.bin" --lease
strata chunk read demo data/big -o "$DIR/big.out" && cmp "$DIR/big.bin" "$DIR/big.out" && echo "1 MB chunk read back identical"
strata space chunks demo
strata space hosts demo
strata space cache demo
say "a reader waits for the next version; a writer publishes it"
strata chunk wait demo greeting --after 1 --timeout-ms 10000 &
WAITER=$!
sleep 0.3
echo "hello again" | strata chunk write demo greeting
wait $WAITER
say "kill -9 the daemon: acknowledged writes of a durable space survive"
kill -9 $PID; wait $PID 2>/dev/null || true
start
strata chunk read demo greeting
strata chunk read demo data/big -o "$DIR/big.out" && cmp "$DIR/big.bin" "$DIR/big.out" && echo "1 MB chunk intact after kill -9"
say "invalidate: the chunk reads as READ_WAITING until written again"
strata chunk invalidate demo greeting
strata chunk read demo greeting || true
say "spawn an allow-listed program on a host of the space, as you"
strata spawn demo "$(strata space hosts demo)" /usr/bin/env
strata spawn demo "$(strata space hosts demo)" /bin/sh -c true || true
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
if [ "$(id -u)" = 0 ]; then
    say "a managed filesystem over FUSE: unmanaged files use kernel passthrough"
    mkdir -p "$DIR/backing" "$DIR/mnt"
    echo "resident data" > "$DIR/backing/resident"
    echo "stub of migrated data" > "$DIR/backing/migrated"
    strata fs mount "$DIR/backing" "$DIR/mnt"
    strata fs list
    say "managed regions and a DM attribute recording a migration"
    strata dm region set "$DIR/mnt/resident" 0:0:r
    strata dm region set "$DIR/mnt/migrated" 0:0:r
    strata dm attr set "$DIR/mnt/migrated" stratloc archive
    strata dm region get "$DIR/mnt/migrated"
    say "the Rust HSM policy answers the READ events of that filesystem"
    strata plugin load hsm-rs "$W/hsm-age-policy.wasm" --kind dm-policy
    strata dm attach hsm-rs "$DIR/mnt" --events read
    cat "$DIR/mnt/resident"
    cat "$DIR/mnt/migrated" || echo "(refused with EIO: the policy must recall first, and no tier exists yet)"
    say "a DM application from the shell: it vetoes a create"
    sid=$(strata dm sessions --create demo-watcher)
    strata dm events "$sid" --dispose "$DIR/mnt" --events create
    (touch "$DIR/mnt/forbidden" 2>&1 || true) &
    TOUCH=$!
    line=$(strata dm events "$sid" --wait --max 1)
    echo "$line"
    token=$(echo "$line" | sed -E 's/.*"token":([0-9]+).*/\1/')
    strata dm respond "$sid" "$token" abort 13
    wait $TOUCH
    strata dm events "$sid" --dispose "$DIR/mnt" --events ""
    strata dm sessions
    strata fs umount "$DIR/mnt"
else
    say "managed filesystems need root (FUSE mounts): skipped"
fi
say "plugins, versions and counters"
strata plugin list
