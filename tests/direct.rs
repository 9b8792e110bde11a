//! Runs the real `molt` binary on this machine's `/dev/kvm` with the tiny guests of
//! `common::guest`: boot and serial output (file and stdio), power-off and reset
//! exits, and the control pipe (SPEC.md "The control pipe"): status, pause/resume,
//! quit, error replies and `--cpus`; that a guest keeping its disk's queue full
//! cannot take the event loop away from `status` and SIGTERM; and ACPI S3: a
//! guest that suspends itself is reported suspended with its vCPUs stopped, and
//! `wakeup` enters the waking vector it left in the FACS, in the mode it asked
//! for, or is refused with the reason. Events: a watcher (`molt ctl PATH
//! events`) sees pause, resume and quit, `molt ctl PATH wait` returns on the
//! state or times out saying which, and a watcher that never reads is dropped
//! without holding up `status`.
//!
//! Without `/dev/kvm` every test fails with the reason, unless MOLT_ALLOW_NO_KVM=1.

mod common;

use common::guest::{self, counting_guest, exit_guest, suspend_guest, write_guest, ExitKind, Wake};
use common::{
    assert_one_continuous_run, ctl, field, kvm_available, molt, wait_for_control, wait_for_counts,
    wait_suspended, wake_and_power_off, Molt, Serial, TempDir, Watcher, TIMEOUT,
};
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The guest RAM every test asks for, and what `status` must report for it.
const MEM_ARG: &str = "64M";
const MEM_BYTES: u64 = 64 << 20;

/// A counting guest running under molt with its serial output in a file and,
/// optionally, a control socket.
struct Counting {
    // Field order matters: molt is killed (dropped) before its directory goes.
    molt: Molt,
    serial: PathBuf,
    sock: PathBuf,
    _dir: TempDir,
}

impl Counting {
    /// Starts molt on the counting guest, serial output to `dir/serial.out`, with
    /// `--control dir/ctl.sock` if `control` (and then waits for the socket).
    fn start(tag: &str, control: bool, extra: &[&str]) -> Counting {
        Counting::start_image(tag, &counting_guest(), control, extra)
    }

    /// `start` with another guest image.
    fn start_image(tag: &str, image: &[u8], control: bool, extra: &[&str]) -> Counting {
        let dir = TempDir::new(tag);
        let kernel = write_guest(dir.path(), "guest.elf", image);
        let serial = dir.join("serial.out");
        let sock = dir.join("ctl.sock");
        let serial_arg = format!("file:{}", serial.display());
        let mut args = vec![
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            MEM_ARG,
            "--serial",
            &serial_arg,
        ];
        if control {
            args.extend_from_slice(&["--control", sock.to_str().unwrap()]);
        }
        args.extend_from_slice(extra);
        let mut molt = Molt::spawn(&dir, &args, Stdio::null());
        if control {
            wait_for_control(&mut molt, &sock);
        }
        Counting {
            molt,
            serial,
            sock,
            _dir: dir,
        }
    }

    fn wait_counts(&mut self, n: usize) -> Serial {
        wait_for_counts(&mut self.molt, &self.serial, n)
    }

    fn ctl(&self, command: &[&str]) -> String {
        ctl(&self.sock, command)
    }

    fn status(&self) -> String {
        let reply = self.ctl(&["status"]);
        assert!(reply.starts_with("ok "), "status replied {reply:?}");
        reply
    }
}

/// `reply` is a success reply: `ok` alone or followed by a space.
fn assert_ok(command: &str, reply: &str) {
    assert!(
        reply == "ok" || reply.starts_with("ok "),
        "{command} should reply ok, got {reply:?}"
    );
}

/// `reply` begins `ok` or `error: ` (SPEC: every reply does).
fn assert_ok_or_error(command: &str, reply: &str) {
    assert!(
        reply == "ok" || reply.starts_with("ok ") || reply.starts_with("error: "),
        "{command} should reply `ok...` or `error: ...`, got {reply:?}"
    );
}

#[test]
fn boots_and_writes_counts_to_serial_file() {
    if !kvm_available("boots_and_writes_counts_to_serial_file") {
        return;
    }
    let mut c = Counting::start("boot", false, &[]);
    let serial = c.wait_counts(5);
    assert_one_continuous_run(&serial);
    c.molt.assert_running("while the guest counts");
}

