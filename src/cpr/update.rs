//! The sending side of an update: what `cpr-save`, `cpr-exec` and
//! `cpr-transfer` do, one function per mode, each the numbered sequence of its
//! steps. The event loop hands a command in (`start`) and sends back the reply
//! it gets. Exec and transfer first do their slow part on a worker thread while
//! the guest runs (probing, hand-shaking); the loop keeps serving meanwhile and
//! calls `Update::finish` once the worker is done, which does the rest - the
//! pause - on the loop's thread.
//!
//! Whatever fails before the guest runs elsewhere, the guest resumes here (if
//! the user had not paused it) and the reply says why.

use std::fmt::Display;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::fds::Handover;
use super::guardian::Guardian;
use super::state::{self, CprState, RamLocation, RunState};
use super::transfer::Outgoing;
use super::worker::Worker;
use super::{exec, realtime_at, reboot, transfer, Error};
use crate::phases::Phases;
use crate::terminal::Original;
use crate::vfio::Bdf;
use crate::virtio::block::Identity;
use crate::vm::Machine;

/// A CPR command, as the control line gave it.
pub enum Request {
    Save {
        path: PathBuf,
        /// The binary that will restore it, if not one of this release:
        /// the state is written in the newest format it reads.
        restorer: Option<PathBuf>,
    },
    Exec {
        binary: Option<PathBuf>,
        args: Vec<String>,
    },
    Transfer {
        path: PathBuf,
        max_pause: Option<Duration>,
    },
}

/// What the event loop lends an update.
pub struct Source<'a> {
    pub machine: &'a Machine,
    /// Paused if the user had paused the guest: it stays paused, and is not
    /// resumed after a failure either.
    pub run: RunState,
    pub listener: Option<RawFd>,
    /// The control connection that asked: whoever runs the guest at the end replies on it.
    pub client: RawFd,
    /// The control connections watching events: handed over with the client.
    pub watchers: Vec<RawFd>,
    /// Console input to hand over (stdin), if the console is on stdio.
    pub console_in: Option<RawFd>,
    /// The user's mode of the console's terminal, which molt made raw: it
    /// travels with the console, and the terminal stays raw.
    pub terminal: Option<Original>,
    pub control_path: Option<&'a Path>,
    /// The disks as named on argv.
    pub disk_paths: &'a [PathBuf],
    /// RAM lives in a --mem-file that outlives molt: a save leaves it there.
    pub ram_in_place: bool,
    /// This binary and its argv: exec's defaults.
    pub exe: &'a Path,
    pub argv: &'a [String],
    /// The signalfd: a signal aborts a transfer's pause.
    pub signals: RawFd,
}

impl Source<'_> {
    fn handover(&self) -> Handover {
        Handover::new(
            &self.machine.backends(),
            self.listener,
            self.client,
            &self.watchers,
            self.console_in,
            self.machine.vfio_handover(),
        )
    }

    /// In the pause, before the snapshot: the passed-through devices'
    /// interrupts and DMA addresses are let go for the next process (see
    /// `Machine::vfio_release`).
    fn release_vfio(&self) -> Result<(), Error> {
        if self.machine.vfio.is_empty() {
            return Ok(());
        }
        let us = self.machine.vfio_release().map_err(Error::Vm)?;
        log::info!("VFIO released: unmap_vaddr_us={us}");
        Ok(())
    }

    /// The update failed after `release_vfio`: the devices' DMA and
    /// interrupts are this process's again, before the guest resumes here.
    fn reclaim_vfio(&self) {
        if self.machine.vfio.is_empty() {
            return;
        }
        match self.machine.vfio_reclaim() {
            Ok(()) => log::info!("VFIO taken back: the guest resumes here"),
            Err(e) => log::error!("VFIO: cannot take the devices back: {e}"),
        }
    }

    /// Stops the vCPUs unless the user had: the pause starts. Returns when it
    /// started (CLOCK_REALTIME, shared with the next process), and the
    /// update's phases from the first kick on.
    fn pause(&self) -> Result<(u64, Phases), Error> {
        super::prefault();
        let mut phases = Phases::begin();
        if self.run == RunState::Running {
            if let Err(e) = self.machine.vcpus.pause() {
                // Whatever did stop runs again.
                self.machine.vcpus.resume();
                return Err(Error::Pause(e));
            }
        }
        phases.mark("stop");
        Ok((realtime_at(phases.last()), phases))
    }

    /// The update failed: the guest runs on here, as it did before.
    fn resume(&self) {
        if self.run == RunState::Running {
            self.machine.vcpus.resume();
        }
    }

    /// Everything needed to resume the paused machine.
    fn snapshot(
        &self,
        ram: RamLocation,
        stopped_at_ns: u64,
        phases: &mut Phases,
    ) -> Result<CprState, Error> {
        let mut disks = heapless::Vec::new();
        for (i, fd) in self.machine.backends().disks.into_iter().enumerate() {
            // SAFETY: the disk's own open descriptor, borrowed for this call
            // only; ManuallyDrop keeps it open.
            let file = std::mem::ManuallyDrop::new(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
            });
            let id = Identity::of(&file).map_err(|e| Error::DiskIdentity(i, e))?;
            // The shape bounds the disks to the list's capacity.
            let _ = disks.push(id);
        }
        let mut vfio = heapless::Vec::new();
        for d in self.machine.vfio_devices() {
            // argv bounds the devices to the list's capacity.
            let _ = vfio.push(d);
        }
        Ok(CprState {
            writer: heapless::String::try_from(super::VERSION).unwrap_or_default(),
            ram,
            stopped_at_ns,
            machine: self.machine.save(phases).map_err(Error::Vm)?,
            run: self.run,
            disks,
            vfio,
        })
    }

    fn in_place(&self) -> RamLocation {
        RamLocation::InPlace {
            sample_crc: self.machine.ram.sample_crc(),
        }
    }
}

