# fault-storm: live updates that fail, one after another, under the CPR
# workload of lib/cpr.sh (a counter on the console, numbered records on the
# virtio disk, a TCP connection to L2) on a 2-vCPU guest (issue 13, item 2):
#
# 1. TRANSFER_FAULTS (50) transfers whose new process is killed (SIGKILL) at a
#    step of the protocol drawn at random: before the transfer is asked
#    (`waiting`: this script kills it), or at one of the MOLT_TEST_KILL_AT
#    steps (src/cpr/fault.rs) from HELLO to RESTORED: hello, adopted, built,
#    state, restored. The old process keeps the guest and replies an error.
# 2. EXEC_FAULTS (20) execs into an image that dies after execve, at a point
#    drawn at random: at once (`execve`: a script that kills itself before any
#    molt code runs) or at a MOLT_TEST_KILL_AT step of the exec arrival:
#    adopted, built, restored. The guardian resumes the guest on the previous
#    image, in its own process, which replies the error.
#    The deaths come from hooks, not from a delay-then-SIGKILL from outside:
#    a delay can land after the guardian has let go (after which a death
#    loses the guest like any crash: no point to test) and where it lands
#    varies from run to run under TCG, so a seed could not replay it.
# 3. CLEAN (50) updates, exec and transfer in turn (the last a transfer),
#    each to the other build (molt, molt-next).
#
# The points are drawn from SEED with an LCG in shell arithmetic, so a seed
# names the same run on any L2: `MOLT_LAB_APPEND=molt.env.SEED=N scripts/lab.sh
# fault-storm` replays one (default: a fresh seed; LAB-RESULT seed says which).
# TRANSFER_FAULTS, EXEC_FAULTS and CLEAN are molt.env parameters too.
#
# After each update: the reply (an error for a fault, `ok resumed` with the
# other version otherwise), `status` says running with the right version and
# pid (a fault: the old process, or for exec the guardian's; clean: the same
# for exec, the new process for transfer), exactly one process holds the
# guest's RAM (the memfd molt-ram) and it is that pid (the guardian, which
# holds copies while an exec is under way, is gone within 10 s), and the
# counter and the TCP stream move on. A killed process died of SIGKILL where
# it was told (its hook's log line). The process that kept the guest through
# all the transfer faults holds as many descriptors and threads after each.
# After all: the counter never reset or skipped, the records are whole in the
# guest and on the image, one TCP connection throughout with no gap, no
# virtio/block errors in the guest's kernel log, power-off exits 0.
# Reports the guest-visible gap per kind of update and the clean updates'
# pause_us.
# lab-needs: molt-next
# lab-timeout: 1200
. /lab/lib/common.sh
. /lab/lib/devices.sh
. /lab/lib/cpr.sh

TRANSFER_FAULTS=${TRANSFER_FAULTS:-50}
EXEC_FAULTS=${EXEC_FAULTS:-20}
CLEAN=${CLEAN:-50}
SEED=${SEED:-$(( $(labtime now) % 1000000 ))}
TRANSFER_POINTS="waiting hello adopted built state restored"
EXEC_POINTS="execve adopted built restored"
trap '' PIPE
IMG=/tmp/disk.img
NEXT=/lab/bin/molt-next

result seed "$SEED"
echo "LAB-INFO fault-storm: seed=$SEED (replay: MOLT_LAB_APPEND=molt.env.SEED=$SEED scripts/lab.sh fault-storm)"
if [ ! -x /lab/bin/molt ] || [ ! -x $NEXT ]; then
    fail molt "binary missing (molt: $(ls /lab/bin/molt 2>&1), molt-next: $(ls $NEXT 2>&1))"
    lab_end
    exit 0
fi

# pick WORDS...: one of WORDS, drawn from the seeded generator. Sets PICK.
RNG=$SEED
pick() {
    RNG=$(( (RNG * 1103515245 + 12345) % 2147483648 ))
    eval "PICK=\${$(( (RNG / 65536) % $# + 1 ))}"
}

