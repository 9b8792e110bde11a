//! Checkpoint/restore for live update (SPEC.md, "The three CPR modes").
//!
//! The CPR sequence, reboot mode:
//! 1. `cpr-save PATH`: pause the vCPUs (the last one stopping starts the pause),
//!    `Machine::save` (devices, VM, vCPUs), write PATH atomically (`reboot`),
//!    reply, exit 0. A failure resumes the guest and replies `error: ...`.
//! 2. `molt run <same args> --incoming file:PATH`: decode and check the state
//!    (against argv, and against this host's KVM: `vm::host_cpu`), rebuild the
//!    machine around the same RAM (in place, or read back from the file),
//!    restore the machine, start the vCPUs (the pause ends).
//!
//! Exec mode:
//! 1. `cpr-exec [BINARY [ARG...]]`: check that BINARY is a molt reading this
//!    state format (`BINARY version`, while the guest still runs), pause, save,
//!    hand the state and descriptors to `exec` (sealed memfd, CLOEXEC cleared).
//!    If exec fails, the guest resumes here and the reply says why.
//! 2. The new image (`--incoming fd:N`) adopts the descriptors, restores and
//!    replies on the inherited client connection. If it cannot resume, it execs
//!    back to the previous image with the same state, which resumes the guest
//!    and replies with the error: rollback.
//! 3. If the new image dies before it runs the guest, the guardian started
//!    before the pause (`guardian`) does that rollback instead, from its own
//!    process: the guest then runs under a new PID.

pub mod check;
pub mod exec;
pub mod fds;
pub mod guardian;
pub mod inspect;
pub mod reboot;
pub mod state;
pub mod transfer;
pub mod wait;

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::args::RunConfig;
use crate::devices::serial::Output;
use crate::virtio::block::Identity;
use crate::vm::host_cpu::HostCpu;
use crate::vm::memory::GuestRam;
use crate::vm::vcpu::ExitSink;
use crate::vm::{self, Machine};
use fds::{Adopted, FdKind};
use state::{CprState, RamLocation, RunState};

#[derive(Debug)]
pub enum Error {
    Vm(vm::Error),
    File(reboot::Error),
    NeedsMemFile(PathBuf),
    Memory(vm::memory::Error),
    Exec(exec::Error),
    Guardian(guardian::Error),
    Probe(PathBuf, String),
    Handover(String),
    Transfer(transfer::Error),
    RamMismatch {
        now: u32,
        saved: u32,
    },
    /// A disk's name no longer leads to the image molt has open.
    DiskGone(PathBuf, &'static str),
    /// An open disk's identity could not be read for the state.
    DiskIdentity(usize, std::io::Error),
    /// A restart's disk is not the image the state was saved with.
    DiskChanged {
        index: usize,
        path: PathBuf,
        saved: Identity,
        now: Result<Identity, String>,
        /// The saved disk whose image this is, if another.
        swapped_with: Option<usize>,
    },
    HostCpu(PathBuf, vm::host_cpu::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Vm(e) => e.fmt(f),
            Error::File(e) => e.fmt(f),
            Error::NeedsMemFile(p) => write!(
                f,
                "{} keeps guest RAM in the --mem-file it was saved with: pass that --mem-file",
                p.display()
            ),
            Error::Memory(e) => e.fmt(f),
            Error::Exec(e) => e.fmt(f),
            Error::Guardian(e) => e.fmt(f),
            Error::Probe(p, why) => write!(f, "{} cannot take the guest: {why}", p.display()),
            Error::Handover(why) => write!(f, "handover: {why}"),
            Error::Transfer(e) => e.fmt(f),
            Error::DiskGone(p, why) => write!(
                f,
                "disk {} {why}: a restart would not find what the guest wrote \
                 (cpr-exec and cpr-transfer carry the open image)",
                p.display()
            ),
            Error::DiskIdentity(i, e) => write!(f, "disk {i}: cannot read its size and inode: {e}"),
            Error::DiskChanged {
                index,
                path,
                saved,
                now,
                swapped_with,
            } => {
                write!(
                    f,
                    "disk {index} ({}) is not the image the guest was saved with ({saved}): ",
                    path.display()
                )?;
                match (now, swapped_with) {
                    (Err(e), _) => write!(f, "cannot open it: {e}"),
                    (Ok(_), Some(j)) => {
                        write!(
                            f,
                            "it is the image saved as disk {j}: disks swapped on argv?"
                        )
                    }
                    (Ok(n), None) if n.dev == saved.dev && n.ino == saved.ino => {
                        write!(f, "it was resized to {} bytes", n.size)
                    }
                    (Ok(n), None) => write!(f, "it is another file ({n}): replaced?"),
                }
            }
            Error::RamMismatch { now, saved } => write!(
                f,
                "guest RAM is not the RAM that was saved (page sample CRC {now:#010x}, \
                 saved {saved:#010x}): wrong --mem-file?"
            ),
            Error::HostCpu(p, e) => write!(
                f,
                "the guest saved in {} cannot run on this host (the file is left as it is): {e}",
                p.display()
            ),
        }
    }
}

