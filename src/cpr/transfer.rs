//! Transfer mode: a new molt, started first with `--incoming unix:PATH`, takes
//! the guest over from the running one. The protocol, as a state machine:
//!
//! ```text
//!   old (running the guest)               new (listening on PATH)
//!   check PATH, connect, peer uid         peer uid
//!   MOLTXFR2 HELLO (version, formats) --> check formats
//!                                   <--   MOLTXFR2 HELLO (version, formats)
//!   check formats
//!   FDS (+ terminal mode) + descriptors -->   adopt them, map RAM, build VM,
//!                                         devices  (the guest still runs)
//!                                   <--   READY
//!   pause, save, STATE              -->   decode, check, restore (not run)
//!                                   <--   RESTORED   (or FAIL: why)
//!   GO, exit 0                      -->   run the vCPUs, reply to the client
//! ```
//!
//! Trust: guest RAM moves with FDS, so nothing moves before both sides have
//! checked that the peer runs as molt's own uid (SO_PEERCRED), speaks this
//! protocol and reads the state format that will be sent. The old side also
//! refuses a PATH that another user owns or could replace.
//!
//! Deadlines: every wait is bounded for the whole message, not per read, and
//! ends early on a stop descriptor (the signalfd, or a worker's abort). The
//! guest stays paused at most `max_pause` after STATE is sent: past it the old
//! side resumes the guest and tells the new side FAIL.
//!
//! A console on a terminal that molt made raw stays raw across the hand-over:
//! the user's own mode follows FDS in its frame (`terminal::Original`), for
//! whichever molt ends the guest to restore. Older molts ignore the trailer.
//!
//! Until the old side sends GO, it can and does resume the guest on any
//! failure; the new side never runs vCPUs without GO, so the guest never runs
//! twice. After GO the old side only exits.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::fds::{FdKind, MAX_FDS};
use super::state;
use super::wait::{self, human, Stop};
use crate::phases::{self, Phases};
use crate::terminal::Original;
pub(crate) use frame::Bytes;
use frame::{fds_frame, frame, frame_into, STATE_FRAME_ROOM};

mod frame;

/// How long the new side waits for a connection's HELLO. A real old side sends
/// it as it connects; connections are served one at a time, so a silent one
/// delays the real one by at most this much.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the old side waits for the new side's HELLO, and the new side for FDS.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the old side waits for READY (the new side maps RAM and builds a VM).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the new side waits for STATE after READY (the old side only pauses and saves).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may stay paused after STATE is sent, unless `cpr-transfer` says otherwise.
pub const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(1);
/// The largest `--max-pause-ms` a `cpr-transfer` may ask for.
pub const MAX_MAX_PAUSE: Duration = Duration::from_secs(60);
/// The new side waits for GO this much longer than the old side waits for
/// RESTORED, so that a GO sent in time is never missed.
const GO_MARGIN: Duration = Duration::from_secs(10);
/// First bytes each side sends: garbage and other protocols fail at once.
const MAGIC: [u8; 8] = *b"MOLTXFR2";
/// HELLO, FDS, READY, RESTORED, GO and FAIL are small.
const MAX_SMALL: usize = 4096;
/// STATE: a `CprState` with its header.
const MAX_STATE: usize = state::HEADER_LEN + state::MAX_PAYLOAD + 64;
/// Most state formats one HELLO may list.
const MAX_FORMATS: usize = 8;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Msg<'a> {
    Hello {
        version: String,
        /// The newest state format this side writes (it writes the older
        /// ones of `state::WRITES` too).
        writes: u32,
        /// The state formats this side reads.
        reads: heapless::Vec<u32, MAX_FORMATS>,
    },
    Fds {
        kinds: Box<heapless::Vec<FdKind, MAX_FDS>>,
    },
    Ready,
    State {
        max_pause_ms: u32,
        #[serde(borrow)]
        bytes: Bytes<'a>,
    },
    Restored,
    Go,
    Fail(String),
}

/// A message's body as the other side sent it, and the bytes after it (a
/// STATE frame's trailer: the old side's pause marks).
pub(crate) fn decode(body: &[u8]) -> Result<(Msg<'_>, &[u8]), String> {
    postcard::take_from_bytes(body).map_err(|e| e.to_string())
}

