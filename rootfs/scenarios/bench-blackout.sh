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
# molt and the QEMU restart use a persistent tap (molt's reboot mode and QEMU
# reopen it by name). A single-queue tap takes one opener at a time, and the
# pre-started destination opens its tap while the source still holds it, so
# qmig's QEMUs use a multi-queue tap instead: the first QEMU creates it with
# queues=2 (busybox has no tool that creates one), each later one attaches two
# more queues of it by name, and L2's address moves to it for that guest (the
# virtio-net device is single-queue: its frames use the first of the two). A
# second tap bridged to the first would do too, but needs the bridge module in
# the L2 image. Needs the image with QEMU
# (MOLT_LAB_WITH_QEMU=1; scripts/bench-blackout.sh). Parameters (molt.env.*):
# RUNS (5), SIZES (comma-separated, default 256M; scripts/bench-blackout.sh
# passes one size per L2 boot, see there), FLOWS (comma-separated, default all
# five: fewer to debug one).
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/qemu.sh

RUNS=${RUNS:-5}
SIZES=$(echo "${SIZES:-256M}" | tr ',' ' ')
FLOWS=$(echo "${FLOWS:-exec,transfer,reboot,qemu,qmig}" | tr ',' ' ')
UDP_PORT=7100
UDP=/run/udp
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
# Opened read-write, so it never blocks and outlives each VMM process: a VMM
# started later reads the same FIFO and appends to the same log.
console_open() {
    VMM_LOG=$1
    rm -f "$VMM_LOG" "$VMM_LOG.in" "$VMM_LOG.err"
    mkfifo "$VMM_LOG.in"
    : > "$VMM_LOG"
    exec 3<> "$VMM_LOG.in"
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
    [ "$PAUSE_US" = pending ] &&
        PAUSE_US=$(grep 'resumed from' "$VMM_LOG.err" | tail -n 1 | sed -n 's/.*pause_us=\([0-9]*\).*/\1/p')
    _g=$(field max_gap_us "$_w")
    # QEMU's own figure for the last migration: the source's downtime (VM
    # stopped to migration completed; without the restart in the qemu flow).
    _q=
    [ -n "${QMON_LOG:-}" ] && _q=" qemu_downtime_ms=$(grep -a '^downtime:' "$QMON_LOG" | tail -n 1 | tr -dc 0-9)"
    echo "LAB-INFO $SIZE $1 run $2: $_w molt_pause_us=${PAUSE_US:--}$_q"
    result "blackout_${SIZE}_${1}_run$2" "$((_g / 1000)) lost=$(field lost "$_w") pause_us=${PAUSE_US:--}"
    echo "$_g" >> /run/bb.$SIZE.$1
    echo "$(field lost "$_w")" >> /run/bb.$SIZE.$1.lost
    [ -n "$PAUSE_US" ] && echo "$PAUSE_US" >> /run/bb.$SIZE.$1.pause
    true
}

