# s3: ACPI S3 suspend to RAM and `wakeup`, with a virtio disk and NIC on 2
# vCPUs. The guest offers `mem`; `echo mem > /sys/power/state` reaches molt's
# PM1a control register with the S3 sleep type; molt stops the vCPUs and
# reports state=suspended; nothing runs until `wakeup`, which enters the
# waking vector the guest left in the FACS (real mode, Linux's wakeup
# trampoline). Twice: once plainly, once with a reboot-mode update in between
# (cpr-save, a new molt with --incoming, still suspended). After each wake the
# guest reads back what it wrote before, writes more, and pings L2; at the end
# L2 reads the files from the image.
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/cpr.sh

IMG=/tmp/disk.img
STATE=/run/state
SUSPEND="echo mem > /sys/power/state"

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi
t_start=$(now_ms)


# suspend NAME: the guest suspends (its command blocks until it is woken);
# waits for molt's state=suspended and checks the console stays still.
suspend() {
    _done=$(count "$VMM_LOG" '^GUEST-DONE rc=')
    echo "$SUSPEND" >&3
    _deadline=$(( $(now_ms) + 120000 ))
    while [ "$(status_field state)" != suspended ]; do
        if [ "$(now_ms)" -ge "$_deadline" ] || ! alive "$VMM_PID"; then
            fail "$1" "no state=suspended within 120 s (status: $(molt ctl "$SOCK" status 2>&1))"
            return 1
        fi
        sleep 0.2
    done
    check "$1" suspended suspended
    # The console output of the suspend itself (if any) has left by now.
    sleep 1
    _bytes=$(wc -c < "$VMM_LOG")
    sleep 3
    check "${1}_console_still" "$([ "$(wc -c < "$VMM_LOG")" = "$_bytes" ] && echo yes || echo no)" yes
    check "${1}_no_done" "$([ "$(count "$VMM_LOG" '^GUEST-DONE rc=')" = "$_done" ] && echo yes || echo no)" yes
}

# wake NAME: `wakeup`; the guest's suspend command returns 0.
wake() {
    _done=$(count "$VMM_LOG" '^GUEST-DONE rc=')
    _reply=$(molt ctl "$SOCK" wakeup 2>&1)
    echo "LAB-INFO wakeup: $_reply"
    check "${1}_reply" "$_reply" ok
    if ! wait_count "$VMM_LOG" '^GUEST-DONE rc=' $((_done + 1)) 180; then
        fail "${1}_rc" "the suspend command did not return within 180 s of wakeup"
        return 1
    fi
    check "${1}_rc" "$(grep '^GUEST-DONE rc=' "$VMM_LOG" | tail -n 1 | tr -d '\r' | sed 's/^GUEST-DONE rc=//')" 0
    check "${1}_state" "$(status_field state)" running
    grep -m1 'woken from ACPI S3' "$VMM_LOG.err" | sed 's/^/LAB-INFO /'
}

# after_wake N: the files written before are intact, file N is written, the
# network works both ways.
after_wake() {
    gcheck "read${1}_rc" 120 "cd /mnt && sha256sum -c sums >/dev/null"
    gcheck "write${1}_rc" 120 "head -c 1048576 /dev/urandom > /mnt/f$1 && cd /mnt && sha256sum f$1 >> sums && sync"
    guest_cmd "ping -c 3 -W 5 $HOST_IP 2>&1 | sed 's/^/PING$1 /'" 60 >/dev/null
    check "ping${1}_guest_to_host" "$(gout "PING$1" | received)" 3
    check "ping${1}_host_to_guest" "$(ping -c 3 -W 5 "$GUEST_IP" 2>&1 | received)" 3
}

if cpr_tap_up; then check tap yes yes; else check tap no yes; fi
truncate -s 64M "$IMG"
rm -f /dev/shm/ram
run_args --mem-file /dev/shm/ram --disk "$IMG" --net "tap=$TAP,mac=$GUEST_MAC" > /run/argv
set --
while IFS= read -r a; do set -- "$@" "$a"; done < /run/argv
echo "LAB-INFO s3: molt run $*"

