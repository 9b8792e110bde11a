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
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::pod::Pod;
use crate::layout::MAX_VCPUS;

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
/// `VcpuStateV1`: `AsV2` writes one as this, and `VcpusFromV2` reads it back
/// into one (as this type's derived reading and `From` would: its tests
/// check that).
#[cfg(test)]
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

#[cfg(test)]
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

/// Reads format 5's vCPUs (each a `VcpuStateV2`) into boxes as this release
/// holds them, taking them from `spares` (made before the pause by `blank`,
/// their pages written) while there are any: one allocation per vCPU
/// otherwise, and no copy of a whole state either way.
pub struct VcpusFromV2<'s>(pub &'s mut Vec<Box<VcpuStateV1>>);

impl<'de> DeserializeSeed<'de> for VcpusFromV2<'_> {
    type Value = BoundedVec<Box<VcpuStateV1>, MAX_VCPUS>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for VcpusFromV2<'_> {
    type Value = BoundedVec<Box<VcpuStateV1>, MAX_VCPUS>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "at most {MAX_VCPUS} vCPU states")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = BoundedVec::new();
        loop {
            let into = self.0.pop().unwrap_or_default();
            let Some(v) = seq.next_element_seed(FromV2(into))? else {
                return Ok(out);
            };
            if out.push(v).is_err() {
                return Err(A::Error::invalid_length(MAX_VCPUS + 1, &self));
            }
        }
    }
}

/// One `VcpuStateV2` read into a box of this release's, field by field.
struct FromV2(Box<VcpuStateV1>);

/// `VcpuStateV2`'s fields, in order.
const V2_FIELDS: [&str; 10] = [
    "cpuid",
    "mp_state",
    "regs",
    "sregs",
    "xsave",
    "xcrs",
    "debug_regs",
    "lapic",
    "msrs",
    "events",
];

impl<'de> DeserializeSeed<'de> for FromV2 {
    type Value = Box<VcpuStateV1>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_struct("VcpuStateV2", &V2_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for FromV2 {
    type Value = Box<VcpuStateV1>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("struct VcpuStateV2")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        fn missing<E: serde::de::Error>(at: usize) -> E {
            E::invalid_length(at, &"struct VcpuStateV2 with 10 elements")
        }
        fn next<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(
            seq: &mut A,
            at: usize,
        ) -> Result<T, A::Error> {
            seq.next_element()?.ok_or_else(|| missing(at))
        }
        let mut v = self.0;
        v.cpuid = next(&mut seq, 0)?;
        v.mp_state = next(&mut seq, 1)?;
        v.regs = next(&mut seq, 2)?;
        v.sregs = next(&mut seq, 3)?;
        seq.next_element_seed(WordsInto(&mut v.xsave))?
            .ok_or_else(|| missing(4))?;
        v.xcrs = next(&mut seq, 5)?;
        v.debug_regs = next(&mut seq, 6)?;
        v.lapic = next(&mut seq, 7)?;
        v.msrs = next(&mut seq, 8)?;
        v.events = next(&mut seq, 9)?;
        Ok(v)
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

/// XSAVE words read from their little-endian bytes, into the vector given
/// (its contents replaced): a whole number of words, at most
/// `MAX_XSAVE_WORDS`.
struct WordsInto<'a>(&'a mut BoundedVec<u32, MAX_XSAVE_WORDS>);

impl<'de> DeserializeSeed<'de> for WordsInto<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_bytes(self)
    }
}