# guest_sender NAME: a receiver for this guest's stream (each boot numbers
# from 1 again), network up in the guest, the sender started, the stream seen;
# then a window with no update as the baseline.
guest_sender() {
    [ -n "${RECV_PID:-}" ] && kill "$RECV_PID" 2>/dev/null && wait "$RECV_PID" 2>/dev/null
    : > $UDP
    rm -f $UDP.live
    labudp recv $UDP_PORT $UDP &
    RECV_PID=$!
    guest_net_up "$1_ip_rc"
    check "$1_sender_rc" "$(guest_cmd "setsid labudp send $HOST_IP $UDP_PORT 1000 </dev/null >/dev/null 2>&1 &" 30)" 0
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

# molt_flows: molt's exec, transfer and reboot mode on one guest of $SIZE.
molt_flows() {
    rm -f /dev/shm/ram
    MOLT_CMD="molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz --cmdline '$GUEST_CMDLINE'"
    MOLT_CMD="$MOLT_CMD --serial stdio --cpus 1 --mem $SIZE --mem-file /dev/shm/ram"
    MOLT_CMD="$MOLT_CMD --net tap=$TAP,mac=$GUEST_MAC --control $SOCK"
    console_open /run/molt-$SIZE.log
    launch "$MOLT_CMD"
    if guest_ready "$VMM_LOG" && guest_sender "molt_$SIZE"; then
        for flow in exec transfer reboot; do
            wanted $flow || continue
            r=1
            while [ $r -le "$RUNS" ] && measure $flow $r; do r=$((r + 1)); done
            [ $r -le "$RUNS" ] && break
        done
    fi
    [ "$LAB_FAILED" != 0 ] && { dump molt "$VMM_LOG" 40; dump molt-stderr "$VMM_LOG.err" 40; }
    echo poweroff >&3
    wait_exit "$VMM_PID" 60
    result "molt_${SIZE}_exit" "$EXIT_RC"
    exec 3>&-
    rm -f /dev/shm/ram $STATE
}

t_start=$(now_ms)
if tap_up; then check tap yes yes; else check tap no yes; fi

for SIZE in $SIZES; do
    wanted exec || wanted transfer || wanted reboot && molt_flows

    # ---- QEMU 7.2 x-ignore-shared: restart, then pre-started migration ----
    QEMU_RAM="-object memory-backend-file,id=ram0,size=$SIZE,mem-path=/dev/shm/qram,share=on"
    QEMU_RAM="$QEMU_RAM -machine memory-backend=ram0"
    QEMU_NIC="-device virtio-net-pci,netdev=n0,mac=$GUEST_MAC,romfile="
    for qflow in qemu qmig; do
        [ "$LAB_FAILED" != 0 ] && break
        wanted $qflow || continue
        rm -f /dev/shm/qram $QMON.a.in $QMON.a.out $QMON.b.in $QMON.b.out
        mkfifo $QMON.a.in $QMON.a.out $QMON.b.in $QMON.b.out
        # Both ends held read-write here: neither QEMU nor the readers ever
        # block or see EOF when a QEMU process goes.
        exec 4<> $QMON.a.in 5<> $QMON.a.out 6<> $QMON.b.in 7<> $QMON.b.out
        QMON_LOG=/run/qmon-$qflow-$SIZE.log
        cat <&5 >> /run/qmon-$qflow-$SIZE.log &
        CAT_A=$!
        cat <&7 >> /run/qmon-$qflow-$SIZE.log &
        CAT_B=$!
        QEMU_CMD="qemu-system-x86_64 $(qemu_args 1 "$SIZE") -append '$GUEST_CMDLINE' $QEMU_RAM $QEMU_NIC"
        if [ $qflow = qemu ]; then
            QEMU_CMD="$QEMU_CMD -netdev tap,id=n0,ifname=$TAP,script=no,downscript=no"
        else
            # vnet_hdr=off: the header's length is the tap's, not a queue's,
            # and a QEMU starting sets it to 10 bytes while the running guest's
            # virtio-net uses 12 (mergeable buffers): the source's frames went
            # out garbled and the stream stopped until the migration.
            QEMU_CMD="$QEMU_CMD -netdev tap,id=n0,ifname=$QTAP,queues=2,vnet_hdr=off,script=no,downscript=no"
        fi
        console_open /run/$qflow-$SIZE.log
        launch "$QEMU_CMD -monitor pipe:$QMON.a"
        SRC_FD=4
        qemu_ignore_shared 4
        ok=yes
        if [ $qflow = qmig ]; then
            # QEMU created the multi-queue tap: L2's address moves to it.
            _i=0
            while [ ! -d /sys/class/net/$QTAP ] && [ $_i -le 600 ]; do _i=$((_i + 1)); sleep 0.05; done
            ip addr del "$HOST_IP/24" dev "$TAP" && ip link set $QTAP up &&
                ip addr add "$HOST_IP/24" dev $QTAP || ok=no
            check "qmig_${SIZE}_tap" $ok yes
        fi
        if [ $ok = yes ] && guest_ready "$VMM_LOG" && guest_sender "${qflow}_$SIZE"; then
            r=1
            while [ $r -le "$RUNS" ] && measure $qflow $r; do r=$((r + 1)); done
            check "${qflow}_${SIZE}_migrations_completed" \
                "$(grep -c 'Migration status: completed' /run/qmon-$qflow-$SIZE.log)" $((r - 1))
        fi
        if [ "$LAB_FAILED" != 0 ]; then
            dump $qflow "$VMM_LOG" 40; dump $qflow-stderr "$VMM_LOG.err" 40
            dump qmon /run/qmon-$qflow-$SIZE.log 40
        fi
        echo quit >&$SRC_FD
        wait_exit "$VMM_PID" 30
        [ $qflow = qmig ] && { ip addr add "$HOST_IP/24" dev "$TAP" 2>/dev/null || true; }
        kill "$CAT_A" "$CAT_B" 2>/dev/null
        exec 3>&- 4>&- 5>&- 6>&- 7>&-
        rm -f /dev/shm/qram $QSTATE
    done
done
[ -n "${RECV_PID:-}" ] && kill "$RECV_PID" 2>/dev/null

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