#[test]
fn serial_stdio_carries_the_guest_output() {
    if !kvm_available("serial_stdio_carries_the_guest_output") {
        return;
    }
    let dir = TempDir::new("stdio");
    let kernel = write_guest(dir.path(), "counting.elf", &counting_guest());
    let args = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem",
        MEM_ARG,
        "--serial",
        "stdio",
    ];
    let mut molt = Molt::spawn(&dir, &args, Stdio::piped());
    let stdout = molt.child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    // Ends when molt is killed and the pipe closes.
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + TIMEOUT;
    let mut serial = Serial::default();
    while serial.counts().len() < 5 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => serial.lines.push(line.trim_end_matches('\r').to_string()),
            Err(e) => panic!(
                "fewer than 5 count lines on stdout ({e}); got {:?}; stderr:\n{}",
                serial.lines,
                molt.stderr()
            ),
        }
    }
    assert_one_continuous_run(&serial);
    molt.assert_running("while the guest counts");
}

fn exit_guest_ends_molt(kind: ExitKind) {
    let dir = TempDir::new("exit");
    let kernel = write_guest(dir.path(), "exit.elf", &exit_guest(kind));
    let stdout_path = dir.join("stdout");
    let stdout = fs::File::create(&stdout_path).unwrap();
    let args = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem",
        MEM_ARG,
        "--serial",
        "stdio",
    ];
    let mut molt = Molt::spawn(&dir, &args, Stdio::from(stdout));
    let status = molt.wait_exit(TIMEOUT).unwrap_or_else(|| {
        panic!(
            "{kind:?}: molt still running {TIMEOUT:?} after the guest wrote to port 0x600; \
             stdout {:?}; stderr:\n{}",
            fs::read_to_string(&stdout_path).unwrap_or_default(),
            molt.stderr()
        )
    });
    let out = Serial::read(&stdout_path);
    assert!(
        status.success(),
        "{kind:?}: a guest {kind:?} must end molt with status 0, got {status}; stdout {:?}; stderr:\n{}",
        out.lines,
        molt.stderr()
    );
    assert!(
        out.lines.iter().any(|l| l == guest::HELLO_LINE),
        "{kind:?}: the hello line is missing from stdout: {:?}",
        out.lines
    );
}

#[test]
fn guest_power_off_ends_molt_with_status_0() {
    if kvm_available("guest_power_off_ends_molt_with_status_0") {
        exit_guest_ends_molt(ExitKind::PowerOff);
    }
}

#[test]
fn guest_reset_ends_molt_with_status_0() {
    if kvm_available("guest_reset_ends_molt_with_status_0") {
        exit_guest_ends_molt(ExitKind::Reset);
    }
}

#[test]
fn control_status_pause_resume_quit() {
    if !kvm_available("control_status_pause_resume_quit") {
        return;
    }
    let mut c = Counting::start("ctl", true, &[]);

    let meta = fs::symlink_metadata(&c.sock).expect("stat control socket");
    assert!(meta.file_type().is_socket(), "{:?} is not a socket", c.sock);
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "control socket mode is {:o}",
        meta.permissions().mode() & 0o777
    );
    c.wait_counts(3);

    let status = c.status();
    let prefix = format!("ok state=running vcpus=1 mem={MEM_BYTES} version=");
    assert!(
        status.starts_with(&prefix),
        "status {status:?}, want {prefix:?}..."
    );
    assert!(
        field(&status, "version").is_some_and(|v| !v.is_empty()),
        "empty version in {status:?}"
    );
    let pid = c.molt.pid().to_string();
    assert_eq!(
        field(&status, "pid"),
        Some(pid.as_str()),
        "status {status:?}"
    );
    assert!(
        field(&status, "last_pause_us").is_some_and(|v| !v.is_empty()),
        "no last_pause_us=U in {status:?}"
    );

    // Pause: the reply comes once every vCPU has stopped, so output stops with it.
    // A little slack lets a console writer thread flush bytes the guest wrote before.
    assert_ok("pause", &c.ctl(&["pause"]));
    let right_after_pause = fs::read(&c.serial).unwrap_or_default().len();
    let status = c.status();
    assert_eq!(field(&status, "state"), Some("paused"), "status {status:?}");
    thread::sleep(Duration::from_millis(100));
    let before = fs::read(&c.serial).unwrap_or_default();
    thread::sleep(Duration::from_millis(300));
    let still = fs::read(&c.serial).unwrap_or_default();
    assert_eq!(
        before.len(),
        still.len(),
        "serial output grew while paused: {:?}",
        String::from_utf8_lossy(&still[before.len().min(still.len())..])
    );
    if before.len() != right_after_pause {
        eprintln!(
            "note: {} serial bytes arrived within 100 ms after the pause reply",
            before.len() - right_after_pause
        );
    }
    c.molt.assert_running("while paused");
    let counts_before = Serial::parse(&before).counts();
    let last_before = *counts_before.last().expect("counts before the pause");

    assert_ok("resume", &c.ctl(&["resume"]));
    let status = c.status();
    assert_eq!(
        field(&status, "state"),
        Some("running"),
        "status {status:?}"
    );
    let serial = c.wait_counts(counts_before.len() + 3);
    let first_after = serial.counts()[counts_before.len()];
    assert!(
        first_after > last_before,
        "first count after resume {first_after:#x} is not above the last before the pause \
         {last_before:#x}: the guest restarted"
    );
    assert_one_continuous_run(&serial);

    assert_ok("quit", &c.ctl(&["quit"]));
    let exit = c.molt.wait_exit(Duration::from_secs(10));
    match exit {
        Some(s) => assert!(s.success(), "molt exited with {s} after quit"),
        None => panic!(
            "molt still running 10 s after quit; stderr:\n{}",
            c.molt.stderr()
        ),
    }
}

