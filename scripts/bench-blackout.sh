#!/usr/bin/env bash
# Guest-visible blackout of a local update inside the lab, measured as in
# shared/LAB.md: the guest sends a numbered UDP datagram every 1 ms to L2 over
# virtio-net; the largest gap in their arrival across an update is the
# blackout. molt's exec, transfer and reboot mode (cpr-save, start again with
# --incoming file:, RAM on /dev/shm) against QEMU 7.2 with x-ignore-shared in
# two flows: restart (save to a file, quit, start again) and pre-started
# migration (the destination started beforehand with -incoming defer, migrate
# over a unix socket); RUNS updates each (rootfs/scenarios/bench-blackout.sh
# does the work in L2). molt's transfer and QEMU's pre-started migration
# alternate, one update each in turn, on two guests side by side (the one not
# being measured paused), so that both see the same load. Prints a markdown table: median (min-max) ms, ratio of
# medians to each QEMU flow's, datagrams lost. A benchmark, not a test: it passes as long as every
# update worked. Absolute numbers are inflated by TCG emulation: compare the
# rows with each other, not with numbers from elsewhere.
# Usage: scripts/bench-blackout.sh [SIZES]   SIZES: comma-separated guest RAM
#        sizes (default 256M; L2 has 3 GiB, so 1G is the largest that fits)
# Also writes the chart CHARTS/blackout.svg (default scripts/charts: the one the
# README shows) with scripts/svg-chart.sh.
# Environment: RUNS (5), MOLT_LAB_TIMEOUT (1500, per size), MOLT_BIN (as for lab.sh),
#              CHARTS, MOLT_LAB_APPEND (e.g. "molt.env.FLOWS=transfer,qmig
#              molt.env.LABUDP_TRACE=1": two flows, each gap's datagrams)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
sizes=${1:-256M}
log=$repo/target/lab/bench-blackout.log
tables=()
points=$(mktemp)
trap 'rm -f "$points"' EXIT
# One L2 boot per size: after QEMU's runs, the next size's molt guest once
# hung the whole L2 (no console output for 9 minutes; cause unknown), and a
# fresh L2 also keeps the sizes from influencing each other.
for size in ${sizes//,/ }; do
    MOLT_LAB_WITH_QEMU=1 MOLT_LAB_TIMEOUT=${MOLT_LAB_TIMEOUT:-1500} \
        MOLT_LAB_APPEND="molt.env.SIZES=$size molt.env.RUNS=${RUNS:-5} ${MOLT_LAB_APPEND:-}" \
        "$repo/scripts/lab.sh" bench-blackout >/dev/null || status=$?
    cp "$log" "${log%.log}-$size.log"
    grep -h '^LAB-RESULT\|^LAB-CHECK-FAIL' "$log" | tr -d '\r' >&2 || true
    # A size that failed adds no table; the others are still printed.
    t=$(grep '^LAB-TABLE ' "$log" | tr -d '\r' | sed 's/^LAB-TABLE //' || true)
    [[ -n $t ]] && tables+=("$t")
    grep '^LAB-POINT ' "$log" | tr -d '\r' | sed 's/^LAB-POINT //' >> "$points" || true
done
# The per-size tables side by side: the first keeps its flow column, the
# others add their cells.
echo
[[ ${#tables[@]} -gt 0 ]] || { echo "bench-blackout: no results" >&2; exit 1; }
printf '%s\n' "${tables[0]}" > /tmp/bench-blackout.$$
for t in "${tables[@]:1}"; do
    paste -d '' /tmp/bench-blackout.$$ <(printf '%s\n' "$t" | sed 's/^|[^|]*|//') > /tmp/bench-blackout.$$.new
    mv /tmp/bench-blackout.$$.new /tmp/bench-blackout.$$
done
cat /tmp/bench-blackout.$$
rm -f /tmp/bench-blackout.$$
charts=${CHARTS:-$repo/scripts/charts}
mkdir -p "$charts"
"$repo/scripts/svg-chart.sh" "$charts/blackout.svg" \
    "Guest-visible blackout of a local update (nested lab, TCG)" "guest RAM" \
    "blackout (ms)" bars < "$points"
echo
echo "Chart: $charts/blackout.svg"
echo "Guest: 1 vCPU, RAM in a /dev/shm file, UDP datagram every 1 ms (rootfs/tools/labudp.c);" \
    "L2: QEMU TCG, EPYC-v3, smp=${MOLT_LAB_SMP:-2}; logs ${log%.log}-SIZE.log"
exit "${status:-0}"