# The plan, one "N MODE POINT" line per update (POINT clean: no fault).
: > /run/plan
n=0
i=0
while [ $i -lt "$TRANSFER_FAULTS" ]; do
    pick $TRANSFER_POINTS; n=$((n + 1)); i=$((i + 1)); echo "$n transfer $PICK" >> /run/plan
done
i=0
while [ $i -lt "$EXEC_FAULTS" ]; do
    pick $EXEC_POINTS; n=$((n + 1)); i=$((i + 1)); echo "$n exec $PICK" >> /run/plan
done
i=1
while [ $i -le "$CLEAN" ]; do
    if [ $(( (CLEAN - i) % 2 )) = 0 ]; then m=transfer; else m=exec; fi
    n=$((n + 1)); i=$((i + 1)); echo "$n $m clean" >> /run/plan
done
TOTAL=$n
for p in $TRANSFER_POINTS $EXEC_POINTS; do killer $p; done
result plan "$(awk '$3 != "clean" { k[$2 "-" $3]++ } END { for (x in k) printf "%s=%d ", x, k[x] }' /run/plan |
    tr ' ' '\n' | sort | tr '\n' ' ' | sed 's/^ *//; s/ *$//; s/ /,/g')"

# ram_holders: the pids of the processes that hold the guest's RAM, comma
# separated, in one pass over /proc (each command costs under TCG).
ram_holders() {
    ls -l /proc/[0-9]*/fd 2>/dev/null | awk '
        /^\/proc\/[0-9]+\/fd:$/ { split($0, p, "/"); pid = p[3] }
        /memfd:molt-ram/ && !seen[pid]++ { printf "%s%s", (n++ ? "," : ""), pid }
        END { print "" }'
}

# one_holder PID: within 10 s, PID is the only process that holds the
# guest's RAM. Sets HOLDERS to what was seen last.
one_holder() {
    _i=0
    while :; do
        HOLDERS=$(ram_holders)
        [ "$HOLDERS" = "$1" ] && return 0
        _i=$((_i + 1))
        [ $_i -le 50 ] || return 1
        sleep 0.2
    done
}

t_start=$(now_ms)
VER_A=$(version /lab/bin/molt)
VER_B=$(version $NEXT)
echo "LAB-INFO versions: molt=$VER_A molt-next=$VER_B"
check versions_differ "$([ -n "$VER_A" ] && [ -n "$VER_B" ] && [ "$VER_A" != "$VER_B" ] && echo yes || echo no)" yes
if ! cpr_boot_workload fault-storm; then
    lab_end
    exit 0
fi
check first_holder "$(ram_holders)" "$VMM_PID"