#[test]
fn pause_twice_and_resume_while_running_are_harmless() {
    if !kvm_available("pause_twice_and_resume_while_running_are_harmless") {
        return;
    }
    let mut c = Counting::start("twice", true, &[]);
    c.wait_counts(2);

    assert_ok("pause", &c.ctl(&["pause"]));
    assert_ok_or_error("second pause", &c.ctl(&["pause"]));
    let status = c.status();
    assert_eq!(field(&status, "state"), Some("paused"), "status {status:?}");
    c.molt.assert_running("after pausing twice");

    assert_ok("resume", &c.ctl(&["resume"]));
    assert_ok_or_error("resume while running", &c.ctl(&["resume"]));
    let status = c.status();
    assert_eq!(
        field(&status, "state"),
        Some("running"),
        "status {status:?}"
    );

    // The VM still works: the guest keeps counting, continuing its sequence.
    let n = Serial::read(&c.serial).counts().len();
    let serial = c.wait_counts(n + 3);
    assert_one_continuous_run(&serial);
    c.molt.assert_running("after resume");
}

/// A raw control-pipe client, to send what `molt ctl` never would.
struct RawClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl RawClient {
    fn connect(sock: &Path) -> RawClient {
        RawClient::connect_checked(sock).expect("connect control socket")
    }

    fn connect_checked(sock: &Path) -> std::io::Result<RawClient> {
        let writer = UnixStream::connect(sock)?;
        writer.set_read_timeout(Some(TIMEOUT))?;
        writer.set_write_timeout(Some(TIMEOUT))?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(RawClient { writer, reader })
    }

    /// Sends `bytes` and reads one reply line (without its newline). A write error
    /// is tolerated (the server may reply and close before reading everything);
    /// the reply must still arrive.
    fn request(&mut self, bytes: &[u8]) -> std::io::Result<String> {
        if let Err(e) = self.writer.write_all(bytes) {
            if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
                return Err(e);
            }
        }
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        assert!(
            line.ends_with('\n'),
            "reply not newline-terminated: {line:?}"
        );
        Ok(line.trim_end_matches('\n').to_string())
    }

    /// Whether the server closed the connection (EOF or reset) without sending more.
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        self.writer
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let r = self.reader.read(&mut buf);
        self.writer.set_read_timeout(Some(TIMEOUT)).unwrap();
        match r {
            Ok(0) => true,
            Ok(_) => panic!("unexpected extra reply data: {:?}", buf[0] as char),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(_) => true,
        }
    }
}

/// Asserts `reply` is one `error: ` line naming the problem with one of `words`.
fn assert_error_naming(what: &str, reply: &str, words: &[&str]) {
    assert!(
        reply.starts_with("error: "),
        "{what}: want `error: ...`, got {reply:?}"
    );
    let lower = reply.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(w)),
        "{what}: the error {reply:?} should say {words:?}"
    );
}

/// After an error, `status` works on the same connection; that it returns `ok`
/// (not a second error line) also proves the error was exactly one line.
fn assert_status_ok(client: &mut RawClient, after: &str) {
    let reply = client
        .request(b"status\n")
        .unwrap_or_else(|e| panic!("status after {after}: {e}"));
    assert!(
        reply.starts_with("ok state="),
        "status after {after} replied {reply:?} (an extra reply line to {after}?)"
    );
}

