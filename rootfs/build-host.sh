#!/usr/bin/env bash
# Build the L2 lab host initramfs: static busybox, /init (rootfs/host/init),
# kvm_amd / tun / loop / vfio / nvdimm modules, and under /lab/: molt, the guest
# kernel and initramfs, the scenarios, the labtime, labio, labcpr and labtcp
# helpers, labvfio and molt-upgrade.
# Usage: rootfs/build-host.sh OUT.cpio.gz
# Environment:
#   MOLT_BIN            molt binary (default: the static release build)
#   MOLT_GUEST_INITRD   prebuilt guest initramfs (default: build one here)
#   MOLT_NEXT_BIN       a second molt build (another MOLT_BUILD_VERSION), put in
#                       as /lab/bin/molt-next for the version-switching scenarios
#   MOLT_LAB_WITH_QEMU  1: also add QEMU 7.2 + its libraries and ROMs (bench only;
#                       it makes the image several times larger)
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 OUT.cpio.gz" >&2; exit 2; }
out=$(realpath -m "$1")

. "$(dirname "$0")/lib.sh"
lab_kernel_env

repo=$REPO_DIR
. "$REPO_DIR/scripts/target.sh"
molt=${MOLT_BIN:-$MOLT_RELEASE_BIN}

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

ir_skeleton "$root"
install -m 755 "$ROOTFS_DIR/host/init" "$root/init"
# kvm_amd pulls kvm and irqbypass; vfio_pci pulls vfio, vfio_iommu_type1,
# vfio_virqfd and vfio-pci-core; nd_* pull libnvdimm. loop: the disk scenario
# checks a guest's image by mounting it in L2. uio_pci_generic: the vfio-edu
# scenario binds edu to another driver than vfio-pci, which molt must refuse.
ir_modules "$root" kvm_amd tun loop vfio vfio_pci vfio_iommu_type1 nd_pmem nd_e820 uio_pci_generic

mkdir -p "$root/lab/bin" "$root/lab/scenarios" "$root/lab/lib"
if [[ -f $molt ]]; then
    # The lab has no libc: a dynamic molt would fail with a confusing ENOENT.
    file_is_static "$molt" || { echo "$molt is not statically linked" >&2; exit 1; }
    install -m 755 "$molt" "$root/lab/bin/molt"
else
    # Lets the `smoke` scenario run before molt builds; molt scenarios fail
    # with "molt binary missing".
    echo "warning: no molt binary at $molt" >&2
fi
if [[ -n ${MOLT_NEXT_BIN:-} ]]; then
    file_is_static "$MOLT_NEXT_BIN" || { echo "$MOLT_NEXT_BIN is not statically linked" >&2; exit 1; }
    install -m 755 "$MOLT_NEXT_BIN" "$root/lab/bin/molt-next"
fi
# Timestamps with microsecond resolution (busybox date has no %N).
gcc -static -O2 -o "$root/lab/bin/labtime" "$ROOTFS_DIR/tools/labtime.c"
# TCP transfers and O_DIRECT disk timing (the guest image has it too).
gcc -static -O2 -o "$root/lab/bin/labio" "$ROOTFS_DIR/tools/labio.c"
# Live update: stamping and checking the guest's workload, the TCP peer, and
# the host-kernel update script (scripts/molt-upgrade.sh).
gcc -static -O2 -o "$root/lab/bin/labcpr" "$ROOTFS_DIR/tools/labcpr.c"
gcc -static -O2 -o "$root/lab/bin/labtcp" "$ROOTFS_DIR/tools/labtcp.c"
# Blackout benchmark: the UDP receiver (scripts/bench-blackout.sh).
gcc -static -O2 -o "$root/lab/bin/labudp" "$ROOTFS_DIR/tools/labudp.c"
# One idle VM held for L2's lifetime: guests' VMs then patch no kernel code.
gcc -static -O2 -o "$root/lab/bin/labkvmhold" "$ROOTFS_DIR/tools/labkvmhold.c"
# VFIO: can a new process, or an exec, take over DMA mappings (vfio-kernel).
gcc -static -O2 -o "$root/lab/bin/labvfio" "$ROOTFS_DIR/tools/labvfio.c"
install -m 755 "$REPO_DIR/scripts/molt-upgrade.sh" "$root/lab/bin/molt-upgrade"

cp "$MOLT_LAB_VMLINUZ" "$root/lab/vmlinuz"
if [[ -n ${MOLT_GUEST_INITRD:-} ]]; then
    cp "$MOLT_GUEST_INITRD" "$root/lab/guest.cpio.gz"
else
    "$ROOTFS_DIR/build-guest.sh" "$root/lab/guest.cpio.gz"
fi
cp "$ROOTFS_DIR"/scenarios/*.sh "$root/lab/scenarios/"
cp "$ROOTFS_DIR"/scenarios/lib/*.sh "$root/lab/lib/"

if [[ ${MOLT_LAB_WITH_QEMU:-0} == 1 ]]; then
    # The reference VMM for bench-boot. Binary and libraries keep their host
    # paths: the loader finds the libraries without configuration, and QEMU
    # finds its ROMs in /usr/share/qemu (it looks relative to its own path).
    qemu=$(command -v qemu-system-x86_64)
    install -D -m 755 "$qemu" "$root$qemu"
    ldd "$qemu" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    # qboot as firmware; -kernel on -M pc also wants the linuxboot option ROM.
    mkdir -p "$root/usr/share/qemu"
    for rom in qboot.rom linuxboot_dma.bin linuxboot.bin kvmvapic.bin; do
        cp -L "/usr/share/qemu/$rom" "$root/usr/share/qemu/"
    done
fi

ir_pack "$root" "$out"
echo "host initramfs: $out ($(du -h "$out" | cut -f1))"
