//! The device targets: what a guest controls of an emulated device.
//!
//! - `blk`, `net`: a driver script on guest memory. Its steps write
//!   descriptors (into a ring's table or an indirect one), bytes of buffers,
//!   the avail ring and `used_event`, and notify a queue, reset and re-activate
//!   the device, or save it and restore it as a live update does; for net, the
//!   tap's far end sends frames and reads what the device sent. After each
//!   step the device's used index is the one in guest memory, it used no more
//!   chains than it took, each used head is a descriptor of the ring, and an
//!   interrupt the driver asked for (`used_event`, or every one without
//!   EVENT_IDX) was raised. A disk keeps its size, and a read-only one its bytes.
//! - `pci`: config-space and BAR accesses through the PCI bus (host bridge, a
//!   virtio-blk and a virtio-net function: common config, ISR, device config,
//!   notify, the MSI-X table and PBA) mixed with writes of guest memory, the
//!   event loop serving notifications, and a save restored into a new
//!   function, as an update does; the function's identity stays read-only.
//!
//! Descriptor addresses are drawn so that the device never writes the rings
//! or the indirect tables, except for "wild" ones (anywhere: the rings, the
//! end of the address space); with one of those about, the checks that read
//! the rings are off, since the device wrote where the driver said.

use std::fs::File;
use std::io::{Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{PCI_CONFIG_DATA, PCI_CONFIG_PORT};
use crate::pci::msi::NoRoutes;
use crate::pci::{PciBus, PciFunction};
use crate::virtio::block::{Block, DiskConfig};
use crate::virtio::net::Net;
use crate::virtio::pci::{vectors_needed, Resources, VirtioPci, BAR_SIZE};
use crate::virtio::test_ring::{put_desc, Irqs, Ring};
use crate::virtio::{VirtioDevice, VIRTIO_F_RING_EVENT_IDX};

/// Guest RAM: queue q's rings at `q * RING_SPAN` (a 256-entry queue fits),
/// indirect tables of 256 descriptors from TABLES, buffers from DATA to
/// MEM_END, in a second region (a buffer may span the two).
const RING_SPAN: u64 = 0x2000;
const TABLES: u64 = 0x4000;
const TABLE_COUNT: u64 = 4;
const DATA: u64 = 0x1_0000;
const MEM_END: u64 = 0x3_0000;
/// The disk: 128 sectors and a tail the guest cannot see.
const DISK_LEN: u64 = 128 * 512 + 100;

/// The input as a stream of choices; None once used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    /// Up to `n` bytes.
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    /// Fills `out` with the next bytes, zeroes past the end.
    fn fill(&mut self, out: &mut [u8]) {
        let src = self.bytes(out.len());
        out[..src.len()].copy_from_slice(src);
        out[src.len()..].fill(0);
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), DATA as usize),
        (GuestAddress(DATA), (MEM_END - DATA) as usize),
    ])
    .expect("guest memory")
}

