//! The checks every decoded state passes before anything uses it, shared by
//! every restore (reboot, exec, transfer) and by `molt state`: the parts agree
//! with the machine shape the state claims (vCPU and device counts, memory
//! size), each saved virtio transport belongs to the device at its slot, its
//! live queues' rings lie in guest RAM and their indices are consistent, and
//! each vCPU's XSAVE image fits its CPUID's layout.
//!
//! Nothing here needs KVM or the devices: what a state is checked against is
//! derived from its own shape (disks first, then NICs, as `vm::devices::build`
//! places them). What only this host's KVM can tell (CPU features, the XSAVE
//! buffer size) is `vm::host_cpu`'s check; the live devices' own checks
//! (`VirtioPci::restore`) run again at restore.

use std::fmt;

use super::state::CprState;
use crate::layout::{MAX_VCPUS, MIN_MEM};
use crate::pci::msix::MsixState;
use crate::virtio::pci::TransportState;
use crate::virtio::{self, QueueStateV1};
use crate::vm::memory::{ram_regions, RamRegion};
use crate::vm::vcpu_state::{VcpuState, LEGACY_XSAVE_WORDS};
use crate::vm::Shape;

/// The virtio PCI vendor ID and the modern device ID base (4.1.2.1).
const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_DEVICE_BASE: u16 = 0x1040;
/// Guest physical addresses stop at 2^52 (x86-64 MAXPHYADDR at most 52).
const MAX_PHYS_END: u64 = 1 << 52;
/// The MSI-X "no vector" value (4.1.5.1.2).
const NO_VECTOR: u16 = 0xffff;

/// A device slot, as messages name it: its index and what the shape puts there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: usize,
    pub device_type: u16,
    /// Its index among the devices of its kind (disk N, NIC N).
    pub nth: usize,
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.device_type == virtio::TYPE_NET {
            "nic"
        } else {
            "disk"
        };
        write!(
            f,
            "device {} ({kind} {}, {})",
            self.index,
            self.nth,
            virtio::type_name(self.device_type)
        )
    }
}

/// What is wrong with one queue.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueFault {
    MaxSize {
        saved: u16,
        device: u16,
    },
    /// virtio-queue's own checks (size a power of two within max_size, ring
    /// alignment) refused it.
    Rejected(String),
    Ring {
        ring: &'static str,
        addr: u64,
        len: u64,
        mem_size: u64,
    },
    Indices {
        next_avail: u16,
        next_used: u16,
        size: u16,
    },
    /// A live queue differs from its registers, frozen while the device runs.
    Frozen(&'static str),
}

