//! The control pipe: a UNIX stream socket speaking lines of UTF-8. One command line
//! in, exactly one reply line out, `ok ...` or `error: <reason>` (SPEC.md).

use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest accepted command line, newline excluded.
pub const MAX_LINE: usize = 4096;
/// Most clients served at once; more are turned away with an error line.
pub const MAX_CLIENTS: usize = 16;

/// A parsed control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    Pause,
    Resume,
    Quit,
    /// Reboot mode: save to this path and exit.
    CprSave(PathBuf),
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

const COMMANDS: &str = "status, pause, resume, quit, cpr-save, cpr-exec, cpr-transfer";

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
        if name == "cpr-transfer" {
            if let Some(opt) = rest.strip_prefix("--max-pause-ms") {
                let opt = opt.trim_start();
                let (value, path) = opt.split_once(char::is_whitespace).unwrap_or((opt, ""));
                max_pause = Some(max_pause_ms(value)?);
                rest = path.trim();
            }
        }
        if rest.is_empty() {
            return Err(format!("{name} needs a PATH"));
        }
        let path = PathBuf::from(rest);
        return Ok(if name == "cpr-save" {
            Command::CprSave(path)
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
        "quit" => Command::Quit,
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

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[derive(Debug)]
pub enum Error {
    InUse(PathBuf),
    Bind(PathBuf, std::io::Error),
    Connect(PathBuf, std::io::Error),
    Io(PathBuf, std::io::Error),
    NoReply(PathBuf),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InUse(p) => write!(
                f,
                "control socket {} is in use by another process",
                p.display()
            ),
            Error::Bind(p, e) => write!(f, "cannot create control socket {}: {e}", p.display()),
            Error::Connect(p, e) => write!(f, "cannot connect to {}: {e}", p.display()),
            Error::Io(p, e) => write!(f, "control socket {}: {e}", p.display()),
            Error::NoReply(p) => write!(f, "{} closed the connection without a reply", p.display()),
        }
    }
}

/// Creates the listening socket, mode 0600. A stale socket file nobody listens on
/// is replaced; a live one is an error, so two VMMs never share a path.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::Bind(
                path.into(),
                std::io::Error::new(ErrorKind::AlreadyExists, "exists and is not a socket"),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::InUse(path.into()));
        }
        std::fs::remove_file(path).map_err(|e| Error::Bind(path.into(), e))?;
    }
    // The umask makes the socket 0600 from birth: a chmod after bind leaves a window.
    // SAFETY: umask has no preconditions; molt is single-threaded at this point.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| Error::Bind(path.into(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Bind(path.into(), e))?;
    Ok(listener)
}

/// One client connection and its partial input line.
pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
    /// Set after an overlong line was answered: drop bytes until its newline.
    discarding: bool,
}

/// One complete input line, or the fact that it was too long.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Text(String),
    TooLong,
}

impl Client {
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Client {
            stream,
            buf: Vec::new(),
            discarding: false,
        })
    }

    /// Reads what is available; returns the complete lines and whether the peer closed.
    pub fn read_lines(&mut self) -> (Vec<Line>, bool) {
        let mut lines = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return (lines, true),
                Ok(n) => self.take(&chunk[..n], &mut lines),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return (lines, false),
                Err(_) => return (lines, true),
            }
        }
    }

    fn take(&mut self, mut data: &[u8], lines: &mut Vec<Line>) {
        while !data.is_empty() {
            let newline = data.iter().position(|&b| b == b'\n');
            let (part, rest) = match newline {
                Some(i) => (&data[..i], &data[i + 1..]),
                None => (data, &[][..]),
            };
            if !self.discarding {
                self.buf.extend_from_slice(part);
                if self.buf.len() > MAX_LINE {
                    self.buf.clear();
                    self.discarding = true;
                    lines.push(Line::TooLong);
                }
            }
            if newline.is_some() {
                if !self.discarding {
                    let raw = std::mem::take(&mut self.buf);
                    let text = String::from_utf8_lossy(&raw);
                    lines.push(Line::Text(text.trim_end_matches('\r').to_string()));
                }
                self.discarding = false;
            }
            data = rest;
        }
    }

    /// Writes one reply line. A client that does not read its replies is dropped.
    /// An empty text sends nothing: another process will answer (a transfer).
    pub fn reply(&mut self, text: &str) -> std::io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let mut line = String::with_capacity(text.len() + 1);
        line.push_str(text);
        line.push('\n');
        self.stream.write_all(line.as_bytes())
    }
}

/// `molt ctl`: sends `line` and returns the reply line without its newline.
pub fn request(path: &Path, line: &str) -> Result<String, Error> {
    let mut stream = UnixStream::connect(path).map_err(|e| Error::Connect(path.into(), e))?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| Error::Io(path.into(), e))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| Error::Io(path.into(), e))?;
    if !reply.ends_with('\n') {
        return Err(Error::NoReply(path.into()));
    }
    reply.pop();
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse("status"), Ok(Command::Status));
        assert_eq!(parse("  pause "), Ok(Command::Pause));
        assert_eq!(parse("resume"), Ok(Command::Resume));
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert_eq!(
            parse("cpr-save /run/my state"),
            Ok(Command::CprSave("/run/my state".into()))
        );
        assert!(parse("cpr-save").unwrap_err().contains("PATH"));
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

    #[test]
    fn lines_split_across_reads() {
        let (mut c, mut peer) = client();
        peer.write_all(b"sta").unwrap();
        assert_eq!(c.read_lines(), (vec![], false));
        peer.write_all(b"tus\r\npause\n").unwrap();
        let (lines, closed) = c.read_lines();
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
            lines.extend(c.read_lines().0);
        }
        peer.write_all(b"\nstatus\n").unwrap();
        lines.extend(c.read_lines().0);
        assert_eq!(lines, vec![Line::TooLong, Line::Text("status".into())]);
    }

    #[test]
    fn closing_is_seen() {
        let (mut c, peer) = client();
        drop(peer);
        assert!(c.read_lines().1);
    }
}
