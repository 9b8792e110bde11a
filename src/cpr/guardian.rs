//! Exec mode's guardian: a small process that keeps the guest alive when the
//! new image dies after `execve` but before it runs the guest. Once execve has
//! succeeded nothing of the old image is left to resume; the guardian is.
//!
//! 1. Before the pause (on the update's worker) molt starts `/proc/self/exe
//!    __guardian FD BINARY` with one end of a SOCK_SEQPACKET pair as FD. That
//!    process opens a pidfd of molt (its parent) and its own image (molt's
//!    image: `/proc/self/exe` at spawn), forks and exits: the guardian proper is
//!    no child of molt, so no image has to reap it. molt then sends it duplicates
//!    of every descriptor an exec hands over (message `F`).
//! 2. In the pause, once the state memfd exists, molt sends it too (`S`); the
//!    line itself crosses the exec (`FdKind::Guardian`). The guardian sleeps
//!    until the line closes or the process ends (the memfd stays queued), so
//!    nothing of it runs inside the pause.
//! 3. Whichever image is about to run the guest - the new one after its
//!    restore, the old one when execve failed, the previous one after a
//!    rollback - sends `R` and closes the line just before its vCPUs start:
//!    the guardian reads `R` and exits.
//! 4. If molt's process (the same PID before and after execve) ends with the
//!    memfd sent and no `R`, no image runs the guest: the guardian execs the
//!    previous image by descriptor with that state and its duplicates, exactly
//!    as a rollback does, telling it how the new image died. The guest then
//!    runs in the guardian's process: a new PID, in this case only.
//!
//! Without the memfd (the pause failed, the update was abandoned) a closed line
//! or molt's death ends the guardian without acting. It acts only once the
//! process is gone, so never while an image runs the guest; an `R` sent just
//! before a death is read first. A death after `R` loses the guest like any
//! crash: rolling back then would resume a copy older than what the guest wrote.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::arrive::{rollback, ExecIncoming};
use super::exec;
use super::fds::{self, set_cloexec, FdKind, MAX_FDS};
use crate::phases::Phases;

/// argv[1] of the guardian (not a user command).
pub const ARG: &str = "__guardian";

const MSG_FDS: u8 = b'F';
const MSG_STATE: u8 = b'S';
const MSG_RESUMED: u8 = b'R';
/// Room for the largest message: a tag and the postcard-encoded kinds (two
/// bytes each, but a VFIO group's number takes up to six).
const MAX_MESSAGE: usize = 1 + 2 * MAX_FDS + 4 * crate::layout::MAX_VFIO_DEVICES + 8;

#[derive(Debug)]
pub enum Error {
    Socket(io::Error),
    Spawn(io::Error),
    Exited(std::process::ExitStatus),
    Send(&'static str, io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Socket(e) => write!(f, "cannot make the guardian's socket pair: {e}"),
            Error::Spawn(e) => write!(f, "cannot start the guardian: {e}"),
            Error::Exited(s) => write!(f, "the guardian did not start ({s})"),
            Error::Send(what, e) => write!(f, "cannot send the guardian {what}: {e}"),
        }
    }
}

/// One end of the guardian's SOCK_SEQPACKET pair.
struct Line(OwnedFd);

