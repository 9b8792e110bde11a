//! The control pipe: a UNIX stream socket speaking lines of UTF-8. One command line
//! in, exactly one reply line out, `ok ...` or `error: <reason>` (SPEC.md); after
//! `events`, one line per event until the connection ends.

use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest accepted command line, newline excluded.
pub const MAX_LINE: usize = 4096;
/// Most clients served at once; further connections wait in the listen backlog
/// (`molt ctl` blocks in `connect`) until one of these closes.
pub const MAX_CLIENTS: usize = 64;
/// A client that sends nothing (not even part of a line) and reads no reply for
/// this long is closed, so idle connections cannot keep the slots taken.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes read from one client at a time.
const READ_CHUNK: usize = 4096;
/// Most `events` watchers at once (they count among `MAX_CLIENTS`); an exec or
/// a transfer hands every one of them over.
pub const MAX_WATCHERS: usize = 16;
/// Most event bytes queued in molt for one watcher beyond what its socket
/// holds: a watcher that falls further behind is closed.
pub const MAX_WATCHER_BACKLOG: usize = 64 * 1024;
/// The states `molt ctl PATH wait` knows: the guest's run states, and `off`
/// (the guest stopped and molt with it: power-off, reset, `quit`, a signal).
pub const WAIT_STATES: [&str; 4] = ["running", "paused", "suspended", "off"];

/// A parsed control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    Pause,
    Resume,
    /// Wake a guest suspended to RAM (ACPI S3).
    Wakeup,
    Quit,
    /// Turn this connection into a watcher: one line per event from now on.
    Events,
    /// Reboot mode: save to `path` and exit, in the newest state format
    /// `restorer` (default: any molt of this release) reads.
    CprSave {
        path: PathBuf,
        restorer: Option<PathBuf>,
    },
    /// Exec mode: exec this binary (default: molt's own) with these arguments
    /// (default: the original ones).
    CprExec {
        binary: Option<PathBuf>,
        args: Vec<String>,
    },
    /// Transfer mode: hand the guest to the molt listening at this path,
    /// keeping it paused no longer than `max_pause` (default if None).
    CprTransfer {
        path: PathBuf,
        max_pause: Option<Duration>,
    },
}

const COMMANDS: &str =
    "status, pause, resume, wakeup, quit, events, cpr-save, cpr-exec, cpr-transfer";

/// Parses one line (without its newline) into a command, or the error reply text.
pub fn parse(line: &str) -> Result<Command, String> {
    let mut words = line.split_ascii_whitespace();
    let Some(name) = words.next() else {
        return Err("empty command line".into());
    };
    if name == "cpr-save" || name == "cpr-transfer" {
        // The path is the rest of the line, so it may contain spaces.
        let mut rest = line.trim()[name.len()..].trim();
        let mut max_pause = None;
        let mut restorer = None;
        let option = if name == "cpr-transfer" {
            "--max-pause-ms"
        } else {
            "--for"
        };
        if let Some(opt) = rest.strip_prefix(option) {
            let opt = opt.trim_start();
            let (value, path) = opt.split_once(char::is_whitespace).unwrap_or((opt, ""));
            if name == "cpr-transfer" {
                max_pause = Some(max_pause_ms(value)?);
            } else if value.is_empty() {
                return Err("cpr-save --for needs a BINARY".into());
            } else {
                restorer = Some(PathBuf::from(value));
            }
            rest = path.trim();
        }
        if rest.is_empty() {
            return Err(format!("{name} needs a PATH"));
        }
        let path = PathBuf::from(rest);
        return Ok(if name == "cpr-save" {
            Command::CprSave { path, restorer }
        } else {
            Command::CprTransfer { path, max_pause }
        });
    }
    if name == "cpr-exec" {
        let binary = words.next().map(PathBuf::from);
        let args = words.map(String::from).collect();
        return Ok(Command::CprExec { binary, args });
    }
    let cmd = match name {
        "status" => Command::Status,
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "wakeup" => Command::Wakeup,
        "quit" => Command::Quit,
        "events" => Command::Events,
        _ => {
            return Err(format!(
                "unknown command '{}' (commands: {COMMANDS})",
                truncate(name, 64)
            ))
        }
    };
    if words.next().is_some() {
        return Err(format!("{name} takes no arguments"));
    }
    Ok(cmd)
}