#[test]
fn control_errors_get_one_error_line_each() {
    if !kvm_available("control_errors_get_one_error_line_each") {
        return;
    }
    let mut c = Counting::start("err", true, &[]);
    let mut client = RawClient::connect(&c.sock);

    let reply = client.request(b"\n").expect("reply to an empty line");
    assert_error_naming("empty line", &reply, &["empty"]);
    assert_status_ok(&mut client, "an empty line");

    let reply = client
        .request(b"frobnicate\n")
        .expect("reply to frobnicate");
    assert_error_naming("unknown command", &reply, &["unknown"]);
    assert_status_ok(&mut client, "an unknown command");

    let mut long = vec![b'a'; 64 * 1024];
    long.push(b'\n');
    let reply = client.request(&long).expect("reply to a 64 KiB line");
    assert_error_naming(
        "64 KiB line",
        &reply,
        &["too long", "long", "length", "limit"],
    );
    if client.closed() {
        eprintln!("note: molt closed the connection after the overlong line");
        client = RawClient::connect(&c.sock);
    }
    assert_status_ok(&mut client, "an overlong line");

    // A fresh connection works too, and the VM is still alive and counting.
    let mut fresh = RawClient::connect(&c.sock);
    assert_status_ok(&mut fresh, "the errors, on a new connection");
    c.molt.assert_running("after the control errors");
    let n = Serial::read(&c.serial).counts().len();
    c.wait_counts(n + 2);
}

#[test]
fn four_vcpus_are_reported() {
    if !kvm_available("four_vcpus_are_reported") {
        return;
    }
    let mut c = Counting::start("smp", true, &["--cpus", "4"]);
    let serial = c.wait_counts(3);
    assert_one_continuous_run(&serial);
    let status = c.status();
    assert_eq!(field(&status, "vcpus"), Some("4"), "status {status:?}");
    assert_eq!(
        field(&status, "state"),
        Some("running"),
        "status {status:?}"
    );
    c.molt.assert_running("with 4 vCPUs");
}

/// One request on a connection of its own, as `molt ctl` makes it.
fn request_once(sock: &Path, line: &str) -> std::io::Result<String> {
    let mut client = RawClient::connect_checked(sock)?;
    client.request(format!("{line}\n").as_bytes())
}

#[test]
fn fifty_parallel_clients_get_every_reply() {
    if !kvm_available("fifty_parallel_clients_get_every_reply") {
        return;
    }
    let mut c = Counting::start("par", true, &[]);
    let workers: Vec<_> = (0..50)
        .map(|_| {
            let sock = c.sock.clone();
            thread::spawn(move || {
                (0..20)
                    .map(|_| request_once(&sock, "status"))
                    .filter(|r| r.as_ref().is_ok_and(|l| l.starts_with("ok state=")))
                    .count()
            })
        })
        .collect();
    let ok: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(ok, 1000, "status requests answered `ok state=...`");
    c.molt.assert_running("after 1000 parallel requests");
}

#[test]
fn idle_connections_do_not_lock_the_operator_out() {
    if !kvm_available("idle_connections_do_not_lock_the_operator_out") {
        return;
    }
    let mut c = Counting::start("idle", true, &[]);
    // Settle first, so that molt holds no connection but these 20 (the probe
    // that saw the socket come up is gone), and these are all accepted.
    thread::sleep(Duration::from_millis(200));
    let idle: Vec<_> = (0..20).map(|_| RawClient::connect(&c.sock)).collect();
    thread::sleep(Duration::from_millis(200));
    c.status();
    drop(idle);
    c.molt.assert_running("after 20 idle connections");
}

#[test]
fn bursts_of_connect_and_close_leave_the_socket_usable() {
    if !kvm_available("bursts_of_connect_and_close_leave_the_socket_usable") {
        return;
    }
    let mut c = Counting::start("burst", true, &[]);
    for round in 0..5 {
        for _ in 0..100 {
            drop(UnixStream::connect(&c.sock).expect("connect"));
        }
        // At once, not via `molt ctl`: its start-up would give molt time to
        // see the closed connections go.
        let reply = request_once(&c.sock, "status");
        assert!(
            reply.as_ref().is_ok_and(|r| r.starts_with("ok state=")),
            "status after burst {round}: {reply:?}"
        );
    }
    c.status();
    c.molt.assert_running("after bursts of connect and close");
}

