# cpr-restart: reboot-mode live update without a reboot. molt runs a guest
# with 2 vCPUs, a virtio disk and a NIC, guest RAM in a tmpfs file
# (--mem-file /dev/shm/ram); the guest runs the CPR workload (a counter on the
# console, records appended to a file on its disk, a TCP connection to L2);
# `cpr-save` stops molt, a new molt resumes with `--incoming file:`, and the
# counter, the records, the TCP connection and the guest's kernel log are
# checked (lib/cpr.sh). Reports save_us, restore_us, pause_us (molt's) and
# count_gap_ms (the guest-visible pause seen from L2).
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/cpr.sh

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi
rm -f /dev/shm/ram
cpr_local cpr-restart --mem-file /dev/shm/ram
lab_end
