#!/bin/sh
# molt-upgrade: switch the host kernel under a running guest with molt's reboot
# mode (SPEC.md, "The three CPR modes"). For a host whose root is an initramfs
# (busybox sh is enough); shipped into the lab image as /lab/bin/molt-upgrade.
#
#   molt-upgrade save SOCK STATE ARGV --kernel K [--initrd I] [--append WORDS]
#                [--journal FILE]
#       1. checks that what the guest needs survives a kexec: STATE, the disks
#          and the --mem-file (if any) must not be on tmpfs/ramfs/rootfs;
#       2. stages the new kernel (`molt kexec --load-only`) with I, or with the
#          running root packed as an initramfs (it *is* the initramfs), so a
#          kernel that does not load is found before the guest pauses;
#       3. `molt ctl SOCK cpr-save STATE`: the guest pauses, molt exits (a
#          `molt ctl SOCK events` watcher, connected before, ends when it has);
#       4. syncs and remounts STATE's filesystem read-only (clean after kexec);
#       5. `molt kexec --exec-staged`: reboot into K, staged in step 2 with this kernel's command line plus WORDS and
#          `molt.resume=DEV,FSTYPE,MOUNTPOINT,STATE,ARGV`.
#       ARGV is molt's `run` arguments, one per line (without --incoming);
#       if it does not exist it is written from the running molt's command line.
#       If the kexec fails, the guest is still safe in STATE: `molt-upgrade
#       resume` (on this kernel) brings it back.
#   molt-upgrade mount
#       in the new kernel: mount STATE's filesystem as molt.resume= says (loads
#       nd_pmem/nd_e820 for /dev/pmemN). Idempotent.
#   molt-upgrade resume
#       mount, then exec `molt run <ARGV> --incoming file:STATE`; run it from
#       the new kernel's init (with the guest's taps already configured:
#       molt re-opens them by name).
# --journal FILE appends `STEP <timestamps> [DETAIL]` per step (`labcpr now`
# output if that tool exists, else uptime=SECONDS; `saved` has molt's reply as
# DETAIL); `resume` appends to STATE.journal.
# Paths must not contain commas or whitespace (they travel on the kernel
# command line).
set -u

die() { echo "molt-upgrade: $*" >&2; exit 1; }

JOURNAL=
journal() {
    [ -n "$JOURNAL" ] || return 0
    _t=$(labcpr now 2>/dev/null) || _t="uptime=$(cut -d' ' -f1 /proc/uptime)"
    _s=$1; shift
    echo "$_s $_t${*:+ $*}" >> "$JOURNAL"
}

# fs_of PATH: "DEV FSTYPE MOUNTPOINT" of the filesystem holding PATH.
fs_of() {
    _mnt=$(df -P "$1" 2>/dev/null | tail -n 1 | awk '{ print $NF }')
    [ -n "$_mnt" ] || return 1
    # The last mount on that point is the visible one.
    awk -v m="$_mnt" '$2 == m { d = $1; t = $3 } END { if (d != "") print d, t, m }' /proc/mounts
}

# survives PATH WHAT: refuse PATH if it lives in memory that a kexec clears.
survives() {
    [ -e "$1" ] || die "$2 $1 does not exist"
    _fs=$(fs_of "$1") || die "cannot find the filesystem of $2 $1"
    case $(echo "$_fs" | cut -d' ' -f2) in
    tmpfs | ramfs | rootfs) die "$2 $1 is on $(echo "$_fs" | cut -d' ' -f2), which does not survive a kexec" ;;
    esac
}

# private PATH WHAT: refuse a regular file that the restarted molt would refuse
# (SPEC.md "Files molt creates": other users may read or write it, or it is not
# ours), before the guest pauses rather than after the kexec. Devices pass.
private() {
    [ ! -L "$1" ] || die "$2 $1 is a symbolic link: molt would refuse it"
    [ -f "$1" ] || return 0
    [ "$(stat -c %u "$1")" = "$(id -u)" ] || die "$2 $1 is not owned by uid $(id -u): molt would refuse it"
    [ $((0$(stat -c %a "$1") & 066)) -eq 0 ] ||
        die "$2 $1 is open to other users (mode $(stat -c %a "$1")): chmod 600 it"
}

