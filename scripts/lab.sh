#!/usr/bin/env bash
# Run one lab scenario: build (or reuse) the initramfs images, boot the L2 lab
# host under QEMU TCG with emulated AMD SVM (see shared/LAB.md), tee its console
# to target/lab/SCENARIO.log, and pass only if the scenario printed
# `LAB-END status=pass`.
#
# Usage: scripts/lab.sh SCENARIO [--keep]
#   --keep   leave L2 running with a shell on the console after the scenario
#            (interactive; no timeout)
# Environment:
#   MOLT_LAB_TIMEOUT    overall limit in seconds (default: the scenario's
#                       `# lab-timeout: SECONDS` line, else 600)
#   MOLT_LAB_SMP        L2 vCPUs (default 2: MTTCG runs them on both host cores)
#   MOLT_LAB_APPEND     extra L2 kernel arguments (e.g. memmap=64M!1G), after
#                       the scenario's own (its `# lab-append: ARGS` line)
#   MOLT_LAB_WITH_QEMU  1: put QEMU into the L2 image too (for bench-boot)
#   (a scenario with a `# lab-needs: molt-next` line also gets /lab/bin/molt-next:
#   the same source built with MOLT_BUILD_VERSION=lab-next and the test-hooks
#   feature (src/cpr/fault.rs) into target/lab-next, a second version to update
#   to)
#   MOLT_BIN            molt binary (default: the static release build, which is
#                       rebuilt first with `cargo build --release`)
#   MOLT_LAB_CACHE      kernel download cache (default ~/.cache/molt-lab)
#   MOLT_LAB_KERNEL     the Debian kernel for L2 and L3 (scripts/lab-kernel.sh):
#                       cloud-amd64 (default, 6.1) or 6.12-cloud-amd64; default
#                       for a scenario that needs another: its
#                       `# lab-kernel: NAME` line (prefault: KVM_PRE_FAULT_MEMORY)
#   MOLT_LAB_LOCKUP_S   stop the lab once an L2 CPU has been stuck in kernel
#                       mode this long (default 45; scripts/lab-watch.sh)
#   MOLT_LAB_SILENT_S   ... or once L2's heartbeat has stopped this long (90)
# Packages: qemu-system-x86 busybox-static cpio kmod gcc libc6-dev binutils
#           (util-linux's flock and coreutils' timeout are in every Debian)
set -euo pipefail

usage() { echo "usage: $0 SCENARIO [--keep]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
scenario=$1; shift
keep=0
for arg in "$@"; do
    case $arg in --keep) keep=1 ;; *) usage ;; esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -f $repo/rootfs/scenarios/$scenario.sh ]] || {
    echo "lab: no scenario $scenario (rootfs/scenarios/*.sh)" >&2; exit 2; }
work=$repo/target/lab
mkdir -p "$work"
scenario_timeout=$(sed -n 's/^# lab-timeout: \([0-9][0-9]*\)$/\1/p' "$repo/rootfs/scenarios/$scenario.sh")
timeout_s=${MOLT_LAB_TIMEOUT:-${scenario_timeout:-600}}
smp=${MOLT_LAB_SMP:-2}
with_qemu=${MOLT_LAB_WITH_QEMU:-0}
scenario_kernel=$(sed -n 's/^# lab-kernel: \([0-9a-z.-]*\)$/\1/p' "$repo/rootfs/scenarios/$scenario.sh")
[[ -n $scenario_kernel ]] && export MOLT_LAB_KERNEL=${MOLT_LAB_KERNEL:-$scenario_kernel}
with_next=0
if grep -q '^# lab-needs:.*molt-next' "$repo/rootfs/scenarios/$scenario.sh"; then with_next=1; fi

# Parallel runs share the kernel cache and the images: one fetches and builds,
# the others wait and reuse.
exec 9>"$work/.build.lock"
flock 9

eval "$("$repo/scripts/lab-kernel.sh")"

