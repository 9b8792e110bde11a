# demo: what `scripts/demo.sh` shows on a host whose KVM cannot run Linux.
# molt boots the Debian cloud kernel with 2 vCPUs, a disk and a NIC; the guest
# console is shown at the end; the control pipe pauses and resumes it; the guest
# powers off and molt exits 0.
. /lab/lib/common.sh

SOCK=/run/molt.sock
LOG=/run/guest.log
say() { echo "DEMO: $*"; }

dd if=/dev/zero of=/run/disk.img bs=1M count=32 2>/dev/null
modprobe tun
tunctl -t molt0 >/dev/null && ip link set molt0 up && ip addr add 10.0.2.1/24 dev molt0

say "molt run --kernel vmlinuz --initrd guest.cpio.gz --cpus 2 --mem 256M --disk disk.img --net tap=molt0 --control $SOCK"
vmm_start "$LOG" molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz \
    --cmdline "$GUEST_CMDLINE" --cpus 2 --mem 256M --disk /run/disk.img \
    --net tap=molt0 --control "$SOCK"

if ! wait_log "$LOG" '^GUEST-READY' 120 "$VMM_PID"; then
    fail guest_ready "no GUEST-READY"
    dump molt "$LOG.err"
    lab_end
    exit 0
fi
wait_log "$LOG" '^GUEST-TICK ' 60 "$VMM_PID"
for c in "uname -r" "grep -c ^processor /proc/cpuinfo" "cat /sys/block/vda/size" \
    "ip addr add 10.0.2.2/24 dev eth0 && ip link set eth0 up && ping -c 2 10.0.2.1"; do
    say "guest\$ $c"
    check "cmd" "$(guest_cmd "$c" 60)" 0
done
say "molt ctl $SOCK status  ->  $(molt ctl "$SOCK" status)"
say "molt ctl $SOCK pause   ->  $(molt ctl "$SOCK" pause)"
say "molt ctl $SOCK status  ->  $(molt ctl "$SOCK" status)"
sleep 2
say "molt ctl $SOCK resume  ->  $(molt ctl "$SOCK" resume)"
say "guest\$ poweroff"
echo poweroff >&3
wait_exit "$VMM_PID" 60
check molt_exit "$EXIT_RC" 0
dump guest "$LOG" 200
lab_end