/// CLOCK_REALTIME in ns: the one clock both sides of a restart (or kexec) share.
fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `molt version`: the release and the state formats it reads.
pub fn version_line() -> String {
    format!(
        "molt {} state-formats={}",
        crate::event_loop::VERSION,
        state::formats()
    )
}

/// How long a new binary may take to answer `version`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a probe's output that is read.
const PROBE_OUTPUT: usize = 4096;

/// Runs `binary version`: it must be a molt that reads this state format. A
/// missing file, a binary that fails, hangs or exits at once, or an older
/// format is refused here, while the guest is still running. Runs on a worker
/// thread: `stop` (readable) abandons it. The probe runs in a process group of
/// its own, and nothing of that group outlives this call.
pub fn probe(binary: &Path, stop: RawFd) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let err = |why: String| Error::Probe(binary.into(), why);
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
        Err(wait::Stop::Io(std::io::Error::last_os_error()))
    } else {
        // SAFETY: a fresh descriptor owned by nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        wait::until(
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
        Err(wait::Stop::TimedOut) => {
            return Err(err(format!(
                "`version` did not answer within {}",
                wait::human(PROBE_TIMEOUT)
            )))
        }
        Err(wait::Stop::Interrupted) => return Err(err("interrupted by a signal or quit".into())),
        Err(wait::Stop::Io(e)) => return Err(err(format!("waiting for `version`: {e}"))),
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
    let formats = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("state-formats="))
        .ok_or_else(|| err(format!("not a molt: `version` said {:?}", out.trim())))?;
    if !formats.split(',').any(|v| v == state::VERSION.to_string()) {
        return Err(err(format!(
            "it reads state formats {formats}, this state is format {}",
            state::VERSION
        )));
    }
    Ok(())
}

/// Exec mode, step 1, on a paused machine: saves it and execs `binary`, which
/// `guardian` watches. Returns only on failure; the caller then releases the
/// guardian and resumes the guest.
#[allow(clippy::too_many_arguments)]
pub fn exec_out(
    machine: &Machine,
    binary: &Path,
    argv: &[String],
    listener: Option<RawFd>,
    client: RawFd,
    console_in: Option<RawFd>,
    stopped_at_ns: u64,
    guardian: &guardian::Guardian,
    run: RunState,
) -> Error {
    let state = match snapshot(machine, in_place(machine), stopped_at_ns, run) {
        Ok(s) => s,
        Err(e) => return e,
    };
    // Our own image, by descriptor: a rollback must not depend on its path.
    let me = match std::fs::File::open("/proc/self/exe") {
        Ok(f) => f,
        Err(e) => return Error::Handover(format!("cannot open /proc/self/exe: {e}")),
    };
    let mut fds = transfer_fds(machine, listener, client, console_in);
    fds.push((FdKind::PreviousExe, me.as_raw_fd()));
    fds.push((FdKind::Guardian, guardian.fd()));
    fds.extend(
        machine
            .kvm_fds()
            .into_iter()
            .map(|fd| (FdKind::StaleKvm, fd)),
    );
    let header = exec::ExecHeader {
        previous_exe: std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        previous_argv: std::env::args().collect(),
        ..Default::default()
    };
    Error::Exec(exec::exec(
        exec::Target::Path(binary),
        argv,
        &state,
        &fds,
        header,
        Some(guardian),
    ))
}