# molt: an explicit MOLT_BIN is used as given; otherwise the release build is
# brought up to date (a no-op under `cargo test --release`, which built it), so
# the lab never tests a stale binary. A failed build still lets `smoke` run.
. "$repo/scripts/target.sh"
if [[ -z ${MOLT_BIN:-} ]]; then
    export MOLT_BIN=$MOLT_RELEASE_BIN
    (cd "$repo" && cargo build --release --quiet) || echo "lab: warning: molt did not build" >&2
fi
# The second version, only for the scenarios that need it; its own target
# directory keeps both builds incremental (cargo tracks the variable).
unset MOLT_NEXT_BIN
if [[ $with_next == 1 ]]; then
    export MOLT_NEXT_BIN=$repo/target/lab-next/$MOLT_TARGET/release/molt
    (cd "$repo" && MOLT_BUILD_VERSION=lab-next cargo build --release --quiet --features test-hooks --target-dir target/lab-next) ||
        echo "lab: warning: molt-next did not build" >&2
fi

# Rebuild the images only when an input changed: kernel, rootfs/ sources,
# molt, and whether QEMU is included. A build takes ~5 s, an L2 boot ~5 s more;
# repeated test runs add up.
inputs_hash() {
    {
        echo "$MOLT_LAB_KVER with_qemu=$with_qemu with_next=$with_next"
        (cd "$repo" && find rootfs scripts/lab-kernel.sh scripts/molt-upgrade.sh -type f | LC_ALL=C sort | xargs sha256sum)
        [[ -f $MOLT_BIN ]] && sha256sum "$MOLT_BIN" || echo "no molt"
        [[ $with_qemu == 1 ]] && sha256sum "$(command -v qemu-system-x86_64)"
        [[ $with_next == 1 && -f $MOLT_NEXT_BIN ]] && sha256sum "$MOLT_NEXT_BIN"
        true
    } | sha256sum | cut -d' ' -f1
}
suffix=; [[ $with_qemu == 1 ]] && suffix=-qemu
[[ $with_next == 1 ]] && suffix+=-next
# Another kernel than the default gets its own images (host-6.12-cloud-amd64...),
# so switching kernels rebuilds nothing and leaves the default's untouched.
ksuffix=; [[ ${MOLT_LAB_KERNEL:-cloud-amd64} != cloud-amd64 ]] && ksuffix=-$MOLT_LAB_KERNEL
guest_img=$work/guest$ksuffix.cpio.gz
host_img=$work/host$suffix$ksuffix.cpio.gz
stamp=$host_img.inputs
hash=$(inputs_hash)
if [[ -f $host_img && -f $stamp && $(cat "$stamp") == "$hash" ]]; then
    echo "lab: reusing $host_img"
else
    rm -f "$stamp"
    "$repo/rootfs/build-guest.sh" "$guest_img"
    MOLT_GUEST_INITRD=$guest_img MOLT_LAB_WITH_QEMU=$with_qemu \
        "$repo/rootfs/build-host.sh" "$host_img"
    echo "$hash" > "$stamp"
fi
flock -u 9

# no_timer_check: L2's boot-time check that the timer interrupt arrives
# through the IO-APIC fails when L1 starves QEMU ("timer doesn't work through
# Interrupt-remapped IO-APIC", a panic seen with both host cores busy); Linux
# skips it on KVM guests for the same reason.
append="console=ttyS0 panic=-1 intel_iommu=on iommu=pt quiet no_timer_check molt.scenario=$scenario"
[[ $keep == 1 ]] && append+=" molt.keep=1"
# A scenario that needs L2 kernel arguments (e.g. memmap= for persistent
# memory) names them in a `# lab-append: ARGS` line.
scenario_append=$(sed -n 's/^# lab-append: //p' "$repo/rootfs/scenarios/$scenario.sh")
[[ -n $scenario_append ]] && append+=" $scenario_append"
[[ -n ${MOLT_LAB_APPEND:-} ]] && append+=" $MOLT_LAB_APPEND"

