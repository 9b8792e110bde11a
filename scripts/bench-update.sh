#!/usr/bin/env bash
# Live-update pause benchmark (SPEC.md "Pause time"; issue 12), directly on
# this machine's /dev/kvm with the tiny counting guest (tests/data/counting.elf),
# release build. Prints markdown tables.
#
# For each mode (exec, transfer, reboot) and each series - 1, 2, 4, 8 and 16
# vCPUs with 256 MiB, then 4 GiB and 16 GiB with 1 vCPU - one booted guest
# goes through RUNS updates, and a table per mode gives, as min / median / max
# over them:
#   pause_us   molt's own, from the reply (reboot mode: the restarted molt's
#              log): the last vCPU stopped to the vCPUs running again
#   floor      what no VMM can avoid here (`molt __floor`, src/vm/floor.rs):
#              exec and reboot: execve of a static binary, a VM with irqchip,
#              PIT and memslots, and N vCPUs; transfer: the KVM_GET_* and
#              KVM_SET_* of the state molt saves, for the VM and N vCPUs
#   each phase of the pause (the reply's phases=, src/phases.rs). `stop` (the
#              first kick to the last vCPU's acknowledgement) comes before the
#              pause as SPEC.md counts it; the other phases add up to it.
#              Reboot mode: the saving side's phases (cpr-save's reply), then
#              `restart` (the old molt exits, this script starts the new one:
#              the rest of pause_us), then the restarted molt's (its log).
# Guest RAM is a memfd (exec, transfer) or a --mem-file on /dev/shm (reboot
# mode: RAM stays in place, the state file goes next to it); untouched pages
# cost nothing, so 16 GiB is cheap.
#
# Then it draws two charts with scripts/svg-chart.sh, min / median / max in ms
# on a logarithmic scale (exec's pause is ten times transfer's):
#   CHARTS/pause-ram.svg     each mode's pause against guest RAM (1 vCPU)
#   CHARTS/pause-vcpus.svg   each mode's pause against vCPUs (the first size),
#                            with the floors dashed (reboot mode's floor is
#                            exec's, measured again: only exec's is drawn when
#                            both ran)
#
# Environment: MOLT_BIN (default: cargo build --release and use that), RUNS
# (20), CPUS ("1 2 4 8 16", with the first size), SIZES ("256M 4G 16G", the
# others with 1 vCPU), MODES ("exec transfer reboot"), KEEP (set: keep the
# scratch directory with every log and serial output), CHARTS (the charts'
# directory, default scripts/charts: the ones the README shows; a partial run
# should write elsewhere). The binary is copied to
# a scratch directory first: exec mode re-executes it by path, so a concurrent
# rebuild must not replace it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
kernel=$repo/tests/data/counting.elf
runs=${RUNS:-20}
cpus_list=${CPUS:-"1 2 4 8 16"}
sizes=${SIZES:-"256M 4G 16G"}
modes=${MODES:-"exec transfer reboot"}
if [[ -z ${MOLT_BIN:-} ]]; then
    . "$repo/scripts/target.sh"
    (cd "$repo" && cargo build --release --quiet)
    MOLT_BIN=$MOLT_RELEASE_BIN
fi
work=$(mktemp -d /tmp/molt-bench-update.XXXXXX)
molt=$work/molt
cp "$MOLT_BIN" "$molt"
count_step=1024
pids=() memfile=

cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    [[ -n $memfile ]] && rm -f "$memfile" "$memfile.state"
    if [[ -z ${KEEP:-} ]]; then
        rm -rf "$work"
    fi
    true
}
trap cleanup EXIT

die() {
    echo "bench-update: $*" >&2
    exit 1
}

now_us() { echo "${EPOCHREALTIME/[.,]/}"; }

# Whether a UNIX socket is listening on $1 (connecting would be taken for the
# old process by a molt waiting on --incoming unix:).
listening() {
    awk -v p="$1" 'NR > 1 && $4 == "00010000" && $8 == p { found = 1 } END { exit !found }' /proc/net/unix
}

counts() {
    local n
    n=$(grep -c '^count=' "$serial" 2>/dev/null) || true
    echo "${n:-0}"
}