/// CLOCK_REALTIME now, in ns: callers record it when the last vCPU stopped.
pub fn now_ns() -> u64 {
    realtime_ns()
}

fn snapshot(
    machine: &Machine,
    ram: RamLocation,
    stopped_at_ns: u64,
    run: RunState,
) -> Result<CprState, Error> {
    let mut disks = heapless::Vec::new();
    for (i, fd) in backends(machine).0.into_iter().enumerate() {
        // SAFETY: the disk's own open descriptor, borrowed for this call only;
        // ManuallyDrop keeps it open.
        let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        let id = Identity::of(&file).map_err(|e| Error::DiskIdentity(i, e))?;
        // The shape bounds the disks to the list's capacity.
        let _ = disks.push(id);
    }
    Ok(CprState {
        writer: heapless::String::try_from(crate::event_loop::VERSION).unwrap_or_default(),
        ram,
        stopped_at_ns,
        machine: machine.save().map_err(Error::Vm)?,
        run,
        disks,
    })
}

/// Reboot mode reopens the disks by name: each must be the image the state
/// was saved with (a state of format 1 did not record them).
fn check_disk_identities(cfg: &RunConfig, saved: &[Identity]) -> Result<(), Error> {
    if saved.is_empty() {
        return Ok(());
    }
    let now: Vec<Result<Identity, String>> = cfg
        .disks
        .iter()
        .map(|d| {
            std::fs::File::open(&d.path)
                .and_then(|f| Identity::of(&f))
                .map_err(|e| e.to_string())
        })
        .collect();
    for (index, (disk, (saved_id, now_id))) in
        cfg.disks.iter().zip(saved.iter().zip(now)).enumerate()
    {
        if now_id.as_ref() == Ok(saved_id) {
            continue;
        }
        let swapped_with = now_id
            .as_ref()
            .ok()
            .and_then(|n| saved.iter().position(|s| s == n));
        return Err(Error::DiskChanged {
            index,
            path: disk.path.clone(),
            saved: *saved_id,
            now: now_id,
            swapped_with,
        });
    }
    Ok(())
}

/// The disk and tap descriptors, each in argv order.
fn backends(machine: &Machine) -> (Vec<RawFd>, Vec<RawFd>) {
    let (mut disks, mut taps) = (Vec::new(), Vec::new());
    for d in &machine.virtio {
        let d = crate::pci::lock(d);
        let dev = d.device();
        if dev.device_type() == crate::virtio::TYPE_NET {
            taps.push(dev.backend_fd());
        } else {
            disks.push(dev.backend_fd());
        }
    }
    (disks, taps)
}

/// The guest's descriptors by slot: RAM, disks and taps in argv order, then the
/// control socket and the client that asked.
pub fn handover_fds(
    machine: &Machine,
    listener: Option<RawFd>,
    client: RawFd,
) -> Vec<(FdKind, RawFd)> {
    let mut fds = vec![(FdKind::GuestRam, machine.ram.file().as_raw_fd())];
    let (disks, taps) = backends(machine);
    fds.extend((0u8..).zip(disks).map(|(i, fd)| (FdKind::Disk(i), fd)));
    fds.extend((0u8..).zip(taps).map(|(i, fd)| (FdKind::Tap(i), fd)));
    fds.extend(listener.map(|l| (FdKind::ControlListener, l)));
    fds.push((FdKind::Client, client));
    fds
}

/// Reboot mode reopens the disks by name: each of `paths` (argv order) must
/// still name the image this process has open, neither deleted nor replaced.
pub fn check_disks_named(machine: &Machine, paths: &[PathBuf]) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    for (path, fd) in paths.iter().zip(backends(machine).0) {
        // SAFETY: stat is plain data, filled in by fstat on our open disk.
        let mut open: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is the disk's open descriptor; `open` is valid for writes.
        if unsafe { libc::fstat(fd, &mut open) } < 0 {
            return Err(Error::DiskGone(path.clone(), "cannot be checked"));
        }
        let why = match std::fs::metadata(path) {
            Ok(m) if m.dev() == open.st_dev && m.ino() == open.st_ino => continue,
            Ok(_) => "now names another file than the image molt has open",
            Err(_) if open.st_nlink == 0 => "was deleted while molt ran",
            Err(_) => "was moved away while molt ran",
        };
        return Err(Error::DiskGone(path.clone(), why));
    }
    Ok(())
}

