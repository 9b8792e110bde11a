# boot-repeat: the 2-vCPU boot, again and again (issue 9 item 9: a lab in
# five once hung at boot with two vCPUs, both L2 CPUs in soft lockups inside
# molt's vCPU threads). Boots the L3 guest RUNS times in a row in one L2
# session, each to its command loop with every CPU up, then powers it off;
# under molt, or with VMM=qemu under QEMU 7.2 for comparison (image built
# with MOLT_LAB_WITH_QEMU=1). A boot without GUEST-READY in BOOT_S seconds is
# a hang: the scenario records what L2 sees (its kernel log, where the VMM's
# threads are and whether they burn CPU, the KVM exits the vCPUs still take)
# and stops. If L2 itself locks up, no scenario can run: lab.sh stops the lab
# and says so (LAB-L2-HUNG), with L2's stacks of every CPU in the log.
# CI runs the default 8 boots (tests/lab.rs); the long run:
#   MOLT_LAB_TIMEOUT=1500 MOLT_LAB_APPEND="molt.env.RUNS=30" scripts/lab.sh boot-repeat
# Parameters (molt.env.NAME=VALUE): RUNS (8), VMM (molt|qemu), CPUS (2),
# BOOT_S (120), GUEST_EXTRA (added to the guest's command line, ~ for spaces).
. /lab/lib/common.sh
. /lab/lib/qemu.sh

RUNS=${RUNS:-8}
VMM=${VMM:-molt}
CPUS=${CPUS:-2}
BOOT_S=${BOOT_S:-120}
CMDLINE="$GUEST_CMDLINE $(echo "${GUEST_EXTRA:-}" | tr '~' ' ')"
LOG=/run/guest.log

# thread_times PID: utime+stime (ticks) of each thread, one line.
thread_times() {
    for _t in /proc/"$1"/task/*; do
        printf '%s=%s ' "$(cat "$_t/comm" 2>/dev/null)" \
            "$(awk '{ print $14 "+" $15 }' "$_t/stat" 2>/dev/null)"
    done
    echo
}

# kvm_trace SECONDS: the KVM exits and entries of the next SECONDS, for a hang.
kvm_trace() {
    _tr=/sys/kernel/tracing
    [ -d $_tr/events ] || mount -t tracefs tracefs $_tr 2>/dev/null
    [ -d $_tr/events/kvm ] || { echo "LAB-DIAG no kvm trace events"; return; }
    echo > $_tr/trace
    for _e in kvm_exit kvm_entry kvm_apic_ipi kvm_inj_virq kvm_msr kvm_fpu; do
        echo 1 > $_tr/events/kvm/$_e/enable 2>/dev/null
    done
    sleep "$1"
    for _e in kvm_exit kvm_entry kvm_apic_ipi kvm_inj_virq kvm_msr kvm_fpu; do
        echo 0 > $_tr/events/kvm/$_e/enable 2>/dev/null
    done
    echo "LAB-DIAG kvm trace: $(grep -vc '^#' $_tr/trace) events in $1 s; per vCPU thread/event:"
    grep -v '^#' $_tr/trace | awk '{ print $1, $5 }' | sort | uniq -c | sed 's/^/LAB-DIAG     /'
    grep -v '^#' $_tr/trace | head -n 30 | sed 's/^/LAB-DIAG trace /'
    grep -v '^#' $_tr/trace | tail -n 30 | sed 's/^/LAB-DIAG trace /'
}

hang_evidence() {
    echo "LAB-DIAG ==== boot $1 hung: no GUEST-READY in $BOOT_S s"
    echo "LAB-DIAG VMM alive: $(alive "$VMM_PID" && echo yes || echo no)"
    echo "LAB-DIAG thread cpu ticks: $(thread_times "$VMM_PID")"
    sleep 2
    echo "LAB-DIAG thread cpu ticks 2 s later: $(thread_times "$VMM_PID")"
    proc_diag "$VMM_PID"
    kvm_trace 2
    dmesg | grep -E -c 'soft lockup' | sed 's/^/LAB-DIAG L2 soft lockup reports: /'
    dmesg | grep -E -A 40 'soft lockup' | head -n 120 | sed 's/^/LAB-DIAG dmesg /'
    dump guest "$VMM_LOG" 60
    dump vmm-stderr "$VMM_LOG.err" 30
}

case $VMM in
molt) [ -x /lab/bin/molt ] || fail molt "binary missing" ;;
qemu) command -v qemu-system-x86_64 >/dev/null || fail qemu "missing (MOLT_LAB_WITH_QEMU=1)" ;;
*) fail vmm "unknown VMM=$VMM" ;;
esac
if [ "$LAB_FAILED" != 0 ]; then lab_end; exit 0; fi
echo "LAB-INFO $VMM, $CPUS vCPUs, $RUNS boots, guest cmdline: $CMDLINE"
# L2 holds an idle VM so that the guests' VMs patch no kernel code (init).
if grep -q 'LAB-KVM-HOLD ok' /run/kvmhold.log 2>/dev/null && pidof labkvmhold >/dev/null; then
    result kvm_hold ok
else
    result kvm_hold "no: $(cat /run/kvmhold.log 2>/dev/null | tr '\n' ' ')"
fi

ok=0 hangs=0 i=1
while [ $i -le "$RUNS" ]; do
    t0=$(now_ms)
    if [ "$VMM" = molt ]; then
        vmm_start "$LOG" molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz \
            --cmdline "$CMDLINE" --cpus "$CPUS" --mem 256M --serial stdio
    else
        vmm_start "$LOG" qemu-system-x86_64 $(qemu_args "$CPUS") -append "$CMDLINE"
    fi
    if ! wait_log "$LOG" '^GUEST-READY' "$BOOT_S" "$VMM_PID"; then
        hangs=$((hangs + 1))
        hang_evidence "$i"
        kill -9 "$VMM_PID" 2>/dev/null
        wait_exit "$VMM_PID" 30
        echo "LAB-DIAG VMM after kill -9: $EXIT_RC"
        break
    fi
    ready_ms=$(( $(now_ms) - t0 ))
    cpus=$(grep -m1 '^GUEST-READY' "$LOG" | tr -d '\r' | sed 's/.*cpus=//')
    # The command loop is up once it ticks; then power off.
    wait_log "$LOG" '^GUEST-TICK ' 60 "$VMM_PID"
    echo poweroff >&3
    if [ "$VMM" = molt ]; then
        wait_exit "$VMM_PID" 60
    else
        # qboot leaves ACPI power-off unprogrammed (guest-qemu.sh): the guest
        # reaching it is the end.
        wait_log "$LOG" 'reboot: Power down' 60 "$VMM_PID" && EXIT_RC=0 || EXIT_RC=no-poweroff
        kill "$VMM_PID" 2>/dev/null
        wait "$VMM_PID" 2>/dev/null
    fi
    exec 3>&-
    echo "LAB-INFO boot $i: ready ${ready_ms} ms cpus=$cpus exit=$EXIT_RC"
    if [ "$cpus" = "$CPUS" ] && [ "$EXIT_RC" = 0 ]; then
        ok=$((ok + 1))
    else
        fail "boot$i" "cpus=$cpus exit=$EXIT_RC"
        dump guest "$LOG" 40
        dump vmm-stderr "$LOG.err" 20
    fi
    i=$((i + 1))
done
result boots "$RUNS"
result boots_ok "$ok"
check hangs "$hangs" 0
result soft_lockups "$(dmesg | grep -c 'soft lockup')"
lab_end
