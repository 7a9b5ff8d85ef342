#!/usr/bin/env bash
# Sets up the machine and runs every check and test of the project:
# format, lints, unit tests, plugin-host integration tests, end-to-end tests with real
# daemons, and the benchmark in quick mode (so it cannot rot).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
step() { printf '\n=== %s\n' "$*" >&2; }
t0=$SECONDS

step "setup (toolchains, packages, guest plugins)"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "build binaries"
cargo build --workspace --bins

step "tests"
cargo test --workspace --no-fail-fast

step "benchmarks, quick mode (full runs: cargo bench -p strata-runtime --bench plugin|spaces|dm, cargo bench -p strata-tests --bench fs_scale)"
STRATA_BENCH_QUICK=1 cargo test -p strata-runtime --bench plugin
STRATA_BENCH_QUICK=1 cargo test -p strata-runtime --bench spaces
STRATA_BENCH_QUICK=1 cargo test -p strata-runtime --bench dm
STRATA_BENCH_QUICK=1 cargo test -p strata-tests --bench fs_scale

step "all checks passed in $((SECONDS - t0)) s"