impl Msg<'_> {
    /// The step of sending this message, for errors: "sending HELLO".
    fn sending(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "sending HELLO",
            Msg::Fds { .. } => "sending FDS",
            Msg::Ready => "sending READY",
            Msg::State { .. } => "sending STATE",
            Msg::Restored => "sending RESTORED",
            Msg::Go => "sending GO",
            Msg::Fail(_) => "sending FAIL",
        }
    }

    /// The message's name: "HELLO".
    fn name(&self) -> &'static str {
        &self.sending()["sending ".len()..]
    }

    fn hello() -> Msg<'static> {
        Msg::Hello {
            version: super::VERSION.into(),
            // The newest this side writes: on the old side, the new side's
            // `reads` then pick the format (`check_formats`).
            writes: state::VERSION,
            reads: state::READS.into_iter().collect(),
        }
    }
}

#[derive(Debug)]
pub enum Error {
    /// PATH failed a safety check before anything was sent.
    Path(PathBuf, String),
    Connect(PathBuf, io::Error),
    Listen(crate::files::Error),
    /// The peer is not a molt of this uid that reads our state format.
    Peer(String),
    TimedOut(&'static str, Duration),
    /// A signal (or `quit`) arrived during the hand-over.
    Interrupted(&'static str),
    Io(&'static str, io::Error),
    Protocol(&'static str, String),
    /// The other side said why it gave up.
    Refused(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Path(p, why) => write!(f, "refusing {}: {why}", p.display()),
            Error::Connect(p, e) => write!(f, "cannot connect to {}: {e}", p.display()),
            Error::Listen(e) => e.fmt(f),
            Error::Peer(why) => write!(f, "peer refused: {why}"),
            Error::TimedOut(step, d) => write!(f, "timed out after {} {step}", human(*d)),
            Error::Interrupted(step) => write!(f, "interrupted by a signal or quit {step}"),
            Error::Io(step, e) => write!(f, "{step}: {e}"),
            Error::Protocol(step, why) => write!(f, "protocol error {step}: {why}"),
            Error::Refused(why) => write!(f, "the other side refused: {why}"),
        }
    }
}

/// One step's time budget: the whole message must fit in it.
#[derive(Clone, Copy)]
struct Deadline {
    at: Instant,
    total: Duration,
}

impl Deadline {
    fn after(total: Duration) -> Self {
        Deadline {
            at: Instant::now() + total,
            total,
        }
    }
}

/// A non-blocking connection whose every wait is bounded and stoppable.
struct Link {
    s: UnixStream,
    stop: RawFd,
    /// What followed the last message in its frame: nothing, or a STATE's
    /// pause marks (`Phases::encode`). Older molts ignore such a trailer.
    trailer: Vec<u8>,
    /// The last message's body; a received STATE borrows its bytes from it.
    /// Made before the pause for STATE (`Incoming::reserve`), with its pages
    /// written: reading into it faults none in.
    body: Vec<u8>,
}

impl Link {
    fn new(s: UnixStream, stop: RawFd) -> Result<Self, Error> {
        s.set_nonblocking(true)
            .map_err(|e| Error::Io("set up the connection", e))?;
        Ok(Link {
            s,
            stop,
            trailer: Vec::new(),
            body: Vec::new(),
        })
    }

    fn wait(&self, events: i16, step: &'static str, d: Deadline) -> Result<(), Error> {
        wait::until(self.s.as_raw_fd(), events, d.at, &[self.stop]).map_err(|e| match e {
            Stop::TimedOut => Error::TimedOut(step, d.total),
            Stop::Interrupted => Error::Interrupted(step),
            Stop::Io(e) => Error::Io(step, e),
        })
    }

    /// Runs `op` until it moves bytes, waiting for `events` while it would block.
    fn retry(
        &mut self,
        events: i16,
        step: &'static str,
        d: Deadline,
        mut op: impl FnMut(&mut UnixStream) -> io::Result<usize>,
    ) -> Result<usize, Error> {
        loop {
            match op(&mut self.s) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(events, step, d)?,
                Err(e) => return Err(Error::Io(step, e)),
            }
        }
    }

    fn write_all(&mut self, mut buf: &[u8], step: &'static str, d: Deadline) -> Result<(), Error> {
        while !buf.is_empty() {
            let n = self.retry(libc::POLLOUT, step, d, |s| s.write(buf))?;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn read_exact(
        &mut self,
        mut buf: &mut [u8],
        step: &'static str,
        d: Deadline,
    ) -> Result<(), Error> {
        while !buf.is_empty() {
            let n = self.retry(libc::POLLIN, step, d, |s| s.read(buf))?;
            if n == 0 {
                return Err(Error::Io(step, io::ErrorKind::UnexpectedEof.into()));
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    fn send(&mut self, msg: &Msg, magic: bool, d: Deadline) -> Result<(), Error> {
        let step = msg.sending();
        let frame = frame(msg, magic).map_err(|e| Error::Protocol(step, e))?;
        self.write_all(&frame, step, d)
    }

    /// Receives one frame of at most `max` bytes (after MAGIC, if `magic`).
    /// The other side's FAIL becomes `Error::Refused`.
    fn recv(
        &mut self,
        step: &'static str,
        magic: bool,
        max: usize,
        d: Deadline,
    ) -> Result<Msg<'_>, Error> {
        let len = self.recv_body(step, magic, max, d)?;
        self.message(len, step)
    }

    /// Reads one frame's body into `body`; returns its length.
    fn recv_body(
        &mut self,
        step: &'static str,
        magic: bool,
        max: usize,
        d: Deadline,
    ) -> Result<usize, Error> {
        if magic {
            // Checked as it arrives: a short greeting of another protocol
            // ("status\n") is refused at once, not at the deadline.
            let mut m = [0u8; MAGIC.len()];
            let mut got = 0;
            while got < m.len() {
                let n = self.retry(libc::POLLIN, step, d, |s| s.read(&mut m[got..]))?;
                if n == 0 {
                    return Err(Error::Io(step, io::ErrorKind::UnexpectedEof.into()));
                }
                got += n;
                if m[..got] != MAGIC[..got] {
                    return Err(Error::Peer(format!(
                        "{step}: not a molt transfer peer (it sent {:?})",
                        String::from_utf8_lossy(&m[..got])
                    )));
                }
            }
        }
        let mut len = [0u8; 4];
        self.read_exact(&mut len, step, d)?;
        self.read_body(u32::from_le_bytes(len) as usize, step, max, d)
    }

    /// Reads a body of `len` bytes (at most `max`) into `body`.
    fn read_body(
        &mut self,
        len: usize,
        step: &'static str,
        max: usize,
        d: Deadline,
    ) -> Result<usize, Error> {
        if len > max {
            return Err(Error::Protocol(
                step,
                format!("{len}-byte message (at most {max})"),
            ));
        }
        let mut body = std::mem::take(&mut self.body);
        if body.len() < len {
            body.resize(len, 0);
        }
        let read = self.read_exact(&mut body[..len], step, d);
        self.body = body;
        read.map(|()| len)
    }

    /// The message of the `len`-byte body just read; what follows it in the
    /// frame is kept in `trailer`.
    fn message(&mut self, len: usize, step: &'static str) -> Result<Msg<'_>, Error> {
        let (msg, rest) = decode(&self.body[..len]).map_err(|e| Error::Protocol(step, e))?;
        self.trailer.clear();
        self.trailer.extend_from_slice(rest);
        match msg {
            Msg::Fail(why) => Err(Error::Refused(why)),
            m => Ok(m),
        }
    }

    /// Tells the other side why this one gives up; best effort, it may be gone.
    fn fail(&mut self, why: &str) {
        let why: String = why.chars().take(MAX_SMALL / 2).collect();
        let _ = self.send(
            &Msg::Fail(why),
            false,
            Deadline::after(Duration::from_millis(100)),
        );
    }
}

fn unexpected(step: &'static str, want: &str, got: &Msg) -> Error {
    Error::Protocol(step, format!("expected {want}, got {}", got.name()))
}

/// The peer must run as molt's own uid.
fn check_peer_uid(s: &UnixStream, who: &str) -> Result<(), Error> {
    let cred = crate::creds::peer(s).map_err(|e| Error::Io("SO_PEERCRED", e))?;
    check_uid(cred.uid, crate::creds::euid(), who)
}

fn check_uid(peer: u32, me: u32, who: &str) -> Result<(), Error> {
    if peer == me {
        Ok(())
    } else {
        Err(Error::Peer(format!(
            "{who} runs as uid {peer}; only molt's own uid {me} may take part"
        )))
    }
}

/// The peer's HELLO must show a molt that can take part: the new side must
/// read a format the old side writes. The old side writes any of its
/// `state::WRITES` and says the newest (`writes`); it picks the newest format
/// the new side reads (`reads`), refusing if there is none. The new side
/// checks only that the old side's formats are not all older than its own.
/// Returns the peer's version and, on the old side (`peer_is_old` false),
/// the format to send.
fn check_formats(
    step: &'static str,
    peer: &Msg,
    peer_is_old: bool,
) -> Result<(String, u32), Error> {
    let Msg::Hello {
        version,
        writes,
        reads,
    } = peer
    else {
        return Err(unexpected(step, "HELLO", peer));
    };
    let format = if peer_is_old {
        Some(*writes).filter(|&w| w >= state::READS[0])
    } else {
        state::newest_common(reads)
    };
    let Some(format) = format else {
        let (writes, reads) = if peer_is_old {
            (format!("up to {writes}"), state::formats())
        } else {
            (state::list(&state::WRITES), state::list(reads))
        };
        return Err(Error::Peer(format!(
            "the old process writes state formats {writes}, the new one reads {reads}: \
             none in common; the other side is molt {version}"
        )));
    };
    Ok((version.clone(), format))
}

/// PATH must be a socket of ours, in a directory no other user can write to
/// (unless the directory is sticky: then nobody else can replace our socket).
pub fn check_path(path: &Path) -> Result<(), Error> {
    let refuse = |why: String| Err(Error::Path(path.into(), why));
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => return Err(Error::Connect(path.into(), e)),
    };
    let me = crate::creds::euid();
    if !meta.file_type().is_socket() {
        return refuse("it is not a socket".into());
    }
    if meta.uid() != me {
        return refuse(format!(
            "it belongs to uid {}, not molt's uid {me}",
            meta.uid()
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dmeta = std::fs::metadata(dir).map_err(|e| Error::Connect(dir.into(), e))?;
    if dmeta.uid() != me && dmeta.uid() != 0 {
        return refuse(format!(
            "its directory {} belongs to uid {}, who could replace it",
            dir.display(),
            dmeta.uid()
        ));
    }
    let sticky = dmeta.mode() & libc::S_ISVTX != 0;
    if dmeta.mode() & 0o022 != 0 && !sticky {
        return refuse(format!(
            "its directory {} (mode {:o}) is writable by other users and not sticky",
            dir.display(),
            dmeta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Connects without blocking: a listener with a full backlog is an error, not a hang.
fn connect(path: &Path) -> Result<UnixStream, Error> {
    use std::os::unix::ffi::OsStrExt;
    let err = |e| Error::Connect(path.into(), e);
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(err(io::Error::other("path too long for a socket")));
    }
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket owned by nothing else.
    let s = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un of the size given.
    let r = unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(s)
}

/// The old side, from the hand-shake to GO.
pub struct Outgoing {
    link: Link,
    pub peer_version: String,
    /// The state format to send: the newest the new process reads.
    pub format: u32,
    /// STATE's frame is written into this (`reserve`): made before the
    /// pause and freed after it.
    frame: Vec<u8>,
}

impl Outgoing {
    /// Checks PATH and the new process (its state format must carry a guest
    /// with passed-through devices if `vfio`), hands it the descriptors (and
    /// the user's `terminal` mode, if the console is on one) and waits until
    /// it is READY; the guest runs meanwhile. `stop` aborts every wait.
    pub fn prepare(
        path: &Path,
        fds: &[(FdKind, RawFd)],
        terminal: Option<Original>,
        vfio: bool,
        stop: RawFd,
    ) -> Result<Self, Error> {
        check_path(path)?;
        let s = connect(path)?;
        check_peer_uid(&s, "the process listening there")?;
        let mut link = Link::new(s, stop)?;
        link.send(&Msg::hello(), true, Deadline::after(HANDSHAKE_TIMEOUT))?;
        let step = "waiting for the new process's HELLO";
        let hello = link.recv(step, true, MAX_SMALL, Deadline::after(HANDSHAKE_TIMEOUT))?;
        let (peer_version, format) = check_formats(step, &hello, false)?;
        if let Err(e) = state::carries(format, vfio) {
            let e = Error::Peer(format!("{e}; the other side is molt {peer_version}"));
            link.fail(&e.to_string());
            return Err(e);
        }
        let kinds: Vec<FdKind> = fds.iter().map(|f| f.0).collect();
        let frame = fds_frame(&kinds, terminal).map_err(|e| Error::Protocol("sending FDS", e))?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.1).collect();
        let d = Deadline::after(HANDSHAKE_TIMEOUT);
        let sent = link.retry(libc::POLLOUT, "sending FDS", d, |s| {
            s.send_with_fds(&[&frame[..]], &raw)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        })?;
        link.write_all(&frame[sent..], "sending FDS", d)?;
        let step = "waiting for READY";
        match link.recv(step, false, MAX_SMALL, Deadline::after(READY_TIMEOUT))? {
            Msg::Ready => Ok(Outgoing {
                link,
                peer_version,
                format,
                frame: Vec::new(),
            }),
            m => Err(unexpected(step, "READY", &m)),
        }
    }

    /// Makes STATE's frame buffer, its pages written, for a state of up to
    /// `bytes` bytes: before the pause, so that framing it there faults none in.
    pub fn reserve(&mut self, bytes: usize) {
        self.frame = vec![1; MAGIC.len() + 4 + bytes + STATE_FRAME_ROOM];
    }

    /// Sends the state of the (now paused) guest, with the pause's `phases`
    /// so far after it in the frame, and waits for RESTORED, both within
    /// `max_pause`. `stop` (the signalfd) aborts the wait.
    pub fn send_state(
        &mut self,
        bytes: &[u8],
        phases: &Phases,
        max_pause: Duration,
        stop: RawFd,
    ) -> Result<(), Error> {
        self.link.stop = stop;
        let d = Deadline::after(max_pause);
        let msg = Msg::State {
            max_pause_ms: max_pause.as_millis() as u32,
            bytes: Bytes(bytes),
        };
        let step = msg.sending();
        let mut frame = frame_into(&msg, false, std::mem::take(&mut self.frame))
            .map_err(|e| Error::Protocol(step, e))?;
        let trailer = phases.encode();
        let len = frame.len() - 4 + trailer.len();
        // Only within what any receiver takes (a state near the largest goes without).
        if len <= MAX_STATE {
            frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
            frame.extend_from_slice(trailer.as_bytes());
        }
        let written = self.link.write_all(&frame, step, d);
        self.frame = frame;
        written?;
        let step = "waiting for RESTORED (the guest is paused)";
        match self.link.recv(step, false, MAX_SMALL, d)? {
            Msg::Restored => Ok(()),
            m => Err(unexpected(step, "RESTORED", &m)),
        }
    }

    /// Commits: from here on the new process runs the guest.
    pub fn go(mut self) -> Result<(), Error> {
        self.link
            .send(&Msg::Go, false, Deadline::after(HANDSHAKE_TIMEOUT))
    }

    /// Gives up, telling the new process why.
    pub fn fail(&mut self, why: &str) {
        self.link.fail(why);
    }
}

/// The new side, from HELLO to GO.
pub struct Incoming {
    link: Link,
    pub kinds: Vec<FdKind>,
    pub fds: Vec<OwnedFd>,
    /// The user's terminal mode, if the console is on a terminal molt made raw.
    pub terminal: Option<Original>,
    pub peer_version: String,
}

/// Listens on `path` (mode 0600) until a molt of this uid hands a guest over,
/// or until `stop` (the signalfd) fires: then `None`. A connection that fails
/// a check or a deadline is dropped and the wait goes on.
pub fn accept(path: &Path, stop: RawFd) -> Result<Option<Incoming>, Error> {
    let listener = crate::files::bind_socket("socket", path).map_err(Error::Listen)?;
    let result = accept_on(&listener, stop, path);
    let _ = std::fs::remove_file(path);
    result
}

fn accept_on(listener: &UnixListener, stop: RawFd, path: &Path) -> Result<Option<Incoming>, Error> {
    // The wait for the old process itself is unbounded: a pre-started molt
    // waits until it is used or stopped.
    let forever = Instant::now() + Duration::from_secs(100 * 365 * 86400);
    loop {
        match wait::until(listener.as_raw_fd(), libc::POLLIN, forever, &[stop]) {
            Ok(()) => {}
            Err(Stop::Interrupted) => return Ok(None),
            Err(Stop::TimedOut) => continue,
            Err(Stop::Io(e)) => return Err(Error::Io("waiting for the old process", e)),
        }
        let s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Error::Io("accept", e)),
        };
        match handshake(s, stop) {
            Ok(inc) => return Ok(Some(inc)),
            Err(Error::Interrupted(_)) => return Ok(None),
            Err(e) => log::warn!(
                "dropped a connection on {}: {e}; still waiting",
                path.display()
            ),
        }
    }
}

/// The new side of the hand-shake on one connection, up to the descriptors.
fn handshake(s: UnixStream, stop: RawFd) -> Result<Incoming, Error> {
    check_peer_uid(&s, "the connecting process")?;
    let mut link = Link::new(s, stop)?;
    let step = "waiting for HELLO";
    let hello = link.recv(step, true, MAX_SMALL, Deadline::after(HELLO_TIMEOUT))?;
    let peer_version = match check_formats(step, &hello, true) {
        Ok((v, _)) => v,
        Err(e) => {
            link.fail(&e.to_string());
            return Err(e);
        }
    };
    super::fault::point("hello");
    link.send(&Msg::hello(), true, Deadline::after(HANDSHAKE_TIMEOUT))?;
    let (kinds, fds) = receive_fds(&mut link)?;
    let terminal = match &link.trailer[..] {
        [] => None,
        t => match postcard::take_from_bytes(t) {
            Ok((t, _)) => Some(t),
            Err(e) => {
                let e = Error::Protocol("waiting for FDS", format!("terminal mode: {e}"));
                link.fail(&e.to_string());
                return Err(e);
            }
        },
    };
    Ok(Incoming {
        link,
        kinds,
        fds,
        terminal,
        peer_version,
    })
}

/// FDS: the descriptors arrive with the frame's first bytes.
fn receive_fds(link: &mut Link) -> Result<(Vec<FdKind>, Vec<OwnedFd>), Error> {
    let step = "waiting for FDS";
    let d = Deadline::after(HANDSHAKE_TIMEOUT);
    let mut len = [0u8; 4];
    let mut raw = [-1; MAX_FDS];
    let mut nfds = 0;
    let n = {
        let mut iov = [libc::iovec {
            iov_base: len.as_mut_ptr().cast(),
            iov_len: len.len(),
        }];
        link.retry(libc::POLLIN, step, d, |s| {
            // SAFETY: iov points at `len`, which outlives the call and may hold any bytes.
            let (n, k) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            nfds = k;
            Ok(n)
        })?
    };
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        // SAFETY: descriptors just received, owned by nothing else.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(Error::Io(step, io::ErrorKind::UnexpectedEof.into()));
    }
    link.read_exact(&mut len[n..], step, d)?;
    let len = link.read_body(u32::from_le_bytes(len) as usize, step, MAX_SMALL, d)?;
    match link.message(len, step)? {
        Msg::Fds { kinds } => Ok((kinds.to_vec(), fds)),
        m => Err(unexpected(step, "FDS", &m)),
    }
}

impl Incoming {
    /// Makes the buffer STATE is read into, its pages written, for a state
    /// of up to `bytes` bytes: before the pause, so that reading and decoding
    /// it there faults none in.
    pub fn reserve(&mut self, bytes: usize) {
        self.link.body = vec![1; bytes + STATE_FRAME_ROOM];
    }

    /// Tells the old side everything is prepared; returns the state it sends
    /// (borrowed from the frame it came in), how long it will keep the guest
    /// paused, and the pause's phases so far (the old side's, marked up to
    /// the STATE read here).
    pub fn ready(&mut self) -> Result<(&[u8], Duration, Option<Phases>), Error> {
        self.link
            .send(&Msg::Ready, false, Deadline::after(HANDSHAKE_TIMEOUT))?;
        let step = "waiting for STATE";
        let len = self
            .link
            .recv_body(step, false, MAX_STATE, Deadline::after(STATE_TIMEOUT))?;
        let got = phases::now();
        let (msg, trailer) =
            decode(&self.link.body[..len]).map_err(|e| Error::Protocol(step, e))?;
        match msg {
            Msg::State {
                max_pause_ms,
                bytes,
            } => {
                let old = std::str::from_utf8(trailer)
                    .ok()
                    .and_then(|t| Phases::decode(t, got));
                let phases = old.map(|old| {
                    let mut here = Phases::begin_at(old.last());
                    here.mark_at("send", got);
                    old.then(here)
                });
                Ok((bytes.0, Duration::from_millis(max_pause_ms.into()), phases))
            }
            Msg::Fail(why) => Err(Error::Refused(why)),
            m => Err(unexpected(step, "STATE", &m)),
        }
    }

    /// The state is loaded: waits for the old side's GO.
    pub fn restored(&mut self, max_pause: Duration) -> Result<(), Error> {
        self.link
            .send(&Msg::Restored, false, Deadline::after(HANDSHAKE_TIMEOUT))?;
        let step = "waiting for GO";
        match self.link.recv(
            step,
            false,
            MAX_SMALL,
            Deadline::after(max_pause + GO_MARGIN),
        )? {
            Msg::Go => Ok(()),
            m => Err(unexpected(step, "GO", &m)),
        }
    }

    /// Gives up, telling the old side why (best effort: it may be gone).
    pub fn fail(&mut self, why: &str) {
        self.link.fail(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_our_uid_is_accepted() {
        assert!(check_uid(1000, 1000, "x").is_ok());
        let e = check_uid(65534, 0, "the process listening there").unwrap_err();
        assert!(e.to_string().contains("uid 65534"), "{e}");
    }

    #[test]
    fn formats_are_checked_both_ways() {
        let hello = |writes, reads: &[u32]| Msg::Hello {
            version: "x".into(),
            writes,
            reads: reads.iter().copied().collect(),
        };
        let v = state::VERSION;
        let oldest = state::WRITES[0];
        assert_eq!(check_formats("s", &hello(v, &[v]), true).unwrap().1, v);
        assert_eq!(check_formats("s", &hello(v, &[v]), false).unwrap().1, v);
        // A previous release writing format 1 can hand its guest over to this one,
        // and so can a later release, which also writes this one's formats.
        assert!(check_formats("s", &hello(1, &[1]), true).is_ok());
        assert!(check_formats("s", &hello(v + 1, &[v + 1]), true).is_ok());
        // To a release reading only older formats, this one sends the newest
        // of those it writes.
        let older: Vec<u32> = (1..=oldest).collect();
        assert_eq!(
            check_formats("s", &hello(oldest, &older), false).unwrap().1,
            oldest
        );
        assert_eq!(
            check_formats("s", &hello(v + 1, &[v, v + 1]), false)
                .unwrap()
                .1,
            v
        );
        for e in [
            // ... but not to one reading only formats it cannot write.
            check_formats("s", &hello(1, &[1]), false).unwrap_err(),
            check_formats("s", &hello(v + 1, &[v + 1]), false).unwrap_err(),
            // An old side writing only formats older than any this one reads.
            check_formats("s", &hello(0, &[0]), true).unwrap_err(),
        ] {
            assert!(e.to_string().contains("none in common"), "{e}");
        }
        assert!(check_formats("s", &Msg::Ready, true).is_err());
    }

    fn socket_in(dir: &Path, mode: u32) -> (PathBuf, UnixListener) {
        let _ = std::fs::create_dir_all(dir);
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        (path, l)
    }

    #[test]
    fn paths_others_could_replace_are_refused() {
        let base = std::env::temp_dir().join(format!("molt-xfer-path-{}", std::process::id()));
        let (p, _l) = socket_in(&base.join("private"), 0o700);
        check_path(&p).unwrap();
        let (p, _l) = socket_in(&base.join("sticky"), 0o1777);
        check_path(&p).unwrap();
        let (p, _l) = socket_in(&base.join("open"), 0o777);
        let e = check_path(&p).unwrap_err().to_string();
        assert!(e.contains("writable by other users"), "{e}");
        let file = base.join("private").join("plain");
        std::fs::write(&file, b"").unwrap();
        let e = check_path(&file).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A hand-shake over a socket pair, both ends in this process.
    #[test]
    fn garbage_silence_and_drip_end_within_the_deadline() {
        let (stop, _keep) = UnixStream::pair().unwrap();
        // Garbage: refused at once as not a molt.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"status\nstatus\n").unwrap();
        let e = handshake(a, stop.as_raw_fd()).err().unwrap();
        assert!(matches!(e, Error::Peer(_)), "{e}");
        // A frame longer than a HELLO may be: refused without reading it.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&MAGIC).unwrap();
        b.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
        let e = handshake(a, stop.as_raw_fd()).err().unwrap();
        assert!(e.to_string().contains("at most"), "{e}");
        // The other side gave up.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&frame(&Msg::Fail("no".into()), true).unwrap())
            .unwrap();
        assert!(matches!(
            handshake(a, stop.as_raw_fd()),
            Err(Error::Refused(_))
        ));
        // Going away.
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(matches!(
            handshake(a, stop.as_raw_fd()),
            Err(Error::Io(_, _))
        ));
    }

    #[test]
    fn a_stop_ends_a_silent_wait() {
        let (stop_r, mut stop_w) = UnixStream::pair().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        stop_w.write_all(b"x").unwrap();
        let t = Instant::now();
        let e = handshake(a, stop_r.as_raw_fd()).err().unwrap();
        assert!(matches!(e, Error::Interrupted(_)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn descriptors_move_only_after_both_hellos() {
        let (stop, _keep) = UnixStream::pair().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let new_side = std::thread::spawn(move || {
            let (stop2, _k) = UnixStream::pair().unwrap();
            handshake(a, stop2.as_raw_fd())
                .map(|i| (i.kinds, i.fds.len(), i.peer_version, i.terminal))
        });
        // The old side, by hand, up to FDS.
        let mut link = Link::new(b, stop.as_raw_fd()).unwrap();
        let d = Deadline::after(HANDSHAKE_TIMEOUT);
        link.send(&Msg::hello(), true, d).unwrap();
        let hello = link.recv("s", true, MAX_SMALL, d).unwrap();
        assert!(check_formats("s", &hello, false).is_ok());
        let memfd = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: termios is plain data; zero is a valid (if odd) mode.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_lflag = libc::ICANON;
        let mode = Original::of(&t);
        let f = fds_frame(&[FdKind::GuestRam], Some(mode)).unwrap();
        link.s
            .send_with_fds(&[&f[..]], &[memfd.as_raw_fd()])
            .unwrap();
        let (kinds, n, version, terminal) = new_side.join().unwrap().unwrap();
        assert_eq!(kinds, [FdKind::GuestRam]);
        assert_eq!(n, 1);
        assert_eq!(version, crate::cpr::VERSION);
        assert_eq!(
            terminal,
            Some(mode),
            "the user's terminal mode came with FDS"
        );
        // As an older molt sends it: no mode.
        let (a, b) = UnixStream::pair().unwrap();
        let new_side = std::thread::spawn(move || {
            let (stop2, _k) = UnixStream::pair().unwrap();
            handshake(a, stop2.as_raw_fd()).map(|i| i.terminal)
        });
        let mut link = Link::new(b, stop.as_raw_fd()).unwrap();
        link.send(&Msg::hello(), true, d).unwrap();
        link.recv("s", true, MAX_SMALL, d).unwrap();
        let f = fds_frame(&[FdKind::GuestRam], None).unwrap();
        link.s
            .send_with_fds(&[&f[..]], &[memfd.as_raw_fd()])
            .unwrap();
        assert_eq!(new_side.join().unwrap().unwrap(), None);
    }
}