/// How an update ended here.
pub struct Done {
    /// For the client that asked; empty when the next process replies.
    pub reply: String,
    pub ended: Option<Ended>,
}

/// The guest lives on elsewhere: this process must only exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Saved to a file (reboot mode): the control socket must be freed first.
    Saved,
    /// Another molt runs it.
    Transferred,
}

impl Done {
    /// The update failed; the guest runs on here.
    fn failed(what: &str, why: impl Display) -> Done {
        log::warn!("{what} failed, the guest runs on here: {why}");
        Done {
            reply: format!("error: {what}: {why}"),
            ended: None,
        }
    }
}

/// The pause half of an update, made by its worker once the slow half is done.
type Finish = Box<dyn for<'a> FnOnce(&mut Source<'a>) -> Done + Send>;

/// An exec or a transfer whose worker runs while the guest does.
pub struct Update {
    what: &'static str,
    worker: Worker<Finish>,
}

pub enum Started {
    Done(Done),
    Working(Update),
}

impl Update {
    /// The command, for replies and the log.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Readable once the worker is done: then call `finish`.
    pub fn done_fd(&self) -> RawFd {
        self.worker.done_fd()
    }

    /// The pause, on the caller's thread. (Dropping an unfinished update
    /// abandons it: its worker stops at once.)
    pub fn finish(self, src: &mut Source) -> Done {
        (self.worker.join())(src)
    }
}

impl Request {
    /// The command, for replies and the log.
    fn what(&self) -> &'static str {
        match self {
            Request::Save { .. } => "cpr-save",
            Request::Exec { .. } => "cpr-exec",
            Request::Transfer { .. } => "cpr-transfer",
        }
    }

    /// The mode, as replies and events name it.
    pub fn mode(&self) -> &'static str {
        match self {
            Request::Save { .. } => "reboot",
            Request::Exec { .. } => "exec",
            Request::Transfer { .. } => "transfer",
        }
    }
}

/// Starts `request`: reboot mode is done at once, exec and transfer start a worker.
/// A machine with a passed-through device is refused reboot mode unless the
/// guest is suspended to RAM, and exec and transfer when this host cannot
/// hand its DMA mappings over, before anything is paused or handed over.
pub fn start(request: Request, src: &mut Source) -> Started {
    let vfio: Vec<Bdf> = src.machine.vfio_devices().iter().map(|d| d.bdf).collect();
    if let Some(e) = vfio_refusal(&request, &vfio, src.run) {
        return Started::Done(Done::failed(request.what(), e));
    }
    if let (Request::Exec { .. } | Request::Transfer { .. }, Some(why)) =
        (&request, src.machine.vfio_update_refusal())
    {
        return Started::Done(Done::failed(request.what(), Error::Vm(why)));
    }
    if let Some(why) = src.machine.vfio_update_refusal() {
        return Started::Done(Done::failed(request.what(), Error::Vm(why)));
    }
    match request {
        Request::Save {
            path,
            restorer: None,
        } => Started::Done(save(src, &path, state::VERSION)),
        Request::Save {
            path,
            restorer: Some(binary),
        } => {
            // On a worker, the guest running: the newest format BINARY
            // reads, as for exec. Then the save, on the loop's thread.
            let vfio = !src.machine.vfio_devices().is_empty();
            working("cpr-save", move |abort| {
                let format = probe_format(&binary, vfio, abort);
                Box::new(move |src: &mut Source| match format {
                    Ok(format) => save(src, &path, format),
                    Err(e) => Done::failed("cpr-save", e),
                })
            })
        }
        Request::Exec { binary, args } => exec(src, binary, args),
        Request::Transfer { path, max_pause } => transfer(src, path, max_pause),
    }
}