# Waits (up to 20 s) until the serial file has at least $1 count lines.
wait_counts() {
    local deadline=$(($(now_us) + 20000000))
    while (($(counts) < $1)); do
        (($(now_us) < deadline)) || die "$label: the guest stalled at $(counts) lines; log: $(cat "$log")"
        sleep 0.005
    done
}

# The serial output without a last line cut short by `quit`.
complete_lines() {
    if [[ -z $(tail -c1 "$serial") ]]; then
        cat "$serial"
    else
        head -n -1 "$serial"
    fi
}

# The counting guest's output must be one run: one start line, then counts
# stepping by exactly count_step.
check_continuity() {
    awk -v step="$count_step" '
        $0 == "molt-guest: start" { starts++; next }
        /^count=/ {
            v = 0; h = substr($0, 7)
            for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789ABCDEF", substr(h, i, 1)) - 1
            if (prev != "" && v - prev != step) { printf "count %s after %x\n", h, prev; bad++ }
            prev = v; next
        }
        { printf "unexpected line: %s\n", $0; bad++ }
        END { if (starts != 1) { printf "%d start lines\n", starts; bad++ } exit bad > 0 }
    ' <(complete_lines) >&2 || die "$label: the guest's output is not one continuous run"
}

# boot LABEL SIZE CPUS MODE: one guest; in reboot mode its RAM is a
# --mem-file on /dev/shm.
boot() {
    label=$1
    local size=$2 cpus=$3 mode=$4
    dir=$work/$label
    mkdir -p "$dir"
    sock=$dir/ctl.sock serial=$dir/serial.out log=$dir/molt-0.log
    args=(--kernel "$kernel" --mem "$size" --cpus "$cpus" --serial "file:$serial" --control "$sock")
    if [[ $mode == reboot ]]; then
        memfile=/dev/shm/molt-bench-update-$$-$label
        # Mode 0600: molt refuses a --mem-file other users may read.
        (umask 077 && truncate -s "$size" "$memfile")
        args+=(--mem-file "$memfile")
    fi
    "$molt" run "${args[@]}" 2>"$log" </dev/null >/dev/null &
    pid=$!
    pids+=("$pid")
    spawned=1
    wait_counts 3
}

shutdown() {
    "$molt" ctl "$sock" quit >/dev/null || true
    wait "$pid" 2>/dev/null || true
    pids=()
    check_continuity
    if [[ -n $memfile ]]; then
        rm -f "$memfile" "$memfile.state"
        memfile=
    fi
}

# Starts `molt run <args> --incoming unix:...`; sets newpid, newlog, inpath.
spawn_incoming() {
    inpath=$dir/in-$spawned.sock newlog=$dir/molt-$spawned.log
    spawned=$((spawned + 1))
    "$molt" run "${args[@]}" --incoming "unix:$inpath" 2>"$newlog" </dev/null >/dev/null &
    newpid=$!
    pids+=("$newpid")
    local deadline=$(($(now_us) + 20000000))
    until listening "$inpath"; do
        kill -0 "$newpid" 2>/dev/null || die "$label: the incoming molt exited: $(cat "$newlog")"
        (($(now_us) < deadline)) || die "$label: nothing listens on $inpath"
        sleep 0.002
    done
}

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

# The sum of the phases in a phases= list, without `stop` and the *_max spans.
phase_sum() {
    tr ',' '\n' <<<"$1" | awk -F: '$1 != "stop" && $1 !~ /_max$/ { s += $2 } END { print s + 0 }'
}

