//! Bounded waits for the CPR hand-overs: every wait has an overall deadline and
//! ends early when a stop descriptor (the signalfd, or a worker's abort
//! eventfd) becomes readable. Stop descriptors are only polled, never read: the
//! event loop still sees the signal afterwards and acts on it.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Why a wait ended without its descriptor becoming ready.
#[derive(Debug)]
pub enum Stop {
    TimedOut,
    Interrupted,
    Io(io::Error),
}

/// Waits until `fd` has `events` (POLLIN or POLLOUT), `deadline` passes or one
/// of `stop` becomes readable, whichever comes first.
pub fn until(fd: RawFd, events: i16, deadline: Instant, stop: &[RawFd]) -> Result<(), Stop> {
    let mut fds: Vec<libc::pollfd> = std::iter::once((fd, events))
        .chain(stop.iter().map(|&s| (s, libc::POLLIN)))
        .map(|(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32 + i32::from(!left.is_zero());
        // SAFETY: fds is a valid array of initialised pollfd structs of that length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Stop::Io(e));
        }
        // Stop first: a stop that fired must win over a peer that keeps talking.
        if fds[1..].iter().any(|p| p.revents != 0) {
            return Err(Stop::Interrupted);
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Stop::TimedOut);
        }
    }
}

/// `duration` as people read it: "800 ms", "5 s".
pub fn human(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn ready_timeout_and_stop_are_told_apart() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (stop_r, mut stop_w) = UnixStream::pair().unwrap();
        let soon = || Instant::now() + Duration::from_millis(30);
        let t = Instant::now();
        assert!(matches!(
            until(a.as_raw_fd(), libc::POLLIN, soon(), &[stop_r.as_raw_fd()]),
            Err(Stop::TimedOut)
        ));
        assert!(t.elapsed() >= Duration::from_millis(30));
        std::io::Write::write_all(&mut b, b"x").unwrap();
        assert!(until(a.as_raw_fd(), libc::POLLIN, soon(), &[stop_r.as_raw_fd()]).is_ok());
        std::io::Write::write_all(&mut stop_w, b"x").unwrap();
        assert!(matches!(
            until(a.as_raw_fd(), libc::POLLIN, soon(), &[stop_r.as_raw_fd()]),
            Err(Stop::Interrupted)
        ));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_secs(5)), "5 s");
        assert_eq!(human(Duration::from_millis(1500)), "1500 ms");
    }
}
