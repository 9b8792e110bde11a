//! Helpers shared by the integration tests that run the real `molt` binary: temp
//! dirs, a child guard that always kills molt, polling with timeouts, `molt ctl`,
//! and parsing of the test guests' serial output.
//!
//! Each test crate (`direct`, `cli`) uses a different subset of these helpers, so
//! dead-code warnings are silenced for the module as a whole.
#![allow(dead_code)]

pub mod guest;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The binary under test.
pub const MOLT: &str = env!("CARGO_BIN_EXE_molt");
/// How long anything is given to happen before a test fails: generous, because
/// tests run in parallel on a 2-core machine with busy-looping guests.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// Polling interval while waiting.
pub const POLL: Duration = Duration::from_millis(15);

/// Whether a test that needs `/dev/kvm` can run. If it cannot be opened the test
/// fails with the reason, unless `MOLT_ALLOW_NO_KVM=1` says skipping is intended,
/// in which case the skip is printed: CI must never skip silently.
pub fn kvm_available(test: &str) -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            let reason = format!("{test}: cannot open /dev/kvm ({e})");
            if std::env::var("MOLT_ALLOW_NO_KVM").as_deref() == Ok("1") {
                // Straight to fd 2: libtest captures `eprintln!` of passing tests,
                // and a skip must show in the log.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED {reason}; MOLT_ALLOW_NO_KVM=1 is set"
                );
                false
            } else {
                panic!("{reason}; set MOLT_ALLOW_NO_KVM=1 to skip the tests that need KVM");
            }
        }
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // Kept short: a control socket path must fit in sun_path (108 bytes).
        let name = format!(
            "molt-{tag}-{}-{}-{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `setpriv`'s arguments that run a command as user nobody, no groups kept.
pub const AS_NOBODY: [&str; 5] = ["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"];

/// util-linux's setpriv, which runs a command as another uid (tests run as
/// root); None, with the reason printed, where it is missing.
pub fn setpriv() -> Option<PathBuf> {
    let found = ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        eprintln!("SKIPPED the second-uid part: setpriv (util-linux) is not installed");
    }
    found
}

/// Writes `bytes` to `path` as a new file of mode 0600 (replacing what was there):
/// molt refuses a state or console file other users may read (SPEC.md "Files molt
/// creates"), and `fs::write` under umask 022 makes one.
pub fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A running `molt run`, killed and reaped when dropped (also when a test panics).
/// Its stderr goes to a file so that failures can quote it.
pub struct Molt {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Molt {
    /// Starts `molt run ARGS...` with stdin from /dev/null, stderr to
    /// `dir/molt.stderr` and stdout as given.
    pub fn spawn(dir: &TempDir, args: &[&str], stdout: Stdio) -> Molt {
        Molt::spawn_named(dir, "molt", args, stdout)
    }

    /// Like `spawn`, with stderr to `dir/NAME.stderr`: each of the processes a
    /// guest lives in across a live update keeps its own log.
    pub fn spawn_named(dir: &TempDir, name: &str, args: &[&str], stdout: Stdio) -> Molt {
        Molt::spawn_bin(dir, Path::new(MOLT), name, args, stdout)
    }

    /// Like `spawn_named`, running `bin run ARGS...` instead of the binary under
    /// test: the upgrade tests run copies of it and of a second build. A copy that
    /// was just written may still be open for writing in a child another test
    /// thread is forking (ETXTBSY): that is retried for a while.
    pub fn spawn_bin(dir: &TempDir, bin: &Path, name: &str, args: &[&str], stdout: Stdio) -> Molt {
        Molt::spawn_bin_on(dir, bin, name, args, (Stdio::null(), stdout))
    }

    /// Like `spawn_bin`, with stdin (and stdout) as given: a console on a
    /// terminal reads from it.
    pub fn spawn_bin_on(
        dir: &TempDir,
        bin: &Path,
        name: &str,
        args: &[&str],
        (stdin, stdout): (Stdio, Stdio),
    ) -> Molt {
        let stderr_path = dir.join(&format!("{name}.stderr"));
        let stderr = File::create(&stderr_path).expect("create stderr file");
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr);
        let child = spawn_retrying_etxtbsy(&mut cmd);
        Molt { child, stderr_path }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What molt wrote to stderr so far, for failure messages.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Panics (quoting stderr) if molt has exited.
    pub fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("molt exited ({status}) {when}; stderr:\n{}", self.stderr());
        }
    }

    /// Waits for molt to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.child.try_wait().expect("try_wait"))
    }
}