/// `--max-pause-ms N`: whole milliseconds, 1 up to the protocol's limit.
fn max_pause_ms(value: &str) -> Result<Duration, String> {
    let limit = crate::cpr::transfer::MAX_MAX_PAUSE.as_millis() as u64;
    match value.parse::<u64>() {
        Ok(ms @ 1..) if ms <= limit => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "--max-pause-ms takes whole milliseconds from 1 to {limit}, not '{}'",
            truncate(value, 32)
        )),
    }
}

/// One event line (without its newline): `event t_ms=<unix ms> NAME state=STATE`
/// then `detail`, if any (`key=value` words; a `reason=` runs to the end).
pub fn event_line(name: &str, state: &str, detail: &str) -> String {
    let t_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut line = format!("event t_ms={t_ms} {name} state={state}");
    if !detail.is_empty() {
        line.push(' ');
        line.push_str(detail);
    }
    // One line, whatever a reason holds.
    line.replace('\n', " ")
}

/// The value of `key=` in a reply or event line (up to the next space).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[derive(Debug)]
pub enum Error {
    Connect(PathBuf, std::io::Error),
    Io(PathBuf, std::io::Error),
    NoReply(PathBuf),
    PeerCred(std::io::Error),
    Refused { uid: u32, pid: i32, euid: u32 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(p, e) => write!(f, "cannot connect to {}: {e}", p.display()),
            Error::Io(p, e) => write!(f, "control socket {}: {e}", p.display()),
            Error::NoReply(p) => write!(f, "{} closed the connection without a reply", p.display()),
            Error::PeerCred(e) => {
                write!(f, "cannot read the control peer's uid (SO_PEERCRED): {e}")
            }
            Error::Refused { uid, pid, euid } => write!(
                f,
                "control connection from uid {uid} (pid {pid}) refused: only uid {euid}, \
                 which molt runs as, may use it"
            ),
        }
    }
}

/// Creates the control socket, mode 0600. A stale socket file nobody listens
/// on is replaced; a live one is an error, so two VMMs never share a path.
pub fn bind(path: &Path) -> Result<UnixListener, crate::files::Error> {
    crate::files::bind_socket("control socket", path)
}

/// One client connection: the bytes it sent that were not taken as lines yet, and
/// the reply bytes its socket had no room for yet.
pub struct Client {
    pub stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Set after an overlong line was answered: drop bytes until its newline.
    discarding: bool,
}

/// One complete input line, or the fact that it was too long.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Text(String),
    TooLong,
}

/// What one read from a client brought.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Bytes,
    /// Nothing to read now.
    Nothing,
    /// The peer closed its side, or the connection broke.
    Closed,
}

