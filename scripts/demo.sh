#!/usr/bin/env bash
# molt's main job, end to end: boot a stock Debian kernel as a guest with a disk
# and a NIC, and live-update it while it works - exec into a second build,
# transfer to a new process, save and restart - with a counter, disk records
# and a TCP stream running (the tour: rootfs/scenarios/demo.sh).
#
# Where the host's KVM can run Linux (kvm_intel or kvm_amd), the tour runs
# right here (as root, through sudo if need be: it makes a tap and mounts the
# guest's disk image), and then molt boots the guest again with the console on
# this terminal: type commands to the guest, `poweroff` to end. Where it cannot
# (a paravirtual KVM such as kvm_pvm, or no KVM), the same tour runs inside the
# nested lab (scripts/lab.sh, shared/LAB.md).
#
# Environment:
#   MOLT_DEMO   auto (default), direct (the tour on this host's KVM) or lab
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
repo=$PWD
. scripts/target.sh
cargo build --release

where=${MOLT_DEMO:-auto}
if [[ $where == auto ]]; then
    where=lab
    if [[ -e /dev/kvm && ( -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ) && ! -d /sys/module/kvm_pvm ]]; then
        where=direct
    fi
fi
# The tour's lines, any failed check, and the verdict.
shown() { grep --line-buffered -E '^(DEMO|LAB-CHECK-FAIL|LAB-END|lab: )'; }

case $where in
lab)
    echo "demo: this host's KVM cannot run Linux guests; running in the nested lab"
    echo "demo: (the lab host boots under software emulation: about 2 minutes)"
    scripts/lab.sh demo | shown
    exit
    ;;
direct) ;;
*) echo "demo: MOLT_DEMO is auto, direct or lab, not '$where'" >&2; exit 2 ;;
esac

# The tour on this host: L2's /lab laid out under target/demo/lab - molt, the
# second build (as scripts/lab.sh builds it), the tour's helpers and tools, the
# guest kernel and initramfs.
eval "$(scripts/lab-kernel.sh)"
MOLT_BUILD_VERSION=lab-next cargo build --release --quiet --features test-hooks --target-dir target/lab-next
work=$repo/target/demo
lab=$work/lab
mkdir -p "$lab/bin"
rootfs/build-guest.sh "$lab/guest.cpio.gz" >/dev/null
ln -sfn "$MOLT_LAB_VMLINUZ" "$lab/vmlinuz"
ln -sfn "$repo/rootfs/scenarios/lib" "$lab/lib"
ln -sfn "$MOLT_RELEASE_BIN" "$lab/bin/molt"
ln -sfn "$repo/target/lab-next/$MOLT_TARGET/release/molt" "$lab/bin/molt-next"
for tool in labtime labcpr labtcp; do
    gcc -O2 -o "$lab/bin/$tool" "rootfs/tools/$tool.c"
done
sudo=()
if [[ $EUID != 0 ]]; then
    echo "demo: the tour makes a tap and mounts the guest's disk image: it runs as root (sudo)"
    sudo=(sudo)
fi
# Made by root: a transfer refuses a socket in a directory another uid owns.
run=$("${sudo[@]}" mktemp -d /tmp/molt-demo.XXXXXX)
ram=/dev/shm/molt-demo-$$.ram
had_tap=0; [[ -d /sys/class/net/molt0 ]] && had_tap=1
cleanup() {
    "${sudo[@]}" rm -rf "$run" "$ram"
    [[ $had_tap == 1 ]] || "${sudo[@]}" ip link del molt0 2>/dev/null || true
}
trap cleanup EXIT
# Ctrl-C reaches the tour and its molts too (one process group); then clean up.
trap 'exit 130' INT TERM
echo "demo: the live-update tour on this host's KVM (log: $work/tour.log)"
"${sudo[@]}" env PATH="$lab/bin:$PATH" LAB_DIR="$lab" RUN_DIR="$run" DEMO_RAM="$ram" \
    sh rootfs/scenarios/demo.sh 2>&1 | tee "$work/tour.log" | shown || true
grep -q 'LAB-END status=pass' "$work/tour.log" || { echo "demo: the tour failed: see $work/tour.log"; exit 1; }
cleanup
trap - EXIT INT TERM

# The console, handed to the user: the same guest, booted again on this terminal.
[[ -f $work/disk.img ]] || truncate -s 64M "$work/disk.img"
echo "demo: now the guest is yours: its console is this terminal; type 'poweroff' to end"
echo "demo: (from another terminal: $MOLT_RELEASE_BIN ctl $work/molt.sock status, cpr-exec, ...)"
exec "$MOLT_RELEASE_BIN" run \
    --kernel "$MOLT_LAB_VMLINUZ" --initrd "$lab/guest.cpio.gz" \
    --cmdline "console=ttyS0 panic=-1 quiet" --cpus 2 --mem 512M \
    --disk "$work/disk.img" --control "$work/molt.sock"