# One update of mode $1; sets upd_pause and upd_phases. Not run in a
# subshell: a transfer or a restart changes pid and log.
update() {
    local reply line n old
    wait_counts $(($(counts) + 2))
    case $1 in
    exec)
        reply=$("$molt" ctl "$sock" cpr-exec) || die "$label: cpr-exec: $reply"
        [[ $reply == "ok resumed mode=exec "* ]] || die "$label: cpr-exec replied $reply"
        ;;
    transfer)
        spawn_incoming
        reply=$("$molt" ctl "$sock" cpr-transfer "$inpath") || die "$label: cpr-transfer: $reply"
        [[ $reply == "ok resumed mode=transfer "* ]] || die "$label: cpr-transfer replied $reply"
        wait "$pid" || die "$label: the old molt exited with $?: $(cat "$log")"
        pid=$newpid log=$newlog pids=("$newpid")
        ;;
    reboot)
        newlog=$dir/molt-$spawned.log
        spawned=$((spawned + 1))
        old=$("$molt" ctl "$sock" cpr-save "$memfile.state") || die "$label: cpr-save: $old"
        [[ $old == "ok saved "* ]] || die "$label: cpr-save replied $old"
        "$molt" run "${args[@]}" --incoming "file:$memfile.state" 2>"$newlog" </dev/null >/dev/null &
        newpid=$!
        pids+=("$newpid")
        wait "$pid" || die "$label: the saving molt exited with $?: $(cat "$log")"
        pid=$newpid log=$newlog pids=("$newpid")
        n=0
        until line=$(grep -m1 'resumed from' "$log"); do
            ((++n < 10000)) || die "$label: no restore line in $log: $(cat "$log")"
            kill -0 "$pid" 2>/dev/null || die "$label: the restarted molt exited: $(cat "$log")"
            sleep 0.002
        done
        upd_pause=$(field pause_us "$line")
        local before after
        before=$(field phases "$old") after=$(field phases "$line")
        upd_phases="${before%%,vcpu_save_max*},restart:$((upd_pause - $(phase_sum "$before") - $(phase_sum "$after"))),$after,vcpu_${before##*,vcpu_}"
        return
        ;;
    esac
    upd_pause=$(field pause_us "$reply")
    upd_phases=$(field phases "$reply")
    [[ -n $upd_phases ]] || die "$label: no phases= in $reply"
}

# floor MODE SIZE CPUS: the floor's runs, one µs number per line.
floor() {
    case $1 in
    transfer) "$molt" __floor transfer "$3" "$runs" | awk '{ print $1 + $2 }' ;;
    *) "$molt" __floor exec "$3" "$2" "$runs" ;;
    esac
}

# series MODE SIZE CPUS: RUNS updates of one guest, into $work/MODE.rows, one
# line per update: `LABEL pause_us:U,floor:F,PHASES...`.
series() {
    local mode=$1 size=$2 cpus=$3 i col
    col="$cpus vCPU, $size"
    boot "$mode-$size-$cpus" "$size" "$cpus" "$mode"
    for ((i = 0; i < runs; i++)); do
        update "$mode"
        echo "$col|pause_us:$upd_pause,$upd_phases" >>"$work/$mode.rows"
    done
    shutdown
    floor "$mode" "$size" "$cpus" | sed "s/^/$col|floor:/" >>"$work/$mode.rows"
    cols+=("$col")
}

# table MODE: rows are pause_us, the floor, their ratio and the phases;
# columns the series, each cell min / median / max.
table() {
    local IFS=$'\t'
    awk -F'|' -v cols="${cols[*]}" '
        function stats(list,   n, v, i, j, t, m) {
            n = split(list, v, " ")
            for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
            if (n == 0) return ""
            m = (n % 2) ? v[(n + 1) / 2] : int((v[n / 2] + v[n / 2 + 1]) / 2)
            med = m
            return v[1] " / **" m "** / " v[n]
        }
        {
            n = split($2, ph, ",")
            for (i = 1; i <= n; i++) {
                split(ph[i], kv, ":")
                if (!(kv[1] in seen)) { seen[kv[1]] = 1; if (kv[1] != "pause_us" && kv[1] != "floor") order[++k] = kv[1] }
                val[$1, kv[1]] = val[$1, kv[1]] " " kv[2]
            }
        }
        END {
            nc = split(cols, c, "\t")
            printf "| |"; for (j = 1; j <= nc; j++) printf " %s |", c[j]; print ""
            printf "|---|"; for (j = 1; j <= nc; j++) printf "---|"; print ""
            printf "| **pause_us** |"; for (j = 1; j <= nc; j++) { printf " %s |", stats(val[c[j], "pause_us"]); p[j] = med } print ""
            printf "| floor |"; for (j = 1; j <= nc; j++) { printf " %s |", stats(val[c[j], "floor"]); f[j] = med } print ""
            printf "| pause / floor (medians) |"; for (j = 1; j <= nc; j++) printf " %.2fx |", f[j] ? p[j] / f[j] : 0; print ""
            for (i = 1; i <= k; i++) {
                printf "| %s |", order[i]
                for (j = 1; j <= nc; j++) printf " %s |", stats(val[c[j], order[i]])
                print ""
            }
        }' "$work/$1.rows"
}

