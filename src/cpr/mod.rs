//! Checkpoint/restore for live update (SPEC.md, "The three CPR modes"): the
//! table of contents. Each mode is one function on each side, which reads as
//! the numbered sequence of its steps:
//!
//! | mode | save side (`update.rs`) | restore side (`arrive.rs`) |
//! |---|---|---|
//! | reboot (`cpr-save PATH`, `--incoming file:`) | `save` | `receive_file`, `resume_file` |
//! | exec (`cpr-exec`, `--incoming fd:`) | `exec` | `receive_exec`, `resume_exec` (`rollback`) |
//! | transfer (`cpr-transfer PATH`, `--incoming unix:`) | `transfer` | `receive_transfer`, `resume_transfer` |
//!
//! The event loop calls in twice: `update::start` for a command (and
//! `Update::finish` once an exec's or transfer's worker is done), and
//! `arrive::receive` at start-up (then `Arrival::resume`). Below those:
//! `state` (the format) and `check` (its validation), `fds` (what is handed
//! over, by slot), and each mode's mechanics: `reboot` (the file), `exec` (the
//! memfd and execve) with `guardian`, `transfer` (the protocol); `worker` and
//! `wait` bound and stop every slow step.

pub mod arrive;
pub mod check;
pub mod exec;
pub mod fault;
pub mod fds;
pub mod guardian;
pub mod inspect;
pub mod reboot;
pub mod state;
pub mod transfer;
pub mod update;
pub mod wait;
mod worker;

use std::fmt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::virtio::block::Identity;
use crate::vm;

#[derive(Debug)]
pub enum Error {
    Vm(vm::Error),
    File(reboot::Error),
    NeedsMemFile(PathBuf),
    Memory(vm::memory::Error),
    Exec(exec::Error),
    Guardian(guardian::Error),
    Probe(PathBuf, String),
    /// The vCPUs would not stop.
    Pause(vm::vcpu::Error),
    /// The state a transfer sent would not decode.
    StateDecode(state::Error),
    /// The state would not encode for a transfer.
    StateEncode(state::Error),
    /// The handed-over descriptors hold no guest RAM.
    NoRam,
    DupTap(std::io::Error),
    DupVfio(std::io::Error),
    /// This image, kept open for a rollback.
    OwnExe(std::io::Error),
    Adopt(fds::Error),
    Transfer(transfer::Error),
    RamMismatch {
        now: u32,
        saved: u32,
    },
    /// A disk's name no longer leads to the image molt has open.
    DiskGone(PathBuf, &'static str),
    /// An open disk's identity could not be read for the state.
    DiskIdentity(usize, std::io::Error),
    /// A restart's disk is not the image the state was saved with.
    DiskChanged {
        index: usize,
        path: PathBuf,
        saved: Identity,
        now: Result<Identity, String>,
        /// The saved disk whose image this is, if another.
        swapped_with: Option<usize>,
    },
    HostCpu(PathBuf, vm::host_cpu::Error),
    /// `cpr-save` with a passed-through device while the guest is not
    /// suspended to RAM.
    VfioNotSuspended(crate::vfio::Bdf),
    /// A restart's `--vfio` devices are not those the state was saved with:
    /// each difference (`vfio::differences`).
    VfioChanged(Vec<String>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Vm(e) => e.fmt(f),
            Error::File(e) => e.fmt(f),
            Error::NeedsMemFile(p) => write!(
                f,
                "{} keeps guest RAM in the --mem-file it was saved with: pass that --mem-file",
                p.display()
            ),
            Error::Memory(e) => e.fmt(f),
            Error::Exec(e) => e.fmt(f),
            Error::Guardian(e) => e.fmt(f),
            Error::Probe(p, why) => write!(f, "{} cannot take the guest: {why}", p.display()),
            Error::Pause(e) => write!(f, "cannot pause: {e}"),
            Error::StateDecode(e) => write!(f, "handover: state: {e}"),
            Error::StateEncode(e) => write!(f, "handover: {e}"),
            Error::NoRam => write!(f, "handover: no RAM"),
            Error::DupTap(e) => write!(f, "handover: dup tap: {e}"),
            Error::DupVfio(e) => write!(f, "handover: dup VFIO descriptor: {e}"),
            Error::OwnExe(e) => write!(f, "handover: cannot open /proc/self/exe: {e}"),
            Error::Adopt(e) => write!(f, "handover: {e}"),
            Error::Transfer(e) => e.fmt(f),
            Error::DiskGone(p, why) => write!(
                f,
                "disk {} {why}: a restart would not find what the guest wrote \
                 (cpr-exec and cpr-transfer carry the open image)",
                p.display()
            ),
            Error::DiskIdentity(i, e) => write!(f, "disk {i}: cannot read its size and inode: {e}"),
            Error::DiskChanged {
                index,
                path,
                saved,
                now,
                swapped_with,
            } => {
                write!(
                    f,
                    "disk {index} ({}) is not the image the guest was saved with ({saved}): ",
                    path.display()
                )?;
                match (now, swapped_with) {
                    (Err(e), _) => write!(f, "cannot open it: {e}"),
                    (Ok(_), Some(j)) => {
                        write!(
                            f,
                            "it is the image saved as disk {j}: disks swapped on argv?"
                        )
                    }
                    (Ok(n), None) if n.same_file(saved) => {
                        write!(f, "it was resized to {} bytes", n.size)
                    }
                    (Ok(n), None) => write!(f, "it is another file ({n}): replaced?"),
                }
            }
            Error::RamMismatch { now, saved } => write!(
                f,
                "guest RAM is not the RAM that was saved (page sample CRC {now:#010x}, \
                 saved {saved:#010x}): wrong --mem-file?"
            ),
            Error::VfioNotSuspended(bdf) => write!(
                f,
                "VFIO device {bdf}: the guest is not suspended: {}",
                crate::vfio::HOW_TO_SUSPEND
            ),
            Error::VfioChanged(d) => write!(
                f,
                "the --vfio devices are not those the guest was saved with (pass the same \
                 devices in the same order; the file is left as it is): {}",
                d.join("; ")
            ),
            Error::HostCpu(p, e) => write!(
                f,
                "the guest saved in {} cannot run on this host (the file is left as it is): {e}",
                p.display()
            ),
        }
    }
}

