# bench-blackout: the guest-visible blackout of a local update, measured as in
# shared/LAB.md ("What other VMMs score in this lab"): the guest (1 vCPU, RAM
# in a /dev/shm file) sends a numbered UDP datagram every 1 ms to L2 over
# virtio-net (`labudp send`); L2 (`labudp recv`) times the arrivals, and the
# largest gap between two of them across an update is the blackout. RUNS
# updates per flow and size:
#   exec      molt cpr-exec
#   transfer  molt cpr-transfer to a molt started beforehand with --incoming unix:
#   reboot    molt cpr-save, the old molt exits, a new one starts with
#             --incoming file: (RAM stays in the /dev/shm file; no kexec)
#   qemu      QEMU 7.2 with RAM on memory-backend-file,share=on and
#             x-ignore-shared: migrate to a file, quit, start again with
#             -incoming defer + migrate_incoming (HMP over a pipe chardev)
#   qmig      QEMU 7.2 pre-started migration: the destination QEMU is started
#             beforehand with -incoming defer on the same RAM file,
#             x-ignore-shared on both sides, migrate_incoming unix:; the
#             update is `migrate unix:` on the source, then the source quits
# molt's three flows run on one guest, each QEMU flow on a guest of its own.
# molt's transfer and QEMU's pre-started migration, the two hand-overs to a
# process started beforehand, alternate (transfer, qmig, transfer, qmig, ...)
# so that both see the same load on the machine: their two guests run side by
# side, each with its own tap, subnet and receiver, and the one not being
# measured is paused meanwhile (molt's `pause`, QEMU's `stop`). molt's exec
# runs come before that and its reboot-mode runs after it, on the same guest
# (the QEMU guest paused), then the QEMU restart on a guest of its own.
# molt and the QEMU restart use a persistent tap (molt's reboot mode and QEMU
# reopen it by name). A single-queue tap takes one opener at a time, and the
# pre-started destination opens its tap while the source still holds it, so
# qmig's QEMUs use a multi-queue tap instead: the first QEMU creates it with
# queues=2 (busybox has no tool that creates one), each later one attaches two
# more queues of it by name (the virtio-net device is single-queue: its frames
# use the first of the two); L2 is 10.0.3.1 on it, the guest 10.0.3.2. A
# second tap bridged to the first would do too, but needs the bridge module in
# the L2 image. Needs the image with QEMU
# (MOLT_LAB_WITH_QEMU=1; scripts/bench-blackout.sh). Parameters (molt.env.*):
# RUNS (5), SIZES (comma-separated, default 256M; scripts/bench-blackout.sh
# passes one size per L2 boot, see there), FLOWS (comma-separated, default all
# five: fewer to debug one), LABUDP_TRACE (1: each update's datagrams around
# its largest gap, with the guest's send times, as LAB-INFO lines).
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/qemu.sh

RUNS=${RUNS:-5}
SIZES=$(echo "${SIZES:-256M}" | tr ',' ' ')
FLOWS=$(echo "${FLOWS:-exec,transfer,reboot,qemu,qmig}" | tr ',' ' ')
UDP_PORT=7100
UDP=/run/udp
# The pre-started migration's guest: its own receiver, subnet and MAC.
QUDP_PORT=7101
QUDP=/run/udp.qmig
QHOST_IP=10.0.3.1
QGUEST_IP=10.0.3.2
QGUEST_MAC=52:54:00:12:34:57
SOCK=/run/molt.sock
XFER=/run/molt-incoming.sock
STATE=/dev/shm/molt.state
QSTATE=/dev/shm/qemu.state
QMON=/run/qmon
QMIG=/run/qemu-migrate.sock
QTAP=qtap0
# After an update, this many datagrams must have arrived before the window
# closes (the guest sends about one per ms when it runs).
AFTER=500

command -v molt >/dev/null || fail molt "binary missing"
command -v qemu-system-x86_64 >/dev/null || fail qemu "missing (build with MOLT_LAB_WITH_QEMU=1)"
if [ "$LAB_FAILED" != 0 ]; then lab_end; exit 0; fi

