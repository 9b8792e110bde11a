# net-duplex: TCP both ways at once over virtio-net for DUPLEX_SECS seconds
# (default 120): L2 -> guest and guest -> L2 streams run at the same time,
# each the checkable stream of `labio send ... seq:SECS` (every byte's value
# depends on its offset), checked byte by byte by the receiver. Checks: the
# guest did not reset (molt still runs, no second GUEST-INIT, no triple fault
# logged), each stream lasted the whole time, every byte sent arrived, none
# differs, the kernel log is clean. Throughput both ways is reported
# (informational under TCG: MB/s = 10^6 bytes/s on the receiver's clock).
# VMM=qemu runs the same guest and load under QEMU 7.2 -cpu host instead
# (image built with MOLT_LAB_WITH_QEMU=1), as a reference. TRACE=1 keeps L2's
# last KVM events (exits, injected exceptions, page faults) in a ring and
# prints them if the guest shuts down (a triple fault), under either VMM (L2's
# init classifies every guest shutdown in any scenario: rootfs/host/init).
# lab-append: loglevel=7
. /lab/lib/common.sh
. /lab/lib/devices.sh

DUPLEX_SECS=${DUPLEX_SECS:-120}
VMM=${VMM:-molt}
TRACE=${TRACE:-0}
TRACE_EVENTS="kvm_exit kvm_entry kvm_inj_exception kvm_page_fault kvm_inj_virq kvm_msr kvm_cr"
tracing=/sys/kernel/tracing

# trace_events 0|1: L2's KVM events on or off (a ring: the newest are kept).
trace_events() {
    for _e in $TRACE_EVENTS; do
        echo "$1" > $tracing/events/kvm/$_e/enable 2>/dev/null
    done
}
if [ "$TRACE" = 1 ]; then
    [ -d $tracing/events ] || mount -t tracefs tracefs $tracing 2>/dev/null
    echo 16384 > $tracing/buffer_size_kb
    echo > $tracing/trace
    # The ring stops at the shutdown exit itself (SVM_EXIT_SHUTDOWN, 0x7f), so
    # the guest's reboot that follows cannot overwrite what led to it, or at
    # the first nested page fault (0x400) in the guest's page-table walk
    # (EXITINFO1 bit 33) at a GPA with no memory (bit 3) while an event is
    # delivered (intr_info bit 31), which KVM re-enters into for good
    # (shutdown_causes in lib/common.sh).
    echo 'traceoff if exit_reason == 127 || (exit_reason == 1024 && info1 & 0x200000000 && info1 & 8 && intr_info & 0x80000000)' \
        > $tracing/events/kvm/kvm_exit/trigger 2>/dev/null ||
        echo 'traceoff if exit_reason == 127' > $tracing/events/kvm/kvm_exit/trigger ||
        echo "LAB-INFO trace: the shutdown trigger was refused"
    echo "LAB-INFO trace: $(grep -v '^#' $tracing/events/kvm/kvm_exit/trigger)"
    trace_events 1
fi
# kvm_counts: L2's KVM counters (all VMs; the idle one of init adds next to
# nothing), "NAME VALUE" lines.
kvm_counts() {
    [ -d /sys/kernel/debug/kvm ] || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    for _n in exits irq_injections irq_window_exits halt_exits mmio_exits io_exits; do
        echo "$_n $(cat /sys/kernel/debug/kvm/$_n 2>/dev/null || echo 0)"
    done
}
LOG=/run/guest.log
SOCK=/run/molt.sock
# Stall limit for each transfer: longer than any hiccup TCG has shown.
STALL_S=60

t_start=$(now_ms)
if tap_up; then check tap yes yes; else check tap no yes; fi
result vmm "$VMM"
case $VMM in
molt)
    if [ -x /lab/bin/molt ]; then
        molt_boot "$LOG" --cpus 1 --mem 512M --net "tap=$TAP,mac=$GUEST_MAC" --control "$SOCK"
    else
        fail molt "binary missing"
        false
    fi
    ;;
qemu)
    . /lab/lib/qemu.sh
    vmm_start "$LOG" qemu-system-x86_64 $(qemu_args 1 512M) -append "$DEVICE_CMDLINE" \
        -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no" \
        -device "virtio-net-pci,netdev=n0,mac=$GUEST_MAC,romfile="
    guest_ready "$LOG"
    ;;
*) fail vmm "unknown VMM=$VMM"; false ;;
esac
booted=$?

