# cpr-20: twenty live updates in a row under a running guest, exec and
# transfer mode in turn, each one to a different molt build. The guest has 2
# vCPUs, a virtio disk and a NIC, RAM in molt's memfd (no --mem-file: it only
# survives because it is handed over), and runs the CPR workload of
# lib/cpr.sh (counter on the console, records on its disk, a TCP connection to
# L2). The tap is created by molt itself, not persistent: it lives only as
# long as some molt holds its descriptor, so a handover that dropped it would
# take the guest's network (and L2's address on it) down.
#
# Two binaries: /lab/bin/molt (version A) and /lab/bin/molt-next, the same
# source built with MOLT_BUILD_VERSION=lab-next (version B; lab.sh builds it
# for scenarios that name it on a `lab-needs:` line). Every step switches
# binary, so `status` must report the other version after it. Steps 1-10 are
# exec, transfer, exec, ... starting on A; steps 11-20 begin with a transfer,
# so both modes run in both directions (A to B and B to A); that is the one
# place where two transfers follow each other. Step 20 is an exec; three
# more execs follow it (23 updates in all), and the process must hold the
# same number of descriptors after each of those three (a leak per exec would
# otherwise hide: with strict alternation each process lives through one
# exec only).
#
# After each step: the reply is `ok resumed mode=M pause_us=U version=V
# phases=...` with
# the new version, `status` says running with that version and the right pid
# (exec: the same; transfer: the new process, and the old one exited 0), and
# the counter and the TCP connection moved on. After all of them: the counter
# never reset or skipped, the records have no gap or duplicate (in the guest
# and on the image read from L2), one TCP connection throughout with no gap,
# no virtio/block errors or hung tasks in the guest's kernel log, power-off
# exits 0. Reports pause_us (molt's) min/median/max overall and per mode, and
# the guest-visible gap in the counter stream seen from L2 per mode
# (*_count_gap_ms, at COUNT_MS resolution) and over the whole run.
# lab-needs: molt-next
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/cpr.sh

UPDATES=${UPDATES:-20}
# Then execs only: step 20 is one, and three more follow.
EXEC_RUN=3
TOTAL=$((UPDATES + EXEC_RUN))
# A console that lost its reader must fail a check, not kill this script.
trap '' PIPE
IMG=/tmp/disk.img
NEXT=/lab/bin/molt-next

if [ ! -x /lab/bin/molt ] || [ ! -x $NEXT ]; then
    fail molt "binary missing (molt: $(ls /lab/bin/molt 2>&1), molt-next: $(ls $NEXT 2>&1))"
    lab_end
    exit 0
fi

t_start=$(now_ms)
VER_A=$(version /lab/bin/molt)
VER_B=$(version $NEXT)
echo "LAB-INFO versions: molt=$VER_A molt-next=$VER_B"
check versions_differ "$([ -n "$VER_A" ] && [ -n "$VER_B" ] && [ "$VER_A" != "$VER_B" ] && echo yes || echo no)" yes

if ! cpr_boot_workload cpr-20; then
    lab_end
    exit 0
fi

