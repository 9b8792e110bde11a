# demo: the live-update tour `scripts/demo.sh` shows: molt live-updates a
# running Debian guest three ways. It runs in L2 (the nested lab, where the
# host's KVM cannot run Linux) and directly on a host whose KVM can: there
# scripts/demo.sh lays out L2's /lab under target/demo/lab (LAB_DIR), gives the
# tour a directory of its own for /run (RUN_DIR) and the RAM file (DEMO_RAM),
# and puts LAB_DIR/bin first on PATH. The guest has 2 vCPUs, a disk
# and a NIC, and runs lib/cpr.sh's workload: a counter on its console, numbered
# records on its disk and a TCP connection exchanging numbered messages with
# this host (L2, or the host itself). Then, each with molt's reply, its pause
# and molt's PID:
#   1. cpr-exec into a second build (LAB_DIR/bin/molt-next): same PID;
#   2. cpr-transfer to a molt started beside it: a new PID, the old one exits;
#   3. cpr-save, the old molt exits, `molt run ... --incoming file:` resumes
#      it (guest RAM stays in the --mem-file DEMO_RAM, on /dev/shm).
# At the end: the counter ran on as one sequence, the records and the TCP
# stream have no gap or repeat, and the guest powers off. Lines for the user
# start with DEMO; the checks are LAB-RESULTs like every scenario's.
# lab-needs: molt-next
. "${LAB_DIR:-/lab}/lib/common.sh"
. "$LAB_DIR/lib/devices.sh"
. "$LAB_DIR/lib/cpr.sh"

say() { echo "DEMO: $*"; }
IMG=$RUN_DIR/disk.img
STATE=$RUN_DIR/state
RAM=${DEMO_RAM:-/dev/shm/ram}
MOLT=$LAB_DIR/bin/molt
NEXT=$LAB_DIR/bin/molt-next
t_start=$(now_ms)

# progress: the counter's last value and the TCP messages the host has had.
progress() { echo "counter at $(tr -d '\r' < "$VMM_LOG" | sed -n 's/^GUEST-COUNT //p' | tail -n 1), $(server_field msgs) TCP messages"; }

# update_step N WHAT REPLY PID_BEFORE: the reply, its pause and the PIDs, and
# a check that the guest runs on (3 more counts, 2 more TCP messages).
update_step() {
    say "$1. $2"
    say "   reply: $3"
    say "   pause: $(field pause_us "$3") us; molt's PID: $4 -> $VMM_PID; $(progress)"
    _c=$(counts) _m=$(server_field msgs) _i=0
    while [ "$(counts)" -lt $((_c + 3)) ] || [ "$(server_field msgs)" -lt $((_m + 2)) ]; do
        _i=$((_i + 1))
        [ $_i -le 300 ] || { fail "step$1_progress" "the guest did not run on: $(progress)"; return 1; }
        sleep 0.1
    done
    say "   the guest runs on: $(progress)"
}

rm -f "$RAM"
if cpr_tap_up; then check tap yes yes; else check tap no yes; fi
truncate -s 64M "$IMG"
tcp_server_start
run_args --mem-file "$RAM" --disk "$IMG" --net "tap=$TAP,mac=$GUEST_MAC" > "$RUN_DIR/argv"
set --
while IFS= read -r a; do set -- "$@" "$a"; done < "$RUN_DIR/argv"
say "molt run $*"
cpr_vmm_start "$RUN_DIR/guest1.log" "$MOLT" run "$@"
if ! guest_ready "$VMM_LOG"; then
    kill -9 "$VMM_PID" 2>/dev/null
    dump_cpr guest
    lab_end
    exit 0
fi
check guest_cpus "$GUEST_CPUS" 2
say "guest up: $GUEST_CPUS vCPUs, $(guest_cmd 'uname -r | sed "s/^/KVER /"' 30 >/dev/null; gval KVER)"
say "starting the workload: a counter on the console, records on /dev/vda, TCP to $HOST_IP:$CPR_PORT"
guest_workload_setup
say "status: $(molt ctl "$SOCK" status)"
msgs_before=$(server_field msgs)

if [ "$LAB_FAILED" = 0 ]; then
    pid=$VMM_PID
    reply=$(molt ctl "$SOCK" cpr-exec "$NEXT" 2>&1)
    check exec_reply "${reply%% pause_us=*}" "ok resumed mode=exec"
    update_step 1 "cpr-exec $NEXT (version $(version "$NEXT"))" "$reply" "$pid"
    check exec_same_pid "$(field pid "$(molt ctl "$SOCK" status)")" "$pid"
fi
if [ "$LAB_FAILED" = 0 ] && start_incoming "$MOLT" "$RUN_DIR/molt-new.err"; then
    pid=$VMM_PID
    reply=$(molt ctl "$SOCK" cpr-transfer "$XFER" 2>&1)
    check transfer_reply "${reply%% pause_us=*}" "ok resumed mode=transfer"
    wait_exit "$pid" 30
    check transfer_old_exit "$EXIT_RC" 0
    VMM_PID=$NEW_PID
    update_step 2 "cpr-transfer to a molt (version $(version "$MOLT")) waiting on --incoming unix:$XFER" "$reply" "$pid"
    check transfer_new_pid "$(field pid "$(molt ctl "$SOCK" status)")" "$NEW_PID"
elif [ "$LAB_FAILED" = 0 ]; then
    fail transfer_incoming "the new molt did not listen on $XFER"
fi
if [ "$LAB_FAILED" = 0 ] && cpr_save "$STATE"; then
    pid=$VMM_PID
    say "3. cpr-save $STATE: the old molt exited 0; guest RAM stays in $RAM"
    say "   reply: $SAVE_REPLY"
    cpr_vmm_start "$RUN_DIR/guest2.log" "$MOLT" run "$@" --incoming "file:$STATE"
    say "   molt run ... --incoming file:$STATE"
    if cpr_resumed; then
        say "   resumed: $(grep -m1 'resumed from' "$VMM_LOG.err" | sed 's/.*resumed/resumed/')"
        say "   pause: $(field pause_us "$(grep -m1 'resumed from' "$VMM_LOG.err")") us; molt's PID: $pid -> $VMM_PID; $(progress)"
        count_gap
        say "   the guest saw its counter stop for $(update_gap_ms "$(first_count "$VMM_LOG")") ms (one count every $COUNT_MS ms, under emulation)"
    fi
fi

if [ "$LAB_FAILED" = 0 ]; then
    workload_checks same "$msgs_before"
    count_checks "$RUN_DIR/guest1.log" "$RUN_DIR/guest2.log"
    say "after three updates: counter $(first_count "$RUN_DIR/guest1.log") to $(tr -d '\r' < "$VMM_LOG" | sed -n 's/^GUEST-COUNT //p' | tail -n 1) with no gap or repeat;" \
        "$GUEST_RECORDS records on disk, TCP message $(server_field last) on one connection, none lost"
    say "guest\$ poweroff"
    cpr_finish "$IMG"
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_cpr guest
kill "$SERVER_PID" 2>/dev/null
result lab_ms $(( $(now_ms) - t_start ))
say "$([ "$LAB_FAILED" = 0 ] && echo "all checks passed" || echo "FAILED: see the LAB-CHECK-FAIL lines") in $(( ($(now_ms) - t_start) / 1000 )) s"
lab_end
