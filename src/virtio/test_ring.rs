//! The driver's side of a split virtqueue (virtio v1.2, 2.7), written by hand
//! into guest memory, for the devices' unit tests and fuzz targets
//! (`fuzz/devices.rs`): descriptors, the available ring, and reading back the
//! used ring.
//!
//! virtio-queue's `MockSplitQueue` (feature `test-utils`) borrows the memory
//! for its lifetime, so a test rig could not hold both; it also does not wrap
//! its avail index at the ring's size, which the storm tests need.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Interrupt, MAX_QUEUES};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// One descriptor as a test writes it: guest address, length, flags.
pub type Desc = (u64, u32, u16);

/// A split virtqueue's three rings, laid out as a driver does.
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
}

impl Ring {
    /// The descriptor table at `base`, the available ring after it, the used
    /// ring after that (4-byte aligned).
    pub fn new(base: u64, size: u16) -> Ring {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Ring {
            desc: base,
            avail,
            used,
            size,
        }
    }

    /// The queue a transport would hand the device, ready, of `max_size`.
    pub fn queue(&self, max_size: u16) -> Queue {
        let mut q = Queue::new(max_size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Writes descriptor `i` of the ring's table.
    pub fn set_desc(&self, mem: &GuestMemoryMmap, i: u16, d: Desc, next: u16) {
        put_desc(mem, self.desc, i, d, next);
    }

    /// Writes `descs` as a linked chain from descriptor `first` on (wrapping at
    /// the ring's end), unoffered.
    pub fn write_chain(&self, mem: &GuestMemoryMmap, first: u16, descs: &[Desc]) {
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = (first + k as u16) % self.size;
            let more = if k + 1 < descs.len() { NEXT } else { 0 };
            self.set_desc(mem, i, (addr, len, flags | more), (i + 1) % self.size);
        }
    }

    /// Writes a chain from descriptor `first` on and offers it.
    pub fn chain(&self, mem: &GuestMemoryMmap, first: u16, descs: &[Desc]) {
        self.write_chain(mem, first, descs);
        self.offer(mem, first);
    }

    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.store(idx, GuestAddress(self.avail + 2), Ordering::Release)
            .unwrap();
    }

    /// Makes the chain at `head` available.
    pub fn offer(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx(mem);
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.set_avail_idx(mem, idx.wrapping_add(1));
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i` (modulo the ring): (id, len).
    pub fn used(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Where the device asks to be kicked (2.7.10, `avail_event`).
    pub fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 4 + 8 * u64::from(self.size)))
            .unwrap()
    }

    /// Where the driver asks to be interrupted (2.7.10, `used_event`).
    pub fn used_event(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 4 + 2 * u64::from(self.size)))
            .unwrap()
    }

    pub fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(v, GuestAddress(at)).unwrap();
    }
}

/// Writes descriptor `i` of the table at `table` (the ring's or an indirect one).
pub fn put_desc(mem: &GuestMemoryMmap, table: u64, i: u16, d: Desc, next: u16) {
    let at = table + 16 * u64::from(i);
    mem.write_obj(d.0, GuestAddress(at)).unwrap();
    mem.write_obj(d.1, GuestAddress(at + 8)).unwrap();
    mem.write_obj(d.2, GuestAddress(at + 12)).unwrap();
    mem.write_obj(next, GuestAddress(at + 14)).unwrap();
}

/// Writes an indirect descriptor table (2.7.5.3) at `table` chaining `descs`.
pub fn put_table(mem: &GuestMemoryMmap, table: u64, descs: &[Desc]) {
    for (k, &(addr, len, flags)) in descs.iter().enumerate() {
        let more = if k + 1 < descs.len() { NEXT } else { 0 };
        let k = k as u16;
        put_desc(mem, table, k, (addr, len, flags | more), k + 1);
    }
}

/// Counts each queue's interrupts.
#[derive(Clone, Default)]
pub struct Irqs(Arc<[AtomicUsize; MAX_QUEUES]>);

impl Irqs {
    pub fn count(&self, queue: usize) -> usize {
        self.0[queue].load(Ordering::SeqCst)
    }
}

impl Interrupt for Irqs {
    fn queue(&self, index: usize) {
        self.0[index].fetch_add(1, Ordering::SeqCst);
    }
}
