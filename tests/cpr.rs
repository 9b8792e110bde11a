//! Reboot-mode live update (SPEC.md "The three CPR modes": reboot; "State
//! compatibility"; "Pause time"; "Files molt creates"), run directly on this machine's `/dev/kvm` with
//! the counting guest of `common::guest`: `molt ctl SOCK cpr-save PATH` ends one
//! `molt run`, and a second one with the same arguments plus
//! `--incoming file:PATH` resumes the guest.
//!
//! The guest's serial file is appended to by every process it lives in, so "the
//! guest continued" is one check over the whole file: the start line exactly once,
//! then counts stepping by exactly `COUNT_STEP` (nothing lost, repeated or
//! restarted). A refused state must leave the file byte-identical and start no
//! guest; a failed save must leave the guest counting and nothing at PATH.
//!
//! Damaged and hostile files are checked twice: by a restore (from a fresh save)
//! and by `molt state` (from the committed golden file, tests/data/state-v1.bin,
//! which needs no KVM). Each of those tests lists every problem it finds.
//!
//! No timing is asserted (tests run in parallel on 2 cores); `scripts/bench-cpr.sh`
//! measures. Without `/dev/kvm` every test fails with the reason, unless
//! MOLT_ALLOW_NO_KVM=1. The read-only and full filesystems are tmpfs mounts (this
//! needs root): if mounting is impossible the test fails with the reason, unless
//! MOLT_ALLOW_NO_MOUNT=1.

mod common;

use common::guest::{self, counting_guest, suspend_guest, write_guest, Wake, COUNT_STEP};
use common::{
    assert_one_continuous_run, bytes_read, ctl, field, kvm_available, molt, wait_for_control,
    wait_for_counts, wait_suspended, wait_until, wake_and_power_off, write_private, Molt, Serial,
    TempDir, TIMEOUT,
};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Guest RAM of every test but the golden one, and what `status` reports for it.
const MEM_ARG: &str = "64M";
const MEM_BYTES: u64 = 64 << 20;

/// The state file's layout (src/cpr/state.rs, src/cpr/reboot.rs), which the
/// corruption tests aim at: a 20-byte header - magic (8), version (u32 LE), payload
/// length (u32 LE), CRC32 of the payload - then the payload; then, when RAM is in
/// the file, the RAM section: "MOLTRAM\0", records of (offset u64, len u64, bytes),
/// an end record, and a CRC32.
const HEADER_LEN: usize = 20;
const VERSION_AT: usize = 8;
const LEN_AT: usize = 12;
const CRC_AT: usize = 16;
const RAM_MAGIC_LEN: usize = 8;
const RAM_RECORD_HEAD: usize = 16;

