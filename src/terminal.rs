//! Raw mode for a console on a terminal, restored on every way out: normal return
//! (Drop), a fatal signal handled by the event loop, and a panic (the hook).

use std::sync::OnceLock;

static SAVED: OnceLock<libc::termios> = OnceLock::new();

/// Restores the terminal when dropped.
pub struct RawMode;

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal; None when it is not.
    pub fn enter() -> Option<RawMode> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return None;
        }
        let _ = SAVED.set(t);
        // Keys, Ctrl-C included, go to the guest unchanged, as on a serial line.
        // SAFETY: `t` is a valid termios.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: `t` is a valid termios for this terminal.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        Some(RawMode)
    }
}

fn restore() {
    if let Some(t) = SAVED.get() {
        // SAFETY: `t` is the terminal's own saved state.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}
