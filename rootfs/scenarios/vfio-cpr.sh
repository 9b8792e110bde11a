# vfio-cpr: QEMU's edu device, passed through by molt (--vfio) to the L3
# guest, keeps running through live updates (issue 11, items 2, 4, 5).
#
# 1. The guest's labedu checks edu (ID, liveness, factorials, DMA both ways,
#    MSIs), then leaves state in it that must outlive every update: a
#    factorial in its register and a pattern in the second half of its buffer
#    (`labedu keep`). Then `labedu loop` drives edu without a break: liveness,
#    a pattern DMA'd into the first half of the buffer and back, an MSI per
#    DMA, every result checked.
# 2. Ten updates, exec and transfer in turn, each started just after the loop
#    announced a DMA (`EDU-DMA N`, printed just before it starts it): each
#    reply is `ok resumed`, the loop goes on.
# 3. Failures, edu attached and the loop running: the new process of a
#    transfer killed while it waits, once it holds the descriptors, once it
#    has the state, once it has taken the DMA mappings (MOLT_TEST_KILL_AT,
#    src/cpr/fault.rs: molt-next has the hook); an exec whose execve fails;
#    an exec into an image that dies, and into a molt killed once it has
#    taken the DMA mappings (both rolled back by the guardian). Each time the
#    old process (or the guardian's rollback) keeps the guest, `status` says
#    running.
# 4. The loop stops and reports: every iteration right, one MSI per DMA. The
#    kept factorial and pattern read back unchanged (`labedu kept`), and a
#    full labedu run passes again.
# 5. L2's kprobes on VFIO's open, release, enable, disable and reset paths:
#    they fire when molt boots (the control) and never during the updates and
#    failures: molt never re-opened, closed or reset edu.
# 6. Measure: the pause of the ten updates with edu (5 exec, 5 transfer) and
#    of ten more of a guest without VFIO, min/median/max, and the VFIO steps
#    molt logs (old side: unmap_vaddr_us; new side: map_vaddr_us,
#    irq_attach_us).
# lab-needs: molt-next
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/cpr.sh
. /lab/lib/edu.sh

SOCK=/run/molt.sock
LOG=/run/guest.log
UPDATES=10
STOP=/tmp/edu.stop
RESULT=/tmp/edu.loop
trap '' PIPE

if [ ! -x /lab/bin/molt ]; then
    fail molt "binary missing"
    lab_end
    exit 0
fi
t_start=$(now_ms)

edu_find
edu_to_vfio

# ---- kprobes on VFIO's open, release, enable, disable and reset paths ----
T=/sys/kernel/tracing
PROBES="vfio_group_fops_open vfio_group_fops_release vfio_device_fops_release
vfio_pci_core_enable vfio_pci_core_disable pci_reset_function pci_try_reset_function
__pci_reset_function_locked"
mkdir -p $T/instances/vcpr
probes=
for p in $PROBES; do
    if echo "p:vcpr_$p $p" >> $T/kprobe_events 2>/dev/null &&
        echo 1 > $T/instances/vcpr/events/kprobes/vcpr_$p/enable; then
        probes="$probes $p"
    else
        echo "LAB-INFO kprobe $p: not available"
    fi
done
result kprobes "$(echo $probes | tr ' ' ,)"
# hits P: how often probe P fired so far.
hits() { grep -c " vcpr_$1:" $T/instances/vcpr/trace; }
# snapshot FILE: every probe's hits, one "probe count" line each.
snapshot() { for p in $probes; do echo "$p $(hits "$p")"; done > "$1"; }
# delta A B: the probes that fired between snapshots A and B, or "none".
delta() {
    awk 'NR == FNR { a[$1] = $2; next } $2 != a[$1] { printf "%s+%d ", $1, $2 - a[$1]; d = 1 }
         END { if (!d) printf "none" }' "$1" "$2"
}

version=$(molt version | awk '{ print $2 }')

# boot_guest ARGS...: molt with the lab guest, 256 MiB, the control socket.
boot_guest() {
    printf '%s\n' --kernel /lab/vmlinuz --initrd /lab/guest.cpio.gz --cmdline "$DEVICE_CMDLINE" \
        --serial stdio --mem 256M --control "$SOCK" "$@" > /run/argv
    set --
    while IFS= read -r a; do set -- "$@" "$a"; done < /run/argv
    vmm_start "$LOG" molt run "$@"
    guest_ready "$LOG"
}

