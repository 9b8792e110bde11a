#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, direct tests on this
# machine's /dev/kvm with tiny guests, and the lab tests (a Debian kernel under
# molt inside QEMU TCG with emulated SVM). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# The release build is musl where rustup has the target, else static glibc:
# every test below runs that build (CARGO_BUILD_TARGET, from scripts/target.sh).
repo=$PWD
. scripts/target.sh
echo "test: molt is built for $MOLT_TARGET"
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
# --release: the lab boots the static release binary that this run builds.
cargo test --release
# Each fuzz target, briefly, from its kept inputs (src/fuzz.rs): a crash fails.
scripts/fuzz.sh 20
