# Helpers for the live-update (CPR) scenarios: cpr-restart, cpr-ramcopy,
# cpr-kexec, cpr-20, demo, bench-reboot, vfio-cpr, fault-storm. Sourced after
# common.sh and devices.sh.
#
# The guest runs rootfs/guest/workload: a counter on the console (GUEST-COUNT
# n every COUNT_MS), numbered records appended to a file on its virtio disk,
# and a TCP client exchanging numbered messages with `labtcp server` on L2.
# L2 stamps every GUEST-COUNT line as it leaves molt (labcpr stamp), so the
# guest-visible pause is the largest gap between two stamped lines.

# Where the helpers keep their files: /run in L2 (scripts/demo.sh gives the
# demo tour a directory of its own on a host).
RUN_DIR=${RUN_DIR:-/run}
SOCK=$RUN_DIR/molt.sock
CPR_PORT=7000
COUNT_MS=${COUNT_MS:-100}
SERVER_STATUS=$RUN_DIR/tcp-server.status
# The stamp file (TSC, CLOCK_MONOTONIC, n per GUEST-COUNT line); a scenario
# that crosses a kexec puts it on persistent memory.
STAMPS=$RUN_DIR/counts.ts

# cpr_vmm_start LOG CMD...: vmm_start, with the console going through
# `labcpr stamp` into LOG (and the GUEST-COUNT stamps into $STAMPS).
# VMM_PID is CMD's process; the stamper exits when CMD closes its output.
cpr_vmm_start() {
    VMM_LOG=$1; shift
    rm -f "$VMM_LOG" "$VMM_LOG.err" "$VMM_LOG.in" "$VMM_LOG.out"
    mkfifo "$VMM_LOG.in" "$VMM_LOG.out"
    : > "$VMM_LOG"
    labcpr stamp "$VMM_LOG" "$STAMPS" < "$VMM_LOG.out" &
    STAMP_PID=$!
    "$@" < "$VMM_LOG.in" > "$VMM_LOG.out" 2> "$VMM_LOG.err" &
    VMM_PID=$!
    exec 3> "$VMM_LOG.in"
}

# run_args EXTRA...: print the `molt run` arguments the CPR scenarios share,
# one per line (the form molt-upgrade's ARGV file takes; read it back with
# `while IFS= read -r a; do set -- "$@" "$a"; done`).
run_args() {
    printf '%s\n' --kernel "$LAB_DIR/vmlinuz" --initrd "$LAB_DIR/guest.cpio.gz" \
        --cmdline "$DEVICE_CMDLINE" --serial stdio --cpus 2 --mem 256M "$@" \
        --control "$SOCK"
}

# Where a new process waits to be handed the guest (cpr-transfer).
XFER=$RUN_DIR/molt-incoming.sock

# version BIN: the VERSION of `molt version` ("molt VERSION state-formats=N").
version() { "$1" version 2>&1 | awk '{ print $2 }'; }

# start_incoming BIN ERRLOG: start BIN with the scenario's run arguments
# ($RUN_DIR/argv, from run_args) plus --incoming unix:$XFER; it waits there to be
# handed the guest.
# Sets NEW_PID; returns 1 if its socket did not appear within 60 s.
start_incoming() {
    _bin=$1 _err=$2
    set --
    while IFS= read -r a; do set -- "$@" "$a"; done < "$RUN_DIR/argv"
    rm -f $XFER
    # The console comes with the handover: this process's own stdio is unused.
    "$_bin" run "$@" --incoming "unix:$XFER" < /dev/null > "$_err.out" 2> "$_err" &
    NEW_PID=$!
    _i=0
    while [ ! -S $XFER ]; do
        _i=$((_i + 1))
        if [ $_i -gt 1200 ] || ! alive "$NEW_PID"; then return 1; fi
        sleep 0.05
    done
}

# tcp_server_start: the L2 end of the guest's TCP connection.
tcp_server_start() {
    rm -f "$SERVER_STATUS"
    labtcp server "$CPR_PORT" "$SERVER_STATUS" > "$RUN_DIR/tcp-server.log" 2>&1 &
    SERVER_PID=$!
}

# cpr_tap_up: tap_up with a fixed MAC on L2's side. A host's network setup
# survives its kernel update, and so must this address: the guest's ARP entry
# for L2 names it (a fresh random MAC would black-hole the guest's frames until
# its neighbour entry times out).
TAP_HOST_MAC=02:6d:6f:6c:74:01
cpr_tap_up() { tap_up && ip link set "$TAP" address "$TAP_HOST_MAC"; }

