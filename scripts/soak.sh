#!/usr/bin/env bash
# Soak (README, "Benchmarks"): UPDATES (default 1000) live updates of one
# counting guest with 2 vCPUs, alternating exec and transfer, directly on this
# machine's /dev/kvm. Fails if the guest's count is not one run, or if the
# process running the guest then holds more descriptors, threads, children or
# RSS (beyond 1 MiB) than after the first ten; prints the pause distribution
# (min, median, p99, max) of each mode. The test is
# tests/upgrade.rs::soak_alternating_exec_and_transfer, ignored by `cargo test`
# for its length (about 3 minutes here).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
. scripts/target.sh
MOLT_SOAK_UPDATES=${UPDATES:-1000} exec cargo test --release --test upgrade \
    -- --ignored --nocapture --exact soak_alternating_exec_and_transfer
