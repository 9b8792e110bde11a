#!/usr/bin/env bash
# The pause of the musl build against the static glibc one (issue 14): builds
# both release binaries (x86_64-unknown-linux-musl, the default, and
# x86_64-unknown-linux-gnu with crt-static), then runs scripts/bench-update.sh
# on each in turn, exec and transfer, 1 and 8 vCPUs at 256 MiB, RUNS updates
# (20) per column. Run it under the lab lock, as every benchmark:
# `flock /tmp/molt-lab.lock scripts/bench-libc.sh`. Prints a markdown table of
# pause_us, min / median / max, and each binary's size; the full phase tables
# go to target/bench/libc-BUILD.md. Needs the musl target (scripts/setup.sh).
# Environment: RUNS (20), CPUS ("1 8"), MODES ("exec transfer").
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$repo/target/bench
mkdir -p "$out"
builds="musl gnu"
for b in $builds; do
    (cd "$repo" && cargo build --release --quiet --target "x86_64-unknown-linux-$b")
done
charts=$(mktemp -d)
trap 'rm -rf "$charts"' EXIT
for b in $builds; do
    MOLT_BIN=$repo/target/x86_64-unknown-linux-$b/release/molt CHARTS=$charts SIZES=256M \
        CPUS=${CPUS:-"1 8"} MODES=${MODES:-"exec transfer"} RUNS=${RUNS:-20} \
        "$repo/scripts/bench-update.sh" >"$out/libc-$b.md"
done
# The pause_us row of each mode's table, one table row per build and mode.
cols=$(sed -n 's/^| | \(.*\) |$/\1/p' "$out/libc-musl.md" | head -n 1)
echo "| build | size (bytes) | mode | $cols |"
echo "|---|---|---|$(awk -F'|' '{ for (i = 1; i <= NF; i++) printf "---|" }' <<<"$cols")"
for b in $builds; do
    size=$(stat -c %s "$repo/target/x86_64-unknown-linux-$b/release/molt")
    awk -v b="$b" -v size="$size" '
        /^### / { mode = $2; sub(/:$/, "", mode) }
        /^\| \*\*pause_us\*\* \|/ { sub(/^\| \*\*pause_us\*\* \|/, ""); print "| " b " | " size " | " mode " |" $0 }
    ' "$out/libc-$b.md"
done
echo
echo "pause_us, min / **median** / max of ${RUNS:-20} updates; full tables: $out/libc-*.md; $(grep -m 1 'CPUs; counting guest' "$out/libc-musl.md" | sed 's/;.*//')."