/// The golden files, committed once and never regenerated (see `golden_*`).
fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// A file removed when dropped (guest RAM in /dev/shm outlives molt by design).
struct RemoveFile(PathBuf);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A path under /dev/shm for `--mem-file`, removed when dropped.
fn shm_file(tag: &str) -> RemoveFile {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    RemoveFile(PathBuf::from(format!(
        "/dev/shm/molt-cpr-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )))
}

/// One counting guest across the molt processes it lives in: its directory,
/// serial file, control socket and `molt run` arguments.
struct Guest {
    dir: TempDir,
    serial: PathBuf,
    sock: PathBuf,
    /// `molt run` arguments as (flag, value) pairs, in order.
    base: Vec<(String, String)>,
    /// Processes started so far: process N logs to `dir/runN.stderr`.
    runs: usize,
    /// Declared last: dropped after every `Molt` a test holds (locals drop first).
    _mem_file: Option<RemoveFile>,
}

impl Guest {
    /// The counting guest with 1 vCPU, `MEM_ARG` of RAM, serial to a file and a
    /// control socket; `opts` replaces or adds (flag, value) pairs.
    fn new(tag: &str, opts: &[(&str, &str)]) -> Guest {
        Guest::with_mem_file(tag, opts, None)
    }

    /// Like `new`, with RAM in a file on /dev/shm that outlives molt.
    fn in_shm(tag: &str, opts: &[(&str, &str)]) -> Guest {
        let file = shm_file(tag);
        let path = file.0.to_str().expect("utf-8").to_string();
        let mut opts = opts.to_vec();
        opts.push(("--mem-file", &path));
        Guest::with_mem_file(tag, &opts, Some(file))
    }

    fn with_mem_file(tag: &str, opts: &[(&str, &str)], mem_file: Option<RemoveFile>) -> Guest {
        let dir = TempDir::new(tag);
        let kernel = write_guest(dir.path(), "counting.elf", &counting_guest());
        let serial = dir.join("serial.out");
        let sock = dir.join("ctl.sock");
        let mut g = Guest {
            base: Vec::new(),
            serial,
            sock,
            dir,
            runs: 0,
            _mem_file: mem_file,
        };
        g.base = g.args(&[
            ("--kernel", kernel.to_str().expect("utf-8")),
            ("--mem", MEM_ARG),
            ("--serial", &format!("file:{}", g.serial.display())),
            ("--control", g.sock.to_str().expect("utf-8")),
        ]);
        g.base = g.args(opts);
        g
    }

    /// The base arguments with `overrides` applied: a flag named there loses
    /// every value it had and gets the overrides' values for it, in their order
    /// (none if the only value given is empty); other flags stay as they were.
    fn args(&self, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut args = self.base.clone();
        args.retain(|(f, _)| !overrides.iter().any(|(o, _)| o == f));
        args.extend(
            overrides
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(f, v)| (f.to_string(), v.to_string())),
        );
        args
    }

    /// Starts `molt run` with `overrides`, not waiting for anything.
    fn spawn(&mut self, overrides: &[(&str, &str)]) -> Molt {
        let args = self.args(overrides);
        let argv: Vec<&str> = args
            .iter()
            .flat_map(|(f, v)| [f.as_str(), v.as_str()])
            .collect();
        self.runs += 1;
        Molt::spawn_named(
            &self.dir,
            &format!("run{}", self.runs),
            &argv,
            Stdio::null(),
        )
    }

    /// Boots the guest and waits for the control socket.
    fn boot(&mut self) -> Molt {
        let mut m = self.spawn(&[]);
        wait_for_control(&mut m, &self.sock);
        m
    }

    /// Boots the guest, waits for `counts` count lines and saves it to
    /// `dir/state` (molt exits). Returns that path.
    fn boot_and_save(&mut self, counts: usize) -> PathBuf {
        let mut molt = self.boot();
        self.more_counts(&mut molt, counts);
        let state = self.dir.join("state");
        self.save(&mut molt, &state);
        state
    }

    /// Resumes the guest saved in `state` and waits for the control socket.
    fn resume(&mut self, state: &Path) -> Molt {
        let incoming = format!("file:{}", state.display());
        let mut m = self.spawn(&[("--incoming", &incoming)]);
        wait_for_control(&mut m, &self.sock);
        m
    }

    fn read_serial(&self) -> Serial {
        Serial::read(&self.serial)
    }

    /// Waits until the serial file has `more` count lines beyond what it has now.
    fn more_counts(&self, molt: &mut Molt, more: usize) -> Serial {
        let n = self.read_serial().counts().len();
        wait_for_counts(molt, &self.serial, n + more)
    }

    fn ctl(&self, command: &[&str]) -> String {
        ctl(&self.sock, command)
    }

    /// `cpr-save state`, which must succeed and end `molt` with status 0.
    /// Returns the reply.
    fn save(&self, molt: &mut Molt, state: &Path) -> String {
        let reply = self.ctl(&["cpr-save", state.to_str().expect("utf-8")]);
        assert!(
            reply.starts_with("ok saved "),
            "cpr-save {} replied {reply:?}; stderr:\n{}",
            state.display(),
            molt.stderr()
        );
        let exit = molt.wait_exit(TIMEOUT).unwrap_or_else(|| {
            panic!(
                "molt still running {TIMEOUT:?} after `{reply}`; stderr:\n{}",
                molt.stderr()
            )
        });
        assert!(
            exit.success(),
            "molt exited with {exit} after `{reply}`; stderr:\n{}",
            molt.stderr()
        );
        reply
    }

    /// Starts a restore from `state` (with `overrides`) that must be refused. Its
    /// serial output goes to a file of its own, so any byte there means a guest
    /// ran. Returns the problems found, empty if it was refused as it should be:
    /// exit status 1, stderr naming one of `words`, the file byte-identical, no
    /// guest output, molt gone within `TIMEOUT`.
    fn refused(
        &mut self,
        what: &str,
        state: &Path,
        overrides: &[(&str, &str)],
        words: &[&str],
    ) -> Vec<String> {
        let before = fs::read(state).expect("read state file");
        let serial = self.dir.join(&format!("refused{}.out", self.runs + 1));
        let sock = self.dir.join(&format!("refused{}.sock", self.runs + 1));
        let incoming = format!("file:{}", state.display());
        let serial_arg = format!("file:{}", serial.display());
        let mut all = vec![
            ("--incoming", incoming.as_str()),
            ("--serial", serial_arg.as_str()),
            ("--control", sock.to_str().expect("utf-8")),
        ];
        all.extend_from_slice(overrides);
        let mut m = self.spawn(&all);
        let guest_ran = || fs::metadata(&serial).is_ok_and(|m| m.len() > 0);
        let exit = wait_until(TIMEOUT, || {
            if guest_ran() {
                return Some(None);
            }
            m.child.try_wait().expect("try_wait").map(Some)
        })
        .flatten();
        let stderr = m.stderr();
        let mut problems = Vec::new();
        match exit {
            Some(s) if s.code() == Some(1) => {}
            Some(s) => problems.push(format!("{what}: restore exited with {s}, want 1")),
            None if guest_ran() => problems.push(format!(
                "{what}: the restore was accepted and the guest ran: {:?}",
                Serial::read(&serial).lines
            )),
            None => problems.push(format!("{what}: molt still running after {TIMEOUT:?}")),
        }
        drop(m);
        if guest_ran() {
            problems.push(format!(
                "{what}: the guest wrote to the console: {:?}",
                String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default())
            ));
        }
        let lower = stderr.to_lowercase();
        if !words.iter().any(|w| lower.contains(&w.to_lowercase())) {
            problems.push(format!(
                "{what}: stderr should name the problem ({words:?}): {stderr:?}"
            ));
        }
        if fs::read(state).ok() != Some(before) {
            problems.push(format!("{what}: the state file changed"));
        }
        problems
    }
}

/// `molt state PATH` must fail with status 1 and name one of `words` on stderr.
fn state_refused(what: &str, path: &Path, words: &[&str]) -> Vec<String> {
    let out = molt(&["state", path.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    let mut problems = Vec::new();
    if out.status.code() != Some(1) {
        problems.push(format!(
            "{what}: `molt state` exited with {}, want 1; stdout {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    if !words.iter().any(|w| stderr.contains(&w.to_lowercase())) {
        problems.push(format!(
            "{what}: `molt state` stderr should name the problem ({words:?}): {stderr:?}"
        ));
    }
    problems
}

/// `molt state PATH` output, which must succeed.
fn state_summary(path: &Path) -> String {
    let out = molt(&["state", path.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "molt state {} failed ({}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

fn tmp_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// The numeric `key=value` field of a reply or log line.
fn number(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

/// Checks a successful save: the reply's fields, the file's size and mode 0600,
/// no temporary file left behind.
fn check_saved(reply: &str, state: &Path) {
    assert_eq!(
        field(reply, "path"),
        state.to_str(),
        "cpr-save reply {reply:?}"
    );
    number(reply, "save_us");
    assert_eq!(
        phase_names(reply),
        [
            "stop",
            "save_devices",
            "save_vm",
            "save_vcpus",
            "encode",
            "vcpu_save_max"
        ],
        "cpr-save reply {reply:?}"
    );
    let meta = fs::metadata(state).unwrap_or_else(|e| panic!("stat {}: {e}", state.display()));
    assert_eq!(number(reply, "bytes"), meta.len(), "reply {reply:?}");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "state file mode is {:o}",
        meta.permissions().mode() & 0o777
    );
    assert!(
        !tmp_of(state).exists(),
        "{} left behind",
        tmp_of(state).display()
    );
}

/// After a resume: the guest is one continuous run across all processes so far,
/// continuing above `last_before`; `status` shows the shape and a pause; the log
/// has the restore line with the same pause.
fn check_resumed(g: &Guest, molt: &mut Molt, state: &Path, last_before: u32, vcpus: u32) {
    let serial = g.more_counts(molt, 3);
    let counts = serial.counts();
    let first_after = counts
        .iter()
        .copied()
        .find(|&c| c > last_before)
        .expect("counts after the restore");
    assert!(
        first_after <= last_before + 2 * COUNT_STEP,
        "first count after the restore {first_after:#x} is far above the last before \
         {last_before:#x}"
    );
    assert_one_continuous_run(&serial);
    let status = g.ctl(&["status"]);
    assert_eq!(field(&status, "state"), Some("running"), "{status:?}");
    assert_eq!(
        field(&status, "vcpus"),
        Some(vcpus.to_string().as_str()),
        "{status:?}"
    );
    let pid = molt.pid().to_string();
    assert_eq!(field(&status, "pid"), Some(pid.as_str()), "{status:?}");
    let pause = number(&status, "last_pause_us");
    assert!(pause > 0, "status after a restore: {status:?}");
    let log = molt.stderr();
    let prefix = format!("molt: info: resumed from {}: ", state.display());
    let line = log
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}...` line in stderr:\n{log}"));
    number(line, "restore_us");
    assert_eq!(
        number(line, "pause_us"),
        pause,
        "log {line:?} vs {status:?}"
    );
    assert_eq!(
        phase_names(line),
        [
            "startup",
            "decode",
            "map_ram",
            "build",
            "restore_devices",
            "restore_vm",
            "restore_vcpus",
            "start",
            "vcpu_restore_max"
        ],
        "{line:?}"
    );
}

/// The phases a `phases=NAME:US,...` field lists, each checked to be in µs.
fn phase_names(line: &str) -> Vec<&str> {
    field(line, "phases")
        .unwrap_or_else(|| panic!("no phases= in {line:?}"))
        .split(',')
        .map(|p| match p.split_once(':') {
            Some((name, us)) if us.parse::<u64>().is_ok() => name,
            _ => panic!("phase {p:?} is not NAME:US in {line:?}"),
        })
        .collect()
}

/// The last count line printed so far (the guest must have printed one).
fn last_count(g: &Guest) -> u32 {
    *g.read_serial().counts().last().expect("count lines")
}

/// Boots `g`, then `cycles` times: save, check the file, resume, check the guest.
fn round_trips(g: &mut Guest, cycles: usize, vcpus: u32) -> Vec<PathBuf> {
    let mut molt = g.boot();
    let mut states = Vec::new();
    for cycle in 0..cycles {
        g.more_counts(&mut molt, 3);
        let state = g.dir.join(&format!("state{cycle}"));
        let reply = g.save(&mut molt, &state);
        check_saved(&reply, &state);
        let last_before = last_count(g);
        molt = g.resume(&state);
        check_resumed(g, &mut molt, &state, last_before, vcpus);
        let status = g.ctl(&["status"]);
        assert_eq!(number(&status, "mem"), MEM_BYTES, "{status:?}");
        states.push(state);
    }
    states
}

#[test]
fn round_trip_with_ram_in_the_state_file() {
    if !kvm_available("round_trip_with_ram_in_the_state_file") {
        return;
    }
    let mut g = Guest::new("rt", &[]);
    // Twice: a restored machine must save again just as well.
    let states = round_trips(&mut g, 2, 1);
    let summary = state_summary(&states[0]);
    assert!(
        summary.contains("ram:      in this file"),
        "molt state:\n{summary}"
    );
}

#[test]
fn round_trip_with_ram_in_place_on_dev_shm() {
    if !kvm_available("round_trip_with_ram_in_place_on_dev_shm") {
        return;
    }
    let mut g = Guest::in_shm("shm", &[]);
    let mut molt = g.boot();
    g.more_counts(&mut molt, 3);
    let state = g.dir.join("state");
    let reply = g.save(&mut molt, &state);
    check_saved(&reply, &state);
    let size = fs::metadata(&state).expect("stat").len();
    assert!(
        size < 1 << 20,
        "with RAM in place the state of a {MEM_ARG} guest should be small, is {size} bytes"
    );
    let summary = state_summary(&state);
    assert!(
        summary.contains("ram:      in place"),
        "molt state:\n{summary}"
    );

    // Without the --mem-file there is no RAM to resume with.
    let problems = g.refused(
        "restore without --mem-file",
        &state,
        &[("--mem-file", "")],
        &["--mem-file"],
    );
    assert_no_problems(&problems);
    // Another (empty) file is not the RAM that was saved: refused, not run.
    let other = format!("/dev/shm/molt-cpr-other-{}", std::process::id());
    let problems = g.refused(
        "restore with another --mem-file",
        &state,
        &[("--mem-file", &other)],
        &["not the RAM that was saved"],
    );
    let _ = fs::remove_file(&other);
    assert_no_problems(&problems);

    let last_before = last_count(&g);
    let mut molt = g.resume(&state);
    check_resumed(&g, &mut molt, &state, last_before, 1);
}

#[test]
fn round_trip_with_two_vcpus() {
    if !kvm_available("round_trip_with_two_vcpus") {
        return;
    }
    let mut g = Guest::new("smp", &[("--cpus", "2")]);
    round_trips(&mut g, 1, 2);
}

#[test]
fn save_while_paused_then_resume() {
    if !kvm_available("save_while_paused_then_resume") {
        return;
    }
    let mut g = Guest::new("paused", &[]);
    let mut molt = g.boot();
    g.more_counts(&mut molt, 3);
    assert_eq!(g.ctl(&["pause"]), "ok");
    let state = g.dir.join("state");
    let reply = g.save(&mut molt, &state);
    check_saved(&reply, &state);
    assert!(
        state_summary(&state).contains("run:      paused"),
        "{}",
        state_summary(&state)
    );
    let last_before = last_count(&g);
    let mut molt = g.resume(&state);
    // It comes back paused (SPEC.md: the run state survives every mode): no
    // vCPU runs until `resume`.
    let status = g.ctl(&["status"]);
    assert_eq!(field(&status, "state"), Some("paused"), "{status}");
    std::thread::sleep(Duration::from_millis(500));
    molt.assert_running("restored paused");
    assert_eq!(last_count(&g), last_before, "a guest restored paused ran");
    assert_eq!(g.ctl(&["resume"]), "ok");
    check_resumed(&g, &mut molt, &state, last_before, 1);
}

/// What `molt state` says of a guest saved while suspended to RAM.
const RUN_SUSPENDED: &str = "suspended to RAM, ACPI S3 (stays suspended until `wakeup`)";

/// A guest that suspended itself to RAM (ACPI S3) is saved and restored
/// suspended (SPEC.md: the run state survives every mode): `molt state` and
/// `status` say so, and nothing runs until `wakeup`, which then enters its
/// waking vector. Saved twice - a restored suspended machine saves just as
/// well - with two vCPUs, RAM in the state file and in place on /dev/shm.
#[test]
fn a_suspended_guest_stays_suspended_through_reboot_mode() {
    if !kvm_available("a_suspended_guest_stays_suspended_through_reboot_mode") {
        return;
    }
    for in_shm in [false, true] {
        let mut g = if in_shm {
            Guest::in_shm("s3", &[])
        } else {
            Guest::new("s3", &[])
        };
        let kernel = write_guest(g.dir.path(), "suspend.elf", &suspend_guest(Wake::RealMode));
        g.base = g.args(&[
            ("--kernel", kernel.to_str().expect("utf-8")),
            ("--cpus", "2"),
        ]);
        let mut molt = g.boot();
        for cycle in 0..2 {
            wait_suspended(&mut molt, &g.sock, || g.read_serial());
            let state = g.dir.join(&format!("state{cycle}"));
            let reply = g.save(&mut molt, &state);
            check_saved(&reply, &state);
            let summary = state_summary(&state);
            assert!(
                summary
                    .lines()
                    .any(|l| l == format!("run:      {RUN_SUSPENDED}")),
                "molt state:\n{summary}"
            );
            molt = g.resume(&state);
            let status = g.ctl(&["status"]);
            assert_eq!(field(&status, "state"), Some("suspended"), "{status}");
            assert_eq!(field(&status, "vcpus"), Some("2"), "{status}");
            assert!(number(&status, "last_pause_us") > 0, "{status}");
        }
        wait_suspended(&mut molt, &g.sock, || g.read_serial());
        wake_and_power_off(&mut molt, &g.sock, Wake::RealMode, || g.read_serial());
    }
}

/// A restart opens the disks by name: each must be the image that was saved,
/// neither swapped with another on argv, resized, nor a copy. Each refusal
/// leaves the state usable.
#[test]
fn restart_refuses_disks_swapped_resized_or_replaced() {
    if !kvm_available("restart_refuses_disks_swapped_resized_or_replaced") {
        return;
    }
    let image = |name: &str, size: usize| {
        let path = std::env::temp_dir().join(format!("molt-cpr-{name}-{}", std::process::id()));
        fs::write(&path, vec![0u8; size]).expect("write disk image");
        RemoveFile(path)
    };
    let (d1, d2) = (image("d1", 1 << 20), image("d2", 2 << 20));
    let copy = image("copy", 1 << 20);
    let name = |f: &RemoveFile| f.0.to_str().expect("utf-8").to_string();
    let (n1, n2, ncopy) = (name(&d1), name(&d2), name(&copy));
    // How molt names an image: size, device and inode.
    let id = |f: &RemoveFile| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&f.0).expect("stat image");
        // As molt reads it: 0 where the filesystem keeps no birth time.
        let born = m
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default();
        format!(
            "{} bytes, inode {}, born {}.{:09}",
            m.len(),
            m.ino(),
            born.as_secs(),
            born.subsec_nanos()
        )
    };
    let not_saved = |i: usize, path: &str, saved: &RemoveFile| {
        format!(
            "disk {i} ({path}) is not the image the guest was saved with ({})",
            id(saved)
        )
    };
    let mut g = Guest::new("disk-identity", &[("--disk", &n1), ("--disk", &n2)]);
    let state = g.boot_and_save(3);
    assert!(
        state_summary(&state).contains("disk 1:   virtio-blk, read-write, image 2097152 bytes"),
        "{}",
        state_summary(&state)
    );

    let mut problems = Vec::new();
    problems.extend(g.refused(
        "disks swapped",
        &state,
        &[("--disk", &n2), ("--disk", &n1)],
        &[&format!(
            "{}: it is the image saved as disk 1: disks swapped on argv?",
            not_saved(0, &n2, &d1)
        )],
    ));
    let saved_d2 = not_saved(1, &n2, &d2);
    let resize_d2 = |len: u64| {
        fs::OpenOptions::new()
            .write(true)
            .open(&d2.0)
            .and_then(|f| f.set_len(len))
            .expect("resize d2")
    };
    resize_d2(4 << 20);
    problems.extend(g.refused(
        "disk resized",
        &state,
        &[],
        &[&format!("{saved_d2}: it was resized to 4194304 bytes")],
    ));
    resize_d2(2 << 20);
    problems.extend(g.refused(
        "disk replaced by a copy",
        &state,
        &[("--disk", &ncopy), ("--disk", &n2)],
        &[&format!(
            "{}: it is another file ({}): replaced?",
            not_saved(0, &ncopy, &d1),
            id(&copy)
        )],
    ));
    assert_no_problems(&problems);

    let last_before = last_count(&g);
    let mut molt = g.resume(&state);
    check_resumed(&g, &mut molt, &state, last_before, 1);
}

#[test]
fn shape_mismatch_is_refused_and_the_state_kept() {
    if !kvm_available("shape_mismatch_is_refused_and_the_state_kept") {
        return;
    }
    let disk = {
        let dir = std::env::temp_dir().join(format!("molt-cpr-disk-{}", std::process::id()));
        fs::write(&dir, vec![0u8; 1 << 20]).expect("write disk image");
        RemoveFile(dir)
    };
    let disk_rw = disk.0.to_str().expect("utf-8").to_string();
    let disk_ro = format!("{disk_rw},ro");
    let mut g = Guest::new("shape", &[("--disk", &disk_rw)]);
    let state = g.boot_and_save(3);
    let serial_before = fs::read(&g.serial).expect("serial");

    let mut problems = Vec::new();
    let mut refused = |what: &str, overrides: &[(&str, &str)], words: &[&str]| {
        problems.extend(g.refused(what, &state, overrides, words));
    };
    refused("--cpus 2", &[("--cpus", "2")], &["vCPUs: saved 1, now 2"]);
    refused(
        "--mem 32M",
        &[("--mem", "32M")],
        &["memory: saved 67108864, now 33554432"],
    );
    refused("read-only disk", &[("--disk", &disk_ro)], &["disks"]);
    refused("no disk", &[("--disk", "")], &["disks"]);
    // A passed-through device the guest was not saved with, named with the
    // slot it would get (after the disk) before anything tries to open it.
    refused(
        "--vfio with a state saved without it",
        &[("--vfio", "0000:00:1f.7")],
        &[
            "the --vfio devices are not those the guest was saved with (pass the same \
           devices in the same order; the file is left as it is): --vfio 0000:00:1f.7 \
           at PCI slot 2: the guest was not saved with it",
        ],
    );
    // Every difference is listed, not just the first one found.
    let both = [("--cpus", "2"), ("--mem", "32M")];
    refused("--cpus 2 --mem 32M", &both, &["vCPUs: saved 1, now 2"]);
    refused("--cpus 2 --mem 32M", &both, &["memory: saved"]);
    if fs::read(&g.serial).ok() != Some(serial_before) {
        problems.push("the guest's serial file changed after refused restores".into());
    }
    assert_no_problems(&problems);

    // The refusals left the file good: the right arguments resume it.
    let last_before = last_count(&g);
    let mut molt = g.resume(&state);
    check_resumed(&g, &mut molt, &state, last_before, 1);
}

/// One way to damage a state file, and the words an error about it must use.
struct Damage {
    what: String,
    bytes: Vec<u8>,
    words: &'static [&'static str],
}

const TRUNCATED: &[&str] = &["truncated"];
const CORRUPT: &[&str] = &["crc", "corrupt", "checksum"];
const TRAILING: &[&str] = &["trailing", "unexpected bytes", "after the"];
const RELABELLED_V5: &[&str] = &["unexpected bytes", "cannot decode", "invalid state"];

/// Damaged copies of `good` aimed at the header and payload.
fn header_and_payload_damage(good: &[u8]) -> Vec<Damage> {
    let len = u32::from_le_bytes(good[LEN_AT..LEN_AT + 4].try_into().expect("4 bytes")) as usize;
    let payload_end = HEADER_LEN + len;
    assert!(
        good.len() >= payload_end,
        "the good file is shorter than its header says"
    );
    let cut = |what: &str, at: usize| Damage {
        what: format!("{what} (cut to {at} of {} bytes)", good.len()),
        bytes: good[..at].to_vec(),
        words: TRUNCATED,
    };
    let flip = |what: &str, at: usize, words| {
        let mut bytes = good.to_vec();
        bytes[at] ^= 0x10;
        Damage {
            what: format!("{what} (bit 4 of byte {at})"),
            bytes,
            words,
        }
    };
    let mut magic = good.to_vec();
    magic[..8].copy_from_slice(b"NOTMOLT\0");
    // Only the version word changes, the CRC is not recomputed: the version is
    // checked before anything that depends on it.
    let relabel = |v: u32| {
        let mut b = good.to_vec();
        b[VERSION_AT..VERSION_AT + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    let mut damage = vec![
        cut("empty file", 0),
        cut("truncated inside the magic", 5),
        cut("truncated inside the header", HEADER_LEN - 1),
        cut("header only", HEADER_LEN),
        cut("truncated inside the payload", HEADER_LEN + len / 2),
        cut("last payload byte missing", payload_end - 1),
        flip("flipped bit in the payload", HEADER_LEN + len / 2, CORRUPT),
        flip(
            "flipped bit in the last payload byte",
            payload_end - 1,
            CORRUPT,
        ),
        flip("flipped bit in the stored CRC", CRC_AT, CORRUPT),
        Damage {
            what: "wrong magic".into(),
            bytes: magic,
            words: &["magic"],
        },
        Damage {
            what: "version 6".into(),
            bytes: relabel(6),
            words: &["version 6 is unknown to this molt (it reads versions 1,2,3,4,5)"],
        },
    ];
    // Each format appends parts to the one before: a version 1 payload is
    // short for versions 2 and 3, and a later payload too long for every
    // version before its own.
    let relabelled = |from: u8, to: u32, words| Damage {
        what: format!("version {from} payload labelled version {to}"),
        bytes: relabel(to),
        words,
    };
    if good[VERSION_AT] == 1 {
        damage.push(relabelled(1, 2, &["cannot decode run (from byte"]));
        for to in [3, 4] {
            damage.push(relabelled(
                1,
                to,
                &["cannot decode machine.power (from byte"],
            ));
        }
    } else if good[VERSION_AT] == 5 {
        // Format 5's vCPUs (XSAVE as raw bytes) do not read as any earlier
        // format's: wherever that decoding stops, it is refused.
        for to in 1..5 {
            damage.push(relabelled(5, to, RELABELLED_V5));
        }
    } else {
        for to in 1..u32::from(good[VERSION_AT]) {
            damage.push(relabelled(good[VERSION_AT], to, TRAILING));
        }
    }
    damage.extend([Damage {
        what: "trailing garbage".into(),
        bytes: [good, b"garbage\n"].concat(),
        words: TRAILING,
    }]);
    damage
}

/// Damaged copies of `good` aimed at its RAM section.
fn ram_section_damage(good: &[u8]) -> Vec<Damage> {
    let len = u32::from_le_bytes(good[LEN_AT..LEN_AT + 4].try_into().expect("4 bytes")) as usize;
    let ram = HEADER_LEN + len;
    let first_data = ram + RAM_MAGIC_LEN + RAM_RECORD_HEAD;
    let first_len = u64::from_le_bytes(
        good[first_data - 8..first_data]
            .try_into()
            .expect("8 bytes"),
    ) as usize;
    assert!(
        first_len > 0 && first_data + first_len < good.len(),
        "no RAM record in the good file"
    );
    let cut = |what: &str, at: usize| Damage {
        what: format!("{what} (cut to {at} of {} bytes)", good.len()),
        bytes: good[..at].to_vec(),
        words: &["truncated", "missing"],
    };
    let mut flipped = good.to_vec();
    let at = first_data + first_len / 2;
    flipped[at] ^= 0x10;
    let mut crc = good.to_vec();
    let last = crc.len() - 1;
    crc[last] ^= 0x10;
    vec![
        cut("RAM section missing", ram),
        cut("truncated inside the RAM magic", ram + 4),
        cut(
            "truncated inside a RAM record header",
            ram + RAM_MAGIC_LEN + 5,
        ),
        cut("truncated inside RAM data", first_data + first_len / 2),
        cut("RAM CRC missing", good.len() - 4),
        cut("last byte missing", good.len() - 1),
        Damage {
            what: format!("flipped bit in RAM data (byte {at})"),
            bytes: flipped,
            words: CORRUPT,
        },
        Damage {
            what: "flipped bit in the RAM CRC".into(),
            bytes: crc,
            words: CORRUPT,
        },
        Damage {
            what: "trailing garbage after the RAM section".into(),
            bytes: [good, b"garbage\n"].concat(),
            words: TRAILING,
        },
    ]
}

/// Writes each damaged file into `g`'s directory and checks that `molt run
/// --incoming` refuses it (`molt state` is checked on the same damage to the
/// golden file, without KVM).
fn check_damage(g: &mut Guest, damage: Vec<Damage>) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, d) in damage.into_iter().enumerate() {
        let path = g.dir.join(&format!("damaged{i}"));
        write_private(&path, &d.bytes);
        problems.extend(g.refused(&d.what, &path, &[], d.words));
    }
    problems
}

#[test]
fn damaged_state_with_ram_in_the_file_is_refused_by_restore() {
    if !kvm_available("damaged_state_with_ram_in_the_file_is_refused_by_restore") {
        return;
    }
    let mut g = Guest::new("damage", &[]);
    let state = g.boot_and_save(2);
    let good = fs::read(&state).expect("read state");
    let mut damage = header_and_payload_damage(&good);
    damage.extend(ram_section_damage(&good));
    let problems = check_damage(&mut g, damage);
    assert_no_problems(&problems);
}

#[test]
fn damaged_state_with_ram_in_place_is_refused_and_ram_untouched() {
    if !kvm_available("damaged_state_with_ram_in_place_is_refused_and_ram_untouched") {
        return;
    }
    let mut g = Guest::in_shm("damage-shm", &[]);
    let state = g.boot_and_save(2);
    let mem_file = g._mem_file.as_ref().expect("mem file").0.clone();
    let ram = fs::read(&mem_file).expect("read --mem-file");
    let good = fs::read(&state).expect("read state");
    let mut problems = check_damage(&mut g, header_and_payload_damage(&good));
    if fs::read(&mem_file).ok() != Some(ram) {
        problems.push("refused restores changed the guest RAM in --mem-file".into());
    }
    assert_no_problems(&problems);
}

/// `molt state` checks a file as a restore would (src/cpr/inspect.rs): every
/// damage to the golden file, RAM section included, is refused. Needs no KVM.
#[test]
fn damaged_state_is_refused_by_molt_state() {
    let good = golden_state();
    let dir = TempDir::new("inspect");
    let mut damage = header_and_payload_damage(&good);
    damage.extend(ram_section_damage(&good));
    let mut problems = Vec::new();
    for (i, d) in damage.into_iter().enumerate() {
        let path = dir.join(&format!("damaged{i}"));
        write_private(&path, &d.bytes);
        problems.extend(state_refused(&d.what, &path, d.words));
    }
    assert_no_problems(&problems);
}

/// Where the fields a hostile file would aim at sit in a V1 payload (postcard:
/// `writer` as a varint length and bytes, `ram` as a varint variant index (for
/// `InPlace`, 0, then its sample CRC as a varint), `stopped_at_ns` as a varint,
/// then the machine's shape: `vcpus` as one byte, `mem_size` as a varint, then
/// `disks` and `nets` as a varint count and their items). V1 is frozen, so this
/// is too.
struct V1Fields {
    ram: usize,
    vcpus: usize,
    mem_size: std::ops::Range<usize>,
}

fn varint_end(b: &[u8], mut at: usize) -> usize {
    while b[at] & 0x80 != 0 {
        at += 1;
    }
    at + 1
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let low = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(low);
            return out;
        }
        out.push(low | 0x80);
    }
}

fn v1_fields(payload: &[u8]) -> V1Fields {
    let writer_len = payload[0] as usize;
    assert!(writer_len < 0x80, "writer length is one varint byte");
    let ram = 1 + writer_len;
    // InPlace (variant 0) carries its sample CRC, a varint.
    let mut at = varint_end(payload, ram);
    if payload[ram] == 0 {
        at = varint_end(payload, at);
    }
    let vcpus = varint_end(payload, at);
    let mem_end = varint_end(payload, vcpus + 1);
    V1Fields {
        ram,
        vcpus,
        mem_size: vcpus + 1..mem_end,
    }
}

/// Header (with a correct CRC) + `payload`: damage that no checksum catches.
fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(b"MOLTCPR\0");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A split virtqueue as `QueueStateV1` encodes it (src/virtio/mod.rs): u16s
/// and u64s as varints, bools as one byte.
#[derive(Clone, Copy)]
struct SavedQueue {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// A running queue of 256 entries with its rings low in the golden 16 MiB.
const LIVE_QUEUE: SavedQueue = SavedQueue {
    max_size: 256,
    next_avail: 9,
    next_used: 9,
    size: 256,
    ready: true,
    desc_table: 0x10000,
    avail_ring: 0x11000,
    used_ring: 0x12000,
};

impl SavedQueue {
    fn encode(&self) -> Vec<u8> {
        [
            varint(self.max_size.into()),
            varint(self.next_avail.into()),
            varint(self.next_used.into()),
            vec![0],
            varint(self.size.into()),
            vec![u8::from(self.ready)],
            varint(self.desc_table),
            varint(self.avail_ring),
            varint(self.used_ring),
        ]
        .concat()
    }
}

/// A running virtio-pci transport as `TransportState` encodes it
/// (src/virtio/pci.rs): the 256-byte config space with its PCI IDs, status
/// 0x0f, VIRTIO_F_VERSION_1, the queue registers, the live queues, MSI-X (one
/// vector per queue plus config) and the vector numbers.
fn transport(device_type: u16, registers: &[SavedQueue], live: &[SavedQueue]) -> Vec<u8> {
    let mut config = vec![0u8; 256];
    config[..2].copy_from_slice(&0x1af4u16.to_le_bytes());
    config[2..4].copy_from_slice(&(0x1040 + device_type).to_le_bytes());
    let queues = |qs: &[SavedQueue]| {
        let mut out = varint(qs.len() as u64);
        qs.iter().for_each(|q| out.extend(q.encode()));
        out
    };
    let nq = registers.len() as u64;
    let mut out = [varint(256), config, vec![0x0f]].concat();
    out.extend([varint(0), varint(0), varint(1 << 32), varint(0)].concat());
    out.extend(queues(registers));
    out.push(1);
    out.extend(queues(live));
    // MSI-X: entries (address lo/hi, data, control = masked), pending, enabled,
    // function masked; then the queues' vectors, the config vector and the ISR.
    out.extend(varint(nq + 1));
    for _ in 0..=nq {
        out.extend([0, 0, 0, 1]);
    }
    out.extend(varint(nq + 1));
    out.extend(vec![0; nq as usize + 1]);
    out.extend([1, 0]);
    out.extend(varint(nq));
    out.extend(vec![0; nq as usize]);
    out.extend(varint(nq));
    out.push(0);
    out
}

/// The golden payload with devices put in: its shape's `disks` and `nets`
/// (both empty in it) replaced by `disks` read-write disks and one NIC per MAC,
/// and its `virtio` list (empty, the payload's last byte) by `transports`.
fn with_devices(payload: &[u8], disks: usize, nets: &[[u8; 6]], transports: &[Vec<u8>]) -> Vec<u8> {
    let f = v1_fields(payload);
    assert_eq!(
        payload[f.mem_size.end..f.mem_size.end + 2],
        [0, 0],
        "golden has no devices"
    );
    assert_eq!(payload.last(), Some(&0), "golden has no transports");
    let mut out = payload[..f.mem_size.end].to_vec();
    out.extend(varint(disks as u64));
    out.extend(vec![0; disks]);
    out.extend(varint(nets.len() as u64));
    nets.iter().for_each(|m| out.extend(m));
    out.extend(&payload[f.mem_size.end + 2..payload.len() - 1]);
    out.extend(varint(transports.len() as u64));
    transports.iter().for_each(|t| out.extend(t));
    out
}

/// The golden payload with vCPU 0's XSAVE image cut or zero-extended to
/// `words` 32-bit words. It sits after the shape's end and vCPU 0's CPUID (a
/// count, then 7 varints per entry) and its MP_STATE, REGS and SREGS (each a
/// varint length and the bytes).
fn with_xsave_words(payload: &[u8], words: usize) -> Vec<u8> {
    let f = v1_fields(payload);
    let read = |at: &mut usize| {
        let end = varint_end(payload, *at);
        let v = payload[*at..end]
            .iter()
            .rev()
            .fold(0u64, |v, b| v << 7 | u64::from(b & 0x7f));
        *at = end;
        v
    };
    // Past the empty disks and nets, then the vCPU count.
    let mut at = f.mem_size.end + 2;
    assert_eq!(read(&mut at), 1, "golden vCPU count");
    let entries = read(&mut at);
    for _ in 0..entries * 7 {
        read(&mut at);
    }
    for _ in 0..3 {
        let len = read(&mut at) as usize;
        at += len;
    }
    let start = at;
    let saved = read(&mut at) as usize;
    let first = at;
    for _ in 0..saved.min(words) {
        read(&mut at);
    }
    let kept = at;
    for _ in saved.min(words)..saved {
        read(&mut at);
    }
    [
        &payload[..start],
        &varint(words as u64),
        &payload[first..kept],
        &vec![0; words.saturating_sub(saved)],
        &payload[at..],
    ]
    .concat()
}

/// The golden payload with one running disk (disk 0, a virtio-blk transport)
/// whose live queue is `live`; its queue registers are `LIVE_QUEUE` with
/// `live`'s ring addresses (a running queue's layout cannot change).
fn with_disk_queue(payload: &[u8], live: SavedQueue) -> Vec<u8> {
    let registers = SavedQueue {
        desc_table: live.desc_table,
        avail_ring: live.avail_ring,
        used_ring: live.used_ring,
        ..LIVE_QUEUE
    };
    with_devices(payload, 1, &[], &[transport(2, &[registers], &[live])])
}

/// Hostile states that differ from a valid one only in their devices or vCPU
/// state, each with the field its refusal must name.
fn hostile_devices(payload: &[u8]) -> Vec<(String, Vec<u8>, &'static [&'static str])> {
    const END: u64 = 16 << 20;
    let ring = |what: &str, f: fn(&mut SavedQueue), field: &'static [&'static str]| {
        let mut q = LIVE_QUEUE;
        f(&mut q);
        (what.to_string(), with_disk_queue(payload, q), field)
    };
    let mut out = vec![
        ring(
            "descriptor table overflowing RAM's end",
            |q| q.desc_table = END - 0x800,
            &["desc_table"],
        ),
        ring(
            "descriptor table wrapping past 2^64",
            |q| q.desc_table = u64::MAX - 0xf,
            &["desc_table"],
        ),
        ring(
            "descriptor table above RAM",
            |q| q.desc_table = 1 << 32,
            &["desc_table"],
        ),
        ring(
            "available ring in the MMIO hole",
            |q| q.avail_ring = 0xd000_0000,
            &["avail_ring"],
        ),
        ring(
            "available ring whose used_event field passes RAM's end",
            |q| q.avail_ring = END - 0x204,
            &["avail_ring"],
        ),
        ring(
            "used ring at RAM's end",
            |q| q.used_ring = END,
            &["used_ring"],
        ),
        ring(
            "used ring wrapping past 2^64",
            |q| q.used_ring = u64::MAX - 3,
            &["used_ring"],
        ),
        ring(
            "next_avail 0x8000 ahead of next_used",
            |q| q.next_avail = 0x8009,
            &["next_avail"],
        ),
        ring(
            "live queue not ready while running",
            |q| q.ready = false,
            &["ready"],
        ),
        ring(
            "live queue max_size 128 for a 256 device",
            |q| q.max_size = 128,
            &["max_size"],
        ),
    ];
    for words in [0, 1023, 1025, 4096] {
        out.push((
            format!("XSAVE image of {words} words"),
            with_xsave_words(payload, words),
            &["xsave"],
        ));
    }
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let net = transport(1, &[LIVE_QUEUE; 2], &[LIVE_QUEUE; 2]);
    let disk = transport(2, &[LIVE_QUEUE], &[LIVE_QUEUE]);
    out.push((
        "disk and NIC transports swapped".into(),
        with_devices(payload, 1, &[mac], &[net, disk]),
        &["swapped"],
    ));
    out
}

/// The device states `hostile_devices` starts from are valid: each hostile one
/// is refused for what was changed, not for the frame around it.
#[test]
fn states_with_devices_made_for_the_hostile_tests_are_valid() {
    let good = golden_state();
    let len = u32::from_le_bytes(good[LEN_AT..LEN_AT + 4].try_into().expect("4 bytes")) as usize;
    let payload = &good[HEADER_LEN..HEADER_LEN + len];
    let ram_section = &good[HEADER_LEN + len..];
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let net = transport(1, &[LIVE_QUEUE; 2], &[LIVE_QUEUE; 2]);
    let disk = transport(2, &[LIVE_QUEUE], &[LIVE_QUEUE]);
    let dir = TempDir::new("devices-valid");
    let states = [
        ("one running disk", with_disk_queue(payload, LIVE_QUEUE)),
        (
            "a disk and a NIC",
            with_devices(payload, 1, &[mac], &[disk, net]),
        ),
        (
            "XSAVE image rewritten as it was",
            with_xsave_words(payload, 1024),
        ),
    ];
    assert_eq!(states[2].1, payload, "the XSAVE rewrite is exact");
    for (what, p) in states {
        let path = dir.join(what);
        write_private(&path, &[seal(&p), ram_section.to_vec()].concat());
        let summary = state_summary(&path);
        assert!(summary.contains("vcpus:    1"), "{what}: {summary}");
    }
}

/// Hostile states with a valid checksum, made from the golden file: every decoded
/// value is checked before use (SPEC.md "State compatibility").
fn hostile_states() -> Vec<Damage> {
    let good = golden_state();
    let len = u32::from_le_bytes(good[LEN_AT..LEN_AT + 4].try_into().expect("4 bytes")) as usize;
    let payload = &good[HEADER_LEN..HEADER_LEN + len];
    let ram_section = &good[HEADER_LEN + len..];
    let f = v1_fields(payload);
    assert_eq!(payload[f.ram], 1, "golden RAM location is InStateFile");
    assert_eq!(payload[f.vcpus], 1, "golden vCPU count");
    let edit = |at: usize, byte: u8| {
        let mut p = payload.to_vec();
        p[at] = byte;
        [seal(&p), ram_section.to_vec()].concat()
    };
    let mem = |size: u64| {
        let p = [
            &payload[..f.mem_size.start],
            &varint(size),
            &payload[f.mem_size.end..],
        ]
        .concat();
        [seal(&p), ram_section.to_vec()].concat()
    };
    let mut huge = good.clone();
    huge[LEN_AT..LEN_AT + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    // InPlace { sample_crc }: variant 0, then the CRC as a varint.
    let in_place = [&payload[..f.ram], &[0], &varint(0), &payload[f.ram + 1..]].concat();
    vec![
        Damage {
            what: "unknown RAM location variant".into(),
            bytes: edit(f.ram, 7),
            words: &["decode", "invalid"],
        },
        Damage {
            what: "0 vCPUs".into(),
            bytes: edit(f.vcpus, 0),
            words: &["vcpu"],
        },
        Damage {
            what: "2 vCPUs in the shape, 1 vCPU state".into(),
            bytes: edit(f.vcpus, 2),
            words: &["vcpu"],
        },
        Damage {
            what: "memory size not a multiple of 4 KiB".into(),
            bytes: mem((16 << 20) + 1),
            words: &["memory size"],
        },
        Damage {
            what: "memory size below the minimum".into(),
            bytes: mem(4096),
            words: &["memory size"],
        },
        Damage {
            what: "payload one byte short, resealed".into(),
            bytes: [seal(&payload[..len - 1]), ram_section.to_vec()].concat(),
            words: &["decode", "truncated"],
        },
        Damage {
            what: "payload with an extra byte, resealed".into(),
            bytes: [seal(&[payload, &[0]].concat()), ram_section.to_vec()].concat(),
            words: TRAILING,
        },
        Damage {
            what: "payload length 0xfffffff0".into(),
            bytes: huge,
            words: &["exceeds", "too large", "truncated"],
        },
        Damage {
            what: "RAM in place, with bytes after the payload".into(),
            bytes: [seal(&in_place), b"garbage\n".to_vec()].concat(),
            words: TRAILING,
        },
        Damage {
            what: "memory size 2^64 - 4096".into(),
            bytes: mem(u64::MAX - 4095),
            words: &["memory size"],
        },
    ]
    .into_iter()
    .chain(
        hostile_devices(payload)
            .into_iter()
            .map(|(what, p, words)| Damage {
                what,
                bytes: [seal(&p), ram_section.to_vec()].concat(),
                words,
            }),
    )
    .collect()
}

#[test]
fn hostile_state_with_a_valid_crc_is_refused_by_molt_state() {
    let dir = TempDir::new("hostile");
    let mut problems = Vec::new();
    for (i, d) in hostile_states().into_iter().enumerate() {
        let path = dir.join(&format!("hostile{i}"));
        write_private(&path, &d.bytes);
        problems.extend(state_refused(&d.what, &path, d.words));
    }
    assert_no_problems(&problems);
}

#[test]
fn hostile_state_with_a_valid_crc_is_refused_by_restore() {
    if !kvm_available("hostile_state_with_a_valid_crc_is_refused_by_restore") {
        return;
    }
    let shm = shm_file("hostile");
    let mut g = Guest::new("hostile", &[("--mem", GOLDEN_MEM)]);
    let disk = g.dir.join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).expect("write disk image");
    let disk = disk.to_str().expect("utf-8").to_string();
    let mut problems = Vec::new();
    for (i, d) in hostile_states().into_iter().enumerate() {
        let path = g.dir.join(&format!("hostile{i}"));
        write_private(&path, &d.bytes);
        // Given a --mem-file, so that an in-place state is refused for what is
        // wrong with it, not for the missing file; and the disks the state
        // claims, so that it is not refused for a shape other than its own.
        let mut args = vec![("--mem-file", shm.0.to_str().expect("utf-8"))];
        let payload = &d.bytes[HEADER_LEN..];
        let disks = payload[v1_fields(payload).mem_size.end];
        args.extend((0..disks).map(|_| ("--disk", disk.as_str())));
        problems.extend(g.refused(&d.what, &path, &args, d.words));
    }
    assert_no_problems(&problems);
}

/// A guest whose virtio-blk queue is running (the storm guest keeps 200 reads
/// queued) is saved with its live queue; `molt state` and the restore accept
/// that state (its rings are in RAM, its indices within the queue size, its
/// layout its registers'), and the restored device goes on serving the same
/// queue.
#[test]
fn a_running_disk_queue_is_saved_checked_and_resumed() {
    if !kvm_available("a_running_disk_queue_is_saved_checked_and_resumed") {
        return;
    }
    let dir = TempDir::new("storm-img");
    let (kernel, disk) = guest::storm_files(dir.path());
    let mut g = Guest::new(
        "storm-cpr",
        &[
            ("--kernel", kernel.to_str().expect("utf-8")),
            ("--mem", guest::STORM_MEM),
            ("--disk", disk.to_str().expect("utf-8")),
        ],
    );
    let full = u64::from(guest::STORM_QUEUED) * u64::from(guest::STORM_READ_BYTES);
    let storming = |m: &mut Molt| {
        let pid = m.pid();
        let on = wait_until(TIMEOUT, || {
            m.assert_running("while the guest keeps its disk busy");
            (bytes_read(pid) > full).then_some(())
        });
        assert!(
            on.is_some(),
            "no queue of reads served; stderr:\n{}",
            m.stderr()
        );
    };
    let mut m = g.boot();
    storming(&mut m);
    let state = g.dir.join("state");
    g.save(&mut m, &state);
    let summary = state_summary(&state);
    assert!(
        summary.contains("device 0: status 0x0f") && summary.contains("running"),
        "{summary}"
    );
    let mut m = g.resume(&state);
    storming(&mut m);
    assert!(g.ctl(&["status"]).starts_with("ok state=running"));
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    /// Mounts a tmpfs with `options` on `dir` (created). None if mounting is
    /// impossible here and MOLT_ALLOW_NO_MOUNT=1 allows skipping; otherwise fails.
    fn tmpfs(dir: &Path, options: &str) -> Option<Mount> {
        fs::create_dir_all(dir).expect("create mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Mount(dir.into())),
            Ok(o) => format!(
                "mount -t tmpfs -o {options}: {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("cannot run mount: {e}"),
        };
        if std::env::var("MOLT_ALLOW_NO_MOUNT").as_deref() == Ok("1") {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the {options} tmpfs case: {why}; MOLT_ALLOW_NO_MOUNT=1 is set"
            );
            None
        } else {
            panic!("{why}; set MOLT_ALLOW_NO_MOUNT=1 to skip the cases that mount");
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy: detach it so the temp dir can go.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// What was at a save's PATH before it failed, and must be there after.
enum Before<'a> {
    Nothing,
    File(&'a [u8]),
    Directory,
}

/// `cpr-save path` must fail, leave the guest counting, leave at `path` what was
/// there before and no `path.tmp`.
fn save_fails(g: &Guest, molt: &mut Molt, what: &str, path: &Path, before: Before) {
    let reply = g.ctl(&["cpr-save", path.to_str().expect("utf-8")]);
    assert!(
        reply.starts_with("error: cpr-save"),
        "{what}: cpr-save {} replied {reply:?}",
        path.display()
    );
    assert!(
        reply.contains(&path.display().to_string()),
        "{what}: the error should name the path: {reply:?}"
    );
    molt.assert_running(&format!("after a failed cpr-save ({what})"));
    let status = g.ctl(&["status"]);
    assert_eq!(
        field(&status, "state"),
        Some("running"),
        "{what}: {status:?}"
    );
    // The guest runs on: its output grows after the error.
    g.more_counts(molt, 2);
    match before {
        Before::Nothing => assert!(
            fs::symlink_metadata(path).is_err(),
            "{what}: {} exists after a failed save",
            path.display()
        ),
        Before::File(old) => assert_eq!(
            fs::read(path).ok().as_deref(),
            Some(old),
            "{what}: the file that was at {} changed",
            path.display()
        ),
        Before::Directory => assert!(
            path.is_dir(),
            "{what}: the directory at {} is gone",
            path.display()
        ),
    }
    assert!(
        fs::symlink_metadata(tmp_of(path)).is_err(),
        "{what}: {} left behind",
        tmp_of(path).display()
    );
}

#[test]
fn failed_save_leaves_the_guest_running_and_nothing_behind() {
    if !kvm_available("failed_save_leaves_the_guest_running_and_nothing_behind") {
        return;
    }
    let mut g = Guest::new("savefail", &[]);
    let mut molt = g.boot();
    g.more_counts(&mut molt, 2);

    let missing = g.dir.join("no-such-dir/state");
    save_fails(
        &g,
        &mut molt,
        "missing directory",
        &missing,
        Before::Nothing,
    );
    let proc = Path::new("/proc/molt-cpr-state");
    save_fails(&g, &mut molt, "in /proc", proc, Before::Nothing);
    // The temporary file is written, then the rename onto a directory fails.
    let is_dir = g.dir.join("a-directory");
    fs::create_dir(&is_dir).expect("mkdir");
    save_fails(
        &g,
        &mut molt,
        "PATH is a directory",
        &is_dir,
        Before::Directory,
    );

    // Declared after `g`, so unmounted before its directory is removed.
    let ro = Mount::tmpfs(&g.dir.join("ro"), "size=64k,ro");
    if let Some(ro) = &ro {
        let path = ro.0.join("state");
        save_fails(&g, &mut molt, "read-only tmpfs", &path, Before::Nothing);
    }
    // 16 KiB: the state of the counting guest with its RAM is about 26 KiB.
    let full = Mount::tmpfs(&g.dir.join("full"), "size=16k");
    if let Some(full) = &full {
        let path = full.0.join("state");
        save_fails(&g, &mut molt, "full tmpfs", &path, Before::Nothing);
        let old = b"the previous state\n";
        fs::write(&path, old).expect("write old state");
        save_fails(
            &g,
            &mut molt,
            "full tmpfs, PATH exists",
            &path,
            Before::File(old),
        );
    }

    // None of it disturbed the guest: a real save now resumes one continuous run.
    let state = g.dir.join("state");
    g.save(&mut molt, &state);
    let last_before = last_count(&g);
    let mut molt = g.resume(&state);
    check_resumed(&g, &mut molt, &state, last_before, 1);
}

/// A file with `bytes` and mode `mode` (which `fs::write` alone does not set
/// under every umask).
fn file_with_mode(path: &Path, bytes: &[u8], mode: u32) {
    write_private(path, bytes);
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// SPEC.md "Files molt creates": links planted at PATH.tmp and PATH (as anyone
/// may in /tmp or /dev/shm) are replaced, never written through, and a stale
/// PATH.tmp readable by others does not make the state readable.
#[test]
fn save_writes_through_no_link_and_makes_a_0600_file() {
    if !kvm_available("save_writes_through_no_link_and_makes_a_0600_file") {
        return;
    }
    let mut g = Guest::new("links", &[]);
    let mut molt = g.boot();
    g.more_counts(&mut molt, 2);
    let state = g.dir.join("state");
    let victims = [
        (g.dir.join("tmp-victim"), tmp_of(&state)),
        (g.dir.join("path-victim"), state.clone()),
    ];
    for (victim, link) in &victims {
        file_with_mode(victim, b"not molt's\n", 0o644);
        std::os::unix::fs::symlink(victim, link).expect("symlink");
    }
    let reply = g.save(&mut molt, &state);
    for (victim, _) in &victims {
        let now = fs::read(victim).expect("read victim");
        assert!(
            now == b"not molt's\n",
            "cpr-save wrote through a link into {} (now {} bytes)",
            victim.display(),
            now.len()
        );
        let mode = fs::metadata(victim).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{} mode changed", victim.display());
    }
    let meta = fs::symlink_metadata(&state).expect("lstat state");
    assert!(meta.is_file(), "{} is not a regular file", state.display());
    check_saved(&reply, &state);

    let last_before = last_count(&g);
    let mut molt = g.resume(&state);
    check_resumed(&g, &mut molt, &state, last_before, 1);
    let again = g.dir.join("state2");
    file_with_mode(&tmp_of(&again), b"stale\n", 0o644);
    let reply = g.save(&mut molt, &again);
    check_saved(&reply, &again);
}

/// A state is loaded only from a file molt would have written: not through a
/// link, not one other users may read or write, not another user's.
#[test]
fn a_state_behind_a_link_or_open_to_others_is_not_loaded() {
    if !kvm_available("a_state_behind_a_link_or_open_to_others_is_not_loaded") {
        return;
    }
    let mut g = Guest::new("loadmode", &[]);
    let state = g.boot_and_save(2);
    let good = fs::read(&state).expect("read state");

    let link = g.dir.join("link");
    std::os::unix::fs::symlink(&state, &link).expect("symlink");
    let readable = g.dir.join("readable");
    file_with_mode(&readable, &good, 0o644);
    let writable = g.dir.join("writable");
    file_with_mode(&writable, &good, 0o602);
    let foreign = g.dir.join("foreign");
    write_private(&foreign, &good);
    std::os::unix::fs::chown(&foreign, Some(65534), None).expect("chown (needs root)");
    let cases: [(&str, &Path, &[&str]); 4] = [
        ("link", &link, &["is a symbolic link"]),
        (
            "mode 0644",
            &readable,
            &["is readable by other users (mode 0644): chmod 600 it"],
        ),
        (
            "mode 0602",
            &writable,
            &["is writable by other users (mode 0602)"],
        ),
        ("owned by uid 65534", &foreign, &["is owned by uid 65534"]),
    ];
    let mut problems = Vec::new();
    for (what, path, words) in cases {
        problems.extend(g.refused(what, path, &[], words));
        problems.extend(state_refused(what, path, words));
    }
    assert_no_problems(&problems);
}

/// `CMD PATH` run as uid/gid 65534 (nobody) with no supplementary groups:
/// Ok, or Err with its stderr.
fn as_nobody(setpriv: &Path, cmd: &str, path: &Path) -> Result<(), String> {
    let out = Command::new(setpriv)
        .args(common::AS_NOBODY)
        .arg(cmd)
        .arg(path)
        .stdout(Stdio::null())
        .output()
        .expect("run setpriv");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Guest RAM (`--mem-file`), the saved state and the console file are molt's
/// alone: another uid cannot read them, where it can read a file of mode 0644
/// next to each (so the directories let it through and the modes stop it).
#[test]
fn another_user_cannot_read_ram_state_or_console() {
    if !kvm_available("another_user_cannot_read_ram_state_or_console") {
        return;
    }
    let Some(setpriv) = common::setpriv() else {
        return;
    };
    let mut g = Guest::in_shm("nobody", &[]);
    fs::set_permissions(g.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let state = g.boot_and_save(2);
    let mem_file = g._mem_file.as_ref().expect("mem file").0.clone();

    let shm_control = shm_file("nobody-control");
    let controls = [g.dir.join("control"), shm_control.0.clone()];
    for c in &controls {
        file_with_mode(c, b"anyone may read this\n", 0o644);
        if let Err(e) = as_nobody(&setpriv, "cat", c) {
            panic!(
                "uid 65534 cannot read the 0644 control {}: {e}",
                c.display()
            );
        }
    }
    let mut problems = Vec::new();
    for (what, path) in [
        ("--mem-file", &mem_file),
        ("state file", &state),
        ("--serial file", &g.serial),
    ] {
        match as_nobody(&setpriv, "cat", path) {
            Ok(()) => problems.push(format!("uid 65534 read the {what} {}", path.display())),
            Err(e) if e.contains("Permission denied") => {}
            Err(e) => problems.push(format!("{what}: want permission denied, got {e:?}")),
        }
    }
    assert_no_problems(&problems);
}

// Golden states, versions 1 to 5.
//
// tests/data/state-v1.bin was written once by molt 0.1.0 when it wrote format 1
// (its `make_golden_state_v1`) from the counting guest in tests/data/counting.elf: 1 vCPU, 16M, RAM in the
// file, running. tests/data/state-v2.bin was written once by the release that
// introduced format 2 (`make_golden_state_v2`) from the same guest and shape,
// saved while paused. tests/data/state-v3.bin was written once by the release
// that introduced format 3 (`make_golden_state_v3` below) from the suspend
// guest in tests/data/suspend.elf (`suspend_guest(Wake::RealMode)`), same
// shape, saved while suspended to RAM. tests/data/state-v4.bin was written
// once by the release that introduced format 4 (`make_golden_state_v4`), the
// same way: format 4 adds the passed-through functions' states and
// identities, and this direct /dev/kvm machine has none (their encoding is in
// `state.rs`'s unit tests; the lab's vfio-cpr and vfio-reboot scenarios carry
// edu). tests/data/state-v5.bin was written once by the release that
// introduced format 5 (`make_golden_state_v5`), the same way: format 5 holds
// each vCPU's XSAVE image as raw bytes. state-vN.serial is what the guest
// printed up to the save.
//
// THESE FILES MUST DECODE FOREVER (SPEC.md "State compatibility", STYLE.md
// "Versions are explicit and frozen"). If a change to molt breaks these tests,
// the change broke compatibility: the format needs a new version (format 6,
// converting from 5), not a regenerated file.
//
// Decoding is host-independent. Resuming also needs this host's KVM to offer
// every CPU feature the guest was started with (version 1 was saved on an Intel
// Xeon, versions 2 to 5 on AMD EPYCs: their CPUID, XSAVE layout and MSRs): where it
// does not, the restore must refuse the state naming what is missing, with the
// file untouched; the decoding must never fail.

const GOLDEN_MEM: &str = "16M";

/// What each golden state holds beyond the common shape: its format line, CPU
/// and run state as `molt state` prints them, and its guest (in tests/data).
struct Golden {
    version: u32,
    writer: &'static str,
    cpu: &'static str,
    run: &'static str,
    guest: &'static str,
}

const GOLDEN: [Golden; 5] = [
    Golden {
        version: 1,
        writer: "0.1.0",
        cpu: "GenuineIntel family 0x6 model 0xcf",
        run: "running",
        guest: "counting.elf",
    },
    Golden {
        version: 2,
        writer: "0.1.0",
        cpu: "AuthenticAMD family 0x1a model 0x2",
        run: "paused (stays paused when resumed)",
        guest: "counting.elf",
    },
    Golden {
        version: 3,
        writer: "0.1.0",
        cpu: "AuthenticAMD family 0x1a model 0x2",
        run: RUN_SUSPENDED,
        guest: "suspend.elf",
    },
    Golden {
        version: 4,
        writer: "0.1.0",
        cpu: "AuthenticAMD family 0x1a model 0x2",
        run: RUN_SUSPENDED,
        guest: "suspend.elf",
    },
    Golden {
        version: 5,
        writer: "0.2.0-dev",
        cpu: "AuthenticAMD family 0x1a model 0x2",
        run: RUN_SUSPENDED,
        guest: "suspend.elf",
    },
];

/// The golden state's bytes (version 1 unless named). It is loaded from a
/// private copy: the checkout's file is readable by other users, which molt
/// refuses for a state.
fn golden_state() -> Vec<u8> {
    golden_bytes(1)
}

fn golden_bytes(version: u32) -> Vec<u8> {
    fs::read(data_dir().join(format!("state-v{version}.bin"))).expect("golden state")
}

#[test]
fn golden_states_decode() {
    for golden in &GOLDEN {
        let v = golden.version;
        let dir = TempDir::new(&format!("golden-decode-v{v}"));
        let path = dir.join(&format!("state-v{v}.bin"));
        write_private(&path, &golden_bytes(v));
        let size = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        let summary = state_summary(&path);
        let expected = [
            format!("state:    {}", path.display()),
            format!("format:   version {v} (written by molt {})", golden.writer),
            format!("run:      {}", golden.run),
            format!("size:     {size} bytes"),
            "vcpus:    1".to_string(),
            "memory:   16777216 bytes".to_string(),
            "  region  guest 0x0..0x1000000 at file offset 0x0".to_string(),
            "ram:      in this file".to_string(),
            format!("cpu:      {}", golden.cpu),
        ];
        for line in &expected {
            assert!(
                summary.lines().any(|l| l == line),
                "`molt state` of golden version {v} lacks {line:?}:\n{summary}"
            );
        }
        // Without /dev/kvm it says so instead of failing.
        let verdict = host_cpu_verdict(&summary);
        assert!(
            ["compatible (", "refused: ", "not checked ("]
                .iter()
                .any(|p| verdict.starts_with(p)),
            "`molt state` host cpu line: {verdict:?}"
        );
    }
}

/// What `molt state` says of this host's KVM against the state's vCPUs.
fn host_cpu_verdict(summary: &str) -> &str {
    summary
        .lines()
        .find_map(|l| l.strip_prefix("host cpu: "))
        .unwrap_or_else(|| panic!("`molt state` has no `host cpu:` line:\n{summary}"))
}

#[test]
fn golden_states_resume_where_the_host_can_run_them() {
    if !kvm_available("golden_states_resume_where_the_host_can_run_them") {
        return;
    }
    for golden in &GOLDEN {
        golden_resumes(golden);
    }
}

fn golden_resumes(golden: &Golden) {
    let v = golden.version;
    let data = data_dir();
    let kernel = data.join(golden.guest);
    let mut g = Guest::new(
        &format!("golden-v{v}"),
        &[
            ("--kernel", kernel.to_str().expect("utf-8")),
            ("--mem", GOLDEN_MEM),
        ],
    );
    // The guest's console so far, as if this were the same serial file.
    let printed = fs::read(data.join(format!("state-v{v}.serial"))).expect("golden serial");
    write_private(&g.serial, &printed);
    let state = g.dir.join(&format!("state-v{v}.bin"));
    write_private(&state, &golden_bytes(v));
    // `molt state` compares the saved CPU needs with this host's KVM as the
    // restore does: on a host that cannot run the guest (an AMD EPYC's KVM
    // lacks PKRU state and Intel-only features, and lays AVX-512 state out
    // elsewhere) the restore must refuse with the same reason, exit 1, and
    // leave the file and the console untouched.
    let verdict = host_cpu_verdict(&state_summary(&state)).to_string();
    if let Some(reason) = verdict.strip_prefix("refused: ") {
        eprintln!("golden version {v} refused here, as it must be: {reason}");
        let expected = format!(
            "the guest saved in {} cannot run on this host (the file is left as it is): {reason}",
            state.display()
        );
        let mut problems = g.refused("the golden state here", &state, &[], &[&expected]);
        // Refused before the console file or the control socket was created.
        let created: Vec<String> = fs::read_dir(g.dir.path())
            .expect("read test dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("refused"))
            .collect();
        if !created.is_empty() {
            problems.push(format!("the refused restore created {created:?}"));
        }
        assert_no_problems(&problems);
        assert_eq!(fs::read(&g.serial).ok(), Some(printed), "console changed");
        return;
    }
    assert!(verdict.starts_with("compatible ("), "host cpu: {verdict:?}");
    let mut molt = g.resume(&state);
    if golden.run == RUN_SUSPENDED {
        wait_suspended(&mut molt, &g.sock, || g.read_serial());
        wake_and_power_off(&mut molt, &g.sock, Wake::RealMode, || g.read_serial());
        assert_eq!(
            fs::read(&state).ok(),
            Some(golden_bytes(v)),
            "resuming changed the state file"
        );
        return;
    }
    let last_before = *Serial::parse(&printed)
        .counts()
        .last()
        .expect("golden counts");
    if golden.run.starts_with("paused") {
        let status = g.ctl(&["status"]);
        assert_eq!(field(&status, "state"), Some("paused"), "{status}");
        assert_eq!(g.ctl(&["resume"]), "ok");
    }
    check_resumed(&g, &mut molt, &state, last_before, 1);
    let status = g.ctl(&["status"]);
    assert_eq!(number(&status, "mem"), 16 << 20, "{status:?}");
    assert_eq!(
        fs::read(&state).ok(),
        Some(golden_bytes(v)),
        "resuming changed the state file"
    );
}

/// Writes golden files once, in the format this release writes, from the
/// suspend guest left suspended to RAM. Never run it to "fix" a failing
/// golden test: it refuses to overwrite, and a format change needs a new
/// version.
fn make_golden_state(version: u32) {
    let data = data_dir();
    let state_out = data.join(format!("state-v{version}.bin"));
    assert!(
        !state_out.exists(),
        "{} exists and must never be regenerated",
        state_out.display()
    );
    fs::create_dir_all(&data).expect("mkdir tests/data");
    // The golden state runs a committed guest.
    let kernel = data.join("suspend.elf");
    if !kernel.exists() {
        write_guest(&data, "suspend.elf", &suspend_guest(Wake::RealMode));
    }
    let mut g = Guest::new(
        "mkgolden",
        &[
            ("--kernel", kernel.to_str().expect("utf-8")),
            ("--mem", GOLDEN_MEM),
        ],
    );
    let mut molt = g.boot();
    wait_suspended(&mut molt, &g.sock, || g.read_serial());
    let state = g.dir.join("state");
    g.save(&mut molt, &state);
    fs::copy(&state, &state_out).expect("copy state");
    fs::copy(&g.serial, data.join(format!("state-v{version}.serial"))).expect("copy serial");
}

#[test]
#[ignore = "writes tests/data/state-v3.* once"]
fn make_golden_state_v3() {
    make_golden_state(3);
}

#[test]
#[ignore = "writes tests/data/state-v4.* once"]
fn make_golden_state_v4() {
    make_golden_state(4);
}

#[test]
#[ignore = "writes tests/data/state-v5.* once"]
fn make_golden_state_v5() {
    make_golden_state(5);
}

/// A restart opens the disks by name, so `cpr-save` refuses a disk whose name
/// no longer leads to the open image (it used to save and exit, and the last
/// reference to a deleted image went with it); the guest runs on.
#[test]
fn save_refuses_a_disk_replaced_or_deleted_while_molt_runs() {
    if !kvm_available("save_refuses_a_disk_replaced_or_deleted_while_molt_runs") {
        return;
    }
    let disk =
        RemoveFile(std::env::temp_dir().join(format!("molt-cpr-gone-{}", std::process::id())));
    fs::write(&disk.0, vec![0u8; 1 << 20]).expect("write disk image");
    let mut g = Guest::new("disk-gone", &[("--disk", disk.0.to_str().expect("utf-8"))]);
    let mut molt = g.boot();
    g.more_counts(&mut molt, 2);
    let state = g.dir.join("state");
    let save = |g: &Guest| g.ctl(&["cpr-save", state.to_str().expect("utf-8")]);

    let fresh = disk.0.with_extension("new");
    fs::write(&fresh, vec![0u8; 1 << 20]).expect("write the replacement");
    fs::rename(&fresh, &disk.0).expect("replace the image");
    let reply = save(&g);
    assert!(
        reply.starts_with("error: cpr-save: disk") && reply.contains("another file"),
        "{reply}"
    );
    g.more_counts(&mut molt, 2);

    fs::remove_file(&disk.0).expect("delete the image");
    let reply = save(&g);
    assert!(reply.contains("was deleted while molt ran"), "{reply}");
    assert!(!state.exists(), "a state was written");
    g.more_counts(&mut molt, 2);
    molt.assert_running("after the refused saves");
}
