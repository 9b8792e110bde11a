#!/usr/bin/env bash
# The lab's console filter (scripts/lab.sh): passes every line through as it
# comes and stops QEMU when the lab host (L2) itself has hung, so that a lab
# run ends with the reason instead of waiting out its timeout.
#
# Two signs, each ending in `LAB-L2-HUNG <why>` and a kill of the process in
# PIDFILE (QEMU's -pidfile):
# - L2's kernel reports a CPU stuck in kernel mode with interrupts on, every
#   ~20 s while it lasts ("watchdog: BUG: soft lockup - CPU#0 stuck for 26s!
#   [vcpu1:123]"); one that has lasted LOCKUP_S seconds. A single shorter
#   report can be L1 starving QEMU of CPU time; it is only passed on.
# - L2 stops beating: rootfs/host/init writes its uptime to its second serial
#   port (HEARTBEAT, a file here) every 5 s; once it has started, the file not
#   growing for SILENT_S seconds. This catches CPUs stuck with interrupts off,
#   which no watchdog in L2 can report (seen: both L2 CPUs looping on an INT3
#   in __schedule, rootfs/tools/labkvmhold.c).
#
# Usage: lab-watch.sh PIDFILE LOCKUP_S HEARTBEAT SILENT_S < console > console
# (bash, not awk: mawk reads a pipe in blocks and would hold lines back.)
set -u
pidfile=$1
lockup_s=$2
heartbeat=$3
silent_s=$4
report_re='soft lockup - CPU#[0-9]+ stuck for ([0-9]+)s!'
hung=0
pending=
beat_size=0
beat_at=$SECONDS
checked=-1

stop() {
    hung=1
    printf 'LAB-L2-HUNG %s\n' "$1"
    kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null
}

while :; do
    if IFS= read -r -t 1 part; then
        line=$pending$part
        pending=
        printf '%s\n' "$line"
        if [[ $hung == 0 && $line =~ $report_re ]] && ((BASH_REMATCH[1] >= lockup_s)); then
            line=${line#*watchdog: }
            stop "${line%$'\r'}"
        fi
    elif (($? > 128)); then
        # Timed out, maybe in the middle of a line: keep what came.
        pending+=$part
    else
        [[ -n $pending$part ]] && printf '%s\n' "$pending$part"
        break
    fi
    # The heartbeat, once a second.
    ((SECONDS == checked)) && continue
    checked=$SECONDS
    size=$(stat -c %s "$heartbeat" 2>/dev/null || echo 0)
    if ((size != beat_size)); then
        beat_size=$size
        beat_at=$SECONDS
    elif ((hung == 0 && size > 0 && SECONDS - beat_at >= silent_s)); then
        stop "no heartbeat from L2 for $silent_s s (its CPUs are stuck, interrupts off, or it stopped)"
    fi
done