impl ScmSocket for Line {
    fn socket_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Line {
    fn send(&self, what: &'static str, msg: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        self.send_with_fds(&[msg], fds)
            .map(drop)
            .map_err(|e| Error::Send(what, io::Error::from_raw_os_error(e.errno())))
    }
}

/// molt's side, from the worker to the pause.
pub struct Guardian {
    line: Line,
}

impl Guardian {
    /// Starts a guardian for an exec into `binary` that hands over `fds`.
    pub fn start(binary: &Path, fds: &[(FdKind, RawFd)]) -> Result<Self, Error> {
        let mut ends = [-1; 2];
        // SAFETY: `ends` has room for the two descriptors; the result is checked.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                ends.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(Error::Socket(io::Error::last_os_error()));
        }
        // SAFETY: two fresh descriptors, each owned here only.
        let (mine, theirs) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        let fd = theirs.as_raw_fd();
        // Only this end may reach the guardian. No other thread of molt starts
        // processes (an update's worker is the only one, one at a time), so
        // clearing CLOEXEC here leaks it nowhere, and lets `Command` use
        // posix_spawn rather than fork this large process.
        set_cloexec(fd, false).map_err(Error::Socket)?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("molt-guardian")
            .arg(ARG)
            .arg(fd.to_string())
            .arg(binary);
        let status = cmd.status().map_err(Error::Spawn)?;
        drop(theirs);
        if !status.success() {
            return Err(Error::Exited(status));
        }
        let line = Line(mine);
        let kinds: Vec<FdKind> = fds.iter().map(|f| f.0).collect();
        let mut msg = vec![MSG_FDS];
        msg.extend(postcard::to_allocvec(&kinds).unwrap_or_default());
        let raw: Vec<RawFd> = fds.iter().map(|f| f.1).collect();
        line.send("the descriptors", &msg, &raw)?;
        Ok(Guardian { line })
    }

    /// The line, to hand over across the exec.
    pub fn fd(&self) -> RawFd {
        self.line.0.as_raw_fd()
    }

    /// In the pause: the state memfd, which the guardian needs to act.
    pub fn send_state(&self, memfd: RawFd) -> Result<(), Error> {
        self.line.send("the state", &[MSG_STATE], &[memfd])
    }

    /// The guest runs here again (execve failed): the guardian leaves.
    pub fn release(self) {
        release(self.line.0);
    }
}

