#!/usr/bin/env bash
# Exec- and transfer-mode live-update benchmark (SPEC.md "Pause time"), directly
# on this machine's /dev/kvm with the tiny counting guest (tests/data/counting.elf),
# 1 vCPU, release build. Prints markdown tables.
#
# 1. Pause: for each RAM size, one booted guest, RUNS x `molt ctl SOCK cpr-exec`
#    (same binary), then another guest and RUNS x transfer (`molt run <same args>
#    --incoming unix:PATH` started first, then `molt ctl SOCK cpr-transfer PATH`).
#    Guest RAM is the default memfd (untouched pages cost nothing), plus one
#    series with --mem-file on /dev/shm whose first TOUCHED bytes were written
#    with dd before boot (populated RAM).
#    pause_us    molt's own, from the reply: the old process's snapshot start to
#                the vCPUs running in the new image/process (CLOCK_REALTIME)
#    restore_us  molt's own, from the new side's log line `resumed after ...`.
#                exec: mapping RAM, building the VM and restoring it; transfer:
#                decoding and restoring into the VM prepared before the pause,
#                plus the RESTORED/GO round trip and the vCPU start
#    rest_us     pause_us - restore_us: save + handover (exec: state memfd,
#                execve, the new image's start-up; transfer: encode and send)
# 2. Breakdown (needs `perf` and tracefs; BREAKDOWN_RUNS=0 skips it): a few more
#    updates per mode at the smallest and the largest size, traced with kernel
#    tracepoints on molt's own system calls (KVM_RUN is filtered out, so the
#    guest is not slowed). Segment boundaries, all in the traced processes:
#    exec:     save      KVM_GET_IRQCHIP (first save ioctl) -> memfd_create (state encoded)
#              execve    memfd_create -> sched_process_exec (memfd written, execve)
#              release   sched_process_exec -> the new image's first system call
#                        (the kernel closes the old image's CLOEXEC descriptors -
#                        KVM VM and vCPUs - as deferred work on the way back to
#                        user space: this is the old VM's destruction)
#              startup   first system call -> KVM_CREATE_VM (runtime, argv, read
#                        the state, adopt descriptors, map RAM)
#              restore   KVM_CREATE_VM -> the `resumed after exec` log write
#    transfer: save      old: KVM_GET_IRQCHIP -> the STATE frame write
#              handoff   STATE write -> new: KVM_SET_IRQCHIP (received, decoded)
#              restore   KVM_SET_IRQCHIP -> the `resumed after transfer` log write
#                        (restore, RESTORED/GO round trip, vCPU start)
#    Also listed, for one traced exec per size: the slowest gaps between the new
#    image's KVM ioctls, and where molt's main thread sleeps during the pause
#    (sched_switch kernel stacks). Tracing costs a little: compare the traced
#    pause_us with the untraced table (a traced transfer's restore runs long).
#
# Environment: MOLT_BIN (default: cargo build --release and use that), RUNS (20),
# SIZES ("256M 1G 4G 16G"), TOUCHED (1G; empty to skip that series),
# BREAKDOWN_RUNS (5), MODES ("exec transfer"), KEEP (set: keep the scratch
# directory with every log, serial output and trace). The binary is copied to a
# scratch directory first: exec mode re-executes it by path, so a concurrent
# rebuild must not replace it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
kernel=$repo/tests/data/counting.elf
runs=${RUNS:-20}
sizes=${SIZES:-"256M 1G 4G 16G"}
touched=${TOUCHED-1G}
breakdown_runs=${BREAKDOWN_RUNS:-5}
modes=${MODES:-"exec transfer"}
if [[ -z ${MOLT_BIN:-} ]]; then
    . "$repo/scripts/target.sh"
    (cd "$repo" && cargo build --release --quiet)
    MOLT_BIN=$MOLT_RELEASE_BIN
fi
work=$(mktemp -d /tmp/molt-bench-update.XXXXXX)
molt=$work/molt
cp "$MOLT_BIN" "$molt"
count_step=1024
pids=() memfile=

cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    [[ -n $memfile ]] && rm -f "$memfile"
    if [[ -z ${KEEP:-} ]]; then
        rm -rf "$work"
    fi
    true
}
trap cleanup EXIT

die() {
    echo "bench-update: $*" >&2
    exit 1
}

now_us() { echo "${EPOCHREALTIME/[.,]/}"; }