live_seq() { _v=$(field seq "$(cat $UDP.live 2>/dev/null)"); echo "${_v:-0}"; }

# mark: close the receiver's current window and print its line.
mark() {
    _n=$(wc -l < $UDP)
    kill -USR1 "$RECV_PID"
    _i=0
    while [ "$(wc -l < $UDP)" -le "$_n" ]; do
        _i=$((_i + 1))
        [ $_i -le 200 ] || { echo "none"; return; }
        sleep 0.05
    done
    tail -n 1 $UDP
}

# flowing N: wait (up to 60 s) until N more datagrams have arrived.
flowing() {
    _s=$(live_seq)
    _i=0
    while [ "$(live_seq)" -lt $((_s + $1)) ]; do
        _i=$((_i + 1))
        [ $_i -le 600 ] || return 1
        sleep 0.1
    done
}

# console_open LOG: the guest console's FIFO and log; fd 3 writes to the FIFO.
# A process holds the FIFO open read-write (HOLDERS), so opening it never
# blocks and it outlives each VMM process and each reopening of fd 3 (two
# guests run at once: fd 3 follows the current one, use_guest): a VMM started
# later reads the same FIFO and appends to the same log.
console_open() {
    VMM_LOG=$1
    rm -f "$VMM_LOG" "$VMM_LOG.in" "$VMM_LOG.err"
    mkfifo "$VMM_LOG.in"
    : > "$VMM_LOG"
    sleep 100000 <> "$VMM_LOG.in" &
    HOLDERS="$HOLDERS $!"
    exec 3> "$VMM_LOG.in"
}

# The guests that run side by side (molt's, "m", and qmig's, "q"): their VMM,
# console log and receiver. save_guest G keeps the current ones as G's;
# use_guest G makes G's current (fd 3 to its console).
save_guest() { eval "${1}_PID=\$VMM_PID ${1}_LOG=\$VMM_LOG ${1}_UDP=\$UDP ${1}_RECV=\$RECV_PID"; }
use_guest() {
    eval "VMM_PID=\$${1}_PID VMM_LOG=\$${1}_LOG UDP=\$${1}_UDP RECV_PID=\$${1}_RECV"
    exec 3> "$VMM_LOG.in"
}

# hold G / release G: pause guest G's vCPUs (the other guest's measurement
# runs meanwhile), or let them run again if held.
hold() { set_held "$1" 1 pause stop; }
release() { set_held "$1" 0 resume cont; }
# set_held G 1|0 MOLT_COMMAND QEMU_COMMAND: the state change, if it is one.
set_held() {
    eval "[ \"\${${1}_HELD:-0}\" != $2 ]" || return 0
    eval "${1}_HELD=$2"
    case $1 in
    m) _r=$(molt ctl "$SOCK" "$3" 2>&1) ;;
    q) echo "$4" >&$SRC_FD; _r=ok ;;
    esac
    [ "$_r" = ok ] || echo "LAB-INFO $3 $1: $_r"
}

# launch CMD: start CMD (a string, eval'ed) on the console. Sets VMM_PID.
launch() {
    eval "exec $1" < "$VMM_LOG.in" >> "$VMM_LOG" 2>> "$VMM_LOG.err" &
    VMM_PID=$!
}

# ---- the update flows: prepare_FLOW (outside the window), update_FLOW ----
prepare_exec() { :; }
update_exec() {
    _r=$(molt ctl "$SOCK" cpr-exec 2>&1)
    PAUSE_US=$(field pause_us "$_r")
    case $_r in "ok resumed mode=exec "*) ;; *) echo "LAB-INFO cpr-exec: $_r"; return 1 ;; esac
}

