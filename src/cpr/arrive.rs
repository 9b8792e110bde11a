//! The receiving side of an update: `molt run <same args> --incoming
//! file:PATH | fd:N | unix:PATH`, one function per mode, each the numbered
//! sequence of its steps. Step 1 of every mode is `receive`: the state (and,
//! for exec and transfer, the descriptors) arrives and is checked before
//! anything is opened or built. The event loop then opens what was not handed
//! over (console, control socket) and calls `Arrival::resume`.

use std::fs::File;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::fds::{self, Adopted, Handover};
use super::state::{self, CprState, RamLocation, RunState};
use super::{exec, guardian, reboot, transfer, Error, VERSION};
use crate::args::{Incoming, RunConfig};
use crate::devices::serial::Output;
use crate::phases::{self, Phases};
use crate::terminal::Original;
use crate::vfio::{self, HandedOver, Sysfs};
use crate::virtio::block::Identity;
use crate::vm::host_cpu::{HostCpu, Probe, Supported};
use crate::vm::memory::GuestRam;
use crate::vm::vcpu::ExitSink;
use crate::vm::vcpu_state;
use crate::vm::{self, Machine};

/// What `--incoming` brought.
pub enum Received {
    /// No `--incoming`: boot.
    Nothing,
    /// A signal ended the wait for the old process (transfer).
    Stopped,
    Guest(Arrival),
}

/// A guest received and checked, not yet running here.
pub enum Arrival {
    /// Each boxed: the exec header holds the whole descriptor table.
    File(Box<FileIncoming>),
    Exec(Box<ExecIncoming>),
    Transfer(Box<TransferIncoming>),
}

/// The guest runs here.
pub struct Arrived {
    pub machine: Machine,
    /// Last vCPU stopped in the old process to the vCPUs running here.
    pub pause_us: u64,
    /// Where the pause went (`Phases::summary`).
    pub phases: String,
    /// Paused if the guest was paused when saved: its vCPUs wait for `resume`.
    pub run: RunState,
    /// The control socket, when it came with the guest.
    pub listener: Option<OwnedFd>,
    /// The client that asked for the update, and its reply.
    pub greeting: Option<(OwnedFd, String)>,
    /// The event watchers handed over with the guest.
    pub watchers: Vec<OwnedFd>,
    /// What they are told: the event's name and detail.
    pub event: Option<(&'static str, String)>,
    /// The molt version that wrote the state.
    from: String,
}

/// Step 1 of every mode's restore side. `stop` (the signalfd) ends a
/// transfer's wait for the old process.
pub fn receive(cfg: &RunConfig, stop: RawFd) -> Result<Received, Error> {
    let arrival = match &cfg.incoming {
        None => return Ok(Received::Nothing),
        Some(Incoming::File(path)) => Arrival::File(Box::new(receive_file(cfg, path)?)),
        Some(Incoming::Fd(fd)) => Arrival::Exec(Box::new(receive_exec(cfg, *fd)?)),
        Some(Incoming::Unix(path)) => match receive_transfer(cfg, path, stop)? {
            Some(t) => Arrival::Transfer(Box::new(t)),
            None => return Ok(Received::Stopped),
        },
    };
    Ok(Received::Guest(arrival))
}

impl Arrival {
    /// The console's output and input, when they came with the guest.
    pub fn take_console(&mut self) -> (Option<File>, Option<OwnedFd>) {
        let a = match self {
            Arrival::File(_) => return (None, None),
            Arrival::Exec(e) => &mut e.adopted,
            Arrival::Transfer(t) => &mut t.adopted,
        };
        (a.console_out.take(), a.console_in.take())
    }

    /// The user's mode of the console's terminal, when it came with the guest
    /// (the terminal is raw: the previous molt made it so).
    pub fn terminal(&self) -> Option<Original> {
        match self {
            Arrival::File(_) => None,
            Arrival::Exec(e) => e.header.terminal,
            Arrival::Transfer(t) => t.link.terminal,
        }
    }