# ---- the updates ----
: > /run/pause.exec; : > /run/pause.transfer; : > /run/steps; : > /run/procs; : > /run/walls
ok_reply=0 ok_status=0 ok_pid=0 ok_holder=0 ok_progress=0 ok_killed=0 ok_hook=0 ok_old_exit=0
old_exits=0 done_n=0
# Whether the guest's process is this shell's child (not after an exec
# fault's rollback: then it runs in the guardian's process).
child=yes
bin=/lab/bin/molt ver=$VER_A
t_updates=$(now_ms)
while read -r n mode point <&4; do
    if [ "$point" = clean ]; then
        if [ $bin = /lab/bin/molt ]; then target=$NEXT want=$VER_B; else target=/lab/bin/molt want=$VER_A; fi
    else
        target=/run/molt-kill-$point want=$ver
    fi
    c0=$(counts)
    m0=$(server_field msgs)
    old_pid=$VMM_PID
    hook_lines=$(count "$VMM_LOG.err" "MOLT_TEST_KILL_AT=$point")
    t0=$(labtime now)
    if [ $mode = exec ]; then
        reply=$(molt ctl "$SOCK" cpr-exec $target 2>&1)
    else
        if ! start_incoming $target /run/molt-$n.err; then
            fail "update${n}_incoming" "$target --incoming unix:$XFER: no socket (alive: $(alive "$NEW_PID" && echo yes || echo no))"
            dump "update$n-stderr" /run/molt-$n.err 30
            break
        fi
        if [ "$point" = waiting ]; then kill -9 "$NEW_PID"; fi
        reply=$(molt ctl "$SOCK" cpr-transfer $XFER 2>&1)
    fi
    t1=$(labtime now)
    echo "$n $mode-$point $t0 $t1" >> /run/steps
    echo "LAB-INFO update $n: $mode $point ($target): $reply (command $(( (t1 - t0) / 1000 )) ms)"
    case $point/$mode/$reply in
    clean/*/"ok resumed mode=$mode pause_us="*" version=$want phases="*)
        ok_reply=$((ok_reply + 1))
        field pause_us "$reply" >> /run/pause.$mode
        ;;
    clean/*) echo "LAB-CHECK-FAIL update${n}_reply: $mode: '$reply', want ok resumed ... version=$want" ;;
    */transfer/"error: "*"cpr-transfer"* | */exec/"error: cpr-exec: "*"could not resume"*)
        ok_reply=$((ok_reply + 1))
        ;;
    *) echo "LAB-CHECK-FAIL update${n}_reply: $mode killed at $point: '$reply', want an error" ;;
    esac
    want_pid=$old_pid
    if [ $mode = transfer ]; then
        if [ "$point" = clean ]; then
            want_pid=$NEW_PID
            old_exits=$((old_exits + 1))
            if [ $child = yes ]; then
                wait_exit "$old_pid" 30
            else
                # Not this shell's child: only its end can be seen.
                _i=0
                while alive "$old_pid" && [ $_i -lt 300 ]; do _i=$((_i + 1)); sleep 0.1; done
                if alive "$old_pid"; then EXIT_RC=alive; else EXIT_RC=0; fi
            fi
            if [ "$EXIT_RC" = 0 ]; then ok_old_exit=$((ok_old_exit + 1)); else
                echo "LAB-CHECK-FAIL update${n}_old_exit: old molt $old_pid: $EXIT_RC"; fi
            VMM_PID=$NEW_PID child=yes
        else
            wait_exit "$NEW_PID" 30
            if [ "$EXIT_RC" = 137 ]; then ok_killed=$((ok_killed + 1)); else
                echo "LAB-CHECK-FAIL update${n}_new_exit: new molt at $point: $EXIT_RC, want 137 (SIGKILL)"
                dump "update$n-stderr" /run/molt-$n.err 20
            fi
            if [ "$point" != waiting ]; then
                if grep -q "MOLT_TEST_KILL_AT=$point: killing myself" /run/molt-$n.err; then
                    ok_hook=$((ok_hook + 1)); else echo "LAB-CHECK-FAIL update${n}_hook: no $point in its log"; fi
            fi
        fi
    fi
    st=$(molt ctl "$SOCK" status 2>&1)
    case $st in
    "ok state=running vcpus=2 "*" version=$want "*) ok_status=$((ok_status + 1)) ;;
    *) echo "LAB-CHECK-FAIL update${n}_status: got '$st', want running with version=$want" ;;
    esac
    pid=$(field pid "$st")
    if [ $mode = exec ] && [ "$point" != clean ]; then
        # The guardian's rollback: the guest runs in its process.
        if [ -n "$pid" ] && [ "$pid" != "$old_pid" ] && alive "$pid"; then ok_pid=$((ok_pid + 1)); else
            echo "LAB-CHECK-FAIL update${n}_pid: status pid '$pid', want the guardian's (not $old_pid)"; fi
        [ -n "$pid" ] && VMM_PID=$pid child=no
        if [ "$point" != execve ]; then
            if [ "$(count "$VMM_LOG.err" "MOLT_TEST_KILL_AT=$point")" -gt "$hook_lines" ]; then
                ok_hook=$((ok_hook + 1)); else echo "LAB-CHECK-FAIL update${n}_hook: no $point in molt's log"; fi
        fi
    elif [ "$pid" = "$want_pid" ]; then ok_pid=$((ok_pid + 1)); else
        echo "LAB-CHECK-FAIL update${n}_pid: status pid '$pid', want $want_pid"
    fi
    if [ "$point" = clean ]; then bin=$target ver=$want; fi
    if one_holder "$VMM_PID"; then ok_holder=$((ok_holder + 1)); else
        echo "LAB-CHECK-FAIL update${n}_holders: the guest's RAM is held by $HOLDERS, want only $VMM_PID"; fi
    echo "$n $mode $point $(ls /proc/"$VMM_PID"/fd 2>/dev/null | wc -l) $(sed -n 's/^Threads:[[:space:]]*//p' /proc/"$VMM_PID"/status 2>/dev/null)" >> /run/procs
    if moved_on "$c0" "$m0" "update${n}_progress"; then ok_progress=$((ok_progress + 1)); else break; fi
    done_n=$n
    echo $(( ($(labtime now) - t0) / 1000 )) >> /run/walls
