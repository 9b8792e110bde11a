//! The control commands that hand the guest on: `cpr-save` (reboot mode),
//! `cpr-exec` and `cpr-transfer`. Each returns the reply line and, on success,
//! how this process ends; on failure the guest runs on here as before.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pending::{Pending, Prepared, Worker};
use super::{Loop, Next, Outcome, TOKEN_OP};
use crate::cpr;
use crate::terminal::RawMode;

impl Loop {
    /// Reboot mode, step 1. On failure the guest runs on as if nothing happened.
    pub(super) fn cpr_save(&mut self, path: &Path) -> (String, Option<Outcome>) {
        // The next molt opens the disks by name: a name that no longer leads to
        // the open image would lose what the guest wrote.
        if let Err(e) = cpr::check_disks_named(&self.machine, &self.disk_paths) {
            log::warn!("cpr-save refused, guest runs on: {e}");
            return (format!("error: cpr-save: {e}"), None);
        }
        let was_paused = self.paused;
        if !was_paused {
            if let Err(e) = self.machine.vcpus.pause() {
                self.machine.vcpus.resume();
                return (format!("error: cpr-save: cannot pause: {e}"), None);
            }
        }
        let run = self.run_state();
        match cpr::save_to_file(&self.machine, path, self.ram_in_place, cpr::now_ns(), run) {
            Ok(saved) => {
                log::info!(
                    "saved to {} ({} bytes) in {} us",
                    path.display(),
                    saved.bytes,
                    saved.save_us
                );
                let reply = format!(
                    "ok saved path={} bytes={} save_us={}",
                    path.display(),
                    saved.bytes,
                    saved.save_us
                );
                // Free what the next molt opens by name before it is told to
                // start: the control socket and taps (a tap takes one owner).
                self.listener = None;
                if let Some(p) = &self.control_path {
                    let _ = std::fs::remove_file(p);
                }
                self.machine.release_backends();
                (reply, Some(Outcome::Saved))
            }
            Err(e) => {
                if !was_paused {
                    self.machine.vcpus.resume();
                }
                log::warn!("cpr-save failed, guest resumed: {e}");
                (format!("error: cpr-save: {e}"), None)
            }
        }
    }

    /// Exec mode, step 1: probes the binary and starts the guardian on a
    /// worker, the guest running. The reply comes from `exec_now`, or from the
    /// new image (or, if that dies, the previous image the guardian resumes).
    pub(super) fn cpr_exec(
        &mut self,
        slot: usize,
        binary: Option<PathBuf>,
        args: Vec<String>,
    ) -> (String, Option<Outcome>) {
        let binary = binary.unwrap_or_else(|| self.exe.clone());
        let argv: Vec<String> = if args.is_empty() {
            self.argv.clone()
        } else {
            self.argv.iter().take(1).cloned().chain(args).collect()
        };
        let Some(fds) = self.handover_fds(slot) else {
            return ("error: cpr-exec: no client".into(), None);
        };
        self.start(slot, "cpr-exec", move |abort| Prepared::Exec {
            ready: cpr::probe(&binary, abort).and_then(|()| {
                cpr::guardian::Guardian::start(&binary, &fds).map_err(cpr::Error::Guardian)
            }),
            binary,
            argv,
        })
    }

    /// Transfer mode, old side, step 1: the hand-shake up to READY on a
    /// worker, the guest running. The reply comes from `transfer_now`, or
    /// from the new process.
    pub(super) fn cpr_transfer(
        &mut self,
        slot: usize,
        path: PathBuf,
        max_pause: Option<Duration>,
    ) -> (String, Option<Outcome>) {
        let Some(fds) = self.handover_fds(slot) else {
            return ("error: cpr-transfer: no client".into(), None);
        };
        if let Some(own) = &self.control_path {
            if same_file(own, &path) {
                return (
                    format!(
                        "error: cpr-transfer: {} is this molt's own control socket; \
                         name the socket of the new molt's --incoming unix:",
                        path.display()
                    ),
                    None,
                );
            }
        }
        let max_pause = max_pause.unwrap_or(cpr::transfer::DEFAULT_MAX_PAUSE);
        self.start(slot, "cpr-transfer", move |abort| Prepared::Transfer {
            max_pause,
            out: cpr::transfer::Outgoing::prepare(&path, &fds, abort),
        })
    }

    /// What a transfer, or an exec's guardian, gets: the guest's descriptors,
    /// the console and the asking client (None if it is gone).
    fn handover_fds(&self, slot: usize) -> Option<Vec<(cpr::fds::FdKind, RawFd)>> {
        let client_fd = self.clients.fd(slot)?;
        let console_in = self.stdio_console.then_some(self.console_in);
        Some(cpr::transfer_fds(
            &self.machine,
            self.listener.as_ref().map(|l| l.as_raw_fd()),
            client_fd,
            console_in,
        ))
    }

