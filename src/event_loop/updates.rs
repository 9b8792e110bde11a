//! The control commands that hand the guest on: `cpr-save` (reboot mode),
//! `cpr-exec` and `cpr-transfer`. Each returns the reply line and, on success,
//! how this process ends; on failure the guest runs on here as before.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::{Loop, Outcome};
use crate::cpr;
use crate::terminal::RawMode;

impl Loop {
    /// Reboot mode, step 1. On failure the guest runs on as if nothing happened.
    pub(super) fn cpr_save(&mut self, path: &Path) -> (String, Option<Outcome>) {
        let was_paused = self.paused;
        if !was_paused {
            if let Err(e) = self.machine.vcpus.pause() {
                self.machine.vcpus.resume();
                return (format!("error: cpr-save: cannot pause: {e}"), None);
            }
            self.paused_at_ns = cpr::now_ns();
        }
        match cpr::save_to_file(&self.machine, path, self.ram_in_place, self.paused_at_ns) {
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

    /// Exec mode, step 1. Returns only if the exec did not happen; the guest then
    /// runs on here, unchanged.
    pub(super) fn cpr_exec(
        &mut self,
        slot: usize,
        binary: Option<PathBuf>,
        args: Vec<String>,
    ) -> (String, Option<Outcome>) {
        let binary = binary.unwrap_or_else(|| self.exe.clone());
        if let Err(e) = cpr::probe(&binary) {
            return (format!("error: cpr-exec: {e}"), None);
        }
        let argv: Vec<String> = if args.is_empty() {
            self.argv.clone()
        } else {
            self.argv.iter().take(1).cloned().chain(args).collect()
        };
        let Some(client_fd) = self.clients.fd(slot) else {
            return ("error: cpr-exec: no client".into(), None);
        };
        let was_paused = self.paused;
        if !was_paused {
            if let Err(e) = self.machine.vcpus.pause() {
                self.machine.vcpus.resume();
                return (format!("error: cpr-exec: cannot pause: {e}"), None);
            }
            self.paused_at_ns = cpr::now_ns();
        }
        // The terminal goes back to how the user had it; the new image sets it up.
        drop(self.raw.take());
        let listener = self.listener.as_ref().map(|l| l.as_raw_fd());
        let console_in = self.stdio_console.then_some(self.console_in);
        let err = cpr::exec_out(
            &self.machine,
            &binary,
            &argv,
            listener,
            client_fd,
            console_in,
            self.paused_at_ns,
        );
        if self.stdio_console {
            self.raw = RawMode::enter();
        }
        if !was_paused {
            self.machine.vcpus.resume();
        }
        log::warn!("cpr-exec failed, guest resumed: {err}");
        (format!("error: cpr-exec: {err}"), None)
    }

    /// Transfer mode, old side. On success the new process replies and this one
    /// exits; on failure the guest runs on here.
    pub(super) fn cpr_transfer(&mut self, slot: usize, path: &Path) -> (String, Option<Outcome>) {
        let Some(client_fd) = self.clients.fd(slot) else {
            return ("error: cpr-transfer: no client".into(), None);
        };
        let console_in = self.stdio_console.then_some(self.console_in);
        let fds = cpr::transfer_fds(
            &self.machine,
            self.listener.as_ref().map(|l| l.as_raw_fd()),
            client_fd,
            console_in,
        );
        let was_paused = self.paused;
        let paused_at_ns = self.paused_at_ns;
        let vcpus = &self.machine.vcpus;
        let pause = || {
            if was_paused {
                Ok(paused_at_ns)
            } else {
                vcpus
                    .pause()
                    .map(|()| cpr::now_ns())
                    .map_err(|e| format!("cannot pause: {e}"))
            }
        };
        let resume = || {
            if !was_paused {
                vcpus.resume();
            }
        };
        match cpr::transfer_out(&self.machine, path, &fds, pause, resume) {
            Ok(()) => {
                log::info!("guest handed over to {}", path.display());
                (String::new(), Some(Outcome::Transferred))
            }
            Err(e) => {
                log::warn!("cpr-transfer failed, guest runs on here: {e}");
                (format!("error: cpr-transfer: {e}"), None)
            }
        }
    }
}
