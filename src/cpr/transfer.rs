//! Transfer mode: a new molt, started first with `--incoming unix:PATH`, takes
//! the guest over from the running one. The protocol, as a state machine:
//!
//! ```text
//!   old (running the guest)               new (listening on PATH)
//!   connect, HELLO + descriptors  ---->   adopt them, map RAM, build VM,
//!                                         devices  (the guest still runs)
//!                                 <----   READY
//!   pause, save, STATE            ---->   decode, check, restore (not run)
//!                                 <----   RESTORED   (or FAIL: why)
//!   GO, exit 0                    ---->   run the vCPUs, reply to the client
//! ```
//!
//! Until the old side sends GO, it can and does resume the guest on any
//! failure: a refused state, a new process that dies (EOF), or silence past a
//! timeout; the new side never runs vCPUs without GO, so the guest never runs
//! twice. After GO the old side only exits.

use std::fmt;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::fds::{FdKind, MAX_FDS};

/// How long the old side waits for READY (the new side maps RAM and builds a VM).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old side waits for RESTORED while the guest is paused.
pub const RESTORED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new side waits for GO after RESTORED.
pub const GO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Hello {
        version: String,
        kinds: heapless::Vec<FdKind, MAX_FDS>,
    },
    Ready,
    State(Vec<u8>),
    Restored,
    Go,
    Fail(String),
}

#[derive(Debug)]
pub enum Error {
    Connect(PathBuf, std::io::Error),
    Listen(PathBuf, std::io::Error),
    Io(&'static str, std::io::Error),
    Protocol(String),
    /// The other side said why it gave up.
    Refused(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(p, e) => write!(f, "cannot connect to {}: {e}", p.display()),
            Error::Listen(p, e) => write!(f, "cannot listen on {}: {e}", p.display()),
            Error::Io(step, e) => write!(f, "{step}: {e}"),
            Error::Protocol(why) => write!(f, "protocol error: {why}"),
            Error::Refused(why) => write!(f, "the new process refused: {why}"),
        }
    }
}

fn send(s: &mut UnixStream, msg: &Msg, step: &'static str) -> Result<(), Error> {
    let body = postcard::to_allocvec(msg).map_err(|e| Error::Protocol(e.to_string()))?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    s.write_all(&frame).map_err(|e| Error::Io(step, e))
}

fn recv(s: &mut UnixStream, step: &'static str) -> Result<Msg, Error> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| Error::Io(step, e))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(Error::Protocol(format!("{len}-byte message")));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| Error::Io(step, e))?;
    match postcard::from_bytes(&body).map_err(|e| Error::Protocol(e.to_string()))? {
        Msg::Fail(why) => Err(Error::Refused(why)),
        m => Ok(m),
    }
}

fn expect(
    s: &mut UnixStream,
    want: &str,
    step: &'static str,
    timeout: Duration,
) -> Result<Msg, Error> {
    s.set_read_timeout(Some(timeout))
        .map_err(|e| Error::Io(step, e))?;
    let m = recv(s, step)?;
    let got = format!("{m:?}");
    if !got.starts_with(want) {
        return Err(Error::Protocol(format!(
            "expected {want}, got {}",
            &got[..got.len().min(40)]
        )));
    }
    Ok(m)
}

/// The old side, after HELLO.
pub struct Outgoing(UnixStream);

impl Outgoing {
    /// Connects to the new process and hands it the descriptors.
    pub fn hello(path: &Path, fds: &[(FdKind, RawFd)]) -> Result<Self, Error> {
        let mut s = UnixStream::connect(path).map_err(|e| Error::Connect(path.into(), e))?;
        let msg = Msg::Hello {
            version: crate::event_loop::VERSION.into(),
            kinds: fds.iter().map(|f| f.0).collect(),
        };
        let body = postcard::to_allocvec(&msg).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.1).collect();
        let sent = s
            .send_with_fds(&[&frame[..]], &raw)
            .map_err(|e| Error::Io("send HELLO", std::io::Error::from_raw_os_error(e.errno())))?;
        s.write_all(&frame[sent..])
            .map_err(|e| Error::Io("send HELLO", e))?;
        expect(&mut s, "Ready", "wait for READY", READY_TIMEOUT)?;
        Ok(Outgoing(s))
    }

    /// Sends the state of the (now paused) guest and waits for RESTORED.
    pub fn send_state(&mut self, state: Vec<u8>) -> Result<(), Error> {
        send(&mut self.0, &Msg::State(state), "send STATE")?;
        expect(
            &mut self.0,
            "Restored",
            "wait for RESTORED",
            RESTORED_TIMEOUT,
        )
        .map(|_| ())
    }

    /// Commits: from here on the new process runs the guest.
    pub fn go(mut self) -> Result<(), Error> {
        send(&mut self.0, &Msg::Go, "send GO")
    }
}

