#!/usr/bin/env bash
# Fetch the headers of the lab kernel (scripts/lab-kernel.sh), to build the
# L3 guest's out-of-tree test module (rootfs/tools/labedu/) against it.
#
# Prints, and records in $CACHE/kernel-headers.env (sourceable):
#   MOLT_LAB_KBUILD   the directory to run `make -C` in (the common headers)
#   MOLT_LAB_KOUT     the kernel flavour's own headers (make's O=)
#
# Debian splits them in three packages of one version: the flavour's headers
# (linux-headers-ABI-cloud-amd64), the common ones and kbuild's tools. Unpacked
# into one tree, their relative symlinks resolve; only the flavour's Makefile
# names the common tree by its absolute /usr/src path, hence O= and -C.
set -euo pipefail

CACHE=${MOLT_LAB_CACHE:-$HOME/.cache/molt-lab}
eval "$("$(dirname "$0")/lab-kernel.sh")"
kver=$MOLT_LAB_KVER
root=$CACHE/$kver-headers

if [[ ! -f $root/.unpacked ]]; then
    dl=$CACHE/dl
    mkdir -p "$dl"
    flavour=linux-headers-$kver
    if ! ls "$dl"/"$flavour"_*.deb >/dev/null 2>&1; then
        (cd "$dl" && apt-get download -q "$flavour" >&2)
    fi
    deb=$(ls "$dl"/"$flavour"_*.deb | head -n1)
    version=$(dpkg-deb -f "$deb" Version)
    # Depends: linux-headers-ABI-common (= V), linux-kbuild-X.Y (>= V), ...
    # (6.1), or ..., linux-kbuild-6.12.117+deb12, ... with no version (6.12).
    common=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-headers-[^ ]*-common\)\( .*\)\{0,1\}$/\1/p')
    kbuild=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-kbuild-[0-9][^ ]*\)\( .*\)\{0,1\}$/\1/p')
    [[ -n $common && -n $kbuild ]] || { echo "lab-kernel-headers: cannot read $deb's dependencies" >&2; exit 1; }
    for p in "$common" "$kbuild"; do
        if ! ls "$dl"/"$p"_"$version"_*.deb >/dev/null 2>&1; then
            (cd "$dl" && apt-get download -q "$p=$version" >&2)
        fi
    done
    rm -rf "$root"
    mkdir -p "$root"
    for p in "$flavour" "$common" "$kbuild"; do
        dpkg-deb -x "$(ls "$dl"/"$p"_"$version"_*.deb | head -n1)" "$root"
    done
    touch "$root/.unpacked"
fi

kout=$root/usr/src/linux-headers-$kver
kbuild=$(ls -d "$root"/usr/src/linux-headers-*-common | head -n1)
[[ -f $kout/.config && -f $kbuild/Makefile ]] || { echo "lab-kernel-headers: bad unpack in $root" >&2; exit 1; }

cat > "$CACHE/kernel-headers.env.tmp" <<EOF
MOLT_LAB_KBUILD=$kbuild
MOLT_LAB_KOUT=$kout
EOF
mv "$CACHE/kernel-headers.env.tmp" "$CACHE/kernel-headers.env"
cat "$CACHE/kernel-headers.env"
