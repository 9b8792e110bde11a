# vfio-reboot: reboot mode (cpr-save, a new molt with --incoming file:) with
# QEMU's edu device passed through (--vfio), as in QEMU: the guest suspends
# to RAM (ACPI S3) first. The L3 guest drives edu through the labedu module
# and program (rootfs/tools/labedu/, labedu.c: ID, liveness, factorials, DMA
# both ways, an MSI per DMA). Then:
#   1. cpr-save while the guest runs is refused, saying how to suspend; the
#      guest and edu run on;
#   2. the guest suspends (mem_sleep deep, `echo mem > /sys/power/state`),
#      molt says state=suspended; cpr-save; the old molt exits and with it
#      its hold on edu;
#   3. a restart without --vfio is refused naming the device, the file left
#      as it is;
#   4. the restart with the same --vfio opens edu afresh; the guest stays
#      suspended until `wakeup`; it then resumes at its waking vector, its
#      PCI core writes edu's config space back and labedu's resume checks
#      it (dmesg "labedu: resumed"); every labedu check passes again.
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/edu.sh

SOCK=/run/molt.sock
STATE=/run/state
RAM=/dev/shm/ram

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi
t_start=$(now_ms)


edu_find
edu_to_vfio

set -- --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz --cmdline "$DEVICE_CMDLINE" \
    --serial stdio --mem 256M --mem-file "$RAM" --control "$SOCK"
rm -f "$RAM" "$STATE"
echo "LAB-INFO vfio-reboot: molt run $* --vfio $EDU"

if molt_boot /run/guest1.log --mem 256M --mem-file "$RAM" --control "$SOCK" --vfio "$EDU"; then
    gcheck labedu_module 60 "modprobe labedu"
    edu_checks 1 1
    gcheck deep_rc 30 "echo deep > /sys/power/mem_sleep"

    # 1. Not suspended: refused, saying how; nothing written, the guest runs on.
    r=$(molt ctl "$SOCK" cpr-save "$STATE" 2>&1)
    echo "LAB-INFO cpr-save while running: $r"
    case $r in
    "error: cpr-save: VFIO device $EDU: the guest is not suspended: "*"echo mem > /sys/power/state"*state=suspended*)
        check save_running_refused yes yes ;;
    *) check save_running_refused "$r" yes ;;
    esac
    check save_running_file "$([ -e "$STATE" ] && echo written || echo none)" none
    check save_running_state "$(status_field state)" running
    gcheck after_refusal_rc 60 "labedu 3 > /dev/null"

    # 2. Suspend; molt stops the vCPUs; save; the old molt exits.
    guest_cmd "dmesg | grep -c 'labedu: resumed' | sed 's/^/RESUMES /'" 30 >/dev/null
    check resumes_before "$(gval RESUMES)" 0
    echo "echo mem > /sys/power/state" >&3
    deadline=$(( $(now_ms) + 120000 ))
    while [ "$(status_field state)" != suspended ] && [ "$(now_ms)" -lt "$deadline" ] && alive "$VMM_PID"; do
        sleep 0.2
    done
    check suspended "$(status_field state)" suspended
    r=$(molt ctl "$SOCK" cpr-save "$STATE" 2>&1)
    echo "LAB-INFO cpr-save while suspended: $r"
    case $r in "ok saved "*) check save_reply ok ok ;; *) check save_reply "$r" ok ;; esac
    wait "$VMM_PID"
    check old_molt_exit $? 0
    dump_vmm guest1
    molt state "$STATE" 2>&1 | sed 's/^/LAB-INFO molt state: /'
    check state_lists_edu "$(molt state "$STATE" 2>&1 | grep -c "^vfio 0: *$EDU (1234:11e8) at PCI slot ")" 1

    # 3. The same arguments without --vfio: refused, naming edu; file intact.
    sum=$(sha256sum < "$STATE")
    molt run "$@" --incoming "file:$STATE" > /run/refused.out 2>&1
    check no_vfio_rc $? 1
    sed 's/^/LAB-INFO restart without --vfio: /' /run/refused.out
    check no_vfio_says_why "$(grep -c "saved $EDU (1234:11e8) at PCI slot [0-9]*, not on argv (--vfio $EDU)" /run/refused.out)" 1
    check state_unchanged "$([ "$(sha256sum < "$STATE")" = "$sum" ] && echo yes || echo no)" yes

    # 4. The restart: edu opened by name, the guest still suspended until wakeup.
    vmm_start /run/guest2.log molt run "$@" --vfio "$EDU" --incoming "file:$STATE"
    if wait_log "$VMM_LOG.err" 'resumed from' 120 "$VMM_PID"; then
        grep -E 'resumed from|VFIO device' "$VMM_LOG.err" | sed 's/^/LAB-INFO new molt: /'
        check restarted_state "$(status_field state)" suspended
        check restarted_bar0_mapped "$(grep -c "BAR 0, 0x100000 bytes at .*: 0x100000 bytes mapped into the guest" "$VMM_LOG.err")" 1
        bytes=$(wc -c < "$VMM_LOG")
        sleep 3
        check restarted_console_still "$([ "$(wc -c < "$VMM_LOG")" = "$bytes" ] && echo yes || echo no)" yes
        r=$(molt ctl "$SOCK" wakeup 2>&1)
        echo "LAB-INFO wakeup: $r"
        check wake_reply "$r" ok
        # The suspend command returns in the woken guest.
        if wait_count "$VMM_LOG" '^GUEST-DONE rc=' 1 180; then
            check wake_rc "$(grep '^GUEST-DONE rc=' "$VMM_LOG" | head -n 1 | tr -d '\r' | sed 's/^GUEST-DONE rc=//')" 0
        else
            fail wake_rc "the suspend command did not return within 180 s of wakeup"
        fi
        check wake_state "$(status_field state)" running
        guest_cmd "dmesg | grep 'labedu' | sed 's/^/KMSG /'" 30 >/dev/null
        gout KMSG | sed 's/^/LAB-INFO guest: /'
        check guest_driver_resumed "$(gout KMSG | grep -c 'labedu: resumed: id 0x10000ed')" 1
        edu_checks 2 2
        guest_cmd "cat /sys/power/suspend_stats/success | sed 's/^/SUSPENDS /'" 30 >/dev/null
        check guest_suspends "$(gval SUSPENDS)" 1
        guest_cmd "grep labedu /proc/interrupts | sed 's/^/IRQ /'" 30 >/dev/null
        result guest_edu_interrupts "$(gval IRQ | tr -s ' ')"
        guest_poweroff molt_exit
    else
        fail restarted "no 'resumed from' from the new molt"
        kill -9 "$VMM_PID" 2>/dev/null
    fi
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm guest
dmesg | grep -iE 'vfio|dmar' | tail -n 20 | sed 's/^/LAB-INFO L2 dmesg: /'
result lab_ms $(($(now_ms) - t_start))
lab_end