impl fmt::Display for QueueFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueFault::MaxSize { saved, device } => {
                write!(f, "max_size {saved}, the device's is {device}")
            }
            QueueFault::Rejected(e) => write!(f, "{e}"),
            QueueFault::Ring {
                ring,
                addr,
                len,
                mem_size,
            } => write!(
                f,
                "{ring} at {addr:#x}, {len:#x} bytes for this queue size (event index field \
                 included), is not inside guest RAM ({mem_size:#x} bytes)"
            ),
            QueueFault::Indices {
                next_avail,
                next_used,
                size,
            } => write!(
                f,
                "next_avail {next_avail} is {} ahead of next_used {next_used}, more than the \
                 queue size {size}",
                next_avail.wrapping_sub(*next_used)
            ),
            QueueFault::Frozen(field) => write!(
                f,
                "{field} differs from the queue's registers (frozen while the device runs)"
            ),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    Vcpus {
        states: usize,
        shape: u8,
    },
    Devices {
        states: usize,
        devices: usize,
    },
    MemSize(u64),
    MemEnd(u64),
    Xsave {
        vcpu: usize,
        bytes: usize,
        max: u64,
    },
    /// The transport saved at a slot is not the device the shape puts there.
    Identity {
        slot: Slot,
        vendor: u16,
        device: u16,
    },
    ConfigSize {
        slot: Slot,
        len: usize,
    },
    QueueCount {
        slot: Slot,
        live: bool,
        saved: usize,
        device: usize,
    },
    Queue {
        slot: Slot,
        queue: usize,
        live: bool,
        fault: QueueFault,
    },
    LiveWhileStopped {
        slot: Slot,
        queues: usize,
    },
    MsixVectors {
        slot: Slot,
        saved: usize,
        device: usize,
    },
    Vector {
        slot: Slot,
        field: &'static str,
        vector: u16,
        vectors: usize,
    },
    /// Format 2 records one identity per disk.
    DiskIdentities {
        identities: usize,
        disks: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Vcpus { states, shape } => write!(
                f,
                "{states} vCPU states for a shape of {shape} vCPUs (shape.vcpus: 1 to \
                 {MAX_VCPUS}, one state each)"
            ),
            Error::Devices { states, devices } => {
                write!(
                    f,
                    "{states} device states (virtio) for {devices} devices (shape.disks and \
                     shape.nets)"
                )
            }
            Error::MemSize(n) => write!(
                f,
                "memory size {n} (shape.mem_size): must be a multiple of 4096 and at least \
                 {MIN_MEM}"
            ),
            Error::MemEnd(n) => write!(
                f,
                "memory size {n} (shape.mem_size): guest RAM would end past \
                 {MAX_PHYS_END:#x}, the largest guest physical address"
            ),
            Error::Xsave { vcpu, bytes, max } => write!(
                f,
                "vCPU {vcpu}: the XSAVE image (xsave) is {bytes} bytes; it must be at least the \
                 {}-byte legacy area and at most the {max} bytes its CPUID's XSAVE layout \
                 (leaf 0xD) takes",
                LEGACY_XSAVE_WORDS * 4
            ),
            Error::Identity {
                slot,
                vendor,
                device,
            } => write!(
                f,
                "{slot}: the saved transport is PCI {vendor:04x}:{device:04x} ({}), not \
                 {VIRTIO_VENDOR:04x}:{:04x}: transports swapped or from another machine",
                saved_type_name(*vendor, *device),
                VIRTIO_DEVICE_BASE + slot.device_type
            ),
            Error::ConfigSize { slot, len } => {
                write!(f, "{slot}: config space of {len} bytes, not 256")
            }
            Error::QueueCount {
                slot,
                live,
                saved,
                device,
            } => write!(
                f,
                "{slot}: {saved} {}queues saved, the device has {device}",
                if *live { "live " } else { "" }
            ),
            Error::Queue {
                slot,
                queue,
                live,
                fault,
            } => write!(
                f,
                "{slot}: {} {queue}: {fault}",
                if *live { "live queue" } else { "queue" }
            ),
            Error::LiveWhileStopped { slot, queues } => {
                write!(f, "{slot}: {queues} live queues saved while not running")
            }
            Error::MsixVectors {
                slot,
                saved,
                device,
            } => write!(
                f,
                "{slot}: {saved} MSI-X vectors saved, the device has {device}"
            ),
            Error::Vector {
                slot,
                field,
                vector,
                vectors,
            } => write!(
                f,
                "{slot}: {field} {vector} names no MSI-X vector (it has {vectors})"
            ),
            Error::DiskIdentities { identities, disks } => write!(
                f,
                "{identities} disk identities (disks) for {disks} disks (shape.disks): \
                 one each"
            ),
        }
    }
}

fn saved_type_name(vendor: u16, device: u16) -> &'static str {
    match device.checked_sub(VIRTIO_DEVICE_BASE) {
        Some(t) if vendor == VIRTIO_VENDOR => virtio::type_name(t),
        _ => "not a virtio device",
    }
}

/// Checks everything in `s` that can be checked without KVM.
pub fn state(s: &CprState) -> Result<(), Error> {
    let m = &s.machine;
    let shape = &m.shape;
    let vcpus = usize::from(shape.vcpus);
    if vcpus == 0 || vcpus > MAX_VCPUS || m.vcpus.len() != vcpus {
        return Err(Error::Vcpus {
            states: m.vcpus.len(),
            shape: shape.vcpus,
        });
    }
    let ram = ram(shape.mem_size)?;
    for (i, v) in m.vcpus.iter().enumerate() {
        xsave(i, v)?;
    }
    let slots = slots(shape);
    if m.virtio.len() != slots.len() {
        return Err(Error::Devices {
            states: m.virtio.len(),
            devices: slots.len(),
        });
    }
    for (slot, t) in slots.into_iter().zip(&m.virtio) {
        transport(slot, t, &ram, shape.mem_size)?;
    }
    Ok(())
}