impl Drop for Molt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every `POLL` until it returns `Some`, or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Runs a command to completion, killing it and failing the test after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = spawn_retrying_etxtbsy(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // Drain both pipes in threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let status = wait_until(timeout, || child.try_wait().expect("try_wait"));
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let stderr = err_t.join().unwrap_or_default();
        panic!(
            "{cmd:?} still running after {timeout:?}, killed; stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        );
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Spawns `cmd`, retrying for up to `TIMEOUT` while exec fails with ETXTBSY.
pub fn spawn_retrying_etxtbsy(cmd: &mut Command) -> Child {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match cmd.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                thread::sleep(POLL)
            }
            Err(e) => panic!("spawn {cmd:?}: {e}"),
        }
    }
}

/// /proc/PID/io: how much process `pid` has read (a disk guest's progress).
pub fn bytes_read(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar in /proc/PID/io")
}

/// `molt ARGS...` to completion (usage and ctl commands).
pub fn molt(args: &[&str]) -> Output {
    run_with_timeout(Command::new(MOLT).args(args), TIMEOUT)
}

/// `molt ctl SOCK COMMAND...`; returns the printed reply line, failing the test if
/// ctl does not print exactly one line, or if an `ok` reply comes with a non-zero
/// exit status.
pub fn ctl(sock: &Path, command: &[&str]) -> String {
    ctl_timeout(sock, command, TIMEOUT)
}

/// `ctl` for commands allowed to take longer than `TIMEOUT` (a live update that
/// fails only when the other process's timeout expires).
pub fn ctl_timeout(sock: &Path, command: &[&str], timeout: Duration) -> String {
    let mut args = vec!["ctl", sock.to_str().expect("utf-8 path")];
    args.extend_from_slice(command);
    let out = run_with_timeout(Command::new(MOLT).args(&args), timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "molt ctl {command:?} should print one reply line; stdout {stdout:?}, stderr {stderr:?}, {}",
        out.status
    );
    let reply = lines[0].to_string();
    if reply.starts_with("ok") {
        assert!(
            out.status.success(),
            "molt ctl {command:?} replied {reply:?} but exited with {}",
            out.status
        );
    }
    reply
}

/// The `key=value` fields of a reply line such as `ok state=running vcpus=1 ...`.
pub fn field<'a>(reply: &'a str, key: &str) -> Option<&'a str> {
    reply
        .split_whitespace()
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
}

/// Waits until the control socket accepts connections (it may exist between
/// `bind` and `listen`), failing if molt exits first.
pub fn wait_for_control(molt: &mut Molt, sock: &Path) {
    let up = wait_until(TIMEOUT, || {
        molt.assert_running("before its control socket came up");
        std::os::unix::net::UnixStream::connect(sock).ok()
    });
    assert!(
        up.is_some(),
        "control socket {} not accepting after {TIMEOUT:?}; stderr:\n{}",
        sock.display(),
        molt.stderr()
    );
}

/// The serial output of the counting guest, split into complete lines.
#[derive(Debug, Default)]
pub struct Serial {
    /// Every complete (newline-terminated) line, without the newline or a '\r'.
    pub lines: Vec<String>,
}

impl Serial {
    /// Parses the complete lines of `bytes`; a trailing partial line is ignored.
    pub fn parse(bytes: &[u8]) -> Serial {
        let text = String::from_utf8_lossy(bytes);
        let end = text.rfind('\n').map_or(0, |i| i + 1);
        Serial {
            lines: text[..end]
                .lines()
                .map(|l| l.trim_end_matches('\r').to_string())
                .collect(),
        }
    }

    pub fn read(path: &Path) -> Serial {
        Serial::parse(&fs::read(path).unwrap_or_default())
    }

