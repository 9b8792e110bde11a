//! Exec mode: the state goes into a sealed memfd, the guest's descriptors lose
//! CLOEXEC, and molt execs the new binary with its original argv plus
//! `--incoming fd:N`. Same PID; KVM itself cannot cross exec (a VM belongs to the
//! mm that created it), so the new image builds a fresh VM and restores into it.
//!
//! Message in the memfd: `"MOLTEXEC"`, the header's length (u32 LE), the
//! header (postcard: the fd table and the rollback's target) followed, when the
//! console is on a terminal, by the user's terminal mode (postcard, a fixed
//! size), then the `CprState` with its own header and CRC. An image that
//! predates the terminal mode writes none; a rollback hands on what came.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fds::{set_cloexec, FdKind, FdTable};
use super::guardian::{self, Guardian};
use super::state::{self, CprState};
use crate::phases::{self, Phases};
use crate::terminal::Original;
use crate::vm::host_cpu::{Supported, SUPPORTED_ENV};

/// What travels with the state in the memfd.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecHeader {
    pub table: FdTable,
    /// The image to go back to if the new one cannot resume the guest.
    pub previous_exe: String,
    pub previous_argv: Vec<String>,
    /// Set when the new image gave up and execed back: why, for the reply.
    pub failure: Option<String>,
    /// The user's terminal mode, when the console is on a terminal molt made
    /// raw: the image that ends the guest restores it. Encoded after the rest.
    #[serde(skip)]
    pub terminal: Option<Original>,
}

const MAGIC: [u8; 8] = *b"MOLTEXEC";
/// An exec message is a few KiB per vCPU; anything near this is not one.
const MAX_MESSAGE: u64 = 64 << 20;

#[derive(Debug)]
pub enum Error {
    Memfd(std::io::Error),
    Cloexec(RawFd, std::io::Error),
    Encode(state::Error),
    Argv,
    Exec(String, std::io::Error),
    Read(RawFd, std::io::Error),
    /// The fd table would not encode.
    HeaderEncode(postcard::Error),
    /// `--incoming fd:N` names no sealed memfd.
    NotSealed(RawFd),
    /// The memfd is larger than any exec message (its length).
    TooLarge(u64),
    BadMagic,
    /// The fd table's length points past the end of the message.
    TablePastEnd,
    /// The fd table would not decode.
    HeaderDecode(postcard::Error),
    /// The fd table has bytes left over, or not one number per kind.
    InconsistentTable,
    State(state::Error),
    Guardian(guardian::Error),
}

/// How every refusal of the memfd's message begins.
const BAD: &str = "bad exec message";

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Memfd(e) => write!(f, "cannot write the state memfd: {e}"),
            Error::Cloexec(fd, e) => write!(f, "cannot pass descriptor {fd} on: {e}"),
            Error::Encode(e) => e.fmt(f),
            Error::Argv => write!(f, "an argument contains a NUL byte"),
            Error::Exec(bin, e) => write!(f, "exec {bin} failed: {e}"),
            Error::Read(fd, e) => write!(f, "cannot read the state from fd {fd}: {e}"),
            Error::HeaderEncode(e) => write!(f, "{BAD}: {e}"),
            Error::NotSealed(fd) => write!(f, "{BAD}: fd {fd} is not a sealed molt state memfd"),
            Error::TooLarge(len) => write!(f, "{BAD}: {len} bytes is too large"),
            Error::BadMagic => write!(f, "{BAD}: bad magic"),
            Error::TablePastEnd => write!(f, "{BAD}: fd table runs past the end"),
            Error::HeaderDecode(e) => write!(f, "{BAD}: header: {e}"),
            Error::InconsistentTable => write!(f, "{BAD}: inconsistent fd table"),
            Error::State(e) => write!(f, "exec state: {e}"),
            Error::Guardian(e) => e.fmt(f),
        }
    }
}

/// The first state format whose readers take the terminal mode after the
/// header (0.2.0): an image that reads only older formats would refuse the
/// message, so it gets none and leaves the terminal as it finds it.
const TERMINAL_SINCE: u32 = 5;

/// Room for the message's header (the descriptor table, the rollback's
/// argv, the terminal mode) in `Ready`'s memfd; a larger one grows it.
const HEADER_ROOM: usize = 16 << 10;

/// What an exec's message needs that does not depend on the paused guest,
/// made before the pause: the memfd with its pages allocated, the encoding's
/// buffer with its pages written, and this process's environment for the
/// next image. Writing the message into them inside the pause faults nothing in.
pub struct Ready {
    memfd: File,
    buffer: Vec<u8>,
    env: Vec<CString>,
}