# Prints "min median max" of the numbers on stdin (n/a if none).
stats() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a n/a n/a"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%d %d %d\n", v[1], m, v[NR] }'
}

median() { tr ' ' '\n' <<<"$1" | grep . | stats | awk '{ print $2 }'; }

# Whether a UNIX socket is listening on $1 (connecting would be taken for the
# old process by a molt waiting on --incoming unix:).
listening() {
    awk -v p="$1" 'NR > 1 && $4 == "00010000" && $8 == p { found = 1 } END { exit !found }' /proc/net/unix
}

counts() {
    local n
    n=$(grep -c '^count=' "$serial" 2>/dev/null) || true
    echo "${n:-0}"
}

# Waits (up to 20 s) until the serial file has at least $1 count lines.
wait_counts() {
    local deadline=$(($(now_us) + 20000000))
    while (($(counts) < $1)); do
        (($(now_us) < deadline)) || die "$label: the guest stalled at $(counts) lines; log: $(cat "$log")"
        sleep 0.005
    done
}

# The serial output without a last line cut short by `quit`.
complete_lines() {
    if [[ -z $(tail -c1 "$serial") ]]; then
        cat "$serial"
    else
        head -n -1 "$serial"
    fi
}

# The counting guest's output must be one run: one start line, then counts
# stepping by exactly count_step.
check_continuity() {
    awk -v step="$count_step" '
        $0 == "molt-guest: start" { starts++; next }
        /^count=/ {
            v = 0; h = substr($0, 7)
            for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789ABCDEF", substr(h, i, 1)) - 1
            if (prev != "" && v - prev != step) { printf "count %s after %x\n", h, prev; bad++ }
            prev = v; next
        }
        { printf "unexpected line: %s\n", $0; bad++ }
        END { if (starts != 1) { printf "%d start lines\n", starts; bad++ } exit bad > 0 }
    ' <(complete_lines) >&2 || die "$label: the guest's output is not one continuous run"
}

# boot LABEL SIZE [TOUCH]: one guest of SIZE RAM; with TOUCH, RAM is a
# --mem-file on /dev/shm whose first TOUCH bytes are written first.
boot() {
    label=$1
    local size=$2 touch=${3:-}
    dir=$work/$label
    mkdir -p "$dir"
    sock=$dir/ctl.sock serial=$dir/serial.out log=$dir/molt-0.log
    args=(--kernel "$kernel" --mem "$size" --serial "file:$serial" --control "$sock")
    if [[ -n $touch ]]; then
        memfile=/dev/shm/molt-bench-update-$$-$label
        # Mode 0600: molt refuses a --mem-file other users may read.
        (umask 077 && dd if=/dev/zero of="$memfile" bs=1M \
            count=$(($(numfmt --from=iec "$touch") >> 20)) status=none)
        args+=(--mem-file "$memfile")
    fi
    "$molt" run "${args[@]}" 2>"$log" </dev/null >/dev/null &
    pid=$!
    pids+=("$pid")
    spawned=1
    wait_counts 3
}

shutdown() {
    "$molt" ctl "$sock" quit >/dev/null || true
    wait "$pid" 2>/dev/null || true
    pids=()
    check_continuity
    if [[ -n $memfile ]]; then
        rm -f "$memfile"
        memfile=
    fi
}

# Starts `molt run <args> --incoming unix:...`; sets newpid, newlog, inpath.
spawn_incoming() {
    inpath=$dir/in-$spawned.sock newlog=$dir/molt-$spawned.log
    spawned=$((spawned + 1))
    "$molt" run "${args[@]}" --incoming "unix:$inpath" 2>"$newlog" </dev/null >/dev/null &
    newpid=$!
    pids+=("$newpid")
    local deadline=$(($(now_us) + 20000000))
    until listening "$inpath"; do
        kill -0 "$newpid" 2>/dev/null || die "$label: the incoming molt exited: $(cat "$newlog")"
        (($(now_us) < deadline)) || die "$label: nothing listens on $inpath"
        sleep 0.002
    done
}

pause_of() { sed 's/.*pause_us=\([0-9]*\).*/\1/' <<<"$1"; }

