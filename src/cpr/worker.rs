//! An update's slow, guest-running part - the exec probe and guardian, the
//! transfer hand-shake up to READY - runs on a worker thread, so that the event
//! loop keeps serving `status`, `quit`, the console and the devices meanwhile.
//! The worker reports through an eventfd the loop polls; the pause itself then
//! runs on the loop's thread. Dropping a worker aborts and joins it: all of its
//! waits poll the abort eventfd.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

pub struct Worker<T> {
    handle: Option<JoinHandle<T>>,
    done: EventFd,
    abort: EventFd,
}

impl<T: Send + 'static> Worker<T> {
    /// Runs `work(abort_fd)` on a new thread.
    pub fn spawn(
        name: &str,
        work: impl FnOnce(RawFd) -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        let done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let abort = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let signal_done = done.try_clone()?;
        // The worker only polls this number; `abort` outlives the thread
        // because the worker is joined before it is dropped.
        let abort_fd = abort.as_raw_fd();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let result = work(abort_fd);
                let _ = signal_done.write(1);
                result
            })?;
        Ok(Worker {
            handle: Some(handle),
            done,
            abort,
        })
    }

    /// Readable once the work is finished.
    pub fn done_fd(&self) -> RawFd {
        self.done.as_raw_fd()
    }

    /// Waits for the work's result (at once, after `done_fd` fired).
    pub fn join(mut self) -> T {
        let handle = self.handle.take().expect("joined once");
        match handle.join() {
            Ok(t) => t,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.abort.write(1);
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpr;
    use std::time::{Duration, Instant};

    #[test]
    fn a_dropped_worker_is_aborted_and_joined() {
        let (tx, rx) = std::sync::mpsc::channel();
        let w = Worker::spawn("test", move |abort| {
            let far = Instant::now() + Duration::from_secs(60);
            let r = cpr::wait::until(abort, libc::POLLIN, far, &[]);
            tx.send(r.is_ok()).unwrap();
        })
        .unwrap();
        let t = Instant::now();
        drop(w);
        assert!(rx.recv().unwrap(), "the abort eventfd woke the worker");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_finished_worker_signals_and_returns() {
        let w = Worker::spawn("test", |_| 42).unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        cpr::wait::until(w.done_fd(), libc::POLLIN, far, &[]).unwrap();
        assert_eq!(w.join(), 42);
    }
}