/// A state of format 2 or later names every disk's image.
pub fn disks(s: &CprState) -> Result<(), Error> {
    let disks = s.machine.shape.disks.len();
    if s.disks.len() != disks {
        return Err(Error::DiskIdentities {
            identities: s.disks.len(),
            disks,
        });
    }
    Ok(())
}

/// Guest RAM's regions for `mem_size`, refused if it is not a RAM size molt
/// runs or if its end would pass the largest guest physical address.
fn ram(mem_size: u64) -> Result<Vec<RamRegion>, Error> {
    if mem_size < MIN_MEM || !mem_size.is_multiple_of(4096) {
        return Err(Error::MemSize(mem_size));
    }
    let regions = ram_regions(mem_size);
    if regions.iter().any(|r| {
        r.guest_addr
            .checked_add(r.size)
            .is_none_or(|end| end > MAX_PHYS_END)
    }) {
        return Err(Error::MemEnd(mem_size));
    }
    Ok(regions)
}

fn xsave(vcpu: usize, v: &VcpuState) -> Result<(), Error> {
    let max = v.xsave_layout_bytes();
    let bytes = v.xsave.len() * 4;
    if v.xsave.len() < LEGACY_XSAVE_WORDS || bytes as u64 > max.next_multiple_of(4) {
        return Err(Error::Xsave { vcpu, bytes, max });
    }
    Ok(())
}

/// The device each slot holds: disks first, then NICs, in argv order.
pub fn slots(shape: &Shape) -> Vec<Slot> {
    let disks = (0..shape.disks.len()).map(|nth| (virtio::TYPE_BLOCK, nth));
    let nets = (0..shape.nets.len()).map(|nth| (virtio::TYPE_NET, nth));
    disks
        .chain(nets)
        .enumerate()
        .map(|(index, (device_type, nth))| Slot {
            index,
            device_type,
            nth,
        })
        .collect()
}

fn transport(
    slot: Slot,
    t: &TransportState,
    ram: &[RamRegion],
    mem_size: u64,
) -> Result<(), Error> {
    if t.config.len() != 256 {
        return Err(Error::ConfigSize {
            slot,
            len: t.config.len(),
        });
    }
    let id = |at: usize| u16::from_le_bytes([t.config[at], t.config[at + 1]]);
    let (vendor, device) = (id(0), id(2));
    if vendor != VIRTIO_VENDOR || device != VIRTIO_DEVICE_BASE + slot.device_type {
        return Err(Error::Identity {
            slot,
            vendor,
            device,
        });
    }
    // Only the two types `slots` yields reach here.
    let maxes = virtio::queue_max_sizes(slot.device_type).unwrap_or_default();
    vectors(slot, t, maxes.len())?;
    queues(slot, false, &t.queues, maxes)?;
    if !t.active {
        if !t.device_queues.is_empty() {
            return Err(Error::LiveWhileStopped {
                slot,
                queues: t.device_queues.len(),
            });
        }
        return Ok(());
    }
    queues(slot, true, &t.device_queues, maxes)?;
    for (queue, (live, regs)) in t.device_queues.iter().zip(&t.queues).enumerate() {
        let fault = |fault| Error::Queue {
            slot,
            queue,
            live: true,
            fault,
        };
        live_queue(live, regs, ram, mem_size).map_err(fault)?;
    }
    Ok(())
}