prepare_transfer() {
    rm -f $XFER
    eval "exec $MOLT_CMD --incoming unix:$XFER" < /dev/null > /dev/null 2>> "$VMM_LOG.err" &
    NEW_PID=$!
    _i=0
    while [ ! -S $XFER ]; do
        _i=$((_i + 1))
        [ $_i -le 600 ] && alive "$NEW_PID" || return 1
        sleep 0.05
    done
}
update_transfer() {
    _r=$(molt ctl "$SOCK" cpr-transfer $XFER 2>&1)
    PAUSE_US=$(field pause_us "$_r")
    case $_r in
    "ok resumed mode=transfer "*) ;;
    *) echo "LAB-INFO cpr-transfer: $_r"; kill "$NEW_PID" 2>/dev/null; return 1 ;;
    esac
    wait_exit "$VMM_PID" 30
    [ "$EXIT_RC" = 0 ] || echo "LAB-INFO old molt after cpr-transfer: exit $EXIT_RC"
    VMM_PID=$NEW_PID
    echo "LAB-INFO transfer phases: $(field phases "$_r")"
    # What the new molt put in its VM's page tables before the pause.
    grep -E 'pre-faulted|cannot pre-fault' "$VMM_LOG.err" | tail -n 1 | sed 's/^/LAB-INFO new molt: /'
}

prepare_reboot() { rm -f $STATE; }
update_reboot() {
    _r=$(molt ctl "$SOCK" cpr-save $STATE 2>&1)
    case $_r in "ok saved "*) ;; *) echo "LAB-INFO cpr-save: $_r"; return 1 ;; esac
    wait "$VMM_PID"
    launch "$MOLT_CMD --incoming file:$STATE"
    PAUSE_US=pending
}

prepare_qemu() {
    [ -f $QSTATE ] && echo "LAB-INFO QEMU state file: $(wc -c < $QSTATE) bytes"
    rm -f $QSTATE
}
update_qemu() {
    # HMP's migrate holds the monitor until the migration ends, so `quit`
    # runs right after it; `info migrate` in between is for the log.
    echo "migrate \"exec:cat > $QSTATE\"" >&4
    echo "info migrate" >&4
    echo "quit" >&4
    wait "$VMM_PID"
    # The destination must have the capability too (QEMU checks that both
    # sides agree), and 7.2 has no command-line switch for it: -incoming
    # defer, then set it and start the incoming migration from the monitor.
    launch "$QEMU_CMD -monitor pipe:$QMON.a -incoming defer"
    qemu_ignore_shared 4
    echo "migrate_incoming \"exec:cat $QSTATE\"" >&4
    PAUSE_US=
}
# qemu_ignore_shared FD: set the capability through the monitor on FD.
qemu_ignore_shared() { echo "migrate_set_capability x-ignore-shared on" >&$1; }

# The pre-started migration: the two QEMUs have a monitor each (fds 4 and 6,
# pipes $QMON.a and $QMON.b) and swap roles at every update; SRC_FD is the
# running one's monitor.
prepare_qmig() {
    if [ "$SRC_FD" = 4 ]; then DST_FD=6 DST_MON=$QMON.b; else DST_FD=4 DST_MON=$QMON.a; fi
    rm -f $QMIG
    _src=$VMM_PID
    launch "$QEMU_CMD -monitor pipe:$DST_MON -incoming defer"
    NEW_PID=$VMM_PID VMM_PID=$_src
    qemu_ignore_shared $DST_FD
    echo "migrate_incoming unix:$QMIG" >&$DST_FD
    _i=0
    while [ ! -S $QMIG ]; do
        _i=$((_i + 1))
        [ $_i -le 600 ] && alive "$NEW_PID" || { kill "$NEW_PID" 2>/dev/null; return 1; }
        sleep 0.05
    done
}
update_qmig() {
    # HMP's migrate returns once the migration has ended (the destination
    # resumes the guest by itself: no -S); then the source quits.
    echo "migrate unix:$QMIG" >&$SRC_FD
    echo "info migrate" >&$SRC_FD
    echo "quit" >&$SRC_FD
    wait_exit "$VMM_PID" 60
    [ "$EXIT_RC" = 0 ] || echo "LAB-INFO source QEMU after migrate: exit $EXIT_RC"
    VMM_PID=$NEW_PID SRC_FD=$DST_FD
    PAUSE_US=
}

