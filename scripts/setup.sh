#!/usr/bin/env bash
# Installs what building, testing and the nested lab need on a fresh Debian
# machine (as root), then fetches the Debian kernel the lab boots. Idempotent:
# packages already present are not reinstalled, the kernel download is cached.
#
#   qemu-system-x86  the L2 lab host under TCG, and QEMU 7.2 as bench reference
#   busybox-static   userland of both initramfs images
#   cpio kmod        packing images; depmod/modprobe for module dependencies
#   gcc libc6-dev    the static labtime helper (rootfs/tools/labtime.c)
#   make             the guest's edu test module (rootfs/tools/labedu/)
#   binutils file    readelf/file: checking that molt is statically linked
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 busybox-static cpio kmod gcc libc6-dev make binutils file)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# molt's release build targets musl (.cargo/config.toml); where rustup cannot
# add the target, scripts/target.sh falls back to static glibc and says so.
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 ||
        echo "setup: rustup could not add the musl target; molt will be static glibc" >&2
fi

# Kernel for both lab levels, and its headers for the guest's test module
# (cached under ~/.cache/molt-lab); and 6.12, which the prefault scenario
# runs on (`# lab-kernel:`).
for kernel in cloud-amd64 6.12-cloud-amd64; do
    MOLT_LAB_KERNEL=$kernel scripts/lab-kernel.sh >/dev/null
    MOLT_LAB_KERNEL=$kernel scripts/lab-kernel-headers.sh >/dev/null
done
