# vfio-kernel: is the lab host's (L2's) kernel fit for live update with a VFIO
# device (issue 11)? QEMU's edu device is bound to vfio-pci and labvfio
# (rootfs/tools/labvfio.c) DMA-maps a memfd buffer, hands the mappings to a new
# process (VFIO_DMA_UNMAP_FLAG_VADDR, then VFIO_DMA_MAP_FLAG_VADDR there), and
# that process across its own execve; edu DMAs through the buffer at each step.
# The pinned pages' locked_vm must follow the mappings to the new mm (the
# kernel's vfio_change_dma_owner, Linux 6.3 and 6.1.16): VmLck shows it.
. /lab/lib/common.sh

result kernel "$(uname -r)"
modprobe -a vfio_pci vfio_iommu_type1 || fail modprobe "vfio_pci or vfio_iommu_type1 did not load"
bdf=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ] && bdf=${d##*/}
done
[ -n "$bdf" ] || { fail edu "no edu device (1234:11e8) in L2"; lab_end; exit 0; }
echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id
group=$(basename "$(readlink "/sys/bus/pci/devices/$bdf/iommu_group")")
i=0
while [ ! -c "/dev/vfio/$group" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
check edu_driver "$(basename "$(readlink "/sys/bus/pci/devices/$bdf/driver")")" vfio-pci
# The helper is static, so inlined: its absence from kallsyms proves nothing
# (on 6.1 it is inlined into vfio_iommu_type1_ioctl).
result change_dma_owner_in_kallsyms "$(grep -c ' vfio_change_dma_owner' /proc/kallsyms)"

labvfio "/dev/vfio/$group" "$bdf" > /tmp/labvfio.out 2>&1
check labvfio_rc $? 0
sed 's/^/LAB-INFO labvfio: /' /tmp/labvfio.out
v() { sed -n "s/^$1=//p" /tmp/labvfio.out; }
result update_vaddr_unset "$(v update_vaddr_unset)"
check update_vaddr "$(v update_vaddr)" 1
check lck_map_kb "$(v lck_map_kb)" 2048
check dma_old "$(v dma_old)" ok
check lck_new_kb "$(v lck_new_kb)" 2048
check lck_old_kb "$(v lck_old_kb)" 0
check dma_new "$(v dma_new)" ok
check lck_exec_kb "$(v lck_exec_kb)" 2048
check dma_exec "$(v dma_exec)" ok
check lck_unmap_kb "$(v lck_unmap_kb)" 0
# Nothing in L2's log about the mappings (a locked_vm underflow is a WARN splat).
splat='WARNING: CPU|locked_vm|RLIMIT_MEMLOCK|vfio_iommu_type1'
dmesg | grep -E "$splat" | sed 's/^/LAB-INFO dmesg: /'
check kernel_warnings "$(dmesg | grep -c -E "$splat")" 0
lab_end