# server_field KEY: a field of the TCP server's status line (empty if none).
server_field() { [ -f "$SERVER_STATUS" ] && field "$1" "$(cat "$SERVER_STATUS")"; }

counts() { count "$VMM_LOG" '^GUEST-COUNT [0-9]'; }

# guest_workload_setup: network, an ext filesystem on /dev/vda at /mnt, the
# workload; waits until it has run for about 3 s (counter, records, TCP).
guest_workload_setup() {
    guest_net_up guest_ip_rc
    gcheck mkfs_rc 120 "mke2fs -F /dev/vda >/dev/null 2>&1 && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt"
    gcheck workload_start_rc 30 "workload start $COUNT_MS /mnt/records $HOST_IP $CPR_PORT"
    wait_count "$VMM_LOG" '^GUEST-COUNT [0-9]' 30 60 || fail counter "fewer than 30 GUEST-COUNT lines in 60 s"
    _i=0
    while [ -z "$(server_field msgs)" ] || [ "$(server_field msgs)" -lt 20 ]; do
        _i=$((_i + 1))
        [ $_i -le 300 ] || { fail tcp_before "the TCP server got fewer than 20 messages in 30 s"; break; }
        sleep 0.1
    done
}

# cpr_save STATE: cpr-save through the control socket; checks the reply and
# that the old molt exits 0. Sets SAVE_REPLY.
cpr_save() {
    _t0=$(now_ms)
    SAVE_REPLY=$(molt ctl "$SOCK" cpr-save "$1" 2>&1)
    result save_cmd_ms $(( $(now_ms) - _t0 ))
    echo "LAB-INFO cpr-save reply: $SAVE_REPLY"
    case $SAVE_REPLY in
    "ok saved "*) check save_reply ok ok ;;
    *)
        # SPEC: a refused save leaves the guest running on the old molt.
        check save_reply "$SAVE_REPLY" ok
        _c=$(counts)
        sleep 1
        result counter_runs_after_refused_save "$([ "$(counts)" -gt "$_c" ] && echo yes || echo no)"
        return 1
        ;;
    esac
    result save_us "$(field save_us "$SAVE_REPLY")"
    result state_bytes "$(field bytes "$SAVE_REPLY")"
    # molt exits right after its reply: `wait` returns at once (wait_exit
    # polls every 100 ms, which would count in the pause).
    wait "$VMM_PID"
    check old_molt_exit $? 0
}

# state_info STATE: `molt state` into the log (after the restart: it is not
# part of the pause).
state_info() { molt state "$1" 2>&1 | sed 's/^/LAB-INFO molt state: /'; }

# dump_cpr TAG: dump_vmm without the counter's lines.
dump_cpr() {
    if [ "$LAB_FAILED" != 0 ]; then _n=80; else _n=15; fi
    for _f in "$VMM_LOG" "$VMM_LOG.err"; do
        [ -f "$_f" ] || continue
        echo "---- $1: $_f (last $_n lines, GUEST-COUNT/TICK omitted)"
        grep -v -E '^GUEST-(TICK|COUNT) ' "$_f" | tail -n "$_n" | sed "s/^/$1| /"
    done
}

# cpr_resumed: wait for the new molt's "resumed from" log line and report its
# numbers; then for the guest to run on (20 more counts). Returns 1 if it did not.
cpr_resumed() {
    if ! wait_log "$VMM_LOG.err" 'resumed from' 120 "$VMM_PID"; then
        fail resumed "no 'resumed from' from the new molt (alive: $(alive "$VMM_PID" && echo yes || echo no))"
        return 1
    fi
    _l=$(grep -m1 'resumed from' "$VMM_LOG.err")
    echo "LAB-INFO $_l"
    check resumed yes yes
    result restore_us "$(field restore_us "$_l")"
    result pause_us "$(field pause_us "$_l")"
    if ! wait_count "$VMM_LOG" '^GUEST-COUNT [0-9]' 20 60; then
        fail counter_after "fewer than 20 GUEST-COUNT lines in 60 s after the resume"
        alive "$VMM_PID" && proc_diag "$VMM_PID"
        return 1
    fi
}