done 4< /run/plan
result updates_ms $(( $(now_ms) - t_updates ))
result updates_done "$done_n"
set -- $(stats /run/walls)
result update_wall_ms "min=${1:-none} median=${2:-none} max=${3:-none}"
check replies_ok $ok_reply "$TOTAL"
check status_ok $ok_status "$TOTAL"
check status_pid_ok $ok_pid "$TOTAL"
check one_ram_holder_ok $ok_holder "$TOTAL"
check guest_progress_ok $ok_progress "$TOTAL"
check new_killed_ok $ok_killed "$TRANSFER_FAULTS"
# Every death at a hook was logged by the hook (the others: `waiting`, killed
# by this script, and `execve`, a script that kills itself).
check hooks_fired_ok $ok_hook "$(awk '$3 != "clean" && $3 != "waiting" && $3 != "execve"' /run/plan | wc -l)"
check old_transfer_molt_exit_ok $ok_old_exit $old_exits
# The process that kept the guest through every transfer fault: as many
# descriptors and threads after each (a leak per failed transfer would grow).
result transfer_fault_fds "$(awk '$3 != "clean" && $2 == "transfer" { printf "%s%s", (n++ ? "," : ""), $4 }' /run/procs)"
result exec_fault_fds "$(awk '$3 != "clean" && $2 == "exec" { printf "%s%s", (n++ ? "," : ""), $4 }' /run/procs)"
for c in 4:fds 5:threads; do
    check "transfer_faults_${c#*:}_stable" "$(awk -v c="${c%:*}" '$3 != "clean" && $2 == "transfer" { if (n++ && $c != f) bad = 1; f = $c }
        END { print (n > 1 && !bad ? "yes" : "no") }' /run/procs)" yes
done
for m in exec transfer; do
    set -- $(stats /run/pause.$m)
    result "clean_${m}_pause_us" "min=${1:-none} median=${2:-none} max=${3:-none}"
done
step_gap_results $(awk '{ print $2 }' /run/steps | sort -u)

# ---- after all of them ----
if [ $ok_progress != "$TOTAL" ]; then
    kill -9 "$VMM_PID" 2>/dev/null
elif alive "$VMM_PID"; then
    cpr_workload_end
else
    fail guest_alive "molt $VMM_PID is gone"
fi
check molt_panics "$(cat "$VMM_LOG.err" /run/molt-*.err 2>/dev/null | grep -c 'panicked')" 0
if [ "$LAB_FAILED" != 0 ]; then
    for f in /run/molt-*.err; do dump "${f##*/}" "$f" 15; done
    dump "molt-stderr" "$VMM_LOG.err" 100
fi
dump_vmm guest
kill "$SERVER_PID" 2>/dev/null
result lab_ms $(( $(now_ms) - t_start ))
lab_end