    /// The values of the `count=XXXXXXXX` lines, in order. Panics on a line that
    /// starts with `count=` but is not 8 uppercase hex digits (a garbled line).
    pub fn counts(&self) -> Vec<u32> {
        self.lines
            .iter()
            .filter_map(|l| parse_count_line(l))
            .collect()
    }

    pub fn start_lines(&self) -> usize {
        self.lines
            .iter()
            .filter(|l| l.as_str() == guest::START_LINE)
            .count()
    }
}

/// `count=0001F000` -> Some(0x1f000); other lines -> None; a malformed count line
/// fails the test.
pub fn parse_count_line(line: &str) -> Option<u32> {
    let hex = line.strip_prefix("count=")?;
    let ok = hex.len() == 8
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
    assert!(ok, "malformed count line {line:?}");
    Some(u32::from_str_radix(hex, 16).expect("hex"))
}

/// Asserts the counting guest's lines are what one uninterrupted run prints: the
/// start line exactly once and first, then counts that strictly increase by exactly
/// `COUNT_STEP` (nothing lost, repeated or restarted), and nothing else.
pub fn assert_one_continuous_run(serial: &Serial) {
    assert_eq!(
        serial.lines.first().map(String::as_str),
        Some(guest::START_LINE),
        "the first line should be the start line; lines: {:?}",
        serial.lines
    );
    assert_eq!(
        serial.start_lines(),
        1,
        "guest restarted? {:?}",
        serial.lines
    );
    for line in &serial.lines[1..] {
        assert!(
            parse_count_line(line).is_some(),
            "unexpected serial line {line:?}"
        );
    }
    let counts = serial.counts();
    for pair in counts.windows(2) {
        assert!(
            pair[1] > pair[0],
            "counts must strictly increase: {:#x} then {:#x}",
            pair[0],
            pair[1]
        );
        assert_eq!(
            pair[1] - pair[0],
            guest::COUNT_STEP,
            "a line was lost or repeated between {:#x} and {:#x}",
            pair[0],
            pair[1]
        );
    }
}

/// Waits until the serial file at `path` holds at least `n` count lines.
pub fn wait_for_counts(molt: &mut Molt, path: &Path, n: usize) -> Serial {
    let got = wait_until(TIMEOUT, || {
        molt.assert_running("while the counting guest should be running");
        let s = Serial::read(path);
        (s.counts().len() >= n).then_some(s)
    });
    got.unwrap_or_else(|| {
        panic!(
            "fewer than {n} count lines after {TIMEOUT:?}; serial: {:?}; stderr:\n{}",
            Serial::read(path).lines,
            molt.stderr()
        )
    })
}

/// Waits until the suspend guest (`guest::suspend_guest`) molt runs behind
/// `sock` is suspended: it printed its suspend line and `status` says
/// `state=suspended`. Its console stays as it was then, without the line a
/// guest woken in place would print. Returns that status.
pub fn wait_suspended(molt: &mut Molt, sock: &Path, serial: impl Fn() -> Serial) -> String {
    let status = wait_until(TIMEOUT, || {
        molt.assert_running("while the guest suspends");
        let printed = serial().lines.iter().any(|l| l == guest::SUSPEND_LINE);
        let status = ctl(sock, &["status"]);
        (printed && field(&status, "state") == Some("suspended")).then_some(status)
    })
    .unwrap_or_else(|| {
        panic!(
            "not suspended after {TIMEOUT:?}: status {:?}, console {:?}; stderr:\n{}",
            ctl(sock, &["status"]),
            serial().lines,
            molt.stderr()
        )
    });
    let before = serial().lines;
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        serial().lines,
        before,
        "the console changed while suspended"
    );
    assert!(
        !before.iter().any(|l| l == guest::IN_PLACE_LINE),
        "the guest's sleep command returned: {before:?}"
    );
    status
}

