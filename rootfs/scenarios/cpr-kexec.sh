# cpr-kexec: a host-kernel switch under a running guest (reboot mode through
# kexec). L2 gets two persistent-memory regions (the lab-append line below;
# lab.sh adds it to L2's command line): one holds guest RAM (--mem-file
# /dev/pmemN), the other an ext filesystem at /pm with the disk image, molt's
# argv, the state and the logs.
# Stage 1: boot the guest with 2 vCPUs, a disk and a NIC, run the CPR workload,
# then molt-upgrade: cpr-save, kexec into the same kernel with the running
# root as initramfs and molt.env.STAGE=2 on the command line.
# Stage 2 (host/init runs this script again with STAGE=2): molt-upgrade resume
# restarts molt with --incoming; the counter and the records must continue;
# the L2 end of the TCP connection died with the old kernel, so the guest must
# reconnect to the new server (tcp_after_kexec=reconnected).
# Pause: count_gap_ms is the guest-visible pause on L2's TSC, which runs on
# across the kexec; kexec_ms the part from molt-upgrade's kexec to its resume
# in the new kernel; pause_without_kexec_ms the rest. molt's pause_us spans the
# kexec on CLOCK_REALTIME, which the new kernel sets from the RTC (1 s steps).
# lab-append: memmap=256M!1G memmap=128M!1536M
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/cpr.sh

PM=/pm
STATE=$PM/state
ARGV=$PM/argv
JOURNAL=$PM/state.journal
IMG=$PM/disk.img
STAMPS=$PM/counts.ts

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi

# pmem_dev MIB: the /dev/pmemN of that size.
pmem_dev() {
    for _b in /sys/block/pmem*; do
        [ "$(cat "$_b/size" 2>/dev/null)" = $(($1 * 2048)) ] && { echo "/dev/${_b##*/}"; return 0; }
    done
    return 1
}

# j STEP: the TSC value the journal recorded for STEP.
j() { awk -v s="$1" '$1 == s { print $2 }' "$JOURNAL" | tail -n 1; }

stage1() {
    t_start=$(now_ms)
    modprobe -a nd_pmem nd_e820
    i=0
    while ! { RAM_DEV=$(pmem_dev 256) && FS_DEV=$(pmem_dev 128); }; do
        i=$((i + 1))
        [ $i -le 100 ] || break
        sleep 0.1
    done
    if [ -z "${RAM_DEV:-}" ] || [ -z "${FS_DEV:-}" ]; then
        fail pmem "no 256 MiB and 128 MiB /dev/pmem devices ($(ls /dev/pmem* 2>&1 | tr '\n' ' '))"
        lab_end
        return
    fi
    check pmem yes yes
    echo "LAB-INFO guest RAM on $RAM_DEV, state filesystem on $FS_DEV"
    mke2fs -F -b 4096 "$FS_DEV" >/dev/null 2>&1 && mkdir -p $PM && mount -t ext4 "$FS_DEV" $PM ||
        { fail pm_fs "cannot make and mount a filesystem on $FS_DEV"; lab_end; return; }
    truncate -s 64M "$IMG"
    if cpr_tap_up; then check tap yes yes; else check tap no yes; fi
    tcp_server_start
    run_args --mem-file "$RAM_DEV" --disk "$IMG" --net "tap=$TAP,mac=$GUEST_MAC" > "$ARGV"
    set --
    while IFS= read -r a; do set -- "$@" "$a"; done < "$ARGV"
    echo "LAB-INFO stage 1: molt run $*"

    cpr_vmm_start $PM/guest1.log molt run "$@"
    if ! guest_ready "$VMM_LOG"; then
        kill -9 "$VMM_PID" 2>/dev/null
        dump_cpr guest1
        lab_end
        return
    fi
    check guest_cpus "$GUEST_CPUS" 2
    guest_workload_setup
    result tsc_mhz_stage1 "$(labcpr tschz)"
    if [ "$LAB_FAILED" != 0 ]; then
        dump_cpr guest1
        lab_end
        return
    fi
    result stage1_ms $(( $(now_ms) - t_start ))
    echo "LAB-INFO stage 1: molt-upgrade save"
    molt-upgrade save "$SOCK" "$STATE" "$ARGV" --kernel /lab/vmlinuz \
        --append molt.env.STAGE=2 --journal "$JOURNAL" 2>&1 | sed 's/^/LAB-INFO /'
    # Only a failure comes back here.
    fail kexec "molt-upgrade returned"
    wait_exit "$VMM_PID" 10
    dump_cpr guest1
    lab_end
}