/// The image holding `line` is about to run the guest: the guardian leaves.
/// A guardian already gone changes nothing.
pub fn release(line: OwnedFd) {
    // SAFETY: sends one byte from a valid buffer on an open socket.
    unsafe {
        libc::send(
            line.as_raw_fd(),
            [MSG_RESUMED].as_ptr().cast(),
            1,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
}

/// `molt __guardian FD BINARY`: the guardian's process. Returns only when it
/// has nothing left to do, or when it could not resume the guest.
pub fn main(args: &[String]) -> ExitCode {
    let (Some(fd), Some(binary)) = (
        args.first().and_then(|a| a.parse::<RawFd>().ok()),
        args.get(1),
    ) else {
        log::error!("guardian: usage: molt {ARG} FD BINARY");
        return ExitCode::from(2);
    };
    if set_cloexec(fd, true).is_err() {
        log::error!("guardian: descriptor {fd} is not open");
        return ExitCode::FAILURE;
    }
    // SAFETY: `fd` was handed to this process for this (checked open above).
    let line = Line(unsafe { OwnedFd::from_raw_fd(fd) });
    // This process was started from molt's image: the one to go back to.
    let image = match File::open("/proc/self/exe") {
        Ok(f) => OwnedFd::from(f),
        Err(e) => {
            log::error!("guardian: cannot open /proc/self/exe: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    // SAFETY: pidfd_open on a process id; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, parent, 0) } as RawFd;
    // SAFETY: as above; a parent that died before pidfd_open shows as a new one.
    if pidfd < 0 || unsafe { libc::getppid() } != parent {
        log::error!("guardian: molt (pid {parent}) is gone");
        return ExitCode::FAILURE;
    }
    // SAFETY: a fresh descriptor (CLOEXEC) owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: this process is single-threaded (nothing started a thread yet).
    match unsafe { libc::fork() } {
        0 => {}
        // SAFETY: the intermediate leaves at once, running no exit handlers.
        pid if pid > 0 => unsafe { libc::_exit(0) },
        _ => {
            log::error!("guardian: fork: {}", io::Error::last_os_error());
            return ExitCode::FAILURE;
        }
    }
    let held = match watch(&line, &pidfd, image) {
        Ok(Some(held)) => held,
        Ok(None) => return ExitCode::SUCCESS,
        Err(why) => {
            log::error!("guardian: {why}; leaving");
            return ExitCode::FAILURE;
        }
    };
    let why = format!("{binary} died: {}", exit_of(&pidfd, parent));
    log::error!("guardian: {why}; resuming the guest on the previous image");
    let resumed = exec::receive(held.state.into_raw_fd())
        .map_err(super::Error::Exec)
        .map(|(header, state, format)| {
            let inc = ExecIncoming {
                header,
                state: Box::new(state),
                format,
                adopted: held.adopted,
                phases: Phases::begin(),
                supported: None,
            };
            rollback(&inc, &why)
        });
    match resumed {
        Ok(e) | Err(e) => log::error!("guardian: the guest is lost: {e}"),
    }
    ExitCode::FAILURE
}

/// What the guardian holds once molt is in the pause.
struct Held {
    adopted: fds::Adopted,
    state: OwnedFd,
}

/// Waits until an image resumes the guest (None) or molt's process ends
/// without one having done so (what to resume it with).
fn watch(line: &Line, pidfd: &OwnedFd, image: OwnedFd) -> Result<Option<Held>, String> {
    let Some(Message {
        tag: MSG_FDS,
        body,
        fds: got,
    }) = receive(line)?
    else {
        return Ok(None);
    };
    let kinds: Vec<FdKind> =
        postcard::from_bytes(&body).map_err(|e| format!("bad descriptor table: {e}"))?;
    let count = |f: fn(&FdKind) -> bool| kinds.iter().filter(|k| f(k)).count();
    let disks = count(|k| matches!(k, FdKind::Disk(_)));
    let taps = count(|k| matches!(k, FdKind::Tap(_)));
    let vfio = count(|k| matches!(k, FdKind::VfioDevice(_)));
    let raw: Vec<RawFd> = got.into_iter().map(IntoRawFd::into_raw_fd).collect();
    let want = fds::Counts {
        disks,
        nets: taps,
        vfio,
    };
    let mut adopted = fds::adopt(&kinds, &raw, want).map_err(|e| e.to_string())?;
    adopted.previous_exe = Some(image);
    // Sleep until the line closes (the image that runs the guest sends `R`
    // and closes it; a death closes it too) or the process ends. The state
    // memfd stays queued meanwhile: polling for POLLIN would wake this
    // process inside the pause, on a host that may have a single free CPU.
    wait(&[(line.socket_fd(), 0), (pidfd.as_raw_fd(), libc::POLLIN)])?;
    set_nonblocking(line)?;
    let mut state = None;
    while let Some(Message { tag, mut fds, .. }) = receive(line)? {
        match (tag, fds.pop()) {
            (MSG_RESUMED, _) => return Ok(None),
            (MSG_STATE, Some(fd)) if fds.is_empty() => state = Some(fd),
            (tag, _) => return Err(format!("unexpected message {tag:#04x}")),
        }
    }
    let Some(state) = state else {
        return Ok(None);
    };
    // Closing comes before the end of an exit: act once the process is gone.
    wait(&[(pidfd.as_raw_fd(), libc::POLLIN)])?;
    Ok(Some(Held { adopted, state }))
}

/// One message on the line.
struct Message {
    tag: u8,
    body: Vec<u8>,
    /// Received with it, CLOEXEC.
    fds: Vec<OwnedFd>,
}

/// The line's next message; None at the end (or, non-blocking, when nothing
/// is queued).
fn receive(line: &Line) -> Result<Option<Message>, String> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut raw = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: iov points at `buf`, which outlives the call and may hold any bytes.
    let (n, nfds) = match unsafe { line.recv_with_fds(&mut iov, &mut raw) } {
        Ok(got) => got,
        Err(e) if e.errno() == libc::EAGAIN => return Ok(None),
        Err(e) => return Err(format!("receiving: {e}")),
    };
    let got: Vec<OwnedFd> = raw[..nfds]
        .iter()
        // SAFETY: descriptors just received, owned by nothing else.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    for fd in &got {
        set_cloexec(fd.as_raw_fd(), true).map_err(|e| format!("received descriptor: {e}"))?;
    }
    Ok((n > 0).then(|| Message {
        tag: buf[0],
        body: buf[1..n].to_vec(),
        fds: got,
    }))
}

/// Makes the line non-blocking, to read what is queued and no more.
fn set_nonblocking(line: &Line) -> Result<(), String> {
    // SAFETY: F_SETFL on our own open socket.
    match unsafe { libc::fcntl(line.socket_fd(), libc::F_SETFL, libc::O_NONBLOCK) } {
        0 => Ok(()),
        _ => Err(format!("fcntl: {}", io::Error::last_os_error())),
    }
}

/// Blocks until one of `fds` reports one of its events (or POLLHUP/POLLERR).
fn wait(fds: &[(RawFd, i16)]) -> Result<(), String> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: a valid array of initialised pollfd structs of that length.
        if unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) } >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("poll: {e}"));
        }
    }
}