/// The pipeliner pauses the guest, asks `status` 1000 times and resumes it, all in
/// one write, and reads nothing meanwhile. Another client's `status` must be
/// answered while the guest is still paused: served in turn, not after the
/// pipeliner's whole batch. Then every one of the pipeliner's replies arrives.
#[test]
fn a_pipelining_client_does_not_delay_another() {
    if !kvm_available("a_pipelining_client_does_not_delay_another") {
        return;
    }
    let mut c = Counting::start("pipe", true, &[]);
    let mut single = RawClient::connect(&c.sock);
    assert_status_ok(&mut single, "connecting");
    let mut pipeliner = RawClient::connect(&c.sock);
    assert_status_ok(&mut pipeliner, "connecting");

    let mut batch = b"pause\n".to_vec();
    batch.extend_from_slice(&b"status\n".repeat(1000));
    batch.extend_from_slice(b"resume\n");
    pipeliner.writer.write_all(&batch).expect("pipelined write");
    // Its pause is served first: wait for it, without reading its replies.
    let paused = common::wait_until(TIMEOUT, || {
        let status = request_once(&c.sock, "status").ok()?;
        (field(&status, "state") == Some("paused")).then_some(())
    });
    assert!(paused.is_some(), "the pipelined pause was never served");

    let asked = Instant::now();
    let reply = single
        .request(b"status\n")
        .expect("status beside the pipeliner");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        asked.elapsed()
    );
    assert_eq!(
        field(&reply, "state"),
        Some("paused"),
        "status {reply:?}: served only after the pipeliner's whole batch"
    );

    let mut replies = Vec::new();
    for _ in 0..batch.split(|&b| b == b'\n').count() - 1 {
        let mut line = String::new();
        match pipeliner.reader.read_line(&mut line) {
            Ok(n) if n > 0 => replies.push(line),
            other => panic!("pipeliner's reply {}: {other:?}", replies.len()),
        }
    }
    assert_eq!(replies.first().map(String::as_str), Some("ok\n"));
    assert_eq!(replies.last().map(String::as_str), Some("ok\n"));
    let statuses = replies[1..replies.len() - 1]
        .iter()
        .filter(|r| r.starts_with("ok state="))
        .count();
    assert_eq!(statuses, 1000, "every pipelined status answered");
    let status = c.status();
    assert_eq!(field(&status, "state"), Some("running"));
    c.molt.assert_running("after the pipeliner");
}

#[test]
fn a_peer_of_another_uid_is_refused() {
    let test = "a_peer_of_another_uid_is_refused";
    if !kvm_available(test) {
        return;
    }
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(setpriv) = setpriv else {
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no setpriv");
        return;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs root for setpriv");
        return;
    }
    let c = Counting::start("uid", true, &[]);
    // Open the file modes wide: only the SO_PEERCRED check stands in the way.
    fs::set_permissions(&c.sock, fs::Permissions::from_mode(0o666)).unwrap();
    fs::set_permissions(c.sock.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = common::run_with_timeout(
        std::process::Command::new(setpriv).args([
            "--reuid",
            "nobody",
            "--regid",
            "nogroup",
            "--clear-groups",
            common::MOLT,
            "ctl",
            c.sock.to_str().unwrap(),
            "pause",
        ]),
        TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "pause from nobody: {stdout:?}");
    assert_error_naming("pause from nobody", stdout.trim_end(), &["uid"]);
    let status = c.status();
    assert_eq!(
        field(&status, "state"),
        Some("running"),
        "nobody's pause was carried out: {status:?}"
    );
    let log = c.molt.stderr();
    assert!(log.contains("refused"), "the refusal is logged: {log}");
}

/// molt serves at most this many control clients at once (README).
const MAX_CLIENTS: usize = 64;

#[test]
fn a_client_beyond_the_limit_waits_for_a_free_slot() {
    if !kvm_available("a_client_beyond_the_limit_waits_for_a_free_slot") {
        return;
    }
    let mut c = Counting::start("full", true, &[]);
    let mut held: Vec<RawClient> = (0..MAX_CLIENTS)
        .map(|i| {
            let mut client = RawClient::connect(&c.sock);
            assert_status_ok(&mut client, &format!("connection {i}"));
            client
        })
        .collect();
    let (tx, rx) = mpsc::channel();
    let sock = c.sock.clone();
    thread::spawn(move || tx.send(request_once(&sock, "status")));
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "with every slot taken, a further client waits"
    );
    held.pop();
    let reply = rx.recv_timeout(TIMEOUT).expect("served once a slot freed");
    assert!(
        reply.as_ref().is_ok_and(|r| r.starts_with("ok state=")),
        "{reply:?}"
    );
    assert_status_ok(&mut held[0], "a slot freed");
    c.molt.assert_running("with every slot taken");
}

