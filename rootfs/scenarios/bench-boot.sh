# bench-boot: time from VMM launch to the guest's first /init line
# (GUEST-INIT), molt against QEMU 7.2, same kernel and initramfs, 256 MiB,
# 1 vCPU, 5 runs each, alternating so drift in the emulator hits both alike.
# Needs the image built with MOLT_LAB_WITH_QEMU=1 (scripts/bench-boot.sh).
# Timing: labtime (static C helper, CLOCK_MONOTONIC) stamps the moment the
# VMM's output pipe delivers the line, then kills the VMM.
. /lab/lib/common.sh
. /lab/lib/qemu.sh

RUNS=${RUNS:-5}
LOG=/run/bench.log

command -v molt >/dev/null || fail molt "binary missing"
command -v qemu-system-x86_64 >/dev/null || fail qemu "missing (build with MOLT_LAB_WITH_QEMU=1)"
if [ "$LAB_FAILED" != 0 ]; then lab_end; exit 0; fi

# bench NAME CMD...: one timed boot; appends microseconds to /run/NAME.us
bench() {
    _name=$1; shift
    echo "==== $_name" >> "$LOG"
    if _us=$(labtime watch GUEST-INIT 120 "$LOG" "$@" </dev/null); then
        echo "$_us" >> "/run/$_name.us"
        # The guest's own clock at /init splits the total into VMM set-up
        # (before the kernel's clock starts) and the kernel's boot.
        _up=$(grep '^GUEST-INIT' "$LOG" | tail -n 1 | tr -d '\r' | sed 's/.*uptime=//')
        _up_ms=$(echo "$_up" | awk '{ printf "%d", $1 * 1000 }')
        echo "$((_up_ms * 1000))" >> "/run/$_name.uptime"
        result "${_name}_ms" "$((_us / 1000)) guest_uptime_ms=$_up_ms"
    else
        fail "$_name" "no GUEST-INIT within 120 s"
    fi
}

i=1
while [ $i -le "$RUNS" ]; do
    bench molt molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz \
        --cmdline "$GUEST_CMDLINE" --cpus 1 --mem 256M --serial stdio
    bench qemu qemu-system-x86_64 $(qemu_args 1) -append "$GUEST_CMDLINE"
    i=$((i + 1))
done

# stats FILE: "runs | min | median | max" in ms over the recorded runs (us).
stats() {
    sort -n "$1" > "$1.sorted"
    _n=$(wc -l < "$1.sorted")
    _min=$(head -n 1 "$1.sorted")
    _med=$(sed -n "$(( (_n + 1) / 2 ))p" "$1.sorted")
    _max=$(tail -n 1 "$1.sorted")
    echo "$_n | $((_min / 1000)) | $((_med / 1000)) | $((_max / 1000))"
}

echo "LAB-TABLE | VMM | measured | runs | min ms | median ms | max ms |"
echo "LAB-TABLE |---|---|---|---|---|---|"
for v in molt qemu; do
    [ -f /run/$v.us ] || continue
    [ $v = molt ] && label=molt || label="QEMU 7.2 (-M pc, qboot)"
    echo "LAB-TABLE | $label | launch to GUEST-INIT | $(stats /run/$v.us) |"
    echo "LAB-TABLE | $label | guest uptime at GUEST-INIT | $(stats /run/$v.uptime) |"
done
[ "$LAB_FAILED" != 0 ] && dump bench "$LOG" 60
lab_end
