#!/usr/bin/env bash
# The previous release's molt, built from git, for the cross-release tests
# (tests/upgrade.rs, `release_*`: old -> new -> old in exec, transfer and
# reboot modes). Prints the binary's path as the last line of stdout; says
# what it does on stderr.
#
# The previous release is the newest one listed in scripts/releases whose
# version is not HEAD's own (Cargo.toml's). At the first release, the only one
# listed, that one itself: the tests then run its build from git against this
# tree's. The list names each release's commit, so a clone without tags (CI's)
# finds it; where the tag is present too, it must name the same commit.
# MOLT_PREVIOUS_RELEASE=REV names any other git revision (a tag, a commit)
# instead.
#
# The revision's sources are exported with `git archive` into
# target/cross-release/COMMIT/src and built there, in a target directory of
# their own, for the target that revision's own scripts/target.sh picks (musl
# where rustup has it, else static glibc). A binary already built for that
# commit is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

die() {
    echo "cross-release: $*" >&2
    exit 1
}

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[[ -n $version ]] || die "no version in Cargo.toml"
if [[ -n ${MOLT_PREVIOUS_RELEASE:-} ]]; then
    rev=$MOLT_PREVIOUS_RELEASE
    echo "cross-release: previous release from MOLT_PREVIOUS_RELEASE: $rev" >&2
else
    # "vX.Y.Z COMMIT" lines, newest first, comments and blanks dropped.
    releases=$(grep -v '^[[:space:]]*\(#\|$\)' scripts/releases | tac)
    [[ -n $releases ]] || die "scripts/releases lists no release, so there is \
no previous release to test against. Before the first release: make it \
(README, \"Releases\"), or name a revision with MOLT_PREVIOUS_RELEASE=REV."
    line=$(awk -v own="v$version" '$1 != own' <<<"$releases" | head -n 1)
    if [[ -z $line ]]; then
        line=$(head -n 1 <<<"$releases")
        echo "cross-release: v$version is the first release: testing against its own build" >&2
    fi
    read -r tag rev extra <<<"$line"
    [[ $tag =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ && $rev =~ ^[0-9a-f]{40}$ && -z $extra ]] ||
        die "scripts/releases: bad line \"$line\": want \"vX.Y.Z COMMIT\" (a full hash)"
    git cat-file -e "$rev^{commit}" 2>/dev/null || die "$tag's commit $rev is not in \
this clone (a shallow clone? git fetch --unshallow)"
    git merge-base --is-ancestor "$rev" HEAD || die "$tag's commit $rev is not an \
ancestor of HEAD"
    if tagged=$(git rev-parse --verify --quiet "refs/tags/$tag^{commit}"); then
        [[ $tagged == "$rev" ]] || die "tag $tag names $tagged, scripts/releases says $rev"
    fi
    echo "cross-release: previous release $tag from scripts/releases" >&2
fi
commit=$(git rev-parse --verify --quiet "$rev^{commit}") || die "$rev is not a git revision"

out=$root/target/cross-release/$commit
bin=$out/molt
if [[ ! -x $bin ]]; then
    echo "cross-release: building ${tag:-$rev} ($commit) in $out" >&2
    rm -rf "$out"
    mkdir -p "$out/src"
    git archive --format=tar "$commit" | tar -x -C "$out/src"
    (
        cd "$out/src"
        # The release's own version, whatever this run's environment says.
        unset MOLT_BUILD_VERSION
        # shellcheck disable=SC2034 # scripts/target.sh reads it
        repo=$PWD
        if [[ -f scripts/target.sh ]]; then
            # shellcheck source=/dev/null
            . scripts/target.sh
        fi
        cargo build --release --locked --bin molt --target-dir "$out/target" >&2
    )
    built=$(find "$out/target" -path '*/release/molt' -type f -perm -u+x | head -n 1)
    [[ -n $built ]] || die "the build of $rev left no molt binary under $out/target"
    cp "$built" "$bin.tmp"
    mv "$bin.tmp" "$bin"
fi
echo "cross-release: ${tag:-$rev} ($commit): $("$bin" version)" >&2
echo "$bin"
