//! Rate limiting of log lines a guest can provoke.
//!
//! The guest is untrusted: a loop of bad register writes or failing requests
//! must not flood molt's stderr. Each call site of [`guest_log!`] owns a
//! [`Limiter`] that lets `BUDGET` lines through per `WINDOW`, drops the rest,
//! and reports how many it dropped with the next line it lets through (as the
//! kernel's printk_ratelimit does).

use std::fmt;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const BUDGET: u32 = 10;
/// The window the budget applies to.
pub const WINDOW: Duration = Duration::from_secs(1);

/// One call site's window: when it opened, what it let through and dropped.
struct Window {
    start: Option<Duration>,
    emitted: u32,
    dropped: u64,
}

/// A fixed-window limiter. The lock is held for a few compares per call: vCPU
/// threads and the event loop may share a call site.
pub struct Limiter(Mutex<Window>);

impl Limiter {
    pub const fn new() -> Self {
        Limiter(Mutex::new(Window {
            start: None,
            emitted: 0,
            dropped: 0,
        }))
    }

    /// At `now` (any monotonic clock): `Some(n)` lets a line through, `n` lines
    /// having been dropped since the last one let through; `None` drops it.
    pub fn admit(&self, now: Duration) -> Option<u64> {
        let mut w = crate::sync::lock(&self.0);
        if w.start.is_none_or(|s| now.saturating_sub(s) >= WINDOW) {
            w.start = Some(now);
            w.emitted = 0;
        }
        if w.emitted < BUDGET {
            w.emitted += 1;
            Some(std::mem::take(&mut w.dropped))
        } else {
            w.dropped += 1;
            None
        }
    }
}

/// Time since the first call: the clock of every call site's window.
fn now() -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// Logs `args` at `level` if `site` admits it, after a line counting what
/// `site` dropped before. Use through [`guest_log!`].
pub fn log(site: &Limiter, level: log::Level, args: fmt::Arguments) {
    if log::log_enabled!(level) {
        log_at(site, now(), level, args);
    }
}

fn log_at(site: &Limiter, now: Duration, level: log::Level, args: fmt::Arguments) {
    let Some(dropped) = site.admit(now) else {
        return;
    };
    if dropped > 0 {
        log::log!(level, "{dropped} similar messages suppressed");
    }
    log::log!(level, "{args}");
}

/// `log::log!` for lines a guest can provoke, e.g. `guest_log!(Warn, "...")`: at most [`BUDGET`] per
/// [`WINDOW`] from each call site, then a count of what was suppressed.
macro_rules! guest_log {
    ($level:ident, $($arg:tt)+) => {{
        static SITE: $crate::ratelimit::Limiter = $crate::ratelimit::Limiter::new();
        $crate::ratelimit::log(&SITE, log::Level::$level, format_args!($($arg)+));
    }};
}
pub(crate) use guest_log;

/// Collects the log lines the calling thread produces, for tests that bound
/// what a guest can make molt log.
#[cfg(test)]
pub mod capture {
    use std::cell::RefCell;

    thread_local!(static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) });

    struct Collector;
    static COLLECTOR: Collector = Collector;

    impl log::Log for Collector {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            LINES.with(|l| l.borrow_mut().push(r.args().to_string()));
        }
        fn flush(&self) {}
    }

    /// Runs `f` and returns the lines it logged (any crate, any level).
    pub fn lines_logged(f: impl FnOnce()) -> Vec<String> {
        // Every test installs the same collector; only the first call succeeds.
        let _ = log::set_logger(&COLLECTOR);
        log::set_max_level(log::LevelFilter::Trace);
        LINES.with(|l| l.borrow_mut().clear());
        f();
        LINES.with(|l| l.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_to_the_budget_and_the_rest_counted_once() {
        let site = Limiter::new();
        let t0 = Duration::from_secs(100);
        let admitted: Vec<u64> = (0..10_000).filter_map(|_| site.admit(t0)).collect();
        assert_eq!(admitted, vec![0; BUDGET as usize], "only the budget passes");
        // Still inside the window: nothing passes, however late in it.
        assert_eq!(site.admit(t0 + WINDOW - Duration::from_nanos(1)), None);
        // The next window reports every dropped line exactly once.
        assert_eq!(
            site.admit(t0 + WINDOW),
            Some(10_000 - u64::from(BUDGET) + 1)
        );
        assert_eq!(site.admit(t0 + WINDOW), Some(0));
    }

    #[test]
    fn a_slow_trickle_is_never_cut() {
        let site = Limiter::new();
        for s in 0..100 {
            assert_eq!(site.admit(Duration::from_millis(s * 200)), Some(0));
        }
    }

    #[test]
    fn sites_are_independent_and_threads_share_one() {
        let (a, b) = (Limiter::new(), Limiter::new());
        let t = Duration::ZERO;
        let passed = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1000).filter(|_| a.admit(t).is_some()).count()))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .sum::<usize>()
        });
        assert_eq!(passed, BUDGET as usize);
        assert_eq!(b.admit(t), Some(0), "another site has its own budget");
        assert_eq!(a.admit(t + WINDOW), Some(4000 - u64::from(BUDGET)));
    }

    #[test]
    fn the_next_window_says_how_many_lines_were_suppressed() {
        let site = Limiter::new();
        let t0 = Duration::from_secs(5);
        let lines = capture::lines_logged(|| {
            for i in 0..10_000 {
                log_at(&site, t0, log::Level::Warn, format_args!("bad write {i}"));
            }
            log_at(&site, t0 + WINDOW, log::Level::Warn, format_args!("again"));
            log_at(
                &site,
                t0 + WINDOW,
                log::Level::Warn,
                format_args!("and again"),
            );
        });
        let first: Vec<String> = (0..BUDGET).map(|i| format!("bad write {i}")).collect();
        assert_eq!(lines[..BUDGET as usize], first);
        assert_eq!(
            lines[BUDGET as usize..],
            ["9990 similar messages suppressed", "again", "and again"]
        );
    }

    #[test]
    fn the_macro_logs_the_budget_then_stays_quiet() {
        let flood = || {
            for i in 0..10_000 {
                guest_log!(Warn, "bad write {i}");
            }
        };
        let lines = capture::lines_logged(flood).len();
        // One window, or two if this thread was descheduled across a boundary.
        assert!(
            (BUDGET as usize..=2 * BUDGET as usize + 1).contains(&lines),
            "{lines} lines"
        );
    }
}