# One update of mode $1 (exec|transfer); sets upd_pause and upd_restore. Not
# run in a subshell: a transfer changes pid and log.
update() {
    local reply line n
    wait_counts $(($(counts) + 2))
    if [[ $1 == exec ]]; then
        n=$(grep -c 'resumed after exec' "$log" || true)
        reply=$("$molt" ctl "$sock" cpr-exec) || die "$label: cpr-exec: $reply"
        [[ $reply == "ok resumed mode=exec "* ]] || die "$label: cpr-exec replied $reply"
        line=$(grep 'resumed after exec' "$log" | sed -n "$((n + 1))p")
    else
        spawn_incoming
        reply=$("$molt" ctl "$sock" cpr-transfer "$inpath") || die "$label: cpr-transfer: $reply"
        [[ $reply == "ok resumed mode=transfer "* ]] || die "$label: cpr-transfer replied $reply"
        wait "$pid" || die "$label: the old molt exited with $?: $(cat "$log")"
        pid=$newpid log=$newlog pids=("$newpid")
        line=$(grep 'resumed after transfer' "$log" || true)
    fi
    [[ -n $line ]] || die "$label: no restore line in the log: $(cat "$log")"
    upd_pause=$(pause_of "$reply")
    upd_restore=$(sed 's/.*restore_us=\([0-9]*\).*/\1/' <<<"$line")
}

declare -A medians
rows=()

# series MODE SIZE [TOUCH]
series() {
    local mode=$1 size=$2 touch=${3:-} i pause= restore= rest= backing=memfd min med max
    if [[ -n $touch ]]; then
        backing="/dev/shm file, $touch touched"
    fi
    boot "$mode-$size${touch:+-touched}" "$size" "$touch"
    for ((i = 0; i < runs; i++)); do
        update "$mode"
        pause+="$upd_pause " restore+="$upd_restore " rest+="$((upd_pause - upd_restore)) "
    done
    shutdown
    read -r min med max < <(tr ' ' '\n' <<<"$pause" | grep . | stats)
    if [[ -z $touch ]]; then
        medians[$mode-$size]=$med
    fi
    rows+=("| $mode | $size | $backing | $min | **$med** | $max | $(median "$restore") | $(median "$rest") |")
}

for mode in $modes; do
    for size in $sizes; do
        series "$mode" "$size"
    done
    if [[ -n $touched ]]; then
        series "$mode" "$touched" "$touched"
    fi
done

echo "### Pause (us), $runs updates per row"
echo
echo "| mode | RAM | RAM backing | pause min | pause median | pause max | restore_us median | pause - restore median |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
first=${sizes%% *} last=${sizes##* }
verdict() {
    if [[ -z $1 ]]; then
        echo "n/a"
    elif (($2)); then
        echo "met ($3)"
    else
        echo "**not met** ($3)"
    fi
}
e=${medians[exec-$first]:-} t=${medians[transfer-$first]:-}
el=${medians[exec-$last]:-} tl=${medians[transfer-$last]:-}
echo "Targets: exec median <= 5000 us: $(verdict "$e" "${e:-0} <= 5000" "$e");" \
    "transfer median <= 2000 us: $(verdict "$t" "${t:-0} <= 2000" "$t");" \
    "$last within 20% of $first: exec $(verdict "$el" "${el:-0} * 100 <= ${e:-0} * 120" "$el vs $e")," \
    "transfer $(verdict "$tl" "${tl:-0} * 100 <= ${t:-0} * 120" "$tl vs $t")."
echo

# ---------------------------------------------------------------------------
# Breakdown with perf

if ((breakdown_runs == 0)); then
    exit 0
fi
if ! command -v perf >/dev/null || ! grep -q 'sched:sched_process_exec' <(perf list 2>/dev/null); then
    echo "(no breakdown: perf with tracepoints is not available)"
    exit 0
fi

# traced OUT TIDS COMMAND...: runs COMMAND (its stdout is passed on) while perf
# records the threads TIDS (comma-separated; a process's main thread has its
# PID) - not their vCPU threads, nor threads started later (-i): enabling a
# syscall tracepoint on a thread sends all its system calls down the slow path,
# and a vCPU thread makes one per guest I/O exit. perf enables its events before
# it starts COMMAND. Leaves the decoded trace in OUT.txt.
traced() {
    local out=$1 tids=$2
    shift 2
    perf record -q -k mono -o "$out" -t "$tids" -i \
        -e syscalls:sys_enter_ioctl --filter 'cmd != 0xae80' \
        -e syscalls:sys_enter_memfd_create \
        -e sched:sched_process_exec \
        -e raw_syscalls:sys_enter --filter 'id == 12 || id == 9' \
        -e syscalls:sys_enter_write --filter 'fd == 2 || count > 1024' \
        -e syscalls:sys_enter_sendto --filter 'len > 1024' \
        -- "$@" 2>"$out.err" || die "traced $*: $(cat "$out.err")"
    perf script -i "$out" -F tid,time,event,trace 2>/dev/null >"$out.txt" ||
        perf script -i "$out" 2>/dev/null >"$out.txt"
}

# Segments of one traced exec of $pid: "save execve release startup restore".
exec_segments() {
    awk -v pid="$pid" '
        { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = substr($i, 1, length($i) - 1) * 1e6; break }
          tid = ($1 ~ /^[0-9]+$/) ? $1 : $2 }
        tid != pid && !/sched_process_exec/ { next }
        /cmd: 0xc208ae62/ && !s0 { s0 = t }
        /memfd_create/ && s0 && !m { m = t }
        /sched_process_exec/ && $0 ~ ("pid=" pid " ") && m && !x { x = t; next }
        x && !b && /raw_syscalls/ { b = t }
        x && /cmd: 0x0000ae01/ && !v { v = t }
        v && /sys_enter_write/ && /fd: 0x00000002/ && !l { l = t }
        END { if (l) printf "%d %d %d %d %d\n", m - s0, x - m, b - x, v - b, l - v }
    ' "$1"
}

