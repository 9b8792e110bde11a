# Sourced by the scripts that build or run molt's release binary: which Rust
# target that build is for. musl (x86_64-unknown-linux-musl, static by itself)
# where rustup has the target - scripts/setup.sh adds it - and otherwise glibc
# linked statically (.cargo/config.toml's crt-static), said once on stderr.
# Exports CARGO_BUILD_TARGET, so that every cargo command of the calling script
# builds for it, and sets MOLT_TARGET and MOLT_RELEASE_BIN (needs $repo).
if [[ -z ${CARGO_BUILD_TARGET:-} ]]; then
    if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        export CARGO_BUILD_TARGET=x86_64-unknown-linux-musl
    else
        echo "molt: the musl target is not installed (scripts/setup.sh adds it);" \
            "building static glibc (x86_64-unknown-linux-gnu) instead" >&2
        export CARGO_BUILD_TARGET=x86_64-unknown-linux-gnu
    fi
fi
MOLT_TARGET=$CARGO_BUILD_TARGET
MOLT_RELEASE_BIN=$repo/target/$MOLT_TARGET/release/molt
