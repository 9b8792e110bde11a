# bench-reboot: a local restart-style update (reboot mode) under molt against
# QEMU 7.2's equivalent, same guest kernel and initramfs, 1 vCPU, 256 MiB, guest
# RAM in a /dev/shm file for both, RUNS runs each, alternating (the first VMM
# of a round alternates too). A run: boot, start the guest's counter
# (`labcpr count COUNT_MS`, GUEST-COUNT lines on the console), then
#   molt: `molt ctl SOCK cpr-save STATE`, the old molt exits, start
#         `molt run <same args> --incoming file:STATE`;
#   QEMU: memory-backend-file share=on, `migrate_set_capability x-ignore-shared
#         on`, `migrate "exec:cat > STATE"` (HMP, synchronous), `quit`, start
#         again with `-incoming defer`, then `migrate_set_capability
#         x-ignore-shared on` and `migrate_incoming "exec:cat STATE"` (the new
#         side needs the capability too: the stream format depends on it, and
#         7.2 has no -global property for it);
# both driven the same way from this shell (one client process for the save,
# then the new VMM process). Measured on L2's clock (labcpr stamps each console
# line as it leaves the VMM):
#   gap   the gap between the last GUEST-COUNT line of the old process and
#         the first of the new: the guest-visible pause, plus up to one
#         COUNT_MS period;
#   next  from sending the save command to the first GUEST-COUNT line of the
#         new process.
# Needs the image built with MOLT_LAB_WITH_QEMU=1 (scripts/bench-reboot.sh).
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/qemu.sh
. /lab/lib/cpr.sh

RUNS=${RUNS:-5}
COUNT_MS=${COUNT_MS:-20}
QMON=/run/qmon.sock

command -v molt >/dev/null || fail molt "binary missing"
command -v qemu-system-x86_64 >/dev/null || fail qemu "missing (build with MOLT_LAB_WITH_QEMU=1)"
if [ "$LAB_FAILED" != 0 ]; then lab_end; exit 0; fi
t_start=$(now_ms)
ip link set lo up

# record VMM METRIC VALUE: one sample (ms).
record() {
    if [ -n "$3" ]; then
        echo "$3" >> "/run/bench.$1.$2"
        result "$1_$2" "$3"
    else
        fail "$1_$2" "no value"
    fi
}

# counter_up: in a booted guest, start the counter and let it run 1 s.
counter_up() {
    guest_cmd "labcpr count $COUNT_MS &" 30 >/dev/null
    wait_count "$VMM_LOG" '^GUEST-COUNT [0-9]' $((1000 / COUNT_MS)) 60
}

# measured VMM T0: after the restart, wait for the counter and record the gap
# and the time from T0 (us, labcpr now's monotonic column) to the first line.
measured() {
    if ! wait_count "$VMM_LOG" '^GUEST-COUNT [0-9]' 10 60; then
        fail "$1_resumed" "no counter after the restart"
        dump_cpr "$1"
        return
    fi
    _n=$(first_count "$VMM_LOG")
    record "$1" gap "$(update_gap_ms "$_n")"
    echo "LAB-INFO $1 count stream: $(labcpr gaps "$STAMPS")"
    _t=$(awk -v n="$_n" '$3 == n { print $2; exit }' "$STAMPS")
    record "$1" next $(( (_t - $2) / 1000 ))
}

bench_molt() {
    STAMPS=/run/molt-$1.ts
    rm -f /dev/shm/mram "$STAMPS"
    set -- --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz --cmdline "$GUEST_CMDLINE" \
        --cpus 1 --mem 256M --mem-file /dev/shm/mram --serial stdio --control "$SOCK"
    cpr_vmm_start /run/molt1.log molt run "$@"
    if guest_ready "$VMM_LOG" && counter_up; then
        t0=$(labcpr now | cut -d' ' -f2)
        r=$(molt ctl "$SOCK" cpr-save /run/mstate 2>&1)
        wait "$VMM_PID"
        cpr_vmm_start /run/molt2.log molt run "$@" --incoming file:/run/mstate
        case $r in "ok saved "*) ;; *) fail molt_save "$r" ;; esac
        measured molt "$t0"
        _l=$(grep -m1 'resumed from' "$VMM_LOG.err")
        echo "LAB-INFO molt: $r; $_l"
        [ -n "$_l" ] && record molt pause $(( $(field pause_us "$_l") / 1000 ))
        molt ctl "$SOCK" quit >/dev/null 2>&1
    fi
    kill -9 "$VMM_PID" 2>/dev/null
    wait "$VMM_PID" 2>/dev/null
    [ "$LAB_FAILED" != 0 ] && dump_cpr molt
}

