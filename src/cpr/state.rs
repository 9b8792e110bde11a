//! `CprState`: everything needed to resume a machine, as one file or message.
//!
//! Layout: a fixed 20-byte header (magic, format version, payload length, CRC32
//! of the payload, all little-endian), then the postcard payload. Every
//! collection in the payload has a fixed capacity, so decoding a hostile file
//! cannot allocate without bound; every decoded state then passes `check::state`
//! (shape, devices, live queues, XSAVE sizes), and every value is checked again
//! by the code that uses it.
//!
//! Versions are frozen once released: `CprStateV1` to `CprStateV4` and format
//! 5 never change. A new field or value means a new version that converts
//! from the one before, and that release then decodes all of them (SPEC.md,
//! "State compatibility"). Format 5 holds what format 4 does, each vCPU as a
//! `VcpuStateV2` (its XSAVE image as raw bytes); in memory the state stays a
//! `CprStateV4`. This release reads 1 to 5, and writes 5, or 4 or 3 for a peer
//! that reads no newer (`encode_into`: refused for a guest that format cannot
//! carry).

use std::fmt;

use serde::de::DeserializeSeed;
use serde::{Deserialize, Serialize};

use crate::layout::{MAX_DISKS, MAX_VFIO_DEVICES};
use crate::vfio::IdentityV1 as VfioIdentityV1;
use crate::virtio::block::Identity;
use crate::vm::vcpu_state::{AsV2, VcpuState, VcpusFromV2};
use crate::vm::{MachineStateV1, MachineStateV2, MachineStateV3};

pub const MAGIC: [u8; 8] = *b"MOLTCPR\0";
/// The format this release writes by default: its newest.
pub const VERSION: u32 = 5;
/// The formats this release reads, oldest first.
pub const READS: [u32; 5] = [1, 2, 3, 4, 5];
/// The formats this release can write, oldest first: the newest, and older
/// ones for a binary that reads no newer (an update back to an older release).
pub const WRITES: [u32; 3] = [3, 4, 5];
pub const HEADER_LEN: usize = 20;
/// No real state comes near this: ~10 KiB per vCPU, ~1 KiB per device.
pub const MAX_PAYLOAD: usize = 4 << 20;

/// Where guest RAM is while the state is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RamLocationV1 {
    /// In the `--mem-file`, which outlives the process. `sample_crc` covers a
    /// fixed sample of its pages, so a restore against the wrong (or an empty)
    /// file is refused instead of running the guest on someone else's memory.
    InPlace { sample_crc: u32 },
    /// Appended to the state file after the payload (reboot mode without a file).
    InStateFile,
}

/// The version this release saves and restores.
pub type RamLocation = RamLocationV1;

/// Version 1 of the saved state. Frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CprStateV1 {
    /// The release that wrote it, for `molt state` and error messages.
    pub writer: heapless::String<32>,
    pub ram: RamLocation,
    /// CLOCK_REALTIME when the last vCPU stopped, for the pause measurement.
    pub stopped_at_ns: u64,
    pub machine: MachineStateV1,
}

/// Whether the guest's vCPUs ran when it was saved: a paused guest comes
/// back paused (SPEC.md, "The three CPR modes"). Frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStateV2 {
    Running,
    Paused,
}

/// Version 2: version 1 plus the run state and each disk image's identity, so
/// that a restart refuses an image swapped, resized or replaced. Frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CprStateV2 {
    pub writer: heapless::String<32>,
    pub ram: RamLocation,
    pub stopped_at_ns: u64,
    pub machine: MachineStateV1,
    pub run: RunStateV2,
    /// One per disk, in argv order. Empty only in a state converted from
    /// version 1, which did not record them.
    pub disks: heapless::Vec<Identity, MAX_DISKS>,
}

/// Version 3's run state adds a guest that suspended itself to RAM (ACPI
/// S3): it comes back suspended, until `wakeup`. Frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStateV3 {
    Running,
    Paused,
    Suspended,
}

/// The version this release saves and restores.
pub type RunState = RunStateV3;

impl RunStateV3 {
    /// As `status` reports it (`state=...`).
    pub fn name(self) -> &'static str {
        match self {
            RunStateV3::Running => "running",
            RunStateV3::Paused => "paused",
            RunStateV3::Suspended => "suspended",
        }
    }
}

impl From<RunStateV2> for RunStateV3 {
    fn from(v2: RunStateV2) -> Self {
        match v2 {
            RunStateV2::Running => RunStateV3::Running,
            RunStateV2::Paused => RunStateV3::Paused,
        }
    }
}

