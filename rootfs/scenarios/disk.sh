# disk: virtio-blk with a real Linux guest. Boot 1 makes a filesystem on a raw
# image (busybox mke2fs: ext2, mounted by the kernel's ext4 driver; busybox has
# no `-t ext4`), writes files and records their SHA-256, and powers off. L2
# then loop-mounts the image read-only and checks the files independently of
# the guest. Boot 2 mounts the image again and reads the files back. A second,
# read-only disk (`--disk PATH,ro`) must refuse writes and stay unchanged.
. /lab/lib/common.sh
. /lab/lib/devices.sh

IMG=/tmp/disk.img
RO_IMG=/tmp/ro.img
LOG=/run/guest.log
FILES="big.bin odd.bin hello.txt"

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi
t_start=$(now_ms)

# A sparse 64 MiB image, and a 4 MiB read-only one with random content.
truncate -s 64M "$IMG"
dd if=/dev/urandom of="$RO_IMG" bs=1M count=4 2>/dev/null
ro_sum=$(sha256sum "$RO_IMG" | cut -d' ' -f1)

# ---- boot 1: make the filesystem, write, record sums
echo "LAB-INFO boot 1: --disk $IMG --disk $RO_IMG,ro"
if molt_boot "$LOG" --cpus 1 --mem 256M --disk "$IMG" --disk "$RO_IMG,ro"; then
    guest_cmd 'cat /sys/block/vda/size /sys/block/vdb/size | sed "s/^/SIZE /"' 30 >/dev/null
    check vda_sectors "$(gout SIZE | head -n 1)" $((64 * 2048))
    check vdb_sectors "$(gout SIZE | sed -n 2p)" $((4 * 2048))
    gcheck mkfs_rc 120 "mke2fs -F -L moltlab /dev/vda >/dev/null"
    gcheck mount1_rc 60 "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt"
    # 8 MiB in 1 MiB requests, an odd-sized file whose tail is a partial block,
    # and a line of text.
    gcheck write_rc 180 "mkdir /mnt/d && cd /mnt/d && dd if=/dev/urandom of=big.bin bs=1M count=8 2>/dev/null && head -c 1234567 /dev/urandom > odd.bin && echo 'molt virtio-blk test' > hello.txt"
    gcheck sums1_rc 120 "cd /mnt/d && sha256sum $FILES | sed 's/^/SUM1 /'"
    gcheck umount1_rc 120 "sync && umount /mnt"

    # The read-only disk: the kernel sees VIRTIO_BLK_F_RO, a write fails, and
    # reads return the image.
    guest_cmd 'echo "RO $(cat /sys/block/vdb/ro)"' 30 >/dev/null
    check vdb_ro "$(gval RO)" 1
    rc=$(guest_cmd 'dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct conv=fsync 2>/run/e; r=$?; sed "s/^/RODD /" /run/e; exit $r' 60)
    result ro_write_rc "$rc"
    gout RODD | sed 's/^/LAB-INFO guest dd: /'
    [ "$rc" != 0 ] && [ "$rc" != timeout ] && check ro_write_refused yes yes || check ro_write_refused no yes
    guest_cmd 'sha256sum /dev/vdb | sed "s/^/ROSUM /"' 60 >/dev/null
    check ro_guest_read_matches "$([ "$(gval ROSUM | cut -d' ' -f1)" = "$ro_sum" ] && echo yes || echo no)" yes

    guest_dmesg_clean dmesg1_errors
    guest_poweroff molt_exit1
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm boot1
gout SUM1 > /tmp/sums1
check sums1_count "$(wc -l < /tmp/sums1)" 3

# ---- L2 checks the image without the guest
modprobe loop 2>/dev/null
mkdir -p /mnt/img
if mount -o ro -t ext4 "$IMG" /mnt/img; then
    (cd /mnt/img/d && sha256sum $FILES) > /tmp/sums-host
    umount -d /mnt/img
    check host_sums_match "$(cmp -s /tmp/sums1 /tmp/sums-host && echo yes || echo no)" yes
    sed 's/^/LAB-INFO host: /' /tmp/sums-host
else
    fail host_mount "L2 cannot loop-mount the image"
fi
check ro_image_unchanged "$([ "$(sha256sum "$RO_IMG" | cut -d' ' -f1)" = "$ro_sum" ] && echo yes || echo no)" yes

# ---- boot 2: the guest reads the files back
echo "LAB-INFO boot 2: --disk $IMG"
if molt_boot "$LOG" --cpus 1 --mem 256M --disk "$IMG"; then
    gcheck mount2_rc 60 "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt"
    gcheck sums2_rc 120 "cd /mnt/d && sha256sum $FILES | sed 's/^/SUM2 /'"
    gout SUM2 > /tmp/sums2
    check guest_sums_match "$( [ -s /tmp/sums1 ] && cmp -s /tmp/sums1 /tmp/sums2 && echo yes || echo no)" yes
    gcheck umount2_rc 60 "umount /mnt"
    guest_dmesg_clean dmesg2_errors
    guest_poweroff molt_exit2
else
    kill -9 "$VMM_PID" 2>/dev/null
fi
dump_vmm boot2
result lab_ms $(( $(now_ms) - t_start ))
lab_end
