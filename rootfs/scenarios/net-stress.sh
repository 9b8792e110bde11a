# net-stress: diagnostics, not a test. Repeated TCP transfers over virtio-net
# (ROUNDS rounds, default 8, of TCP_MIB MiB, default 128, each way) under molt,
# to catch a rare stall or crash. When a transfer makes no progress for 30 s,
# it records what each side looks like: molt's threads and epoll interest (is
# the tap watched?), the tap's counters in L2, the guest's interrupt and packet
# counts (twice, 3 s apart), then whether a guest-side transmit gets it going
# again. If molt has exited instead, its status, stderr and the guest console.
# Run: MOLT_LAB_TIMEOUT=1500 MOLT_LAB_APPEND=molt.env.ROUNDS=40 scripts/lab.sh net-stress
# loglevel=7: if L2 itself hangs (seen once: khugepaged blocked, every process
# in L2 stuck), its hung-task reports come with the stacks.
# lab-append: loglevel=7
. /lab/lib/common.sh
. /lab/lib/devices.sh

ROUNDS=${ROUNDS:-8}
TCP_MIB=${TCP_MIB:-128}
LOG=/run/guest.log
STALLS=0

# molt_epoll PID: each fd in molt's epoll sets with its event mask (0: not
# watched) and what it is.
molt_epoll() {
    for _f in /proc/"$1"/fdinfo/*; do
        grep -q '^tfd:' "$_f" 2>/dev/null || continue
        echo "LAB-DIAG epoll fd ${_f##*/}:"
        grep '^tfd:' "$_f" | while read -r _ _tfd _ _ev _; do
            echo "LAB-DIAG     tfd $_tfd events 0x$_ev -> $(readlink /proc/"$1"/fd/"$_tfd")"
        done
    done
}

# tap_counters LABEL: L2's side of the tap (its tx is the guest's rx).
tap_counters() {
    _st=/sys/class/net/$TAP/statistics
    echo "LAB-DIAG $1: tx_packets=$(cat $_st/tx_packets) tx_dropped=$(cat $_st/tx_dropped)" \
        "rx_packets=$(cat $_st/rx_packets) rx_dropped=$(cat $_st/rx_dropped)"
}

# stall_evidence DIRECTION: everything worth knowing while a transfer is stuck.
stall_evidence() {
    STALLS=$((STALLS + 1))
    if ! alive "$VMM_PID"; then
        wait_exit "$VMM_PID" 1
        echo "LAB-DIAG ==== molt exited ($EXIT_RC) during $1"
        dump guest "$VMM_LOG" 100
        dump molt-stderr "$VMM_LOG.err" 40
        return
    fi
    echo "LAB-DIAG ==== stall $STALLS ($1)"
    proc_diag "$VMM_PID"
    molt_epoll "$VMM_PID"
    tap_counters "tap"
    for _i in 1 2; do
        guest_cmd "grep -E 'virtio|CPU' /proc/interrupts | sed 's/^/IRQ$STALLS-$_i /'; grep eth0 /proc/net/dev | sed 's/^/DEV$STALLS-$_i /'; netstat -tn | sed 's/^/NS$STALLS-$_i /'" 30 >/dev/null
        for _t in IRQ DEV NS; do gout "$_t$STALLS-$_i" | sed "s/^/LAB-DIAG guest $_t ($_i): /"; done
        sleep 3
    done
    dump molt-stderr "$VMM_LOG.err" 20
    # Does traffic from the guest (a TX kick, then an ARP/ICMP reply on RX) unstick it?
    guest_cmd "ping -c 2 -W 3 $HOST_IP 2>&1 | sed 's/^/PINGS$STALLS /'" 30 >/dev/null
    echo "LAB-DIAG guest ping after the stall: $(gout PINGS$STALLS | received)/2 replies"
    tap_counters "tap after the ping"
}

[ -x /lab/bin/molt ] || { fail molt "binary missing"; lab_end; exit 0; }
tap_up || fail tap "cannot set up $TAP"
if molt_boot "$LOG" --cpus 1 --mem 512M --net "tap=$TAP,mac=$GUEST_MAC"; then
    guest_net_up guest_ip_rc
    i=1
    while [ $i -le "$ROUNDS" ] && alive "$VMM_PID"; do
        guest_cmd "labio recv 5001 - 60 > /run/recv.out 2>&1 &" 30 >/dev/null
        out=$(labio send "$GUEST_IP" 5001 "zero:$((TCP_MIB << 20))" 30 2>&1)
        echo "LAB-INFO round $i L2->guest: $out"
        case $out in *stalled*|*labio:*) stall_evidence "L2->guest round $i" ;; esac
        sleep 1

        labio recv 5002 - 30 > /run/recv.out 2>&1 &
        pid=$!
        guest_cmd "labio send $HOST_IP 5002 zero:$((TCP_MIB << 20)) 30 2>&1 | sed 's/^/TS$i /'" 120 >/dev/null
        wait "$pid"
        echo "LAB-INFO round $i guest->L2: $(cat /run/recv.out); guest $(gval TS$i)"
        case $(cat /run/recv.out) in *stalled*|*labio:*) stall_evidence "guest->L2 round $i" ;; esac
        i=$((i + 1))
    done
    check stalls "$STALLS" 0
    if alive "$VMM_PID"; then
        guest_dmesg_clean dmesg_errors
        guest_poweroff molt_exit
    fi
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm guest
lab_end