vmm_start /run/guest1.log molt run "$@"
if guest_ready "$VMM_LOG"; then
    check guest_cpus "$GUEST_CPUS" 2
    guest_cmd 'echo "PMSTATE $(cat /sys/power/state)"; echo "MEMSLEEP $(cat /sys/power/mem_sleep)"' 30 >/dev/null
    echo "LAB-INFO /sys/power/state: $(gval PMSTATE); mem_sleep: $(gval MEMSLEEP)"
    check offers_mem "$(gval PMSTATE | tr ' ' '\n' | grep -c '^mem$')" 1
    check offers_deep "$(gval MEMSLEEP | tr ' ' '\n' | grep -c 'deep')" 1
    gcheck deep_rc 30 "echo deep > /sys/power/mem_sleep"
    guest_net_up guest_ip_rc
    gcheck mkfs_rc 120 "mke2fs -F /dev/vda >/dev/null 2>&1 && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt"
    gcheck write0_rc 120 "head -c 1048576 /dev/urandom > /mnt/f0 && cd /mnt && sha256sum f0 > sums && sync"

    # 1. Suspend and wake, one molt.
    if suspend suspended1 && wake wake1; then
        after_wake 1
    fi

    # 2. Suspend, reboot-mode update, still suspended, wake in the new molt.
    if suspend suspended2; then
        cpr_save "$STATE"
        dump_vmm guest1
        vmm_start /run/guest2.log molt run "$@" --incoming "file:$STATE"
        if wait_log "$VMM_LOG.err" 'resumed from' 120 "$VMM_PID"; then
            check restarted_state "$(status_field state)" suspended
            _bytes=$(wc -c < "$VMM_LOG")
            sleep 3
            check restarted_console_still "$([ "$(wc -c < "$VMM_LOG")" = "$_bytes" ] && echo yes || echo no)" yes
            if wake wake2; then
                after_wake 2
            fi
        else
            fail restarted "no 'resumed from' from the new molt"
        fi
    fi
    guest_cmd "cat /sys/power/suspend_stats/success | sed 's/^/SUSPENDS /'" 30 >/dev/null
    check guest_suspends "$(gval SUSPENDS)" 2
    guest_cmd "dmesg | grep -E 'PM: |ACPI: PM|Low-level' | sed 's/^/PMLOG /'" 30 >/dev/null
    gout PMLOG | sed 's/^/LAB-INFO guest: /'
    check low_level_resumes "$(gout PMLOG | grep -c 'Low-level resume complete')" 2
    # The tables molt gives (FADT with PM1 blocks and a FACS, DSDT with \_S3_)
    # draw no complaint from ACPICA ("ACPI Error:", "ACPI BIOS Warning (bug):")
    # or the kernel ("[Firmware Bug]:").
    guest_cmd "dmesg | grep -E 'ACPI (BIOS )?(Error|Warning)|Firmware Bug' | sed 's/^/ACPILOG /'" 30 >/dev/null
    gout ACPILOG | sed 's/^/LAB-INFO guest: /'
    check acpi_complaints "$(gout ACPILOG | wc -l)" 0
    guest_dmesg_clean dmesg_errors
    gcheck umount_rc 60 "umount /mnt"
    guest_poweroff molt_exit
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm guest

# L2 reads the image: every file written before and after the wakes, intact.
modprobe loop 2>/dev/null
mkdir -p /mnt/img
if mount -o ro -t ext4 "$IMG" /mnt/img 2>/dev/null; then
    check image_files "$(cd /mnt/img && sha256sum -c sums 2>/dev/null | grep -c ': OK$')" 3
    umount -d /mnt/img
else
    fail image_files "L2 cannot mount the image"
fi
result lab_ms $(( $(now_ms) - t_start ))
lab_end
