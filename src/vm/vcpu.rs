//! vCPU threads: per-vCPU setup, the KVM_RUN loop, and the pause state machine.
//!
//! Pausing is race-free: the controller records the request, sets
//! `kvm_run.immediate_exit`, then signals the thread. A thread about to enter
//! KVM_RUN sees the request or bounces off `immediate_exit`; a thread inside it is
//! interrupted by the signal. The controller then waits, with a bound, for each
//! thread to acknowledge (Firecracker `vstate/vcpu.rs`; Cloud Hypervisor #7427).

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_vcpu_events, kvm_xcrs, CpuId};
use kvm_bindings::{
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, KVM_VCPUEVENT_VALID_SMM,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::cpu;
use super::vcpu_state::{self as state, SaveSpec, VcpuState};
use crate::boot::acpi::Waking;
use crate::boot::Entry;
use crate::bus::{Bus, GuestExit};
use crate::sync::lock;

#[derive(Debug)]
pub enum Error {
    CreateVcpu(u8, kvm_ioctls::Error),
    SetCpuid(u8, kvm_ioctls::Error),
    GetCpuid(u8, state::Error),
    SetMsrs(u8, kvm_ioctls::Error),
    SetFpu(u8, kvm_ioctls::Error),
    SetXcrs(u8, u64, kvm_ioctls::Error),
    GetLapic(u8, kvm_ioctls::Error),
    SetLapic(u8, kvm_ioctls::Error),
    SetRegs(kvm_ioctls::Error),
    GetSregs(kvm_ioctls::Error),
    SetSregs(kvm_ioctls::Error),
    BootTables(vm_memory::GuestMemoryError),
    Spawn(std::io::Error),
    SignalHandler(vmm_sys_util::errno::Error),
    StopTimeout(usize),
    NotPaused,
    Save(state::Error),
    Restore(u8, state::Error),
    /// vCPU `u8`: a call of its INIT (`&str` names it) failed.
    Init(u8, &'static str, kvm_ioctls::Error),
    /// vCPU `u8` kept its state across INIT: this KVM did not reset it.
    InitIgnored(u8),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::CreateVcpu(i, e) => write!(f, "KVM_CREATE_VCPU {i} failed: {e}"),
            Error::SetCpuid(i, e) => write!(f, "KVM_SET_CPUID2 on vCPU {i} failed: {e}"),
            Error::GetCpuid(i, e) => write!(f, "vCPU {i}: {e}"),
            Error::SetMsrs(i, e) => write!(f, "KVM_SET_MSRS on vCPU {i} failed: {e}"),
            Error::SetFpu(i, e) => write!(f, "KVM_SET_FPU on vCPU {i} failed: {e}"),
            Error::SetXcrs(i, xcr0, e) => {
                write!(f, "KVM_SET_XCRS (XCR0 {xcr0:#x}) on vCPU {i} failed: {e}")
            }
            Error::GetLapic(i, e) => write!(f, "KVM_GET_LAPIC on vCPU {i} failed: {e}"),
            Error::SetLapic(i, e) => write!(f, "KVM_SET_LAPIC on vCPU {i} failed: {e}"),
            Error::SetRegs(e) => write!(f, "KVM_SET_REGS failed: {e}"),
            Error::GetSregs(e) => write!(f, "KVM_GET_SREGS failed: {e}"),
            Error::SetSregs(e) => write!(f, "KVM_SET_SREGS failed: {e}"),
            Error::BootTables(e) => write!(f, "cannot write boot page tables: {e}"),
            Error::Spawn(e) => write!(f, "cannot start a vCPU thread: {e}"),
            Error::SignalHandler(e) => write!(f, "cannot install the vCPU kick handler: {e}"),
            Error::StopTimeout(n) => write!(f, "{n} vCPU(s) did not stop in time"),
            Error::NotPaused => write!(f, "vCPU state can only be saved while paused"),
            Error::Save(e) => e.fmt(f),
            Error::Restore(i, e) => write!(f, "restoring vCPU {i}: {e}"),
            Error::Init(i, call, e) => write!(f, "INIT of vCPU {i}: {call} failed: {e}"),
            Error::InitIgnored(i) => write!(
                f,
                "INIT of vCPU {i}: KVM did not reset it (a latched INIT is not processed)"
            ),
        }
    }
}