# count_checks LOG_BEFORE LOG_AFTER: the counter went on where it stopped.
# The two console logs joined must hold GUEST-COUNT 1, 2, 3, ... with no gap
# or repeat (a line cut by the save continues in the second log).
count_checks() {
    _last=$(tr -d '\r' < "$1" | sed -n 's/^GUEST-COUNT \([0-9][0-9]*\)$/\1/p' | tail -n 1)
    _first=$(tr -d '\r' < "$2" | sed -n 's/^GUEST-COUNT \([0-9][0-9]*\)$/\1/p' | head -n 1)
    result count_before "$_last"
    result count_after "$_first"
    check count_continues "$([ -n "$_last" ] && [ -n "$_first" ] && [ "$_first" -gt "$_last" ] && echo yes || echo no)" yes
    _seq=$(cat "$1" "$2" | tr -d '\r' | sed -n 's/^GUEST-COUNT \([0-9][0-9]*\)$/\1/p' |
        awk '$1 != p + 1 { bad++; if (bad <= 3) printf "%d after %d; ", $1, p } { p = $1 }
             END { print (bad ? bad " out of order" : "ok") }')
    check count_sequence "$_seq" ok
}

# update_gap_ms FIRST [TICKS_PER_US]: the gap in the stamped GUEST-COUNT
# stream just before line FIRST (the new process's first): the guest-visible
# pause of the update, plus up to one COUNT_MS period. On the TSC when
# TICKS_PER_US is given, else on CLOCK_MONOTONIC.
update_gap_ms() {
    awk -v n="$1" -v hz="${2:-0}" '{ t = hz > 0 ? $1 / hz : $2 }
        $3 == n && NR > 1 { printf "%d\n", (t - p) / 1000; exit } { p = t }' "$STAMPS"
}

# first_count LOG: the first complete GUEST-COUNT number in LOG.
first_count() { tr -d '\r' < "$1" | sed -n 's/^GUEST-COUNT \([0-9][0-9]*\)$/\1/p' | head -n 1; }

# count_gap [TICKS_PER_US]: count_gap_ms, the gap at the update; the largest
# gap anywhere in the stream for scale (TCG has hiccups of its own).
count_gap() {
    _g=$(labcpr gaps "$STAMPS" "$@")
    echo "LAB-INFO count stream: $_g (period $COUNT_MS ms)"
    result count_gap_ms "$(update_gap_ms "$(first_count "$VMM_LOG")" "$@")"
}

# workload_checks MODE MSGS_BEFORE: stop the workload, check records and TCP.
# MODE same: one connection throughout, no gap on either end, and the server
# got more than MSGS_BEFORE messages (its count at the save);
# reconnected: the peer died with the old kernel, a new connection to the new
# server carries on (MSGS_BEFORE is 0: a new server).
workload_checks() {
    _mode=$1 _before=$2
    # Let TCP run for a few messages after the resume (the guest may first have
    # to retransmit into, or be reset by, the new L2).
    _i=0
    while [ -z "$(server_field msgs)" ] || [ "$(server_field msgs)" -le $((_before + 5)) ]; do
        _i=$((_i + 1))
        [ $_i -le 300 ] || break
        sleep 0.1
    done
    gcheck workload_stop_rc 60 "workload stop"
    guest_cmd "workload check /mnt/records" 60 >/dev/null
    _rec=$(gval WL-REC)
    _tcp=$(gval WL-TCP)
    echo "LAB-INFO guest records: $_rec"
    echo "LAB-INFO guest TCP client: $_tcp"
    gout WL-TCPLOG | sed 's/^/LAB-INFO guest TCP log: /'
    echo "LAB-INFO L2 TCP server: $(cat "$SERVER_STATUS" 2>/dev/null)"
    sed 's/^/LAB-INFO L2 TCP server log: /' "$RUN_DIR/tcp-server.log"
    result records "$(field records "$_rec")"
    check records_clean "$(field gaps "$_rec")/$(field dups "$_rec")/$(field bad "$_rec")" 0/0/0
    GUEST_RECORDS=$(field last "$_rec")
    check tcp_client_errors "$(field errors "$_tcp")" 0
    check tcp_server_gaps "$(server_field gaps)" 0
    check tcp_server_errors "$(server_field errors)" 0
    result tcp_msgs "$(server_field last)"
    case $_mode in
    same)
        check tcp_client_conns "$(field conns "$_tcp")" 1
        check tcp_server_conns "$(server_field conns)" 1
        check tcp_same_connection "$([ "$(field local_port "$_tcp")" = "$(server_field peer_port)" ] && echo yes || echo no)" yes
        check tcp_continued "$([ "$(server_field msgs)" -gt "$_before" ] 2>/dev/null && echo yes || echo no)" yes
        ;;
    reconnected)
        # The old connection's peer died with the old kernel: one reconnect,
        # accepted by the new server, which then sees the messages continue.
        check tcp_client_conns "$(field conns "$_tcp")" 2
        check tcp_server_conns "$(server_field conns)" 1
        check tcp_after_kexec "$([ "$(server_field msgs)" -gt 0 ] 2>/dev/null && [ "$(field acked "$_tcp")" = "$(field sent "$_tcp")" ] && echo reconnected || echo broken)" reconnected
        ;;
    esac
}