/// Bytes molt has read through read(2)-like calls (preadv included), from
#[test]
fn status_and_sigterm_stay_prompt_under_a_disk_storm() {
    if !kvm_available("status_and_sigterm_stay_prompt_under_a_disk_storm") {
        return;
    }
    let dir = TempDir::new("storm");
    let (kernel, disk) = guest::storm_files(dir.path());
    let (serial, sock) = (dir.join("serial.out"), dir.join("ctl.sock"));
    let serial_arg = format!("file:{}", serial.display());
    let mut molt = Molt::spawn(
        &dir,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            guest::STORM_MEM,
            "--serial",
            &serial_arg,
            "--control",
            sock.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
        ],
        Stdio::null(),
    );
    wait_for_control(&mut molt, &sock);
    // The storm is on once molt has read a full queue's worth.
    let full = u64::from(guest::STORM_QUEUED) * u64::from(guest::STORM_READ_BYTES);
    let storming = common::wait_until(TIMEOUT, || {
        molt.assert_running("while the guest starts its storm");
        (common::bytes_read(molt.pid()) > full).then_some(())
    });
    assert!(
        storming.is_some(),
        "the storm guest never got a queue of reads served; serial {:?}, stderr:\n{}",
        fs::read_to_string(&serial).unwrap_or_default(),
        molt.stderr()
    );

    let mut client = RawClient::connect(&sock);
    let before = common::bytes_read(molt.pid());
    let mut took: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            let reply = client.request(b"status\n").unwrap_or_else(|e| {
                panic!("status got no reply within {TIMEOUT:?} under the storm: {e}")
            });
            assert!(reply.starts_with("ok state=running"), "status {reply:?}");
            t.elapsed()
        })
        .collect();
    let during = common::bytes_read(molt.pid()) - before;
    took.sort();
    let (median, worst) = (took[took.len() / 2], took[took.len() - 1]);
    eprintln!(
        "status under the storm: median {median:?}, worst {worst:?}; {} MiB read meanwhile",
        during >> 20
    );
    assert!(
        during >= 4 * u64::from(guest::STORM_READ_BYTES),
        "the storm was not going on while status was asked ({during} bytes read)"
    );
    assert!(
        median < Duration::from_millis(100),
        "status took {median:?} (median of 50) under the storm, {worst:?} at worst"
    );

    let t = Instant::now();
    // SAFETY: kill takes no pointers; the pid is our child's, reaped only by Molt.
    assert_eq!(unsafe { libc::kill(molt.pid() as i32, libc::SIGTERM) }, 0);
    let exited = molt.wait_exit(Duration::from_secs(5));
    let stop = t.elapsed();
    eprintln!("SIGTERM to exit under the storm: {stop:?}");
    assert!(
        exited.is_some() && stop < Duration::from_secs(1),
        "molt took {stop:?} to stop on SIGTERM under the storm (exited: {exited:?})"
    );
}

/// The suspend guest (`wake` says how it asks to be woken) under molt with a
/// control socket, suspended.
fn suspended(tag: &str, wake: Wake, extra: &[&str]) -> Counting {
    let mut c = Counting::start_image(tag, &suspend_guest(wake), true, extra);
    let serial = c.serial.clone();
    let status = wait_suspended(&mut c.molt, &c.sock, || Serial::read(&serial));
    let vcpus = extra
        .windows(2)
        .find(|w| w[0] == "--cpus")
        .map_or("1", |w| w[1]);
    assert_eq!(field(&status, "vcpus"), Some(vcpus), "{status}");
    c
}

#[test]
fn an_s3_guest_is_suspended_until_wakeup_enters_its_real_mode_vector() {
    if !kvm_available("an_s3_guest_is_suspended_until_wakeup_enters_its_real_mode_vector") {
        return;
    }
    // Two vCPUs: the second one must be INIT'd too, and stay waiting for SIPI.
    let mut c = suspended("s3-real", Wake::RealMode, &["--cpus", "2"]);
    // `resume` does not run a suspended guest; `pause` has nothing to stop.
    let reply = c.ctl(&["resume"]);
    assert!(
        reply.starts_with("error: ") && reply.contains("wakeup"),
        "resume of a suspended guest: {reply:?}"
    );
    assert_eq!(c.ctl(&["pause"]), "ok");
    let status = c.status();
    assert_eq!(field(&status, "state"), Some("suspended"), "{status}");
    let serial = c.serial.clone();
    wake_and_power_off(&mut c.molt, &c.sock, Wake::RealMode, || {
        Serial::read(&serial)
    });
    let log = c.molt.stderr();
    assert!(
        log.contains("guest suspended to RAM (ACPI S3)")
            && log.contains("guest woken from ACPI S3: real mode at 0800:0003 (0x8003)"),
        "molt's log:\n{log}"
    );
}

#[test]
fn wakeup_enters_32_bit_and_64_bit_vectors_in_their_modes() {
    if !kvm_available("wakeup_enters_32_bit_and_64_bit_vectors_in_their_modes") {
        return;
    }
    for wake in [Wake::Protected, Wake::Long] {
        let mut c = suspended("s3-x", wake, &[]);
        let serial = c.serial.clone();
        wake_and_power_off(&mut c.molt, &c.sock, wake, || Serial::read(&serial));
    }
}