/// Exec mode, step 2: what the new image received.
pub struct ExecIncoming {
    header: exec::ExecHeader,
    state: CprState,
    adopted: Adopted,
}

impl ExecIncoming {
    pub fn take_listener(&mut self) -> Option<OwnedFd> {
        self.adopted.listener.take()
    }

    /// The control socket taken above, for a rollback to hand on: the guardian
    /// holds it too, so the previous image could not bind its path again.
    pub fn give_back_listener(&mut self, listener: OwnedFd) {
        self.adopted.listener = Some(listener);
    }

    pub fn take_console(&mut self) -> (Option<std::fs::File>, Option<OwnedFd>) {
        (
            self.adopted.console_out.take(),
            self.adopted.console_in.take(),
        )
    }

    /// The rollback's error to report, when this image is the previous one.
    pub fn failure(&self) -> Option<&str> {
        self.header.failure.as_deref()
    }
}

/// Reads the exec message in `fd` and adopts the descriptors it names.
pub fn receive_exec(cfg: &RunConfig, fd: RawFd) -> Result<ExecIncoming, Error> {
    let (header, state) = exec::receive(fd).map_err(Error::Exec)?;
    let adopted = fds::adopt(
        &header.table.kinds,
        &header.table.numbers,
        cfg.disks.len(),
        cfg.nets.len(),
    )
    .map_err(Error::Handover)?;
    Ok(ExecIncoming {
        header,
        state,
        adopted,
    })
}

/// Resumes the guest from an exec handover. The adopted descriptors stay open
/// until this returns, so a failure can still roll back with them.
pub fn resume_exec(
    inc: &mut ExecIncoming,
    cfg: &RunConfig,
    console: Output,
    exit: ExitSink,
) -> Result<(Resumed, Option<OwnedFd>), Error> {
    let start = Instant::now();
    let (cfg, ram) = adopted_config(cfg, &inc.adopted)?;
    check_ram(&inc.state, &ram)?;
    // The guest is about to run here: the guardian (if any) must leave now, or
    // a later death of this image would make it resume an older copy. Until
    // then the line stays in `inc`: a rollback hands it on.
    let line = &mut inc.adopted.guardian;
    let resumed = resume(&cfg, &inc.state, ram, console, exit, start, || {
        if let Some(line) = line.take() {
            guardian::release(line);
        }
    })?;
    // The guest runs: now let KVM tear the old VM down, off the main thread.
    let stale = std::mem::take(&mut inc.adopted.stale_kvm);
    if !stale.is_empty() {
        let _ = std::thread::Builder::new()
            .name("old-vm-release".into())
            .spawn(move || drop(stale));
    }
    Ok((resumed, inc.adopted.client.take()))
}

/// `cfg` rewritten to use handed-over descriptors instead of names: RAM and
/// disks reopened through /proc/self/fd (a fresh open file description of the
/// same file), taps adopted by duplicate (the original stays with `a`, for a
/// rollback). Returns the config and the mapped RAM.
fn adopted_config(cfg: &RunConfig, a: &Adopted) -> Result<(RunConfig, GuestRam), Error> {
    let mut cfg = cfg.clone();
    let ram = a
        .ram
        .as_ref()
        .ok_or_else(|| Error::Handover("no RAM".into()))?;
    let path = fds::proc_path(ram);
    let ram = GuestRam::adopt(cfg.mem_size, &path).map_err(Error::Memory)?;
    cfg.mem_file = Some(path);
    for (d, f) in cfg.disks.iter_mut().zip(&a.disks) {
        d.path = fds::proc_path(f);
    }
    for (n, t) in cfg.nets.iter_mut().zip(&a.taps) {
        let dup = t
            .try_clone()
            .map_err(|e| Error::Handover(format!("dup tap: {e}")))?;
        n.backend = crate::args::NetBackend::Fd(dup.into_raw_fd());
    }
    Ok((cfg, ram))
}