# ---- the updates ----
: > /run/pause.all; : > /run/pause.exec; : > /run/pause.transfer; : > /run/fds; : > /run/steps
ok_reply=0 ok_status=0 ok_pid=0 ok_progress=0 ok_old_exit=0 transfers=0
bin=/lab/bin/molt
step=1
t_updates=$(now_ms)
while [ $step -le $TOTAL ]; do
    # exec on odd steps up to 10, on even steps after (see the header).
    if [ $step -gt "$UPDATES" ] || [ $(( (step + (step > 10)) % 2 )) = 1 ]; then mode=exec; else mode=transfer; fi
    if [ $bin = /lab/bin/molt ]; then from=$VER_A bin=$NEXT want=$VER_B; else from=$VER_B bin=/lab/bin/molt want=$VER_A; fi
    c0=$(counts)
    m0=$(server_field msgs)
    t0_us=$(labtime now)
    t0=$((t0_us / 1000))
    if [ $mode = exec ]; then
        reply=$(molt ctl "$SOCK" cpr-exec $bin 2>&1)
        want_pid=$VMM_PID
    else
        transfers=$((transfers + 1))
        if ! start_incoming $bin /run/molt-step$step.err; then
            fail "step${step}_incoming" "$bin --incoming unix:$XFER: no socket (alive: $(alive "$NEW_PID" && echo yes || echo no))"
            dump "step$step-stderr" /run/molt-step$step.err 30
            break
        fi
        reply=$(molt ctl "$SOCK" cpr-transfer $XFER 2>&1)
        old_pid=$VMM_PID
        want_pid=$NEW_PID
    fi
    t1_us=$(labtime now)
    cmd_ms=$((t1_us / 1000 - t0))
    echo "$step $mode $t0_us $t1_us" >> /run/steps
    pause=$(field pause_us "$reply")
    echo "LAB-INFO step $step: $mode $from -> $want: $reply (command ${cmd_ms} ms)"
    case $reply in
    "ok resumed mode=$mode pause_us="*" version=$want phases="*) ok_reply=$((ok_reply + 1)) ;;
    *) echo "LAB-CHECK-FAIL step${step}_reply: got '$reply', want 'ok resumed mode=$mode ... version=$want phases=...'" ;;
    esac
    if [ $mode = transfer ]; then
        case $reply in
        "ok resumed"*)
            wait_exit "$old_pid" 30
            if [ "$EXIT_RC" = 0 ]; then ok_old_exit=$((ok_old_exit + 1)); else
                echo "LAB-CHECK-FAIL step${step}_old_exit: old molt $old_pid exit $EXIT_RC"; fi
            VMM_PID=$NEW_PID
            ;;
        *)
            # Refused: the old process keeps the guest; the new one should give up.
            kill "$NEW_PID" 2>/dev/null
            ;;
        esac
    fi
    case $pause in
    [0-9]*) echo "$pause" >> /run/pause.all; echo "$pause" >> /run/pause.$mode ;;
    esac
    st=$(molt ctl "$SOCK" status 2>&1)
    echo "LAB-INFO step $step status: $st"
    case $st in
    "ok state=running vcpus=2 "*" version=$want "*) ok_status=$((ok_status + 1)) ;;
    *) echo "LAB-CHECK-FAIL step${step}_status: got '$st', want running with version=$want" ;;
    esac
    if [ "$(field pid "$st")" = "$want_pid" ]; then ok_pid=$((ok_pid + 1)); else
        echo "LAB-CHECK-FAIL step${step}_pid: status pid $(field pid "$st"), want $want_pid"; fi
    # Open descriptors of the process now running the guest: a handover that
    # leaks some shows as growth from the first ten steps to the last ten.
    fds=$(ls /proc/"$VMM_PID"/fd 2>/dev/null | wc -l)
    echo "$step $fds" >> /run/fds
    if moved_on "$c0" "$m0" "step${step}_progress"; then ok_progress=$((ok_progress + 1)); else break; fi
    step=$((step + 1))
done
result updates_ms $(( $(now_ms) - t_updates ))
result fds_per_step "$(awk '{ printf "%s%s", (NR > 1 ? "," : ""), $2 }' /run/fds)"
# The same process exec'ed again and again must hold the same descriptors
# each time: the execs after step UPDATES.
check exec_fds_stable "$(awk -v a="$UPDATES" '$1 > a { if (n++ && $2 != f) bad = 1; f = $2 } END { print (n > 1 && !bad ? "yes" : "no") }' /run/fds)" yes
check replies_ok $ok_reply $TOTAL
check status_version_ok $ok_status $TOTAL
check status_pid_ok $ok_pid $TOTAL
check guest_progress_ok $ok_progress $TOTAL
check old_transfer_molt_exit_ok $ok_old_exit $transfers
set -- $(stats /run/pause.all)
result pause_us_min "${1:-none}"
result pause_us_median "${2:-none}"
result pause_us_max "${3:-none}"
set -- $(stats /run/pause.exec)
result exec_pause_us "min=${1:-none} median=${2:-none} max=${3:-none}"
set -- $(stats /run/pause.transfer)
result transfer_pause_us "min=${1:-none} median=${2:-none} max=${3:-none}"

step_gap_results exec transfer

# ---- after all of them ----
if [ $ok_progress != $TOTAL ]; then
    # The guest (or its console) is gone: commands to it would only time out.
    kill -9 "$VMM_PID" 2>/dev/null
elif alive "$VMM_PID"; then
    cpr_workload_end
else
    fail guest_alive "molt $VMM_PID is gone"
fi
for f in "$VMM_LOG.err" /run/molt-step*.err; do
    [ -f "$f" ] || continue
    grep -i -E 'error|warn|panic' "$f" | sed "s|^|LAB-INFO ${f##*/}: |"
done
if [ "$LAB_FAILED" != 0 ]; then
    for f in /run/molt-step*.err; do dump "${f##*/}" "$f" 15; done
fi
dump_vmm guest
kill "$SERVER_PID" 2>/dev/null
result lab_ms $(( $(now_ms) - t_start ))
lab_end
