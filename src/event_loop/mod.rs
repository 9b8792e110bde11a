//! The main thread of `molt run`: one epoll loop over the guest-exit eventfd,
//! termination signals, console input and the control socket. vCPUs run on their
//! own threads; everything that changes the machine's run state happens here.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::args::{Incoming, RunConfig, SerialConfig};
use crate::bus::GuestExit;
use crate::control::{self, Command};
use crate::cpr;
use crate::cpr::arrive::{Arrival, Received};
use crate::cpr::state::RunState;
use crate::cpr::update::Request;
use crate::devices::serial::Output;
use crate::files::{self, Access};
use crate::sync::lock;
use crate::terminal::RawMode;
use crate::vm::{self, Machine};

mod clients;
mod token;
mod updates;

use clients::Clients;
use token::Token;

/// How `molt run` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Guest(GuestExit),
    Quit,
    /// `cpr-save` wrote the state: the guest continues in a later molt.
    Saved,
    /// `cpr-transfer` handed the guest to another molt, which runs it now.
    Transferred,
    Signal(i32),
}

#[derive(Debug)]
pub enum Error {
    File(files::Error),
    Vm(vm::Error),
    Cpr(cpr::Error),
    Setup(&'static str, std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::File(e) => e.fmt(f),
            Error::Vm(e) => e.fmt(f),
            Error::Cpr(e) => e.fmt(f),
            Error::Setup(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

/// Retry interval for console input the guest's UART FIFO had no room for.
const INPUT_RETRY_MS: i32 = 10;
const TERMINATING_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Boots the guest described by `cfg` (or takes it over: `--incoming`) and
/// serves it until it ends.
pub fn run(cfg: RunConfig) -> Result<Outcome, Error> {
    // Blocked before any thread starts, so only the signalfd ever sees them.
    let signals = signal_fd()?;
    // 1. An incoming guest is received and checked before anything is opened.
    let mut arrival = match cpr::arrive::receive(&cfg, signals.as_raw_fd()).map_err(Error::Cpr)? {
        Received::Nothing => None,
        Received::Stopped => return Ok(Outcome::Signal(read_signal(&signals))),
        Received::Guest(a) => Some(a),
    };
    // 2. The console: handed over with the guest, or opened here.
    let (console_out, console_in) = arrival.as_mut().map_or((None, None), Arrival::take_console);
    let terminal = arrival.as_ref().and_then(Arrival::terminal);
    let console = match console_out {
        Some(f) => Output::Fd(f),
        None => open_console(&cfg.serial)?,
    };
    // 3. The control socket: bound here, unless it comes with the guest.
    let bind = || {
        cfg.control
            .as_deref()
            .map(control::bind)
            .transpose()
            .map_err(Error::File)
    };
    let mut listener = match &arrival {
        Some(a) if a.hands_listener() => None,
        _ => bind()?,
    };
    // Whatever happens from here on, the socket file goes with this process
    // (unless the guest went to another one, which serves the same path).
    // A transfer's new process owns the path only once it has taken over: if it
    // fails, the old process still serves it.
    let mut socket_file = match cfg.incoming {
        Some(Incoming::Unix(_)) => None,
        _ => cfg.control.clone().map(RemoveOnDrop),
    };
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| Error::Setup("eventfd", e))?;
    let exit_reason = Arc::new(Mutex::new(None));
    let sink = {
        let (evt, reason) = (
            exit_evt
                .try_clone()
                .map_err(|e| Error::Setup("eventfd", e))?,
            exit_reason.clone(),
        );
        Arc::new(move |why: GuestExit| {
            let mut slot = lock(&reason);
            slot.get_or_insert(why);
            let _ = evt.write(1);
        })
    };
    // 4. The guest runs: booted, or resumed from what arrived.
    let (machine, last_pause_us, run, greeting, watchers, event) = match arrival {
        None => {
            let machine = Machine::boot(&cfg, console, sink).map_err(Error::Vm)?;
            (machine, 0, RunState::Running, None, Vec::new(), None)
        }
        Some(a) => {
            let r = a.resume(&cfg, console, sink).map_err(Error::Cpr)?;
            if let Some(fd) = r.listener {
                let l = UnixListener::from(fd);
                l.set_nonblocking(true)
                    .map_err(|e| Error::Setup("control socket", e))?;
                listener = Some(l);
            } else if listener.is_none() {
                listener = bind()?;
            }
            (
                r.machine, r.pause_us, r.run, r.greeting, r.watchers, r.event,
            )
        }
    };
    if socket_file.is_none() {
        socket_file = cfg.control.clone().map(RemoveOnDrop);
    }
    // A terminal that came with the guest is raw already, and the user's mode
    // came with it.
    let raw = match (&cfg.serial, &console_in) {
        (SerialConfig::Stdio, Some(fd)) => RawMode::adopt(fd.as_raw_fd(), terminal),
        (SerialConfig::Stdio, None) => RawMode::enter(libc::STDIN_FILENO),
        _ => None,
    };
    let mut lp = Loop {
        epoll: Epoll::new().map_err(|e| Error::Setup("epoll_create", e))?,
        machine,
        listener,
        clients: Clients::new(),
        pending_input: Vec::new(),
        stdin_open: false,
        paused: run == RunState::Paused,
        last_pause_us,
        ram_in_place: cfg.mem_file.is_some(),
        watching: Vec::new(),
        raw,
        stdio_console: cfg.serial == SerialConfig::Stdio,
        exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
        argv: std::env::args().collect(),
        console_in: console_in
            .as_ref()
            .map_or(libc::STDIN_FILENO, |f| f.as_raw_fd()),
        control_path: cfg.control.clone(),
        disk_paths: cfg.disks.iter().map(|d| d.path.clone()).collect(),
        _console_in: console_in,
        signal_fd: signals.as_raw_fd(),
        pending: None,
    };
    lp.watch_devices()?;
    lp.add(exit_evt.as_raw_fd(), Token::Exit)?;
    lp.add(lp.machine.sleep_fd(), Token::Sleep)?;
    lp.add(signals.as_raw_fd(), Token::Signal)?;
    if let Some(l) = &lp.listener {
        lp.clients
            .watch_listener(&lp.epoll, l.as_raw_fd())
            .map_err(|e| Error::Setup("epoll_ctl", e))?;
    }
    // /dev/null and regular files cannot be polled (EPERM): then there is no input.
    lp.stdin_open =
        cfg.serial == SerialConfig::Stdio && lp.add(lp.console_in, Token::Stdin).is_ok();
    if let Some((fd, reply)) = greeting {
        lp.adopt_client(UnixStream::from(fd), &reply);
    }
    for fd in watchers {
        lp.adopt_watcher(UnixStream::from(fd));
    }
    if let Some((name, detail)) = event {
        lp.event(name, &detail);
    }
    let outcome = lp.serve(&signals, &exit_reason);
    lp.abandon_pending();
    match &outcome {
        Ok(o) => lp.last_event(o),
        Err(e) => lp.last_event(&Outcome::Guest(GuestExit::Failed(e.to_string()))),
    }
    if let Ok(o @ (Outcome::Saved | Outcome::Transferred)) = &outcome {
        // The guest lives on elsewhere, which also serves the control socket.
        // Leave at once: tearing the VM down (~20 ms of KVM freeing its page
        // tables) would only delay whoever waits for this process to end. The
        // terminal goes back to the user's mode after a save (no molt runs the
        // guest until the restart), and stays raw for the new process after a
        // transfer.
        if let Some(raw) = lp.raw.take() {
            if *o == Outcome::Transferred {
                raw.hand_over();
            }
        }
        log::info!(
            "{}",
            if *o == Outcome::Saved {
                "saved; exiting"
            } else {
                "handed over; exiting"
            }
        );
        std::mem::forget(socket_file);
        std::process::exit(0);
    }
    let stopped = lp.machine.vcpus.stop();
    drop(lp.raw.take());
    if let Err(e) = stopped {
        log::warn!("{e}");
    }
    outcome
}

/// Removes a file (the control socket) when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open_console(cfg: &SerialConfig) -> Result<Output, Error> {
    match cfg {
        SerialConfig::None => Ok(Output::Sink),
        // A duplicate of stdout, unbuffered: console bytes leave as the guest writes them.
        SerialConfig::Stdio => {
            // SAFETY: duplicating a descriptor we own (close-on-exec: an exec hands
            // over what it means to); the result is checked below.
            let fd = unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(Error::Setup("dup stdout", std::io::Error::last_os_error()));
            }
            // SAFETY: fd is a fresh descriptor owned by nothing else.
            Ok(Output::Fd(unsafe { File::from_raw_fd(fd) }))
        }
        // Appended to, never truncated: a restarted molt continues the same log.
        SerialConfig::File(path) => files::open("--serial file", path, Access::Append)
            .map(Output::Fd)
            .map_err(Error::File),
    }
}