bench_qemu() {
    STAMPS=/run/qemu-$1.ts
    rm -f /dev/shm/qram "$STAMPS" /run/qstate
    set -- $(qemu_args 1 256M) \
        -object memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/qram,share=on \
        -machine memory-backend=ram0 -monitor "unix:$QMON,server=on,wait=off"
    cpr_vmm_start /run/qemu1.log qemu-system-x86_64 "$@" -append "$GUEST_CMDLINE"
    if guest_ready "$VMM_LOG" && counter_up; then
        labcpr hmp "$QMON" "migrate_set_capability x-ignore-shared on" > /run/hmp.log 2>&1
        t0=$(labcpr now | cut -d' ' -f2)
        labcpr hmp "$QMON" 'migrate "exec:cat > /run/qstate"' quit >> /run/hmp.log 2>&1
        wait "$VMM_PID"
        rm -f "$QMON"
        cpr_vmm_start /run/qemu2.log qemu-system-x86_64 "$@" -append "$GUEST_CMDLINE" -incoming defer
        _i=0
        while [ ! -S "$QMON" ] && [ $_i -lt 3000 ] && alive "$VMM_PID"; do usleep 10000; _i=$((_i + 1)); done
        labcpr hmp "$QMON" "migrate_set_capability x-ignore-shared on" \
            'migrate_incoming "exec:cat /run/qstate"' >> /run/hmp.log 2>&1
        echo "LAB-INFO qemu: state $(wc -c < /run/qstate) bytes"
        measured qemu "$t0"
    fi
    kill -9 "$VMM_PID" 2>/dev/null
    wait "$VMM_PID" 2>/dev/null
    # The monitor echoes with cursor-movement escapes: keep the text.
    [ "$LAB_FAILED" != 0 ] && { dump_cpr qemu; tr -d '\033' < /run/hmp.log | sed 's/\[K\(\[D\)*//g' | tail -n 20 | sed 's/^/hmp| /'; }
}

i=1
while [ $i -le "$RUNS" ]; do
    echo "LAB-INFO round $i"
    if [ $((i % 2)) = 1 ]; then bench_molt $i; bench_qemu $i; else bench_qemu $i; bench_molt $i; fi
    i=$((i + 1))
done

# stats FILE: "runs | min | median | max" (median of an even count: the mean
# of the middle two).
stats() {
    sort -n "$1" | awk '{ v[NR] = $1 }
        END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
              printf "%d | %d | %d | %d\n", NR, v[1], m, v[NR] }'
}

echo "LAB-TABLE | flow (256 MiB, 1 vCPU, RAM in /dev/shm) | measured | runs | min ms | median ms | max ms |"
echo "LAB-TABLE |---|---|---|---|---|---|"
for v in molt qemu; do
    case $v in
    molt) label="molt: cpr-save, restart with --incoming file:" ;;
    qemu) label="QEMU 7.2: x-ignore-shared, migrate to exec:cat, quit, -incoming" ;;
    esac
    [ -s /run/bench.$v.gap ] && echo "LAB-TABLE | $label | GUEST-COUNT gap at the update (every $COUNT_MS ms) | $(stats /run/bench.$v.gap) |"
    [ -s /run/bench.$v.next ] && echo "LAB-TABLE | $label | save command to first line after | $(stats /run/bench.$v.next) |"
    [ -s /run/bench.$v.pause ] && echo "LAB-TABLE | $label | molt's pause_us | $(stats /run/bench.$v.pause) |"
done
result lab_ms $(( $(now_ms) - t_start ))
lab_end