/// `struct pidfd_info` as `PIDFD_GET_INFO` (Linux 6.15) fills it: its first
/// version, 64 bytes; the ioctl takes any version's size.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    ids: [u32; 11],
    exit_code: i32,
}

/// `_IOWR(PIDFS_IOCTL_MAGIC, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong =
    0xc000_ff0b | ((size_of::<PidfdInfo>() as libc::c_ulong) << 16);
/// In `PidfdInfo::mask`: ask for, and then holds, the exit status.
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// How the process of `pidfd` (number `pid`, dead) ended. Its pidfd keeps the
/// wait status after whoever waits for it has reaped it, where the kernel
/// offers `PIDFD_INFO_EXIT`; elsewhere `/proc/PID/stat` tells it only until
/// then, and the reaper usually wins.
fn exit_of(pidfd: &OwnedFd, pid: libc::pid_t) -> String {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: PIDFD_GET_INFO on our own pidfd, writing at most the size the
    // command encodes into `info`, which is that size.
    let asked = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO as _, &mut info) };
    let code = if asked == 0 && info.mask & PIDFD_INFO_EXIT != 0 {
        Some(info.exit_code)
    } else {
        exit_in_proc(pid)
    };
    match code {
        Some(c) if c & 0x7f != 0 => format!("killed by signal {}", c & 0x7f),
        Some(c) => format!("exit status {}", (c >> 8) & 0xff),
        None => "exit status unknown".into(),
    }
}

/// The wait status `/proc/PID/stat` shows for a dead, not yet reaped process.
fn exit_in_proc(pid: libc::pid_t) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state is field 3, exit_code field 52.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    match (fields.first(), fields.get(49)) {
        (Some(&("Z" | "X")), Some(code)) => code.parse::<i32>().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pidfd_of(pid: libc::pid_t) -> OwnedFd {
        // SAFETY: pidfd_open of our own child; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        assert!(fd >= 0, "pidfd_open: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Whether this kernel keeps a reaped process's status in its pidfd.
    fn kernel_keeps_exit_status() -> bool {
        // SAFETY: getpid has no preconditions.
        let me = pidfd_of(unsafe { libc::getpid() });
        let mut info = PidfdInfo::default();
        // SAFETY: as in exit_of.
        unsafe { libc::ioctl(me.as_raw_fd(), PIDFD_GET_INFO as _, &mut info) == 0 }
    }

    #[test]
    fn the_exit_of_a_dead_process_is_named() {
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        assert_eq!(exit_of(&pidfd_of(me), me), "exit status unknown");
        for (script, want) in [
            ("kill -SEGV $$", "killed by signal 11"),
            ("exit 3", "exit status 3"),
        ] {
            let mut child = Command::new("/bin/sh")
                .args(["-c", script])
                .spawn()
                .unwrap();
            let pid = child.id() as libc::pid_t;
            let pidfd = pidfd_of(pid);
            // SAFETY: siginfo_t is plain data, filled in by waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waits for our own child without reaping it (WNOWAIT).
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            assert_eq!(r, 0);
            assert_eq!(exit_of(&pidfd, pid), want, "{script}, not reaped");
            assert!(exit_in_proc(pid).is_some(), "{script}: /proc shows it");
            child.wait().unwrap();
            // Reaped, as molt's parent reaps it before the guardian asks.
            let after = if kernel_keeps_exit_status() {
                want
            } else {
                "exit status unknown"
            };
            assert_eq!(exit_of(&pidfd, pid), after, "{script}, reaped");
        }
    }
}
