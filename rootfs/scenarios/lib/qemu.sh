# QEMU 7.2 as the reference VMM inside L2 (image built with MOLT_LAB_WITH_QEMU=1).
# qemu_args CPUS [MEM]: the same guest as molt's scenarios get, 256 MiB unless
# MEM says otherwise, serial on stdio. qboot instead of SeaBIOS: it is QEMU's
# fast-boot firmware, the fair comparison for a VMM that loads the kernel directly.
qemu_args() {
    echo "-enable-kvm -M pc -cpu host -smp $1 -m ${2:-256M} -nodefaults -no-user-config" \
        "-display none -serial stdio -no-reboot -bios /usr/share/qemu/qboot.rom" \
        "-kernel /lab/vmlinuz -initrd /lab/guest.cpio.gz"
}
