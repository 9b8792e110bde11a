//! Virtio 1.x devices (OASIS virtio v1.2) and the contract between a device and
//! its PCI transport (`pci.rs`). Devices see guest memory, their queues and an
//! interrupt handle, never KVM or PCI.

pub mod block;
pub mod net;
pub mod pci;
mod tap;

use std::os::fd::RawFd;

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
    /// The live queues, for saving; empty before activation. Everything else a
    /// device needs to resume comes from argv and the transport's saved state.
    fn queue_states(&self) -> Vec<QueueStateV1>;
}
