# boot-log: diagnostics, not a test. Boots the guest once under molt (and once
# under QEMU if the image has it) with a verbose kernel console, and prints the
# full logs, each line stamped with the milliseconds since the VMM's launch
# ("+ms"), so slow or failing boot stages show up. earlyprintk makes the
# bzImage decompressor report too, the part before the kernel's clock starts.
. /lab/lib/common.sh
. /lab/lib/qemu.sh

VERBOSE_CMDLINE="console=ttyS0 earlyprintk=ttyS0 panic=-1 loglevel=7 printk.time=1"

# boot_log NAME CMD...: run until GUEST-READY, then print the log.
boot_log() {
    _name=$1; shift
    if labtime stamp GUEST-READY 180 "/run/$_name.log" "$@" </dev/null >/run/$_name.us; then
        result "${_name}_ready_ms" $(( $(cat /run/$_name.us) / 1000 ))
    else
        fail "$_name" "no GUEST-READY within 180 s"
    fi
    tr -d '\r' < "/run/$_name.log" | grep -v '^GUEST-TICK' | sed "s/^/$_name| /"
}

# Process start-up alone, for scale.
result molt_help_us "$(labtime watch Usage 10 /run/help.log molt --help </dev/null)"

boot_log molt molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz \
    --cmdline "$VERBOSE_CMDLINE" --cpus "${CPUS:-1}" --mem 256M --serial stdio
if command -v qemu-system-x86_64 >/dev/null; then
    boot_log qemu qemu-system-x86_64 $(qemu_args "${CPUS:-1}") -append "$VERBOSE_CMDLINE"
fi
lab_end
