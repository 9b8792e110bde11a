//! Virtio 1.x devices (OASIS virtio v1.2) and the contract between a device and
//! its PCI transport (`pci.rs`). Devices see guest memory, their queues and an
//! interrupt handle, never KVM or PCI.

pub mod block;
pub mod net;
pub mod pci;
mod tap;
#[cfg(any(test, feature = "fuzz"))]
#[cfg_attr(not(test), allow(dead_code))] // the fuzz targets use part of it
pub mod test_ring;

use std::fmt;
use std::os::fd::RawFd;

use heapless::Vec as BoundedVec;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;

/// VIRTIO_F_VERSION_1 (6. Reserved Feature Bits): the modern interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_RING_EVENT_IDX: used/avail event suppression.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// Device types (5. Device Types).
pub const TYPE_NET: u16 = 1;
pub const TYPE_BLOCK: u16 = 2;

/// The maximum size of each queue of a device of type `device_type`, as its
/// `VirtioDevice::queue_max_sizes` says; None for a type molt does not emulate.
pub fn queue_max_sizes(device_type: u16) -> Option<&'static [u16]> {
    match device_type {
        TYPE_BLOCK => Some(&block::QUEUE_MAX_SIZES),
        TYPE_NET => Some(&net::QUEUE_SIZES),
        _ => None,
    }
}

/// A device type's name, for messages.
pub fn type_name(device_type: u16) -> &'static str {
    match device_type {
        TYPE_BLOCK => "virtio-blk",
        TYPE_NET => "virtio-net",
        _ => "an unknown device",
    }
}

/// Raises a device's interrupts. Backed by MSI-X vectors in the transport.
pub trait Interrupt: Send + Sync {
    /// Used buffers were added to queue `index`.
    fn queue(&self, index: usize);
}

/// Most queues any device has (net: rx and tx).
pub const MAX_QUEUES: usize = 2;

/// What a queue notification left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Served {
    /// Everything the driver made available was handled; its kicks are armed.
    All,
    /// A budget ran out with chains still available: the transport signals the
    /// queue's notifier again, so the event loop comes back to it after the events
    /// already waiting (a control command, a signal, another device).
    More,
}

/// The work one queue may do per event-loop turn, so that a guest keeping a
/// queue full cannot hold the loop (and the device's lock, which its vCPUs
/// need for config accesses) for longer than one turn. At least one chain is
/// always served, whatever its size: a request is never split across turns, so
/// none is ever half done between calls.
pub struct Budget {
    chains: usize,
    bytes: u64,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            chains: Budget::CHAINS,
            bytes: Budget::BYTES,
        }
    }
}

impl Budget {
    /// Chains per turn: a quarter of a 256-entry ring.
    pub const CHAINS: usize = 64;
    /// Bytes of guest buffers per turn: about 1 ms of copying from the page cache.
    pub const BYTES: u64 = 2 << 20;

    /// Charges one chain holding `bytes` of buffers; false once the budget is
    /// used up.
    pub fn spend(&mut self, bytes: u64) -> bool {
        self.chains = self.chains.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
        !self.exhausted()
    }

    pub fn exhausted(&self) -> bool {
        self.chains == 0 || self.bytes == 0
    }
}

/// A split virtqueue's configuration and indices, version 1 of its saved form
/// (virtio-queue's `QueueState`, which has no serde).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStateV1 {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<&Queue> for QueueStateV1 {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueueStateV1 {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueStateV1 {
    /// Rebuilds the queue; virtio-queue re-checks size and alignment.
    pub fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// What a device saves of itself: its live queues, indices advanced, one per
/// queue while active and none before (`TransportState::device_queues`,
/// version 1, frozen). The rest of a device comes from its configuration and
/// the transport's state.
pub type DeviceState = BoundedVec<QueueStateV1, MAX_QUEUES>;

/// Which of a function's saved queues: the registers as the driver programmed
/// them (held by the transport), or the live queues (held by the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueSet {
    Registers,
    Live,
}

impl fmt::Display for QueueSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueueSet::Registers => "queue",
            QueueSet::Live => "live queue",
        })
    }
}

/// Why saved queues do not fit a device.
#[derive(Debug)]
pub enum QueueError {
    /// Not one saved queue per queue of the device.
    Count {
        set: QueueSet,
        saved: usize,
        device: usize,
    },
    /// A queue's `max_size` is not the device's.
    MaxSize {
        set: QueueSet,
        index: usize,
        saved: u16,
        device: u16,
    },
    /// virtio-queue refused the saved values (size, alignment, indices).
    Invalid(QueueSet, virtio_queue::Error),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Count { set, saved, device } => {
                write!(f, "{saved} {set}s saved, the device has {device}")
            }
            QueueError::MaxSize {
                set,
                index,
                saved,
                device,
            } => write!(
                f,
                "{set} {index}: max_size {saved}, the device's is {device}"
            ),
            QueueError::Invalid(QueueSet::Registers, e) => write!(f, "bad queue registers: {e:?}"),
            QueueError::Invalid(QueueSet::Live, e) => write!(f, "bad live queue: {e:?}"),
        }
    }
}

