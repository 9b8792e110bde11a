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
/// The legacy `kvm_xsave`: 4 KiB, what KVM_GET_XSAVE fills.
pub const LEGACY_XSAVE_WORDS: usize = 1024;

#[derive(Debug)]
pub enum Error {
    Get(&'static str, kvm_ioctls::Error),
    Set(&'static str, kvm_ioctls::Error),
    TooMany(&'static str, usize),
    MsrRefused(u32),
    XsaveTooLarge { saved: usize, host: usize },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Get(what, e) => write!(f, "KVM_GET_{what} failed: {e}"),
            Error::Set(what, e) => write!(f, "KVM_SET_{what} failed: {e}"),
            Error::TooMany(what, n) => write!(f, "{n} {what} entries exceed the state's capacity"),
            Error::MsrRefused(i) => write!(f, "KVM_SET_MSRS refused MSR {i:#x}"),
            Error::XsaveTooLarge { saved, host } => write!(
                f,
                "the saved XSAVE image is {saved} bytes, this host's KVM takes {host} \
                 (KVM_CAP_XSAVE2)"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntryV1 {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The version this release saves and restores.
pub type CpuidEntry = CpuidEntryV1;

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntryV1 {
    pub index: u32,
    pub data: u64,
}

/// The version this release saves and restores.
pub type MsrEntry = MsrEntryV1;

/// Version 1 of a vCPU's saved state. Frozen: a change makes a new version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuStateV1 {
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

/// The version this release saves and restores.
pub type VcpuState = VcpuStateV1;

/// Version 2 of a vCPU's saved state, as state format 5 holds it: version 1
/// with the XSAVE image as its raw bytes (little-endian words, one length
/// before them) instead of one varint per word, which cost ~13 µs to encode
/// and ~25 µs to decode per vCPU. Frozen. In memory a vCPU stays a
/// `VcpuStateV1`: `AsV2` writes one as this, and `From` reads it back.
#[derive(Debug, Deserialize)]
pub struct VcpuStateV2 {
    pub cpuid: BoundedVec<CpuidEntry, MAX_CPUID_ENTRIES>,
    pub mp_state: Pod<kvm_mp_state>,
    pub regs: Pod<kvm_regs>,
    pub sregs: Pod<kvm_sregs>,
    pub xsave: RawWords,
    pub xcrs: Pod<kvm_xcrs>,
    pub debug_regs: Pod<kvm_debugregs>,
    pub lapic: Pod<kvm_lapic_state>,
    pub msrs: BoundedVec<MsrEntry, MAX_MSRS>,
    pub events: Pod<kvm_vcpu_events>,
}

impl From<VcpuStateV2> for VcpuStateV1 {
    fn from(v2: VcpuStateV2) -> Self {
        VcpuStateV1 {
            cpuid: v2.cpuid,
            mp_state: v2.mp_state,
            regs: v2.regs,
            sregs: v2.sregs,
            xsave: v2.xsave.0,
            xcrs: v2.xcrs,
            debug_regs: v2.debug_regs,
            lapic: v2.lapic,
            msrs: v2.msrs,
            events: v2.events,
        }
    }
}

/// A vCPU read as a `VcpuStateV2` and boxed as this release holds it: one
/// allocation per vCPU, as for a `VcpuStateV1` (a `Box<VcpuStateV2>` first
/// cost a second one, and its fresh pages, inside the pause).
pub struct FromV2(pub Box<VcpuStateV1>);

impl<'de> Deserialize<'de> for FromV2 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        VcpuStateV2::deserialize(d).map(|v| FromV2(Box::new(v.into())))
    }
}

/// A vCPU's state written as a `VcpuStateV2`, without a copy.
pub struct AsV2<'a>(pub &'a VcpuStateV1);

impl Serialize for AsV2<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let v = self.0;
        let mut st = s.serialize_struct("VcpuStateV2", 10)?;
        st.serialize_field("cpuid", &v.cpuid)?;
        st.serialize_field("mp_state", &v.mp_state)?;
        st.serialize_field("regs", &v.regs)?;
        st.serialize_field("sregs", &v.sregs)?;
        st.serialize_field("xsave", &WordBytes(&v.xsave))?;
        st.serialize_field("xcrs", &v.xcrs)?;
        st.serialize_field("debug_regs", &v.debug_regs)?;
        st.serialize_field("lapic", &v.lapic)?;
        st.serialize_field("msrs", &v.msrs)?;
        st.serialize_field("events", &v.events)?;
        st.end()
    }
}

/// XSAVE words as serde bytes: their little-endian bytes.
struct WordBytes<'a>(&'a [u32]);

impl Serialize for WordBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[cfg(target_endian = "little")]
        {
            // SAFETY: u32 has no padding and any alignment of u8 is met: the
            // words' memory is 4 * len initialised bytes, borrowed as long as
            // the words are; on a little-endian host they are the words' LE
            // bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 4)
            };
            s.serialize_bytes(bytes)
        }
        #[cfg(not(target_endian = "little"))]
        {
            let bytes: Vec<u8> = self.0.iter().flat_map(|w| w.to_le_bytes()).collect();
            s.serialize_bytes(&bytes)
        }
    }
}

