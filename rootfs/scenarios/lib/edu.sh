# Helpers for the scenarios that pass QEMU's edu device through to the guest
# (vfio-edu, vfio-reboot, vfio-cpr). Sourced after common.sh and devices.sh.

# What labedu checks (rootfs/tools/labedu.c), one EDU-CHECK line each.
EDU_CHECKS="id live fact fact_irq dma_to dma_from irqs"

# edu_find: EDU, edu's address on L2's PCI bus (1234:11e8), and DEV, its
# sysfs directory; ends the scenario if there is none.
edu_find() {
    EDU=
    for _d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$_d/vendor")" = 0x1234 ] && [ "$(cat "$_d/device")" = 0x11e8 ]; then
            EDU=${_d##*/}
        fi
    done
    if [ -z "$EDU" ]; then
        fail edu_found "no 1234:11e8 device on L2's bus"
        lab_end
        exit 0
    fi
    check edu_found yes yes
    result edu_bdf "$EDU"
    DEV=/sys/bus/pci/devices/$EDU
}

# edu_to_vfio: edu bound to vfio-pci (LAB.md), checked as edu_on_vfio.
edu_to_vfio() {
    modprobe vfio_pci && modprobe vfio_iommu_type1 || fail vfio_modules "modprobe failed"
    [ -e "$DEV/driver" ] && echo "$EDU" > "$DEV/driver/unbind"
    echo "1234 11e8" > /sys/bus/pci/drivers/vfio-pci/new_id
    check edu_on_vfio "$(basename "$(readlink "$DEV/driver")")" vfio-pci
}

# edu_checks N SEED: run labedu in the guest (run N), its lines tagged EDU<N>.
edu_checks() {
    rc=$(guest_cmd "labedu $2 > /tmp/edu.out 2>&1; r=\$?; sed 's/^/EDU$1 /' /tmp/edu.out; exit \$r" 120)
    check "labedu_${1}_rc" "$rc" 0
    [ "$rc" = timeout ] && stuck_diag "${SOCK:-}"
    for c in $EDU_CHECKS; do
        check "edu_${c}_$1" "$(gout "EDU$1" | grep "^EDU-CHECK $c " | cut -d' ' -f3)" PASS
    done
    gout "EDU$1" | sed "s/^/LAB-INFO labedu run $1: /"
}