for mode in $modes; do
    cols=()
    first=${sizes%% *}
    for cpus in $cpus_list; do
        series "$mode" "$first" "$cpus"
    done
    for size in ${sizes#"$first"}; do
        series "$mode" "$size" 1
    done
    echo "### $mode: pause, floor and phases (us; min / median / max of $runs updates)"
    echo
    table "$mode"
    echo
done
echo "$(uname -r); $(nproc) CPUs; counting guest; $("$molt" version)."

# points: the charts' data (scripts/svg-chart.sh's lines) from every mode's
# rows, min / median / max in ms: pause_us of the 1-vCPU columns against RAM
# into $work/ram.points; pause_us and the floor of the first size's columns
# against vCPUs into $work/vcpus.points.
points() {
    local mode
    for mode in $modes; do
        awk -F'|' -v mode="$mode" -v first="$first" -v floors="$1" -v dir="$work" '
            {
                split($1, c, /( vCPU, )/)
                n = split($2, ph, ",")
                for (i = 1; i <= n; i++) {
                    split(ph[i], kv, ":")
                    if (kv[1] != "pause_us" && kv[1] != "floor") continue
                    if (!(($1, kv[1]) in val)) { cols[++k] = $1 SUBSEP kv[1]; cpus[k] = c[1]; size[k] = c[2]; key[k] = kv[1] }
                    val[$1, kv[1]] = val[$1, kv[1]] " " kv[2]
                }
            }
            function mib(s) { return s ~ /G$/ ? s * 1024 : s + 0 }
            function gib(s) { return s ~ /G$/ ? (s + 0) " GiB" : (s + 0) " MiB" }
            function emit(file, series, x, label, list,   n, v, i, j, t, m) {
                n = split(list, v, " ")
                for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
                m = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
                printf "%s\t%s\t%s\t%.3f\t%.3f\t%.3f\n", series, x, label, v[1] / 1000, m / 1000, v[n] / 1000 >> file
            }
            END {
                for (i = 1; i <= k; i++) {
                    if (key[i] == "pause_us" && cpus[i] == 1)
                        emit(dir "/ram.points", mode, mib(size[i]), gib(size[i]), val[cols[i]])
                    if (size[i] != first) continue
                    if (key[i] == "pause_us")
                        emit(dir "/vcpus.points", mode, cpus[i], cpus[i], val[cols[i]])
                    else if (index(" " floors " ", " " mode " "))
                        emit(dir "/vcpus.floor", mode " floor", cpus[i], cpus[i], val[cols[i]])
                }
            }' "$work/$mode.rows"
    done
}
floors=$modes
[[ " $modes " == *" exec "* ]] && floors=${floors/reboot/}
points "$floors"
charts=${CHARTS:-$repo/scripts/charts}
mkdir -p "$charts"
chart() {
    [[ -s $1 ]] || return 0
    LOGX=1 LOGY=1 DASH=' floor$' "$repo/scripts/svg-chart.sh" "$charts/$2" "$3" "$4" "pause (ms)" lines <"$1"
    echo "Chart: $charts/$2"
}
[[ -s $work/vcpus.floor ]] && cat "$work/vcpus.floor" >>"$work/vcpus.points"
chart "$work/ram.points" pause-ram.svg "Pause against guest RAM (1 vCPU, tiny guest, $runs updates)" "guest RAM"
chart "$work/vcpus.points" pause-vcpus.svg "Pause against vCPUs ($first, tiny guest, $runs updates; dashed: floor)" "vCPUs"
