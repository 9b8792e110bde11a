#!/usr/bin/env bash
# Reboot-mode CPR benchmark, directly on this machine's /dev/kvm with the tiny
# counting guest (tests/data/counting.elf), 1 vCPU: for each RAM size, CYCLES
# times `molt ctl SOCK cpr-save STATE`, wait for the old molt to exit, then
# `molt run <same args> --incoming file:STATE`. Prints a markdown table of
# min/median/max per size and metric.
#
# Metrics:
#   save_us      molt's own, from the cpr-save reply (pause -> file renamed, fsynced)
#   restore_us   molt's own, from the restore log line (read state -> vCPUs ready)
#   pause_us     molt's own: CLOCK_REALTIME from the last vCPU stopping in the old
#                process to the vCPUs starting in the new one (includes both
#                processes' exit/start and this script's gap between them)
#   old_exit_us  external: reply received -> old molt reaped
#   start_us     estimate: new molt spawned -> its restore began (fork, exec, setup
#                before the state is read), = (t_reply - save_us + pause_us)
#                - restore_us - t_spawn, exact to the reply's transit time
#   next_line_us external: reply received -> the restored guest's next complete
#                serial line (includes process start, and up to one line period of
#                guest work on top, see line_us)
#   resumed_us   estimate: next_line_us minus the guest work that line still needed
#                when the guest stopped (one line period minus the time from the
#                last line before the save to the stop), at the steady line rate
#   line_us      the guest's steady-state time per serial line, for scale
#
# The serial console is a FIFO read by a background loop that stamps each line
# with $EPOCHREALTIME as it completes; the line count sequence is checked for
# continuity (nothing lost or repeated across all cycles).
#
# Environment: MOLT_BIN (default: cargo build --release and use that),
# CYCLES (20), SIZES ("256M 1G 4G"), COPY_SIZE (256M, the RAM-copy fallback row
# set; empty to skip), STATE_DIR (where the state file goes; default a fresh
# directory under /tmp, which is on the root filesystem here: its fsyncs are real).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
kernel=$repo/tests/data/counting.elf
cycles=${CYCLES:-20}
sizes=${SIZES:-"256M 1G 4G"}
copy_size=${COPY_SIZE-256M}
if [[ -n ${MOLT_BIN:-} ]]; then
    molt=$MOLT_BIN
else
    . "$repo/scripts/target.sh"
    (cd "$repo" && cargo build --release --quiet)
    molt=$MOLT_RELEASE_BIN
fi
work=$(mktemp -d /tmp/molt-bench-cpr.XXXXXX)
state_dir=${STATE_DIR:-$work}
mkdir -p "$state_dir"
# The counting guest's step between two lines (tests/common/guest.rs COUNT_STEP).
count_step=1024
pid= reader= memfile=

cleanup() {
    [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    [[ -n $reader ]] && kill "$reader" 2>/dev/null && wait "$reader" 2>/dev/null
    [[ -n $memfile ]] && rm -f "$memfile"
    rm -rf "$work"
    true
}
trap cleanup EXIT

die() {
    echo "bench-cpr: $*" >&2
    exit 1
}

now_us() { echo "${EPOCHREALTIME/[.,]/}"; }

# Stamps each line of stdin with the microsecond it completed.
stamp_lines() {
    local line
    while IFS= read -r line; do
        printf '%s %s\n' "${EPOCHREALTIME/[.,]/}" "$line"
    done
}

# Waits (up to 20 s) until the stamped serial log has at least $1 lines.
wait_lines() {
    local deadline=$(($(now_us) + 20000000))
    while (($(wc -l <"$stamps") < $1)); do
        (($(now_us) < deadline)) || die "$label: guest output stalled at $(wc -l <"$stamps") lines; log: $(cat "$log")"
        sleep 0.005
    done
}

# Prints "LAST_BEFORE FIRST_AFTER": the stamps of the last count line before $1
# (µs) and of the first one after it, waiting up to 20 s for the latter.
first_line_after() {
    local deadline=$(($(now_us) + 20000000)) found
    while :; do
        found=$(awk -v t0="$1" '$2 !~ /^count=/ { next }
            $1 <= t0 { last = $1 } $1 > t0 { print last, $1; exit }' "$stamps")
        [[ -n $found ]] && { echo "$found"; return; }
        (($(now_us) < deadline)) || die "$label: no serial line after the restore; log: $(cat "$log")"
        sleep 0.001
    done
}

# Prints "min median max" of the numbers on stdin.
stats() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a n/a n/a"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%d %d %d\n", v[1], m, v[NR] }'
}

# The counts must step by exactly count_step with one start line: one continuous run.
check_continuity() {
    awk -v step="$count_step" '
        $2 == "molt-guest:" { starts++; next }
        $2 ~ /^count=/ {
            v = 0; h = substr($2, 7)
            for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789ABCDEF", substr(h, i, 1)) - 1
            if (prev != "" && v - prev != step) { printf "count %s after %x\n", h, prev; bad++ }
            prev = v; next
        }
        { printf "unexpected line: %s\n", $0; bad++ }
        END { if (starts != 1) { printf "%d start lines\n", starts; bad++ } exit bad > 0 }
    ' "$stamps" >&2 || die "$label: the guest's output is not one continuous run"
}

