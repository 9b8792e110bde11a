#!/usr/bin/env bash
# The previous release's molt, built from git, for the cross-release tests
# (tests/upgrade.rs, `release_*`: old -> new -> old in exec, transfer and
# reboot modes). Prints the binary's path as the last line of stdout; says
# what it does on stderr.
#
# The previous release is the newest tag v* reachable from HEAD whose version
# is not HEAD's own (Cargo.toml's). At the first release, whose own tag is the
# only one, that tag itself: the tests then run its build from git against
# this tree's. MOLT_PREVIOUS_RELEASE=REV names any other git revision (a tag,
# a commit) instead. No tag at all is an error: CI clones have the tags, and a
# release makes one (README, "Releases").
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
    tags=$(git tag --merged HEAD --list 'v*' --sort=-version:refname)
    [[ -n $tags ]] || die "no release tag (v*) is reachable from HEAD, so there is \
no previous release to test against. In a clone: git fetch --tags. Before the \
first release: tag it (README, \"Releases\"), or name a revision with \
MOLT_PREVIOUS_RELEASE=REV."
    rev=$(grep -vxF "v$version" <<<"$tags" | head -n 1 || true)
    if [[ -z $rev ]]; then
        rev=v$version
        echo "cross-release: v$version is the first release: testing against its own tag's build" >&2
    fi
fi
commit=$(git rev-parse --verify --quiet "$rev^{commit}") || die "$rev is not a git revision"

out=$root/target/cross-release/$commit
bin=$out/molt
if [[ ! -x $bin ]]; then
    echo "cross-release: building $rev ($commit) in $out" >&2
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
echo "cross-release: $rev ($commit): $("$bin" version)" >&2
echo "$bin"
