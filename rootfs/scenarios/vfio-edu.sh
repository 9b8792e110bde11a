# vfio-edu: QEMU's edu device, emulated by L1 behind its emulated IOMMU, is
# passed through by molt (--vfio) to the L3 guest. There the labedu module
# binds it and handles its MSI, and the labedu program checks its ID,
# liveness and factorial registers and DMA both ways, each DMA completing
# with an MSI (rootfs/tools/labedu.c). Before that, molt must refuse a bad
# address, edu bound to no driver and edu bound to another driver than
# vfio-pci, each naming why. Then edu works twice in the guest, with status
# in between (live updates with edu: the vfio-cpr and vfio-reboot scenarios).
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/edu.sh

SOCK=/run/molt.sock
LOG=/run/guest.log

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi
t_start=$(now_ms)

edu_find
drv() {
    if [ -e "$DEV/driver" ]; then basename "$(readlink "$DEV/driver")"; else echo none; fi
}
modprobe vfio_pci && modprobe vfio_iommu_type1 || fail vfio_modules "modprobe failed"

# molt_refuses NAME RC TEXT ARGS...: `molt run ARGS` exits RC and says TEXT.
molt_refuses() {
    _name=$1 _rc=$2 _text=$3
    shift 3
    molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz --serial none \
        --mem 64M "$@" > /run/refused.out 2>&1
    _got=$?
    sed "s/^/LAB-INFO $_name: /" /run/refused.out
    check "${_name}_rc" "$_got" "$_rc"
    if grep -qF "$_text" /run/refused.out; then
        check "${_name}_says_why" yes yes
    else
        check "${_name}_says_why" no yes
    fi
}

# 1. Refusals: a bad address; edu bound to no driver, then to uio_pci_generic.
molt_refuses bad_bdf 2 "is not a PCI address" --vfio 00:04
result edu_driver_at_boot "$(drv)"
[ "$(drv)" = none ] || echo "$EDU" > "$DEV/driver/unbind"
molt_refuses unbound 1 "VFIO device $EDU: is bound to no driver" --vfio "$EDU"
modprobe uio_pci_generic
echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/new_id
check edu_on_uio "$(drv)" uio_pci_generic
molt_refuses other_driver 1 "VFIO device $EDU: is bound to uio_pci_generic, not vfio-pci" \
    --vfio "$EDU"
echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/remove_id
[ "$(drv)" = none ] || echo "$EDU" > "$DEV/driver/unbind"

# 2. edu to vfio-pci (LAB.md): its IOMMU group gets a node.
echo "1234 11e8" > /sys/bus/pci/drivers/vfio-pci/new_id
check edu_on_vfio "$(drv)" vfio-pci
group=$(basename "$(readlink "$DEV/iommu_group")")
check vfio_group_node "$([ -c "/dev/vfio/$group" ] && echo yes || echo no)" yes

# 3. The guest gets edu: BAR 0 mapped into it, MSI through KVM.
if molt_boot "$LOG" --mem 256M --control "$SOCK" --vfio "$EDU"; then
    grep 'VFIO device' "$LOG.err" | sed 's/^/LAB-INFO molt: /'
    check bar0_mapped "$(grep -c "BAR 0, 0x100000 bytes at .*: 0x100000 bytes mapped into the guest" "$LOG.err")" 1
    gcheck labedu_module 60 "modprobe labedu && dmesg | grep labedu | sed 's/^/KMSG /'"
    gout KMSG | sed 's/^/LAB-INFO guest: /'
    edu_checks 1 1

    st=$(molt ctl "$SOCK" status 2>&1)
    case $st in "ok state=running"*) check status_running yes yes ;; *) check status_running "$st" yes ;; esac

    # 4. edu still works, with other values and another pattern.
    edu_checks 2 2
    guest_cmd "grep labedu /proc/interrupts | sed 's/^/IRQ /'" 30 >/dev/null
    result guest_edu_interrupts "$(gval IRQ | tr -s ' ')"
    guest_poweroff molt_exit
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm guest
dmesg | grep -iE 'vfio|dmar' | tail -n 20 | sed 's/^/LAB-INFO L2 dmesg: /'
result lab_ms $(($(now_ms) - t_start))
lab_end