/// The new side, from HELLO to GO.
pub struct Incoming {
    stream: UnixStream,
    pub kinds: Vec<FdKind>,
    pub fds: Vec<RawFd>,
    pub peer_version: String,
}

/// Listens on `path` (mode 0600) until the old process connects, or until
/// `stop` (a signalfd) becomes readable; then receives HELLO.
pub fn accept(path: &Path, stop: RawFd) -> Result<Option<Incoming>, Error> {
    let listener = crate::control::bind(path)
        .map_err(|e| Error::Listen(path.into(), std::io::Error::other(e.to_string())))?;
    let result = accept_on(&listener, stop);
    let _ = std::fs::remove_file(path);
    result
}

fn accept_on(listener: &UnixListener, stop: RawFd) -> Result<Option<Incoming>, Error> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd structs.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io("wait for the old process", e));
        }
        if fds[1].revents != 0 {
            return Ok(None);
        }
        match listener.accept() {
            Ok((s, _)) => return receive_hello(s).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Error::Io("accept", e)),
        }
    }
}

fn receive_hello(mut s: UnixStream) -> Result<Incoming, Error> {
    s.set_nonblocking(false)
        .map_err(|e| Error::Io("receive HELLO", e))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut fds = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: iov points at `buf`, which outlives the call and may hold any bytes.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }.map_err(|e| {
        Error::Io(
            "receive HELLO",
            std::io::Error::from_raw_os_error(e.errno()),
        )
    })?;
    let received: Vec<RawFd> = fds[..nfds].to_vec();
    let close_all = |e: Error| {
        for &fd in &received {
            // SAFETY: descriptors just received and owned by nobody else.
            unsafe { libc::close(fd) };
        }
        e
    };
    if n < 4 {
        return Err(close_all(Error::Protocol("short HELLO".into())));
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > buf.len() - 4 {
        return Err(close_all(Error::Protocol("oversized HELLO".into())));
    }
    if n < 4 + len {
        s.read_exact(&mut buf[n..4 + len])
            .map_err(|e| close_all(Error::Io("receive HELLO", e)))?;
    }
    match postcard::from_bytes(&buf[4..4 + len]) {
        Ok(Msg::Hello { version, kinds }) => Ok(Incoming {
            stream: s,
            kinds: kinds.to_vec(),
            fds: received,
            peer_version: version,
        }),
        _ => Err(close_all(Error::Protocol("expected HELLO".into()))),
    }
}

impl Incoming {
    /// Tells the old side everything is prepared; returns the state it sends.
    pub fn ready(&mut self) -> Result<Vec<u8>, Error> {
        send(&mut self.stream, &Msg::Ready, "send READY")?;
        match expect(
            &mut self.stream,
            "State",
            "wait for STATE",
            RESTORED_TIMEOUT + READY_TIMEOUT,
        )? {
            Msg::State(bytes) => Ok(bytes),
            _ => Err(Error::Protocol("expected STATE".into())),
        }
    }

    /// The state is loaded: waits for the old side's GO.
    pub fn restored(&mut self) -> Result<(), Error> {
        send(&mut self.stream, &Msg::Restored, "send RESTORED")?;
        expect(&mut self.stream, "Go", "wait for GO", GO_TIMEOUT).map(|_| ())
    }

    /// Gives up, telling the old side why (best effort: it may be gone).
    pub fn fail(&mut self, why: &str) {
        let _ = send(&mut self.stream, &Msg::Fail(why.into()), "send FAIL");
    }
}