impl Client {
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Client {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            discarding: false,
        })
    }

    /// Reads at most one chunk. Called only while `has_line` is false, so what a
    /// client has buffered here stays under `MAX_LINE + READ_CHUNK` bytes however
    /// much it sends: the rest waits in its socket.
    pub fn fill(&mut self) -> Input {
        let mut chunk = [0u8; READ_CHUNK];
        let n = loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Input::Closed,
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Input::Nothing,
                Err(_) => return Input::Closed,
            }
        };
        self.input.extend_from_slice(&chunk[..n]);
        if self.discarding {
            match self.input.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.input.drain(..=i);
                    self.discarding = false;
                }
                None => self.input.clear(),
            }
        }
        Input::Bytes
    }

    /// Whether `next_line` has something: a complete line, or a too-long one.
    pub fn has_line(&self) -> bool {
        self.input.len() > MAX_LINE || self.input.contains(&b'\n')
    }

    /// Takes the next complete line from what was read.
    pub fn next_line(&mut self) -> Option<Line> {
        match self.input.iter().position(|&b| b == b'\n') {
            Some(i) if i <= MAX_LINE => {
                let raw: Vec<u8> = self.input.drain(..=i).take(i).collect();
                let text = String::from_utf8_lossy(&raw);
                Some(Line::Text(text.trim_end_matches('\r').to_string()))
            }
            Some(i) => {
                self.input.drain(..=i);
                Some(Line::TooLong)
            }
            None if self.input.len() > MAX_LINE => {
                self.input.clear();
                self.discarding = true;
                Some(Line::TooLong)
            }
            None => None,
        }
    }

    /// Queues one reply line and writes what the socket takes; the rest goes out
    /// with `flush` once the client reads. An empty text sends nothing: another
    /// process will answer (a transfer). Never blocks.
    pub fn reply(&mut self, text: &str) -> std::io::Result<usize> {
        if text.is_empty() {
            return Ok(0);
        }
        self.output.extend_from_slice(text.as_bytes());
        self.output.push(b'\n');
        self.flush()
    }

    /// Writes queued reply bytes until done or the socket is full; returns how
    /// many went out. An error means the connection is broken.
    pub fn flush(&mut self) -> std::io::Result<usize> {
        let mut written = 0;
        while written < self.output.len() {
            match self.stream.write(&self.output[written..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        self.output.drain(..written);
        Ok(written)
    }

    /// Whether reply bytes wait for the client to read.
    pub fn output_pending(&self) -> bool {
        !self.output.is_empty()
    }

    /// How many reply bytes wait for the client to read.
    pub fn output_len(&self) -> usize {
        self.output.len()
    }

    /// Forgets what was read and not taken as lines (a watcher's input).
    pub fn clear_input(&mut self) {
        self.input.clear();
    }

    /// Forgets the reply bytes not sent yet (a watcher dropped).
    pub fn clear_output(&mut self) {
        self.output.clear();
    }
}

/// Admits a new connection only from molt's own effective uid (SO_PEERCRED): the
/// socket's 0600 mode is the first guard, this one holds even if the mode or the
/// directory was loosened.
pub fn check_peer(stream: &UnixStream) -> Result<(), Error> {
    let cred = crate::creds::peer(stream).map_err(Error::PeerCred)?;
    let euid = crate::creds::euid();
    if cred.uid != euid {
        return Err(Error::Refused {
            uid: cred.uid,
            pid: cred.pid,
            euid,
        });
    }
    Ok(())
}

/// `molt ctl`: sends `line` and returns the reply line without its newline.
pub fn request(path: &Path, line: &str) -> Result<String, Error> {
    let mut stream = UnixStream::connect(path).map_err(|e| Error::Connect(path.into(), e))?;
    // A refused connection may be closed before the line is sent: its one reply
    // line, the reason, is still there to read.
    let sent = stream.write_all(format!("{line}\n").as_bytes());
    let mut reply = String::new();
    let read = BufReader::new(stream).read_line(&mut reply);
    if !reply.ends_with('\n') {
        return Err(match (sent, read) {
            (Err(e), _) | (_, Err(e)) => Error::Io(path.into(), e),
            _ => Error::NoReply(path.into()),
        });
    }
    reply.pop();
    Ok(reply)
}

/// Longest `wait --timeout`: a year.
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// `molt ctl PATH wait STATE [--timeout S]`: the words after `wait`, as the
/// state waited for and the timeout (None: for ever); or the usage error.
pub fn parse_wait(words: &[String]) -> Result<(&'static str, Option<Duration>), String> {
    let mut state = None;
    let mut timeout = None;
    let mut words = words.iter();
    while let Some(w) = words.next() {
        if w == "--timeout" {
            let s = words.next().ok_or("--timeout needs a number of seconds")?;
            let t = s
                .parse::<f64>()
                .ok()
                .filter(|t| *t > 0.0)
                .and_then(|t| Duration::try_from_secs_f64(t).ok())
                .filter(|t| *t <= MAX_WAIT)
                .ok_or_else(|| {
                    format!(
                        "--timeout takes seconds, more than 0 and at most {}, not '{}'",
                        MAX_WAIT.as_secs(),
                        truncate(s, 32)
                    )
                })?;
            timeout = Some(t);
        } else if state.is_none() {
            let known = WAIT_STATES.iter().find(|&&k| k == w).ok_or_else(|| {
                format!(
                    "wait: unknown state '{}' (states: {})",
                    truncate(w, 32),
                    WAIT_STATES.join(", ")
                )
            })?;
            state = Some(*known);
        } else {
            return Err(format!("wait: unexpected '{}'", truncate(w, 32)));
        }
    }
    let state = state.ok_or_else(|| {
        format!(
            "usage: molt ctl PATH wait STATE [--timeout S] (states: {})",
            WAIT_STATES.join(", ")
        )
    })?;
    Ok((state, timeout))
}

/// How `watch` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    /// The line handler asked to stop.
    Stopped,
    /// molt closed the connection.
    Closed,
    /// The deadline passed first.
    TimedOut,
}

/// `molt ctl PATH events` and `wait`: sends `events` and hands each line
/// received (the reply first, then the events) to `line`, without its newline,
/// until `line` returns false, the connection ends or `deadline` passes.
pub fn watch(
    path: &Path,
    deadline: Option<Instant>,
    mut line: impl FnMut(&str) -> bool,
) -> Result<Watched, Error> {
    let io = |e| Error::Io(path.into(), e);
    let mut stream = UnixStream::connect(path).map_err(|e| Error::Connect(path.into(), e))?;
    // As in `request`: a refused connection's reason is still there to read.
    let sent = stream.write_all(b"events\n");
    let mut reader = BufReader::new(stream);
    let mut text = String::new();
    let mut lines = 0;
    loop {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Watched::TimedOut);
            }
            reader.get_ref().set_read_timeout(Some(left)).map_err(io)?;
        }
        match reader.read_line(&mut text) {
            Ok(0) if lines == 0 => {
                return Err(match sent {
                    Err(e) => io(e),
                    Ok(()) => Error::NoReply(path.into()),
                })
            }
            Ok(0) => return Ok(Watched::Closed),
            Ok(_) if !text.ends_with('\n') => return Ok(Watched::Closed),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // Whatever part of a line came stays in `text` for the next read.
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        }
        lines += 1;
        text.pop();
        if !line(&text) {
            return Ok(Watched::Stopped);
        }
        text.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse("status"), Ok(Command::Status));
        assert_eq!(parse("  pause "), Ok(Command::Pause));
        assert_eq!(parse("resume"), Ok(Command::Resume));
        assert_eq!(parse("wakeup"), Ok(Command::Wakeup));
        assert_eq!(parse("wakeup now"), Err("wakeup takes no arguments".into()));
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert_eq!(
            parse("cpr-save /run/my state"),
            Ok(Command::CprSave {
                path: "/run/my state".into(),
                restorer: None
            })
        );
        assert_eq!(
            parse("cpr-save --for /opt/molt-0.1.0 /run/my state"),
            Ok(Command::CprSave {
                path: "/run/my state".into(),
                restorer: Some("/opt/molt-0.1.0".into())
            })
        );
        assert!(parse("cpr-save").unwrap_err().contains("PATH"));
        assert!(parse("cpr-save --for /opt/molt")
            .unwrap_err()
            .contains("PATH"));
        assert!(parse("cpr-save --for").unwrap_err().contains("BINARY"));
        assert_eq!(
            parse("cpr-transfer /run/new.sock"),
            Ok(Command::CprTransfer {
                path: "/run/new.sock".into(),
                max_pause: None
            })
        );
        assert_eq!(
            parse("cpr-transfer --max-pause-ms 250 /run/a b.sock"),
            Ok(Command::CprTransfer {
                path: "/run/a b.sock".into(),
                max_pause: Some(Duration::from_millis(250))
            })
        );
        assert!(parse("cpr-transfer  ").unwrap_err().contains("PATH"));
        assert!(parse("cpr-transfer --max-pause-ms 250")
            .unwrap_err()
            .contains("PATH"));
        for bad in ["0", "x", "60001", "-1"] {
            let e = parse(&format!("cpr-transfer --max-pause-ms {bad} /p")).unwrap_err();
            assert!(e.contains("--max-pause-ms takes whole milliseconds"), "{e}");
        }
        assert_eq!(
            parse("cpr-exec"),
            Ok(Command::CprExec {
                binary: None,
                args: vec![]
            })
        );
        assert_eq!(
            parse("cpr-exec /usr/bin/molt run --cpus 2"),
            Ok(Command::CprExec {
                binary: Some("/usr/bin/molt".into()),
                args: vec!["run".into(), "--cpus".into(), "2".into()]
            })
        );
    }

    #[test]
    fn events_parses_and_its_lines_have_a_fixed_shape() {
        assert_eq!(parse("events"), Ok(Command::Events));
        assert_eq!(parse("events x"), Err("events takes no arguments".into()));
        assert!(parse("frob").unwrap_err().contains("events"));
        let line = event_line("update-failed", "running", "mode=exec reason=a\nb c");
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[0], "event");
        let t: u128 = field(&line, "t_ms").unwrap().parse().unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(t <= now.as_millis() && t + 10_000 > now.as_millis());
        assert_eq!(
            &words[2..],
            [
                "update-failed",
                "state=running",
                "mode=exec",
                "reason=a",
                "b",
                "c"
            ]
        );
        assert!(!line.contains('\n'), "one line: {line:?}");
        assert!(event_line("paused", "paused", "").ends_with(" paused state=paused"));
        assert_eq!(field(&line, "mode"), Some("exec"));
        assert_eq!(field(&line, "pause_us"), None);
    }

    fn wait_words(line: &str) -> Result<(&'static str, Option<Duration>), String> {
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse_wait(&words)
    }

    #[test]
    fn wait_takes_a_known_state_and_a_timeout() {
        assert_eq!(wait_words("paused"), Ok(("paused", None)));
        assert_eq!(
            wait_words("running --timeout 2.5"),
            Ok(("running", Some(Duration::from_millis(2500))))
        );
        assert_eq!(
            wait_words("--timeout 1 off"),
            Ok(("off", Some(Duration::from_secs(1))))
        );
        let e = wait_words("frozen").unwrap_err();
        assert!(e.contains("unknown state 'frozen'"), "{e}");
        for s in WAIT_STATES {
            assert!(e.contains(s), "{e} should name {s}");
            assert!(wait_words(s).is_ok());
        }
        assert!(wait_words("").unwrap_err().contains("usage"));
        assert!(wait_words("paused --timeout")
            .unwrap_err()
            .contains("seconds"));
        for bad in ["0", "-1", "x", "inf", "NaN", "1e12"] {
            let e = wait_words(&format!("paused --timeout {bad}")).unwrap_err();
            assert!(e.contains("--timeout takes seconds"), "{bad}: {e}");
        }
        assert!(wait_words("paused running")
            .unwrap_err()
            .contains("unexpected"));
    }

    #[test]
    fn watch_hands_over_each_line_until_told_to_stop() {
        let dir = std::env::temp_dir().join(format!("molt-watch-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut asked = [0u8; 7];
            s.read_exact(&mut asked).unwrap();
            assert_eq!(&asked, b"events\n");
            s.write_all(b"ok events state=running\nevent t_ms=1 pa")
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            s.write_all(b"used state=paused\n").unwrap();
            // Then silence, with the connection open, until the client goes.
            let _ = s.read(&mut [0u8; 1]);
        });
        let mut seen = Vec::new();
        let end = watch(&path, None, |l| {
            seen.push(l.to_string());
            !l.contains("state=paused")
        });
        assert_eq!(end.unwrap(), Watched::Stopped);
        assert_eq!(seen[1], "event t_ms=1 paused state=paused");
        server.join().unwrap();

        let listener = {
            std::fs::remove_file(&path).unwrap();
            UnixListener::bind(&path).unwrap()
        };
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"ok events state=running\n").unwrap();
            let _ = s.read(&mut [0u8; 64]);
            let _ = s.read(&mut [0u8; 1]);
        });
        let start = Instant::now();
        let deadline = Some(start + Duration::from_millis(200));
        let end = watch(&path, deadline, |_| true).unwrap();
        assert_eq!(end, Watched::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(200));
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_commands_say_why() {
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("   ").unwrap_err().contains("empty"));
        assert!(parse("frob")
            .unwrap_err()
            .contains("unknown command 'frob'"));
        assert!(parse("status now").unwrap_err().contains("no arguments"));
        let long = "x".repeat(1000);
        assert!(parse(&long).unwrap_err().len() < 200);
    }

    fn client() -> (Client, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Client::new(a).unwrap(), b)
    }

    /// Reads until nothing is left, taking lines as they complete (as the event
    /// loop does); also returns whether the peer closed.
    fn drain(c: &mut Client) -> (Vec<Line>, bool) {
        let mut lines = Vec::new();
        loop {
            while let Some(line) = c.next_line() {
                lines.push(line);
            }
            match c.fill() {
                Input::Bytes => {}
                Input::Nothing => return (lines, false),
                Input::Closed => return (lines, true),
            }
        }
    }

    #[test]
    fn lines_split_across_reads() {
        let (mut c, mut peer) = client();
        peer.write_all(b"sta").unwrap();
        assert_eq!(drain(&mut c), (vec![], false));
        assert!(!c.has_line());
        peer.write_all(b"tus\r\npause\n").unwrap();
        let (lines, closed) = drain(&mut c);
        assert!(!closed);
        assert_eq!(
            lines,
            vec![Line::Text("status".into()), Line::Text("pause".into())]
        );
    }

    #[test]
    fn an_overlong_line_gets_one_error_and_the_next_line_works() {
        let (mut c, mut peer) = client();
        let mut lines = Vec::new();
        let big = vec![b'a'; MAX_LINE * 3];
        for chunk in big.chunks(1000) {
            peer.write_all(chunk).unwrap();
            lines.extend(drain(&mut c).0);
        }
        peer.write_all(b"\nstatus\n").unwrap();
        lines.extend(drain(&mut c).0);
        assert_eq!(lines, vec![Line::TooLong, Line::Text("status".into())]);
    }

    #[test]
    fn an_overlong_line_in_one_write_is_one_error() {
        let (mut c, mut peer) = client();
        let mut big = vec![b'a'; MAX_LINE + 1];
        big.extend_from_slice(b"\nstatus\n");
        peer.write_all(&big).unwrap();
        assert_eq!(
            drain(&mut c).0,
            vec![Line::TooLong, Line::Text("status".into())]
        );
        let exact = format!("{}\n", "b".repeat(MAX_LINE));
        peer.write_all(exact.as_bytes()).unwrap();
        assert_eq!(drain(&mut c).0, vec![Line::Text("b".repeat(MAX_LINE))]);
    }

    #[test]
    fn a_flood_is_read_one_chunk_at_a_time() {
        let (mut c, mut peer) = client();
        peer.write_all(&b"status\n".repeat(1000)).unwrap();
        assert_eq!(c.fill(), Input::Bytes);
        assert!(c.has_line());
        assert!(
            c.input.len() <= READ_CHUNK,
            "{} bytes buffered",
            c.input.len()
        );
    }

    #[test]
    fn closing_is_seen() {
        let (mut c, peer) = client();
        drop(peer);
        assert!(drain(&mut c).1);
    }

    #[test]
    fn replies_the_socket_cannot_take_wait_for_flush() {
        let (mut c, mut peer) = client();
        let text = "x".repeat(1000);
        let mut queued = 0;
        while !c.output_pending() {
            c.reply(&text).unwrap();
            queued += text.len() + 1;
        }
        peer.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while got.len() < queued {
            match peer.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.flush().unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(!c.output_pending());
        assert_eq!(got.len(), queued, "every reply byte arrives, once");
        assert!(got
            .split(|&b| b == b'\n')
            .take(queued / 1001)
            .all(|l| l == text.as_bytes()));
    }

    #[test]
    fn a_peer_of_our_own_uid_is_admitted() {
        let (a, _b) = UnixStream::pair().unwrap();
        check_peer(&a).unwrap();
    }
}