/// Why `request` cannot carry the passed-through devices `vfio` of a guest in
/// `run` state, if it cannot. Reboot mode can while the guest is suspended to
/// RAM (ACPI S3), as in QEMU: its drivers re-initialise the devices when it
/// wakes, so the next molt opens them afresh. Exec and transfer hand the
/// running devices over (`Machine::vfio_update_refusal` says when the host
/// cannot).
fn vfio_refusal(request: &Request, vfio: &[Bdf], run: RunState) -> Option<Error> {
    let &bdf = vfio.first()?;
    match request {
        Request::Save { .. } if run != RunState::Suspended => Some(Error::VfioNotSuspended(bdf)),
        _ => None,
    }
}

/// `work` (the slow half, given the abort descriptor) on a worker thread.
fn working(what: &'static str, work: impl FnOnce(RawFd) -> Finish + Send + 'static) -> Started {
    match Worker::spawn(what, work) {
        Ok(worker) => Started::Working(Update { what, worker }),
        Err(e) => Started::Done(Done::failed(what, format!("cannot start a worker: {e}"))),
    }
}

/// Reboot mode, save side: `cpr-save [--for BINARY] PATH`, in state format
/// `format`.
fn save(src: &mut Source, path: &Path, format: u32) -> Done {
    let what = "cpr-save";
    // 1. A restart opens the disks by name: each name must still lead to the
    //    image this process has open (not deleted, moved or replaced).
    if let Err(e) = check_disks_named(src.machine, src.disk_paths) {
        return Done::failed(what, e);
    }
    // 2. PATH.tmp created and the encoding's buffer made, while the guest runs.
    let pending = match reboot::prepare(path, src.machine.vcpus.count()) {
        Ok(p) => p,
        Err(e) => return Done::failed(what, Error::File(e)),
    };
    // 3. Pause.
    let start = Instant::now();
    let (stopped_at_ns, mut phases) = match src.pause() {
        Ok(t) => t,
        Err(e) => return Done::failed(what, e),
    };
    // 4. Save the machine; write PATH.tmp, fsync, rename over PATH. RAM stays
    //    in the --mem-file (flushed) or follows the state in the file.
    let ram = if src.ram_in_place {
        src.in_place()
    } else {
        RamLocation::InStateFile
    };
    let written = src
        .snapshot(ram, stopped_at_ns, &mut phases)
        .and_then(|state| {
            pending
                .save((&state, format), &src.machine.ram)
                .map_err(Error::File)
        });
    phases.mark("encode");
    let bytes = match written {
        Ok(bytes) => bytes,
        Err(e) => {
            src.resume();
            return Done::failed(what, e);
        }
    };
    // 5. Free what the next molt opens by name before it is told to start:
    //    the taps here (one owner each), the control socket in the loop.
    src.machine.release_backends();
    let save_us = start.elapsed().as_micros();
    log::info!(
        "saved to {} ({bytes} bytes) in {save_us} us",
        path.display()
    );
    Done {
        reply: format!(
            "ok saved path={} bytes={bytes} save_us={save_us} phases={}",
            path.display(),
            phases.summary()
        ),
        ended: Some(Ended::Saved),
    }
}