# measure FLOW RUN: one update, its window's line into the results.
measure() {
    prepare_$1 || { fail "${1}_${SIZE}_prepare" "run $2"; return 1; }
    flowing 300 || { fail "${1}_${SIZE}_before" "no datagrams before run $2"; return 1; }
    mark > /dev/null
    if ! update_$1; then
        fail "${1}_${SIZE}_update" "run $2 failed"
        return 1
    fi
    if ! flowing $AFTER; then
        fail "${1}_${SIZE}_after" "fewer than $AFTER datagrams within 60 s of run $2 (VMM alive: $(alive "$VMM_PID" && echo yes || echo no))"
        return 1
    fi
    _w=$(mark)
    [ -n "${LABUDP_TRACE:-}" ] && awk -v s="$(field gap_seq "$_w")" -v f="$1" \
        '$2 >= s - 2 && $2 <= s + 3 { print "LAB-INFO " f " datagram seq=" $2 " arrived_us=" $1 " guest_sent_us=" $3 }' \
        $UDP.trace.last
    [ "$PAUSE_US" = pending ] &&
        PAUSE_US=$(grep 'resumed from' "$VMM_LOG.err" | tail -n 1 | sed -n 's/.*pause_us=\([0-9]*\).*/\1/p')
    _g=$(field max_gap_us "$_w")
    # QEMU's own figure for the last migration: the source's downtime (VM
    # stopped to migration completed; without the restart in the qemu flow).
    _q=
    case $1 in qemu | qmig) _q=" qemu_downtime_ms=$(grep -a '^downtime:' "$QMON_LOG" | tail -n 1 | tr -dc 0-9)" ;; esac
    echo "LAB-INFO $SIZE $1 run $2: $_w molt_pause_us=${PAUSE_US:--}$_q"
    result "blackout_${SIZE}_${1}_run$2" "$((_g / 1000)) lost=$(field lost "$_w") pause_us=${PAUSE_US:--}"
    echo "$_g" >> /run/bb.$SIZE.$1
    echo "$(field lost "$_w")" >> /run/bb.$SIZE.$1.lost
    [ -n "$PAUSE_US" ] && echo "$PAUSE_US" >> /run/bb.$SIZE.$1.pause
    true
}

# guest_sender NAME PORT: a receiver on PORT for the current guest's stream
# (into $UDP; each boot numbers from 1 again), network up in the guest
# ($GUEST_IP), the sender started (to $HOST_IP), the stream seen; then a
# window with no update as the baseline.
guest_sender() {
    : > $UDP
    rm -f $UDP.live
    labudp recv $2 $UDP &
    RECV_PID=$!
    guest_net_up "$1_ip_rc"
    check "$1_sender_rc" "$(guest_cmd "setsid labudp send $HOST_IP $2 1000 </dev/null >/dev/null 2>&1 &" 30)" 0
    flowing 500 || { fail "$1_stream" "no datagrams from the guest"; return 1; }
    mark > /dev/null
    _t0=$(now_ms)
    sleep 3
    _w=$(mark)
    _ms=$(( $(now_ms) - _t0 ))
    echo "LAB-INFO $1 baseline (${_ms} ms, no update): $_w"
    result "$1_baseline_gap_ms" $(( $(field max_gap_us "$_w") / 1000 ))
    result "$1_rate_per_s" $(( $(field recv "$_w") * 1000 / _ms ))
}

# wanted FLOW: FLOW is to be measured.
wanted() { case " $FLOWS " in *" $1 "*) ;; *) return 1 ;; esac; }

# runs FLOW: RUNS updates of FLOW on the current guest (0 if all worked).
runs() {
    _run=1
    while [ $_run -le "$RUNS" ]; do
        measure "$1" $_run || return 1
        _run=$((_run + 1))
    done
}