/// The guest's descriptors for a transfer: those of an exec plus the console,
/// which the new process (started elsewhere) would not otherwise have.
pub fn transfer_fds(
    machine: &Machine,
    listener: Option<RawFd>,
    client: RawFd,
    console_in: Option<RawFd>,
) -> Vec<(FdKind, RawFd)> {
    let mut fds = handover_fds(machine, listener, client);
    let out = crate::pci::lock(&machine.bus.serial).output_fd();
    fds.extend(out.map(|fd| (FdKind::ConsoleOut, fd)));
    fds.extend(console_in.map(|fd| (FdKind::ConsoleIn, fd)));
    fds
}

/// Transfer mode, old side, once the new process is READY. `pause` and
/// `resume` stop and restart the vCPUs; the guest stays paused at most
/// `max_pause` after STATE is sent, and `stop` (the signalfd) aborts. On Ok the
/// new process runs the guest and this one must only exit; on Err the guest
/// runs here as before and the new process was told FAIL.
pub fn transfer_out(
    machine: &Machine,
    mut out: transfer::Outgoing,
    max_pause: Duration,
    stop: RawFd,
    run: RunState,
    pause: impl FnOnce() -> Result<u64, String>,
    resume: impl FnOnce(),
) -> Result<(), Error> {
    let stopped_at_ns = match pause() {
        Ok(t) => t,
        Err(why) => {
            out.fail(&why);
            return Err(Error::Handover(why));
        }
    };
    let sent = snapshot(machine, in_place(machine), stopped_at_ns, run)
        .and_then(|s| state::encode(&s).map_err(|e| Error::Handover(e.to_string())))
        .and_then(|bytes| {
            out.send_state(bytes, max_pause, stop)
                .map_err(Error::Transfer)
        });
    match sent {
        Ok(()) => out.go().map_err(|e| {
            resume();
            Error::Transfer(e)
        }),
        Err(e) => {
            out.fail(&e.to_string());
            resume();
            Err(e)
        }
    }
}

/// Transfer mode, new side: what arrived with HELLO.
pub struct TransferIncoming {
    link: transfer::Incoming,
    adopted: Adopted,
}

impl TransferIncoming {
    pub fn take_listener(&mut self) -> Option<OwnedFd> {
        self.adopted.listener.take()
    }

    pub fn take_console(&mut self) -> (Option<std::fs::File>, Option<OwnedFd>) {
        (
            self.adopted.console_out.take(),
            self.adopted.console_in.take(),
        )
    }
}

/// Waits on `path` for the old process (None if `stop` fired first) and adopts
/// what it hands over.
pub fn receive_transfer(
    cfg: &RunConfig,
    path: &Path,
    stop: RawFd,
) -> Result<Option<TransferIncoming>, Error> {
    let Some(mut link) = transfer::accept(path, stop).map_err(Error::Transfer)? else {
        return Ok(None);
    };
    log::info!("taking the guest over from molt {}", link.peer_version);
    let kinds = std::mem::take(&mut link.kinds);
    let fds: Vec<RawFd> = std::mem::take(&mut link.fds)
        .into_iter()
        .map(IntoRawFd::into_raw_fd)
        .collect();
    match fds::adopt(&kinds, &fds, cfg.disks.len(), cfg.nets.len()) {
        Ok(adopted) => Ok(Some(TransferIncoming { link, adopted })),
        Err(why) => {
            link.fail(&why);
            Err(Error::Handover(why))
        }
    }
}