fn vectors(slot: Slot, t: &TransportState, queues: usize) -> Result<(), Error> {
    let MsixState {
        entries, pending, ..
    } = &t.msix;
    let n = queues + 1;
    if entries.len() != n || pending.len() != n {
        return Err(Error::MsixVectors {
            slot,
            saved: entries.len().max(pending.len()),
            device: n,
        });
    }
    if t.queue_vectors.len() != queues {
        return Err(Error::QueueCount {
            slot,
            live: false,
            saved: t.queue_vectors.len(),
            device: queues,
        });
    }
    let named = t.queue_vectors.iter().map(|&v| ("queue vector", v));
    for (field, vector) in named.chain([("config vector", t.config_vector)]) {
        if vector != NO_VECTOR && usize::from(vector) >= n {
            return Err(Error::Vector {
                slot,
                field,
                vector,
                vectors: n,
            });
        }
    }
    Ok(())
}

/// Count, max_size and virtio-queue's own checks, for the registers or the
/// live queues.
fn queues(slot: Slot, live: bool, qs: &[QueueStateV1], maxes: &[u16]) -> Result<(), Error> {
    if qs.len() != maxes.len() {
        return Err(Error::QueueCount {
            slot,
            live,
            saved: qs.len(),
            device: maxes.len(),
        });
    }
    for (queue, (q, &max)) in qs.iter().zip(maxes).enumerate() {
        let fault = |fault| Error::Queue {
            slot,
            queue,
            live,
            fault,
        };
        if q.max_size != max {
            return Err(fault(QueueFault::MaxSize {
                saved: q.max_size,
                device: max,
            }));
        }
        q.to_queue()
            .map_err(|e| fault(QueueFault::Rejected(e.to_string())))?;
    }
    Ok(())
}

/// A live queue: its layout is its registers' (frozen once the device runs,
/// 4.1.4.3.2), a ready one's rings lie in guest RAM, and the device has taken
/// no more chains than the queue holds (2.7.13: each chain takes at least one
/// of `size` descriptors until it is used).
fn live_queue(
    live: &QueueStateV1,
    regs: &QueueStateV1,
    ram: &[RamRegion],
    mem_size: u64,
) -> Result<(), QueueFault> {
    let layout = [
        ("ready", live.ready == regs.ready),
        ("size", live.size == regs.size),
        ("desc_table", live.desc_table == regs.desc_table),
        ("avail_ring", live.avail_ring == regs.avail_ring),
        ("used_ring", live.used_ring == regs.used_ring),
    ];
    if let Some((field, _)) = layout.iter().find(|(_, same)| !same) {
        return Err(QueueFault::Frozen(field));
    }
    if !live.ready {
        return Ok(());
    }
    let rings = virtio::ring_extents(live.size, live.desc_table, live.avail_ring, live.used_ring);
    for (ring, addr, len) in rings {
        if !in_ram(ram, addr, len) {
            return Err(QueueFault::Ring {
                ring,
                addr,
                len,
                mem_size,
            });
        }
    }
    if live.next_avail.wrapping_sub(live.next_used) > live.size {
        return Err(QueueFault::Indices {
            next_avail: live.next_avail,
            next_used: live.next_used,
            size: live.size,
        });
    }
    Ok(())
}