# molt_boot: molt's guest of $SIZE on $TAP, its sender going; it becomes
# guest "m".
molt_boot() {
    rm -f /dev/shm/ram
    MOLT_CMD="molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz --cmdline '$GUEST_CMDLINE'"
    MOLT_CMD="$MOLT_CMD --serial stdio --cpus 1 --mem $SIZE --mem-file /dev/shm/ram"
    MOLT_CMD="$MOLT_CMD --net tap=$TAP,mac=$GUEST_MAC --control $SOCK"
    console_open /run/molt-$SIZE.log
    launch "$MOLT_CMD"
    UDP=/run/udp
    guest_ready "$VMM_LOG" && guest_sender "molt_$SIZE" $UDP_PORT
    _ok=$?
    save_guest m
    return $_ok
}

molt_end() {
    use_guest m
    release m
    [ "$LAB_FAILED" != 0 ] && { dump molt "$VMM_LOG" 40; dump molt-stderr "$VMM_LOG.err" 40; }
    echo poweroff >&3
    wait_exit "$VMM_PID" 60
    result "molt_${SIZE}_exit" "$EXIT_RC"
    kill "$RECV_PID" 2>/dev/null
    rm -f /dev/shm/ram $STATE
}

# qemu_start FLOW: the first QEMU of FLOW (qemu or qmig) with its monitors
# (fds 4-7, logged to $QMON_LOG) and console; its guest's sender is not
# started yet. QEMU_CMD is without the first monitor.
qemu_start() {
    rm -f /dev/shm/qram $QMON.a.in $QMON.a.out $QMON.b.in $QMON.b.out
    mkfifo $QMON.a.in $QMON.a.out $QMON.b.in $QMON.b.out
    # Both ends held read-write here: neither QEMU nor the readers ever
    # block or see EOF when a QEMU process goes.
    exec 4<> $QMON.a.in 5<> $QMON.a.out 6<> $QMON.b.in 7<> $QMON.b.out
    QMON_LOG=/run/qmon-$1-$SIZE.log
    cat <&5 >> $QMON_LOG &
    CAT_A=$!
    cat <&7 >> $QMON_LOG &
    CAT_B=$!
    QEMU_RAM="-object memory-backend-file,id=ram0,size=$SIZE,mem-path=/dev/shm/qram,share=on"
    QEMU_RAM="$QEMU_RAM -machine memory-backend=ram0"
    QEMU_CMD="qemu-system-x86_64 $(qemu_args 1 "$SIZE") -append '$GUEST_CMDLINE' $QEMU_RAM"
    if [ $1 = qemu ]; then
        QEMU_CMD="$QEMU_CMD -device virtio-net-pci,netdev=n0,mac=$GUEST_MAC,romfile="
        QEMU_CMD="$QEMU_CMD -netdev tap,id=n0,ifname=$TAP,script=no,downscript=no"
    else
        # vnet_hdr=off: the header's length is the tap's, not a queue's,
        # and a QEMU starting sets it to 10 bytes while the running guest's
        # virtio-net uses 12 (mergeable buffers): the source's frames went
        # out garbled and the stream stopped until the migration.
        QEMU_CMD="$QEMU_CMD -device virtio-net-pci,netdev=n0,mac=$QGUEST_MAC,romfile="
        QEMU_CMD="$QEMU_CMD -netdev tap,id=n0,ifname=$QTAP,queues=2,vnet_hdr=off,script=no,downscript=no"
    fi
    console_open /run/$1-$SIZE.log
    launch "$QEMU_CMD -monitor pipe:$QMON.a"
    SRC_FD=4
    qemu_ignore_shared 4
}

# qemu_end FLOW: the current QEMU quits; its monitors go.
qemu_end() {
    if [ "$LAB_FAILED" != 0 ]; then
        dump $1 "$VMM_LOG" 40; dump $1-stderr "$VMM_LOG.err" 40
        dump qmon $QMON_LOG 40
    fi
    echo quit >&$SRC_FD
    wait_exit "$VMM_PID" 30
    kill "$CAT_A" "$CAT_B" 2>/dev/null
    exec 4>&- 5>&- 6>&- 7>&-
    rm -f /dev/shm/qram $QSTATE
}

