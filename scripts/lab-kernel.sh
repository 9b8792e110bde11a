#!/usr/bin/env bash
# Fetch the Debian cloud kernel used for both lab levels (L2 host and L3 guest).
#
# Prints, and records in $CACHE/kernel.env (sourceable), three variables:
#   MOLT_LAB_KVER     kernel release, e.g. 6.1.0-56-cloud-amd64
#   MOLT_LAB_VMLINUZ  path to the bzImage
#   MOLT_LAB_MODDIR   path to lib/modules/$KVER (depmod run on the whole tree)
#
# Security updates retire old ABI numbers, so the ABI is resolved from the
# metapackage instead of being hard-coded, and the unpacked tree is cached
# (keyed by the kernel release, so several kernels' trees coexist).
#
# Environment:
#   MOLT_LAB_KERNEL  which metapackage, linux-image-$MOLT_LAB_KERNEL: cloud-amd64
#                    (default: bookworm's 6.1) or 6.12-cloud-amd64 (bookworm's
#                    6.12 from security/backports, e.g. 6.12.117+deb12-cloud-amd64:
#                    KVM_PRE_FAULT_MEMORY needs Linux >= 6.10)
set -euo pipefail

CACHE=${MOLT_LAB_CACHE:-$HOME/.cache/molt-lab}
mkdir -p "$CACHE"
kernel=${MOLT_LAB_KERNEL:-cloud-amd64}
[[ $kernel =~ ^([0-9]+\.[0-9]+-)?cloud-amd64$ ]] || {
    echo "lab-kernel: MOLT_LAB_KERNEL=$kernel: expected cloud-amd64 or X.Y-cloud-amd64" >&2; exit 2; }
meta=linux-image-$kernel

# 6.1's packages are named linux-image-6.1.0-57-cloud-amd64, 6.12's
# linux-image-6.12.117+deb12-cloud-amd64.
resolve_abi() {
    apt-cache depends "$meta" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][0-9a-z.+~-]*-cloud-amd64\)$/\1/p' | head -n1
}

pkg=$(resolve_abi || true)
if [[ -z $pkg ]]; then
    # A fresh machine may have empty package lists.
    apt-get update -qq >&2
    pkg=$(resolve_abi)
fi
if [[ -z $pkg ]]; then
    echo "lab-kernel: cannot resolve $meta's kernel" >&2
    exit 1
fi
kver=${pkg#linux-image-}
root=$CACHE/$kver

if [[ ! -f $root/.unpacked ]]; then
    dl=$CACHE/dl
    mkdir -p "$dl"
    # The -unsigned package has the same bits minus the Secure Boot signature and
    # no dependency on the signed-template machinery.
    if ! ls "$dl"/"$pkg"-unsigned_*.deb >/dev/null 2>&1; then
        # apt-get download as root warns that _apt cannot write here: harmless.
        (cd "$dl" && apt-get download -q "$pkg-unsigned" >&2)
    fi
    rm -rf "$root"
    mkdir -p "$root"
    dpkg-deb -x "$(ls "$dl"/"$pkg"-unsigned_*.deb | head -n1)" "$root"
    # The package ships no modules.dep; the initramfs builders resolve module
    # dependencies against this tree with `modprobe --show-depends`.
    depmod -b "$root" "$kver"
    touch "$root/.unpacked"
fi

vmlinuz=$root/boot/vmlinuz-$kver
moddir=$root/lib/modules/$kver
[[ -f $vmlinuz && -d $moddir ]] || { echo "lab-kernel: bad unpack in $root" >&2; exit 1; }

cat > "$CACHE/kernel.env.tmp" <<EOF
MOLT_LAB_KVER=$kver
MOLT_LAB_VMLINUZ=$vmlinuz
MOLT_LAB_MODDIR=$moddir
EOF
mv "$CACHE/kernel.env.tmp" "$CACHE/kernel.env"
cat "$CACHE/kernel.env"
