//! Where an update's pause goes: CLOCK_MONOTONIC marks at the end of each of
//! its phases, on both sides of an exec or a transfer (one clock for every
//! process on the host), reported in the reply as `phases=NAME:US,...`.
//!
//! A mark is one vDSO clock read and a push into a vector reserved in advance:
//! the marks themselves cost the pause nothing measurable. The old side's
//! marks travel with the guest as text (`encode`): in an exec's environment,
//! after a transfer's STATE frame; both places an older molt ignores. What
//! arrives is only ever reported, never acted on, and is dropped unless it
//! reads as marks that end before this process's own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Every phase, in the order an update goes through them. A mark ends the
/// phase it names; the phase began at the previous mark (or at `begin`).
pub const NAMES: [&str; 18] = [
    // Old side: kicking the vCPUs to the last acknowledgement (before the
    // pause as SPEC.md counts it, which starts when the last vCPU stopped).
    "stop",
    "save_devices",
    "save_vm",
    "save_vcpus",
    // The state encoded (exec: also written to its memfd, sealed and handed
    // to the guardian; reboot mode: also written and synced to the file).
    "encode",
    // Exec: up to the new image's `main`; transfer: the STATE frame read.
    "execve",
    "send",
    // Exec: `main` to the exec message opened.
    "startup",
    "decode",
    // RAM mapped and checked (exec, reboot mode).
    "map_ram",
    // VM, devices, vCPUs created inside the pause (exec, reboot mode).
    "build",
    "restore_devices",
    "restore_vm",
    "restore_vcpus",
    // Transfer: RESTORED sent to GO received.
    "ack",
    // The vCPU threads running the guest.
    "start",
    // Not phases of their own: the slowest single vCPU's save or restore
    // (each vCPU's runs on its own thread, in parallel), inside save_vcpus
    // and restore_vcpus.
    "vcpu_save_max",
    "vcpu_restore_max",
];

/// The environment variable an exec carries the old side's marks in.
pub const ENV: &str = "MOLT_PAUSE_PHASES";

/// The most marks one update makes.
const MAX_MARKS: usize = 2 * NAMES.len();

/// When `main` began (CLOCK_MONOTONIC ns), 0 before.
static PROCESS_START: AtomicU64 = AtomicU64::new(0);

/// Notes that `main` begins now.
pub fn note_process_start() {
    PROCESS_START.store(now(), Ordering::Relaxed);
}

/// When `main` began.
pub fn process_start() -> u64 {
    PROCESS_START.load(Ordering::Relaxed)
}