fn signal_fd() -> Result<File, Error> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in TERMINATING_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // SAFETY: `set` is valid; a new descriptor is returned or -1.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(Error::Setup("signalfd", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is fresh and owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

struct Loop {
    epoll: Epoll,
    machine: Machine,
    listener: Option<UnixListener>,
    clients: Clients,
    /// Console input read from stdin that the UART had no room for yet.
    pending_input: Vec<u8>,
    stdin_open: bool,
    paused: bool,
    last_pause_us: u64,
    /// RAM lives in a --mem-file that outlives molt: a save leaves it there.
    ram_in_place: bool,
    /// Per virtio device, whether each of its extra fds is watched for input.
    watching: Vec<Vec<bool>>,
    raw: Option<RawMode>,
    stdio_console: bool,
    /// This binary and its argv, for cpr-exec's defaults.
    exe: PathBuf,
    argv: Vec<String>,
    /// Where console input comes from: stdin, or what a transfer handed over.
    console_in: RawFd,
    control_path: Option<PathBuf>,
    _console_in: Option<std::os::fd::OwnedFd>,
    /// The disks as named on argv (not the descriptors an update handed over).
    disk_paths: Vec<PathBuf>,
    /// Polled (not read) by the pause of a transfer: a signal aborts it.
    signal_fd: RawFd,
    /// The CPR command under way, if any.
    pending: Option<updates::Pending>,
}