/// Exec mode, save side: `cpr-exec [BINARY [ARG...]]`.
fn exec(src: &mut Source, binary: Option<PathBuf>, args: Vec<String>) -> Started {
    let what = "cpr-exec";
    let binary = binary.unwrap_or_else(|| src.exe.to_path_buf());
    let argv: Vec<String> = if args.is_empty() {
        src.argv.to_vec()
    } else {
        src.argv.iter().take(1).cloned().chain(args).collect()
    };
    let mut handover = src.handover();
    let vfio = !src.machine.vfio_devices().is_empty();
    let vcpus = src.machine.vcpus.count();
    working(what, move |abort| {
        // On the worker, the guest running:
        // 1. BINARY must be a molt that reads a state format this one writes
        //    and that carries this guest: the newest such is written.
        // 2. A guardian starts, holding duplicates of the guest's descriptors:
        //    if the new image dies before it runs the guest, it resumes the
        //    guest on this image.
        // 3. What the exec needs that the paused guest does not change: the
        //    message's memfd and buffer, the environment, this image (by
        //    descriptor: a rollback must not depend on its path).
        let ready = probe_format(&binary, vfio, abort).and_then(|format| {
            let out = Out::new(vcpus)?;
            Guardian::start(&binary, &handover.slots())
                .map(|g| (g, format, out))
                .map_err(Error::Guardian)
        });
        Box::new(move |src: &mut Source| {
            let (guardian, format, out) = match ready {
                Ok(g) => g,
                Err(e) => return Done::failed(what, e),
            };
            // 4. Pause.
            let (stopped_at_ns, mut phases) = match src.pause() {
                Ok(t) => t,
                Err(e) => {
                    guardian.release();
                    return Done::failed(what, e);
                }
            };
            // 5. Passed-through devices: interrupts and DMA addresses let go
            //    (the devices run on).
            if let Err(e) = src.release_vfio() {
                guardian.release();
                src.resume();
                return Done::failed(what, e);
            }
            // 6. Save into the sealed memfd and execve BINARY with it and the
            //    descriptors, with this image's own (for a rollback), the
            //    guardian's line and the KVM descriptors (closed by the new
            //    image once the guest runs), and the user's terminal mode (the
            //    terminal stays raw). Returns only if that failed.
            let err = exec_out(
                src,
                &mut handover,
                (&binary, &argv, format),
                out,
                stopped_at_ns,
                &mut phases,
                &guardian,
            );
            // 7. It failed: the guardian leaves and the guest runs on here,
            //    with its passed-through devices.
            guardian.release();
            src.reclaim_vfio();
            src.resume();
            Done::failed(what, err)
        })
    })
}

/// Exec mode, step 3: made before the pause.
struct Out {
    ready: exec::Ready,
    /// This image, by descriptor.
    me: std::fs::File,
    /// Its path and argv, for a rollback's header.
    previous_exe: String,
    previous_argv: Vec<String>,
}

impl Out {
    fn new(vcpus: usize) -> Result<Out, Error> {
        Ok(Out {
            ready: exec::Ready::new(vcpus).map_err(Error::Exec)?,
            me: std::fs::File::open("/proc/self/exe").map_err(Error::OwnExe)?,
            previous_exe: std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            previous_argv: std::env::args().collect(),
        })
    }
}

/// Exec mode, step 6. Returns only on failure.
fn exec_out(
    src: &Source,
    handover: &mut Handover,
    (binary, argv, format): (&Path, &[String], u32),
    out: Out,
    stopped_at_ns: u64,
    phases: &mut Phases,
    guardian: &Guardian,
) -> Error {
    let state = match src.snapshot(src.in_place(), stopped_at_ns, phases) {
        Ok(s) => s,
        Err(e) => return e,
    };
    handover.previous_exe = Some(out.me.as_raw_fd());
    handover.guardian = Some(guardian.fd());
    handover.stale_kvm = src.machine.backends().kvm;
    let header = exec::ExecHeader {
        previous_exe: out.previous_exe,
        previous_argv: out.previous_argv,
        terminal: src.terminal,
        ..Default::default()
    };
    Error::Exec(exec::exec(
        exec::Target::Path(binary),
        argv,
        (&state, format, out.ready),
        &handover.slots(),
        header,
        Some(guardian),
        Some(phases),
    ))
}

/// Runs `binary version` (`exec::probe`): the newest state format both it
/// and this molt know, if that format carries this guest (`vfio`: with
/// passed-through devices). Before the pause, on a worker.
fn probe_format(binary: &Path, vfio: bool, abort: RawFd) -> Result<u32, Error> {
    let format = exec::probe(binary, abort)?;
    state::carries(format, vfio)
        .map_err(|e| Error::Probe(binary.into(), e.to_string()))
        .map(|()| format)
}

