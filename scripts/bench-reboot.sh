#!/usr/bin/env bash
# Reboot-mode local update inside the lab: molt's cpr-save + restart with
# --incoming against QEMU 7.2's x-ignore-shared save/quit/-incoming flow,
# same guest, 256 MiB in a /dev/shm file, 5 runs each, alternating
# (rootfs/scenarios/bench-reboot.sh does the work in L2). Prints a markdown
# table. Absolute numbers are inflated by TCG emulation: compare the rows with
# each other, not with numbers from elsewhere.
# Environment: RUNS (default 5), COUNT_MS (the guest counter's period,
# default 20), and scripts/lab.sh's.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
env_args="molt.env.RUNS=${RUNS:-5} molt.env.COUNT_MS=${COUNT_MS:-20}"
MOLT_LAB_WITH_QEMU=1 MOLT_LAB_APPEND="${MOLT_LAB_APPEND:-} $env_args" \
    "$repo/scripts/lab.sh" bench-reboot >/dev/null || status=$?
log=$repo/target/lab/bench-reboot.log
grep -h '^LAB-RESULT' "$log" | tr -d '\r' >&2 || true
echo
grep '^LAB-TABLE ' "$log" | tr -d '\r' | sed 's/^LAB-TABLE //'
echo
echo "L2: QEMU TCG, EPYC-v3, smp=${MOLT_LAB_SMP:-2}; timer: L2 CLOCK_MONOTONIC at the VMM's console pipe (labcpr stamp)"
exit "${status:-0}"