impl Ready {
    /// For a machine of `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Result<Ready, Error> {
        let name = c"molt-cpr";
        // SAFETY: a valid NUL-terminated name and flags; the result is checked.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(Error::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is fresh and owned by nothing else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        let buffer = state::buffer(vcpus);
        let room = (HEADER_ROOM + buffer.capacity()) as libc::off_t;
        // Past its end, which stays at 0: writing the message moves it.
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: allocating the pages of our own memfd; the result is checked.
        if unsafe { libc::fallocate(memfd.as_raw_fd(), keep, 0, room) } < 0 {
            return Err(Error::Memfd(std::io::Error::last_os_error()));
        }
        let mut env = environment();
        env.extend(Supported::for_exec().and_then(|kv| CString::new(kv).ok()));
        Ok(Ready { memfd, buffer, env })
    }
}

/// Writes the message into `ready`'s memfd, cut to its length and sealed.
fn message_memfd(
    state: &CprState,
    format: u32,
    header: &ExecHeader,
    ready: Ready,
) -> Result<(File, Vec<CString>), Error> {
    let Ready { memfd, buffer, env } = ready;
    let state_bytes = state::encode_into(state, format, buffer).map_err(Error::Encode)?;
    let mut head = MAGIC.to_vec();
    head.extend([0; 4]);
    postcard::to_io(header, &mut head).map_err(Error::HeaderEncode)?;
    if let Some(t) = header
        .terminal
        .as_ref()
        .filter(|_| format >= TERMINAL_SINCE)
    {
        postcard::to_io(t, &mut head).map_err(Error::HeaderEncode)?;
    }
    let table_len = (head.len() - 12) as u32;
    head[8..12].copy_from_slice(&table_len.to_le_bytes());
    // Into the pages allocated before the pause: the memfd ends where the
    // message does.
    let f = memfd;
    f.write_all_at(&head, 0)
        .and_then(|()| f.write_all_at(&state_bytes, head.len() as u64))
        .map_err(Error::Memfd)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: adding seals to our own memfd.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    Ok((f, env))
}

/// What to exec: a path, or an open executable (execveat with AT_EMPTY_PATH).
pub enum Target<'a> {
    Path(&'a Path),
    Fd(RawFd),
}

/// Execs `binary` with `argv` (argv[0] first) plus `--incoming fd:N`, handing
/// over `state` in `format` (what the probe found `binary` reads) and `fds`,
/// written into `ready`; `guardian`, if any, gets the state memfd first. `phases`, if
/// any, are marked and go in the environment (`phases::ENV`). Returns only on
/// failure, with every descriptor's CLOEXEC restored: the caller then resumes
/// the guest as if nothing happened.
pub fn exec(
    binary: Target,
    argv: &[String],
    (state, format, ready): (&CprState, u32, Ready),
    fds: &[(FdKind, RawFd)],
    mut header: ExecHeader,
    guardian: Option<&Guardian>,
    phases: Option<&mut Phases>,
) -> Error {
    header.table = FdTable {
        kinds: fds.iter().map(|f| f.0).collect(),
        numbers: fds.iter().map(|f| f.1).collect(),
    };
    let (memfd, env) = match message_memfd(state, format, &header, ready) {
        Ok(m) => m,
        Err(e) => return e,
    };
    if let Some(Err(e)) = guardian.map(|g| g.send_state(memfd.as_raw_fd())) {
        return Error::Guardian(e);
    }
    let mut args: Vec<String> = argv.to_vec();
    // An earlier exec's --incoming must not reach the new image twice.
    strip_incoming(&mut args);
    args.push("--incoming".into());
    args.push(format!("fd:{}", memfd.as_raw_fd()));
    let Ok(cargs) = args
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return Error::Argv;
    };
    let (name, cbin) = match binary {
        Target::Path(p) => (p.display().to_string(), p.as_os_str().as_bytes().to_vec()),
        Target::Fd(fd) => (format!("the previous image (fd {fd})"), Vec::new()),
    };
    let Ok(cbin) = CString::new(cbin) else {
        return Error::Argv;
    };
    let passed: Vec<RawFd> = fds.iter().map(|f| f.1).chain([memfd.as_raw_fd()]).collect();
    for (i, &fd) in passed.iter().enumerate() {
        if let Err(e) = set_cloexec(fd, false) {
            for &undo in &passed[..i] {
                let _ = set_cloexec(undo, true);
            }
            return Error::Cloexec(fd, e);
        }
    }
    let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let env = with_phases(env, phases);
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: cbin, every argv and environment string are NUL-terminated and
    // outlive the call; ptrs and envp are NULL-terminated; with AT_EMPTY_PATH
    // an empty path names the descriptor itself.
    unsafe {
        match binary {
            Target::Path(_) => libc::execve(cbin.as_ptr(), ptrs.as_ptr(), envp.as_ptr()),
            Target::Fd(fd) => libc::syscall(
                libc::SYS_execveat,
                fd,
                cbin.as_ptr(),
                ptrs.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            ) as i32,
        }
    };
    let err = std::io::Error::last_os_error();
    for &fd in &passed {
        let _ = set_cloexec(fd, true);
    }
    Error::Exec(name, err)
}