# run_set LABEL SIZE in-place|copy: one booted guest, $cycles save+restore cycles.
run_set() {
    label=$1
    local size=$2 mode=$3 dir=$work/$1 fd reply t0 t_exit t_spawn first line i s r p
    mkdir -p "$dir"
    local sock=$dir/ctl.sock state=$state_dir/$1.state fifo=$dir/serial.fifo
    stamps=$dir/serial.stamped
    local args=(--kernel "$kernel" --mem "$size" --serial stdio --control "$sock")
    memfile=
    if [[ $mode == in-place ]]; then
        memfile=/dev/shm/molt-bench-cpr-$$-$1
        args+=(--mem-file "$memfile")
    fi
    mkfifo "$fifo"
    # Held open read-write, so the FIFO never sees EOF between two molts.
    exec {fd}<>"$fifo"
    : >"$stamps"
    stamp_lines <&"$fd" >>"$stamps" &
    reader=$!
    log=$dir/run0.log
    "$molt" run "${args[@]}" >"$fifo" 2>"$log" </dev/null &
    pid=$!
    wait_lines 3
    local save= restore= pause= old_exit= start= next_line= stops= gaps=
    for ((i = 1; i <= cycles; i++)); do
        wait_lines $(($(wc -l <"$stamps") + 3))
        reply=$("$molt" ctl "$sock" cpr-save "$state") || die "$label: cpr-save: $reply"
        t0=$(now_us)
        [[ $reply == "ok saved "* ]] || die "$label: cpr-save replied $reply"
        wait "$pid" || die "$label: the saving molt exited with $?; log: $(cat "$log")"
        t_exit=$(now_us)
        log=$dir/run$i.log
        t_spawn=$(now_us)
        "$molt" run "${args[@]}" --incoming "file:$state" >"$fifo" 2>"$log" </dev/null &
        pid=$!
        first=$(first_line_after "$t0")
        # molt logs the restore right after starting the vCPUs: allow it a moment.
        for _ in {1..200}; do
            line=$(grep -m1 'resumed from' "$log" || true)
            [[ -z $line ]] || break
            sleep 0.01
        done
        [[ -n $line ]] || die "$label: no restore line in the log: $(cat "$log")"
        s=${reply##*save_us=}
        r=$(sed 's/.*restore_us=\([0-9]*\).*/\1/' <<<"$line")
        p=$(sed 's/.*pause_us=\([0-9]*\).*/\1/' <<<"$line")
        save+="$s " restore+="$r " pause+="$p "
        old_exit+="$((t_exit - t0)) "
        start+="$((t0 - s + p - r - t_spawn)) "
        next_line+="$((${first#* } - t0)) "
        stops+="$((t0 - s)) "
        # "REPLY_TO_LINE:LAST_LINE_TO_STOP", for resumed_us once line_us is known.
        gaps+="$((${first#* } - t0)):$((t0 - s - ${first% *})) "
    done
    "$molt" ctl "$sock" quit >/dev/null
    wait "$pid" || true
    pid=
    check_continuity
    # Steady-state line period: intervals between consecutive count lines,
    # leaving out the ones that span a stop.
    line_us=$(awk -v stops="$stops" 'BEGIN { n = split(stops, s, " ") }
        $2 !~ /^count=/ { next }
        prev { ok = 1; for (i = 1; i <= n; i++) if (prev < s[i] && s[i] < $1) ok = 0; if (ok) print $1 - prev }
        { prev = $1 }' "$stamps" | stats | awk '{ print $2 }')
    local est= g left
    for g in $gaps; do
        # Guest work the next line still needed at the stop: one period minus what
        # had passed since the last line (never below zero).
        left=$((line_us - ${g#*:}))
        ((left > 0)) || left=0
        est+="$((${g%:*} - left)) "
    done
    row "$size" "$mode" save_us "$save"
    row "$size" "$mode" restore_us "$restore"
    row "$size" "$mode" pause_us "$pause"
    row "$size" "$mode" old_exit_us "$old_exit"
    row "$size" "$mode" start_us "$start"
    row "$size" "$mode" next_line_us "$next_line"
    row "$size" "$mode" resumed_us "$est"
    row "$size" "$mode" line_us "$line_us"
    kill "$reader" 2>/dev/null || true
    wait "$reader" 2>/dev/null || true
    reader=
    exec {fd}>&-
    [[ -n $memfile ]] && rm -f "$memfile"
    memfile=
    rm -f "$state"
}

row() {
    local min med max
    read -r min med max < <(tr ' ' '\n' <<<"$4" | grep . | stats)
    printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$min" "$med" "$max"
}

echo "| RAM | RAM mode | metric | min | median | max |"
echo "|---|---|---|---|---|---|"
for size in $sizes; do
    run_set "in-place-$size" "$size" in-place
done
if [[ -n $copy_size ]]; then
    run_set "copy-$copy_size" "$copy_size" copy
fi
echo
echo "$cycles cycles each; 1 vCPU; counting guest; $(uname -r); $(nproc) CPUs;" \
    "state file in $(df --output=fstype "$state_dir" | tail -1) ($state_dir);" \
    "RAM in place = --mem-file on /dev/shm, copy = memfd RAM written into the state file."