/// Transfer mode, new side: prepares the machine while the old process still
/// runs the guest, loads the state it then sends, and runs the guest on GO.
pub fn resume_transfer(
    mut t: TransferIncoming,
    cfg: &RunConfig,
    console: Output,
    exit: ExitSink,
) -> Result<(Resumed, Option<OwnedFd>), Error> {
    let prepared = adopted_config(cfg, &t.adopted)
        .and_then(|(cfg, ram)| Machine::prepare(&cfg, ram, console).map_err(Error::Vm));
    let loaded = prepared.and_then(|prepared| {
        let (bytes, max_pause) = t.link.ready().map_err(Error::Transfer)?;
        let start = Instant::now();
        let state = state::decode(&bytes).map_err(|e| Error::Handover(format!("state: {e}")))?;
        let restored = prepared.restore(&state.machine).map_err(Error::Vm)?;
        Ok((restored, state.stopped_at_ns, state.run, start, max_pause))
    });
    // Without GO nothing runs: a failure, a signal or silence ends it here.
    let go = loaded.and_then(|(restored, stopped_at_ns, run, start, max_pause)| {
        t.link.restored(max_pause).map_err(Error::Transfer)?;
        Ok((restored, stopped_at_ns, run, start))
    });
    let (restored, stopped_at_ns, run, start) = match go {
        Ok(r) => r,
        Err(e) => {
            t.link.fail(&e.to_string());
            return Err(e);
        }
    };
    let machine = restored
        .start(exit, run == RunState::Paused)
        .map_err(Error::Vm)?;
    let resumed = Resumed {
        machine,
        restore_us: start.elapsed().as_micros() as u64,
        pause_us: realtime_ns().saturating_sub(stopped_at_ns) / 1000,
        run,
    };
    Ok((resumed, t.adopted.client.take()))
}

/// The new image could not resume: exec the previous one with the same state
/// and descriptors, telling it why. Returns only if that exec fails too.
pub fn rollback(inc: &ExecIncoming, why: &str) -> Error {
    let a = &inc.adopted;
    let mut fds = vec![];
    fds.extend(a.ram.as_ref().map(|f| (FdKind::GuestRam, f.as_raw_fd())));
    for (i, f) in a.disks.iter().enumerate() {
        fds.push((FdKind::Disk(i as u8), f.as_raw_fd()));
    }
    for (i, f) in a.taps.iter().enumerate() {
        fds.push((FdKind::Tap(i as u8), f.as_raw_fd()));
    }
    fds.extend(
        a.listener
            .as_ref()
            .map(|f| (FdKind::ControlListener, f.as_raw_fd())),
    );
    fds.extend(a.client.as_ref().map(|f| (FdKind::Client, f.as_raw_fd())));
    // The image execed next releases the guardian once it runs the guest.
    fds.extend(
        a.guardian
            .as_ref()
            .map(|f| (FdKind::Guardian, f.as_raw_fd())),
    );
    let header = exec::ExecHeader {
        failure: Some(why.to_string()),
        ..inc.header.clone()
    };
    fds.extend(
        a.console_out
            .as_ref()
            .map(|f| (FdKind::ConsoleOut, f.as_raw_fd())),
    );
    fds.extend(
        a.console_in
            .as_ref()
            .map(|f| (FdKind::ConsoleIn, f.as_raw_fd())),
    );
    let target = match &a.previous_exe {
        Some(f) => exec::Target::Fd(f.as_raw_fd()),
        None => exec::Target::Path(Path::new(&inc.header.previous_exe)),
    };
    Error::Exec(exec::exec(
        target,
        &inc.header.previous_argv,
        &inc.state,
        &fds,
        header,
        None,
    ))
}

/// What a successful save reports.
pub struct Saved {
    pub bytes: u64,
    pub save_us: u64,
}

/// Reboot mode, step 1, on a paused machine: saves it to `path`.
pub fn save_to_file(
    machine: &Machine,
    path: &Path,
    ram_in_place: bool,
    stopped_at_ns: u64,
    run: RunState,
) -> Result<Saved, Error> {
    let start = Instant::now();
    let location = if ram_in_place {
        in_place(machine)
    } else {
        RamLocation::InStateFile
    };
    let state = snapshot(machine, location, stopped_at_ns, run)?;
    let bytes = reboot::save(path, &state, &machine.ram).map_err(Error::File)?;
    Ok(Saved {
        bytes,
        save_us: start.elapsed().as_micros() as u64,
    })
}

