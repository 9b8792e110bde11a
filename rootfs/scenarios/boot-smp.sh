# boot-smp: molt boots the Debian cloud kernel with 2 vCPUs (SMP through the
# ACPI MADT: the cloud kernel has no MP-table parser), runs a command over the
# serial console, pauses and resumes through the control socket, and exits 0
# when the guest powers off.
. /lab/lib/common.sh

SOCK=/run/molt.sock
LOG=/run/guest.log

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi

t0=$(now_ms)
vmm_start "$LOG" molt run --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz \
    --cmdline "$GUEST_CMDLINE" --cpus 2 --mem 256M --serial stdio --control "$SOCK"

# 1. The guest's init runs and sees both CPUs (TCG makes everything slow).
if wait_log "$LOG" '^GUEST-INIT' 120 "$VMM_PID"; then
    result guest_init_ms $(( $(now_ms) - t0 ))
    result guest_init_uptime "$(grep -m1 '^GUEST-INIT' "$LOG" | tr -d '\r' | sed 's/.*uptime=//')"
fi
if wait_log "$LOG" '^GUEST-READY' 120 "$VMM_PID"; then
    result guest_ready_ms $(( $(now_ms) - t0 ))
    check guest_cpus "$(grep -m1 '^GUEST-READY' "$LOG" | tr -d '\r' | sed 's/.*cpus=//')" 2
else
    fail guest_ready "not seen (molt alive: $(alive "$VMM_PID" && echo yes || echo no))"
fi

# 2. A command round trip over the serial console (guest input = molt stdin).
# Wait for the command loop's `stty -echo` first: otherwise an early line could
# be echoed back and taken for the output.
wait_log "$LOG" '^GUEST-TICK ' 60 "$VMM_PID"
rc=$(guest_cmd "echo hello-from-guest" 60)
check echo_rc "$rc" 0
check echo_output "$(grep -c '^hello-from-guest' "$LOG")" 1
# Informational: did /init's modprobe find the virtio modules (it needs the
# image's modules.dep to be right, whether or not devices exist)?
guest_cmd 'echo "virtio-modules=$(grep -c ^virtio /proc/modules)"' 30 >/dev/null
result guest_virtio_modules "$(grep -m1 '^virtio-modules=' "$LOG" | tr -d '\r' | cut -d= -f2)"

# 3. Control socket: status, pause (ticks stop), resume (ticks go on).
st=$(molt ctl "$SOCK" status 2>&1)
echo "LAB-INFO status: $st"
case $st in "ok state=running vcpus=2"*) check status_running yes yes ;; *) check status_running no yes ;; esac

r=$(molt ctl "$SOCK" pause 2>&1)
echo "LAB-INFO pause: $r"
case $r in ok*) check pause_reply ok ok ;; *) check pause_reply "$r" ok ;; esac
st=$(molt ctl "$SOCK" status 2>&1)
echo "LAB-INFO status: $st"
case $st in "ok state=paused "*) check status_paused yes yes ;; *) check status_paused no yes ;; esac
c1=$(ticks)
sleep 2
c2=$(ticks)
check ticks_while_paused $((c2 - c1)) 0

r=$(molt ctl "$SOCK" resume 2>&1)
echo "LAB-INFO resume: $r"
case $r in ok*) check resume_reply ok ok ;; *) check resume_reply "$r" ok ;; esac
# A tick every 200 ms; allow for TCG and the guest's timer catching up.
wait_count "$LOG" '^GUEST-TICK ' $((c2 + 2)) 20
c3=$(ticks)
result ticks_after_resume $((c3 - c2))
[ $((c3 - c2)) -ge 2 ] || fail ticks_resume "ticks did not grow after resume"
st=$(molt ctl "$SOCK" status 2>&1)
case $st in "ok state=running "*) check status_resumed yes yes ;; *) check status_resumed no yes ;; esac

# 4. Guest power-off (ACPI) ends molt with status 0.
echo poweroff >&3
wait_exit "$VMM_PID" 60
check molt_exit "$EXIT_RC" 0

if [ "$LAB_FAILED" != 0 ]; then
    dump guest "$LOG" 80
    dump molt "$LOG.err" 60
else
    # With `quiet` this is a handful of lines: kernel warnings worth seeing.
    dump guest "$LOG" 30
    dump molt "$LOG.err" 15
fi
lab_end
