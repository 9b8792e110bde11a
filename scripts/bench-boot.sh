#!/usr/bin/env bash
# Boot-time benchmark inside the lab: VMM launch to the guest's first /init
# line, molt vs QEMU 7.2 (rootfs/scenarios/bench-boot.sh does the timing in L2).
# Prints a markdown table. Absolute numbers are inflated by TCG emulation:
# compare the rows with each other, not with numbers from elsewhere.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
MOLT_LAB_WITH_QEMU=1 "$repo/scripts/lab.sh" bench-boot >/dev/null || status=$?
log=$repo/target/lab/bench-boot.log
grep -h '^LAB-RESULT' "$log" | tr -d '\r' >&2 || true
echo
grep '^LAB-TABLE ' "$log" | tr -d '\r' | sed 's/^LAB-TABLE //'
echo
echo "L2: QEMU TCG, EPYC-v3, smp=${MOLT_LAB_SMP:-2}; timer: CLOCK_MONOTONIC via labtime (rootfs/tools/labtime.c)"
exit "${status:-0}"
