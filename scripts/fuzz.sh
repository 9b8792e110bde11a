#!/usr/bin/env bash
# Coverage-guided fuzzing of molt's parsers (src/fuzz.rs) with AFL++ through
# cargo-afl, on stable Rust. Each target starts from its kept inputs in
# tests/fuzz/TARGET/ and runs SECONDS (default 30); a crash fails the run and
# is copied into tests/fuzz/TARGET/ as crash-*, where `cargo test` replays it
# from then on (commit it with the fix).
#
# Usage: scripts/fuzz.sh [SECONDS [TARGET...]]   (default: every target)
# Installs cargo-afl (cargo install) if it is missing. The instrumented build
# is glibc and dynamic, in target/fuzz; findings go to target/fuzz/out/TARGET.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
shift || true
targets=("$@")
if [[ ${#targets[@]} == 0 ]]; then
    read -r -a targets <<<"$(sed -n 's/^pub const TARGETS: \[&str; [0-9]*\] = \[\(.*\)\];/\1/p' src/fuzz.rs | tr -d '",')"
fi
if ! cargo afl --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-afl"
    cargo install --quiet --locked cargo-afl
fi
cargo afl build --release --quiet --features fuzz --target x86_64-unknown-linux-gnu --target-dir target/fuzz
bin=$PWD/target/fuzz/x86_64-unknown-linux-gnu/release/molt
failed=0
for t in "${targets[@]}"; do
    out=target/fuzz/out/$t
    rm -rf "$out"
    mkdir -p target/fuzz/out
    # No CPU frequency or core-dump checks: these are shared machines.
    AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 \
        AFL_NO_AFFINITY=1 cargo afl fuzz -V "$secs" -i "tests/fuzz/$t" -o "$out" \
        -- "$bin" __fuzz "$t" > "$out.log" 2>&1 || { echo "fuzz: afl-fuzz failed for $t:"; tail -n 20 "$out.log"; exit 1; }
    stats=$out/default/fuzzer_stats
    execs=$(sed -n 's/^execs_done *: *//p' "$stats")
    paths=$(sed -n 's/^corpus_count *: *//p' "$stats")
    crashes=$(find "$out/default/crashes" -type f -name 'id:*' 2>/dev/null | wc -l)
    echo "fuzz: $t: ${secs} s, $execs executions, $paths inputs in the corpus, $crashes crashes"
    if ((crashes > 0)); then
        failed=1
        for c in "$out"/default/crashes/id:*; do
            keep=tests/fuzz/$t/crash-$(sha256sum "$c" | cut -c1-16)
            cp "$c" "$keep"
            echo "fuzz: $t: crash kept as $keep"
        done
    fi
done
exit $failed