# Segments of one traced transfer from $pid to $newpid: "save handoff restore".
transfer_segments() {
    awk -v old="$pid" -v new="$newpid" '
        { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = substr($i, 1, length($i) - 1) * 1e6; break }
          tid = ($1 ~ /^[0-9]+$/) ? $1 : $2 }
        tid == old && /cmd: 0xc208ae62/ && !s0 { s0 = t }
        tid == old && s0 && (/sys_enter_sendto/ || /sys_enter_write/ && !/fd: 0x00000002/) && !w { w = t }
        tid == new && w && /cmd: 0x8208ae63/ && !r { r = t }
        tid == new && r && /sys_enter_write/ && /fd: 0x00000002/ && !l { l = t }
        END { if (l) printf "%d %d %d\n", w - s0, r - w, l - r }
    ' "$1"
}

# The slowest gaps between consecutive KVM ioctls of the new image in one trace.
slowest_ioctls() {
    awk -v pid="$pid" '
        { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = substr($i, 1, length($i) - 1) * 1e6; break }
          tid = ($1 ~ /^[0-9]+$/) ? $1 : $2 }
        /sched_process_exec/ && $0 ~ ("pid=" pid " ") { x = 1; next }
        !x || tid != pid || !/sys_enter_ioctl/ { next }
        { match($0, /cmd: 0x[0-9a-f]+/); c = substr($0, RSTART + 5, RLENGTH - 5)
          if (prev != "") printf "%d %s\n", t - pt, prev; prev = c; pt = t }
    ' "$1" | sort -rn | head -4 | awk '
        BEGIN {
            name["0x0000ae01"] = "KVM_CREATE_VM"; name["0x0000ae60"] = "KVM_CREATE_IRQCHIP"
            name["0x4040ae77"] = "KVM_CREATE_PIT2"; name["0x4020ae46"] = "KVM_SET_USER_MEMORY_REGION"
            name["0x4020ae76"] = "KVM_IRQFD"; name["0x4008ae6a"] = "KVM_SET_GSI_ROUTING"
            name["0x0000ae41"] = "KVM_CREATE_VCPU"; name["0x00005421"] = "FIONBIO (then RAM is mapped)"
        }
        { printf "%s%s %d us", sep, ($2 in name) ? name[$2] : $2, $1; sep = ", " }'
}