impl Visitor<'_> for WordsInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "at most {MAX_XSAVE_WORDS} little-endian 32-bit words")
    }

    fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<(), E> {
        if !b.len().is_multiple_of(4) || b.len() > 4 * MAX_XSAVE_WORDS {
            return Err(E::invalid_length(b.len(), &self));
        }
        let words = self.0;
        words.clear();
        // Bounded above: fits.
        let _ = words.resize(b.len() / 4, 0);
        for (w, c) in words.iter_mut().zip(b.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

/// XSAVE words as `VcpuStateV2` holds them (`WordsInto` a vector of their own).
#[cfg(test)]
#[derive(Debug)]
pub struct RawWords(pub BoundedVec<u32, MAX_XSAVE_WORDS>);

#[cfg(test)]
impl<'de> Deserialize<'de> for RawWords {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut words = BoundedVec::new();
        WordsInto(&mut words).deserialize(d)?;
        Ok(RawWords(words))
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

/// The KVM buffers a vCPU's saves and restores go through, made with its
/// thread and kept: a save or a restore in the pause allocates nothing (musl's
/// allocator maps each larger allocation afresh and unmaps it when freed, so
/// each would fault its pages in again inside the pause).
pub struct Buffers {
    /// KVM_MAX_MSR_ENTRIES entries; `nmsrs` says how many a call uses.
    msrs: Msrs,
    /// KVM_MAX_CPUID_ENTRIES entries; `nent` says how many a call uses.
    cpuid: CpuId,
    /// This host's XSAVE size (KVM_CAP_XSAVE2).
    xsave: Xsave,
    xsave_words: usize,
}

impl Buffers {
    /// Buffers for this host's XSAVE size, `xsave_words` (at least 1024).
    pub fn new(xsave_words: usize) -> Result<Self, Error> {
        let msrs = KVM_MAX_MSR_ENTRIES;
        let xsave_words = xsave_words.max(LEGACY_XSAVE_WORDS);
        Ok(Buffers {
            msrs: Msrs::new(msrs).map_err(|_| Error::TooMany("MSR", msrs))?,
            cpuid: CpuId::new(KVM_MAX_CPUID_ENTRIES)
                .map_err(|_| Error::TooMany("CPUID", KVM_MAX_CPUID_ENTRIES))?,
            xsave: Xsave::new(xsave_words - LEGACY_XSAVE_WORDS)
                .map_err(|_| Error::TooMany("XSAVE", xsave_words))?,
            xsave_words,
        })
    }

    /// The MSR buffer holding `indices` (at most KVM_MAX_MSR_ENTRIES), data zero.
    fn msrs_for(&mut self, entries: impl ExactSizeIterator<Item = kvm_msr_entry>) -> &mut Msrs {
        let n = entries.len().min(KVM_MAX_MSR_ENTRIES);
        // SAFETY: the buffer was made with KVM_MAX_MSR_ENTRIES entries and
        // keeps them: `nmsrs` only says how many of them KVM reads.
        unsafe { self.msrs.as_mut_fam_struct() }.nmsrs = n as u32;
        for (slot, e) in self.msrs.as_mut_slice().iter_mut().zip(entries) {
            *slot = e;
        }
        &mut self.msrs
    }
}

/// A vCPU state with room for the largest it holds, its pages written: saving
/// into it writes no fresh page.
pub fn blank() -> Box<VcpuState> {
    let mut s = Box::<VcpuState>::default();
    // Bounded above: these fit, and clearing keeps the pages.
    let _ = s.cpuid.resize(
        MAX_CPUID_ENTRIES,
        CpuidEntry::from(&kvm_cpuid_entry2::default()),
    );
    let _ = s.xsave.resize(MAX_XSAVE_WORDS, 0);
    let _ = s.msrs.resize(MAX_MSRS, MsrEntry { index: 0, data: 0 });
    s.cpuid.clear();
    s.xsave.clear();
    s.msrs.clear();
    s
}

/// Reads the state of a paused vCPU into `out`, through `bufs`.
pub fn save(
    fd: &VcpuFd,
    spec: &SaveSpec,
    bufs: &mut Buffers,
    out: &mut VcpuState,
) -> Result<(), Error> {
    out.mp_state = Pod(fd.get_mp_state().map_err(|e| Error::Get("MP_STATE", e))?);
    out.regs = Pod(fd.get_regs().map_err(|e| Error::Get("REGS", e))?);
    out.sregs = Pod(fd.get_sregs().map_err(|e| Error::Get("SREGS", e))?);
    save_xsave(fd, spec.xsave_words, bufs, &mut out.xsave)?;
    out.xcrs = Pod(fd.get_xcrs().map_err(|e| Error::Get("XCRS", e))?);
    out.debug_regs = Pod(fd
        .get_debug_regs()
        .map_err(|e| Error::Get("DEBUGREGS", e))?);
    out.lapic = Pod(fd.get_lapic().map_err(|e| Error::Get("LAPIC", e))?);
    save_msrs(fd, &spec.msr_indices, bufs, &mut out.msrs)?;
    out.cpuid.clear();
    for e in get_cpuid(fd, &mut bufs.cpuid)? {
        out.cpuid
            .push(e)
            .map_err(|_| Error::TooMany("CPUID", MAX_CPUID_ENTRIES + 1))?;
    }
    out.events = Pod(fd
        .get_vcpu_events()
        .map_err(|e| Error::Get("VCPU_EVENTS", e))?);
    Ok(())
}

vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_CPUID2,
    kvm_bindings::KVMIO,
    0x91,
    kvm_bindings::kvm_cpuid2
);

/// KVM_GET_CPUID2 into `buf` (made with KVM_MAX_CPUID_ENTRIES entries): the
/// leaves the vCPU answers with. Some kernels (seen: 6.1) return the buffer's
/// full count, the unused tail zeroed; no real leaf is all zero (leaf 0 names
/// the highest leaf), so those are left out.
fn get_cpuid<'a>(
    fd: &VcpuFd,
    buf: &'a mut CpuId,
) -> Result<impl Iterator<Item = CpuidEntry> + 'a, Error> {
    // SAFETY: the buffer was made with KVM_MAX_CPUID_ENTRIES entries and keeps
    // them: `nent` only says how many KVM may write (it lowers it to what it wrote).
    unsafe { buf.as_mut_fam_struct() }.nent = KVM_MAX_CPUID_ENTRIES as u32;
    // SAFETY: KVM writes at most `nent` entries, all inside the buffer.
    let r = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ptr(fd, KVM_GET_CPUID2(), buf.as_mut_fam_struct_ptr())
    };
    if r != 0 {
        return Err(Error::Get("CPUID2", kvm_ioctls::Error::last()));
    }
    Ok(buf
        .as_slice()
        .iter()
        .filter(|e| {
            (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) != (0, 0, 0, 0, 0, 0, 0)
        })
        .map(CpuidEntry::from))
}