/// Transfer mode, save side: `cpr-transfer [--max-pause-ms N] PATH`.
fn transfer(src: &mut Source, path: PathBuf, max_pause: Option<Duration>) -> Started {
    let what = "cpr-transfer";
    if let Some(own) = src.control_path {
        if same_file(own, &path) {
            return Started::Done(Done::failed(
                what,
                format!(
                    "{} is this molt's own control socket; name the socket of the new \
                     molt's --incoming unix:",
                    path.display()
                ),
            ));
        }
    }
    let max_pause = max_pause.unwrap_or(transfer::DEFAULT_MAX_PAUSE);
    let handover = src.handover();
    let terminal = src.terminal;
    let vfio = !src.machine.vfio_devices().is_empty();
    working(what, move |abort| {
        // On the worker, the guest running:
        // 1. PATH must be a socket of molt's uid that nobody else can replace;
        //    connect, and the peer's uid must be molt's.
        // 2. HELLO both ways: the peer must be a molt reading a state format
        //    this one writes, and that format must carry this guest: the
        //    newest such is sent.
        // 3. FDS: the descriptors go, with the user's terminal mode; wait for
        //    READY (the new process maps RAM and builds its VM).
        let out = Outgoing::prepare(&path, &handover.slots(), terminal, vfio, abort);
        Box::new(move |src: &mut Source| {
            let mut out = match out {
                Ok(out) => out,
                Err(e) => return Done::failed(what, Error::Transfer(e)),
            };
            // The encoding's and the frame's buffers, their pages written
            // while the guest runs.
            let buffer = state::buffer(src.machine.vcpus.count());
            out.reserve(buffer.capacity());
            // 4. Pause.
            let (stopped_at_ns, mut phases) = match src.pause() {
                Ok(t) => t,
                Err(e) => {
                    out.fail(&e.to_string());
                    return Done::failed(what, e);
                }
            };
            // 5. Passed-through devices: interrupts and DMA addresses let go.
            //    Save, send STATE, and wait for RESTORED: the guest stays
            //    paused at most `max_pause`, and a signal aborts. A failure
            //    takes the devices back and resumes the guest here.
            if let Err(e) = src.release_vfio() {
                out.fail(&e.to_string());
                src.resume();
                return Done::failed(what, e);
            }
            // The snapshot and its encoding are freed once the guest runs
            // elsewhere, not in the pause (musl unmaps what it frees).
            let mut snapshot = None;
            let mut encoded = None;
            let sent = src
                .snapshot(src.in_place(), stopped_at_ns, &mut phases)
                .and_then(|s| {
                    let s = snapshot.insert(s);
                    state::encode_into(s, out.format, buffer).map_err(Error::StateEncode)
                })
                .and_then(|bytes| {
                    phases.mark("encode");
                    let bytes = encoded.insert(bytes);
                    out.send_state(bytes, &phases, max_pause, src.signals)
                        .map_err(Error::Transfer)
                });
            if let Err(e) = sent {
                out.fail(&e.to_string());
                src.reclaim_vfio();
                src.resume();
                return Done::failed(what, e);
            }
            // 6. GO: the new process runs the guest and replies; this one exits,
            //    leaving the terminal raw for it.
            let peer = out.peer_version.clone();
            let done = out.go();
            drop((snapshot, encoded));
            match done {
                Ok(()) => {
                    log::info!("guest handed over to molt {peer}");
                    Done {
                        reply: String::new(),
                        ended: Some(Ended::Transferred),
                    }
                }
                Err(e) => {
                    src.reclaim_vfio();
                    src.resume();
                    Done::failed(what, e)
                }
            }
        })
    })
}

/// Reboot mode reopens the disks by name: each of `paths` (argv order) must
/// still name the image this process has open, neither deleted nor replaced.
fn check_disks_named(machine: &Machine, paths: &[PathBuf]) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    for (path, fd) in paths.iter().zip(machine.backends().disks) {
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

/// Whether two paths name the same file.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reboot_mode_carries_vfio_only_for_a_suspended_guest() {
        let edu: Bdf = "0000:00:04.0".parse().unwrap();
        let save = Request::Save {
            path: "/run/state".into(),
            restorer: None,
        };
        let exec = Request::Exec {
            binary: None,
            args: Vec::new(),
        };
        let transfer = Request::Transfer {
            path: "/run/x".into(),
            max_pause: None,
        };
        // Without a device nothing is refused here.
        for r in [&save, &exec, &transfer] {
            assert!(vfio_refusal(r, &[], RunState::Running).is_none());
        }
        assert!(vfio_refusal(&save, &[edu], RunState::Suspended).is_none());
        // A running or paused guest: the reply says how to suspend it.
        for run in [RunState::Running, RunState::Paused] {
            let e = vfio_refusal(&save, &[edu], run)
                .expect("refused")
                .to_string();
            assert!(
                e.starts_with("VFIO device 0000:00:04.0: the guest is not suspended: "),
                "{e}"
            );
            for words in [
                "suspended to RAM (ACPI S3)",
                "echo mem > /sys/power/state",
                "state=suspended",
            ] {
                assert!(e.contains(words), "{words:?} missing: {e}");
            }
        }
        // Exec and transfer hand the devices over in any run state (the
        // host's ability to is Machine::vfio_update_refusal's to say).
        for r in [&exec, &transfer] {
            for run in [RunState::Running, RunState::Paused, RunState::Suspended] {
                assert!(vfio_refusal(r, &[edu], run).is_none());
            }
        }
    }
}