stage2() {
    t_start=$(now_ms)
    echo "LAB-INFO stage 2: $(cat /proc/cmdline)"
    if ! molt-upgrade mount; then
        fail pm_mount "molt-upgrade mount failed"
        lab_end
        return
    fi
    # The guest's NIC: the tap, configured as before; molt re-opens it by name.
    if cpr_tap_up; then check tap2 yes yes; else check tap2 no yes; fi
    tcp_server_start
    cpr_vmm_start $PM/guest2.log molt-upgrade resume
    if cpr_resumed; then
        hz=$(labcpr tschz)
        result tsc_mhz_stage2 "$hz"
        count_gap "$hz"
        # The journal: TSC at each molt-upgrade step, in both kernels.
        sed 's/^/LAB-INFO journal: /' "$JOURNAL"
        result save_us "$(field save_us "$(grep '^saved ' "$JOURNAL")")"
        check upgrade_steps "$(cut -d' ' -f1 "$JOURNAL" | tr '\n' ',' | sed 's/,$//')" \
            start,packed,staged,saved,exited,kexec,resume
        first=$(awk -v n="$(tr -d '\r' < $PM/guest1.log | sed -n 's/^GUEST-COUNT \([0-9][0-9]*\)$/\1/p' | tail -n 1)" \
            '$3 > n { print $1; exit }' "$STAMPS")
        last=$(awk '{ t = $1 } $3 == n { print t; exit }' n="$(tr -d '\r' < $PM/guest1.log | sed -n 's/^GUEST-COUNT \([0-9][0-9]*\)$/\1/p' | tail -n 1)" "$STAMPS")
        ms() { awk -v a="$1" -v b="$2" -v hz="$hz" 'BEGIN { printf "%d", (b - a) / hz / 1000 }'; }
        if [ -n "$(j kexec)" ] && [ -n "$(j resume)" ] && [ -n "$first" ] && [ -n "$last" ]; then
            result pause_total_ms "$(ms "$last" "$first")"
            result save_part_ms "$(ms "$last" "$(j exited)")"
            result kexec_ms "$(ms "$(j kexec)" "$(j resume)")"
            result restore_part_ms "$(ms "$(j resume)" "$first")"
            result pause_without_kexec_ms $(( $(ms "$last" "$first") - $(ms "$(j kexec)" "$(j resume)") ))
            # molt kexec loads the kernel again inside the pause (it has no
            # "boot what is staged" mode): about as long as the load before it.
            result kexec_load_ms "$(ms "$(j packed)" "$(j staged)")"
        else
            fail pause_split "journal or stamps incomplete"
        fi
        workload_checks reconnected 0
        count_checks $PM/guest1.log $PM/guest2.log
        cpr_finish "$IMG"
    else
        kill -9 "$VMM_PID" 2>/dev/null
        molt state "$STATE" 2>&1 | sed 's/^/LAB-INFO molt state: /'
    fi
    [ "$LAB_FAILED" != 0 ] && dump stage1 $PM/guest1.log 60 && dump stage1-stderr $PM/guest1.log.err 30
    dump_cpr guest2
    kill "$SERVER_PID" 2>/dev/null
    result stage2_ms $(( $(now_ms) - t_start ))
    lab_end
}

if [ "${STAGE:-1}" = 2 ]; then stage2; else stage1; fi