    /// Starts a CPR command's worker; the asking client is held until it ends.
    fn start(
        &mut self,
        slot: usize,
        what: &'static str,
        work: impl FnOnce(RawFd) -> Prepared + Send + 'static,
    ) -> (String, Option<Outcome>) {
        let worker = match Worker::spawn(what, work) {
            Ok(w) => w,
            Err(e) => return (format!("error: {what}: cannot start a worker: {e}"), None),
        };
        if let Err(e) = self.add(worker.done_fd(), TOKEN_OP) {
            return (format!("error: {what}: {e}"), None);
        }
        self.clients.hold(&self.epoll, slot);
        self.pending = Some(Pending { slot, what, worker });
        (String::new(), None)
    }

    /// The worker finished: the pause, on this thread, then the reply.
    pub(super) fn finish_pending(&mut self) -> Next {
        let Some(p) = self.pending.take() else {
            return Next::Continue;
        };
        self.remove(p.worker.done_fd());
        let slot = p.slot;
        let (reply, stop) = match p.worker.join() {
            Prepared::Exec {
                binary,
                argv,
                ready: Ok(guardian),
            } => self.exec_now(slot, &binary, &argv, guardian),
            Prepared::Exec { ready: Err(e), .. } => (format!("error: cpr-exec: {e}"), None),
            Prepared::Transfer {
                max_pause,
                out: Ok(out),
            } => self.transfer_now(slot, out, max_pause),
            Prepared::Transfer { out: Err(e), .. } => {
                log::warn!("cpr-transfer failed, guest runs on here: {e}");
                (format!("error: cpr-transfer: {e}"), None)
            }
        };
        self.answer_held(slot, &reply);
        match stop {
            Some(outcome) => Next::Stop(outcome),
            None => Next::Continue,
        }
    }

    /// Molt is stopping (a signal, `quit`, the guest's end) while an update
    /// is under way: the update is abandoned - its worker stops at once - and
    /// its client is told.
    pub(super) fn abandon_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            self.remove(p.worker.done_fd());
            let (slot, what) = (p.slot, p.what);
            drop(p.worker);
            log::warn!("{what} interrupted: molt is stopping");
            self.answer_held(
                slot,
                &format!("error: {what}: interrupted: molt is stopping"),
            );
        }
    }

    /// Serves a held client again, its update's reply first.
    fn answer_held(&mut self, slot: usize, reply: &str) {
        let now = std::time::Instant::now();
        self.clients.release(&self.epoll, slot, now);
        self.clients.reply(&self.epoll, slot, reply, now);
    }

    /// Exec mode, step 2. Returns only if the exec did not happen; the guest
    /// then runs on here, unchanged, and `guardian` leaves.
    fn exec_now(
        &mut self,
        slot: usize,
        binary: &Path,
        argv: &[String],
        guardian: cpr::guardian::Guardian,
    ) -> (String, Option<Outcome>) {
        let Some(client_fd) = self.clients.fd(slot) else {
            return ("error: cpr-exec: no client".into(), None);
        };
        let was_paused = self.paused;
        if !was_paused {
            if let Err(e) = self.machine.vcpus.pause() {
                self.machine.vcpus.resume();
                return (format!("error: cpr-exec: cannot pause: {e}"), None);
            }
        }
        let stopped_at_ns = cpr::now_ns();
        // The terminal goes back to how the user had it; the new image sets it up.
        drop(self.raw.take());
        let listener = self.listener.as_ref().map(|l| l.as_raw_fd());
        let console_in = self.stdio_console.then_some(self.console_in);
        let err = cpr::exec_out(
            &self.machine,
            binary,
            argv,
            listener,
            client_fd,
            console_in,
            stopped_at_ns,
            &guardian,
            self.run_state(),
        );
        guardian.release();
        if self.stdio_console {
            self.raw = RawMode::enter();
        }
        if !was_paused {
            self.machine.vcpus.resume();
        }
        log::warn!("cpr-exec failed, guest resumed: {err}");
        (format!("error: cpr-exec: {err}"), None)
    }

    /// Transfer mode, old side, step 2: the new process is READY. On success
    /// it replies and this one exits; on failure the guest runs on here.
    fn transfer_now(
        &mut self,
        slot: usize,
        out: cpr::transfer::Outgoing,
        max_pause: Duration,
    ) -> (String, Option<Outcome>) {
        if self.clients.fd(slot).is_none() {
            return ("error: cpr-transfer: no client".into(), None);
        }
        let was_paused = self.paused;
        let run = self.run_state();
        let vcpus = &self.machine.vcpus;
        let pause = || {
            if !was_paused {
                vcpus.pause().map_err(|e| format!("cannot pause: {e}"))?;
            }
            Ok(cpr::now_ns())
        };
        let resume = || {
            if !was_paused {
                vcpus.resume();
            }
        };
        let peer = out.peer_version.clone();
        match cpr::transfer_out(
            &self.machine,
            out,
            max_pause,
            self.signal_fd,
            run,
            pause,
            resume,
        ) {
            Ok(()) => {
                log::info!("guest handed over to molt {peer}");
                (String::new(), Some(Outcome::Transferred))
            }
            Err(e) => {
                log::warn!("cpr-transfer failed, guest runs on here: {e}");
                (format!("error: cpr-transfer: {e}"), None)
            }
        }
    }
}

/// Whether two paths name the same file.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