/// Writes a saved state into a vCPU made by `create(.., None)`; `xsave_words` is this host's XSAVE size; `cpuid_set`: the
/// vCPU already has the saved CPUID (`vcpu_state::cpuid_matches`).
pub fn restore(
    fd: &VcpuFd,
    index: u8,
    saved: &VcpuState,
    xsave_words: usize,
    cpuid_set: bool,
) -> Result<(), Error> {
    state::restore(fd, saved, xsave_words, cpuid_set).map_err(|e| Error::Restore(index, e))
}

/// Creates vCPU `index` of `count` with CPUID (`supported`, KVM_GET_SUPPORTED_CPUID,
/// given this vCPU's topology). For a boot (`entry`), also XCR0, MSRs, FPU and
/// LAPIC; the boot vCPU gets `entry`'s registers, the others wait for
/// INIT/SIPI. Without, a restore sets all of those, and this returns the
/// CPUID the vCPU answers with (KVM_GET_CPUID2: KVM may have changed what it
/// was given) along with it (for a boot, none).
pub fn create(
    supported: &CpuId,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    index: u8,
    count: u8,
    entry: Option<Entry>,
) -> Result<(VcpuFd, Vec<state::CpuidEntry>), Error> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(|e| Error::CreateVcpu(index, e))?;
    let mut cpuid = supported.clone();
    cpu::patch_cpuid(&mut cpuid, u32::from(index), u32::from(count));
    fd.set_cpuid2(&cpuid)
        .map_err(|e| Error::SetCpuid(index, e))?;
    let Some(entry) = entry else {
        let answers = state::read_cpuid(&fd).map_err(|e| Error::GetCpuid(index, e))?;
        return Ok((fd, answers));
    };
    // After the CPUID: KVM accepts only the components that offers. A restore
    // sets the saved XCR0 over this. INIT (how the other vCPUs start) keeps it.
    if let Some(xcr0) = cpu::initial_xcr0(&cpuid) {
        set_xcr0(&fd, xcr0).map_err(|e| Error::SetXcrs(index, xcr0, e))?;
    }
    fd.set_msrs(&cpu::boot_msrs())
        .map_err(|e| Error::SetMsrs(index, e))?;
    fd.set_fpu(&cpu::boot_fpu())
        .map_err(|e| Error::SetFpu(index, e))?;
    set_lint(&fd, index)?;
    if index == 0 {
        fd.set_regs(&cpu::boot_regs(entry))
            .map_err(Error::SetRegs)?;
        let sregs = fd.get_sregs().map_err(Error::GetSregs)?;
        let sregs = cpu::boot_sregs(mem, entry, sregs).map_err(Error::BootTables)?;
        fd.set_sregs(&sregs).map_err(Error::SetSregs)?;
    }
    Ok((fd, Vec::new()))
}

fn set_xcr0(fd: &VcpuFd, xcr0: u64) -> Result<(), kvm_ioctls::Error> {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    fd.set_xcrs(&xcrs)
}

/// LINT0 delivers the PIC's ExtINT, LINT1 delivers NMI, as firmware sets them up.
fn set_lint(fd: &VcpuFd, index: u8) -> Result<(), Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7 << 8;
    const MODE_NMI: u32 = 0x4 << 8;
    let mut lapic = fd.get_lapic().map_err(|e| Error::GetLapic(index, e))?;
    for (offset, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let old = u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
        let new = (old & !0x700) | mode;
        for (dst, src) in reg.iter_mut().zip(new.to_le_bytes()) {
            *dst = src as libc::c_char;
        }
    }
    fd.set_lapic(&lapic).map_err(|e| Error::SetLapic(index, e))
}

/// What the controller wants a vCPU thread to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Request {
    Run = 0,
    Pause = 1,
    Exit = 2,
}

/// What a vCPU thread last acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Exited,
}

/// Work the controller gives a paused vCPU's thread: KVM's per-vCPU ioctls
/// run where the vCPU is loaded.
enum Job {
    Save(Arc<SaveSpec>),
    /// Load a saved state (this host's XSAVE size in words; whether the
    /// vCPU has its CPUID already) into a vCPU that has not run yet.
    Restore(Box<VcpuState>, usize, bool),
    /// INIT, then (for the boot vCPU) enter the waking vector.
    Wake(Option<Waking>),
}

/// What a job produced.
enum Output {
    Saved(Box<VcpuState>),
    Restored,
    Woken,
}

/// Everything the controller and a vCPU thread agree on, under one lock.
struct Inner {
    request: Request,
    state: State,
    kick: Option<KickTarget>,
    /// Set by the controller while paused; the thread puts the result in `done`.
    job: Option<Job>,
    /// The job's result, and how long it ran.
    done: Option<(Result<Output, Error>, Duration)>,
}

