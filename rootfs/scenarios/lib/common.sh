# Helpers for lab scenarios (sourced; busybox ash inside L2).
# A scenario prints `LAB-RESULT name=value` per check and ends with `lab_end`.

# Where molt, the lab's tools (bin/), these helpers (lib/), the guest kernel
# (vmlinuz) and initramfs (guest.cpio.gz) are: /lab in L2. scripts/demo.sh
# lays the same out under target/demo/lab to run the demo tour on a host.
LAB_DIR=${LAB_DIR:-/lab}

# The one place the L3 guest's kernel command line is spelled out.
# quiet: the console is a 16550 under nested emulation, every byte costs.
GUEST_CMDLINE="console=ttyS0 panic=-1 quiet"

LAB_FAILED=0

result() { echo "LAB-RESULT $1=$2"; }

# check NAME GOT WANT: report GOT, fail the scenario unless GOT = WANT.
check() {
    result "$1" "$2"
    if [ "$2" != "$3" ]; then
        echo "LAB-CHECK-FAIL $1: got '$2', want '$3'"
        LAB_FAILED=1
    fi
}

# fail NAME REASON: a check that cannot even be measured.
fail() {
    result "$1" "$2"
    echo "LAB-CHECK-FAIL $1: $2"
    LAB_FAILED=1
}

lab_end() {
    if [ "$LAB_FAILED" = 0 ]; then echo "LAB-END status=pass"; else echo "LAB-END status=fail"; fi
}

# Milliseconds on the monotonic clock (labtime is built into the host image).
now_ms() { echo $(( $(labtime now) / 1000 )); }

