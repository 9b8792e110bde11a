//! The control commands that hand the guest on - `cpr-save`, `cpr-exec`,
//! `cpr-transfer` - go to `cpr::update`, which does them; this sends the reply
//! it gets back, holds the asking client while an update's worker runs, and
//! ends the process when the guest lives on elsewhere. Watchers hear of each
//! update (`update-started`, then `update-saved` or `update-failed` here, or
//! `update-finished` from the process that runs the guest next, to which an
//! exec or a transfer hands them).

use std::os::fd::{AsRawFd, RawFd};

use super::{Loop, Next, Outcome, Token};
use crate::cpr::update::{self, Done, Ended, Request, Source, Started};
use crate::cpr::VERSION;

/// The one update under way, the client that asked for it and the watchers
/// it hands over (all held: not read from, their descriptors kept open, until
/// it ends).
pub(super) struct Pending {
    slot: usize,
    update: update::Update,
    mode: &'static str,
    watchers: Vec<usize>,
}

impl Loop {
    /// What an update borrows from the loop; `client` is the asking client,
    /// `watchers` the event watchers to hand over.
    fn source(&mut self, client: RawFd, watchers: Vec<RawFd>) -> Source<'_> {
        Source {
            machine: &self.machine,
            run: self.run_state(),
            listener: self.listener.as_ref().map(|l| l.as_raw_fd()),
            client,
            watchers,
            console_in: self.stdio_console.then_some(self.console_in),
            terminal: self.raw.as_ref().map(|r| r.original()),
            control_path: self.control_path.as_deref(),
            disk_paths: &self.disk_paths,
            ram_in_place: self.ram_in_place,
            exe: &self.exe,
            argv: &self.argv,
            signals: self.signal_fd,
        }
    }

    /// Starts a CPR command. Reboot mode answers at once; an exec's or a
    /// transfer's reply comes once its worker is done (`finish_pending`).
    pub(super) fn update(&mut self, slot: usize, request: Request) -> (String, Option<Outcome>) {
        if self.pending.is_some() {
            return ("error: another update is under way".into(), None);
        }
        let Some(client) = self.clients.fd(slot) else {
            return ("error: the asking client is gone".into(), None);
        };
        let mode = request.mode();
        self.event("update-started", &format!("mode={mode} from={VERSION}"));
        // Taken after that line: a watcher it dropped is not handed over.
        let (watchers, fds): (Vec<usize>, Vec<RawFd>) =
            self.clients.watcher_fds().into_iter().unzip();
        match update::start(request, &mut self.source(client, fds)) {
            Started::Done(done) => {
                self.update_event(mode, &done);
                self.ended(done)
            }
            Started::Working(update) => {
                if let Err(e) = self.add(update.done_fd(), Token::Update) {
                    let reply = format!("error: {}: {e}", update.what());
                    self.event("update-failed", &format!("mode={mode} reason={e}"));
                    return (reply, None);
                }
                self.clients.hold(&self.epoll, slot);
                for &w in &watchers {
                    self.clients.hold(&self.epoll, w);
                }
                self.pending = Some(Pending {
                    slot,
                    update,
                    mode,
                    watchers,
                });
                (String::new(), None)
            }
        }
    }

    /// Tells the watchers how `done` ended here: saved, failed, or nothing
    /// (handed over: the next process tells them).
    fn update_event(&mut self, mode: &str, done: &Done) {
        match (&done.ended, done.reply.strip_prefix("error: ")) {
            (Some(Ended::Saved), _) => {
                let detail = done.reply.strip_prefix("ok saved ").unwrap_or_default();
                self.event("update-saved", &format!("mode={mode} {detail}"));
            }
            (None, Some(why)) => {
                self.event("update-failed", &format!("mode={mode} reason={why}"));
            }
            _ => {}
        }
    }

    /// The watchers an update held are served again (it failed).
    fn release_watchers(&mut self, watchers: &[usize]) {
        let now = std::time::Instant::now();
        for &w in watchers {
            self.clients.release(&self.epoll, w, now);
        }
    }

    /// The worker finished: the pause, on this thread, then the reply.
    pub(super) fn finish_pending(&mut self) -> Next {
        let Some(Pending {
            slot,
            update,
            mode,
            watchers,
        }) = self.pending.take()
        else {
            return Next::Continue;
        };
        self.remove(update.done_fd());
        // Events queued so far go out before another process takes the
        // watchers over (or this one ends).
        self.clients.flush_watchers();
        // A held client's descriptor stays open until its reply.
        let client = self.clients.fd(slot).unwrap_or(-1);
        // The handover was made at the start: `watchers` are in it.
        let done = update.finish(&mut self.source(client, Vec::new()));
        self.update_event(mode, &done);
        if done.ended.is_none() {
            self.release_watchers(&watchers);
        }
        let (reply, stop) = self.ended(done);
        self.answer_held(slot, &reply);
        match stop {
            Some(outcome) => Next::Stop(outcome),
            None => Next::Continue,
        }
    }

    /// What `done` means for this process: the reply, and whether to stop.
    fn ended(&mut self, done: Done) -> (String, Option<Outcome>) {
        let outcome = match done.ended {
            None => None,
            Some(Ended::Saved) => {
                // The next molt binds the control socket by name before it is
                // told to start.
                self.listener = None;
                if let Some(p) = &self.control_path {
                    let _ = std::fs::remove_file(p);
                }
                Some(Outcome::Saved)
            }
            Some(Ended::Transferred) => Some(Outcome::Transferred),
        };
        (done.reply, outcome)
    }

    /// Molt is stopping (a signal, `quit`, the guest's end) while an update
    /// is under way: the update is abandoned - its worker stops at once - and
    /// its client is told.
    pub(super) fn abandon_pending(&mut self) {
        if let Some(Pending {
            slot,
            update,
            mode,
            watchers,
        }) = self.pending.take()
        {
            self.remove(update.done_fd());
            let what = update.what();
            drop(update);
            log::warn!("{what} interrupted: molt is stopping");
            self.release_watchers(&watchers);
            self.event(
                "update-failed",
                &format!("mode={mode} reason=interrupted: molt is stopping"),
            );
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
}