# dma_lines: the loop's DMA announcements so far.
dma_lines() { count "$LOG" '^EDU-DMA [0-9]'; }
# loop_fails: the loop's failed iterations so far.
loop_fails() { count "$LOG" '^EDU-LOOP-FAIL'; }

# update MODE STEP ERRLOG: one update; the guest must run on here (the loop
# announces two more DMAs). Appends the pause to /run/pause.$MODE.$SET.
# Returns 1 when the guest did not run on.
update() {
    _mode=$1 _step=$2 _err=$3
    if [ $_mode = exec ]; then
        _reply=$(molt ctl "$SOCK" cpr-exec 2>&1)
    else
        if ! start_incoming /lab/bin/molt "$_err"; then
            fail "${SET}_step${_step}_incoming" "no incoming socket"
            dump "step$_step-stderr" "$_err" 20
            return 1
        fi
        _reply=$(molt ctl "$SOCK" cpr-transfer $XFER 2>&1)
    fi
    echo "LAB-INFO $SET step $_step $_mode: $_reply"
    case $_reply in
    "ok resumed mode=$_mode pause_us="*" version=$version phases="*)
        OK_REPLIES=$((OK_REPLIES + 1))
        field pause_us "$_reply" >> /run/pause.$_mode.$SET
        ;;
    *) echo "LAB-CHECK-FAIL ${SET}_step${_step}_reply: $_reply" ;;
    esac
    if [ $_mode = transfer ]; then
        case $_reply in
        "ok resumed"*)
            wait_exit "$VMM_PID" 30
            [ "$EXIT_RC" = 0 ] || echo "LAB-CHECK-FAIL ${SET}_step${_step}_old_exit: $EXIT_RC"
            [ "$EXIT_RC" = 0 ] && OK_OLD_EXIT=$((OK_OLD_EXIT + 1))
            VMM_PID=$NEW_PID
            ;;
        *) kill "$NEW_PID" 2>/dev/null ;;
        esac
    fi
}

# runs_on NAME: the guest's edu loop announces two more DMAs within 60 s, and
# no failed iteration.
runs_on() {
    _d=$(dma_lines)
    if wait_count "$LOG" '^EDU-DMA [0-9]' $((_d + 2)) 60 && [ "$(loop_fails)" = 0 ]; then
        return 0
    fi
    echo "LAB-CHECK-FAIL $1: the edu loop did not go on (DMAs $_d -> $(dma_lines), failures $(loop_fails))"
    return 1
}

# after_dma: returns once the loop has announced a new DMA (it starts it next).
after_dma() {
    _d=$(dma_lines)
    wait_count "$LOG" '^EDU-DMA [0-9]' $((_d + 1)) 60
}

# vfio_steps: the VFIO steps molt logged, from every molt's stderr.
vfio_steps() {
    cat "$LOG.err" /run/molt-*.err 2>/dev/null > /run/all.err
    for k in unmap_vaddr_us map_vaddr_us irq_attach_us; do
        sed -n "s/.*VFIO .*[ :]$k=\([0-9]*\).*/\1/p" /run/all.err > /run/$k
        set -- $(stats /run/$k)
        result "vfio_${k}" "n=$(wc -l < /run/$k) min=${1:-none} median=${2:-none} max=${3:-none}"
    done
}

# ten_updates: exec, transfer, ... each after a fresh DMA when the loop runs.
ten_updates() {
    OK_REPLIES=0 OK_OLD_EXIT=0 OK_ON=0
    : > /run/pause.exec.$SET; : > /run/pause.transfer.$SET
    step=1
    while [ $step -le $UPDATES ]; do
        if [ $((step % 2)) = 1 ]; then mode=exec; else mode=transfer; fi
        [ "$SET" = edu ] && after_dma
        update $mode $step /run/molt-$SET-$step.err
        if [ "$SET" = edu ]; then
            runs_on "edu_step${step}_runs_on" && OK_ON=$((OK_ON + 1))
        else
            [ "$(guest_cmd true 60)" = 0 ] && OK_ON=$((OK_ON + 1))
        fi
        step=$((step + 1))
    done
    check ${SET}_replies_ok $OK_REPLIES $UPDATES
    check ${SET}_old_transfer_exit_ok $OK_OLD_EXIT $((UPDATES / 2))
    check ${SET}_guest_runs_on $OK_ON $UPDATES
    for m in exec transfer; do
        set -- $(stats /run/pause.$m.$SET)
        result "${SET}_${m}_pause_us" "min=${1:-none} median=${2:-none} max=${3:-none}"
    done
}

