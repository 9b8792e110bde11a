# guest-qemu: the L3 guest image under QEMU 7.2 instead of molt, as a reference
# when a molt scenario fails (is it molt or the guest image?). Needs the image
# built with MOLT_LAB_WITH_QEMU=1.
. /lab/lib/common.sh
. /lab/lib/qemu.sh

LOG=/run/guest.log
t0=$(now_ms)
vmm_start "$LOG" qemu-system-x86_64 $(qemu_args 2) -append "$GUEST_CMDLINE"
if wait_log "$LOG" '^GUEST-READY' 120 "$VMM_PID"; then
    result guest_ready_ms $(( $(now_ms) - t0 ))
    check guest_cpus "$(grep -m1 '^GUEST-READY' "$LOG" | tr -d '\r' | sed 's/.*cpus=//')" 2
else
    fail guest_ready "not seen"
fi
wait_log "$LOG" '^GUEST-TICK ' 60 "$VMM_PID"
check echo_rc "$(guest_cmd "echo hello-from-guest" 60)" 0
check echo_output "$(grep -c '^hello-from-guest' "$LOG")" 1
echo poweroff >&3
# qboot leaves the PIIX4 ACPI PM block unprogrammed, so QEMU does not see the
# guest's ACPI power-off; the guest reaching it is what counts here.
wait_log "$LOG" 'reboot: Power down' 60 "$VMM_PID" && check guest_poweroff yes yes ||
    check guest_poweroff no yes
wait_exit "$VMM_PID" 1
result qemu_exit "$EXIT_RC"
dump guest "$LOG" 40
dump qemu "$LOG.err" 20
lab_end