/// `wakeup` of a suspended suspend guest: `ok`, then its wake code prints
/// `wake.woken_line()` (it runs in the mode it asked for) and powers off,
/// which ends molt with status 0.
pub fn wake_and_power_off(
    molt: &mut Molt,
    sock: &Path,
    wake: guest::Wake,
    serial: impl Fn() -> Serial,
) {
    let reply = ctl(sock, &["wakeup"]);
    assert_eq!(reply, "ok", "wakeup; stderr:\n{}", molt.stderr());
    let exit = molt.wait_exit(TIMEOUT).unwrap_or_else(|| {
        panic!(
            "molt still runs {TIMEOUT:?} after wakeup: console {:?}; stderr:\n{}",
            serial().lines,
            molt.stderr()
        )
    });
    let lines = serial().lines;
    assert!(
        exit.success(),
        "molt exited with {exit} after wakeup; console {lines:?}; stderr:\n{}",
        molt.stderr()
    );
    assert_eq!(
        lines.iter().filter(|l| *l == wake.woken_line()).count(),
        1,
        "{wake:?}: console {lines:?}; stderr:\n{}",
        molt.stderr()
    );
    assert_eq!(
        lines.iter().filter(|l| *l == guest::START_LINE).count(),
        1,
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l == guest::IN_PLACE_LINE),
        "the guest's sleep command returned: {lines:?}"
    );
}

/// Panics unless the ELF executable at `path` is statically linked: an x86-64
/// ELF with no program interpreter (PT_INTERP) and, if it has a dynamic section
/// at all (static-pie), no shared library in it (DT_NEEDED).
pub fn assert_static(path: &Path) {
    let elf = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]);
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
    assert!(
        elf.len() > 64 && elf.starts_with(b"\x7fELF\x02\x01") && u16_at(18) == 62,
        "{} is not a little-endian x86-64 ELF",
        path.display()
    );
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
    for i in 0..phnum as usize {
        let ph = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap());
        const PT_DYNAMIC: u32 = 2;
        const PT_INTERP: u32 = 3;
        assert_ne!(
            p_type,
            PT_INTERP,
            "{} has a program interpreter: it is dynamically linked",
            path.display()
        );
        if p_type == PT_DYNAMIC {
            let (offset, size) = (u64_at(ph + 8) as usize, u64_at(ph + 32) as usize);
            const DT_NEEDED: u64 = 1;
            let needed = elf[offset..offset + size]
                .chunks_exact(16)
                .any(|entry| u64::from_le_bytes(entry[..8].try_into().unwrap()) == DT_NEEDED);
            assert!(!needed, "{} needs shared libraries", path.display());
        }
    }
}

/// `molt ctl SOCK events` running, its lines collected as they arrive: the
/// process is killed when dropped.
pub struct Watcher {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// The reply to `events`: `ok events state=S version=V`.
    pub reply: String,
}

impl Watcher {
    /// Starts `molt ctl SOCK events` and waits for its `ok events` reply: from
    /// then on it is registered and sees every event.
    pub fn start(sock: &Path) -> Watcher {
        use std::io::BufRead;
        let mut child = spawn_retrying_etxtbsy(
            Command::new(MOLT)
                .args(["ctl", sock.to_str().expect("utf-8 path"), "events"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut w = Watcher {
            child,
            lines,
            reply: String::new(),
        };
        w.reply = w.next(TIMEOUT).expect("no reply to `events`");
        assert!(
            w.reply.starts_with("ok events state="),
            "events replied {:?}",
            w.reply
        );
        w
    }

    /// The next line printed, if one comes within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The next line, which must be the event `name` (`event t_ms=N NAME
    /// state=S ...`, with N this host's time in ms, give or take the wait).
    pub fn expect(&self, name: &str) -> String {
        let before = unix_ms();
        let line = self
            .next(TIMEOUT)
            .unwrap_or_else(|| panic!("no `{name}` event within {TIMEOUT:?}"));
        let words: Vec<&str> = line.split(' ').collect();
        assert!(
            words.len() >= 4 && words[0] == "event" && words[2] == name,
            "want the event {name}, got {line:?}"
        );
        assert!(words[3].starts_with("state="), "{line:?}");
        let t: u64 = field(&line, "t_ms")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no t_ms in {line:?}"));
        let after = unix_ms();
        assert!(
            t + TIMEOUT.as_millis() as u64 >= before && t <= after,
            "t_ms={t} is not around now ({before}..{after}): {line:?}"
        );
        line
    }

    /// Waits for `molt ctl events` to end (molt closed the connection).
    pub fn wait_end(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.child.try_wait().expect("try_wait"))
    }

    /// Whether `molt ctl events` still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
