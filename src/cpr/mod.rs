//! Checkpoint/restore for live update (SPEC.md, "The three CPR modes").
//!
//! The CPR sequence, reboot mode:
//! 1. `cpr-save PATH`: pause the vCPUs (the last one stopping starts the pause),
//!    `Machine::save` (devices, VM, vCPUs), write PATH atomically (`reboot`),
//!    reply, exit 0. A failure resumes the guest and replies `error: ...`.
//! 2. `molt run <same args> --incoming file:PATH`: decode and check the state,
//!    rebuild the machine around the same RAM (in place, or read back from the
//!    file), `Machine::restore`, start the vCPUs (the pause ends).

pub mod inspect;
pub mod reboot;
pub mod state;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::args::RunConfig;
use crate::devices::serial::Output;
use crate::vm::memory::GuestRam;
use crate::vm::vcpu::ExitSink;
use crate::vm::{self, Machine};
use state::{CprState, RamLocation};

#[derive(Debug)]
pub enum Error {
    Vm(vm::Error),
    File(reboot::Error),
    NeedsMemFile(PathBuf),
    Memory(vm::memory::Error),
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
        }
    }
}

/// CLOCK_REALTIME in ns: the one clock both sides of a restart (or kexec) share.
fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What a successful save reports.
pub struct Saved {
    pub bytes: u64,
    pub save_us: u64,
}

/// Reboot mode, step 1, on a paused machine: saves it to `path`.
pub fn save_to_file(machine: &Machine, path: &Path, ram_in_place: bool) -> Result<Saved, Error> {
    let start = Instant::now();
    let stopped_at_ns = realtime_ns();
    let state = CprState {
        writer: heapless::String::try_from(crate::event_loop::VERSION).unwrap_or_default(),
        ram: if ram_in_place {
            RamLocation::InPlace
        } else {
            RamLocation::InStateFile
        },
        stopped_at_ns,
        machine: machine.save().map_err(Error::Vm)?,
    };
    let bytes = reboot::save(path, &state, &machine.ram).map_err(Error::File)?;
    Ok(Saved {
        bytes,
        save_us: start.elapsed().as_micros() as u64,
    })
}

/// What a successful resume reports.
pub struct Resumed {
    pub machine: Machine,
    /// Reading the state and rebuilding the machine, in this process.
    pub restore_us: u64,
    /// Last vCPU stopped in the old process to the vCPUs running here.
    pub pause_us: u64,
}

/// Reboot mode, step 2: resumes the machine saved in `path`.
pub fn resume_from_file(
    cfg: &RunConfig,
    path: &Path,
    console: Output,
    exit: ExitSink,
) -> Result<Resumed, Error> {
    let start = Instant::now();
    let (state, mut rest) = reboot::load_state(path).map_err(Error::File)?;
    let saved = &state.machine.shape;
    if saved.mem_size != cfg.mem_size {
        let diff = format!("memory: saved {}, now {}", saved.mem_size, cfg.mem_size);
        return Err(Error::Vm(vm::Error::Mismatch(diff)));
    }
    if state.ram == RamLocation::InPlace && cfg.mem_file.is_none() {
        return Err(Error::NeedsMemFile(path.into()));
    }
    let ram = GuestRam::create(cfg.mem_size, cfg.mem_file.as_deref()).map_err(Error::Memory)?;
    if state.ram == RamLocation::InStateFile {
        reboot::load_ram(path, &mut rest, &ram).map_err(Error::File)?;
    }
    let machine = Machine::restore(cfg, ram, console, exit, &state.machine).map_err(Error::Vm)?;
    Ok(Resumed {
        machine,
        restore_us: start.elapsed().as_micros() as u64,
        pause_us: realtime_ns().saturating_sub(state.stopped_at_ns) / 1000,
    })
}
