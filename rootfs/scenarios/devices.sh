# devices: everything at once on 2 vCPUs: two virtio-blk disks and one
# virtio-net NIC (three virtio-pci functions, each with its MSI-X vectors).
# Both disks are written concurrently while the guest pings L2, then read back
# with O_DIRECT; L2 checks the images' content after power-off.
. /lab/lib/common.sh
. /lab/lib/devices.sh

LOG=/run/guest.log
A=/tmp/a.img
B=/tmp/b.img
MIB=4

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi
t_start=$(now_ms)

truncate -s 32M "$A"
truncate -s 32M "$B"
if tap_up; then check tap yes yes; else check tap no yes; fi

if molt_boot "$LOG" --cpus 2 --mem 256M --disk "$A" --disk "$B" --net "tap=$TAP"; then
    check guest_cpus "$GUEST_CPUS" 2
    # Informational: DEVICE_CMDLINE's hung-task timeout took effect.
    guest_cmd 'echo "HUNG $(cat /proc/sys/kernel/hung_task_timeout_secs)"' 30 >/dev/null
    result guest_hung_task_timeout "$(gval HUNG)"
    guest_cmd 'echo "VIRTIO $(ls /sys/bus/virtio/devices | wc -l)"; ls /sys/block | sed "s/^/BLK /"' 30 >/dev/null
    check virtio_devices "$(gval VIRTIO)" 3
    check guest_disks "$(gout BLK | grep -c '^vd')" 2
    gcheck payload_rc 60 "head -c $((MIB << 20)) /dev/urandom > /run/pa && head -c $((MIB << 20)) /dev/urandom > /run/pb && sha256sum /run/pa /run/pb | sed 's/^/PSUM /'"
    sum_a=$(gout PSUM | grep /run/pa | cut -d' ' -f1)
    sum_b=$(gout PSUM | grep /run/pb | cut -d' ' -f1)
    guest_net_up guest_ip_rc

    # Both disks and the NIC busy at the same time, on two vCPUs.
    guest_cmd "(dd if=/run/pa of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null; echo \"DDA \$?\") & (dd if=/run/pb of=/dev/vdb bs=64k oflag=direct conv=fsync 2>/dev/null; echo \"DDB \$?\") & ping -c 5 -W 5 $HOST_IP 2>&1 | sed 's/^/PING /'; wait" 180 >/dev/null
    check write_a_rc "$(gval DDA)" 0
    check write_b_rc "$(gval DDB)" 0
    check ping_guest_to_host "$(gout PING | received)" 5
    check ping_host_to_guest "$(ping -c 3 -W 5 "$GUEST_IP" 2>&1 | received)" 3

    guest_cmd "for d in vda vdb; do echo \"RB \$d \$(dd if=/dev/\$d bs=64k count=$((MIB * 16)) iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)\"; done" 120 >/dev/null
    check read_a_matches "$([ -n "$sum_a" ] && [ "$(gout RB | sed -n 's/^vda //p')" = "$sum_a" ] && echo yes || echo no)" yes
    check read_b_matches "$([ -n "$sum_b" ] && [ "$(gout RB | sed -n 's/^vdb //p')" = "$sum_b" ] && echo yes || echo no)" yes

    # Informational: the MSI-X vectors the drivers use (config + queues each).
    guest_cmd "grep -c virtio /proc/interrupts | sed 's/^/IRQS /'" 30 >/dev/null
    result guest_virtio_irqs "$(gval IRQS)"
    guest_dmesg_clean dmesg_errors
    guest_poweroff molt_exit
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm guest

# L2's view of the images after power-off.
check image_a_matches "$([ -n "${sum_a:-}" ] && [ "$(head -c $((MIB << 20)) "$A" | sha256sum | cut -d' ' -f1)" = "$sum_a" ] && echo yes || echo no)" yes
check image_b_matches "$([ -n "${sum_b:-}" ] && [ "$(head -c $((MIB << 20)) "$B" | sha256sum | cut -d' ' -f1)" = "$sum_b" ] && echo yes || echo no)" yes
result lab_ms $(( $(now_ms) - t_start ))
lab_end
