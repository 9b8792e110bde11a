//! One vCPU's architectural state for CPR: what KVM holds for it, saved on the
//! vCPU's own thread while paused, restored before its thread starts.
//!
//! Ordering rules (Firecracker `arch/x86_64/vcpu.rs`, KVM api.rst):
//! - save: MP_STATE first (KVM_GET_MP_STATE runs kvm_apic_accept_events, which
//!   may change LAPIC and vCPU state), VCPU_EVENTS last (pending exceptions and
//!   NMIs observed after everything else);
//! - restore: CPUID before anything that depends on features, REGS before
//!   VCPU_EVENTS, SREGS before LAPIC (the APIC base lives in sregs), LAPIC
//!   before MSRs (TSC_DEADLINE needs the LAPIC timer mode), VCPU_EVENTS last.

use std::fmt;

use heapless::Vec as BoundedVec;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::pod::Pod;

/// Capacities: decoding a state with more entries fails instead of allocating.
pub const MAX_CPUID_ENTRIES: usize = 128;
pub const MAX_MSRS: usize = 256;
/// 16 KiB of XSAVE area: the legacy 4 KiB plus AVX-512 and AMX tiles.
pub const MAX_XSAVE_WORDS: usize = 4096;

#[derive(Debug)]
pub enum Error {
    Get(&'static str, kvm_ioctls::Error),
    Set(&'static str, kvm_ioctls::Error),
    TooMany(&'static str, usize),
    MsrRefused(u32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Get(what, e) => write!(f, "KVM_GET_{what} failed: {e}"),
            Error::Set(what, e) => write!(f, "KVM_SET_{what} failed: {e}"),
            Error::TooMany(what, n) => write!(f, "{n} {what} entries exceed the state's capacity"),
            Error::MsrRefused(i) => write!(f, "KVM_SET_MSRS refused MSR {i:#x}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// Version 1 of a vCPU's saved state. Frozen: a change makes a new version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest booted with, kept so it never changes under it (a
    /// new host kernel may offer a different list).
    pub cpuid: BoundedVec<CpuidEntry, MAX_CPUID_ENTRIES>,
    pub mp_state: Pod<kvm_mp_state>,
    pub regs: Pod<kvm_regs>,
    pub sregs: Pod<kvm_sregs>,
    pub xsave: BoundedVec<u32, MAX_XSAVE_WORDS>,
    pub xcrs: Pod<kvm_xcrs>,
    pub debug_regs: Pod<kvm_debugregs>,
    pub lapic: Pod<kvm_lapic_state>,
    pub msrs: BoundedVec<MsrEntry, MAX_MSRS>,
    pub events: Pod<kvm_vcpu_events>,
}

/// What to save, fixed per machine.
pub struct SaveSpec {
    /// MSRs to read (KVM_GET_MSR_INDEX_LIST); those KVM refuses are skipped.
    pub msr_indices: Vec<u32>,
    /// Size of the XSAVE area in 32-bit words (KVM_CAP_XSAVE2, at least 1024).
    pub xsave_words: usize,
}

fn bounded<T: Clone, const N: usize>(
    what: &'static str,
    items: &[T],
) -> Result<BoundedVec<T, N>, Error> {
    BoundedVec::from_slice(items).map_err(|_| Error::TooMany(what, items.len()))
}

/// Reads the state of a paused vCPU.
pub fn save(fd: &VcpuFd, spec: &SaveSpec) -> Result<VcpuState, Error> {
    let mp_state = fd.get_mp_state().map_err(|e| Error::Get("MP_STATE", e))?;
    let regs = fd.get_regs().map_err(|e| Error::Get("REGS", e))?;
    let sregs = fd.get_sregs().map_err(|e| Error::Get("SREGS", e))?;
    let xsave = save_xsave(fd, spec.xsave_words)?;
    let xcrs = fd.get_xcrs().map_err(|e| Error::Get("XCRS", e))?;
    let debug_regs = fd
        .get_debug_regs()
        .map_err(|e| Error::Get("DEBUGREGS", e))?;
    let lapic = fd.get_lapic().map_err(|e| Error::Get("LAPIC", e))?;
    let msrs = save_msrs(fd, &spec.msr_indices)?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Get("CPUID2", e))?;
    // Some kernels (seen: 6.1) return the buffer's full count, the unused tail
    // zeroed; no real leaf is all zero (leaf 0 names the highest leaf).
    let cpuid: Vec<CpuidEntry> = cpuid
        .as_slice()
        .iter()
        .filter(|e| {
            (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) != (0, 0, 0, 0, 0, 0, 0)
        })
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect();
    let events = fd
        .get_vcpu_events()
        .map_err(|e| Error::Get("VCPU_EVENTS", e))?;
    Ok(VcpuState {
        cpuid: bounded("CPUID", &cpuid)?,
        mp_state: Pod(mp_state),
        regs: Pod(regs),
        sregs: Pod(sregs),
        xsave: bounded("XSAVE", &xsave)?,
        xcrs: Pod(xcrs),
        debug_regs: Pod(debug_regs),
        lapic: Pod(lapic),
        msrs: bounded("MSR", &msrs)?,
        events: Pod(events),
    })
}

fn save_xsave(fd: &VcpuFd, words: usize) -> Result<Vec<u32>, Error> {
    const LEGACY_WORDS: usize = 1024;
    if words <= LEGACY_WORDS {
        let x = fd.get_xsave().map_err(|e| Error::Get("XSAVE", e))?;
        return Ok(x.region.to_vec());
    }
    let mut x = Xsave::new(words - LEGACY_WORDS).map_err(|_| Error::TooMany("XSAVE", words))?;
    // SAFETY: `x` was allocated for the KVM_CAP_XSAVE2 size, so the kernel writes
    // inside it.
    unsafe { fd.get_xsave2(&mut x) }.map_err(|e| Error::Get("XSAVE2", e))?;
    let f = x.as_fam_struct_ref();
    let mut all = f.xsave.region.to_vec();
    all.extend_from_slice(x.as_slice());
    Ok(all)
}

/// KVM_GET_MSRS stops at the first MSR it cannot read: skip that one, go on.
fn save_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrEntry>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut pos = 0;
    while pos < indices.len() {
        let chunk = &indices[pos..(pos + kvm_bindings::KVM_MAX_MSR_ENTRIES).min(indices.len())];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| Error::TooMany("MSR", chunk.len()))?;
        let n = fd.get_msrs(&mut msrs).map_err(|e| Error::Get("MSRS", e))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| MsrEntry {
            index: e.index,
            data: e.data,
        }));
        // Skip the MSR KVM stopped at, if it stopped early.
        pos += n + usize::from(n < chunk.len());
    }
    Ok(out)
}