# pack_root OUT: the running root filesystem (the initramfs) as a newc cpio,
# mount points included but not their contents, plus the /dev/console node
# that devtmpfs hides (the kernel opens it before /init runs).
pack_root() {
    (cd / && find . -xdev | cpio -o -H newc 2>/dev/null) > "$1" || return 1
    _d=$(mktemp -d) && mkdir "$_d/dev" && mknod "$_d/dev/console" c 5 1 &&
        (cd "$_d" && echo dev/console | cpio -o -H newc 2>/dev/null) >> "$1"
    _rc=$?
    rm -rf "$_d"
    return $_rc
}

# cmdline_for WORDS...: this kernel's command line without earlier
# molt.resume= and without the keys WORDS set, then WORDS.
cmdline_for() {
    _out=
    for _w in $(cat /proc/cmdline); do
        _k=${_w%%=*}
        _keep=1
        [ "$_k" = molt.resume ] && _keep=0
        for _a in "$@"; do [ "$_k" = "${_a%%=*}" ] && _keep=0; done
        [ $_keep = 1 ] && _out="$_out $_w"
    done
    echo "${_out# } $*"
}

cmd_save() {
    [ $# -ge 3 ] || die "usage: molt-upgrade save SOCK STATE ARGV --kernel K [--initrd I] [--append WORDS] [--journal FILE]"
    sock=$1 state=$2 argv=$3
    shift 3
    kernel= initrd= append=
    while [ $# -gt 0 ]; do
        case $1 in
        --kernel) kernel=${2:-} ;;
        --initrd) initrd=${2:-} ;;
        --append) append=${2:-} ;;
        --journal) JOURNAL=${2:-} ;;
        *) die "unknown option $1" ;;
        esac
        [ $# -ge 2 ] || die "$1 needs a value"
        shift 2
    done
    [ -n "$kernel" ] || die "--kernel is required"
    journal start

    status=$(molt ctl "$sock" status) || die "molt at $sock does not answer: $status"
    pid=$(echo "$status" | tr ' ' '\n' | sed -n 's/^pid=//p')
    [ -n "$pid" ] || die "no pid in status reply: $status"
    if [ ! -s "$argv" ]; then
        # molt's command line after `molt run`, one argument per line.
        tr '\0' '\n' < /proc/"$pid"/cmdline | tail -n +3 > "$argv" || die "cannot write $argv"
    fi
    grep -qx -- '--incoming' "$argv" && die "$argv must not contain --incoming"

    # Everything the restarted molt opens must still be there after the kexec.
    survives "$(dirname "$state")" "state directory"
    survives "$argv" "argv file"
    _prev=
    while IFS= read -r a; do
        case $_prev in
        --disk) survives "${a%%,*}" "disk" ;;
        --mem-file) survives "$a" "--mem-file" && private "$a" "--mem-file" ;;
        esac
        _prev=$a
    done < "$argv"
    set -- $(fs_of "$(dirname "$state")")
    dev=$1 fstype=$2 mnt=$3
    resume_word="molt.resume=$dev,$fstype,$mnt,$state,$argv"
    cmdline=$(cmdline_for $append "$resume_word")

    if [ -z "$initrd" ]; then
        initrd=/tmp/molt-upgrade-initrd.cpio
        pack_root "$initrd" || die "cannot pack the running root into $initrd"
    fi
    journal packed
    molt kexec --load-only --kernel "$kernel" --initrd "$initrd" --cmdline "$cmdline" ||
        die "the new kernel does not stage; the guest was not touched"
    journal staged

    # Watch molt's events from before the save: the watcher's connection ends
    # when molt has exited (its descriptors close with it), so nothing polls.
    # Its lines come through a FIFO, read with shell built-ins.
    fifo=$(mktemp -u /tmp/molt-upgrade-events.XXXXXX) && mkfifo -m 600 "$fifo" ||
        die "cannot make a FIFO for molt's events; the guest was not touched"
    molt ctl "$sock" events > "$fifo" &
    watcher=$!
    exec 3< "$fifo"
    rm -f "$fifo"
    # Its first line, `ok events ...`, says it is registered.
    IFS= read -r -t 10 line <&3 || line=
    case $line in
    "ok events "*) ;;
    *) kill "$watcher" 2>/dev/null; die "molt at $sock does not send events (${line:-no reply}); the guest was not touched" ;;
    esac

    reply=$(molt ctl "$sock" cpr-save "$state")
    journal saved "$reply"
    case $reply in
    "ok saved "*) echo "molt-upgrade: $reply" >&2 ;;
    *) kill "$watcher" 2>/dev/null; die "cpr-save refused, the guest runs on: $reply" ;;
    esac
    # molt exits after replying; its files (disks, RAM, state) must be closed
    # before the filesystem can go read-only. The events (update-started,
    # update-saved) end when it has: `molt ctl events` then exits 0. Shell
    # built-ins only until then: every fork counts in the pause.
    while IFS= read -r -t 30 line <&3; do :; done
    exec 3<&-
    # Still running only if no line came for 30 s: then it is stopped here (143).
    kill "$watcher" 2>/dev/null
    wait "$watcher" ||
        echo "molt-upgrade: warning: molt (pid $pid) still running 30 s after its last event" >&2
    journal exited
    # The last journal entry this kernel writes: STATE's filesystem goes
    # read-only next.
    journal kexec
    sync
    # A process that logged the guest's console to this filesystem may take a
    # moment longer to close it.
    i=0
    until mount -o remount,ro "$mnt" 2>/dev/null; do
        i=$((i + 1))
        [ $i -le 20 ] || { echo "molt-upgrade: warning: cannot remount $mnt read-only; kexec with it mounted" >&2; break; }
        usleep 100000
    done
    echo "molt-upgrade: kexec $kernel cmdline: $cmdline" >&2
    # The kernel was staged before the pause: only the reboot is left in it.
    molt kexec --exec-staged
    rc=$?
    mount -o remount,rw "$mnt" 2>/dev/null
    die "kexec failed (status $rc); the guest is saved in $state: run 'molt-upgrade resume' to bring it back here"
}