/// The CPUID a vCPU answers the guest with (KVM_GET_CPUID2).
pub fn read_cpuid(fd: &VcpuFd) -> Result<Vec<CpuidEntry>, Error> {
    let mut buf = CpuId::new(KVM_MAX_CPUID_ENTRIES)
        .map_err(|_| Error::TooMany("CPUID", KVM_MAX_CPUID_ENTRIES))?;
    let entries = get_cpuid(fd, &mut buf)?.collect();
    Ok(entries)
}

fn save_xsave(
    fd: &VcpuFd,
    words: usize,
    bufs: &mut Buffers,
    out: &mut BoundedVec<u32, MAX_XSAVE_WORDS>,
) -> Result<(), Error> {
    out.clear();
    let too_many = |_| Error::TooMany("XSAVE", words);
    if words <= LEGACY_XSAVE_WORDS {
        let x = fd.get_xsave().map_err(|e| Error::Get("XSAVE", e))?;
        return out.extend_from_slice(&x.region).map_err(too_many);
    }
    if words > bufs.xsave_words {
        return Err(Error::TooMany("XSAVE", words));
    }
    // SAFETY: the buffer was made for this host's KVM_CAP_XSAVE2 size, so the
    // kernel writes inside it.
    unsafe { fd.get_xsave2(&mut bufs.xsave) }.map_err(|e| Error::Get("XSAVE2", e))?;
    out.extend_from_slice(&bufs.xsave.as_fam_struct_ref().xsave.region)
        .map_err(too_many)?;
    out.extend_from_slice(bufs.xsave.as_slice())
        .map_err(too_many)
}

/// KVM_GET_MSRS stops at the first MSR it cannot read: skip that one, go on.
fn save_msrs(
    fd: &VcpuFd,
    indices: &[u32],
    bufs: &mut Buffers,
    out: &mut BoundedVec<MsrEntry, MAX_MSRS>,
) -> Result<(), Error> {
    out.clear();
    let mut pos = 0;
    while pos < indices.len() {
        let chunk = &indices[pos..(pos + KVM_MAX_MSR_ENTRIES).min(indices.len())];
        let msrs = bufs.msrs_for(chunk.iter().map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        }));
        let n = fd.get_msrs(msrs).map_err(|e| Error::Get("MSRS", e))?;
        for e in &msrs.as_slice()[..n] {
            out.push(MsrEntry {
                index: e.index,
                data: e.data,
            })
            .map_err(|_| Error::TooMany("MSR", indices.len()))?;
        }
        // Skip the MSR KVM stopped at, if it stopped early.
        pos += n + usize::from(n < chunk.len());
    }
    Ok(())
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
    // On the stack, sorted in place: this runs in the pause, once per vCPU.
    // No vCPU answers with more leaves than KVM_GET_CPUID2 returns.
    if saved.len().max(set.len()) > KVM_MAX_CPUID_ENTRIES {
        return false;
    }
    let normal = |list: &[CpuidEntry]| {
        let mut v: BoundedVec<CpuidEntry, KVM_MAX_CPUID_ENTRIES> = list
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
        v.sort_unstable_by_key(|e| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx));
        v
    };
    normal(saved) == normal(set)
}