# Where the main thread of $pid sleeps during one exec's pause (from the state
# memfd to the `resumed` log line): perf's sched_switch events with kernel call
# chains; each switch-out is charged the time until the thread's next event, by
# its first three kernel frames past the scheduler's own. Prints the top 4.
blocking() {
    local out=$dir/blocking.data
    perf record -q -k mono -o "$out" -t "$pid" -i -g \
        -e sched:sched_switch \
        -e syscalls:sys_enter_memfd_create \
        -e syscalls:sys_enter_write --filter 'fd == 2' \
        -- "$molt" ctl "$sock" cpr-exec >/dev/null 2>"$out.err" || die "blocking trace: $(cat "$out.err")"
    perf script -i "$out" -F tid,time,event,ip,sym 2>/dev/null | awk '
        BEGIN { RS = ""; FS = "\n" }
        {
            split($1, h, " "); t = h[2]; sub(":", "", t); t *= 1e6
            if (key != "") sum[key] += t - pt
            key = ""; pt = t
            if ($1 ~ /memfd_create/) { on = 1; next }
            if ($1 ~ /sys_enter_write/ && on) { on = 0; done = 1 }
            if (!on || done || $1 !~ /sched_switch/) next
            n = 0
            for (i = 2; i <= NF && n < 3; i++) {
                split($i, b, " "); f = b[2]
                if (f ~ /^(__schedule|schedule|schedule_timeout|schedule_hrtimeout_range_clock|__wait_for_common|wait_for_completion.*|\[unknown\])$/) continue
                sub(/\.(part|isra|constprop)\.[0-9]+$/, "", f)
                key = key (n ? " < " : "") f; n++
            }
        }
        END { for (k in sum) printf "%d %s\n", sum[k], k }
    ' | sort -rn | head -4 | awk '{ us = $1; $1 = ""; printf "  - %d us in%s\n", us, $0 }'
}

declare -A slowest blocked
erows=() trows=()
ends=$first
if [[ $last != "$first" ]]; then
    ends+=" $last"
fi
for size in $ends; do
    boot "perf-exec-$size" "$size"
    samples=() slow=
    for ((i = 0; i < breakdown_runs; i++)); do
        wait_counts $(($(counts) + 2))
        reply=$(traced "$dir/perf-$i.data" "$pid" "$molt" ctl "$sock" cpr-exec)
        seg=$(exec_segments "$dir/perf-$i.data.txt")
        [[ -n $seg ]] || die "no exec markers in the trace $dir/perf-$i.data.txt"
        samples+=("$(pause_of "$reply") $seg")
        if [[ -z $slow ]]; then
            slow=$(slowest_ioctls "$dir/perf-$i.data.txt") || true
        fi
    done
    wait_counts $(($(counts) + 2))
    blocked[$size]=$(blocking) || true
    shutdown
    m=()
    for col in 1 2 3 4 5 6; do
        m[col]=$(median "$(printf '%s\n' "${samples[@]}" | awk -v c="$col" '{ print $c }' | tr '\n' ' ')")
    done
    erows+=("| $size | ${m[1]} | ${m[2]} | ${m[3]} | ${m[4]} | ${m[5]} | ${m[6]} |")
    slowest[$size]=$slow

    boot "perf-transfer-$size" "$size"
    samples=()
    for ((i = 0; i < breakdown_runs; i++)); do
        wait_counts $(($(counts) + 2))
        spawn_incoming
        reply=$(traced "$dir/perf-$i.data" "$pid,$newpid" "$molt" ctl "$sock" cpr-transfer "$inpath")
        wait "$pid" || true
        seg=$(transfer_segments "$dir/perf-$i.data.txt")
        [[ -n $seg ]] || die "no transfer markers in the trace $dir/perf-$i.data.txt"
        samples+=("$(pause_of "$reply") $seg")
        pid=$newpid log=$newlog pids=("$newpid")
    done
    shutdown
    m=()
    for col in 1 2 3 4; do
        m[col]=$(median "$(printf '%s\n' "${samples[@]}" | awk -v c="$col" '{ print $c }' | tr '\n' ' ')")
    done
    trows+=("| $size | ${m[1]} | ${m[2]} | ${m[3]} | ${m[4]} |")
done

echo "### Where the pause goes (us, medians of $breakdown_runs traced updates)"
echo
echo "| exec, RAM | pause_us | save | execve | release (old VM destroyed) | startup | restore (new VM built) |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${erows[@]}"
echo
echo "| transfer, RAM | pause_us | save | handoff | restore |"
echo "|---|---|---|---|---|"
printf '%s\n' "${trows[@]}"
echo
for size in $ends; do
    echo "Slowest gaps between the new image's KVM ioctls (exec, $size; the ioctl named took most of it):" \
        "${slowest[$size]}"
    echo
    echo "Where molt's main thread sleeps during one exec's pause, $size (kernel stacks, innermost first):"
    echo
    echo "${blocked[$size]}"
    echo
done
echo
echo "$(uname -r); $(nproc) CPUs; counting guest, 1 vCPU; $(${molt} version)."
