# bench-devices: virtio-blk and virtio-net throughput, molt against QEMU 7.2,
# same guest kernel and initramfs, 1 vCPU, 512 MiB, one disk and one NIC each.
# RUNS rounds (default 5); each round boots both VMMs, the order alternating
# (molt first, then QEMU first, ...) so drift in the emulator hits both alike,
# and measures in every boot:
#   - sequential write and read, 1 MiB O_DIRECT requests (labio seqwrite/seqread)
#   - 4 KiB O_DIRECT random reads for RR_SECS seconds (labio randread)
#   - TCP guest -> L2 and L2 -> guest, TCP_MIB MiB of a generated stream
#     (labio send/recv; timed on L2's clock)
# Disk timings come from the guest's clock (its clocksource is printed).
# Needs the image built with MOLT_LAB_WITH_QEMU=1 (scripts/bench-devices.sh).
#
# The disk image lives in L2's tmpfs, which has no O_DIRECT in this kernel, so
# QEMU runs with cache=writeback,aio=threads: host page cache and flushes
# honoured, like molt's synchronous pread/pwrite on the image (cache=none would
# need O_DIRECT; aio=native needs cache=none). QEMU's thread pool can keep
# several requests in flight where molt completes one at a time.
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/qemu.sh

RUNS=${RUNS:-5}
SEQ_MIB=${SEQ_MIB:-128}
RR_SECS=${RR_SECS:-10}
TCP_MIB=${TCP_MIB:-128}
IMG=/tmp/bench.img
LOG=/run/guest.log
METRICS="seqwrite seqread randread tcp_g2h tcp_h2g"

command -v molt >/dev/null || fail molt "binary missing"
command -v qemu-system-x86_64 >/dev/null || fail qemu "missing (build with MOLT_LAB_WITH_QEMU=1)"
tap_up || fail tap "cannot set up $TAP"
if [ "$LAB_FAILED" != 0 ]; then lab_end; exit 0; fi
t_start=$(now_ms)

# Fully allocated, so writes do not pay for tmpfs allocation in one VMM's turn
# and not the other's.
dd if=/dev/zero of="$IMG" bs=1M count=$((SEQ_MIB * 2)) 2>/dev/null

# record VMM METRIC VALUE: one sample.
record() {
    if [ -n "$3" ]; then
        echo "$3" >> "/run/bench.$1.$2"
        result "$1_$2" "$3"
    else
        fail "$1_$2" "no value"
    fi
}

# measure VMM: the measurements, in a booted guest.
measure() {
    guest_net_up "$1_ip_rc"
    guest_cmd 'echo "CLK $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"' 30 >/dev/null
    echo "LAB-INFO $1 guest clocksource: $(gval CLK)"

    guest_cmd "labio seqwrite /dev/vda $SEQ_MIB 2>&1 | sed 's/^/SW /'" 300 >/dev/null
    record "$1" seqwrite "$(field mbps "$(gval SW)")"
    guest_cmd "labio seqread /dev/vda $SEQ_MIB 2>&1 | sed 's/^/SR /'" 300 >/dev/null
    record "$1" seqread "$(field mbps "$(gval SR)")"
    guest_cmd "labio randread /dev/vda $RR_SECS 2>&1 | sed 's/^/RR /'" $((RR_SECS + 120)) >/dev/null
    record "$1" randread "$(field iops "$(gval RR)")"

    labio recv 5002 - 120 > /run/recv.out 2>&1 &
    _pid=$!
    guest_cmd "labio send $HOST_IP 5002 zero:$((TCP_MIB << 20)) 60 2>&1 | sed 's/^/TS /'" 300 >/dev/null
    wait "$_pid"
    echo "LAB-INFO $1 tcp guest->L2: L2 $(cat /run/recv.out); guest $(gval TS)"
    record "$1" tcp_g2h "$(field mbps "$(cat /run/recv.out)")"

    guest_cmd "labio recv 5001 - 120 > /run/recv.out 2>&1 &" 30 >/dev/null
    _send=$(labio send "$GUEST_IP" 5001 "zero:$((TCP_MIB << 20))" 60 2>&1)
    echo "LAB-INFO $1 tcp L2->guest: L2 $_send"
    record "$1" tcp_h2g "$(field mbps "$_send")"
}

bench_molt() {
    if molt_boot "$LOG" --cpus 1 --mem 512M --disk "$IMG" --net "tap=$TAP,mac=$GUEST_MAC"; then
        measure molt
        guest_dmesg_clean molt_dmesg_errors
        guest_poweroff molt_exit
    else
        kill -9 "$VMM_PID" 2>/dev/null
    fi
    [ "$LAB_FAILED" != 0 ] && dump_vmm molt
}

bench_qemu() {
    vmm_start "$LOG" qemu-system-x86_64 $(qemu_args 1 512M) -append "$DEVICE_CMDLINE" \
        -drive "if=none,id=d0,file=$IMG,format=raw,cache=writeback,aio=threads" \
        -device virtio-blk-pci,drive=d0 \
        -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no,vhost=off" \
        -device "virtio-net-pci,netdev=n0,mac=$GUEST_MAC,romfile="
    if guest_ready "$LOG"; then
        measure qemu
        guest_dmesg_clean qemu_dmesg_errors
        # qboot leaves ACPI power-off unprogrammed (see guest-qemu.sh): stop
        # QEMU once the guest has gone down.
        echo poweroff >&3
        wait_log "$LOG" 'reboot: Power down' 60 "$VMM_PID"
    fi
    kill -9 "$VMM_PID" 2>/dev/null
    wait "$VMM_PID" 2>/dev/null
    [ "$LAB_FAILED" != 0 ] && dump_vmm qemu
}

i=1
while [ $i -le "$RUNS" ]; do
    echo "LAB-INFO round $i"
    if [ $((i % 2)) = 1 ]; then bench_molt; bench_qemu; else bench_qemu; bench_molt; fi
    i=$((i + 1))
done

# stats FILE: "min | median | max" over the samples (median of an even count:
# the mean of the middle two).
stats() {
    sort -n "$1" | awk '{ v[NR] = $1 }
        END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
              printf "%d | %.1f | %.1f | %.1f\n", NR, v[1], m, v[NR] }'
}
median() { stats "$1" | awk -F' [|] ' '{ print $3 }'; }

echo "LAB-TABLE | measure | VMM | runs | min | median | max | molt/QEMU (medians) |"
echo "LAB-TABLE |---|---|---|---|---|---|---|"
for m in $METRICS; do
    case $m in
    seqwrite) label="seq write, 1 MiB O_DIRECT, MB/s" ;;
    seqread) label="seq read, 1 MiB O_DIRECT, MB/s" ;;
    randread) label="rand read, 4 KiB O_DIRECT, IOPS" ;;
    tcp_g2h) label="TCP guest -> L2, MB/s" ;;
    tcp_h2g) label="TCP L2 -> guest, MB/s" ;;
    esac
    ratio=-
    if [ -s /run/bench.molt.$m ] && [ -s /run/bench.qemu.$m ]; then
        ratio=$(awk -v a="$(median /run/bench.molt.$m)" -v b="$(median /run/bench.qemu.$m)" \
            'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    fi
    [ -s /run/bench.molt.$m ] && echo "LAB-TABLE | $label | molt | $(stats /run/bench.molt.$m) | $ratio |"
    [ -s /run/bench.qemu.$m ] && echo "LAB-TABLE | $label | QEMU 7.2 | $(stats /run/bench.qemu.$m) | |"
done
result lab_ms $(( $(now_ms) - t_start ))
lab_end
