# Shared helpers for the lab's initramfs builders (sourced, not run).
# Needs: busybox-static, cpio, kmod (modprobe/depmod), gzip.

ROOTFS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$ROOTFS_DIR/.." && pwd)

# Load MOLT_LAB_KVER / MOLT_LAB_VMLINUZ / MOLT_LAB_MODDIR, fetching the kernel
# if needed (lab-kernel.sh is idempotent and cheap when cached).
lab_kernel_env() {
    local out
    out=$("$REPO_DIR/scripts/lab-kernel.sh")
    eval "$out"
    export MOLT_LAB_KVER MOLT_LAB_VMLINUZ MOLT_LAB_MODDIR
}

# A skeleton tree with busybox and one symlink per applet. The static busybox
# needs no libraries, so the tree is self-contained.
ir_skeleton() {
    local root=$1 bb
    bb=$(command -v busybox)
    # Debian's busybox-static is the one in /bin; the dynamic one would need libc.
    file_is_static "$bb" || { echo "busybox at $bb is not static (install busybox-static)" >&2; return 1; }
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc,root,lib/modules}
    cp "$bb" "$root/bin/busybox"
    local applet
    for applet in $("$bb" --list-full); do
        [[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
    done
    # Without this the kernel has nowhere to open the initial console if the
    # built-in initramfs ever stops providing it.
    [[ -e $root/dev/console ]] || mknod -m 600 "$root/dev/console" c 5 1
    [[ -e $root/dev/null ]] || mknod -m 666 "$root/dev/null" c 1 3
}

# Static (including static-pie, which ldd calls "statically linked" with
# status 0) means no program interpreter: nothing to load from the image.
file_is_static() {
    ! LC_ALL=C readelf -lW "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}

# Copy MODULES and everything they depend on (resolved by kmod against the
# full unpacked tree), uncompressed, into ROOT, then generate ROOT's modules.dep.
ir_modules() {
    local root=$1; shift
    local src=$MOLT_LAB_MODDIR kroot
    kroot=${src%/lib/modules/*}
    local dst=$root/lib/modules/$MOLT_LAB_KVER
    mkdir -p "$dst"
    local m line ko rel
    for m in "$@"; do
        # --show-depends prints "insmod PATH" per module, or "builtin NAME".
        while read -r line; do
            [[ $line == insmod\ * ]] || continue
            ko=${line#insmod }; ko=${ko%% *}
            rel=${ko#*/lib/modules/"$MOLT_LAB_KVER"/}
            mkdir -p "$dst/$(dirname "$rel")"
            # 6.12's modules are xz-compressed (6.1's are not). Busybox's
            # modprobe hands the file to finit_module first, which the kernel
            # refuses with "Invalid ELF header magic" on the console before
            # busybox unpacks it itself: unpack them here instead.
            case $rel in
                *.ko.xz) [[ -e $dst/${rel%.xz} ]] || busybox xzcat "$ko" > "$dst/${rel%.xz}" ;;
                *) cp -n "$ko" "$dst/$rel" ;;
            esac
        done < <(modprobe -d "$kroot" -S "$MOLT_LAB_KVER" --show-depends "$m")
    done
    cp "$src"/modules.builtin "$src"/modules.builtin.modinfo "$src"/modules.order "$dst/"
    depmod -b "$root" "$MOLT_LAB_KVER"
}

# Pack ROOT as a gzip'ed newc cpio. Sorted names keep the image reproducible.
ir_pack() {
    local root=$1 out=$2
    mkdir -p "$(dirname "$out")"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc --quiet -R 0:0 | gzip -1) > "$out.tmp"
    mv "$out.tmp" "$out"
}