impl std::error::Error for QueueError {}

/// Rebuilds the saved queues `set` of a device whose queues have the maximum
/// sizes `maxes`: one per queue, each of its size, then virtio-queue's checks.
pub fn restore_queues(
    set: QueueSet,
    saved: &[QueueStateV1],
    maxes: &[u16],
) -> Result<Vec<Queue>, QueueError> {
    if saved.len() != maxes.len() {
        return Err(QueueError::Count {
            set,
            saved: saved.len(),
            device: maxes.len(),
        });
    }
    if let Some((index, (q, &device))) = saved
        .iter()
        .zip(maxes)
        .enumerate()
        .find(|(_, (q, &m))| q.max_size != m)
    {
        return Err(QueueError::MaxSize {
            set,
            index,
            saved: q.max_size,
            device,
        });
    }
    saved
        .iter()
        .map(|q| q.to_queue().map_err(|e| QueueError::Invalid(set, e)))
        .collect()
}

/// Where a split virtqueue of `size` entries keeps its three rings (2.7): the
/// descriptor table (16-byte descriptors), the available ring (flags, idx, 2-byte
/// entries, `used_event`) and the used ring (flags, idx, 8-byte entries,
/// `avail_event`), as (`QueueStateV1` field, guest address, length). The event index fields
/// are counted whether or not VIRTIO_F_RING_EVENT_IDX was negotiated: the
/// driver allocates them either way.
pub fn ring_extents(size: u16, desc: u64, avail: u64, used: u64) -> [(&'static str, u64, u64); 3] {
    let n = u64::from(size);
    [
        ("desc_table", desc, 16 * n),
        ("avail_ring", avail, 6 + 2 * n),
        ("used_ring", used, 6 + 8 * n),
    ]
}

/// Copies the bytes of a device configuration `config` at `offset` into `data`;
/// bytes past its end read as 0 (4.1.4.6: the driver may read any field width).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        let at = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok());
        *byte = at.and_then(|o| config.get(o)).copied().unwrap_or(0);
    }
}

/// One emulated virtio device behind a transport.
///
/// All calls come with the transport's lock held: from vCPU threads for config
/// accesses and status changes, from the event loop for queue and fd events.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`TYPE_*`).
    fn device_type(&self) -> u16;
    /// Maximum size of each queue; the slice's length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered; the transport adds VIRTIO_F_VERSION_1.
    fn features(&self) -> u64;
    /// The driver accepted `features` (a subset of `features()`), at FEATURES_OK.
    fn ack_features(&mut self, features: u64);
    /// Reads device-specific configuration; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration; read-only or out-of-range bytes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: `queues` (only those the driver enabled are ready)
    /// are live from now on.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, irq: Box<dyn Interrupt>);
    /// Queue `index` was notified by the driver: process what it made available,
    /// within one `Budget`.
    fn queue_notify(&mut self, index: usize) -> Served;
    /// Descriptors besides the queue notifiers that the event loop must watch
    /// (a tap). Fixed for the device's lifetime.
    fn extra_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Whether `extra_fds()[n]` should be watched for input right now (a tap is not
    /// watched while the guest has posted no receive buffers).
    fn extra_fd_wanted(&self, _n: usize) -> bool {
        false
    }
    /// `extra_fds()[n]` is readable.
    fn extra_fd_ready(&mut self, _n: usize) {}
    /// Device reset (status written 0): drop the queues and any pending work.
    fn reset(&mut self);
    /// The descriptor behind the device (a disk image, a tap), handed to the
    /// next process on exec or transfer.
    fn backend_fd(&self) -> RawFd;
    /// Makes completed work durable before a save (a disk's writes reach it).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// The device's own state, for saving: its live queues, none before
    /// activation.
    fn state(&self) -> DeviceState;
    /// Resumes a device that was running when `state` was saved, on its saved
    /// queues (checked against the device's), as `activate` would; the
    /// transport has acked the driver's features already.
    ///
    /// Provided, unlike the snapshot defaults STYLE.md warns about, because it
    /// is complete: `DeviceState` is queues and nothing else, so whatever
    /// `state()` saved is taken back here. A device that saves more changes
    /// `DeviceState` (a new format version) and this method with it.
    fn restore(
        &mut self,
        mem: GuestMemoryMmap,
        state: &DeviceState,
        irq: Box<dyn Interrupt>,
    ) -> Result<(), QueueError> {
        let queues = restore_queues(QueueSet::Live, state, self.queue_max_sizes())?;
        self.activate(mem, queues, irq);
        Ok(())
    }
}