# qmig_boot: the pre-started migration's guest on $QTAP (10.0.3.0/24), its
# sender going; it becomes guest "q".
qmig_boot() {
    qemu_start qmig
    # QEMU created the multi-queue tap: L2's side of it.
    _i=0
    while [ ! -d /sys/class/net/$QTAP ] && [ $_i -le 600 ]; do _i=$((_i + 1)); sleep 0.05; done
    _ok=no
    ip link set $QTAP up && ip addr add "$QHOST_IP/24" dev $QTAP && _ok=yes
    check "qmig_${SIZE}_tap" $_ok yes
    UDP=$QUDP
    _h=$HOST_IP _g=$GUEST_IP
    HOST_IP=$QHOST_IP GUEST_IP=$QGUEST_IP
    [ $_ok = yes ] && guest_ready "$VMM_LOG" && guest_sender "qmig_$SIZE" $QUDP_PORT
    _ok=$?
    HOST_IP=$_h GUEST_IP=$_g
    save_guest q
    return $_ok
}

t_start=$(now_ms)
if tap_up; then check tap yes yes; else check tap no yes; fi
HOLDERS=

for SIZE in $SIZES; do
    # ---- molt's flows and QEMU's pre-started migration, side by side ----
    m=no q=no m_HELD=0 q_HELD=0
    if wanted exec || wanted transfer || wanted reboot; then
        molt_boot && m=yes
    fi
    if [ "$LAB_FAILED" = 0 ] && wanted qmig; then
        [ $m = yes ] && hold m
        qmig_boot && q=yes
        [ $q = yes ] && hold q
        [ $m = yes ] && release m
    fi
    [ "$LAB_FAILED" != 0 ] && m=no q=no
    if [ $m = yes ] && wanted exec; then
        use_guest m
        runs exec || m=no
        save_guest m
    fi
    # Alternating: each round one transfer (guest m, q paused), then one
    # migration (guest q, m paused).
    r=1
    while [ $r -le "$RUNS" ] && { [ $m = yes ] && wanted transfer || [ $q = yes ]; }; do
        if [ $m = yes ] && wanted transfer; then
            use_guest m
            measure transfer $r || m=no
            save_guest m
        fi
        if [ $q = yes ]; then
            [ $m = yes ] && hold m
            use_guest q
            release q
            measure qmig $r || q=no
            save_guest q
            [ $q = yes ] && hold q
            [ $m = yes ] && { use_guest m; release m; }
        fi
        r=$((r + 1))
    done
    if wanted qmig && [ -n "${q_PID:-}" ]; then
        use_guest q
        [ $q = yes ] && check "qmig_${SIZE}_migrations_completed" \
            "$(grep -c 'Migration status: completed' $QMON_LOG)" "$RUNS"
        qemu_end qmig
        kill "$RECV_PID" 2>/dev/null
        q_PID=
    fi
    if [ $m = yes ] && wanted reboot; then
        use_guest m
        release m
        runs reboot
        save_guest m
    fi
    [ -n "${m_PID:-}" ] && { molt_end; m_PID=; }

    # ---- QEMU 7.2 x-ignore-shared restart, on a guest of its own ----
    if [ "$LAB_FAILED" = 0 ] && wanted qemu; then
        qemu_start qemu
        UDP=/run/udp
        if guest_ready "$VMM_LOG" && guest_sender "qemu_$SIZE" $UDP_PORT; then
            r=1
            while [ $r -le "$RUNS" ] && measure qemu $r; do r=$((r + 1)); done
            check "qemu_${SIZE}_migrations_completed" \
                "$(grep -c 'Migration status: completed' $QMON_LOG)" $((r - 1))
        fi
        qemu_end qemu
        kill "$RECV_PID" 2>/dev/null
    fi