/// The release, as `status`, `molt version`, saved states and hand-shakes
/// report it. Set at build time by `MOLT_BUILD_VERSION` (upgrade tests build
/// two differing binaries), else the crate's.
pub const VERSION: &str = match option_env!("MOLT_BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// `molt version`: the release and the state formats it reads.
pub fn version_line() -> String {
    format!("molt {VERSION} state-formats={}", state::formats())
}

/// CLOCK_REALTIME now, in ns: the one clock both sides of a restart (or
/// kexec) share. The pause starts when the last vCPU stopped.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What encoding or decoding a state does the first time in a process, done
/// before a pause (the first update of a molt, the new side of a transfer):
/// this thread's stack written as deep as that goes (each fresh page is a
/// fault in the pause: ~70 decoding 8 vCPUs, 3-4 µs each on a nested host),
/// and the CRC's CPU feature detection (CPUID, which traps to the host: ~40 µs).
pub fn prefault() {
    #[inline(never)]
    fn stack() {
        let mut deep = [0u8; 256 << 10];
        std::hint::black_box(&mut deep);
    }
    stack();
    std::hint::black_box(crc32fast::hash(&[]));
}

/// CLOCK_REALTIME (ns) at `mono`, a CLOCK_MONOTONIC instant of `phases::now`:
/// the pause is measured between two phase marks, in the clock a restart
/// shares. Read between two monotonic reads, the tightest pair of three, so
/// that a preemption between the clock reads (milliseconds on a loaded host)
/// does not land in the pause.
pub fn realtime_at(mono: u64) -> u64 {
    let mut best = (u64::MAX, 0i128);
    for _ in 0..3 {
        let before = crate::phases::now();
        let real = now_ns();
        let after = crate::phases::now();
        let width = after.saturating_sub(before);
        if width < best.0 {
            best = (width, i128::from(real) - i128::from(before + width / 2));
        }
    }
    (i128::from(mono) + best.1).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monotonic_instant_maps_to_the_realtime_of_that_instant() {
        let mono = crate::phases::now();
        let real = now_ns();
        // An instant 5 ms earlier maps 5 ms earlier, whenever it is asked.
        let then = realtime_at(mono - 5_000_000);
        assert!(
            real.abs_diff(then + 5_000_000) < 2_000_000,
            "realtime {real}, mapped {then} for 5 ms before"
        );
        let again = realtime_at(mono - 5_000_000);
        assert!(then.abs_diff(again) < 100_000, "{then} then {again}");
    }
}