# resume_params: DEV FSTYPE MNT STATE ARGV from molt.resume= on the command line.
resume_params() {
    for _w in $(cat /proc/cmdline); do
        case $_w in molt.resume=*) echo "${_w#molt.resume=}" | tr ',' ' '; return 0 ;; esac
    done
    return 1
}

cmd_mount() {
    params=$(resume_params) || die "no molt.resume= on the kernel command line"
    set -- $params
    [ $# -eq 5 ] || die "bad molt.resume= (want DEV,FSTYPE,MOUNTPOINT,STATE,ARGV)"
    dev=$1 fstype=$2 mnt=$3
    grep -q " $mnt " /proc/mounts && return 0
    case $dev in /dev/pmem*) modprobe -a nd_pmem nd_e820 2>/dev/null ;; esac
    i=0
    while [ ! -b "$dev" ]; do
        i=$((i + 1))
        [ $i -le 200 ] || die "$dev did not appear"
        usleep 50000
    done
    mkdir -p "$mnt"
    mount -t "$fstype" "$dev" "$mnt" || die "cannot mount $dev on $mnt"
}

cmd_resume() {
    cmd_mount
    set -- $(resume_params)
    state=$4 argv=$5
    JOURNAL=$state.journal
    journal resume
    [ -f "$state" ] || die "no saved state at $state"
    set --
    while IFS= read -r a; do set -- "$@" "$a"; done < "$argv"
    exec molt run "$@" --incoming "file:$state"
}

case ${1:-} in
save) shift; cmd_save "$@" ;;
mount) cmd_mount ;;
resume) cmd_resume ;;
*) die "usage: molt-upgrade save SOCK STATE ARGV --kernel K [...] | mount | resume" ;;
esac