/// What a successful resume reports.
pub struct Resumed {
    pub machine: Machine,
    /// Reading the state and rebuilding the machine, in this process.
    pub restore_us: u64,
    /// Last vCPU stopped in the old process to the vCPUs running here.
    pub pause_us: u64,
    /// Paused if the guest was paused when saved: its vCPUs wait for `resume`.
    pub run: RunState,
}

/// Reboot mode, step 2, first half: the state in a file, read and checked.
pub struct FileIncoming {
    path: PathBuf,
    state: CprState,
    /// The file after the state: the RAM section, or its end.
    rest: std::io::BufReader<std::fs::File>,
    start: Instant,
}

/// Reads the state in `path` and checks it against argv and this host's KVM,
/// before anything else is opened or created: a refused state leaves the file,
/// the console and `--mem-file` as they were, and the error says why.
pub fn receive_file(cfg: &RunConfig, path: &Path) -> Result<FileIncoming, Error> {
    let start = Instant::now();
    let (state, mut rest) = reboot::load_state(path).map_err(Error::File)?;
    let diff = vm::Shape::argv_differences(cfg, &state.machine.shape);
    if !diff.is_empty() {
        return Err(Error::Vm(vm::Error::Mismatch(diff.join("; "))));
    }
    if let RamLocation::InPlace { .. } = state.ram {
        if cfg.mem_file.is_none() {
            return Err(Error::NeedsMemFile(path.into()));
        }
        reboot::expect_end(path, &mut rest).map_err(Error::File)?;
    }
    check_disk_identities(cfg, &state.disks)?;
    // `Prepared::restore` checks again, for every mode; here it runs before
    // RAM is mapped or loaded.
    HostCpu::open()
        .and_then(|host| host.check(state.machine.vcpus.iter().map(|v| &**v)))
        .map_err(|e| Error::HostCpu(path.into(), e))?;
    Ok(FileIncoming {
        path: path.into(),
        state,
        rest,
        start,
    })
}

/// Reboot mode, step 2: resumes the machine saved in the file.
pub fn resume_from_file(
    inc: FileIncoming,
    cfg: &RunConfig,
    console: Output,
    exit: ExitSink,
) -> Result<Resumed, Error> {
    let FileIncoming {
        path,
        state,
        mut rest,
        start,
    } = inc;
    let ram = GuestRam::create(cfg.mem_size, cfg.mem_file.as_deref()).map_err(Error::Memory)?;
    if state.ram == RamLocation::InStateFile {
        reboot::load_ram(&path, &mut rest, &ram).map_err(Error::File)?;
    }
    check_ram(&state, &ram)?;
    resume(cfg, &state, ram, console, exit, start, || {})
}

/// RAM kept in place must be the RAM that was saved.
fn check_ram(state: &CprState, ram: &GuestRam) -> Result<(), Error> {
    if let RamLocation::InPlace { sample_crc } = state.ram {
        let now = ram.sample_crc();
        if now != sample_crc {
            return Err(Error::RamMismatch {
                now,
                saved: sample_crc,
            });
        }
    }
    Ok(())
}

fn in_place(machine: &Machine) -> RamLocation {
    RamLocation::InPlace {
        sample_crc: machine.ram.sample_crc(),
    }
}

/// Rebuilds the machine around `ram` and loads `state`; `before_start` runs
/// once nothing can fail any more but the vCPUs, just before they start.
fn resume(
    cfg: &RunConfig,
    state: &CprState,
    ram: GuestRam,
    console: Output,
    exit: ExitSink,
    start: Instant,
    before_start: impl FnOnce(),
) -> Result<Resumed, Error> {
    let restored = Machine::prepare(cfg, ram, console)
        .and_then(|p| p.restore(&state.machine))
        .map_err(Error::Vm)?;
    before_start();
    let machine = restored
        .start(exit, state.run == RunState::Paused)
        .map_err(Error::Vm)?;
    Ok(Resumed {
        machine,
        restore_us: start.elapsed().as_micros() as u64,
        pause_us: realtime_ns().saturating_sub(state.stopped_at_ns) / 1000,
        run: state.run,
    })
}