# ---- 1. edu in the guest, its state kept, the loop started ----
snapshot /run/probes.0
SET=edu
if ! boot_guest --vfio "$EDU"; then
    kill -9 "$VMM_PID" 2>/dev/null
    dump_vmm guest
    lab_end
    exit 0
fi
snapshot /run/probes.boot
opened=$(delta /run/probes.0 /run/probes.boot)
echo "LAB-INFO probes at boot: $opened"
case $opened in *vfio_group_fops_open+*) check boot_opens_group yes yes ;; *) check boot_opens_group no yes ;; esac
gcheck labedu_module 60 "modprobe labedu"
rc=$(guest_cmd "labedu 1 > /tmp/e1 2>&1; r=\$?; sed 's/^/EDU1 /' /tmp/e1; exit \$r" 120)
check labedu_1_rc "$rc" 0
rc=$(guest_cmd "labedu keep 5 > /tmp/k 2>&1; r=\$?; sed 's/^/KEEP /' /tmp/k; exit \$r" 60)
check keep_rc "$rc" 0
gout KEEP | sed 's/^/LAB-INFO labedu keep: /'
check keep_set "$(gout KEEP | sed -n 's/^EDU-CHECK keep_set \([A-Z]*\).*/\1/p')" PASS
gcheck loop_started 30 "rm -f $STOP $RESULT $RESULT.done; labedu loop 3 $STOP $RESULT &"
wait_count "$LOG" '^EDU-DMA [0-9]' 2 60 || fail loop_running "no EDU-DMA from the loop"

# ---- 2. ten updates ----
t_updates=$(now_ms)
[ "$LAB_FAILED" = 0 ] && ten_updates
result edu_updates_ms $(( $(now_ms) - t_updates ))
# The VFIO steps of these ten updates (the failures below log more).
vfio_steps
snapshot /run/probes.updates
check updates_open_close_reset "$(delta /run/probes.boot /run/probes.updates)" none

# ---- 3. failures: the guest and edu stay on the old process ----
# fails NAME WORDS: the last reply is an error naming WORDS, status says
# running, and the loop goes on.
fails() {
    echo "LAB-INFO failure $1: $REPLY"
    case $REPLY in "error: "*"$2"*) check "fail_${1}_reply" yes yes ;; *) check "fail_${1}_reply" "$REPLY" "error naming $2" ;; esac
    _st=$(molt ctl "$SOCK" status 2>&1)
    case $_st in "ok state=running"*) check "fail_${1}_status" running running ;; *) check "fail_${1}_status" "$_st" running ;; esac
    if runs_on "fail_${1}_runs_on"; then check "fail_${1}_edu_runs_on" yes yes; else check "fail_${1}_edu_runs_on" no yes; fi
    VMM_PID_NOW=$(field pid "$_st")
}
if [ "$LAB_FAILED" = 0 ]; then
    # Transfer: the new process killed while it waits for the old one.
    start_incoming /lab/bin/molt /run/molt-fail-wait.err
    kill -9 "$NEW_PID"; wait "$NEW_PID" 2>/dev/null
    after_dma
    REPLY=$(molt ctl "$SOCK" cpr-transfer $XFER 2>&1)
    fails transfer_waiting "cpr-transfer"
    # Transfer: the new process killed at each step (src/cpr/fault.rs).
    for s in adopted state vaddr; do
        killer $s
        start_incoming /run/molt-kill-$s /run/molt-fail-$s.err
        after_dma
        REPLY=$(molt ctl "$SOCK" cpr-transfer $XFER 2>&1)
        wait_exit "$NEW_PID" 30
        result "fail_transfer_${s}_new_exit" "$EXIT_RC"
        grep "MOLT_TEST_KILL_AT" /run/molt-fail-$s.err | sed "s/^/LAB-INFO new molt ($s): /"
        fails transfer_$s "cpr-transfer"
    done
    # Exec: execve itself fails (the image vanishes after the probe).
    printf '#!/bin/sh\necho "molt x state-formats=1,2,3,4"\nrm -f "$0"\n' > /run/molt-vanish
    chmod +x /run/molt-vanish
    after_dma
    REPLY=$(molt ctl "$SOCK" cpr-exec /run/molt-vanish 2>&1)
    fails exec_execve "cpr-exec"
    # Exec: the new image dies (a script), then a molt killed once it has
    # taken the DMA mappings: the guardian resumes the guest on the previous
    # image, in its own process.
    printf '#!/bin/sh\n[ "$1" = version ] && exec /lab/bin/molt version\nexit 7\n' > /run/molt-dies
    chmod +x /run/molt-dies
    killer vaddr
    for target in dies kill-vaddr; do
        after_dma
        REPLY=$(molt ctl "$SOCK" cpr-exec /run/molt-$target 2>&1)
        fails exec_$target "could not resume"
        [ -n "$VMM_PID_NOW" ] && VMM_PID=$VMM_PID_NOW
    done