done
kill $HOLDERS 2>/dev/null
exec 3>&-

# ---- the table ----
# ms FILE: "median (min-max)" in ms of the microsecond values in FILE; MED is
# the median in us.
ms() {
    set -- $(sort -n "$1" | awk '{ v[NR] = $1 } END { if (NR) print v[1], v[int((NR + 1) / 2)], v[NR] }')
    MED=${2:-}
    [ -n "$MED" ] && echo "$(($2 / 1000)) ($(($1 / 1000))-$(($3 / 1000)))" || echo "-"
}
label() {
    case $1 in
    exec) echo "molt cpr-exec" ;;
    transfer) echo "molt cpr-transfer (new molt started beforehand)" ;;
    reboot) echo "molt reboot mode: cpr-save, start again with --incoming file: (no kexec)" ;;
    qemu) echo "QEMU 7.2 x-ignore-shared: save to file, quit, start again" ;;
    qmig) echo "QEMU 7.2 x-ignore-shared: destination started beforehand, migrate over a unix socket" ;;
    esac
}
# ratio US FLOW: US over FLOW's median at this SIZE, or - without FLOW.
ratio() {
    _a=$1
    if [ -s /run/bb.$SIZE.$2 ] && ms /run/bb.$SIZE.$2 > /dev/null; then
        awk -v a="$_a" -v b="$MED" 'BEGIN { printf "%.2fx", a / b }'
    else
        echo -
    fi
}
head="| flow |" sep="|---|"
for SIZE in $SIZES; do
    head="$head $SIZE: median ms (min-max) | vs QEMU restart | vs QEMU migration | lost |"
    sep="$sep---|---|---|---|"
done
echo "LAB-TABLE $head"
echo "LAB-TABLE $sep"
for flow in $FLOWS; do
    row="| $(label $flow) |"
    for SIZE in $SIZES; do
        if [ -f /run/bb.$SIZE.$flow ]; then
            cell=$(ms /run/bb.$SIZE.$flow)
            ms /run/bb.$SIZE.$flow > /dev/null
            lost=$(awk '{ s += $1 } END { print s + 0 }' /run/bb.$SIZE.$flow.lost)
            row="$row $cell | $(ratio "$MED" qemu) | $(ratio "$MED" qmig) | $lost |"
        else
            row="$row - | - | - | - |"
        fi
    done
    echo "LAB-TABLE $row"
done
# The chart's points (scripts/svg-chart.sh): flow, size, blackout min, median
# and max in ms, tab-separated.
short() {
    case $1 in
    exec) echo "molt cpr-exec" ;; transfer) echo "molt cpr-transfer" ;;
    reboot) echo "molt reboot mode" ;; qemu) echo "QEMU 7.2 restart" ;;
    qmig) echo "QEMU 7.2 pre-started migration" ;;
    esac
}
for SIZE in $SIZES; do
    for flow in $FLOWS; do
        [ -s /run/bb.$SIZE.$flow ] || continue
        set -- $(sort -n /run/bb.$SIZE.$flow | awk '{ v[NR] = $1 } END { print v[1], v[int((NR + 1) / 2)], v[NR] }')
        printf 'LAB-POINT %s\t0\t%s\t%s\t%s\t%s\n' "$(short $flow)" "$SIZE" \
            "$(($1 / 1000))" "$(($2 / 1000))" "$(($3 / 1000))"
    done
done
for SIZE in $SIZES; do
    for flow in exec transfer reboot; do
        [ -s /run/bb.$SIZE.$flow.pause ] || continue
        set -- $(sort -n /run/bb.$SIZE.$flow.pause | awk '{ v[NR] = $1 } END { print v[1], v[int((NR + 1) / 2)], v[NR] }')
        result "molt_pause_us_${SIZE}_$flow" "min=$1 median=$2 max=$3"
    done
done
result lab_ms $(( $(now_ms) - t_start ))
lab_end
