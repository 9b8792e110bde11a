#!/usr/bin/env bash
# Device benchmark inside the lab: virtio-blk (sequential and 4 KiB random
# O_DIRECT I/O) and virtio-net (TCP each way), molt vs QEMU 7.2 in one L2 boot
# (rootfs/scenarios/bench-devices.sh does the work in L2). Prints a markdown
# table. Absolute numbers are inflated by TCG emulation: compare the rows with
# each other, not with numbers from elsewhere.
# Environment: RUNS (rounds, default 5), SEQ_MIB (128), RR_SECS (10), TCP_MIB (128)
# are passed to the scenario on L2's kernel command line.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
params=
for v in RUNS SEQ_MIB RR_SECS TCP_MIB; do
    [[ -n ${!v:-} ]] && params+=" molt.env.$v=${!v}"
done
# Everything else running on this machine competes with the lab for its cores:
# the load average says how quiet it was.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
MOLT_LAB_APPEND="${MOLT_LAB_APPEND:-}$params" MOLT_LAB_TIMEOUT=${MOLT_LAB_TIMEOUT:-900} \
    MOLT_LAB_WITH_QEMU=1 "$repo/scripts/lab.sh" bench-devices >/dev/null || status=$?
log=$repo/target/lab/bench-devices.log
grep -h -E '^LAB-(RESULT|INFO|CHECK-FAIL)' "$log" | tr -d '\r' >&2 || true
echo
grep '^LAB-TABLE ' "$log" | tr -d '\r' | sed 's/^LAB-TABLE //'
echo
echo "L2: QEMU TCG, EPYC-v3, smp=${MOLT_LAB_SMP:-2}; guest: 1 vCPU, 512 MiB; image in L2 tmpfs;" \
    "QEMU: virtio-blk-pci cache=writeback,aio=threads, virtio-net-pci tap vhost=off;" \
    "load average before: $load_start, after: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "${status:-0}"