/// Version 3: the machine with its ACPI power registers (`MachineStateV2`),
/// and the suspended run state. Frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CprStateV3 {
    pub writer: heapless::String<32>,
    pub ram: RamLocation,
    pub stopped_at_ns: u64,
    pub machine: MachineStateV2,
    pub run: RunStateV3,
    pub disks: heapless::Vec<Identity, MAX_DISKS>,
}

impl From<CprStateV1> for CprStateV2 {
    /// Version 1 did not record a run state: molt then always resumed the guest.
    fn from(v1: CprStateV1) -> Self {
        CprStateV2 {
            writer: v1.writer,
            ram: v1.ram,
            stopped_at_ns: v1.stopped_at_ns,
            machine: v1.machine,
            run: RunStateV2::Running,
            disks: heapless::Vec::new(),
        }
    }
}

impl From<CprStateV2> for CprStateV3 {
    fn from(v2: CprStateV2) -> Self {
        CprStateV3 {
            writer: v2.writer,
            ram: v2.ram,
            stopped_at_ns: v2.stopped_at_ns,
            machine: v2.machine.into(),
            run: v2.run.into(),
            disks: v2.disks,
        }
    }
}

/// Version 4: the machine with its passed-through functions' states
/// (`MachineStateV3`: what exec and transfer hand to a new process that adopts
/// the running devices), and the passed-through devices' identities, which
/// reboot mode carries while the guest is suspended to RAM: a restart opens
/// them by name again and must find the same devices at the same PCI slots.
/// Frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CprStateV4 {
    pub writer: heapless::String<32>,
    pub ram: RamLocation,
    pub stopped_at_ns: u64,
    pub machine: MachineStateV3,
    pub run: RunStateV3,
    pub disks: heapless::Vec<Identity, MAX_DISKS>,
    /// One per `--vfio`, in argv order.
    pub vfio: heapless::Vec<VfioIdentityV1, MAX_VFIO_DEVICES>,
}

impl From<CprStateV3> for CprStateV4 {
    /// Machines saved before version 4 had no passed-through device: molt
    /// refused every update with one.
    fn from(v3: CprStateV3) -> Self {
        CprStateV4 {
            writer: v3.writer,
            ram: v3.ram,
            stopped_at_ns: v3.stopped_at_ns,
            machine: v3.machine.into(),
            run: v3.run,
            disks: v3.disks,
            vfio: heapless::Vec::new(),
        }
    }
}

pub type CprState = CprStateV4;

#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    Truncated(usize),
    BadMagic,
    UnknownVersion(u32),
    TooLarge(usize),
    Checksum {
        stored: u32,
        actual: u32,
    },
    Decode {
        part: &'static str,
        at: usize,
        len: usize,
        why: postcard::Error,
    },
    TrailingBytes(usize),
    Invalid(super::check::Error),
    Encode(String),
    /// This release cannot write that format.
    Unwritable(u32),
    /// The guest uses something that format cannot carry (what).
    CannotCarry(u32, &'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated(n) => write!(f, "truncated: {n} bytes are missing"),
            Error::BadMagic => write!(f, "not a molt state (bad magic)"),
            Error::UnknownVersion(v) => write!(
                f,
                "state format version {v} is unknown to this molt (it reads versions {})",
                formats()
            ),
            Error::TooLarge(n) => write!(f, "payload of {n} bytes exceeds {MAX_PAYLOAD}"),
            Error::Checksum { stored, actual } => write!(
                f,
                "corrupt: CRC32 {actual:#010x} does not match the stored {stored:#010x}"
            ),
            Error::Decode { part, at, len, why } => write!(
                f,
                "payload: cannot decode {part} (from byte {at} of {len}; postcard: {why}): \
                 truncated or not a molt state"
            ),
            Error::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the payload"),
            Error::Invalid(why) => write!(f, "invalid state: {why}"),
            Error::Encode(e) => write!(f, "cannot encode the state: {e}"),
            Error::Unwritable(v) => write!(
                f,
                "this molt cannot write state format {v} (it writes {})",
                list(&WRITES)
            ),
            Error::CannotCarry(v, what) => write!(
                f,
                "state format {v} cannot carry {what}: the other binary reads no newer format \
                 (this molt writes up to {VERSION})"
            ),
        }
    }
}

/// Encodes `state` with its header in format `version`, one of `WRITES`: an
/// older format only if it carries everything the state holds (`carries`).
/// (molt itself encodes into buffers made before the pause, `encode_into`.)
#[cfg(any(test, feature = "fuzz"))]
pub fn encode_as(state: &CprState, version: u32) -> Result<Vec<u8>, Error> {
    encode_into(state, version, Vec::new())
}

