#!/usr/bin/env bash
# molt's main job, end to end: boot a stock Debian kernel as a guest with a disk
# and a NIC, and drive it through the control pipe.
#
# Where the host's KVM can run Linux (kvm_intel or kvm_amd), molt runs right
# here with the console on this terminal: type commands to the guest, `poweroff`
# to end. Where it cannot (a paravirtual KVM such as kvm_pvm, or no KVM), the
# same guest runs inside the nested lab (scripts/lab.sh, shared/LAB.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
repo=$PWD
. scripts/target.sh
cargo build --release

if [[ -e /dev/kvm && ( -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ) && ! -d /sys/module/kvm_pvm ]]; then
    eval "$(scripts/lab-kernel.sh)"
    work=target/demo
    mkdir -p "$work"
    rootfs/build-guest.sh "$work/guest.cpio.gz" >/dev/null
    [[ -f $work/disk.img ]] || truncate -s 64M "$work/disk.img"
    echo "demo: booting directly on this host's KVM; type 'poweroff' to end"
    exec "$MOLT_RELEASE_BIN" run \
        --kernel "$MOLT_LAB_VMLINUZ" --initrd "$work/guest.cpio.gz" \
        --cmdline "console=ttyS0 panic=-1 quiet" --cpus 2 --mem 512M \
        --disk "$work/disk.img" --control "$work/molt.sock"
fi
echo "demo: this host's KVM cannot run Linux guests; running in the nested lab"
scripts/lab.sh demo | grep --line-buffered -E '^(DEMO|guest\||LAB-)' 