/// A disk image of DISK_LEN bytes in a memfd, and the path that opens it.
fn disk_image() -> (File, String) {
    // SAFETY: a NUL-terminated name; the descriptor returned is owned here.
    let fd = unsafe { libc::memfd_create(c"molt-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is new and owned by nobody else.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let bytes: Vec<u8> = (0..DISK_LEN).map(|i| (i % 251) as u8).collect();
    file.write_all(&bytes).expect("disk image");
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    (file, path)
}

pub fn blk(data: &[u8]) {
    let mut input = Input(data);
    let read_only = input.u8().is_some_and(|b| b & 1 != 0);
    let (_image, path) = disk_image();
    let before = std::fs::read(&path).expect("disk image");
    let cfg = DiskConfig {
        path: path.into(),
        read_only,
    };
    let mut blk = Block::new(&cfg).expect("the disk opens");
    Driver::new(&mut blk, &mut input).run(&mut input, |_, _, _| {});
    let after = std::fs::read(&cfg.path).expect("disk image");
    assert_eq!(after.len(), before.len(), "the disk kept its size");
    if read_only {
        assert!(after == before, "a read-only disk was written");
    }
}

pub fn net(data: &[u8]) {
    let mut input = Input(data);
    let (mut net, mut peer) = Net::stand_in([0x52, 0x54, 0, 0, 0, 1]);
    let mut frame = vec![0u8; 0x1_1000];
    Driver::new(&mut net, &mut input).run(&mut input, |dev, op, input| {
        if op & 1 == 0 {
            // The host network sends a frame (header and all) of the length asked.
            let len = usize::from(input.u16().unwrap_or(0));
            for (i, b) in frame[..len].iter_mut().enumerate() {
                *b = (i % 253) as u8;
            }
            let _ = peer.write(&frame[..len]);
            dev.extra_fd_ready(0);
        } else {
            while peer.read(&mut frame).is_ok_and(|n| n > 0) {}
        }
    });
}

/// The driver's side of a device's queues, and what it checks.
struct Driver<'d> {
    dev: &'d mut dyn VirtioDevice,
    mem: GuestMemoryMmap,
    rings: Vec<Ring>,
    irqs: Irqs,
    acked: u64,
    /// A descriptor may have sent the device into the rings.
    wild: bool,
}

impl<'d> Driver<'d> {
    fn new(dev: &'d mut dyn VirtioDevice, input: &mut Input) -> Driver<'d> {
        let mut d = Driver {
            dev,
            mem: memory(),
            rings: Vec::new(),
            irqs: Irqs::default(),
            acked: 0,
            wild: false,
        };
        d.activate(input);
        d
    }

    /// Acks features and starts the device on fresh rings of the sizes drawn.
    fn activate(&mut self, input: &mut Input) {
        self.acked = input.u64().unwrap_or(0) & self.dev.features();
        self.dev.ack_features(self.acked);
        let maxes = self.dev.queue_max_sizes().to_vec();
        self.rings = (0..maxes.len() as u64)
            .map(|q| {
                let size = 1u16 << (input.u8().unwrap_or(4) % 9);
                let base = q * RING_SPAN;
                self.mem
                    .write_slice(&[0; RING_SPAN as usize], GuestAddress(base))
                    .unwrap();
                Ring::new(base, size)
            })
            .collect();
        let queues = self.rings.iter().zip(&maxes).map(|(r, &m)| r.queue(m));
        self.dev.activate(
            self.mem.clone(),
            queues.collect(),
            Box::new(self.irqs.clone()),
        );
    }

    /// Runs the script; steps 8 and 9 are the device's own (`extra`).
    fn run(
        &mut self,
        input: &mut Input,
        mut extra: impl FnMut(&mut dyn VirtioDevice, u8, &mut Input),
    ) {
        // A step's byte: which (low 4 bits), the queue (bit 4), for a
        // descriptor the table (bit 5: an indirect one, bits 6-7: which).
        while let Some(op) = input.u8() {
            let q = usize::from(op >> 4 & 1) % self.rings.len();
            let before = self.dev.state();
            let irqs: Vec<_> = (0..self.rings.len()).map(|q| self.irqs.count(q)).collect();
            match op & 0xf {
                0 => self.descriptor(q, op >> 5, input),
                1 => {
                    let at = DATA + u64::from(input.u16().unwrap_or(0)) * 2;
                    let n = usize::from(input.u8().unwrap_or(0));
                    let _ = self.mem.write_slice(input.bytes(n), GuestAddress(at));
                }
                2 => self.rings[q].offer(&self.mem, input.u16().unwrap_or(0)),
                3 => self.rings[q].set_avail_idx(&self.mem, input.u16().unwrap_or(0)),
                4 => self.rings[q].set_used_event(&self.mem, input.u16().unwrap_or(0)),
                5 => {
                    let _ = self.dev.queue_notify(q);
                }
                6 => {
                    self.dev.reset();
                    self.activate(input);
                    continue;
                }
                7 => {
                    // A live update: the device is saved and brought back.
                    let saved = self.dev.state();
                    self.dev.flush().expect("flush");
                    self.dev.reset();
                    self.dev.ack_features(self.acked);
                    let irq = Box::new(self.irqs.clone());
                    let restored = self.dev.restore(self.mem.clone(), &saved, irq);
                    restored.expect("a device restores its own state");
                    assert_eq!(self.dev.state(), saved, "restored as saved");
                }
                8 | 9 => extra(&mut *self.dev, op, input),
                _ => {}
            }
            self.check(&before, &irqs);
        }
    }

    /// Writes a descriptor into queue q's table or (`table` odd) indirect
    /// table `table >> 1`.
    fn descriptor(&mut self, q: usize, table: u8, input: &mut Input) {
        let (i, addr, len) = (input.u8(), input.u32(), input.u32());
        let (flags, next) = (input.u16(), input.u16());
        let (Some(i), Some(addr), Some(len), Some(flags), Some(next)) = (i, addr, len, flags, next)
        else {
            return;
        };
        let addr = if addr >> 31 != 0 {
            // Wild: where the device may trample the rings, or beyond RAM.
            self.wild = true;
            let bases = [0, TABLES, MEM_END - 0x10, 1 << 40, u64::MAX - 0xfff];
            bases[(addr >> 24 & 7) as usize % bases.len()].wrapping_add(u64::from(addr & 0xffff))
        } else if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
            TABLES + u64::from(addr) % (TABLE_COUNT * 0x1000 + 0x100)
        } else {
            DATA + u64::from(addr) % (MEM_END - DATA + 0x1000)
        };
        let d = (addr, len, flags);
        let ring = &self.rings[q];
        if table & 1 != 0 {
            let table = TABLES + u64::from(table >> 1) * 0x1000;
            put_desc(&self.mem, table, u16::from(i), d, next);
        } else {
            ring.set_desc(&self.mem, u16::from(i) % ring.size, d, next);
        }
    }

    /// The invariants, against the device's queues and the irq counts before
    /// the step.
    fn check(&self, before: &crate::virtio::DeviceState, irqs: &[usize]) {
        let after = self.dev.state();
        if after.is_empty() {
            return;
        }
        assert_eq!(after.len(), self.rings.len(), "a live queue per queue");
        for (q, ((b, a), ring)) in before.iter().zip(&after).zip(&self.rings).enumerate() {
            let used = Wrapping(a.next_used) - Wrapping(b.next_used);
            let took = Wrapping(a.next_avail) - Wrapping(b.next_avail);
            assert!(used <= took, "queue {q}: {used} used for {took} taken");
            if self.wild {
                continue;
            }
            assert_eq!(ring.used_idx(&self.mem), a.next_used, "queue {q}: used.idx");
            for k in 0..used.0 {
                let (id, _) = ring.used(&self.mem, b.next_used.wrapping_add(k));
                assert!(id < u32::from(ring.size), "queue {q}: used head {id}");
            }
            // 2.7.10: the driver asked to hear of used entries past used_event.
            let event = Wrapping(ring.used_event(&self.mem));
            let new = Wrapping(a.next_used);
            let asked =
                self.acked & VIRTIO_F_RING_EVENT_IDX == 0 || new - event - Wrapping(1) < used;
            if used.0 > 0 && asked {
                assert!(self.irqs.count(q) > irqs[q], "queue {q}: interrupt lost");
            }
        }
    }
}

/// A function on the bus, its slot and where its BAR was placed.
struct Slot {
    slot: u8,
    function: Arc<Mutex<VirtioPci>>,
    bar: u64,
}

pub fn pci(data: &[u8]) {
    let mut input = Input(data);
    let mem = memory();
    let (image, path) = disk_image();
    let disk = DiskConfig {
        path: path.into(),
        read_only: false,
    };
    let (net, peer) = Net::stand_in([0x52, 0x54, 0, 0, 0, 2]);
    let mut net = Some(net);
    let mut bus = PciBus::new();
    // Each function's device, first and at each restore (an update's new
    // process): a Block opening the disk again, a Net on a new stand-in.
    let new_device = |slot: u8, net: &mut Option<Net>| -> Box<dyn VirtioDevice> {
        match (slot, net.take()) {
            (1, _) => Box::new(Block::new(&disk).expect("the disk opens")),
            (_, Some(n)) => Box::new(n),
            (_, None) => Box::new(Net::stand_in([0x52, 0x54, 0, 0, 0, 2]).0),
        }
    };
    let function = |slot: u8, device: Box<dyn VirtioDevice>| {
        let n = vectors_needed(device.as_ref());
        let res = Resources {
            bar_addr: 0xc000_0000 + u64::from(slot) * BAR_SIZE,
            gsis: (24..24 + n).collect(),
            irqfds: (0..n)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap())
                .collect(),
            router: Arc::new(NoRoutes),
        };
        let f = VirtioPci::new(device, mem.clone(), res).expect("a function");
        Arc::new(Mutex::new(f))
    };
    let mut slots: Vec<Slot> = [1u8, 2]
        .into_iter()
        .map(|slot| {
            let f = function(slot, new_device(slot, &mut net));
            bus.add(slot, f.clone());
            Slot {
                slot,
                bar: 0xc000_0000 + u64::from(slot) * BAR_SIZE,
                function: f,
            }
        })
        .collect();
    let identity: Vec<u32> = slots.iter().map(|s| id_of(&s.function)).collect();
    let mut buf = [0u8; 8];
    while let Some(op) = input.u8() {
        let s = usize::from(op >> 7);
        let len = [1, 2, 4, 8][usize::from(op >> 4 & 3)];
        match op % 8 {
            0 => {
                // CONFIG_ADDRESS: enabled, slot 0-3 and a register, or any value.
                let v = match input.u8() {
                    Some(b) if b & 0x80 == 0 => {
                        let reg = u32::from(input.u8().unwrap_or(0) & 0xfc);
                        1 << 31 | u32::from(b & 3) << 11 | reg
                    }
                    _ => input.u32().unwrap_or(0),
                };
                bus.pio_write(PCI_CONFIG_PORT, &v.to_le_bytes());
            }
            1 | 2 => {
                let port = PCI_CONFIG_DATA + u16::from(op >> 6 & 3);
                let data = &mut buf[..len.min(4)];
                if op % 8 == 1 {
                    bus.pio_read(port, data);
                } else {
                    input.fill(data);
                    bus.pio_write(port, data);
                }
            }
            3 | 4 => {
                // Mostly into a BAR as placed at creation; wherever the guest moved it
                // may be elsewhere.
                let addr = match input.u16() {
                    Some(o) if o >> 15 == 0 => slots[s].bar + u64::from(o) % BAR_SIZE,
                    _ => input.u64().unwrap_or(0),
                };
                let data = &mut buf[..len];
                if op % 8 == 3 {
                    bus.mmio_read(addr, data);
                } else {
                    input.fill(data);
                    bus.mmio_write(addr, data);
                }
            }
            5 => {
                let at = u64::from(input.u16().unwrap_or(0)) * 4;
                let n = usize::from(input.u8().unwrap_or(0));
                let _ = mem.write_slice(input.bytes(n), GuestAddress(at));
            }
            6 => {
                // The event loop: each queue served as if its notifier fired.
                let mut f = slots[s].function.lock().unwrap();
                for q in 0..f.notifiers().len() {
                    f.queue_notify(q);
                }
            }
            _ => {
                // A live update: saved, then restored into a new function.
                let slot = &mut slots[s];
                let saved = {
                    let mut f = slot.function.lock().unwrap();
                    f.quiesce().expect("quiesce");
                    f.state()
                };
                let fresh = function(slot.slot, new_device(slot.slot, &mut net));
                {
                    let mut f = fresh.lock().unwrap();
                    f.restore(&saved)
                        .expect("a function restores its own state");
                    let again = f.state();
                    assert_eq!(again.config, saved.config, "config space restored");
                    assert_eq!(again.queues, saved.queues, "queue registers restored");
                    assert_eq!(again.device_queues, saved.device_queues);
                    f.kick_all();
                }
                bus.add(slot.slot, fresh.clone());
                slot.function = fresh;
            }
        }
    }
    let now: Vec<u32> = slots.iter().map(|s| id_of(&s.function)).collect();
    assert_eq!(now, identity, "vendor and device IDs are read-only");
    drop((image, peer));
}

fn id_of(f: &Arc<Mutex<VirtioPci>>) -> u32 {
    f.lock().unwrap().config().read_u32(0)
}