/// A buffer for the encoding of a machine of `vcpus` vCPUs (`encode_into`),
/// made before the pause with its pages written: encoding into it faults
/// none in.
pub fn buffer(vcpus: usize) -> Vec<u8> {
    let mut out = vec![1; room(vcpus)];
    out.clear();
    out
}

/// The bytes an encoded machine of `vcpus` vCPUs fits in, but for large
/// devices' state (those grow a buffer made this large).
pub fn room(vcpus: usize) -> usize {
    HEADER_LEN + ROOM_BASE + vcpus * ROOM_PER_VCPU
}

/// `encode_as` into `out` (its contents replaced), which grows only if the
/// state needs more than its capacity.
pub fn encode_into(state: &CprState, version: u32, out: Vec<u8>) -> Result<Vec<u8>, Error> {
    let vfio = !state.vfio.is_empty() || !state.machine.vfio.is_empty();
    carries(version, vfio)?;
    let m = &state.machine;
    // Postcard writes a struct as its fields in order, like a tuple: version
    // 3 is version 4 without the machine's and the state's VFIO lists, and 5
    // is version 4 with each vCPU as a `VcpuStateV2`.
    let room = ROOM_BASE + m.vcpus.len() * ROOM_PER_VCPU;
    let mut encoded = match version {
        5 => encode_after_header(
            &(
                &state.writer,
                state.ram,
                state.stopped_at_ns,
                (
                    &m.shape,
                    VcpusV2(&m.vcpus),
                    &m.vm,
                    &m.serial,
                    &m.allocator,
                    &m.virtio,
                    &m.power,
                    &m.vfio,
                ),
                state.run,
                &state.disks,
                &state.vfio,
            ),
            room,
            out,
        ),
        3 => encode_after_header(
            &(
                &state.writer,
                state.ram,
                state.stopped_at_ns,
                (
                    &m.shape,
                    &m.vcpus,
                    &m.vm,
                    &m.serial,
                    &m.allocator,
                    &m.virtio,
                    &m.power,
                ),
                state.run,
                &state.disks,
            ),
            room,
            out,
        ),
        _ => encode_after_header(state, room, out),
    }
    .map_err(|e| Error::Encode(e.to_string()))?;
    let len = encoded.len() - HEADER_LEN;
    if len > MAX_PAYLOAD {
        return Err(Error::TooLarge(len));
    }
    write_header(version, &mut encoded);
    Ok(encoded)
}

/// Room reserved for an encoding before it is written: the machine and, per
/// vCPU, its XSAVE image (up to 16 KiB), MSRs, CPUID and registers. The state
/// is encoded in the pause, and one allocation there costs less than a buffer
/// that doubles as it grows (musl's allocator makes each growth a fresh
/// mapping); a larger state still grows it.
const ROOM_BASE: usize = 16 << 10;
const ROOM_PER_VCPU: usize = 32 << 10;

/// `value` encoded into `out` (cleared) behind HEADER_LEN bytes left for
/// `write_header`.
fn encode_after_header<T: Serialize + ?Sized>(
    value: &T,
    room: usize,
    mut out: Vec<u8>,
) -> postcard::Result<Vec<u8>> {
    out.clear();
    out.reserve(HEADER_LEN + room);
    out.resize(HEADER_LEN, 0);
    postcard::to_extend(value, out)
}

/// Fills the first HEADER_LEN bytes of `out` with the header of format
/// `version` for the payload after them: magic, version, length and CRC.
fn write_header(version: u32, out: &mut [u8]) {
    let (header, payload) = out.split_at_mut(HEADER_LEN);
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&version.to_le_bytes());
    header[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[16..20].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
}

/// The vCPUs as format 5 writes them: each a `VcpuStateV2`.
struct VcpusV2<'a>(&'a [Box<VcpuState>]);

impl Serialize for VcpusV2<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|v| AsV2(v)))
    }
}

/// Whether format `version` can be written for a guest with (`vfio`) or
/// without passed-through devices: what is known before the pause.
pub fn carries(version: u32, vfio: bool) -> Result<(), Error> {
    if !WRITES.contains(&version) {
        return Err(Error::Unwritable(version));
    }
    if version < 4 && vfio {
        return Err(Error::CannotCarry(
            version,
            "passed-through (--vfio) devices",
        ));
    }
    Ok(())
}

/// The newest format this release writes that a binary reading `peer` does.
pub fn newest_common(peer: &[u32]) -> Option<u32> {
    WRITES.into_iter().rev().find(|v| peer.contains(v))
}

