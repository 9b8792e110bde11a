#!/usr/bin/env bash
# Build the L3 guest initramfs: static busybox, /init (rootfs/guest/init), the
# virtio modules with their dependencies, from the lab kernel package, the
# labio helper (rootfs/tools/labio.c) for the device scenarios, labxcr
# (rootfs/tools/labxcr.c) for the xsave scenario, the live-update workload
# (rootfs/guest/workload with labcpr.c and labtcp.c), and for the VFIO
# scenarios the edu driver module (rootfs/tools/labedu/, built against the lab
# kernel's headers: scripts/lab-kernel-headers.sh) with its test (labedu.c).
# Usage: rootfs/build-guest.sh OUT.cpio.gz
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 OUT.cpio.gz" >&2; exit 2; }
out=$(realpath -m "$1")

. "$(dirname "$0")/lib.sh"
lab_kernel_env

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

ir_skeleton "$root"
install -m 755 "$ROOTFS_DIR/guest/init" "$root/init"
# ext4 is built into the cloud kernel; ir_modules skips builtins, so listing it
# keeps the image right for a kernel where it is modular.
ir_modules "$root" virtio_pci virtio_blk virtio_net ext4
# /usr/bin: on the kernel's default PATH for init.
gcc -static -O2 -o "$root/usr/bin/labio" "$ROOTFS_DIR/tools/labio.c"
gcc -static -O2 -o "$root/usr/bin/labcpr" "$ROOTFS_DIR/tools/labcpr.c"
gcc -static -O2 -o "$root/usr/bin/labtcp" "$ROOTFS_DIR/tools/labtcp.c"
# The blackout benchmark's sender (scripts/bench-blackout.sh).
gcc -static -O2 -o "$root/usr/bin/labudp" "$ROOTFS_DIR/tools/labudp.c"
# XCR0, the XSAVE CPUID leaf and an SSE context-switch check (the xsave scenario).
gcc -static -O2 -o "$root/usr/bin/labxcr" "$ROOTFS_DIR/tools/labxcr.c"
install -m 755 "$ROOTFS_DIR/guest/workload" "$root/usr/bin/workload"
# edu behind molt's --vfio: the module binds it and handles its MSI, labedu
# runs the checks (the vfio-edu scenario).
eval "$("$REPO_DIR/scripts/lab-kernel-headers.sh")"
kmod=$(mktemp -d)
cp "$ROOTFS_DIR"/tools/labedu/labedu.c "$ROOTFS_DIR"/tools/labedu/Kbuild "$kmod/"
# No BTF for a test module: 6.12's headers ship a vmlinux to generate it
# against, which needs pahole (6.1's have none and skip it anyway).
make -s -C "$MOLT_LAB_KBUILD" O="$MOLT_LAB_KOUT" M="$kmod" CONFIG_DEBUG_INFO_BTF_MODULES= modules >&2 || true
[[ -f $kmod/labedu.ko ]] || { echo "labedu.ko did not build" >&2; rm -rf "$kmod"; exit 1; }
install -D -m 644 "$kmod/labedu.ko" "$root/lib/modules/$MOLT_LAB_KVER/extra/labedu.ko"
rm -rf "$kmod"
depmod -b "$root" "$MOLT_LAB_KVER"
gcc -static -O2 -o "$root/usr/bin/labedu" "$ROOTFS_DIR/tools/labedu.c"
ir_pack "$root" "$out"
echo "guest initramfs: $out ($(du -h "$out" | cut -f1))"
