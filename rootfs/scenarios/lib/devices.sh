# Helpers for the virtio device scenarios (disk, net, devices, bench-devices);
# sourced after common.sh. The guest's command loop (rootfs/guest/init) runs one
# `sh -c` line at a time; commands tag their output lines ("TAG text") so the
# scenario can pick them out of the console log.

# A VMM that dies leaves fd 3 (its console input) without a reader: the next
# guest_cmd would kill this shell with SIGPIPE before it reports anything.
# Ignored, the write fails and guest_cmd reports a timeout.
trap '' PIPE

# The guest's view of the lab network; the L2 side of the tap is .1.
TAP=molt0
HOST_IP=10.0.2.1
GUEST_IP=10.0.2.2
GUEST_MAC=52:54:00:12:34:56
# A request that never completes leaves a task in D state: have the guest
# report it (with its stack) after 20 s instead of the default 120 s.
DEVICE_CMDLINE="$GUEST_CMDLINE sysctl.kernel.hung_task_timeout_secs=20"

# molt_boot LOG MOLT_RUN_ARGS...: start `molt run` with the lab kernel and
# initramfs plus the given arguments, wait until the guest's command loop is
# up, and silence its ticker (every console byte costs under emulation).
# Returns 1 (after reporting) if the guest did not get there.
molt_boot() {
    _log=$1; shift
    vmm_start "$_log" molt run --kernel "$LAB_DIR/vmlinuz" --initrd "$LAB_DIR/guest.cpio.gz" \
        --cmdline "$DEVICE_CMDLINE" --serial stdio "$@"
    guest_ready "$_log"
}

# guest_ready LOG: wait for GUEST-READY and the command loop (first tick: its
# `stty -echo` has run), then `ticks off`. Sets GUEST_CPUS.
guest_ready() {
    _t0=$(now_ms)
    if ! wait_log "$1" '^GUEST-READY' 180 "$VMM_PID"; then
        fail boot "no GUEST-READY within 180 s (VMM alive: $(alive "$VMM_PID" && echo yes || echo no))"
        alive "$VMM_PID" && proc_diag "$VMM_PID"
        return 1
    fi
    GUEST_CPUS=$(grep -m1 '^GUEST-READY' "$1" | tr -d '\r' | sed 's/.*cpus=//')
    wait_log "$1" '^GUEST-TICK ' 60 "$VMM_PID"
    [ "$(guest_cmd 'ticks off' 30)" = 0 ] || { fail boot "guest command loop not answering"; return 1; }
    echo "LAB-INFO guest up $(( $(now_ms) - _t0 )) ms after launch"
}

# gout TAG: the guest's output lines tagged TAG, without the tag (each command
# uses its own tag, so these are that command's lines).
gout() { grep "^$1 " "$VMM_LOG" | tr -d '\r' | sed "s/^$1 //"; }

# gval TAG: the last line tagged TAG.
gval() { gout "$1" | tail -n 1; }

# gcheck NAME SECONDS LINE: run LINE in the guest and check that it exits 0.
# On a timeout, shows where molt's threads and the guest are (stuck_diag; the
# guest's own view comes from its hung-task detector, see DEVICE_CMDLINE).
gcheck() {
    _rc=$(guest_cmd "$3" "$2")
    check "$1" "$_rc" 0
    [ "$_rc" = timeout ] && stuck_diag "${SOCK:-}"
    true
}

# guest_dmesg_clean NAME: no block-layer, virtio or network-stack error in the
# guest's kernel log: virtio-blk reports failed requests as I/O errors; the
# virtio core and virtio-net log "virtio... error"/"failed" lines; a stuck TX
# queue trips the netdev watchdog; a lost completion shows up as a hung task; a
# bad ring can end in a BUG or a WARNING from the virtio, block or net code.
# Prints what matched. Other kernel WARNINGs (e.g. at boot, from CPUID) are
# reported but not counted: they are not the devices' doing.
guest_dmesg_clean() {
    guest_cmd "dmesg | grep -E -i 'blk_update_request|I/O error|virtio.*(error|fail)|buffer I/O|EXT4-fs error|NETDEV WATCHDOG|transmit queue .* timed out|blocked for more than|BUG:|Oops|WARNING: CPU' | sed 's/^/DMESG-$1 /'" 60 >/dev/null
    gout "DMESG-$1" > /tmp/dmesg-hits
    sed 's/^/LAB-INFO guest dmesg: /' /tmp/dmesg-hits
    _w=$(grep 'WARNING: CPU' /tmp/dmesg-hits | grep -c -v -E ' at (drivers/(virtio|block|net)|block|net)/')
    _n=$(( $(wc -l < /tmp/dmesg-hits) - _w ))
    result "${1}_other_warnings" "$_w"
    check "$1" "$_n" 0
}

# guest_poweroff NAME: power the guest off and check that the VMM exits 0.
guest_poweroff() {
    echo poweroff >&3
    wait_exit "$VMM_PID" 90
    check "$1" "$EXIT_RC" 0
}

# tap_up: the persistent tap the guest's NIC attaches to, addressed on L2's side
# (busybox has tunctl; a host has iproute2).
tap_up() {
    [ -c /dev/net/tun ] || modprobe tun || return 1
    [ -d /sys/class/net/$TAP ] || tunctl -t "$TAP" >/dev/null 2>&1 ||
        ip tuntap add dev "$TAP" mode tap || return 1
    ip link set "$TAP" up && ip addr add "$HOST_IP/24" dev "$TAP" 2>/dev/null
    ip link show "$TAP" >/dev/null
}

# guest_net_up NAME: bring eth0 up with GUEST_IP in the guest.
guest_net_up() {
    gcheck "$1" 60 "ip link set lo up && ip link set eth0 up && ip addr add $GUEST_IP/24 dev eth0"
}

# received: filter for busybox ping's summary ("N packets transmitted,
# M packets received, ..."): prints M.
received() { sed -n 's/.* \([0-9]*\) packets received.*/\1/p' | tail -n 1; }

# field KEY LINE: the KEY= value in a labio report line (empty if absent).
field() { echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"; }

# status_field KEY: a field of molt's status reply on $SOCK (empty if it does
# not answer).
status_field() { field "$1" "$(molt ctl "$SOCK" status 2>/dev/null)"; }

# dump_vmm TAG: the guest console and molt's stderr (always a few lines; more
# when the scenario failed).
dump_vmm() {
    if [ "$LAB_FAILED" != 0 ]; then
        dump "$1" "$VMM_LOG" 100
        dump "$1-stderr" "$VMM_LOG.err" 60
    else
        dump "$1" "$VMM_LOG" 15
        dump "$1-stderr" "$VMM_LOG.err" 10
    fi
}