/// `1,2,3`: formats as `molt version` lists them.
pub fn list(formats: &[u32]) -> String {
    formats
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The formats a `state-formats=` list names; None if it is not one.
pub fn parse_list(text: &str) -> Option<Vec<u32>> {
    text.split(',')
        .map(|v| v.parse().ok())
        .take(64)
        .collect::<Option<Vec<u32>>>()
        .filter(|l| !l.is_empty())
}

/// `payload` behind a header of format `version` with its length and CRC.
#[cfg(any(test, feature = "fuzz"))]
pub fn seal(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0; HEADER_LEN];
    out.extend_from_slice(payload);
    write_header(version, &mut out);
    out
}

/// The formats this release reads, as `molt version` and the handshakes list them.
pub fn formats() -> String {
    list(&READS)
}

/// The format version and payload length a header announces, after checking
/// the magic and that this release reads that version.
pub fn header(header: &[u8]) -> Result<(u32, usize), Error> {
    if header.len() < HEADER_LEN {
        return Err(Error::Truncated(HEADER_LEN - header.len()));
    }
    if header[..8] != MAGIC {
        return Err(Error::BadMagic);
    }
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let version = word(8);
    if !READS.contains(&version) {
        return Err(Error::UnknownVersion(version));
    }
    let len = word(12) as usize;
    if len > MAX_PAYLOAD {
        return Err(Error::TooLarge(len));
    }
    Ok((version, len))
}

/// Decodes and validates a state; `bytes` is exactly header + payload.
pub fn decode(bytes: &[u8]) -> Result<CprState, Error> {
    decode_format(bytes).map(|(state, _)| state)
}

/// `decode`, and the format the state was written in.
pub fn decode_format(bytes: &[u8]) -> Result<(CprState, u32), Error> {
    decode_format_into(bytes, &mut Vec::new())
}

/// `decode_format`, the vCPUs read into boxes taken from `spares` (`blank`
/// ones, made before the pause) while there are any.
pub fn decode_format_into(
    bytes: &[u8],
    spares: &mut Vec<Box<VcpuState>>,
) -> Result<(CprState, u32), Error> {
    let (version, len) = header(bytes)?;
    let have = bytes.len() - HEADER_LEN;
    if have < len {
        return Err(Error::Truncated(len - have));
    }
    if have > len {
        return Err(Error::TrailingBytes(have - len));
    }
    let payload = &bytes[HEADER_LEN..];
    let stored = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    let actual = crc32fast::hash(payload);
    if stored != actual {
        return Err(Error::Checksum { stored, actual });
    }
    let state = decode_payload(version, payload, spares)?;
    super::check::state(&state).map_err(Error::Invalid)?;
    if version >= 2 {
        super::check::disks(&state).map_err(Error::Invalid)?;
    }
    Ok((state, version))
}

/// Decodes the payload part by part, so that a failure names the part and the
/// byte it starts at. Postcard writes a struct as its fields one after the
/// other, so this reads exactly what `postcard::from_bytes` of that version's
/// struct would: version 2 appends fields to version 1; version 3 appends the
/// machine's power registers to its machine, and writes run states 2 did not;
/// version 4 appends the passed-through functions to the machine and the
/// passed-through devices' identities to the whole; version 5 is version 4
/// with each vCPU as a `VcpuStateV2`.
fn decode_payload(
    version: u32,
    payload: &[u8],
    spares: &mut Vec<Box<VcpuState>>,
) -> Result<CprState, Error> {
    let mut p = Parts { payload, at: 0 };
    let writer = p.next("writer")?;
    let ram = p.next("ram")?;
    let stopped_at_ns = p.next("stopped_at_ns")?;
    let machine = MachineStateV1 {
        shape: p.next("machine.shape")?,
        vcpus: if version >= 5 {
            p.next_seed("machine.vcpus", VcpusFromV2(spares))?
        } else {
            p.next("machine.vcpus")?
        },
        vm: p.next("machine.vm")?,
        serial: p.next("machine.serial")?,
        allocator: p.next("machine.allocator")?,
        virtio: p.next("machine.virtio")?,
    };
    let v1 = CprStateV1 {
        writer,
        ram,
        stopped_at_ns,
        machine,
    };
    let state: CprState = match version {
        1 => CprStateV3::from(CprStateV2::from(v1)).into(),
        2 => CprStateV3::from(CprStateV2 {
            run: p.next("run")?,
            disks: p.next("disks")?,
            ..v1.into()
        })
        .into(),
        3 => CprStateV3 {
            machine: MachineStateV2 {
                power: p.next("machine.power")?,
                ..v1.machine.into()
            },
            run: p.next("run")?,
            disks: p.next("disks")?,
            writer: v1.writer,
            ram: v1.ram,
            stopped_at_ns: v1.stopped_at_ns,
        }
        .into(),
        _ => CprStateV4 {
            machine: MachineStateV3 {
                power: p.next("machine.power")?,
                vfio: p.next("machine.vfio")?,
                ..MachineStateV2::from(v1.machine).into()
            },
            run: p.next("run")?,
            disks: p.next("disks")?,
            writer: v1.writer,
            ram: v1.ram,
            stopped_at_ns: v1.stopped_at_ns,
            vfio: p.next("vfio")?,
        },
    };
    if p.at < payload.len() {
        return Err(Error::TrailingBytes(payload.len() - p.at));
    }
    Ok(state)
}

