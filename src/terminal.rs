//! Raw mode for a console on a terminal, restored on every way out: normal return
//! (Drop), a fatal signal handled by the event loop, and a panic (the hook).
//!
//! The terminal stays raw while any molt runs the guest on it. What is restored
//! at the end is the mode the user had before the first molt started: exec and
//! transfer hand it on (`Original`) with the console's descriptors, and the
//! process that hands the guest over leaves the terminal as it is
//! (`RawMode::hand_over`). Reboot mode needs nothing: the old molt restores the
//! terminal as it exits, and the restarted one finds it as the user had it.

use std::os::fd::RawFd;
use std::sync::{Mutex, Once};

use serde::{Deserialize, Serialize};

/// The control characters a termios holds (NCCS, the same in glibc and musl).
const NCCS: usize = 32;

/// A terminal's mode as the user had it, in a form that travels between
/// processes (and builds: glibc's and musl's `termios` name their speed fields
/// differently; the speed stays in `cflag`, as Linux keeps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Original {
    iflag: u32,
    oflag: u32,
    cflag: u32,
    lflag: u32,
    line: u8,
    cc: [u8; NCCS],
}

impl Original {
    pub(crate) fn of(t: &libc::termios) -> Original {
        let mut cc = [0u8; NCCS];
        for (d, s) in cc.iter_mut().zip(t.c_cc.iter()) {
            *d = *s;
        }
        Original {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line,
            cc,
        }
    }

    /// `base` (the terminal as it is now) with this mode written over it.
    fn apply(&self, mut base: libc::termios) -> libc::termios {
        base.c_iflag = self.iflag;
        base.c_oflag = self.oflag;
        base.c_cflag = self.cflag;
        base.c_lflag = self.lflag;
        base.c_line = self.line;
        for (d, s) in base.c_cc.iter_mut().zip(self.cc.iter()) {
            *d = *s;
        }
        base
    }
}

/// The terminal a panic must give back: its descriptor and original mode.
static ARMED: Mutex<Option<(RawFd, Original)>> = Mutex::new(None);
static HOOK: Once = Once::new();

/// The console's terminal in raw mode; dropping it restores the user's mode.
pub struct RawMode {
    fd: RawFd,
    original: Original,
}

impl RawMode {
    /// Puts `fd` (the console's input) in raw mode if it is a terminal,
    /// remembering its mode as the user's; None when it is not a terminal.
    pub fn enter(fd: RawFd) -> Option<RawMode> {
        let now = get(fd)?;
        RawMode::take(fd, Original::of(&now), now)
    }

    /// After an exec or a transfer: `fd` is the terminal the previous molt
    /// had made raw, `original` the user's mode it handed on. Without one (it
    /// ran on no terminal, or is an older molt) this is `enter`.
    pub fn adopt(fd: RawFd, original: Option<Original>) -> Option<RawMode> {
        match original {
            Some(original) => RawMode::take(fd, original, get(fd)?),
            None => RawMode::enter(fd),
        }
    }

    fn take(fd: RawFd, original: Original, mut now: libc::termios) -> Option<RawMode> {
        // Keys, Ctrl-C included, go to the guest unchanged, as on a serial line.
        // SAFETY: `now` is a valid termios.
        unsafe { libc::cfmakeraw(&mut now) };
        set(fd, &now);
        *crate::sync::lock(&ARMED) = Some((fd, original));
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // try_lock: a panic while the lock is held must not hang here.
                if let Ok(Some((fd, original))) = ARMED.try_lock().as_deref() {
                    restore(*fd, original);
                }
                previous(info);
            }));
        });
        Some(RawMode { fd, original })
    }

    /// The user's mode, for the next molt.
    pub fn original(&self) -> Original {
        self.original
    }

    /// Another molt runs the guest on this terminal now: it stays raw.
    pub fn hand_over(self) {
        *crate::sync::lock(&ARMED) = None;
        std::mem::forget(self);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        *crate::sync::lock(&ARMED) = None;
        restore(self.fd, &self.original);
    }
}

fn get(fd: RawFd) -> Option<libc::termios> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } != 1 {
        return None;
    }
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to fill.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return None;
    }
    Some(t)
}

fn restore(fd: RawFd, original: &Original) {
    if let Some(now) = get(fd) {
        set(fd, &original.apply(now));
    }
}

/// Sets `fd`'s mode. SIGTTOU is blocked meanwhile: a molt in a background job
/// of the terminal's session (a transfer's new process, started with `&`) is
/// not stopped for it.
fn set(fd: RawFd, t: &libc::termios) {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; the masks
    // are valid for pthread_sigmask, which only changes this thread's mask.
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGTTOU);
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        // `t` is a valid termios for this terminal.
        libc::tcsetattr(fd, libc::TCSANOW, t);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mode_survives_its_encoding() {
        // SAFETY: termios is plain data.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_iflag = libc::ICRNL;
        t.c_oflag = libc::OPOST | libc::ONLCR;
        t.c_cflag = libc::CS8 | libc::CREAD | libc::B38400;
        t.c_lflag = libc::ICANON | libc::ECHO | libc::ISIG;
        t.c_cc[libc::VERASE] = 0x08;
        let o = Original::of(&t);
        let bytes = postcard::to_allocvec(&o).unwrap();
        let back: Original = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, o);
        // SAFETY: as above.
        let zero: libc::termios = unsafe { std::mem::zeroed() };
        let applied = back.apply(zero);
        assert_eq!(Original::of(&applied), o);
        assert_eq!(applied.c_cc[libc::VERASE], 0x08);
    }

    #[test]
    fn what_is_not_a_terminal_is_left_alone() {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(RawMode::enter(f.as_raw_fd()).is_none());
        // SAFETY: termios is plain data.
        let o = Original::of(&unsafe { std::mem::zeroed() });
        assert!(RawMode::adopt(f.as_raw_fd(), Some(o)).is_none());
    }
}
