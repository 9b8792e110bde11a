#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, direct tests on this
# machine's /dev/kvm with tiny guests, and the lab tests (a Debian kernel under
# molt inside QEMU TCG with emulated SVM). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
# --release: the lab boots the static release binary that this run builds.
cargo test --release