/// The payload being decoded and how far it has been read.
struct Parts<'a> {
    payload: &'a [u8],
    at: usize,
}

impl<'a> Parts<'a> {
    fn next_seed<T: DeserializeSeed<'a>>(
        &mut self,
        part: &'static str,
        seed: T,
    ) -> Result<T::Value, Error> {
        let rest = &self.payload[self.at..];
        let error = |why| Error::Decode {
            part,
            at: self.at,
            len: self.payload.len(),
            why,
        };
        let mut d = postcard::Deserializer::from_bytes(rest);
        let value = seed.deserialize(&mut d).map_err(error)?;
        let left = d.finalize().map_err(error)?;
        self.at += rest.len() - left.len();
        Ok(value)
    }

    fn next<T: Deserialize<'a>>(&mut self, part: &'static str) -> Result<T, Error> {
        let rest = &self.payload[self.at..];
        let (value, left) = postcard::take_from_bytes(rest).map_err(|e| Error::Decode {
            part,
            at: self.at,
            len: self.payload.len(),
            why: e,
        })?;
        self.at += rest.len() - left.len();
        Ok(value)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::power::PowerState;
    use crate::pci::Allocator;
    use crate::vm::{MachineState, Shape};

    /// A valid state: one vCPU with a legacy-sized XSAVE image, no devices.
    pub(crate) fn sample() -> CprState {
        let mut vcpu = Box::<crate::vm::vcpu_state::VcpuState>::default();
        let legacy = crate::vm::vcpu_state::LEGACY_XSAVE_WORDS;
        vcpu.xsave.resize(legacy, 0).unwrap();
        let mut vcpus = heapless::Vec::new();
        vcpus.push(vcpu).unwrap();
        CprState {
            writer: heapless::String::try_from("test").unwrap(),
            ram: RamLocation::InStateFile,
            stopped_at_ns: 42,
            machine: MachineState {
                shape: Shape {
                    vcpus: 1,
                    mem_size: 64 << 20,
                    disks: heapless::Vec::new(),
                    nets: heapless::Vec::new(),
                },
                vcpus,
                vm: Default::default(),
                serial: Default::default(),
                allocator: Allocator::new(),
                virtio: heapless::Vec::new(),
                power: PowerState::default(),
                vfio: heapless::Vec::new(),
            },
            run: RunState::Running,
            disks: heapless::Vec::new(),
            vfio: heapless::Vec::new(),
        }
    }

    /// `sample`'s machine as version 1 of the format held it.
    fn machine_v1(s: &CprState) -> MachineStateV1 {
        let m = s.machine.clone();
        MachineStateV1 {
            shape: m.shape,
            vcpus: m.vcpus,
            vm: m.vm,
            serial: m.serial,
            allocator: m.allocator,
            virtio: m.virtio,
        }
    }

    /// A file of format `version` holding `payload`.
    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = encode_as(&s, VERSION).unwrap();
        assert_eq!(&bytes[..8], b"MOLTCPR\0");
        assert_eq!(decode(&bytes).unwrap(), s);
    }

    /// `sample` with one disk of `identities` identities, no transport (the
    /// devices' checks are `check`'s tests).
    fn with_disk(identities: usize) -> CprState {
        let mut s = sample();
        s.machine.shape.disks.push(false).unwrap();
        s.machine.virtio = heapless::Vec::new();
        for i in 0..identities {
            let id = Identity {
                size: 1 << 20,
                ino: 100 + i as u64,
                born_ns: 1_700_000_000_000_000_000,
            };
            s.disks.push(id).unwrap();
        }
        s
    }

    #[test]
    fn a_suspended_guest_and_its_power_registers_round_trip() {
        let mut s = sample();
        s.run = RunState::Suspended;
        s.machine.power = PowerState {
            status: 0x8000,
            enable: 0x0120,
            control: 3 << 10,
            sleep_pending: true,
        };
        let bytes = encode_as(&s, VERSION).unwrap();
        assert_eq!(bytes[8], 5);
        assert_eq!(decode(&bytes).unwrap(), s);
        for run in [RunState::Running, RunState::Paused] {
            s.run = run;
            assert_eq!(decode(&encode_as(&s, VERSION).unwrap()).unwrap().run, run);
        }
        assert_eq!(formats(), "1,2,3,4,5");
        // A run state no version has is refused, naming the part.
        let payload = postcard::to_allocvec(&sample()).unwrap();
        let mut bad = payload.clone();
        let run_at = payload.len() - 3; // run, then the empty disk and VFIO lists
        assert_eq!(bad[run_at], 0);
        bad[run_at] = 3;
        assert!(matches!(
            decode(&seal(4, &bad)),
            Err(Error::Decode { part: "run", .. })
        ));
    }

    /// A passed-through function's state as an edu device with MSI on and
    /// one vector armed would have it.
    fn vfio_state() -> crate::vfio::device::VfioState {
        let mut config = heapless::Vec::new();
        config.resize(256, 0).unwrap();
        config[0..4].copy_from_slice(&[0x34, 0x12, 0xe8, 0x11]);
        config[0x42] = 0x81;
        crate::vfio::device::VfioState {
            config,
            msix: None,
            msi_armed: Some((1, 1)),
            msix_armed: None,
        }
    }

    #[test]
    fn version_4_carries_passed_through_functions() {
        let mut s = sample();
        s.machine.vfio.push(vfio_state()).unwrap();
        let mut msix = vfio_state();
        msix.msix = Some(crate::pci::msix::MsixState {
            enabled: true,
            ..Default::default()
        });
        msix.msix_armed = Some((8, 0b1010));
        s.machine.vfio.push(msix).unwrap();
        let bytes = encode_as(&s, VERSION).unwrap();
        assert_eq!(decode(&bytes).unwrap(), s);
        // More functions than a machine can have do not decode: the count
        // comes before the run state, the disk list and the device identities
        // (a byte each here).
        let mut payload = postcard::to_allocvec(&sample()).unwrap();
        let count_at = payload.len() - 4;
        assert_eq!(payload[count_at], 0);
        payload[count_at] = 5;
        assert!(matches!(
            decode(&seal(4, &payload)),
            Err(Error::Decode {
                part: "machine.vfio",
                ..
            })
        ));
    }

    /// `s` as format 3 holds it: all but the passed-through devices.
    fn as_v3(s: &CprState) -> CprStateV3 {
        let m = s.machine.clone();
        CprStateV3 {
            writer: s.writer.clone(),
            ram: s.ram,
            stopped_at_ns: s.stopped_at_ns,
            machine: MachineStateV2 {
                shape: m.shape,
                vcpus: m.vcpus,
                vm: m.vm,
                serial: m.serial,
                allocator: m.allocator,
                virtio: m.virtio,
                power: m.power,
            },
            run: s.run,
            disks: s.disks.clone(),
        }
    }

    #[test]
    fn version_3_decodes_without_passed_through_functions() {
        let mut v3 = as_v3(&sample());
        v3.run = RunStateV3::Suspended;
        v3.disks = heapless::Vec::new();
        let payload = postcard::to_allocvec(&v3).unwrap();
        let decoded = decode(&seal(3, &payload)).unwrap();
        assert_eq!(decoded, CprStateV4::from(v3));
        assert!(decoded.machine.vfio.is_empty());
        assert!(decoded.vfio.is_empty());
        assert_eq!(decoded.run, RunState::Suspended);
        // A version 4 payload announced as version 3 has bytes left over.
        let v4 = postcard::to_allocvec(&sample()).unwrap();
        assert!(decode(&seal(3, &v4)).is_err());
    }

    #[test]
    fn version_4_keeps_the_passed_through_devices_identities() {
        let mut s = sample();
        s.run = RunState::Suspended;
        let edu = crate::vfio::Identity {
            bdf: "0000:00:04.0".parse().unwrap(),
            slot: 3,
            vendor: 0x1234,
            device: 0x11e8,
        };
        s.vfio.push(edu).unwrap();
        let bytes = encode_as(&s, 4).unwrap();
        assert_eq!(bytes[8], 4);
        assert_eq!(decode(&encode_as(&s, 5).unwrap()).unwrap(), s);
        // The list comes last: its length, then each device's fields (domain
        // as a varint, bus, device, function, slot, vendor and device IDs).
        let tail = [1, 0, 0, 4, 0, 3, 0xb4, 0x24, 0xe8, 0x23];
        assert!(bytes.ends_with(&tail), "{:x?}", &bytes[bytes.len() - 12..]);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.vfio.as_slice(), [edu]);
        assert_eq!(decoded, s);
        // More devices than --vfio allows cannot decode.
        let mut payload = postcard::to_allocvec(&sample()).unwrap();
        let n = payload.len() - 1;
        payload[n] = (crate::layout::MAX_VFIO_DEVICES + 1) as u8;
        for _ in 0..=crate::layout::MAX_VFIO_DEVICES {
            payload.extend_from_slice(&tail[1..]);
        }
        assert!(matches!(
            decode(&seal(4, &payload)),
            Err(Error::Decode { part: "vfio", .. })
        ));
    }

    #[test]
    fn older_formats_are_written_for_older_readers() {
        let mut s = sample();
        s.run = RunState::Suspended;
        s.machine.power.enable = 0x0120;
        // Format 3 holds everything but the passed-through devices: it reads
        // back the same, and is what version 3 itself would have written.
        let bytes = encode_as(&s, 3).unwrap();
        assert_eq!(bytes[8], 3);
        assert_eq!(decode_format(&bytes).unwrap(), (s.clone(), 3));
        let v3 = as_v3(&s);
        assert_eq!(bytes, seal(3, &postcard::to_allocvec(&v3).unwrap()));
        // A guest with a passed-through device cannot go to format 3.
        s.vfio
            .push(crate::vfio::Identity {
                bdf: "0000:00:04.0".parse().unwrap(),
                slot: 3,
                vendor: 0x1234,
                device: 0x11e8,
            })
            .unwrap();
        let e = encode_as(&s, 3).unwrap_err();
        assert_eq!(e, Error::CannotCarry(3, "passed-through (--vfio) devices"));
        assert!(e.to_string().contains("cannot carry passed-through"), "{e}");
        assert_eq!(carries(3, true), Err(e));
        assert!(encode_as(&s, 4).is_ok());
        // Formats this release reads but does not write, or does not know.
        for v in [1, 2, VERSION + 1] {
            assert_eq!(encode_as(&sample(), v), Err(Error::Unwritable(v)));
        }
        assert_eq!(carries(4, true), Ok(()));
    }

    #[test]
    fn the_newest_common_format_is_chosen() {
        assert_eq!(newest_common(&READS), Some(VERSION));
        assert_eq!(newest_common(&[1, 2, 3]), Some(3));
        assert_eq!(newest_common(&[3, VERSION, VERSION + 1]), Some(VERSION));
        assert_eq!(newest_common(&[1, 2]), None);
        assert_eq!(newest_common(&[VERSION + 1]), None);
        assert_eq!(parse_list("1,2,3"), Some(vec![1, 2, 3]));
        assert_eq!(list(&[1, 2, 3]), "1,2,3");
        for bad in ["", "1,,2", "x", "1;2", "-1"] {
            assert_eq!(parse_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn version_5_holds_xsave_as_raw_bytes() {
        let mut s = sample();
        for (i, w) in s.machine.vcpus[0].xsave.iter_mut().enumerate() {
            *w = (i as u32).wrapping_mul(0x9e37_79b9);
        }
        let v5 = encode_as(&s, 5).unwrap();
        let v4 = encode_as(&s, 4).unwrap();
        assert_eq!((v5[8], v4[8]), (5, 4));
        assert_eq!(decode_format(&v5).unwrap(), (s.clone(), 5));
        assert_eq!(decode_format(&v4).unwrap(), (s.clone(), 4));
        // The image's bytes as they are, behind their length (a varint).
        let words = &s.machine.vcpus[0].xsave;
        let raw: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let at = v5
            .windows(raw.len())
            .position(|w| w == raw)
            .expect("the raw XSAVE bytes are in the state");
        assert_eq!(v5[at - 2..at], [0x80, 0x20], "length 4096 as a varint");
        // Format 4 holds the same words as varints: 1 to 5 bytes each.
        let varints: usize = words
            .iter()
            .map(|&w| (32 - w.leading_zeros()).div_ceil(7).max(1) as usize)
            .sum();
        assert_eq!(v4.len() + raw.len(), v5.len() + varints);
        // A length that is not whole words, or more than a vCPU's XSAVE
        // can be, does not decode.
        for (len, extra) in [
            (4095usize, &[0xff, 0x1f][..]),
            (4 * 4097, &[0x84, 0x80, 0x01][..]),
        ] {
            let mut bad = v5[HEADER_LEN..at - 2].to_vec();
            bad.extend_from_slice(extra);
            bad.extend(std::iter::repeat_n(0, len));
            bad.extend_from_slice(&v5[at + raw.len()..]);
            assert!(
                matches!(
                    decode(&seal(5, &bad)),
                    Err(Error::Decode {
                        part: "machine.vcpus",
                        ..
                    })
                ),
                "{len}"
            );
        }
        // Format 5 read as format 4 is refused.
        let mut relabelled = v5.clone();
        relabelled[8] = 4;
        assert!(decode(&relabelled).is_err());
    }

    #[test]
    fn disk_identities_match_the_disks() {
        // Identities must match the disks one for one (checked after the
        // devices, so use a bare payload check here).
        assert!(crate::cpr::check::disks(&with_disk(1)).is_ok());
        for n in [0, 2] {
            let e = crate::cpr::check::disks(&with_disk(n)).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("{n} disk identities (disks) for 1 disks")),
                "{e}"
            );
        }
    }

    #[test]
    fn version_2_decodes_with_power_on_registers() {
        let s = sample();
        let v2 = CprStateV2 {
            writer: s.writer.clone(),
            ram: s.ram,
            stopped_at_ns: s.stopped_at_ns,
            machine: machine_v1(&s),
            run: RunStateV2::Paused,
            disks: heapless::Vec::new(),
        };
        let payload = postcard::to_allocvec(&v2).unwrap();
        let decoded = decode(&seal(2, &payload)).unwrap();
        assert_eq!(decoded, CprStateV4::from(CprStateV3::from(v2)));
        assert_eq!(decoded.run, RunState::Paused);
        assert_eq!(decoded.machine.power, PowerState::default());
        assert_eq!(decoded.machine.vcpus, s.machine.vcpus);
    }

    #[test]
    fn version_1_decodes_as_running_without_disk_identities() {
        let s = sample();
        let v1 = CprStateV1 {
            writer: s.writer.clone(),
            ram: s.ram,
            stopped_at_ns: s.stopped_at_ns,
            machine: machine_v1(&s),
        };
        let payload = postcard::to_allocvec(&v1).unwrap();
        let mut bytes = seal(1, &payload);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(
            decoded,
            CprStateV4::from(CprStateV3::from(CprStateV2::from(v1)))
        );
        assert_eq!(decoded.run, RunState::Running);
        assert!(decoded.disks.is_empty());
        assert_eq!(decoded.machine.power, PowerState::default());
        // The same payload announced as version 2 or 3 lacks the new parts.
        bytes[8] = 2;
        assert!(matches!(
            decode(&bytes),
            Err(Error::Decode { part: "run", .. })
        ));
        for version in [3, 4] {
            bytes[8] = version;
            assert!(matches!(
                decode(&bytes),
                Err(Error::Decode {
                    part: "machine.power",
                    ..
                })
            ));
        }
    }

    #[test]
    fn damage_is_named() {
        let bytes = encode_as(&sample(), VERSION).unwrap();
        assert_eq!(decode(&bytes[..10]), Err(Error::Truncated(10)));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(Error::Truncated(1))
        ));
        let mut magic = bytes.clone();
        magic[0] ^= 1;
        assert_eq!(decode(&magic), Err(Error::BadMagic));
        let mut version = bytes.clone();
        version[8] = 6;
        assert_eq!(decode(&version), Err(Error::UnknownVersion(6)));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x10;
        assert!(matches!(decode(&flipped), Err(Error::Checksum { .. })));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(Error::TrailingBytes(1)));
        let mut huge = bytes.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(Error::TooLarge(_))));
    }

    #[test]
    fn a_payload_that_cannot_be_decoded_names_the_part_and_offset() {
        let bytes = encode_as(&sample(), VERSION).unwrap();
        let payload = &bytes[HEADER_LEN..];
        // The last byte is the (empty) VFIO device list's length.
        let short = &payload[..payload.len() - 1];
        let mut resealed = bytes[..HEADER_LEN].to_vec();
        resealed[12..16].copy_from_slice(&(short.len() as u32).to_le_bytes());
        resealed[16..20].copy_from_slice(&crc32fast::hash(short).to_le_bytes());
        resealed.extend_from_slice(short);
        let e = decode(&resealed).unwrap_err();
        assert!(
            matches!(e, Error::Decode { part: "vfio", at, len, .. }
                if at == short.len() && len == short.len()),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with("payload: cannot decode vfio (from byte"),
            "{text}"
        );
        assert!(text.ends_with("truncated or not a molt state"), "{text}");
    }

    #[test]
    fn parts_must_agree_with_the_shape() {
        let mut s = sample();
        s.machine.shape.vcpus = 2;
        let bytes = encode_as(&s, VERSION).unwrap();
        assert!(matches!(decode(&bytes), Err(Error::Invalid(_))));
        let mut s = sample();
        s.machine.shape.mem_size = 1000;
        assert!(matches!(
            decode(&encode_as(&s, VERSION).unwrap()),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn shape_differences_are_listed() {
        let a = sample().machine.shape;
        let mut b = a.clone();
        b.vcpus = 4;
        b.nets.push([0x52, 0x54, 0, 0, 0, 1]).unwrap();
        let d = b.differences(&a);
        assert_eq!(d.len(), 2);
        assert!(d[0].contains("saved 1, now 4"));
        assert!(d[1].contains("52:54:00:00:00:01"));
        assert!(a.differences(&a).is_empty());
    }
}
