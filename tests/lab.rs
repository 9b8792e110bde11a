//! Lab tests: a stock Debian kernel booted by molt inside the nested lab (QEMU TCG
//! with emulated AMD SVM, see shared/LAB.md). Each test runs one scenario through
//! `scripts/lab.sh` and checks the `LAB-RESULT name=value` lines it printed.
//!
//! Without QEMU these tests fail with the reason; `MOLT_ALLOW_NO_LAB=1` turns that
//! into a printed skip (never set in CI).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// Runs `scenario` in the lab and returns its results; None if skipped.
fn run_scenario(scenario: &str) -> Option<HashMap<String, String>> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_qemu {
        let why = "qemu-system-x86_64 is not installed (scripts/setup.sh installs it)";
        if std::env::var_os("MOLT_ALLOW_NO_LAB").is_some_and(|v| v == "1") {
            eprintln!("SKIPPED lab scenario {scenario}: {why}");
            return None;
        }
        panic!("lab scenario {scenario} cannot run: {why}");
    }
    let status = Command::new(repo.join("scripts/lab.sh"))
        .arg(scenario)
        // Test the binary this test run built, not whatever is lying around.
        .env("MOLT_BIN", env!("CARGO_BIN_EXE_molt"))
        .status()
        .expect("scripts/lab.sh runs");
    let log_path = repo.join("target/lab").join(format!("{scenario}.log"));
    let log = std::fs::read_to_string(&log_path)
        .unwrap_or_else(|e| panic!("no lab log {}: {e}", log_path.display()));
    let results: HashMap<String, String> = log
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("LAB-RESULT "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(
        status.success() && log.contains("LAB-END status=pass"),
        "lab scenario {scenario} failed; results: {results:?}; log: {}",
        log_path.display()
    );
    Some(results)
}

fn expect(results: &HashMap<String, String>, name: &str, value: &str) {
    assert_eq!(
        results.get(name).map(String::as_str),
        Some(value),
        "LAB-RESULT {name}; all results: {results:?}"
    );
}

#[test]
fn debian_cloud_kernel_boots_smp_pauses_resumes_and_powers_off() {
    let Some(r) = run_scenario("boot-smp") else {
        return;
    };
    // Two CPUs found through the MADT: the cloud kernel has no MP-table parser.
    expect(&r, "guest_cpus", "2");
    expect(&r, "echo_rc", "0");
    expect(&r, "echo_output", "1");
    expect(&r, "status_running", "yes");
    expect(&r, "pause_reply", "ok");
    expect(&r, "status_paused", "yes");
    expect(&r, "ticks_while_paused", "0");
    expect(&r, "resume_reply", "ok");
    expect(&r, "status_resumed", "yes");
    let after: u32 = r["ticks_after_resume"].parse().expect("a tick count");
    assert!(after >= 2, "the guest ran on after resume: {after} ticks");
    expect(&r, "molt_exit", "0");
}
