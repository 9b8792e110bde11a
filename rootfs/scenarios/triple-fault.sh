# triple-fault: a guest that triple-faults of its own doing (Linux's
# `reboot=t`: an empty IDT, then int3) ends molt with status 0, molt says so,
# and the lab's classification of guest shutdowns (shutdown_causes) records it
# without calling it QEMU TCG's: the guest had run on since KVM last entered it.
. /lab/lib/common.sh
. /lab/lib/devices.sh

LOG=/run/guest.log

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi

vmm_start "$LOG" molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz \
    --cmdline "$GUEST_CMDLINE reboot=t" --mem 256M --serial stdio
if guest_ready "$LOG"; then
    echo 'reboot -f' >&3
    wait_exit "$VMM_PID" 90
    check molt_exit "$EXIT_RC" 0
    check triple_fault_logged "$(count "$LOG.err" 'triple fault')" 1
    causes=$(shutdown_causes)
    echo "$causes" | sed 's/^/LAB-INFO classified: /'
    check shutdown_recorded "$(echo "$causes" | grep -c '^LAB-INFO guest shutdown')" 1
    check called_emulation "$(echo "$causes" | grep -c '^LAB-EMULATION-FAULT')" 0
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm guest
lab_end
