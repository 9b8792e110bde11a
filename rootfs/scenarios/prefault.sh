# prefault: a transfer's new molt fills its VM's nested page tables for the
# guest's RAM before the pause (KVM_PRE_FAULT_MEMORY, Linux 6.10 and later),
# so that the guest, once moved, does not fault in again the pages it
# already uses (each such fault is an exit; under TCG an emulated #VMEXIT).
# L2 runs Debian's 6.12 kernel for this (the lab's default, 6.1, lacks it).
# Checks, for two transfers in a row: the new molt says it pre-faulted all of
# the RAM holding data and was not cut short, the update succeeded, the old
# molt exited 0 and the guest answers its console on the new one. Reports the
# new VM's nested page faults (KVM's pf_fixed, pre-faulting included) once
# the guest has run 2 s on it.
# lab-kernel: 6.12-cloud-amd64
# lab-timeout: 900
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/cpr.sh

# vm_stat PID NAME: KVM's statistic NAME of PID's VM, summed over its vCPUs.
vm_stat() {
    [ -d /sys/kernel/debug/kvm ] || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    cat /sys/kernel/debug/kvm/"$1"-*/"$2" 2>/dev/null | head -n 1
}

# transfer N: start a new molt, hand it the guest, check what it pre-faulted.
transfer() {
    _err=/run/new$1.err
    if ! start_incoming molt "$_err"; then
        fail "incoming_$1" "the new molt's socket did not appear"
        return 1
    fi
    _r=$(molt ctl "$SOCK" cpr-transfer $XFER 2>&1)
    echo "LAB-INFO cpr-transfer $1: $_r"
    case $_r in
    "ok resumed mode=transfer "*) check "transfer_$1" ok ok ;;
    *) check "transfer_$1" "$_r" ok; kill "$NEW_PID" 2>/dev/null; return 1 ;;
    esac
    wait_exit "$VMM_PID" 30
    check "old_molt_exit_$1" "$EXIT_RC" 0
    VMM_PID=$NEW_PID
    result "pause_us_$1" "$(field pause_us "$_r")"
    _l=$(grep -m1 -E 'pre-faulted|cannot pre-fault' "$_err" | tr -d '\r')
    echo "LAB-INFO new molt $1: $_l"
    _mapped=$(echo "$_l" | sed -n 's/.*pre-faulted \([0-9][0-9]*\) of the .*/\1/p')
    _held=$(echo "$_l" | sed -n 's/.* of the \([0-9][0-9]*\) MiB of guest RAM holding data.*/\1/p')
    result "prefault_mib_$1" "$_mapped"
    result "prefault_ms_$1" "$(echo "$_l" | sed -n 's/.* in \([0-9][0-9]*\) ms.*/\1/p')"
    check "prefault_all_$1" "$([ -n "$_mapped" ] && [ "$_mapped" -gt 0 ] && [ "$_mapped" = "$_held" ] && echo yes || echo no)" yes
    check "prefault_not_cut_$1" "$(echo "$_l" | grep -c 'then stopped')" 0
    sleep 2
    result "pf_fixed_$1" "$(vm_stat "$VMM_PID" pf_fixed)"
    gcheck "console_after_$1" 60 "true"
}

t_start=$(now_ms)
run_args > /run/argv
set --
while IFS= read -r a; do set -- "$@" "$a"; done < /run/argv
echo "LAB-INFO prefault: molt run $*"
cpr_vmm_start /run/guest.log molt run "$@"
if guest_ready "$VMM_LOG"; then
    check guest_cpus "$GUEST_CPUS" 2
    result pf_fixed_boot "$(vm_stat "$VMM_PID" pf_fixed)"
    transfer 1 && transfer 2
    guest_poweroff molt_exit
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_cpr molt
result lab_ms $(( $(now_ms) - t_start ))
lab_end