struct Shared {
    /// Fast-path copy of the request, read on every exit without the lock.
    request: AtomicU8,
    state: Mutex<Inner>,
    changed: Condvar,
}

/// Where to kick a running thread: its pthread and its `kvm_run.immediate_exit`.
#[derive(Clone, Copy)]
struct KickTarget {
    thread: libc::pthread_t,
    immediate_exit: *mut u8,
}

// SAFETY: the pointer is only dereferenced under `Shared::state`'s lock while the
// owning thread has not yet reached `State::Exited`, i.e. while `kvm_run` is mapped.
unsafe impl Send for KickTarget {}

/// The reason a vCPU thread asked the machine to stop.
pub type ExitSink = Arc<dyn Fn(GuestExit) + Send + Sync>;

/// Running vCPU threads and the means to pause, resume and stop them.
pub struct Vcpus {
    threads: Vec<(Arc<Shared>, Option<JoinHandle<()>>)>,
    /// The vCPU descriptors (owned by the threads), for an exec to keep open.
    raw_fds: Vec<std::os::fd::RawFd>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// How long a pause may take before it is reported as failed.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an unacknowledged kick is repeated while waiting.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

impl Vcpus {
    /// Starts one thread per vCPU; they run the guest at once, or with
    /// `paused` park before their first KVM_RUN until `resume`.
    pub fn start(
        fds: Vec<VcpuFd>,
        bus: Arc<Bus>,
        exit: ExitSink,
        paused: bool,
    ) -> Result<Self, Error> {
        register_signal_handler(kick_signal(), kick_handler).map_err(Error::SignalHandler)?;
        let raw_fds = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let mut threads = Vec::with_capacity(fds.len());
        let request = if paused { Request::Pause } else { Request::Run };
        for (index, fd) in fds.into_iter().enumerate() {
            let shared = Arc::new(Shared {
                request: AtomicU8::new(request as u8),
                state: Mutex::new(Inner {
                    request,
                    state: State::Running,
                    kick: None,
                    job: None,
                    done: None,
                }),
                changed: Condvar::new(),
            });
            let (s, bus, exit) = (shared.clone(), bus.clone(), exit.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || run_thread(index, fd, &s, &bus, &exit))
                .map_err(Error::Spawn)?;
            threads.push((shared, Some(handle)));
        }
        Ok(Vcpus { threads, raw_fds })
    }

    pub fn count(&self) -> usize {
        self.threads.len()
    }

    pub fn raw_fds(&self) -> &[std::os::fd::RawFd] {
        &self.raw_fds
    }

    /// Stops every vCPU; returns when all have acknowledged, or fails after a bound.
    pub fn pause(&self) -> Result<(), Error> {
        self.request_all(Request::Pause);
        self.wait_all(|s| s != State::Running)
    }

    /// Lets every paused vCPU run again.
    pub fn resume(&self) {
        self.request_all(Request::Run);
    }

    /// Ends every vCPU thread and joins it.
    pub fn stop(&mut self) -> Result<(), Error> {
        self.request_all(Request::Exit);
        let waited = self.wait_all(|s| s == State::Exited);
        for (_, handle) in &mut self.threads {
            if let Some(h) = handle.take() {
                if waited.is_ok() {
                    let _ = h.join();
                }
            }
        }
        waited
    }

    /// Saves every vCPU's state; all must be paused. Also returns how long
    /// each vCPU's save took.
    pub fn save(&self, spec: &Arc<SaveSpec>) -> Result<(Vec<VcpuState>, Vec<Duration>), Error> {
        let mut took = Vec::with_capacity(self.threads.len());
        let states = self
            .run_jobs(|_| Job::Save(spec.clone()))?
            .into_iter()
            .map(|(out, t)| {
                took.push(t);
                match out {
                    Output::Saved(state) => *state,
                    _ => unreachable!("a save job saves"),
                }
            })
            .collect();
        Ok((states, took))
    }

    /// Loads `states` (in vCPU order) into vCPUs started paused that have not
    /// run yet, each on its own thread; returns how long each took.
    /// `xsave_words` is this host's XSAVE size; `cpuid_set[i]`: vCPU i has
    /// its saved CPUID already.
    pub fn restore(
        &self,
        states: &[Box<VcpuState>],
        xsave_words: usize,
        cpuid_set: &[bool],
    ) -> Result<Vec<Duration>, Error> {
        Ok(self
            .run_jobs(|i| Job::Restore(states[i].clone(), xsave_words, cpuid_set[i]))?
            .into_iter()
            .map(|(_, took)| took)
            .collect())
    }