/// Writes `state` into a fresh vCPU, before its thread first runs it.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
    let entries: Vec<kvm_cpuid_entry2> = state
        .cpuid
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    let cpuid =
        CpuId::from_entries(&entries).map_err(|_| Error::TooMany("CPUID", entries.len()))?;
    fd.set_cpuid2(&cpuid).map_err(|e| Error::Set("CPUID2", e))?;
    fd.set_mp_state(state.mp_state.0)
        .map_err(|e| Error::Set("MP_STATE", e))?;
    fd.set_regs(&state.regs.0)
        .map_err(|e| Error::Set("REGS", e))?;
    fd.set_sregs(&state.sregs.0)
        .map_err(|e| Error::Set("SREGS", e))?;
    restore_xsave(fd, &state.xsave)?;
    fd.set_xcrs(&state.xcrs.0)
        .map_err(|e| Error::Set("XCRS", e))?;
    fd.set_debug_regs(&state.debug_regs.0)
        .map_err(|e| Error::Set("DEBUGREGS", e))?;
    fd.set_lapic(&state.lapic.0)
        .map_err(|e| Error::Set("LAPIC", e))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| Error::TooMany("MSR", chunk.len()))?;
        let n = fd.set_msrs(&msrs).map_err(|e| Error::Set("MSRS", e))?;
        if n != chunk.len() {
            return Err(Error::MsrRefused(chunk[n].index));
        }
    }
    fd.set_vcpu_events(&state.events.0)
        .map_err(|e| Error::Set("VCPU_EVENTS", e))?;
    Ok(())
}

fn restore_xsave(fd: &VcpuFd, words: &[u32]) -> Result<(), Error> {
    const LEGACY_WORDS: usize = 1024;
    let extra = words.len().saturating_sub(LEGACY_WORDS);
    let mut x = Xsave::new(extra).map_err(|_| Error::TooMany("XSAVE", words.len()))?;
    let n = words.len().min(LEGACY_WORDS);
    // SAFETY: the FAM struct is only written through its own fields.
    unsafe { x.as_mut_fam_struct() }.xsave.region[..n].copy_from_slice(&words[..n]);
    x.as_mut_slice().copy_from_slice(&words[n..]);
    // SAFETY: `x` holds a complete XSAVE image of the size it was saved with;
    // KVM reads at most that much (it was sized by KVM_CAP_XSAVE2 when saved).
    unsafe { fd.set_xsave2(&x) }.map_err(|e| Error::Set("XSAVE", e))
}