# disk_records_check IMG: after the guest unmounted and powered off, L2 reads
# the records file from the disk image itself.
disk_records_check() {
    modprobe loop 2>/dev/null
    mkdir -p "$RUN_DIR/img"
    if mount -o ro -t ext4 "$1" "$RUN_DIR/img" 2>/dev/null; then
        _r=$(labcpr check "$RUN_DIR/img/records" 2>&1)
        umount -d "$RUN_DIR/img"
        echo "LAB-INFO records on the disk image: $_r"
        check disk_records_clean "$(field gaps "$_r")/$(field dups "$_r")/$(field bad "$_r")" 0/0/0
        check disk_records_match "$([ "$(field last "$_r")" = "${GUEST_RECORDS:-x}" ] && echo yes || echo no)" yes
    else
        fail disk_records "L2 cannot mount the image"
    fi
}

# cpr_finish IMG: dmesg, unmount, power off, the image from L2's side.
cpr_finish() {
    guest_dmesg_clean dmesg_errors
    gcheck umount_rc 60 "umount /mnt"
    guest_poweroff molt_exit
    disk_records_check "$1"
}

# cpr_local NAME MOLT_ARGS...: the restart without reboot (cpr-restart,
# cpr-ramcopy): boot with 2 vCPUs, a disk and a NIC, run the workload,
# cpr-save, start molt again with --incoming, check everything, power off.
cpr_local() {
    _name=$1; shift
    IMG=/tmp/disk.img
    STATE=/run/state
    t_start=$(now_ms)
    if cpr_tap_up; then check tap yes yes; else check tap no yes; fi
    truncate -s 64M "$IMG"
    tcp_server_start
    run_args "$@" --disk "$IMG" --net "tap=$TAP,mac=$GUEST_MAC" > /run/argv
    set --
    while IFS= read -r a; do set -- "$@" "$a"; done < /run/argv
    echo "LAB-INFO $_name: molt run $*"

    cpr_vmm_start /run/guest1.log molt run "$@"
    if ! guest_ready "$VMM_LOG"; then
        kill -9 "$VMM_PID" 2>/dev/null
        dump_cpr guest1
        return
    fi
    check guest_cpus "$GUEST_CPUS" 2
    guest_workload_setup
    _msgs=$(server_field msgs)
    if ! cpr_save "$STATE"; then
        dump_cpr old-molt
        kill -9 "$VMM_PID" 2>/dev/null
        return
    fi
    dump_cpr old-molt

    cpr_vmm_start /run/guest2.log molt run "$@" --incoming "file:$STATE"
    if cpr_resumed; then
        state_info "$STATE"
        count_gap
        workload_checks same "$_msgs"
        count_checks /run/guest1.log /run/guest2.log
        cpr_finish "$IMG"
    else
        kill -9 "$VMM_PID" 2>/dev/null
    fi
    dump_cpr new-molt
    kill "$SERVER_PID" 2>/dev/null
    result lab_ms $(( $(now_ms) - t_start ))
}

# stats FILE: "min median max" of the numbers in FILE.
stats() {
    sort -n "$1" | awk '{ v[NR] = $1 } END { if (NR) print v[1], v[int((NR + 1) / 2)], v[NR] }'
}

# killer STEP: /run/molt-kill-STEP, a molt image that dies (SIGKILL) at STEP
# when it takes a guest over: molt-next (which has the hook) with
# MOLT_TEST_KILL_AT=STEP (src/cpr/fault.rs lists the steps), or for STEP
# execve a script that kills itself at once, before any molt code runs.
# Either answers `version` as molt-next does (the exec probe).
killer() {
    if [ "$1" = execve ]; then
        printf '#!/bin/sh\n[ "$1" = version ] && exec /lab/bin/molt-next version\nkill -9 $$\n' > /run/molt-kill-$1
    else
        printf '#!/bin/sh\nMOLT_TEST_KILL_AT=%s exec /lab/bin/molt-next "$@"\n' "$1" > /run/molt-kill-$1
    fi
    chmod +x /run/molt-kill-$1
}