/// Whether `len` bytes at `addr` lie inside one RAM region, without overflow.
fn in_ram(ram: &[RamRegion], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    ram.iter()
        .any(|r| addr >= r.guest_addr && r.guest_addr.checked_add(r.size).is_some_and(|e| end <= e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpr::state::tests::sample;
    use crate::pci::msix::Entry;
    use crate::vm::vcpu_state::CpuidEntry;
    use heapless::Vec as BoundedVec;

    const QUEUE: QueueStateV1 = QueueStateV1 {
        max_size: 256,
        next_avail: 7,
        next_used: 5,
        event_idx_enabled: true,
        size: 256,
        ready: true,
        desc_table: 0x10000,
        avail_ring: 0x11000,
        used_ring: 0x12000,
    };

    fn transport(device_type: u16, queues: usize, q: QueueStateV1) -> TransportState {
        let mut config = [0u8; 256];
        config[..2].copy_from_slice(&VIRTIO_VENDOR.to_le_bytes());
        config[2..4].copy_from_slice(&(VIRTIO_DEVICE_BASE + device_type).to_le_bytes());
        let qs = BoundedVec::from_slice(&vec![q; queues]).unwrap();
        TransportState {
            config: BoundedVec::from_slice(&config).unwrap(),
            status: 0x0f,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: virtio::VIRTIO_F_VERSION_1,
            queue_select: 0,
            queues: qs.clone(),
            active: true,
            device_queues: qs,
            msix: MsixState {
                entries: BoundedVec::from_slice(&vec![Entry::default(); queues + 1]).unwrap(),
                pending: BoundedVec::from_slice(&vec![false; queues + 1]).unwrap(),
                enabled: true,
                function_masked: false,
            },
            queue_vectors: BoundedVec::from_slice(&vec![0; queues]).unwrap(),
            config_vector: queues as u16,
            isr: 0,
        }
    }

    /// A running disk and a running NIC, both valid.
    fn with_devices() -> CprState {
        let mut s = sample();
        s.machine.shape.disks.push(false).unwrap();
        s.machine.shape.nets.push([0x52, 0x54, 0, 0, 0, 1]).unwrap();
        let disk = transport(virtio::TYPE_BLOCK, 1, QUEUE);
        let nic = transport(virtio::TYPE_NET, 2, QUEUE);
        s.machine.virtio = BoundedVec::from_slice(&[disk, nic]).unwrap();
        s
    }

    /// `with_devices` with the disk's live queue 0 changed by `f`.
    fn live_disk_queue(f: impl FnOnce(&mut QueueStateV1)) -> Result<(), Error> {
        let mut s = with_devices();
        f(&mut s.machine.virtio[0].device_queues[0]);
        state(&s)
    }

    fn queue_fault(r: Result<(), Error>) -> QueueFault {
        match r {
            Err(Error::Queue { fault, .. }) => fault,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn valid_states_pass() {
        assert_eq!(state(&sample()), Ok(()));
        assert_eq!(state(&with_devices()), Ok(()));
        let mut stopped = with_devices();
        stopped.machine.virtio[1].active = false;
        stopped.machine.virtio[1].device_queues.clear();
        assert_eq!(state(&stopped), Ok(()));
    }

    #[test]
    fn xsave_image_must_fit_the_legacy_area_and_the_cpuid_layout() {
        let with_words = |s: &mut CprState, n: usize| {
            s.machine.vcpus[0].xsave.clear();
            s.machine.vcpus[0].xsave.resize(n, 0).unwrap();
        };
        for words in [0, 1023, 1025, 4096] {
            let mut s = sample();
            with_words(&mut s, words);
            let e = state(&s).unwrap_err();
            assert_eq!(
                e,
                Error::Xsave {
                    vcpu: 0,
                    bytes: words * 4,
                    max: 4096
                }
            );
            assert!(e.to_string().contains("XSAVE image (xsave) is"), "{e}");
        }
        // A guest that may enable AMX tile data (component 18: 8 KiB at 0xac0).
        let mut s = sample();
        let leaf = |index, eax, ebx| CpuidEntry {
            function: 0xd,
            index,
            flags: 1,
            eax,
            ebx,
            ecx: 0,
            edx: 0,
        };
        let cpuid = &mut s.machine.vcpus[0].cpuid;
        cpuid.push(leaf(0, 0b111 | 1 << 18, 0)).unwrap();
        cpuid.push(leaf(18, 0x2000, 0xac0)).unwrap();
        with_words(&mut s, 0x2ac0 / 4);
        assert_eq!(state(&s), Ok(()));
        with_words(&mut s, 0x2ac0 / 4 + 1);
        assert!(matches!(state(&s), Err(Error::Xsave { max: 0x2ac0, .. })));
    }

    #[test]
    fn memory_size_near_2_pow_64_does_not_wrap() {
        for size in [u64::MAX - 4095, 1 << 52, (1 << 52) - 4096] {
            let mut s = sample();
            s.machine.shape.mem_size = size;
            assert_eq!(state(&s), Err(Error::MemEnd(size)), "{size:#x}");
        }
        let mut s = sample();
        s.machine.shape.mem_size = 1000;
        assert_eq!(state(&s), Err(Error::MemSize(1000)));
    }

    #[test]
    fn swapped_transports_are_named() {
        let mut s = with_devices();
        s.machine.virtio.swap(0, 1);
        let e = state(&s).unwrap_err();
        assert!(matches!(e, Error::Identity { device: 0x1041, .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with("device 0 (disk 0, virtio-blk): "),
            "{text}"
        );
        assert!(text.contains("1af4:1041 (virtio-net)"), "{text}");
        assert!(text.contains("swapped"), "{text}");
    }

    #[test]
    fn live_rings_must_lie_in_guest_ram() {
        let end = 64u64 << 20;
        type Edit = fn(&mut QueueStateV1);
        let cases: [(&str, Edit); 5] = [
            ("desc_table", |q| q.desc_table = (64 << 20) - 0x800),
            ("desc_table", |q| q.desc_table = u64::MAX - 0xf),
            ("avail_ring", |q| q.avail_ring = 0xd000_0000),
            // Fits without its used_event field, not with it.
            ("avail_ring", |q| q.avail_ring = (64 << 20) - 0x204),
            ("used_ring", |q| q.used_ring = u64::MAX - 3),
        ];
        for (ring, f) in cases {
            let mut s = with_devices();
            f(&mut s.machine.virtio[0].queues[0]);
            f(&mut s.machine.virtio[0].device_queues[0]);
            match state(&s) {
                Err(Error::Queue {
                    live: true,
                    fault:
                        QueueFault::Ring {
                            ring: r, mem_size, ..
                        },
                    ..
                }) => assert_eq!((r, mem_size), (ring, end)),
                other => panic!("{ring}: {other:?}"),
            }
        }
        // Rings of a queue the driver has not enabled are not used: not checked.
        let mut s = with_devices();
        let disk = &mut s.machine.virtio[0];
        for q in [&mut disk.queues[0], &mut disk.device_queues[0]] {
            q.ready = false;
            q.desc_table = 0xd000_0000;
        }
        assert_eq!(state(&s), Ok(()));
    }

    #[test]
    fn live_indices_must_be_within_the_queue_size() {
        let f = queue_fault(live_disk_queue(|q| {
            q.next_avail = q.next_used.wrapping_add(0x8000)
        }));
        assert_eq!(
            f.to_string(),
            "next_avail 32773 is 32768 ahead of next_used 5, more than the queue size 256"
        );
        assert_eq!(
            live_disk_queue(|q| q.next_avail = q.next_used.wrapping_add(256)),
            Ok(())
        );
        assert_eq!(
            live_disk_queue(|q| (q.next_used, q.next_avail) = (0xfff0, 0x10)),
            Ok(())
        );
    }

    #[test]
    fn a_live_queue_keeps_its_registers_layout() {
        let f = queue_fault(live_disk_queue(|q| q.ready = false));
        assert_eq!(f, QueueFault::Frozen("ready"));
        let f = queue_fault(live_disk_queue(|q| q.used_ring = 0x13000));
        assert_eq!(f, QueueFault::Frozen("used_ring"));
        let mut s = with_devices();
        s.machine.virtio[0].active = false;
        assert!(matches!(
            state(&s),
            Err(Error::LiveWhileStopped { queues: 1, .. })
        ));
    }

    #[test]
    fn queue_size_and_max_size_are_checked() {
        let f = queue_fault(live_disk_queue(|q| q.max_size = 128));
        assert_eq!(f.to_string(), "max_size 128, the device's is 256");
        assert!(matches!(
            queue_fault(live_disk_queue(|q| q.size = 100)),
            QueueFault::Rejected(_)
        ));
        let mut s = with_devices();
        s.machine.virtio[1].queues.pop();
        let e = state(&s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device 1 (nic 0, virtio-net): 1 queues saved, the device has 2"
        );
        let mut s = with_devices();
        s.machine.virtio[1].config_vector = 3;
        assert!(matches!(
            state(&s),
            Err(Error::Vector {
                vector: 3,
                vectors: 3,
                ..
            })
        ));
    }
}
