# net: virtio-net with a real Linux guest. L2 makes a persistent tap (molt0,
# 10.0.2.1/24) that molt attaches to (--net tap=molt0,mac=...); the guest's
# eth0 gets 10.0.2.2/24. Checks: the MAC the guest sees, ping both ways, and a
# TCP transfer of 50 MiB each way with SHA-256 compared on both ends (labio,
# rootfs/tools/labio.c: exact byte counts and timing, which busybox nc lacks).
# Payloads sit in tmpfs files so the sums cover exactly what was sent.
# Throughput is informational (TCG): measured on L2's clock both ways.
. /lab/lib/common.sh
. /lab/lib/devices.sh

LOG=/run/guest.log
BYTES=$((50 << 20))

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi
t_start=$(now_ms)

if tap_up; then check tap yes yes; else check tap no yes; fi
head -c "$BYTES" /dev/urandom > /tmp/to-guest
to_guest_sum=$(sha256sum /tmp/to-guest | cut -d' ' -f1)

if molt_boot "$LOG" --cpus 1 --mem 512M --net "tap=$TAP,mac=$GUEST_MAC"; then
    guest_cmd 'echo "MAC $(cat /sys/class/net/eth0/address)"; echo "FEAT $(cat /sys/bus/virtio/drivers/virtio_net/virtio*/features)"' 30 >/dev/null
    check guest_mac "$(gval MAC)" "$GUEST_MAC"
    result virtio_net_features "$(gval FEAT)"
    guest_net_up guest_ip_rc

    # Ping: the first echo also resolves ARP in each direction.
    guest_cmd "ping -c 3 -W 5 $HOST_IP 2>&1 | sed 's/^/PING-G2H /'" 60 >/dev/null
    check ping_guest_to_host "$(gout PING-G2H | received)" 3
    check ping_host_to_guest "$(ping -c 3 -W 5 "$GUEST_IP" 2>&1 | received)" 3

    # L2 -> guest: the guest listens (in the background, so the console stays
    # free), L2 sends; labio's send retries until the listener is up.
    guest_cmd "labio recv 5001 /run/in 120 > /run/recv.out 2>&1 &" 30 >/dev/null
    send=$(labio send "$GUEST_IP" 5001 /tmp/to-guest 60 2>&1)
    echo "LAB-INFO L2 send: $send"
    guest_cmd 'i=0; while [ ! -s /run/recv.out ] && [ $i -lt 600 ]; do usleep 100000; i=$((i+1)); done; sed "s/^/RECV /" /run/recv.out; sha256sum /run/in | sed "s/^/INSUM /"' 180 >/dev/null
    echo "LAB-INFO guest recv: $(gval RECV)"
    check h2g_bytes "$(field bytes "$(gval RECV)")" "$BYTES"
    check h2g_sum_match "$([ "$(gval INSUM | cut -d' ' -f1)" = "$to_guest_sum" ] && echo yes || echo no)" yes
    result h2g_mbps "$(field mbps "$send")"

    # guest -> L2: the guest makes its payload and its sum, L2 listens.
    gcheck g2h_payload_rc 180 "head -c $BYTES /dev/urandom > /run/out && sha256sum /run/out | sed 's/^/OUTSUM /'"
    labio recv 5002 /tmp/from-guest 120 > /tmp/recv.out 2>&1 &
    recv_pid=$!
    guest_cmd "labio send $HOST_IP 5002 /run/out 60 2>&1 | sed 's/^/SEND /'" 180 >/dev/null
    wait "$recv_pid"
    echo "LAB-INFO guest send: $(gval SEND)"
    echo "LAB-INFO L2 recv: $(cat /tmp/recv.out)"
    check g2h_bytes "$(field bytes "$(cat /tmp/recv.out)")" "$BYTES"
    check g2h_sum_match "$([ -s /tmp/from-guest ] && [ "$(sha256sum /tmp/from-guest | cut -d' ' -f1)" = "$(gval OUTSUM | cut -d' ' -f1)" ] && echo yes || echo no)" yes
    result g2h_mbps "$(field mbps "$(cat /tmp/recv.out)")"

    guest_cmd "grep -E 'eth0' /proc/net/dev | sed 's/^/NETDEV /'" 30 >/dev/null
    echo "LAB-INFO guest /proc/net/dev: $(gval NETDEV)"
    guest_dmesg_clean dmesg_errors
    guest_poweroff molt_exit
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm guest
result lab_ms $(( $(now_ms) - t_start ))
lab_end