/// XSAVE words read from their little-endian bytes: a whole number of words,
/// at most `MAX_XSAVE_WORDS`.
#[derive(Debug)]
pub struct RawWords(pub BoundedVec<u32, MAX_XSAVE_WORDS>);

impl<'de> Deserialize<'de> for RawWords {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawWords;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "at most {MAX_XSAVE_WORDS} little-endian 32-bit words")
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<RawWords, E> {
                if !b.len().is_multiple_of(4) || b.len() > 4 * MAX_XSAVE_WORDS {
                    return Err(E::invalid_length(b.len(), &self));
                }
                let mut words = BoundedVec::new();
                // Bounded above: fits.
                let _ = words.resize(b.len() / 4, 0);
                for (w, c) in words.iter_mut().zip(b.chunks_exact(4)) {
                    *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                Ok(RawWords(words))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

impl VcpuState {
    /// Bytes of the standard-format XSAVE area the guest's CPUID describes: the
    /// end of the last user component it may enable (leaf 0xD.0 EDX:EAX, each
    /// component's size and offset in leaf 0xD.n), never less than the legacy
    /// area. KVM_CAP_XSAVE2, which sized the saved image, is this same end for
    /// the components KVM offers, so a longer image belongs to no guest.
    pub fn xsave_layout_bytes(&self) -> u64 {
        let leaf = |n: u32| {
            self.cpuid
                .iter()
                .find(|e| e.function == 0xd && e.index == n)
        };
        let mask = leaf(0).map_or(0, |e| u64::from(e.edx) << 32 | u64::from(e.eax));
        (2..64)
            .filter(|&c| mask & (1 << c) != 0)
            .filter_map(leaf)
            .map(|e| u64::from(e.ebx) + u64::from(e.eax))
            .fold(4 * LEGACY_XSAVE_WORDS as u64, u64::max)
    }
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
    let cpuid = read_cpuid(fd)?;
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

/// The CPUID a vCPU answers the guest with (KVM_GET_CPUID2).
pub fn read_cpuid(fd: &VcpuFd) -> Result<Vec<CpuidEntry>, Error> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Get("CPUID2", e))?;
    // Some kernels (seen: 6.1) return the buffer's full count, the unused tail
    // zeroed; no real leaf is all zero (leaf 0 names the highest leaf).
    Ok(cpuid
        .as_slice()
        .iter()
        .filter(|e| {
            (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) != (0, 0, 0, 0, 0, 0, 0)
        })
        .map(CpuidEntry::from)
        .collect())
}

fn save_xsave(fd: &VcpuFd, words: usize) -> Result<Vec<u32>, Error> {
    if words <= LEGACY_XSAVE_WORDS {
        let x = fd.get_xsave().map_err(|e| Error::Get("XSAVE", e))?;
        return Ok(x.region.to_vec());
    }
    let mut x =
        Xsave::new(words - LEGACY_XSAVE_WORDS).map_err(|_| Error::TooMany("XSAVE", words))?;
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

/// Whether a vCPU that answers with CPUID `set` (KVM_GET_CPUID2, never run)
/// answers the guest as the vCPU `saved` was read from: the same leaves, equal but for
/// the bits KVM itself keeps in step with the vCPU's registers and MSRs
/// (kvm_update_cpuid_runtime: leaf 1's APIC and OSXSAVE bits, leaf 7's
/// OSPKE, leaf 0xD's XSAVE sizes), which the rest of a restore sets. A bit
/// this misses only makes the restore set the CPUID again (so MONITOR, which
/// KVM updates only under a quirk, is compared).
pub fn cpuid_matches(saved: &[CpuidEntry], set: &[CpuidEntry]) -> bool {
    const APIC: u32 = 1 << 9;
    const OSXSAVE: u32 = 1 << 27;
    const OSPKE: u32 = 1 << 4;
    let normal = |list: &[CpuidEntry]| {
        let mut v: Vec<CpuidEntry> = list
            .iter()
            .filter(|e| {
                (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) != (0, 0, 0, 0, 0, 0, 0)
            })
            .map(|e| {
                let mut e = *e;
                match (e.function, e.index) {
                    (1, _) => {
                        e.ecx &= !OSXSAVE;
                        e.edx &= !APIC;
                    }
                    (7, 0) => e.ecx &= !OSPKE,
                    (0xd, 0 | 1) => e.ebx = 0,
                    _ => {}
                }
                e
            })
            .collect();
        v.sort_by_key(|e| (e.function, e.index));
        v
    };
    normal(saved) == normal(set)
}

/// Writes `state` into a fresh vCPU, before its thread first runs it.
/// `xsave_words` is this host's XSAVE size (`host_cpu::xsave_words`). With
/// `cpuid_set`, the vCPU already has the state's CPUID (`cpuid_matches`)
/// and KVM_SET_CPUID2, the slowest call here, is left out.
pub fn restore(
    fd: &VcpuFd,
    state: &VcpuState,
    xsave_words: usize,
    cpuid_set: bool,
) -> Result<(), Error> {
    if !cpuid_set {
        let entries: Vec<kvm_cpuid_entry2> =
            state.cpuid.iter().map(kvm_cpuid_entry2::from).collect();
        let cpuid =
            CpuId::from_entries(&entries).map_err(|_| Error::TooMany("CPUID", entries.len()))?;
        fd.set_cpuid2(&cpuid).map_err(|e| Error::Set("CPUID2", e))?;
    }
    fd.set_mp_state(state.mp_state.0)
        .map_err(|e| Error::Set("MP_STATE", e))?;
    fd.set_regs(&state.regs.0)
        .map_err(|e| Error::Set("REGS", e))?;
    fd.set_sregs(&state.sregs.0)
        .map_err(|e| Error::Set("SREGS", e))?;
    let xsave = xsave_image(&state.xsave, xsave_words)?;
    // SAFETY: `xsave` is `xsave_words` long, this host's KVM_CAP_XSAVE2 size:
    // at least what KVM_SET_XSAVE reads for any of its vCPUs.
    unsafe { fd.set_xsave2(&xsave) }.map_err(|e| Error::Set("XSAVE", e))?;
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

/// The saved XSAVE image in a buffer of this host's size, zero-padded: KVM
/// reads its own size whatever length was saved (a state from a host without
/// AMX is smaller), and zeros are the init state of any component not in
/// XSTATE_BV.
fn xsave_image(words: &[u32], host_words: usize) -> Result<Xsave, Error> {
    if words.len() > host_words {
        return Err(Error::XsaveTooLarge {
            saved: words.len() * 4,
            host: host_words * 4,
        });
    }
    let extra = host_words.saturating_sub(LEGACY_XSAVE_WORDS);
    let mut x = Xsave::new(extra).map_err(|_| Error::TooMany("XSAVE", host_words))?;
    let (legacy, rest) = words.split_at(words.len().min(LEGACY_XSAVE_WORDS));
    // SAFETY: the FAM struct is only written through its own fields.
    unsafe { x.as_mut_fam_struct() }.xsave.region[..legacy.len()].copy_from_slice(legacy);
    x.as_mut_slice()[..rest.len()].copy_from_slice(rest);
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(x: &Xsave) -> Vec<u32> {
        let mut all = x.as_fam_struct_ref().xsave.region.to_vec();
        all.extend_from_slice(x.as_slice());
        all
    }

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: 0,
            eax: 1,
            ebx,
            ecx,
            edx,
        }
    }

    #[test]
    fn cpuid_matches_but_for_what_kvm_updates_at_run_time() {
        let set = [
            entry(0, 0, 0, 0, 0),
            entry(1, 0, 0x0100_0800, 0x0000_0001, 0x0000_0001),
            entry(7, 0, 0, 0, 0),
            entry(0xd, 0, 0x240, 0, 0),
        ];
        // The guest enabled its APIC, OSXSAVE, PKE and AVX: KVM updated those.
        let saved = [
            entry(0xd, 0, 0x340, 0, 0),
            entry(0, 0, 0, 0, 0),
            entry(1, 0, 0x0100_0800, 0x0800_0001, 0x0000_0201),
            entry(7, 0, 0, 0x10, 0),
        ];
        assert!(cpuid_matches(&saved, &set));
        // Anything else differs: another APIC id, a feature, a leaf.
        let mut other = saved;
        other[2].ebx = 0x0200_0800;
        assert!(!cpuid_matches(&other, &set));
        let mut other = saved;
        other[2].ecx |= 1 << 28;
        assert!(!cpuid_matches(&other, &set));
        assert!(!cpuid_matches(&saved[..3], &set));
    }

    #[test]
    fn xsave_image_is_padded_to_the_host_size() {
        let saved: Vec<u32> = (1..=LEGACY_XSAVE_WORDS as u32).collect();
        let x = xsave_image(&saved, LEGACY_XSAVE_WORDS + 700).unwrap();
        let all = image(&x);
        assert_eq!(all.len(), LEGACY_XSAVE_WORDS + 700);
        assert_eq!(all[..LEGACY_XSAVE_WORDS], saved[..]);
        assert!(all[LEGACY_XSAVE_WORDS..].iter().all(|&w| w == 0));
        let larger: Vec<u32> = (1..=LEGACY_XSAVE_WORDS as u32 + 8).collect();
        let all = image(&xsave_image(&larger, LEGACY_XSAVE_WORDS + 8).unwrap());
        assert_eq!(all, larger);
    }

    #[test]
    fn xsave_image_larger_than_the_host_is_refused() {
        let saved = vec![0u32; LEGACY_XSAVE_WORDS + 1];
        match xsave_image(&saved, LEGACY_XSAVE_WORDS) {
            Err(e @ Error::XsaveTooLarge { .. }) => assert_eq!(
                e.to_string(),
                "the saved XSAVE image is 4100 bytes, this host's KVM takes 4096 (KVM_CAP_XSAVE2)"
            ),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}
