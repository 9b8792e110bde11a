# boot-log: diagnostics, not a test. Boots the guest once under molt (and once
# under QEMU if the image has it) with a verbose kernel console, and prints the
# full logs, so slow or failing boot stages show up in the timestamps.
. /lab/lib/common.sh
. /lab/lib/qemu.sh

VERBOSE_CMDLINE="console=ttyS0 panic=-1 loglevel=7 printk.time=1"

# boot_log NAME CMD...: run until GUEST-READY, then print the log.
boot_log() {
    _name=$1; shift
    if labtime watch GUEST-READY 180 "/run/$_name.log" "$@" </dev/null >/run/$_name.us; then
        result "${_name}_ready_ms" $(( $(cat /run/$_name.us) / 1000 ))
    else
        fail "$_name" "no GUEST-READY within 180 s"
    fi
    tr -d '\r' < "/run/$_name.log" | grep -v '^GUEST-TICK' | sed "s/^/$_name| /"
}

boot_log molt molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz \
    --cmdline "$VERBOSE_CMDLINE" --cpus "${CPUS:-1}" --mem 256M --serial stdio
if command -v qemu-system-x86_64 >/dev/null; then
    boot_log qemu qemu-system-x86_64 $(qemu_args "${CPUS:-1}") -append "$VERBOSE_CMDLINE"
fi
lab_end
