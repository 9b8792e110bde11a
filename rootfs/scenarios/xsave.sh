# xsave: the XSAVE state a Linux guest of molt works with, on both vCPUs.
# The lab's L2 is QEMU TCG emulating SVM, which does not implement the XSETBV
# intercept: the guest's XSETBV goes straight to the emulated CPU, L2's KVM
# never learns the guest's XCR0 and puts back its own idea of it (the value
# the VMM gave it, 1 = x87 only after reset) on every VM entry. A guest then
# runs with XCR0 = 1: its context switches lose SSE/AVX registers, and
# CPUID(0xD,0).EBX (which KVM derives from that XCR0) disagrees with its
# kernel ("XSAVE consistency problem" at boot). molt sets XCR0 at vCPU
# creation to the components the guest is offered, which is what a Linux
# guest enables (on real hardware the guest's XSETBV is intercepted and
# overrides it anyway).
# Checks, under molt: XGETBV(0) on each vCPU equals the features the guest's
# kernel enabled, no XSAVE warning in its log, and SSE registers survive
# context switches (labxcr xmm). If the image has QEMU (MOLT_LAB_WITH_QEMU=1),
# the same guest under QEMU -cpu host is probed too, as a reference
# (informational: q_* results).
. /lab/lib/common.sh
. /lab/lib/devices.sh

XMM_SECS=${XMM_SECS:-10}

# xsave_probe P: run the probes in the guest on $VMM_LOG, report P_* results.
xsave_probe() {
    _p=$1
    guest_cmd 'for c in 0 1; do taskset -c $c labxcr info | sed "s/^/XCR$c /"; done' 60 >/dev/null
    guest_cmd 'dmesg | grep -o "Enabled xstate features 0x[0-9a-f]*" | sed "s/^/XEN /"; echo "XWARN $(dmesg | grep -c "XSAVE consistency problem")"; echo "XBADFPU $(dmesg | grep -c "Bad FPU state")"; grep -m1 "^flags" /proc/cpuinfo | grep -o -w -E "avx|avx2|xsave|xsaveopt|xsavec|xsaves" | tr "\n" " " | sed "s/^/XFLAGS /"; echo' 60 >/dev/null
    for _c in 0 1; do
        echo "LAB-INFO $_p cpu$_c labxcr info: $(gval XCR$_c)"
        result "${_p}_xcr0_cpu$_c" "$(field xcr0 "$(gval XCR$_c)")"
    done
    echo "LAB-INFO $_p guest cpuinfo flags: $(gval XFLAGS)"
    guest_cmd 'dmesg | grep -E "x86/fpu|XSAVE|xstate" | sed "s/^/XFPU /"' 60 >/dev/null
    gout XFPU | sed "s/^/LAB-INFO $_p guest dmesg: /"
    result "${_p}_cpuid_d0_ebx" "$(field d0_ebx "$(gval XCR0)")"
    result "${_p}_kernel_xfeatures" "$(gval XEN | sed 's/.* //')"
    result "${_p}_xsave_warnings" "$(gval XWARN)"
    result "${_p}_bad_fpu_state" "$(gval XBADFPU)"
    guest_cmd "labxcr xmm $XMM_SECS 2>&1 | sed 's/^/XMM /'" $((XMM_SECS + 60)) >/dev/null
    echo "LAB-INFO $_p labxcr xmm $XMM_SECS: $(gval XMM)"
    result "${_p}_xmm_rounds" "$(field rounds "$(gval XMM)")"
    result "${_p}_xmm_bad" "$(field bad "$(gval XMM)")"
}

# same_hex A B: yes if both are numbers and equal.
same_hex() { [ -n "$1" ] && [ -n "$2" ] && [ $(($1)) = $(($2)) ] && echo yes || echo no; }

t_start=$(now_ms)
if [ -x /lab/bin/molt ]; then
    if molt_boot /run/molt.log --cpus 2 --mem 256M; then
        xsave_probe m
        _want=$(gval XEN | sed 's/.* //')
        check m_xcr0_matches_kernel_cpu0 "$(same_hex "$(field xcr0 "$(gval XCR0)")" "$_want")" yes
        check m_xcr0_matches_kernel_cpu1 "$(same_hex "$(field xcr0 "$(gval XCR1)")" "$_want")" yes
        check m_xsave_consistent "$(gval XWARN)" 0
        check m_sse_survives_switches "$(field bad "$(gval XMM)")" 0
        guest_poweroff molt_exit
    else
        kill -9 "$VMM_PID" 2>/dev/null
    fi
    dump_vmm molt
else
    fail molt "binary missing"
fi

if command -v qemu-system-x86_64 >/dev/null; then
    . /lab/lib/qemu.sh
    vmm_start /run/qemu.log qemu-system-x86_64 $(qemu_args 2) -append "$GUEST_CMDLINE"
    if guest_ready "$VMM_LOG"; then
        xsave_probe q
    fi
    kill "$VMM_PID" 2>/dev/null
    wait_exit "$VMM_PID" 10
    dump_vmm qemu
fi
result lab_ms $(( $(now_ms) - t_start ))
lab_end