# EPYC-v3 gives SVM, so kvm_amd loads inside; intel-iommu makes IOMMU groups
# for VFIO; edu is the passthrough test device. -nic none: L2 needs no network
# (taps are made inside it) and the default NIC's iPXE ROM only costs boot time.
qemu=(qemu-system-x86_64 -accel tcg -machine q35 -cpu EPYC-v3 -smp "$smp" -m 3G
      -nographic -no-reboot -device intel-iommu -device edu -nic none
      -kernel "$MOLT_LAB_VMLINUZ" -initrd "$host_img" -append "$append")

log=$work/$scenario.log
pidfile=$work/$scenario.qemu.pid
# L2's heartbeat: its second serial port (COM2), a line every 5 s. Naming
# one serial port names both: the first stays -nographic's console.
heartbeat=$work/$scenario.heartbeat
rm -f "$pidfile" "$heartbeat"
qemu+=(-pidfile "$pidfile" -serial mon:stdio -serial "file:$heartbeat")
# TCG prints one line per EPYC feature it cannot emulate, per vCPU: noise.
quiet_tcg() { grep --line-buffered -v "TCG doesn't support requested feature"; }
# L2 itself locking up ends the run at once, with the reason (lab-watch.sh).
watch_l2() {
    "$repo/scripts/lab-watch.sh" "$pidfile" "${MOLT_LAB_LOCKUP_S:-45}" "$heartbeat" "${MOLT_LAB_SILENT_S:-90}"
}
start=$(date +%s%N)
if [[ $keep == 1 ]]; then
    "${qemu[@]}" 2>&1 | tee "$log" || true
else
    # No stdin: under CI there is none, and a terminal would be left in raw mode
    # if QEMU is killed by the timeout.
    timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null 2>&1 | quiet_tcg | watch_l2 | tee "$log" || true
fi
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
rm -f "$pidfile" "$heartbeat"

echo "lab: $scenario finished in ${elapsed_ms} ms (smp=$smp), log $log"
if grep -q 'LAB-END status=pass' "$log"; then
    echo "lab: $scenario PASS"
    exit 0
fi
# Say why when it is the lab host (L2) that failed rather than the scenario:
# L2's own kernel lines are the unprefixed `[ time] ...` ones (guest consoles
# are dumped with a prefix).
l2_panic='^\[ *[0-9]+\.[0-9]+\] Kernel panic - not syncing'
emulation_failed=0
if grep -q '^LAB-L2-HUNG' "$log"; then
    emulation_failed=1
    echo "lab: the lab host (L2) hung, QEMU stopped: $(grep -m1 '^LAB-L2-HUNG' "$log" | cut -d' ' -f2-)"
    grep -q 'soft lockup' "$log" && echo "lab: L2's stacks of its stuck CPUs are in $log (after 'soft lockup')"
elif grep -qE "$l2_panic" "$log"; then
    emulation_failed=1
    echo "lab: the lab host (L2) kernel panicked: $(grep -m1 -E "$l2_panic" "$log" | tr -d '\r' | sed 's/.*not syncing: //')"
elif grep -q '^LAB-EMULATION-FAULT' "$log"; then
    emulation_failed=1
    echo "lab: $(grep -m1 '^LAB-EMULATION-FAULT' "$log" | cut -d' ' -f2- | tr -d '\r')"
elif ! grep -q 'LAB-END' "$log"; then
    echo "lab: no LAB-END seen (timeout ${timeout_s}s or crash)"
fi
echo "lab: $scenario FAIL"
# 3: QEMU TCG's emulation failed - the lab host's own kernel (L2), or a guest
# on the instruction KVM had just entered it at (L2's init says so) - not the
# scenario; tests/lab.rs runs such a scenario again, and says so.
[[ $emulation_failed == 1 ]] && exit 3
exit 1