#[test]
fn wakeup_refuses_vectors_it_cannot_enter_and_the_guest_stays_suspended() {
    if !kvm_available("wakeup_refuses_vectors_it_cannot_enter_and_the_guest_stays_suspended") {
        return;
    }
    for (wake, words) in [
        (Wake::Vector(0), "left no waking vector"),
        (Wake::Vector(0x10_0000), "not below 1 MiB"),
        (Wake::XVector(1 << 32), "not below 4 GiB"),
        // In the MMIO gap.
        (Wake::XVector(0xd000_0000), "outside guest RAM"),
        // Beyond the 64 MiB of RAM.
        (Wake::XVector(0x800_0000), "outside guest RAM"),
    ] {
        let mut c = suspended("s3-bad", wake, &[]);
        let reply = c.ctl(&["wakeup"]);
        assert!(
            reply.starts_with("error: wakeup: ")
                && reply.contains(words)
                && reply.ends_with("the guest stays suspended"),
            "{wake:?}: wakeup replied {reply:?}"
        );
        let status = c.status();
        assert_eq!(
            field(&status, "state"),
            Some("suspended"),
            "{wake:?}: {status}"
        );
        c.molt.assert_running("after a refused wakeup");
        assert_ok("quit", &c.ctl(&["quit"]));
        let exit = c.molt.wait_exit(TIMEOUT);
        assert!(
            exit.is_some_and(|s| s.success()),
            "{wake:?}: quit: {exit:?}"
        );
    }
    // A guest that is not suspended cannot be woken.
    let mut c = Counting::start("s3-awake", true, &[]);
    c.wait_counts(2);
    assert_eq!(
        c.ctl(&["wakeup"]),
        "error: the guest is not suspended (state=running)"
    );
    assert_ok("pause", &c.ctl(&["pause"]));
    assert_eq!(
        c.ctl(&["wakeup"]),
        "error: the guest is not suspended (state=paused)"
    );
    assert_ok("resume", &c.ctl(&["resume"]));
    let counted = Serial::read(&c.serial).counts().len();
    c.wait_counts(counted + 2);
}

// ---------------------------------------------------------------------------
// Events and wait

#[test]
fn a_watcher_sees_pause_resume_and_the_end() {
    if !kvm_available("a_watcher_sees_pause_resume_and_the_end") {
        return;
    }
    let mut c = Counting::start("events", true, &[]);
    let mut w = Watcher::start(&c.sock);
    assert_eq!(field(&w.reply, "state"), Some("running"), "{}", w.reply);
    assert!(field(&w.reply, "version").is_some(), "{}", w.reply);
    assert_ok("pause", &c.ctl(&["pause"]));
    let paused = w.expect("paused");
    assert_eq!(field(&paused, "state"), Some("paused"), "{paused}");
    // A pause of a paused guest changes nothing: no event.
    assert_ok("pause", &c.ctl(&["pause"]));
    assert_ok("resume", &c.ctl(&["resume"]));
    let resumed = w.expect("resumed");
    assert_eq!(field(&resumed, "state"), Some("running"), "{resumed}");
    let t = |line: &str| field(line, "t_ms").unwrap().parse::<u64>().unwrap();
    assert!(t(&paused) <= t(&resumed), "{paused} / {resumed}");
    // A resume of a running guest: no event either; the next is the end.
    assert_ok("resume", &c.ctl(&["resume"]));
    assert_ok("quit", &c.ctl(&["quit"]));
    let end = w.expect("quit");
    assert_eq!(field(&end, "state"), Some("off"), "{end}");
    match w.wait_end(TIMEOUT) {
        Some(s) => assert!(s.success(), "molt ctl events exited with {s}"),
        None => panic!("molt ctl events still runs after molt quit"),
    }
    assert!(c.molt.wait_exit(TIMEOUT).is_some());
}