/// Writes `state` into a fresh vCPU, before its thread first runs it, through
/// `bufs` (made for this host's XSAVE size). With `cpuid_set`, the vCPU
/// already has the state's CPUID (`cpuid_matches`) and KVM_SET_CPUID2, the
/// slowest call here, is left out.
pub fn restore(
    fd: &VcpuFd,
    state: &VcpuState,
    bufs: &mut Buffers,
    cpuid_set: bool,
) -> Result<(), Error> {
    if !cpuid_set {
        let n = state.cpuid.len().min(KVM_MAX_CPUID_ENTRIES);
        // SAFETY: the buffer was made with KVM_MAX_CPUID_ENTRIES entries and
        // keeps them: `nent` only says how many KVM reads.
        unsafe { bufs.cpuid.as_mut_fam_struct() }.nent = n as u32;
        for (slot, e) in bufs.cpuid.as_mut_slice().iter_mut().zip(&state.cpuid) {
            *slot = kvm_cpuid_entry2::from(e);
        }
        fd.set_cpuid2(&bufs.cpuid)
            .map_err(|e| Error::Set("CPUID2", e))?;
    }
    fd.set_mp_state(state.mp_state.0)
        .map_err(|e| Error::Set("MP_STATE", e))?;
    fd.set_regs(&state.regs.0)
        .map_err(|e| Error::Set("REGS", e))?;
    fd.set_sregs(&state.sregs.0)
        .map_err(|e| Error::Set("SREGS", e))?;
    fill_xsave(&mut bufs.xsave, &state.xsave)?;
    // SAFETY: the buffer is this host's KVM_CAP_XSAVE2 size: at least what
    // KVM_SET_XSAVE reads for any of its vCPUs.
    unsafe { fd.set_xsave2(&bufs.xsave) }.map_err(|e| Error::Set("XSAVE", e))?;
    fd.set_xcrs(&state.xcrs.0)
        .map_err(|e| Error::Set("XCRS", e))?;
    fd.set_debug_regs(&state.debug_regs.0)
        .map_err(|e| Error::Set("DEBUGREGS", e))?;
    fd.set_lapic(&state.lapic.0)
        .map_err(|e| Error::Set("LAPIC", e))?;
    for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = bufs.msrs_for(chunk.iter().map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        }));
        let n = fd.set_msrs(msrs).map_err(|e| Error::Set("MSRS", e))?;
        if n != chunk.len() {
            return Err(Error::MsrRefused(chunk[n].index));
        }
    }
    fd.set_vcpu_events(&state.events.0)
        .map_err(|e| Error::Set("VCPU_EVENTS", e))?;
    Ok(())
}