if [ $booted = 0 ]; then
    guest_net_up guest_ip_rc
    check ping_host_to_guest "$(ping -c 3 -W 5 "$GUEST_IP" 2>&1 | received)" 3
    # Both receivers first (the senders retry until they are up), then both
    # senders; the guest's pair runs in the background so its console stays free.
    started=$(guest_cmd "rm -f /run/h2g.out /run/g2h.out; (labio recv 5001 seq $STALL_S > /run/h2g.out 2>&1 &); (labio send $HOST_IP 5002 seq:$DUPLEX_SECS $STALL_S > /run/g2h.out 2>&1 &)" 30)
    if [ "$started" != 0 ]; then
        # A guest that stopped answering: say why now, and end it, so that
        # every step below fails at once instead of waiting out its timeout.
        fail guest_started_streams "the guest's command loop answered '$started'"
        stuck_diag "$SOCK"
        kill -9 "$VMM_PID" 2>/dev/null
    fi
    labio recv 5002 seq "$STALL_S" > /tmp/g2h.out 2>&1 &
    recv_pid=$!
    kvm_counts > /tmp/kvm.before
    t0=$(now_ms)
    labio send "$GUEST_IP" 5001 "seq:$DUPLEX_SECS" "$STALL_S" > /tmp/h2g.out 2>&1
    wait "$recv_pid"
    echo "LAB-INFO duplex ran $(( $(now_ms) - t0 )) ms on L2's clock"
    # The exposure in events: the emulation's failures come on VM entries
    # that deliver an event, so these compare runs and VMMs better than time.
    # (A VM's counts leave the sums when it is destroyed: none if the VMM died.)
    alive "$VMM_PID" && kvm_counts | while read -r _n _v; do
        result "kvm_$_n" $(( _v - $(sed -n "s/^$_n //p" /tmp/kvm.before) ))
    done
    guest_cmd 'i=0; while { [ ! -s /run/h2g.out ] || [ ! -s /run/g2h.out ]; } && [ $i -lt 900 ]; do usleep 100000; i=$((i+1)); done; sed "s/^/H2G /" /run/h2g.out; sed "s/^/G2H /" /run/g2h.out' \
        $((STALL_S * 2 + 60)) >/dev/null
    h2g_send=$(cat /tmp/h2g.out); h2g_recv=$(gval H2G)
    g2h_send=$(gval G2H); g2h_recv=$(cat /tmp/g2h.out)
    echo "LAB-INFO L2->guest: L2 send: $h2g_send; guest recv: $h2g_recv"
    echo "LAB-INFO guest->L2: guest send: $g2h_send; L2 recv: $g2h_recv"
    case "$h2g_recv $g2h_recv" in
    *bytes=*bytes=*) ;;
    *) stuck_diag "$SOCK" ;;
    esac
    for dir in h2g g2h; do
        eval "s=\"\$${dir}_send\" r=\"\$${dir}_recv\""
        sb=$(field bytes "$s"); rb=$(field bytes "$r")
        result "${dir}_bytes" "$rb"
        check "${dir}_all_arrived" "$([ -n "$sb" ] && [ "$sb" = "$rb" ] && [ "$rb" -gt 0 ] && echo yes || echo no)" yes
        check "${dir}_bad_bytes" "$(field bad "$r")" 0
        # The sender stops after DUPLEX_SECS of sending; it measured until the
        # receiver had everything.
        check "${dir}_full_duration" "$([ "$(field us "$s")" -ge $((DUPLEX_SECS * 1000000)) ] 2>/dev/null && echo yes || echo no)" yes
        us=$(field us "$r")
        result "${dir}_secs" "$(( ${us:-0} / 1000000 ))"
        result "${dir}_mbps" "$(field mbps "$r")"
    done
    guest_cmd "cat /proc/uptime | sed 's/^/UPTIME /'" 30 >/dev/null
    echo "LAB-INFO guest uptime: $(gval UPTIME)"
    check guest_boots "$(count "$LOG" '^GUEST-INIT')" 1
    check vmm_alive "$(alive "$VMM_PID" && echo yes || echo no)" yes
    check triple_faults "$(count "$LOG.err" 'triple fault')" 0
    # L2's own record (the ring of shutdowns that init keeps), whatever the
    # VMM: QEMU logs nothing when its guest shuts down.
    shut=$(count $shutdowns/trace 'kvm_exit:.*reason shutdown')
    check guest_shutdowns "$shut" 0
    if [ "$TRACE" = 1 ]; then
        trace_events 0
        # The trigger stopped the ring: a shutdown or a walk outside RAM.
        if [ "$(count "$LOG.err" 'triple fault')" != 0 ] || [ "$shut" != 0 ] ||
            [ "$(cat $tracing/tracing_on)" = 0 ]; then
            echo "LAB-DIAG L2's last KVM events before the guest's fault:"
            grep -v '^#' $tracing/trace | grep -v 'kvm_entry' | tail -n 120 | sed 's/^/LAB-DIAG trace /'
            echo "LAB-DIAG injected exceptions in the ring:"
            grep 'kvm_inj_exception' $tracing/trace | tail -n 20 | sed 's/^/LAB-DIAG trace /'
        fi
    fi
    guest_dmesg_clean dmesg_errors
    if [ "$VMM" = molt ]; then
        guest_poweroff molt_exit
    else
        echo poweroff >&3
        wait_log "$LOG" 'reboot: Power down' 60 "$VMM_PID"
        kill "$VMM_PID" 2>/dev/null
        wait_exit "$VMM_PID" 10
    fi
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm guest
result lab_ms $(( $(now_ms) - t_start ))
lab_end