/// This process's environment for the next image, without what an earlier
/// exec left in it (its marks, the CPUID it handed over).
fn environment() -> Vec<CString> {
    std::env::vars_os()
        .filter(|(k, _)| ![phases::ENV, SUPPORTED_ENV].contains(&k.to_str().unwrap_or_default()))
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect()
}

/// `env` with `phases` (marked as done now) if given.
fn with_phases(mut env: Vec<CString>, phases: Option<&mut Phases>) -> Vec<CString> {
    if let Some(p) = phases {
        p.mark("encode");
        env.extend(CString::new(format!("{}={}", phases::ENV, p.encode())));
    }
    env
}

/// Removes `--incoming X` / `--incoming=X` from an argv.
pub fn strip_incoming(args: &mut Vec<String>) {
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--incoming" {
            args.drain(i..(i + 2).min(args.len()));
        } else if args[i].starts_with("--incoming=") {
            args.remove(i);
        } else {
            i += 1;
        }
    }
}

/// The new image's side: reads and closes the message memfd `fd`. Returns
/// the header, the state and the format it came in.
pub fn receive(fd: RawFd) -> Result<(ExecHeader, CprState, u32), Error> {
    // SAFETY: `--incoming fd:N` hands this process fd N; it is checked to be an
    // open, sealed memfd before any other use, and owned (closed) here.
    let check = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if check < 0 || check & libc::F_SEAL_WRITE == 0 {
        return Err(Error::NotSealed(fd));
    }
    // SAFETY: as above; fd is open (F_GET_SEALS succeeded) and ours from here on.
    let f = unsafe { File::from_raw_fd(fd) };
    let len = f.metadata().map_err(|e| Error::Read(fd, e))?.len();
    if len > MAX_MESSAGE {
        return Err(Error::TooLarge(len));
    }
    // The old image wrote it through the same open file: its offset is at the end.
    let mut bytes = vec![0u8; len as usize];
    f.read_exact_at(&mut bytes, 0)
        .map_err(|e| Error::Read(fd, e))?;
    parse(&bytes)
}

/// The exec message's parts: magic, the header with the descriptor table, the
/// state (and its format).
pub fn parse(bytes: &[u8]) -> Result<(ExecHeader, CprState, u32), Error> {
    if bytes.len() < 12 || bytes[..8] != MAGIC {
        return Err(Error::BadMagic);
    }
    let tlen = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let table_end = 12usize
        .checked_add(tlen)
        .filter(|&e| e <= bytes.len())
        .ok_or(Error::TablePastEnd)?;
    let (mut header, rest): (ExecHeader, _) =
        postcard::take_from_bytes(&bytes[12..table_end]).map_err(Error::HeaderDecode)?;
    if !rest.is_empty() {
        let (terminal, rest) = postcard::take_from_bytes(rest).map_err(Error::HeaderDecode)?;
        if !rest.is_empty() {
            return Err(Error::InconsistentTable);
        }
        header.terminal = Some(terminal);
    }
    if header.table.kinds.len() != header.table.numbers.len() {
        return Err(Error::InconsistentTable);
    }
    let (state, format) = state::decode_format(&bytes[table_end..]).map_err(Error::State)?;
    Ok((header, state, format))
}

/// How long a new binary may take to answer `version`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a probe's output that is read.
const PROBE_OUTPUT: usize = 4096;