/// The saved XSAVE image into `x`, this host's size, zero-padded: KVM reads
/// its own size whatever length was saved (a state from a host without AMX
/// is smaller), and zeros are the init state of any component not in
/// XSTATE_BV.
fn fill_xsave(x: &mut Xsave, words: &[u32]) -> Result<(), Error> {
    let host_words = LEGACY_XSAVE_WORDS + x.as_slice().len();
    if words.len() > host_words {
        return Err(Error::XsaveTooLarge {
            saved: words.len() * 4,
            host: host_words * 4,
        });
    }
    let (legacy, rest) = words.split_at(words.len().min(LEGACY_XSAVE_WORDS));
    // SAFETY: the FAM struct is only written through its own fields.
    let region = &mut unsafe { x.as_mut_fam_struct() }.xsave.region;
    region[..legacy.len()].copy_from_slice(legacy);
    region[legacy.len()..].fill(0);
    let tail = x.as_mut_slice();
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `words` in a fresh buffer of `host` words, as a restore fills its own.
    fn xsave_image(words: &[u32], host: usize) -> Result<Xsave, Error> {
        let mut x = Buffers::new(host)?.xsave;
        fill_xsave(&mut x, words).map(|()| x)
    }

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
    fn a_reused_xsave_buffer_keeps_nothing_of_the_last_image() {
        let mut x =
            xsave_image(&vec![7; LEGACY_XSAVE_WORDS + 700], LEGACY_XSAVE_WORDS + 700).unwrap();
        let shorter: Vec<u32> = (1..=100).collect();
        fill_xsave(&mut x, &shorter).unwrap();
        let all = image(&x);
        assert_eq!(all[..100], shorter[..]);
        assert!(all[100..].iter().all(|&w| w == 0));
    }

    /// Two vCPUs as format 5 writes them (a postcard sequence of
    /// `VcpuStateV2`), each different from a default state.
    fn two_vcpus() -> (Vec<VcpuState>, Vec<u8>) {
        let vcpus: Vec<VcpuState> = (0..2u32)
            .map(|n| {
                let mut v = VcpuState::default();
                v.cpuid.push(entry(0xd, n, 1, 2, 3)).unwrap();
                v.regs.0.rip = 0x1000 + u64::from(n);
                v.xsave
                    .extend((0..LEGACY_XSAVE_WORDS as u32).map(|w| w ^ n));
                v.msrs
                    .push(MsrEntry {
                        index: 0x10,
                        data: 7 << n,
                    })
                    .unwrap();
                v.lapic.0.regs[0x20] = 1 + n as i8;
                v.events.0.nmi.pending = n as u8;
                v
            })
            .collect();
        let wire: Vec<AsV2> = vcpus.iter().map(AsV2).collect();
        let bytes = postcard::to_allocvec(&wire).unwrap();
        drop(wire);
        (vcpus, bytes)
    }

    fn from_v2(
        bytes: &[u8],
        spares: &mut Vec<Box<VcpuState>>,
    ) -> BoundedVec<Box<VcpuState>, MAX_VCPUS> {
        let mut d = postcard::Deserializer::from_bytes(bytes);
        let got = VcpusFromV2(spares).deserialize(&mut d).unwrap();
        assert!(d.finalize().unwrap().is_empty());
        got
    }

    #[test]
    fn vcpus_read_in_place_as_the_derived_v2_reads_them() {
        let (vcpus, bytes) = two_vcpus();
        let derived: Vec<VcpuState> = postcard::from_bytes::<Vec<VcpuStateV2>>(&bytes)
            .unwrap()
            .into_iter()
            .map(VcpuState::from)
            .collect();
        assert_eq!(derived, vcpus);
        // Into spares holding another state (a longer XSAVE image, more
        // MSRs): nothing of it is left, and the spares' memory is used.
        let mut stale = blank();
        stale.xsave.extend(std::iter::repeat_n(9, MAX_XSAVE_WORDS));
        stale
            .msrs
            .extend(std::iter::repeat_n(MsrEntry { index: 1, data: 1 }, 5));
        let at: *const VcpuState = &*stale;
        let mut spares = vec![stale];
        let got = from_v2(&bytes, &mut spares);
        assert!(spares.is_empty());
        assert_eq!(
            got.iter().map(|v| &**v).collect::<Vec<_>>(),
            vcpus.iter().collect::<Vec<_>>()
        );
        assert!(
            got.iter().any(|v| std::ptr::eq(&**v, at)),
            "a spare was used"
        );
        // Without spares, each is allocated.
        let got = from_v2(&bytes, &mut Vec::new());
        assert_eq!(
            got.iter().map(|v| &**v).collect::<Vec<_>>(),
            vcpus.iter().collect::<Vec<_>>()
        );
    }

    #[test]
    fn vcpus_read_in_place_refuse_what_the_derived_v2_refuses() {
        let (_, bytes) = two_vcpus();
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            let mut d = postcard::Deserializer::from_bytes(&bytes[..cut]);
            assert!(VcpusFromV2(&mut Vec::new()).deserialize(&mut d).is_err());
            assert!(postcard::from_bytes::<Vec<VcpuStateV2>>(&bytes[..cut]).is_err());
        }
        // More vCPUs than a machine has.
        let v = VcpuState::default();
        let many: Vec<AsV2> = (0..=MAX_VCPUS).map(|_| AsV2(&v)).collect();
        let bytes = postcard::to_allocvec(&many).unwrap();
        let mut d = postcard::Deserializer::from_bytes(&bytes);
        assert!(VcpusFromV2(&mut Vec::new()).deserialize(&mut d).is_err());
    }

    #[test]
    fn a_blank_state_is_empty_and_holds_the_largest() {
        let s = blank();
        assert_eq!(*s, VcpuState::default());
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