    /// Whether the control socket comes with the guest (exec and transfer
    /// hand it over; the old process had bound it).
    pub fn hands_listener(&self) -> bool {
        !matches!(self, Arrival::File(_))
    }

    /// Rebuilds the machine around the state and runs it.
    pub fn resume(
        self,
        cfg: &RunConfig,
        console: Output,
        exit: ExitSink,
    ) -> Result<Arrived, Error> {
        match self {
            Arrival::File(inc) => resume_file(*inc, cfg, console, exit),
            Arrival::Exec(inc) => resume_exec(*inc, cfg, console, exit),
            Arrival::Transfer(inc) => resume_transfer(*inc, cfg, console, exit),
        }
    }
}

/// Reboot mode: the state in a file, read and checked.
pub struct FileIncoming {
    path: PathBuf,
    /// Boxed, as below: a state is ~10 KiB per vCPU.
    state: Box<CprState>,
    /// The file after the state: the RAM section, or its end.
    rest: std::io::BufReader<File>,
    start: Instant,
    phases: Phases,
    made: Made,
}

/// What reboot mode made of the machine while it read the state.
enum Made {
    /// Its RAM, VM and vCPUs (`vm::Early`): the state was checked against
    /// them. RAM kept in place: its sample (`check_ram`), read meanwhile.
    Early(Box<vm::Early>, GuestRam, Option<u32>),
    /// Nothing (RAM could not be mapped as it is, or KVM failed there): a
    /// probe VM answered the check, and the machine is built after it. The
    /// probe's KVM_GET_SUPPORTED_CPUID: the machine's vCPUs get it.
    Probe(Probe, kvm_bindings::CpuId),
}

/// Reboot mode, step 1: reads the state in `path` and checks it against argv,
/// the disks named there and this host's KVM, before anything else is opened
/// or created: a refused state leaves the file, the console and `--mem-file`
/// as they were, and the error says why.
fn receive_file(cfg: &RunConfig, path: &Path) -> Result<FileIncoming, Error> {
    let start = Instant::now();
    let mut phases = Phases::begin_at(phases::process_start());
    phases.mark("startup");
    // The machine's RAM, VM and vCPUs need nothing of the state (argv says
    // what they are): RAM mapped as it is (None where that would change
    // anything), then the VM and vCPUs made on a second thread (~1-2.5 ms
    // here, most of this phase) while this one reads the state, checks it
    // against argv, the disks and sysfs, and reads RAM's sample. What this
    // host's KVM offers is asked of the vCPUs; that verdict comes after the
    // others, as when it ran after them.
    let ram = GuestRam::map_as_is(cfg.mem_size, cfg.mem_file.as_deref());
    let (checked, early, sample) = std::thread::scope(|s| {
        let early = ram.as_ref().map(|ram| s.spawn(|| make_early(cfg, ram)));
        let checked = load_and_check(cfg, path);
        let sample = match (&checked, &ram) {
            (Ok((state, _)), Some(ram)) if state.ram != RamLocation::InStateFile => {
                Some(ram.sample_crc())
            }
            _ => None,
        };
        let early = early.and_then(|e| e.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        (checked, early, sample)
    });
    let (state, rest) = checked?;
    // `Prepared::restore` checks again, for every mode; here it runs before
    // RAM is loaded or the devices opened.
    let vcpus = || state.machine.vcpus.iter().map(|v| &**v);
    let made = match early.zip(ram) {
        Some((early, ram)) => early
            .host
            .check(vcpus())
            .map(|()| Made::Early(Box::new(early), ram, sample)),
        // Its probe VM is released once the guest runs.
        None => HostCpu::open().and_then(|(host, probe, supported)| {
            host.check(vcpus())?;
            Ok(Made::Probe(probe, supported))
        }),
    }
    .map_err(|e| Error::HostCpu(path.into(), e))?;
    phases.mark("decode");
    Ok(FileIncoming {
        path: path.into(),
        state: Box::new(state),
        rest,
        start,
        phases,
        made,
    })
}

/// Reboot mode's VM and vCPUs over `ram`, made before the state is checked;
/// None if that fails (made after the check, which then says why).
fn make_early(cfg: &RunConfig, ram: &GuestRam) -> Option<vm::Early> {
    vm::Early::make(cfg, ram)
        .map_err(|e| log::debug!("the VM is made after the state is checked: {e}"))
        .ok()
}

/// Reboot mode: the state in `path` read and checked against argv, the
/// disks named there and sysfs (everything but this host's KVM).
fn load_and_check(
    cfg: &RunConfig,
    path: &Path,
) -> Result<(CprState, std::io::BufReader<File>), Error> {
    let (state, mut rest) = reboot::load_state(path).map_err(Error::File)?;
    let diff = vm::Shape::argv_differences(cfg, &state.machine.shape);
    if !diff.is_empty() {
        return Err(Error::Vm(vm::Error::Shape(diff)));
    }
    if let RamLocation::InPlace { .. } = state.ram {
        if cfg.mem_file.is_none() {
            return Err(Error::NeedsMemFile(path.into()));
        }
        reboot::expect_end(path, &mut rest).map_err(Error::File)?;
    }
    check_disk_identities(cfg, &state.disks)?;
    check_vfio(cfg, &state.vfio, &Sysfs::host())?;
    Ok((state, rest))
}

/// Reboot mode, restore side.
fn resume_file(
    inc: FileIncoming,
    cfg: &RunConfig,
    console: Output,
    exit: ExitSink,
) -> Result<Arrived, Error> {
    let FileIncoming {
        path,
        state,
        mut rest,
        start,
        mut phases,
        made,
    } = inc;
    // 2. Guest RAM: the --mem-file as it is, or read back from the state file.
    // 3. RAM kept in place must be the RAM that was saved.
    let load = |ram: &GuestRam, rest: &mut std::io::BufReader<File>, sample: Option<u32>| {
        if state.ram == RamLocation::InStateFile {
            reboot::load_ram(&path, rest, ram).map_err(Error::File)?;
        }
        check_sample(&state, || sample.unwrap_or_else(|| ram.sample_crc()))
    };
    // 4. Build the rest of the machine, restore it and run it (paused, if
    //    it was).
    let (machine, probe) = match made {
        Made::Early(early, ram, sample) => {
            load(&ram, &mut rest, sample)?;
            phases.mark("map_ram");
            let prepared =
                Machine::prepare_early(cfg, (*early, ram), console, exit).map_err(Error::Vm)?;
            (run_prepared(prepared, &state, &mut phases, || {})?, None)
        }
        Made::Probe(probe, supported) => {
            let ram =
                GuestRam::create(cfg.mem_size, cfg.mem_file.as_deref()).map_err(Error::Memory)?;
            load(&ram, &mut rest, None)?;
            phases.mark("map_ram");
            let supported = Supported::Known(supported);
            let machine = restore(
                cfg,
                &state,
                ram,
                None,
                (console, exit, supported),
                &mut phases,
                || {},
            )?;
            (machine, Some(probe))
        }
    };
    // 5. The guest runs: KVM tears the probe VM down off the main thread.
    if let Some(probe) = probe {
        probe.release();
    }
    let arrived = arrived(machine, &state, &phases, None, None);
    log::info!(
        "resumed from {}: restore_us={} pause_us={} phases={}",
        path.display(),
        start.elapsed().as_micros(),
        arrived.pause_us,
        arrived.phases
    );
    Ok(arrived)
}

/// The devices `cfg` configures, whose descriptors a hand-over brings.
fn counts(cfg: &RunConfig) -> fds::Counts {
    fds::Counts {
        disks: cfg.disks.len(),
        nets: cfg.nets.len(),
        vfio: cfg.vfio.len(),
    }
}

/// Exec mode: what the new image received.
pub struct ExecIncoming {
    pub(super) header: exec::ExecHeader,
    pub(super) state: Box<CprState>,
    /// The format the previous image wrote: a rollback writes it again.
    pub(super) format: u32,
    pub(super) adopted: Adopted,
    /// The pause so far: the old image's marks, if they came, then this one's.
    pub(super) phases: Phases,
    /// This host's KVM_GET_SUPPORTED_CPUID, handed over or asked once the
    /// descriptors are adopted (taken by the restore; None: asked then).
    pub(super) supported: Option<Supported>,
}

/// Exec mode, step 1: reads the exec message in `fd` and adopts the
/// descriptors it names.
fn receive_exec(cfg: &RunConfig, fd: RawFd) -> Result<ExecIncoming, Error> {
    let started = phases::process_start();
    let old = std::env::var(phases::ENV)
        .ok()
        .and_then(|t| Phases::decode(&t, started));
    let mut phases = match old {
        Some(old) => {
            let mut here = Phases::begin_at(old.last());
            here.mark_at("execve", started);
            old.then(here)
        }
        None => Phases::begin_at(started),
    };
    phases.mark("startup");
    let (header, state, format) = exec::receive(fd).map_err(Error::Exec)?;
    phases.mark("decode");
    let adopted = fds::adopt(&header.table.kinds, &header.table.numbers, counts(cfg))
        .map_err(Error::Adopt)?;
    super::fault::point("adopted");
    // What this host's KVM supports does not depend on the state: handed
    // over by the previous image (the same kernel), or asked on a thread of
    // its own from here, while RAM is mapped and the VM built
    // (`Machine::prepare` takes it). Not before the descriptors are adopted:
    // its /dev/kvm must not take a number the table names but was not open.
    let supported = Supported::handed_over().map_or_else(Supported::ask, Supported::Known);
    Ok(ExecIncoming {
        header,
        state: Box::new(state),
        format,
        adopted,
        phases,
        supported: Some(supported),
    })
}

/// Exec mode, restore side. The adopted descriptors stay open until the
/// guest runs, so a failure can still roll back with them.
fn resume_exec(
    mut inc: ExecIncoming,
    cfg: &RunConfig,
    console: Output,
    exit: ExitSink,
) -> Result<Arrived, Error> {
    let start = Instant::now();
    // 2. Map the handed-over RAM; reopen the disks through their descriptors.
    // 3. RAM must be the RAM that was saved.
    // 4. Rebuild the machine and restore it. Just before its vCPUs run, the
    //    guardian (if any) leaves: a later death of this image must not make
    //    it resume an older copy. Until then its line stays in `inc`, for a
    //    rollback to hand on.
    // No other process can run the guest: mappings a failed image took are
    // taken back (a rollback).
    inc.adopted.vfio.take_back = true;
    let mut phases = inc.phases.clone();
    let resumed = adopted_config(cfg, &inc.adopted).and_then(|(cfg, ram, vfio)| {
        check_ram(&inc.state, &ram)?;
        phases.mark("map_ram");
        let line = &mut inc.adopted.guardian;
        let supported = inc.supported.take().unwrap_or_else(Supported::ask);
        restore(
            &cfg,
            &inc.state,
            ram,
            vfio,
            (console, exit, supported),
            &mut phases,
            || {
                if let Some(line) = line.take() {
                    guardian::release(line);
                }
            },
        )
    });
    let machine = match resumed {
        Ok(m) => m,
        // This image cannot resume the guest: exec the previous one, with the
        // same state and descriptors, which resumes it and replies the error.
        // (Returns only if that exec fails too.)
        Err(e) if inc.header.failure.is_none() => {
            log::error!("cannot resume after exec ({e}): rolling back");
            return Err(rollback(&inc, &e.to_string()));
        }
        Err(e) => return Err(e),
    };
    // 5. The guest runs: KVM tears the old VM down off the main thread.
    let stale = std::mem::take(&mut inc.adopted.stale_kvm);
    if !stale.is_empty() {
        let _ = std::thread::Builder::new()
            .name("old-vm-release".into())
            .spawn(move || drop(stale));
    }
    let failure = inc.header.failure.as_ref().map(|why| {
        format!("the new binary could not resume the guest ({why}); it runs on the previous binary")
    });
    let a = &mut inc.adopted;
    let mut arrived = arrived(
        machine,
        &inc.state,
        &phases,
        a.listener.take(),
        a.client.take(),
    );
    arrived.watchers = std::mem::take(&mut a.watchers);
    log::info!(
        "resumed after exec: restore_us={} pause_us={} phases={} state_format={}",
        start.elapsed().as_micros(),
        arrived.pause_us,
        arrived.phases,
        inc.format
    );
    Ok(match failure {
        None => arrived.replying("exec"),
        Some(why) => Arrived {
            greeting: arrived
                .greeting
                .map(|(c, _)| (c, format!("error: cpr-exec: {why}"))),
            event: Some(("update-failed", format!("mode=exec reason={why}"))),
            ..arrived
        },
    })
}

/// The new image could not resume (or, from the guardian, died): exec the
/// previous one with the same state and descriptors, telling it why. Returns
/// only if that exec fails too.
pub(super) fn rollback(inc: &ExecIncoming, why: &str) -> Error {
    let header = exec::ExecHeader {
        failure: Some(why.to_string()),
        ..inc.header.clone()
    };
    let target = match &inc.adopted.previous_exe {
        Some(f) => exec::Target::Fd(f.as_raw_fd()),
        None => exec::Target::Path(Path::new(&inc.header.previous_exe)),
    };
    let ready = match exec::Ready::new(inc.state.machine.vcpus.len()) {
        Ok(r) => r,
        Err(e) => return Error::Exec(e),
    };
    Error::Exec(exec::exec(
        target,
        &inc.header.previous_argv,
        (&inc.state, inc.format, ready),
        &Handover::of(&inc.adopted).slots(),
        header,
        None,
        None,
    ))
}

/// Transfer mode, new side: what arrived with HELLO.
pub struct TransferIncoming {
    link: transfer::Incoming,
    adopted: Adopted,
}

/// Transfer mode, step 1: waits on `path` for the old process (None if `stop`
/// fired first), checks it (uid, HELLO) and adopts what it hands over.
fn receive_transfer(
    cfg: &RunConfig,
    path: &Path,
    stop: RawFd,
) -> Result<Option<TransferIncoming>, Error> {
    let Some(mut link) = transfer::accept(path, stop).map_err(Error::Transfer)? else {
        return Ok(None);
    };
    log::info!("taking the guest over from molt {}", link.peer_version);
    let kinds = std::mem::take(&mut link.kinds);
    let fds: Vec<RawFd> = std::mem::take(&mut link.fds)
        .into_iter()
        .map(IntoRawFd::into_raw_fd)
        .collect();
    match fds::adopt(&kinds, &fds, counts(cfg)) {
        Ok(adopted) => {
            super::fault::point("adopted");
            Ok(Some(TransferIncoming { link, adopted }))
        }
        Err(why) => {
            link.fail(&why.to_string());
            Err(Error::Adopt(why))
        }
    }
}

/// How long a transfer's new side spends at most filling its VM's page
/// tables before READY (`Prepared::prefault`): well inside the old side's
/// `transfer::READY_TIMEOUT`, which also covers building the machine.
const PREFAULT_BUDGET: Duration = Duration::from_secs(10);

/// Transfer mode, restore side.
fn resume_transfer(
    mut t: TransferIncoming,
    cfg: &RunConfig,
    console: Output,
    exit: ExitSink,
) -> Result<Arrived, Error> {
    // 2. Map RAM and build the VM and devices while the old process still
    //    runs the guest.
    let prepared = adopted_config(cfg, &t.adopted).and_then(|(cfg, ram, vfio)| {
        let prepared = vm::Machine::prepare(&cfg, ram, console, vfio, (exit, Supported::ask()))
            .map_err(Error::Vm)?;
        log::info!("{}", prepared.prefault(PREFAULT_BUDGET));
        super::fault::point("built");
        Ok(prepared)
    });
    // The buffer STATE arrives in and the vCPU states it decodes into,
    // their pages written while the guest runs; and what else decoding it
    // would do the first time (`cpr::prefault`).
    let vcpus = usize::from(cfg.vcpus);
    t.link.reserve(state::room(vcpus));
    let mut spares: Vec<_> = (0..vcpus).map(|_| vcpu_state::blank()).collect();
    super::prefault();
    // 3. READY; the old process pauses the guest and sends STATE.
    // 4. Decode, check and restore it (the vCPUs do not run yet).
    let loaded = prepared.and_then(|prepared| {
        let (bytes, max_pause, old) = t.link.ready().map_err(Error::Transfer)?;
        super::fault::point("state");
        let start = Instant::now();
        let mut phases = old.unwrap_or_else(Phases::begin);
        let (state, format) =
            state::decode_format_into(bytes, &mut spares).map_err(Error::StateDecode)?;
        phases.mark("decode");
        let restored = prepared
            .restore(&state.machine, &mut phases)
            .map_err(Error::Vm)?;
        log_vfio(&restored);
        super::fault::point("restored");
        Ok((restored, (state, format), start, max_pause, phases))
    });
    // 5. RESTORED, then wait for GO: without it nothing runs, and a failure,
    //    a signal or silence ends it here (FAIL tells the old process why).
    let go = loaded.and_then(|(restored, state, start, max_pause, mut phases)| {
        t.link.restored(max_pause).map_err(Error::Transfer)?;
        phases.mark("ack");
        Ok((restored, state, start, phases))
    });
    let (restored, (state, format), start, mut phases) = match go {
        Ok(r) => r,
        Err(e) => {
            t.link.fail(&e.to_string());
            return Err(e);
        }
    };
    // 6. Run the vCPUs (unless the guest was paused or suspended): the pause ends.
    let machine = run_vcpus(restored, state.run, &mut phases)?;
    let a = &mut t.adopted;
    let mut arrived = arrived(machine, &state, &phases, a.listener.take(), a.client.take());
    arrived.watchers = std::mem::take(&mut a.watchers);
    log::info!(
        "resumed after transfer: restore_us={} pause_us={} phases={} state_format={format}",
        start.elapsed().as_micros(),
        arrived.pause_us,
        arrived.phases
    );
    Ok(arrived.replying("transfer"))
}

fn arrived(
    machine: Machine,
    state: &CprState,
    phases: &Phases,
    listener: Option<OwnedFd>,
    client: Option<OwnedFd>,
) -> Arrived {
    // The pause ended at the last mark (the vCPUs let run).
    Arrived {
        machine,
        pause_us: super::realtime_at(phases.last()).saturating_sub(state.stopped_at_ns) / 1000,
        phases: phases.summary(),
        run: state.run,
        listener,
        greeting: client.map(|c| (c, String::new())),
        watchers: Vec::new(),
        event: None,
        from: state.writer.to_string(),
    }
}

impl Arrived {
    /// The asking client's reply and the watchers' event for a successful
    /// update in `mode`.
    fn replying(self, mode: &str) -> Arrived {
        let reply = format!(
            "ok resumed mode={mode} pause_us={} version={VERSION} phases={}",
            self.pause_us, self.phases
        );
        let detail = format!(
            "mode={mode} pause_us={} from={} to={VERSION}",
            self.pause_us, self.from
        );
        Arrived {
            greeting: self.greeting.map(|(c, _)| (c, reply)),
            event: Some(("update-finished", detail)),
            ..self
        }
    }
}

/// `cfg` rewritten to use handed-over descriptors instead of names: RAM and
/// disks reopened through /proc/self/fd (a fresh open file description of the
/// same file), taps and VFIO descriptors adopted by duplicate (the originals
/// stay with `a`, for a rollback). Returns the config, the mapped RAM and the
/// VFIO descriptors (None without passed-through devices).
fn adopted_config(
    cfg: &RunConfig,
    a: &Adopted,
) -> Result<(RunConfig, GuestRam, Option<HandedOver>), Error> {
    let mut cfg = cfg.clone();
    let ram = a.ram.as_ref().ok_or(Error::NoRam)?;
    let path = fds::proc_path(ram);
    let ram = GuestRam::adopt(cfg.mem_size, &path).map_err(Error::Memory)?;
    cfg.mem_file = Some(path);
    for (d, f) in cfg.disks.iter_mut().zip(&a.disks) {
        d.path = fds::proc_path(f);
    }
    for (n, t) in cfg.nets.iter_mut().zip(&a.taps) {
        let dup = t.try_clone().map_err(Error::DupTap)?;
        n.backend = crate::args::NetBackend::Fd(dup.into_raw_fd());
    }
    let vfio = match a.vfio.container {
        Some(_) => Some(a.vfio.try_clone().map_err(Error::DupVfio)?),
        None => None,
    };
    Ok((cfg, ram, vfio))
}

/// RAM kept in place must be the RAM that was saved.
fn check_ram(state: &CprState, ram: &GuestRam) -> Result<(), Error> {
    check_sample(state, || ram.sample_crc())
}

/// `check_ram`, RAM's sample read by `now` (only if kept in place).
fn check_sample(state: &CprState, now: impl FnOnce() -> u32) -> Result<(), Error> {
    if let RamLocation::InPlace { sample_crc } = state.ram {
        let now = now();
        if now != sample_crc {
            return Err(Error::RamMismatch {
                now,
                saved: sample_crc,
            });
        }
    }
    Ok(())
}

/// Reboot mode reopens the disks by name: each must be the image the state
/// was saved with (a state of format 1 did not record them).
fn check_disk_identities(cfg: &RunConfig, saved: &[Identity]) -> Result<(), Error> {
    if saved.is_empty() {
        return Ok(());
    }
    let now: Vec<Result<Identity, String>> = cfg
        .disks
        .iter()
        .map(|d| {
            File::open(&d.path)
                .and_then(|f| Identity::of(&f))
                .map_err(|e| e.to_string())
        })
        .collect();
    for (index, (disk, (saved_id, now_id))) in
        cfg.disks.iter().zip(saved.iter().zip(now)).enumerate()
    {
        if now_id.as_ref() == Ok(saved_id) {
            continue;
        }
        let swapped_with = now_id
            .as_ref()
            .ok()
            .and_then(|n| saved.iter().position(|s| s == n));
        return Err(Error::DiskChanged {
            index,
            path: disk.path.clone(),
            saved: *saved_id,
            now: now_id,
            swapped_with,
        });
    }
    Ok(())
}

/// Reboot mode opens the passed-through devices by name: argv must name the
/// devices the state was saved with, at the same PCI slots, and sysfs must
/// show the same devices there (vendor and device ID). Checked before
/// anything is opened; a device sysfs does not know is refused when opened.
fn check_vfio(cfg: &RunConfig, saved: &[vfio::Identity], sysfs: &Sysfs) -> Result<(), Error> {
    let virtio = cfg.disks.len() + cfg.nets.len();
    let now: Vec<vfio::Named> = cfg
        .vfio
        .iter()
        .enumerate()
        .map(|(i, &bdf)| vfio::Named {
            bdf,
            slot: vm::devices::vfio_slot(virtio, i),
            ids: sysfs.ids(&bdf),
        })
        .collect();
    let diff = vfio::differences(saved, &now);
    if diff.is_empty() {
        Ok(())
    } else {
        Err(Error::VfioChanged(diff))
    }
}

/// Rebuilds the machine around `ram`, loads `state` and runs it;
/// `before_start` runs once nothing can fail any more but the vCPUs, just
/// before they start.
#[allow(clippy::too_many_arguments)]
fn restore(
    cfg: &RunConfig,
    state: &CprState,
    ram: GuestRam,
    vfio: Option<HandedOver>,
    (console, exit, supported): (Output, ExitSink, Supported),
    phases: &mut Phases,
    before_start: impl FnOnce(),
) -> Result<Machine, Error> {
    let prepared =
        Machine::prepare(cfg, ram, console, vfio, (exit, supported)).map_err(Error::Vm)?;
    run_prepared(prepared, state, phases, before_start)
}

/// `restore` once the machine is built.
fn run_prepared(
    prepared: vm::Prepared,
    state: &CprState,
    phases: &mut Phases,
    before_start: impl FnOnce(),
) -> Result<Machine, Error> {
    phases.mark("build");
    super::fault::point("built");
    let restored = prepared
        .restore(&state.machine, phases)
        .map_err(Error::Vm)?;
    log_vfio(&restored);
    super::fault::point("restored");
    before_start();
    run_vcpus(restored, state.run, phases)
}

/// The VFIO part of the pause on this side, for the log (and `bench`).
fn log_vfio(restored: &vm::Restored) {
    if let Some(t) = restored.vfio_times {
        log::info!(
            "VFIO taken over: map_vaddr_us={} irq_attach_us={}",
            t.map_vaddr_us,
            t.irq_attach_us
        );
    }
}

/// Runs the vCPUs of a restored machine, or leaves them parked if the guest
/// was paused or suspended.
fn run_vcpus(restored: vm::Restored, run: RunState, phases: &mut Phases) -> Result<Machine, Error> {
    let mut machine = restored.start(run != RunState::Running, phases);
    if run == RunState::Suspended {
        machine.suspend().map_err(Error::Vm)?;
    }
    Ok(machine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Command, Molt};
    use argh::FromArgs;

    fn config(args: &[&str]) -> RunConfig {
        let mut argv = vec!["run", "--kernel", "k", "--incoming", "file:/s"];
        argv.extend_from_slice(args);
        match Molt::from_args(&["molt"], &argv).unwrap().command {
            Command::Run(r) => r.validate(1 << 40).unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_restart_checks_its_vfio_devices_against_the_state() {
        // A fake sysfs where 0000:00:04.0 is edu and 0000:00:05.0 something else.
        let root = std::env::temp_dir().join(format!("molt-arrive-vfio-{}", std::process::id()));
        for (bdf, device) in [("0000:00:04.0", "0x11e8"), ("0000:00:05.0", "0x10d3")] {
            let dir = root.join("sys/bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("vendor"), "0x1234\n").unwrap();
            std::fs::write(dir.join("device"), format!("{device}\n")).unwrap();
        }
        let sysfs = Sysfs::at(&root);
        let edu = vfio::Identity {
            bdf: "0000:00:04.0".parse().unwrap(),
            slot: 2,
            vendor: 0x1234,
            device: 0x11e8,
        };
        let check = |args: &[&str], saved: &[vfio::Identity]| {
            check_vfio(&config(args), saved, &sysfs).map_err(|e| e.to_string())
        };
        // Slot 2: after one disk.
        assert_eq!(check(&["--disk", "d", "--vfio", "00:04.0"], &[edu]), Ok(()));
        assert_eq!(check(&[], &[]), Ok(()));
        let e = check(&["--vfio", "00:04.0"], &[edu]).unwrap_err();
        assert!(
            e.starts_with("the --vfio devices are not those the guest was saved with"),
            "{e}"
        );
        assert!(
            e.ends_with("now at PCI slot 1 (--vfio order or the number of disks and NICs changed)"),
            "{e}"
        );
        let e = check(&["--disk", "d"], &[edu]).unwrap_err();
        assert!(e.contains("not on argv (--vfio 0000:00:04.0)"), "{e}");
        let e = check(&["--disk", "d", "--vfio", "00:05.0"], &[edu]).unwrap_err();
        assert!(e.contains("not on argv"), "{e}");
        assert!(
            e.contains("--vfio 0000:00:05.0 at PCI slot 2: the guest was not saved with it"),
            "{e}"
        );
        // Another device now at the saved address.
        let moved = vfio::Identity {
            device: 0x10d3,
            ..edu
        };
        let e = check(&["--disk", "d", "--vfio", "00:04.0"], &[moved]).unwrap_err();
        assert!(
            e.contains("now 1234:11e8 at that address: another device"),
            "{e}"
        );
        // A device sysfs does not know is left to the open, which names why.
        let gone = vfio::Identity {
            bdf: "0000:00:1f.0".parse().unwrap(),
            ..edu
        };
        assert_eq!(
            check(&["--disk", "d", "--vfio", "00:1f.0"], &[gone]),
            Ok(())
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