/// Runs `binary version`: it must be a molt that reads a state format this
/// one writes. Returns the newest such format, the one to write for it. A
/// missing file, a binary that fails, hangs or exits at once, or one that
/// reads none of those formats is refused here, while the guest is still
/// running. Runs on a worker
/// thread: `stop` (readable) abandons it. The probe runs in a process group of
/// its own, and nothing of that group outlives this call.
pub fn probe(binary: &Path, stop: RawFd) -> Result<u32, super::Error> {
    use std::os::unix::process::CommandExt;
    let err = |why: String| super::Error::Probe(binary.into(), why);
    let mut child = Command::new(binary)
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let pid = child.id() as libc::pid_t;
    // SAFETY: pidfd_open on our own child, which is not reaped yet; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    let waited = if pidfd < 0 {
        Err(super::wait::Stop::Io(std::io::Error::last_os_error()))
    } else {
        // SAFETY: a fresh descriptor owned by nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        super::wait::until(
            pidfd.as_raw_fd(),
            libc::POLLIN,
            Instant::now() + PROBE_TIMEOUT,
            &[stop],
        )
    };
    // The group id stays reserved until the child is reaped below, so this
    // reaches the probe and whatever it started, never an unrelated process.
    // SAFETY: killpg has no memory effects.
    unsafe { libc::killpg(pid, libc::SIGKILL) };
    let status = child.wait().map_err(|e| err(e.to_string()))?;
    match waited {
        Ok(()) => {}
        Err(super::wait::Stop::TimedOut) => {
            return Err(err(format!(
                "`version` did not answer within {}",
                super::wait::human(PROBE_TIMEOUT)
            )))
        }
        Err(super::wait::Stop::Interrupted) => {
            return Err(err("interrupted by a signal or quit".into()))
        }
        Err(super::wait::Stop::Io(e)) => return Err(err(format!("waiting for `version`: {e}"))),
    }
    if !status.success() {
        return Err(err(format!("`version` failed ({status})")));
    }
    let mut out = Vec::new();
    if let Some(o) = child.stdout.take() {
        use std::io::Read;
        // Every writer is gone (the group was killed): this ends.
        let _ = o.take(PROBE_OUTPUT as u64).read_to_end(&mut out);
    }
    let out = String::from_utf8_lossy(&out);
    let listed = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("state-formats="))
        .ok_or_else(|| err(format!("not a molt: `version` said {:?}", out.trim())))?;
    let formats = state::parse_list(listed)
        .ok_or_else(|| err(format!("`version` lists state formats {listed:?}")))?;
    state::newest_common(&formats).ok_or_else(|| {
        err(format!(
            "it reads state formats {}, this molt writes {}",
            state::list(&formats),
            state::list(&state::WRITES)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_is_stripped() {
        let mut a: Vec<String> = [
            "molt",
            "run",
            "--incoming",
            "fd:5",
            "--cpus",
            "2",
            "--incoming=fd:9",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        strip_incoming(&mut a);
        assert_eq!(a, ["molt", "run", "--cpus", "2"]);
    }

    /// The message's bytes, as `message_memfd` writes them for an image
    /// reading `format`.
    fn message_as(header: &ExecHeader, format: u32) -> Vec<u8> {
        let sample = state::tests::sample();
        let ready = Ready::new(sample.machine.vcpus.len()).unwrap();
        let (f, _) = message_memfd(&sample, format, header, ready).unwrap();
        std::fs::read(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap()
    }

    /// The message's bytes for an image of this release.
    fn message(header: &ExecHeader) -> Vec<u8> {
        message_as(header, state::VERSION)
    }

    #[test]
    fn the_terminal_mode_travels_after_the_header_when_there_is_one() {
        let plain = ExecHeader {
            previous_exe: "/bin/molt".into(),
            ..Default::default()
        };
        // SAFETY: termios is plain data; zero is a valid (if odd) mode.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_lflag = libc::ICANON | libc::ECHO;
        t.c_cc[libc::VINTR] = 3;
        let with = ExecHeader {
            terminal: Original::of(&t).into(),
            ..plain.clone()
        };
        let (h, _, _) = parse(&message(&plain)).unwrap();
        assert_eq!(
            h, plain,
            "a message without a terminal, as older molts write it"
        );
        let bytes = message(&with);
        let (h, _, _) = parse(&bytes).unwrap();
        assert_eq!(h.terminal, with.terminal);
        assert_eq!(h, with);
        // An image reading only formats before the mode's gets none: the
        // message is the one it would have got without a terminal.
        let old = TERMINAL_SINCE - 1;
        assert_eq!(message_as(&with, old), message_as(&plain, old));
        // One byte more after the mode, or the mode's last byte cut off: refused.
        let tlen = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let state = &bytes[12 + tlen..];
        let longer = [&bytes[12..12 + tlen], &[0]].concat();
        let shorter = bytes[12..12 + tlen - 1].to_vec();
        for header in [longer, shorter] {
            let mut bad = MAGIC.to_vec();
            bad.extend((header.len() as u32).to_le_bytes());
            bad.extend(header);
            bad.extend(state);
            let e = parse(&bad).unwrap_err().to_string();
            assert!(e.starts_with(BAD), "{e}");
        }
    }

    #[test]
    fn receive_refuses_what_is_not_a_sealed_message() {
        use std::os::fd::IntoRawFd;
        let f = File::open("/dev/null").unwrap().into_raw_fd();
        assert!(matches!(receive(f), Err(Error::NotSealed(n)) if n == f));
        // SAFETY: closing the descriptor opened above (receive did not take it).
        unsafe { libc::close(f) };
    }
}