    /// Wakes a paused machine from ACPI S3 as firmware does: an INIT to every
    /// vCPU, then the boot vCPU (0) enters `waking`; the others wait for SIPI,
    /// as after a reset. The vCPUs stay paused: `resume` runs them.
    pub fn wake(&self, waking: Waking) -> Result<(), Error> {
        self.run_jobs(|index| Job::Wake((index == 0).then_some(waking)))
            .map(drop)
    }

    /// Has each paused thread do `job(index)` on its vCPU, all at once (each
    /// vCPU under its own lock: no convoy), within one bound for all. A
    /// thread asked to pause that has not parked yet takes its job as it does.
    fn run_jobs(&self, job: impl Fn(usize) -> Job) -> Result<Vec<(Output, Duration)>, Error> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        for (index, (shared, _)) in self.threads.iter().enumerate() {
            let mut guard = lock(&shared.state);
            if guard.request != Request::Pause {
                return Err(Error::NotPaused);
            }
            guard.done = None;
            guard.job = Some(job(index));
            shared.changed.notify_all();
        }
        let mut out = Vec::with_capacity(self.threads.len());
        for (shared, _) in &self.threads {
            let mut guard = lock(&shared.state);
            while guard.done.is_none() {
                let now = Instant::now();
                if now >= deadline {
                    guard.job = None;
                    return Err(Error::StopTimeout(1));
                }
                guard = shared
                    .changed
                    .wait_timeout(guard, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let (done, took) = guard.done.take().expect("checked above");
            out.push((done?, took));
        }
        Ok(out)
    }

    fn request_all(&self, request: Request) {
        for (shared, _) in &self.threads {
            let mut guard = lock(&shared.state);
            // An exiting thread never comes back.
            if guard.request == Request::Exit {
                continue;
            }
            guard.request = request;
            shared.request.store(request as u8, Ordering::SeqCst);
            if request != Request::Run {
                kick(&guard);
            }
            shared.changed.notify_all();
        }
    }

    fn wait_all(&self, done: impl Fn(State) -> bool) -> Result<(), Error> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut late = 0;
        for (shared, _) in &self.threads {
            let mut guard = lock(&shared.state);
            while !done(guard.state) {
                let now = Instant::now();
                if now >= deadline {
                    late += 1;
                    break;
                }
                kick(&guard);
                let wait = KICK_INTERVAL.min(deadline - now);
                guard = shared
                    .changed
                    .wait_timeout(guard, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        if late > 0 {
            return Err(Error::StopTimeout(late));
        }
        Ok(())
    }
}

/// Forces the thread out of (or away from) KVM_RUN. Called with the state lock held.
fn kick(guard: &MutexGuard<'_, Inner>) {
    if guard.state == State::Exited {
        return;
    }
    if let Some(t) = guard.kick {
        // SAFETY: `immediate_exit` points into this thread's kvm_run mapping, which
        // lives until the thread records State::Exited under this lock (not yet).
        unsafe { AtomicU8::from_ptr(t.immediate_exit) }.store(1, Ordering::SeqCst);
        // SAFETY: the pthread is alive (it has not exited, see above); the signal has
        // a no-op handler installed in `Vcpus::start`.
        unsafe { libc::pthread_kill(t.thread, kick_signal()) };
    }
}

fn run_thread(index: usize, mut fd: VcpuFd, shared: &Shared, bus: &Bus, exit: &ExitSink) {
    {
        let mut guard = lock(&shared.state);
        guard.kick = Some(KickTarget {
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
            immediate_exit: &mut fd.get_kvm_run().immediate_exit as *mut u8,
        });
    }
    let outcome = run_loop(index, &mut fd, shared, bus);
    {
        let mut guard = lock(&shared.state);
        guard.request = Request::Exit;
        guard.state = State::Exited;
        guard.kick = None;
        shared.changed.notify_all();
    }
    if let Some(why) = outcome {
        exit(why);
    }
}

/// Runs the guest until asked to exit (returns None) or until the guest ends.
fn run_loop(index: usize, fd: &mut VcpuFd, shared: &Shared, bus: &Bus) -> Option<GuestExit> {
    let mut ran = false;
    loop {
        if shared.request.load(Ordering::SeqCst) != Request::Run as u8
            && !wait_while_paused(index, shared, fd, ran)
        {
            return None;
        }
        ran = true;
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => {
                if let Some(why) = bus.pio_write(port, data) {
                    return Some(why);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            Ok(VcpuExit::Shutdown) => {
                // A triple fault, not a reset the guest asked for: say where.
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or_default();
                log::warn!("vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}");
                return Some(GuestExit::Reset);
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
                return Some(GuestExit::PowerOff)
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => return Some(GuestExit::Reset),
            Ok(other) => {
                return Some(GuestExit::Failed(format!(
                    "vCPU {index}: unexpected exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                return Some(GuestExit::Failed(format!(
                    "vCPU {index}: KVM_RUN failed: {e}"
                )))
            }
        }
    }
}

fn run_job(index: usize, fd: &VcpuFd, job: Job) -> Result<Output, Error> {
    match job {
        Job::Save(spec) => state::save(fd, &spec)
            .map(|s| Output::Saved(Box::new(s)))
            .map_err(Error::Save),
        Job::Restore(saved, xsave_words, cpuid_set) => {
            restore(fd, index as u8, &saved, xsave_words, cpuid_set).map(|()| Output::Restored)
        }
        Job::Wake(waking) => wake(fd, index as u8, waking).map(|()| Output::Woken),
    }
}

/// INIT, as the chipset's reset of the sleeping processors: KVM resets the
/// vCPU (registers, LAPIC, pending events) when it accepts a latched INIT,
/// which KVM_GET_MP_STATE makes it do (kvm_apic_accept_events). Then the boot
/// vCPU enters `waking` and the others wait for SIPI. The MP state is set
/// either way: it must not depend on which vCPU the guest flagged as the BSP.
fn wake(fd: &VcpuFd, index: u8, waking: Option<Waking>) -> Result<(), Error> {
    let init = |call, e| Error::Init(index, call, e);
    // Everything else zero: no pending exception, interrupt or NMI survives.
    let mut events = kvm_vcpu_events {
        flags: KVM_VCPUEVENT_VALID_SMM,
        ..Default::default()
    };
    events.smi.latched_init = 1;
    fd.set_vcpu_events(&events)
        .map_err(|e| init("KVM_SET_VCPU_EVENTS", e))?;
    fd.get_mp_state().map_err(|e| init("KVM_GET_MP_STATE", e))?;
    let sregs = fd.get_sregs().map_err(|e| init("KVM_GET_SREGS", e))?;
    // INIT puts every processor at the reset vector, F000:FFF0.
    if sregs.cs.selector != cpu::RESET_CS_SELECTOR {
        return Err(Error::InitIgnored(index));
    }
    let mp_state = match waking {
        Some(w) => {
            fd.set_sregs(&cpu::wake_sregs(w, sregs))
                .map_err(|e| init("KVM_SET_SREGS", e))?;
            fd.set_regs(&cpu::wake_regs(w))
                .map_err(|e| init("KVM_SET_REGS", e))?;
            KVM_MP_STATE_RUNNABLE
        }
        None => KVM_MP_STATE_INIT_RECEIVED,
    };
    fd.set_mp_state(kvm_mp_state { mp_state })
        .map_err(|e| init("KVM_SET_MP_STATE", e))
}

/// Parks the thread while paused. Returns false when it must exit. `ran`:
/// whether this thread has entered KVM_RUN yet (a vCPU started paused, and
/// not restored yet, must not: an AP would block in it).
fn wait_while_paused(index: usize, shared: &Shared, fd: &mut VcpuFd, ran: bool) -> bool {
    let mut guard = lock(&shared.state);
    loop {
        match guard.request {
            Request::Run => {
                guard.state = State::Running;
                return true;
            }
            Request::Exit => return false,
            Request::Pause => {
                if guard.state != State::Paused {
                    // One KVM_RUN with immediate_exit set completes an in-flight
                    // port or MMIO read without entering the guest, so the saved
                    // state never holds half an instruction (KVM api.rst, KVM_RUN).
                    if ran {
                        fd.set_kvm_immediate_exit(1);
                        let _ = fd.run();
                        fd.set_kvm_immediate_exit(0);
                    }
                    guard.state = State::Paused;
                    shared.changed.notify_all();
                }
                if let Some(job) = guard.job.take() {
                    let start = Instant::now();
                    let done = run_job(index, fd, job);
                    guard.done = Some((done, start.elapsed()));
                    shared.changed.notify_all();
                }
                guard = shared
                    .changed
                    .wait(guard)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}