# alive PID: the process runs. kill -0 is not enough: a background child of
# this shell stays a zombie (and kill -0 succeeds) until the shell waits for it.
alive() {
    [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# wait_log FILE ERE SECONDS [PID]: wait until FILE has a line matching ERE.
# Gives up early if PID (the VMM) has exited.
wait_log() {
    _deadline=$(( $(now_ms) + $3 * 1000 ))
    while :; do
        grep -Eq "$2" "$1" 2>/dev/null && return 0
        [ "$(now_ms)" -ge "$_deadline" ] && return 1
        if [ -n "${4:-}" ] && ! alive "$4"; then
            grep -Eq "$2" "$1" 2>/dev/null
            return
        fi
        sleep 0.1
    done
}

# count FILE ERE: number of matching lines.
count() { grep -Ec "$2" "$1" 2>/dev/null || true; }

# wait_exit PID SECONDS: wait for PID to exit; sets EXIT_RC to its status, or
# to "timeout" after printing where it hung and killing it. Not usable in
# $(...): the subshell could not `wait` for this shell's child.
wait_exit() {
    _deadline=$(( $(now_ms) + $2 * 1000 ))
    while alive "$1"; do
        if [ "$(now_ms)" -ge "$_deadline" ]; then
            proc_diag "$1"
            kill -9 "$1" 2>/dev/null
            wait "$1" 2>/dev/null
            EXIT_RC=timeout
            return
        fi
        sleep 0.1
    done
    wait "$1"
    EXIT_RC=$?
}

# proc_diag PID: where a hung process's threads are (state, wait channel,
# kernel stack), for the log of a failed run.
proc_diag() {
    for _t in /proc/"$1"/task/*; do
        echo "LAB-DIAG task ${_t##*/} $(cat "$_t/comm" 2>/dev/null):" \
            "$(grep '^State' "$_t/status" 2>/dev/null)" "wchan=$(cat "$_t/wchan" 2>/dev/null)"
        sed 's/^/LAB-DIAG     /' "$_t/stack" 2>/dev/null | head -n 12
    done
    ls -l /proc/"$1"/fd 2>/dev/null | sed 's/^/LAB-DIAG fd /'
}

# stuck_diag [SOCK]: for a guest that stopped answering, what tells a stuck
# guest from a stuck VMM: where molt's threads are and which of them burn CPU
# (over 2 s), whether its control loop still answers on SOCK, the guest's
# interrupts of the last minute or so (irq_history), and L2's KVM events for
# the guest in those 2 s, counted (the rings of shutdowns and irqs, below): a
# guest spinning in one place enters at the same few RIPs; one that is never
# entered again shows no event at all; a console that gets no interrupt shows
# no io exit at ports 0x3f8-0x3ff. The sample starts with a newline on the
# console (an empty line, which the guest's command loop skips): molt's UART
# raises IRQ 4 for it (ioapic_set_irq pin 4) unless its last interrupt is
# still pending, i.e. the guest has not read its IIR since; an IRQ 4 raised
# but never injected (inj_virq) is blocked in the guest's local APIC. Then
# the newest entries and exits. Nothing here enables a trace event: that
# patches L2's kernel text, which QEMU TCG can hang on (lab.sh would then
# call the run the emulation's).
stuck_diag() {
    alive "$VMM_PID" || { echo "LAB-DIAG the VMM has exited"; return 0; }
    proc_diag "$VMM_PID"
    irq_history
    _cpu() { for _t in /proc/"$VMM_PID"/task/*; do
        echo "${_t##*/} $(cut -d' ' -f14,15 "$_t/stat" 2>/dev/null)"; done; }
    for _r in $shutdowns $irqs; do echo LAB-DIAG-SAMPLE > $_r/trace_marker; done 2>/dev/null
    _before=$(_cpu)
    [ -p "${VMM_LOG:-}.in" ] && { echo >&3; } 2>/dev/null
    sleep 2
    echo "$_before" | while read -r _tid _u _s; do
        _now=$(cut -d' ' -f14,15 /proc/"$VMM_PID"/task/"$_tid"/stat 2>/dev/null)
        echo "LAB-DIAG task $_tid ticks in 2 s (user sys): $(( ${_now% *} - _u )) $(( ${_now#* } - _s ))"
    done
    [ -n "${1:-}" ] && echo "LAB-DIAG molt status: $(timeout 5 molt ctl "$1" status 2>&1 | tr '\n' ' ')"
    # The sample's events, counted: exits by reason (io exits by port and
    # direction, from SVM's EXITINFO1), entries by RIP, interrupts by their
    # whole text (pin, vector).
    awk '
        FNR == 1 { on = 0 }
        /LAB-DIAG-SAMPLE/ { on = 1; next }
        on { for (i = 1; i <= NF; i++) if ($i ~ /^kvm_[a-z_]*:$/) break
             if (i > NF) next
             if ($i == "kvm_exit:") {
                 r = ""; x = ""
                 for (j = i; j < NF; j++) { if ($j == "reason") r = $(j + 1); if ($j == "info1") x = $(j + 1) }
                 if (r == "io") { x = x + 0; r = sprintf("io port %#x %s", int(x / 65536) % 65536, x % 2 ? "in" : "out") }
                 print "exit reason", r
             }
             else if ($i == "kvm_entry:") {
                 # 6.12 may append "[immediate exit]" to the RIP.
                 x = ""; for (j = i; j < NF; j++) if ($j == "rip") { x = $(j + 1); sub(/\[.*/, "", x) }
                 print "entry rip", x
             }
             else { k = $i; for (j = i + 1; j <= NF; j++) k = k " " $j; print k }
        }' $shutdowns/trace $irqs/trace 2>/dev/null > /tmp/stuck-sample
    if [ -s /tmp/stuck-sample ]; then
        echo "LAB-DIAG kvm events in 2 s: $(wc -l < /tmp/stuck-sample)"
        { grep -v '^entry rip' /tmp/stuck-sample | sort | uniq -c | sort -rn
          grep '^entry rip' /tmp/stuck-sample | sort | uniq -c | sort -rn | head -n 12
        } | head -n 80 | sed 's/^ *//; s/^/LAB-DIAG kvm 2 s: /'
    else
        echo "LAB-DIAG no KVM entry or exit of the guest in 2 s"
    fi
    grep -v '^#' $shutdowns/trace 2>/dev/null | tail -n 40 | sed 's/^ *//; s/^/LAB-DIAG kvm /'
}

# dump TAG FILE [N]: the last N lines of FILE, tick lines left out, so a failed
# run's console log shows what the guest and molt said.
dump() {
    [ -f "$2" ] || return 0
    echo "---- $1: $2 (last ${3:-60} lines, GUEST-TICK omitted)"
    grep -v '^GUEST-TICK' "$2" | tail -n "${3:-60}" | sed "s/^/$1| /"
}

# ---- driving a VMM whose serial console is its stdin/stdout ----
# vmm_start LOG CMD...: run CMD in the background with stdin from a FIFO that
# fd 3 of this shell writes to, stdout to LOG and stderr to LOG.err.
# Sets VMM_PID and VMM_LOG.
vmm_start() {
    VMM_LOG=$1; shift
    rm -f "$VMM_LOG" "$VMM_LOG.err" "$VMM_LOG.in"
    mkfifo "$VMM_LOG.in"
    : > "$VMM_LOG"
    "$@" < "$VMM_LOG.in" > "$VMM_LOG" 2> "$VMM_LOG.err" &
    VMM_PID=$!
    # Opening the FIFO's write end completes the child's open of the read end.
    # fd 3 stays open so the VMM never sees EOF on its console input.
    exec 3> "$VMM_LOG.in"
}

# guest_cmd LINE SECONDS: send LINE to the guest's command loop, wait for its
# GUEST-DONE, print the rc (or "timeout").
guest_cmd() {
    _n=$(count "$VMM_LOG" '^GUEST-DONE rc=')
    echo "$1" >&3
    _deadline=$(( $(now_ms) + $2 * 1000 ))
    while [ "$(count "$VMM_LOG" '^GUEST-DONE rc=')" -le "$_n" ]; do
        if [ "$(now_ms)" -ge "$_deadline" ] || ! alive "$VMM_PID"; then
            echo timeout
            return
        fi
        sleep 0.1
    done
    grep '^GUEST-DONE rc=' "$VMM_LOG" | tail -n 1 | tr -d '\r' | sed 's/^GUEST-DONE rc=//'
}

ticks() { count "$VMM_LOG" '^GUEST-TICK '; }

# wait_count FILE ERE N SECONDS: wait until FILE has at least N matching lines.
wait_count() {
    _deadline=$(( $(now_ms) + $4 * 1000 ))
    while [ "$(count "$1" "$2")" -lt "$3" ]; do
        [ "$(now_ms)" -ge "$_deadline" ] && return 1
        sleep 0.1
    done
}

# L2's trace ring of KVM entries and exits, stopped at the first guest
# shutdown (set up by L2's init).
shutdowns=/sys/kernel/tracing/instances/shutdowns

# L2's trace ring of the guests' interrupts (set up by L2's init): an IO-APIC
# pin raised, a vector injected, a vector acknowledged (EOI). Only these
# three: each event enabled patches L2's kernel text, which QEMU TCG can hang
# on at boot (one of six boots hung so while a fourth one was enabled).
irqs=/sys/kernel/tracing/instances/irqs
IRQ_EVENTS="kvm_ioapic_set_irq kvm_inj_virq kvm_eoi"

# irq_history: the interrupts of the ring of irqs, per IO-APIC pin raised
# and per vector injected into a guest: how often, and when
# last; per vector, how often and when last the guest acknowledged it. A
# vector injected after its last EOI and not acknowledged in the second
# (or more) the ring recorded after it blocks
# every vector of its priority class and below (the UART's among them)
# until its EOI: its delivery was lost on the way in, or its handler never
# finished. Times are L2's trace clock, like the ring's.
irq_history() {
    grep -v '^#' $irqs/trace 2>/dev/null | awk '
        { for (i = 1; i <= NF; i++) if ($i ~ /^kvm_[a-z_]*:$/) break
          if (i > NF) next
          t = $(i - 1); sub(/:$/, "", t); if (first == "") first = t; last = t; lastn = t + 0
          if ($i == "kvm_inj_virq:") { v = $(i + 2) + 0; inj[v]++; tinj[v] = t; ninj[v] = t + 0; seen[v] = 1 }
          else if ($i == "kvm_eoi:") { v = $(i + 4) + 0; eoi[v]++; teoi[v] = t; neoi[v] = t + 0; seen[v] = 1 }
          else if ($i == "kvm_ioapic_set_irq:") { k = "IO-APIC pin " $(i + 2) " (vector " $(i + 6) ")"; n[k]++; tn[k] = t }
        }
        END {
          if (first == "") { print "LAB-DIAG irqs: none recorded"; exit }
          print "LAB-DIAG irqs recorded from " first " to " last " s"
          for (k in n) print "LAB-DIAG irqs raised: " k ": " n[k] " times, last at " tn[k]
          for (v in seen) {
              s = sprintf("LAB-DIAG irqs vector %#x: injected %d times%s, EOI %d times%s", v,
                          inj[v], inj[v] ? " (last at " tinj[v] ")" : "", eoi[v], eoi[v] ? " (last at " teoi[v] ")" : "")
              if (inj[v] > 0 && (eoi[v] == 0 || ninj[v] > neoi[v]) && lastn - ninj[v] > 1)
                  s = s sprintf(", not acknowledged in the %.1f s since its last injection: still in service", lastn - ninj[v])
              print s
          }
        }' | sort
}

# shutdown_causes: the guest shutdown the ring stopped at, and
# LAB-EMULATION-FAULT if SVM reported it on the very instruction at which KVM
# had just entered the guest (the entry's RIP), while delivering an event
# (EXITINTINFO, the exit's intr_info, valid: bit 31). A guest cannot fail there
# by itself: the event was an interrupt KVM injected at that entry, or a fault
# on that first instruction (an instruction fetch, on kernel text it had just
# run), and delivering it needed the guest's IDT, stack and page tables, all of
# which had just worked. Seen only under QEMU TCG's nested SVM (README, "The
# nested lab"): lab.sh exits 3 and tests/lab.rs runs the scenario again.
shutdown_causes() {
    # kvm_entry: "vcpu N, rip 0xR" (6.12: "0xR[immediate exit]" when KVM
    # will exit again at once).
    awk '/kvm_entry:/ { for (i = 1; i < NF; i++) if ($i == "rip") { entry[$1] = $(i + 1); sub(/\[.*/, "", entry[$1]) } }
         /kvm_exit:.*reason shutdown/ {
             for (i = 1; i < NF; i++) { if ($i == "rip") rip = $(i + 1); if ($i == "intr_info") info = $(i + 1) }
             print rip, (entry[$1] == "" ? "none" : entry[$1]), info, $0
         }' $shutdowns/trace 2>/dev/null | while read -r _rip _entry _info _line; do
        echo "LAB-INFO guest shutdown (KVM entered it at $_entry): $_line"
        _v=$(( (0x${_info#0x} >> 31) & 1 ))
        if [ "$_v" = 1 ] && [ "$_rip" = "$_entry" ]; then
            echo "LAB-EMULATION-FAULT a guest shut down on the instruction KVM had just entered it at ($_rip), delivering event $_info"
        fi
    done
    # The same failure when the emulated CPU walks the guest's paging
    # structures from a root in L2's own RAM (seen under VMM=qemu as well):
    # delivering an event (intr_info valid), the guest's page-table walk
    # (EXITINFO1 bit 33) reads a GPA with no memory behind it (bit 3: KVM's
    # MMIO marker, i.e. no memslot), and KVM re-enters the guest into the same
    # fault for good. A guest's paging structures are in its RAM; the GPAs seen
    # (0x100b44fe0: entry 508, the kernel's cpu_entry_area with the IDT, of a
    # root at 0x100b44000) are L2's RAM above 4 GiB, outside the guest's.
    awk '/kvm_exit:.*reason npf/ {
             for (i = 1; i < NF; i++) {
                 if ($i == "rip") rip = $(i + 1); if ($i == "info1") i1 = $(i + 1)
                 if ($i == "info2") i2 = $(i + 1); if ($i == "intr_info") info = $(i + 1)
             }
             print rip, i1, i2, info
         }' $shutdowns/trace 2>/dev/null | while read -r _rip _i1 _i2 _info; do
        _v=$(( (0x${_info#0x} >> 31) & 1 ))
        _walk=$(( (0x${_i1#0x} >> 33) & 1 ))
        _none=$(( (0x${_i1#0x} >> 3) & 1 ))
        [ "$_v" = 1 ] && [ "$_walk" = 1 ] && [ "$_none" = 1 ] && echo "$_rip $_i2 $_info"
    done | uniq -c | while read -r _n _rip _gpa _info; do
        echo "LAB-EMULATION-FAULT a guest's page-table walk read GPA $_gpa, which is not its RAM, delivering event $_info at $_rip ($_n times in L2's ring)"
    done
}