fi
snapshot /run/probes.failures
check failures_open_close_reset "$(delta /run/probes.updates /run/probes.failures)" none

# ---- 4. the loop's verdict, the kept state, edu once more ----
rc=$(guest_cmd "touch $STOP; i=0; while [ ! -e $RESULT.done ] && [ \$i -lt 600 ]; do sleep 0.1; i=\$((i+1)); done; sed 's/^/LOOP /' $RESULT" 90)
gout LOOP | sed 's/^/LAB-INFO edu loop: /'
check edu_loop "$(gout LOOP | sed -n 's/^EDU-CHECK loop \([A-Z]*\).*/\1/p')" PASS
result edu_loop_failures "$(loop_fails)"
rc=$(guest_cmd "labedu kept 5 > /tmp/k 2>&1; r=\$?; sed 's/^/KEPT /' /tmp/k; exit \$r" 60)
gout KEPT | sed 's/^/LAB-INFO labedu kept: /'
check kept_fact "$(gout KEPT | sed -n 's/^EDU-CHECK kept_fact \([A-Z]*\).*/\1/p')" PASS
check kept_buf "$(gout KEPT | sed -n 's/^EDU-CHECK kept_buf \([A-Z]*\).*/\1/p')" PASS
rc=$(guest_cmd "labedu 2 > /tmp/e2 2>&1; r=\$?; sed 's/^/EDU2 /' /tmp/e2; exit \$r" 120)
check labedu_2_rc "$rc" 0
gout EDU2 | sed 's/^/LAB-INFO labedu run 2: /'
guest_cmd "grep labedu /proc/interrupts | sed 's/^/IRQ /'" 30 > /dev/null
result guest_edu_interrupts "$(gval IRQ | tr -s ' ')"
# A mapping a dead new process had taken was taken back: by the old process
# (transfer, killed at vaddr) and by the guardian's rollback (exec).
check vaddr_taken_back "$(cat "$LOG.err" /run/molt-*.err | grep -c 'had another process.s address')" 2

# The guest may now run in a guardian's process (not this shell's child).
echo poweroff >&3
i=0
while alive "$VMM_PID" && [ $i -lt 900 ]; do i=$((i + 1)); sleep 0.1; done
check molt_gone "$(alive "$VMM_PID" && echo no || echo yes)" yes
snapshot /run/probes.end
echo "LAB-INFO probes at the last molt's exit: $(delta /run/probes.failures /run/probes.end)"
case $(delta /run/probes.failures /run/probes.end) in *vfio_group_fops_release+*) check exit_releases_group yes yes ;; *) check exit_releases_group no yes ;; esac
dump_vmm guest
grep -h -E 'VFIO|rolling back|guardian|error' "$LOG.err" /run/molt-*.err 2>/dev/null | sed 's/^/LAB-INFO molt: /' | tail -n 60

# ---- 6. the same updates without VFIO, for the pause ----
SET=novfio
if boot_guest; then
    ten_updates
    guest_poweroff novfio_molt_exit
else
    kill -9 "$VMM_PID" 2>/dev/null
    dump_vmm guest-novfio
fi
result lab_ms $(( $(now_ms) - t_start ))
lab_end