#[test]
fn wait_returns_on_the_state_or_times_out_naming_it() {
    if !kvm_available("wait_returns_on_the_state_or_times_out_naming_it") {
        return;
    }
    let mut c = Counting::start("wait", true, &[]);
    let sock = c.sock.to_str().unwrap().to_string();
    let start = Instant::now();
    let out = molt(&["ctl", &sock, "wait", "running"]);
    assert!(out.status.success(), "wait running: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok state=running\n");
    assert!(start.elapsed() < Duration::from_secs(5), "not at once");

    // Waiting for `paused` returns once the guest is paused, not before.
    let mut waiting = std::process::Command::new(common::MOLT)
        .args(["ctl", &sock, "wait", "paused", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "wait paused returned while the guest runs"
    );
    assert_ok("pause", &c.ctl(&["pause"]));
    let done = common::wait_until(TIMEOUT, || waiting.try_wait().unwrap());
    let _ = waiting.kill();
    let out = waiting.wait_with_output().unwrap();
    assert!(done.is_some_and(|s| s.success()), "wait paused: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok state=paused\n");

    // A state that does not come: exit 1 after the timeout, naming both states.
    let start = Instant::now();
    let out = molt(&["ctl", &sock, "wait", "running", "--timeout", "0.5"]);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("timed out") && err.contains("state=running") && err.contains("state=paused"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "{took:?}"
    );

    // An unknown state is a usage error naming the known ones.
    let out = molt(&["ctl", &sock, "wait", "frozen"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    for s in ["'frozen'", "running", "paused", "suspended", "off"] {
        assert!(err.contains(s), "{err} should name {s}");
    }
    c.molt.assert_running("after the waits");
}

#[test]
fn a_watcher_that_never_reads_is_dropped_and_status_answers() {
    if !kvm_available("a_watcher_that_never_reads_is_dropped_and_status_answers") {
        return;
    }
    let mut c = Counting::start("deaf-watcher", true, &[]);
    let mut deaf = UnixStream::connect(&c.sock).unwrap();
    deaf.write_all(b"events\n").unwrap();
    // Its reply, byte by byte so that nothing after it is read: from here on
    // it is a watcher, and it reads nothing more.
    deaf.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reply = Vec::new();
    while !reply.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        deaf.read_exact(&mut byte).unwrap();
        reply.push(byte[0]);
    }
    assert!(reply.starts_with(b"ok events state=running"), "{reply:?}");
    // One client pauses and resumes the guest 2000 times, reading its replies:
    // 4000 event lines, far more than the deaf watcher's socket and backlog hold.
    const PAIRS: usize = 2000;
    let driver = UnixStream::connect(&c.sock).unwrap();
    let mut writer = driver.try_clone().unwrap();
    let feeder = thread::spawn(move || writer.write_all(&b"pause\nresume\n".repeat(PAIRS)));
    driver.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut replies = BufReader::new(driver);
    for i in 0..2 * PAIRS {
        let mut line = String::new();
        replies.read_line(&mut line).unwrap();
        assert_eq!(line, "ok\n", "reply {i}");
        if i == PAIRS {
            // Halfway: status still answers at once.
            let start = Instant::now();
            c.status();
            assert!(start.elapsed() < Duration::from_secs(5));
        }
    }
    feeder.join().unwrap().unwrap();
    c.status();
    // The deaf watcher was closed: what it was sent ends, well short of all.
    deaf.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut got = Vec::new();
    deaf.read_to_end(&mut got)
        .expect("the watcher's connection should end, not time out");
    let lines = got.split(|&b| b == b'\n').count();
    assert!(lines < 2 * PAIRS, "{lines} lines reached the watcher");
    assert!(
        got.starts_with(b"event t_ms="),
        "{:?}",
        &got[..got.len().min(80)]
    );
    let log = c.molt.stderr();
    assert!(log.contains("bytes behind; closing it"), "{log}");
    c.molt.assert_running("after dropping the watcher");
}

#[test]
fn a_watcher_sees_suspend_wake_and_power_off() {
    if !kvm_available("a_watcher_sees_suspend_wake_and_power_off") {
        return;
    }
    let mut c = Counting::start_image("s3-events", &suspend_guest(Wake::Long), true, &[]);
    let mut early = Watcher::start(&c.sock);
    let sock = c.sock.to_str().unwrap().to_string();
    let out = molt(&["ctl", &sock, "wait", "suspended", "--timeout", "20"]);
    assert!(out.status.success(), "wait suspended: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok state=suspended\n");
    if field(&early.reply, "state") == Some("running") {
        let line = early.expect("suspended");
        assert_eq!(field(&line, "state"), Some("suspended"), "{line}");
    }
    let mut w = Watcher::start(&c.sock);
    assert_eq!(field(&w.reply, "state"), Some("suspended"), "{}", w.reply);
    let serial = c.serial.clone();
    wake_and_power_off(&mut c.molt, &c.sock, Wake::Long, || Serial::read(&serial));
    for w in [&mut early, &mut w] {
        let woke = w.expect("woke");
        assert_eq!(field(&woke, "state"), Some("running"), "{woke}");
        let off = w.expect("power-off");
        assert_eq!(field(&off, "state"), Some("off"), "{off}");
        assert!(w.wait_end(TIMEOUT).is_some_and(|s| s.success()));
    }
}