enum Next {
    Continue,
    Stop(Outcome),
}

impl Loop {
    fn add(&self, fd: RawFd, token: Token) -> Result<(), Error> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token.encode()),
            )
            .map_err(|e| Error::Setup("epoll_ctl", e))
    }

    fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn serve(
        &mut self,
        signals: &File,
        exit_reason: &Mutex<Option<GuestExit>>,
    ) -> Result<Outcome, Error> {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let input_timeout = if self.pending_input.is_empty() {
                -1
            } else {
                INPUT_RETRY_MS
            };
            let timeout = earliest(input_timeout, self.clients.timeout_ms(Instant::now()));
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Setup("epoll_wait", e)),
            };
            if !self.pending_input.is_empty() {
                self.feed_console(&[]);
            }
            for ev in &events[..n] {
                let next = match Token::decode(ev.data()) {
                    Some(Token::Exit) => {
                        let why = lock(exit_reason);
                        Next::Stop(Outcome::Guest(why.clone().unwrap_or(GuestExit::PowerOff)))
                    }
                    Some(Token::Signal) => Next::Stop(Outcome::Signal(read_signal(signals))),
                    Some(Token::Stdin) => {
                        self.read_stdin();
                        Next::Continue
                    }
                    Some(Token::Listener) => {
                        self.accept();
                        Next::Continue
                    }
                    Some(Token::Update) => self.finish_pending(),
                    Some(Token::Sleep) => {
                        self.guest_sleeps();
                        Next::Continue
                    }
                    Some(Token::Queue { device, index }) => {
                        self.virtio_event(device, |dev| dev.queue_notify(index));
                        Next::Continue
                    }
                    Some(Token::DeviceFd { device, index }) => {
                        self.virtio_event(device, |dev| dev.device_mut().extra_fd_ready(index));
                        Next::Continue
                    }
                    Some(Token::Client(slot)) => {
                        self.clients.event(&self.epoll, slot, Instant::now());
                        Next::Continue
                    }
                    None => Next::Continue,
                };
                if let Next::Stop(outcome) = next {
                    return Ok(outcome);
                }
            }
            if let Next::Stop(outcome) = self.serve_clients() {
                return Ok(outcome);
            }
        }
    }

    /// Registers every queue notifier and device fd (the latter without interest
    /// until the device wants input).
    fn watch_devices(&mut self) -> Result<(), Error> {
        for (d, dev) in self.machine.virtio.iter().enumerate() {
            let dev = lock(dev);
            for (q, (evt, _)) in dev.notifiers().into_iter().enumerate() {
                self.add(
                    evt.as_raw_fd(),
                    Token::Queue {
                        device: d,
                        index: q,
                    },
                )?;
            }
            let extra = dev.device().extra_fds();
            for (n, fd) in extra.iter().enumerate() {
                self.epoll
                    .ctl(
                        ControlOperation::Add,
                        *fd,
                        EpollEvent::new(EventSet::empty(), device_fd(d, n)),
                    )
                    .map_err(|e| Error::Setup("epoll_ctl", e))?;
            }
            self.watching.push(vec![false; extra.len()]);
        }
        for d in 0..self.machine.virtio.len() {
            lock(&self.machine.virtio[d]).kick_all();
            self.sync_interest(d);
        }
        Ok(())
    }

    fn virtio_event(&mut self, d: usize, event: impl FnOnce(&mut crate::virtio::pci::VirtioPci)) {
        let Some(shared) = self.machine.virtio.get(d) else {
            return;
        };
        event(&mut lock(shared));
        self.sync_interest(d);
    }

    /// Input is watched only while the device can take it: no busy loop on a
    /// tap whose guest posted no receive buffers.
    fn sync_interest(&mut self, d: usize) {
        let dev = lock(&self.machine.virtio[d]);
        let fds = dev.device().extra_fds();
        for (n, fd) in fds.iter().enumerate() {
            let want = dev.device().extra_fd_wanted(n);
            if self.watching[d][n] != want {
                let events = if want {
                    EventSet::IN
                } else {
                    EventSet::empty()
                };
                let ev = EpollEvent::new(events, device_fd(d, n));
                if self.epoll.ctl(ControlOperation::Modify, *fd, ev).is_ok() {
                    self.watching[d][n] = want;
                }
            }
        }
    }

    fn read_stdin(&mut self) {
        let mut buf = [0u8; 256];
        // SAFETY: reading into a local buffer of the given length.
        let n = unsafe { libc::read(self.console_in, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => self.feed_console(&buf[..n as usize]),
            0 => self.close_stdin(),
            _ => {
                let e = std::io::Error::last_os_error();
                if !matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) {
                    self.close_stdin();
                }
            }
        }
    }

    fn close_stdin(&mut self) {
        if self.stdin_open {
            self.remove(self.console_in);
            self.stdin_open = false;
        }
    }

    /// Queues `input` (after older pending input) into the UART. While some is
    /// left over, stdin is not read: the guest sets the pace.
    fn feed_console(&mut self, input: &[u8]) {
        self.pending_input.extend_from_slice(input);
        let taken = {
            let mut serial = self
                .machine
                .bus
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            serial.enqueue(&self.pending_input)
        };
        self.pending_input.drain(..taken);
        if self.stdin_open {
            let events = if self.pending_input.is_empty() {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                self.console_in,
                EpollEvent::new(events, Token::Stdin.encode()),
            );
        }
    }

    /// Carries out one command: the reply line, and whether molt must stop.
    fn execute(&mut self, cmd: Command, slot: usize) -> (String, Option<Outcome>) {
        match cmd {
            Command::Status => (self.status(), None),
            Command::Pause => {
                // A suspended guest's vCPUs are stopped already.
                if self.paused || self.machine.is_suspended() {
                    return ("ok".into(), None);
                }
                match self.machine.vcpus.pause() {
                    Ok(()) => {
                        self.paused = true;
                        log::info!("guest paused");
                        self.event("paused", "");
                        ("ok".into(), None)
                    }
                    Err(e) => {
                        // Whatever did stop runs again: a failed pause changes nothing.
                        self.machine.vcpus.resume();
                        (format!("error: pause failed: {e}"), None)
                    }
                }
            }
            Command::Resume => {
                if self.machine.is_suspended() {
                    let why = "the guest is suspended (ACPI S3): `wakeup` wakes it";
                    return (format!("error: {why}"), None);
                }
                self.machine.vcpus.resume();
                let was_paused = std::mem::replace(&mut self.paused, false);
                if was_paused {
                    log::info!("guest resumed");
                    self.event("resumed", "");
                }
                ("ok".into(), None)
            }
            Command::Wakeup => (self.wakeup(), None),
            Command::Quit => ("ok".into(), Some(Outcome::Quit)),
            Command::Events => match self.clients.add_watcher(&self.epoll, slot) {
                Ok(()) => (
                    format!(
                        "ok events state={} version={}",
                        self.run_state().name(),
                        cpr::VERSION
                    ),
                    None,
                ),
                Err(why) => (format!("error: {why}"), None),
            },
            Command::CprSave { path, restorer } => {
                self.update(slot, Request::Save { path, restorer })
            }
            Command::CprExec { binary, args } => self.update(slot, Request::Exec { binary, args }),
            Command::CprTransfer { path, max_pause } => {
                self.update(slot, Request::Transfer { path, max_pause })
            }
        }
    }

    /// What a save records, and what the guest is after the update.
    fn run_state(&self) -> RunState {
        if self.machine.is_suspended() {
            RunState::Suspended
        } else if self.paused {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// The guest wrote its S3 sleep type: its vCPUs stop until `wakeup`.
    fn guest_sleeps(&mut self) {
        if !self.machine.take_sleep_request() || self.machine.is_suspended() {
            return;
        }
        match self.machine.suspend() {
            Ok(()) => {
                // A suspended guest is not also paused: `wakeup` runs it.
                self.paused = false;
                log::info!("guest suspended to RAM (ACPI S3); `wakeup` wakes it");
                self.event("suspended", "");
            }
            Err(e) => {
                // Whatever did stop runs again, unless the user had paused it.
                if !self.paused {
                    self.machine.vcpus.resume();
                }
                log::error!("the guest asked to suspend (ACPI S3), its vCPUs did not stop: {e}");
            }
        }
    }

    /// `wakeup`: the guest resumes at its waking vector, or stays suspended
    /// and the reply says why.
    fn wakeup(&mut self) -> String {
        if !self.machine.is_suspended() {
            return format!(
                "error: the guest is not suspended (state={})",
                self.run_state().name()
            );
        }
        match self.machine.wakeup() {
            Ok(waking) => {
                log::info!("guest woken from ACPI S3: {waking}");
                self.event("woke", "");
                "ok".into()
            }
            Err(e) => {
                log::warn!("wakeup failed, the guest stays suspended: {e}");
                format!("error: wakeup: {e}; the guest stays suspended")
            }
        }
    }

    /// Tells every watcher that `name` happened; the line carries the guest's
    /// state after it and `detail`.
    fn event(&mut self, name: &str, detail: &str) {
        let line = control::event_line(name, self.run_state().name(), detail);
        self.clients.broadcast(&self.epoll, &line, Instant::now());
    }

    /// molt ends with `outcome` (but for an update: the guest lives on): the
    /// watchers' last line, written if their sockets take it.
    fn last_event(&mut self, outcome: &Outcome) {
        let (name, detail) = match outcome {
            Outcome::Guest(GuestExit::PowerOff) => ("power-off", String::new()),
            Outcome::Guest(GuestExit::Reset) => ("reset", String::new()),
            Outcome::Guest(GuestExit::Failed(why)) => ("failed", format!("reason={why}")),
            Outcome::Quit => ("quit", String::new()),
            Outcome::Signal(n) => ("signal", format!("signal={n}")),
            // The connections end with this process: what waits goes now.
            Outcome::Saved => {
                self.clients.flush_watchers();
                return;
            }
            // The new process writes to them now: nothing more from here.
            Outcome::Transferred => return,
        };
        let line = control::event_line(name, "off", &detail);
        self.clients.broadcast(&self.epoll, &line, Instant::now());
        self.clients.flush_watchers();
    }

    fn status(&self) -> String {
        format!(
            "ok state={} vcpus={} mem={} version={} pid={} last_pause_us={}",
            self.run_state().name(),
            self.machine.vcpus.count(),
            self.machine.mem_size(),
            cpr::VERSION,
            std::process::id(),
            self.last_pause_us,
        )
    }
}

/// The earlier of two epoll timeouts in ms, where -1 means none.
fn earliest(a: i32, b: i32) -> i32 {
    match (a, b) {
        (-1, t) | (t, -1) => t,
        (a, b) => a.min(b),
    }
}

fn device_fd(device: usize, index: usize) -> u64 {
    Token::DeviceFd { device, index }.encode()
}

fn read_signal(signals: &File) -> i32 {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    let mut f = signals;
    match f.read(&mut info) {
        Ok(n) if n == info.len() => i32::from_ne_bytes([info[0], info[1], info[2], info[3]]),
        _ => libc::SIGTERM,
    }
}