/// CLOCK_MONOTONIC now, in ns.
pub fn now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`, a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One update's marks, on one side or carried over from the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phases {
    begin: u64,
    /// (index into NAMES, CLOCK_MONOTONIC ns at its end).
    marks: Vec<(u8, u64)>,
    /// (index into NAMES, duration in ns): the `*_max` entries.
    spans: Vec<(u8, u64)>,
}

fn index(name: &str) -> u8 {
    NAMES
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("unknown phase {name}")) as u8
}

impl Phases {
    /// Starts the clock: the first phase begins now.
    pub fn begin() -> Self {
        Self::begin_at(now())
    }

    pub fn begin_at(begin: u64) -> Self {
        Phases {
            begin,
            marks: Vec::with_capacity(MAX_MARKS),
            spans: Vec::with_capacity(4),
        }
    }

    /// Ends phase `name` now.
    pub fn mark(&mut self, name: &'static str) {
        self.mark_at(name, now());
    }

    pub fn mark_at(&mut self, name: &'static str, at: u64) {
        if self.marks.len() < MAX_MARKS {
            self.marks.push((index(name), at));
        }
    }

    /// Records `name` as the longest of `spans`.
    pub fn slowest(&mut self, name: &'static str, spans: impl IntoIterator<Item = Duration>) {
        if let Some(max) = spans.into_iter().max() {
            self.spans.push((index(name), max.as_nanos() as u64));
        }
    }

    /// When the last phase ended.
    pub fn last(&self) -> u64 {
        self.marks.last().map_or(self.begin, |m| m.1)
    }

    /// The marks as text for the next process: `begin;NAME@NS;...;NAME=NS`.
    pub fn encode(&self) -> String {
        let mut s = self.begin.to_string();
        for (i, t) in &self.marks {
            s += &format!(";{}@{t}", NAMES[*i as usize]);
        }
        for (i, d) in &self.spans {
            s += &format!(";{}={d}", NAMES[*i as usize]);
        }
        s
    }

    /// Reads what `encode` wrote; None for anything else, or for marks that
    /// do not run forward and end by `before` (from another boot, or stale).
    pub fn decode(text: &str, before: u64) -> Option<Self> {
        let mut parts = text.split(';');
        let mut p = Phases::begin_at(parts.next()?.parse().ok()?);
        let known = |name: &str| NAMES.iter().position(|n| *n == name).map(|i| i as u8);
        for part in parts {
            if let Some((name, t)) = part.split_once('@') {
                let t: u64 = t.parse().ok()?;
                if t < p.last() || p.marks.len() >= MAX_MARKS {
                    return None;
                }
                p.marks.push((known(name)?, t));
            } else {
                let (name, d) = part.split_once('=')?;
                if p.spans.len() >= 4 {
                    return None;
                }
                p.spans.push((known(name)?, d.parse().ok()?));
            }
        }
        (p.last() <= before && before - p.last() < 60_000_000_000).then_some(p)
    }

    /// Continues `self` (the old side's marks) with this side's.
    pub fn then(mut self, next: Phases) -> Phases {
        self.marks.extend(next.marks);
        self.marks.truncate(MAX_MARKS);
        self.spans.extend(next.spans);
        self
    }

    /// `NAME:US,...`: each phase's length in µs, in order, then the spans.
    pub fn summary(&self) -> String {
        let mut out = Vec::with_capacity(self.marks.len() + self.spans.len());
        let mut prev = self.begin;
        for (i, t) in &self.marks {
            out.push(format!(
                "{}:{}",
                NAMES[*i as usize],
                t.saturating_sub(prev) / 1000
            ));
            prev = *t;
        }
        for (i, d) in &self.spans {
            out.push(format!("{}:{}", NAMES[*i as usize], d / 1000));
        }
        out.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_sum_up_in_order() {
        let mut p = Phases::begin_at(1_000_000);
        p.mark_at("stop", 1_050_000);
        p.mark_at("save_vcpus", 1_250_000);
        p.slowest(
            "vcpu_save_max",
            [Duration::from_micros(90), Duration::from_micros(120)],
        );
        assert_eq!(p.summary(), "stop:50,save_vcpus:200,vcpu_save_max:120");
    }

    #[test]
    fn marks_cross_to_the_next_process() {
        let mut old = Phases::begin_at(10_000);
        old.mark_at("stop", 20_000);
        old.mark_at("encode", 50_000);
        old.slowest("vcpu_save_max", [Duration::from_micros(7)]);
        let got = Phases::decode(&old.encode(), 60_000).expect("decodes");
        assert_eq!(got, old);
        let mut new = Phases::begin_at(got.last());
        new.mark_at("send", 80_000);
        assert_eq!(
            got.then(new).summary(),
            "stop:10,encode:30,send:30,vcpu_save_max:7"
        );
    }

    #[test]
    fn stale_or_garbled_marks_are_dropped() {
        let mut old = Phases::begin_at(10_000);
        old.mark_at("stop", 20_000);
        let text = old.encode();
        // Ending after this process's own first mark: another boot's clock.
        assert_eq!(Phases::decode(&text, 15_000), None);
        // Long before: left over from an older update.
        assert_eq!(Phases::decode(&text, 120_000_000_000), None);
        for bad in [
            "",
            "x",
            "10;stop@5",
            "10;nosuch@20",
            "10;stop@x",
            "10;stop",
            "10;vcpu_save_max=y",
        ] {
            assert_eq!(Phases::decode(bad, 30), None, "{bad:?}");
        }
    }
}
