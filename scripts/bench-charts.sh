#!/usr/bin/env bash
# Regenerates every chart and table the README's "Benchmarks" section shows
# from a benchmark: scripts/bench-update.sh (the pause directly here: phase
# tables, scripts/charts/pause-ram.svg and pause-vcpus.svg) and then
# scripts/bench-blackout.sh 256M,1G (the lab blackout: its table and
# scripts/charts/blackout.svg), then scripts/bench-libc.sh (the musl build's
# pause against the glibc one's). Each runs under the lab lock
# (/tmp/molt-lab.lock, one benchmark or lab at a time on the machine), taken
# here; the tables go to stdout and to target/bench/update.md, blackout.md and
# libc.md, to paste into the README. Takes about an hour here (TCG lab, 2 CPUs).
# Environment: as for the two scripts (RUNS applies to both: leave it unset for
# their defaults, 20 updates and 5); BLACKOUT_SIZES (256M,1G).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$repo/target/bench
mkdir -p "$out"
# One failing benchmark does not keep the others from running; the status
# says whether all of them worked.
status=0
flock /tmp/molt-lab.lock "$repo/scripts/bench-update.sh" | tee "$out/update.md" || status=1
flock /tmp/molt-lab.lock "$repo/scripts/bench-blackout.sh" "${BLACKOUT_SIZES:-256M,1G}" | tee "$out/blackout.md" || status=1
flock /tmp/molt-lab.lock "$repo/scripts/bench-libc.sh" | tee "$out/libc.md" || status=1
exit $status