# cpr_boot_workload NAME: boot the guest of the multi-update scenarios (2
# vCPUs, 256 MiB in molt's memfd, a 64 MiB disk $IMG, a NIC) with
# /lab/bin/molt, its console stamped into /run/guest.log, and start the
# workload. The tap is created by molt itself, not persistent: it lives only
# as long as some molt holds its descriptor, so a handover that dropped it
# would take the guest's network (and L2's address on it) down. Sets
# MSGS_BEFORE (the TCP server's count once the workload runs). Returns 1, the
# VMM killed and its logs dumped, if any of it failed.
cpr_boot_workload() {
    modprobe tun
    ip link del $TAP 2>/dev/null
    truncate -s 64M "$IMG"
    tcp_server_start
    run_args --disk "$IMG" --net "tap=$TAP,mac=$GUEST_MAC" > /run/argv
    _name=$1
    set --
    while IFS= read -r a; do set -- "$@" "$a"; done < /run/argv
    echo "LAB-INFO $_name: molt run $*"
    cpr_vmm_start /run/guest.log /lab/bin/molt run "$@"
    # molt made the tap; L2's side of it is configured once, here.
    _i=0
    while [ ! -d /sys/class/net/$TAP ] && [ $_i -lt 300 ]; do _i=$((_i + 1)); sleep 0.1; done
    ip link set $TAP up && ip addr add "$HOST_IP/24" dev $TAP
    check tap "$([ -d /sys/class/net/$TAP ] && echo yes || echo no)" yes
    if guest_ready "$VMM_LOG"; then
        check guest_cpus "$GUEST_CPUS" 2
        guest_workload_setup
        MSGS_BEFORE=$(server_field msgs)
        [ "$LAB_FAILED" = 0 ] && return 0
    fi
    kill -9 "$VMM_PID" 2>/dev/null
    dump_vmm guest
    return 1
}

# cpr_workload_end: after the updates, with the guest on $VMM_PID: the
# workload stopped and checked (one TCP connection since MSGS_BEFORE, the
# records whole), the whole console's counter 1, 2, 3, ... without a reset,
# gap or repeat, then power-off and the records on the image from L2.
cpr_workload_end() {
    workload_checks same "$MSGS_BEFORE"
    _seq=$(tr -d '\r' < "$VMM_LOG" | sed -n 's/^GUEST-COUNT \([0-9][0-9]*\)$/\1/p' |
        awk 'NR == 1 && $1 != 1 { bad++ } NR > 1 && $1 != p + 1 { bad++; if (bad <= 3) printf "%d after %d; ", $1, p }
             { p = $1 } END { print (bad ? bad " out of order" : "ok") }')
    result counts_total "$(counts)"
    check count_sequence "$_seq" ok
    cpr_finish "$IMG"
}

# step_gap_results KIND...: the guest-visible pause of each update listed in
# /run/steps ("STEP KIND T0_US T1_US" per update: its command's start and end
# on labtime): the largest gap in the stamped GUEST-COUNT stream that overlaps
# the command, in ms (COUNT_MS resolution). Logs each; reports
# KIND_count_gap_ms min/median/max for each KIND given, and the largest gap
# anywhere in the stream for scale.
step_gap_results() {
    [ -s /run/steps ] || return 0
    awk 'NR == FNR { t0[$1] = $3; t1[$1] = $4; m[$1] = $2; n = $1; next }
         { if (p) for (s = 1; s <= n; s++) if ($2 > t0[s] && p < t1[s] && $2 - p > g[s]) g[s] = $2 - p; p = $2 }
         END { for (s = 1; s <= n; s++) print s, m[s], int(g[s] / 1000) }' /run/steps "$STAMPS" > /run/step-gaps
    sed 's/^/LAB-INFO guest-visible gap (step kind ms): /' /run/step-gaps
    for _m in "$@"; do
        awk -v m="$_m" '$2 == m { print $3 }' /run/step-gaps > /run/gaps.$_m
        set -- $(stats /run/gaps.$_m)
        result "${_m}_count_gap_ms" "min=${1:-none} median=${2:-none} max=${3:-none}"
    done
    result count_max_gap_ms $(( $(field max_gap_us "$(labcpr gaps "$STAMPS")") / 1000 ))
}

# moved_on C0 M0 NAME: the guest runs on: within 30 s the console has 3 more
# counts than C0 and the TCP server 2 more messages than M0. Else a
# LAB-CHECK-FAIL NAME line, where molt's threads are, and 1.
moved_on() {
    _i=0
    while [ "$(counts)" -lt $(($1 + 3)) ] || [ "$(server_field msgs)" -lt $(($2 + 2)) ]; do
        _i=$((_i + 1))
        if [ $_i -gt 300 ]; then
            echo "LAB-CHECK-FAIL $3: counts $1 -> $(counts), TCP msgs $2 -> $(server_field msgs) in 30 s"
            alive "$VMM_PID" && proc_diag "$VMM_PID"
            return 1
        fi
        sleep 0.1
    done
}
