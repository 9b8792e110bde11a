//! virtio-net (virtio v1.2 5.1) over a tap: one receive queue (0) and one
//! transmit queue (1), no control queue, no multiqueue.
//!
//! Frames cross with their 12-byte `virtio_net_hdr_v1` (5.1.6) untouched: the tap
//! speaks the same header, so checksum and TSO offloads (5.1.6.2, 5.1.6.4) are the
//! host kernel's job. Receive uses mergeable buffers (5.1.6.3.2, VIRTIO_NET_F_MRG_RXBUF):
//! a frame is read with readv straight into as many posted buffers as it needs,
//! and nothing is read from the tap before there is room for the largest frame,
//! so no frame is ever held in molt.
//!
//! Every descriptor is untrusted guest input: addresses go through vm-memory,
//! chains are bounded by the queue size and frames by `MAX_FRAME`; a malformed
//! chain is returned (used length 0) and its frame dropped, never a panic.
//!
//! State to save across a live update: `acked` (features), `mac`, and the two
//! queues (`Queue::state()`: addresses, size, next_avail/next_used). Nothing else
//! outlives a call: `rx_waiting` restarts false (the first tap event re-derives it)
//! and `dropped` is a statistic.

use std::collections::VecDeque;
use std::fmt;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::tap::{self, Tap, VNET_HDR_LEN};
use super::{
    read_config_bytes, Budget, DeviceState, Interrupt, Served, VirtioDevice, TYPE_NET,
    VIRTIO_F_RING_EVENT_IDX,
};
use crate::ratelimit::guest_log;

const RX: usize = 0;
const TX: usize = 1;
pub const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Header plus the largest frame a tap delivers with TSO: 64 KiB of payload and
/// an Ethernet header (the 65562 bytes of 5.1.6.3.1).
const MAX_FRAME: usize = VNET_HDR_LEN + 65536 + 14;
/// Header plus the largest frame without GSO (Ethernet, VLAN tag, 1500 bytes MTU).
const SMALL_FRAME: usize = VNET_HDR_LEN + 1518;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// readv/writev take at most IOV_MAX buffers.
const MAX_IOVS: usize = 1024;
/// Configuration space (5.1.4): mac[6], status (le16). Later fields need features not offered.
const CONFIG_LEN: usize = 8;

const fn bit(b: u32) -> u64 {
    1 << b
}

const GUEST_TSO: u64 = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
/// Offered (5.1.3): the MAC, link status, checksum and TSO offload both ways, mergeable
/// receive buffers, event-index suppression. The transport adds VIRTIO_F_VERSION_1.
const FEATURES: u64 = VIRTIO_F_RING_EVENT_IDX
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | GUEST_TSO
    | bit(VIRTIO_NET_F_MRG_RXBUF);

/// Where a NIC's packets go (`--net tap=` or `fd=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// Create or attach the tap interface of this name.
    Tap(String),
    /// Adopt this already-open tap descriptor.
    Fd(i32),
}

/// A NIC's backend and, if given, its MAC (`--net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackend,
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug)]
pub enum Error {
    Tap(tap::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Tap(e) => write!(f, "virtio-net: {e}"),
        }
    }
}

/// What exists only between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    irq: Box<dyn Interrupt>,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    acked: u64,
    active: Option<Active>,
    /// The guest has posted no room for a frame: the tap is not watched until it
    /// kicks the receive queue.
    rx_waiting: bool,
    /// Frames dropped: malformed transmit chains and tap write errors.
    dropped: u64,
}

impl Net {
    /// Opens the tap named by `cfg` (or adopts its descriptor). Without `mac=`, the
    /// MAC is 52:54:00 (locally administered, unicast) followed by a hash of the
    /// interface name: stable across restarts and distinct per tap.
    pub fn new(cfg: &NetConfig) -> Result<Net, Error> {
        let tap = match &cfg.backend {
            NetBackend::Tap(name) => Tap::open(name),
            NetBackend::Fd(fd) => Tap::from_fd(*fd),
        }
        .map_err(Error::Tap)?;
        let mac = cfg.mac.unwrap_or_else(|| default_mac(tap.name()));
        Ok(Net::with_tap(tap, mac))
    }

    fn with_tap(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            acked: 0,
            active: None,
            rx_waiting: false,
            dropped: 0,
        }
    }

    /// A device on a tap stand-in, for tests and fuzzing without TUN: one end of
    /// a non-blocking SOCK_SEQPACKET pair (one message per frame, like a tap);
    /// the other end, returned with it, is what the host network would see.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn stand_in(mac: [u8; 6]) -> (Net, std::fs::File) {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut fds = [0; 2];
        let ty = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: socketpair writes two descriptors into `fds`.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are new and owned here.
        let (ours, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (Net::with_tap(Tap::stand_in(ours), mac), peer.into())
    }

    /// Moves frames from the tap into posted receive buffers until the tap is empty,
    /// the guest's buffers run out, or a `Budget` is spent (a frame counts as a
    /// chain); then the tap stays watched and, being readable, is served again on
    /// the event loop's next turn, after the other events.
    fn rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let (mem, q) = (&a.mem, &mut a.rx);
        self.rx_waiting = !q.ready();
        if self.rx_waiting {
            return;
        }
        if !self.tap.has_input() {
            // Drained, as a read would find below, but without popping a ring's
            // worth of chains to hand them back (~30 us with 256 posted, and
            // every update's quiesce and first pass do it).
            let _ = q.disable_notification(mem);
            return;
        }
        let mrg = self.acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let need = if self.acked & GUEST_TSO != 0 {
            MAX_FRAME
        } else {
            SMALL_FRAME
        };
        let ring = usize::from(q.size());
        let old_used = Wrapping(q.next_used());
        // Chains popped but not yet used, in avail order; given back at the end, so
        // no state outlives this call.
        let mut window: VecDeque<RxChain> = VecDeque::new();
        let (mut room, mut iovs) = (0, 0);
        // The avail index up to which the device has looked, a chain handed back
        // below included: where kicks must be asked from.
        let mut examined = q.next_avail();
        let mut budget = Budget::default();
        while !budget.exhausted() {
            let mut full = false;
            while (room == 0 || (mrg && room < need)) && !full {
                let chain = pop(q, mem);
                examined = q.next_avail();
                let Some(chain) = chain else { break };
                let c = RxChain::parse(chain, mem, ring);
                if c.len == 0 && window.is_empty() {
                    publish(q, mem, &[(c.head, 0)]);
                    continue;
                }
                if iovs + c.slices.len() > MAX_IOVS {
                    // Offered again next time.
                    q.set_next_avail(q.next_avail().wrapping_sub(1));
                    full = true;
                    break;
                }
                (room, iovs) = (room + c.len, iovs + c.slices.len());
                window.push_back(c);
                full = window.len() >= ring;
            }
            // Nothing is read without room for the largest frame, unless the ring
            // cannot hold more: then a frame may be truncated, the driver's choice.
            if room == 0 || (mrg && room < need && !full) {
                if !rearm(q, mem, &mut window, examined) {
                    self.rx_waiting = true;
                    break;
                }
                // The driver posted more meanwhile: look again. A retry costs a
                // chain, so a driver racing with this check cannot keep the device
                // here; out of budget, the tap stays watched and brings it back.
                if !budget.spend(0) {
                    break;
                }
                (room, iovs) = (0, 0);
                continue;
            }
            let bufs: Vec<_> = window
                .iter()
                .flat_map(|c| c.slices.iter().copied())
                .collect();
            let n = match self.tap.readv(&bufs) {
                Ok(n) if n >= VNET_HDR_LEN => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Drained: no rx kicks needed until the buffers run out again.
                    let _ = q.disable_notification(mem);
                    break;
                }
                other => {
                    // Not a tap any more (or a hung-up stand-in): stop watching it
                    // until the guest kicks, instead of spinning on it.
                    guest_log!(Warn, "virtio-net {}: tap read: {other:?}", self.tap.name());
                    rearm(q, mem, &mut window, examined);
                    self.rx_waiting = true;
                    break;
                }
            };
            let (mut used, mut first, mut left) = (Vec::new(), None, n);
            while left > 0 {
                let Some(c) = window.pop_front() else { break };
                (room, iovs) = (room - c.len, iovs - c.slices.len());
                if c.len == 0 {
                    // A malformed chain among the buffers: returned empty ahead of
                    // the frame's, which must stay consecutive.
                    used.insert(0, (c.head, 0));
                    continue;
                }
                let len = left.min(c.len);
                left -= len;
                used.push((c.head, len as u32));
                first.get_or_insert(c);
            }
            if let Some(c) = first {
                let count = used.iter().filter(|u| u.1 > 0).count() as u16;
                c.write_at(NUM_BUFFERS_OFFSET, &count.to_le_bytes());
            }
            publish(q, mem, &used);
            budget.spend(n as u64);
        }
        unpop(q, &mut window);
        if Wrapping(q.next_used()) != old_used && needs_irq(q, mem, old_used) {
            a.irq.queue(RX);
        }
    }

    /// Sends the frames the guest made available, one `Budget`'s worth.
    fn tx(&mut self) -> Served {
        let Some(a) = self.active.as_mut() else {
            return Served::All;
        };
        let (mem, q) = (&a.mem, &mut a.tx);
        if !q.ready() {
            return Served::All;
        }
        let ring = usize::from(q.size());
        let (mut drops, mut total) = (Vec::new(), 0);
        let mut budget = Budget::default();
        let served = loop {
            let _ = q.disable_notification(mem);
            let mut popped = 0;
            while !budget.exhausted() {
                let Some(chain) = pop(q, mem) else { break };
                popped += 1;
                let head = chain.head_index();
                let bytes = match tx_slices(chain, mem, ring) {
                    Ok(bufs) => {
                        match self.tap.writev(&bufs) {
                            Ok(_) => {}
                            // The tap's queue is full: dropping is what a NIC does and
                            // keeps the guest moving (there is no writable-fd wakeup).
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                drops.push("tap full")
                            }
                            Err(_) => drops.push("tap write failed"),
                        }
                        bufs.iter().map(|b| b.len() as u64).sum()
                    }
                    Err(why) => {
                        drops.push(why);
                        0
                    }
                };
                budget.spend(bytes);
                if head < q.size() {
                    let _ = q.add_used(mem, head, 0);
                }
            }
            // Re-enabled before leaving, always (it is also how a spent budget
            // learns whether work is left); looping only on progress (a bogus
            // avail index would otherwise spin here).
            let more = q.enable_notification(mem).unwrap_or(false);
            total += popped;
            if !more || popped == 0 {
                break Served::All;
            }
            if budget.exhausted() {
                break Served::More;
            }
        };
        if total > 0 && q.needs_notification(mem).unwrap_or(true) {
            a.irq.queue(TX);
        }
        for why in drops {
            self.dropped += 1;
            // Powers of two only: a hostile guest cannot flood the log.
            if self.dropped.is_power_of_two() {
                let (name, n) = (self.tap.name(), self.dropped);
                log::warn!("virtio-net {name}: dropped frame ({why}), {n} so far");
            }
        }
        served
    }
}

/// One receive chain: its device-writable buffers. `len` 0 means unusable (malformed,
/// or too short for the header).
struct RxChain<'m> {
    head: u16,
    len: usize,
    slices: Vec<VolatileSlice<'m>>,
}

impl<'m> RxChain<'m> {
    fn parse(
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        mem: &'m GuestMemoryMmap,
        ring: usize,
    ) -> Self {
        let head = chain.head_index();
        let mut c = RxChain {
            head,
            len: 0,
            slices: Vec::new(),
        };
        let mut broken = false;
        for (i, d) in chain.enumerate() {
            // A device-readable buffer in a receive chain, or a chain longer than
            // the ring (only an indirect table can be): malformed.
            if i >= ring || !d.is_write_only() || !add_slices(mem, d.addr(), d.len(), &mut c.slices)
            {
                c.slices.clear();
                break;
            }
            c.len += d.len() as usize;
            // virtio-queue ends a chain silently at a loop, a bad next index or an
            // unreadable descriptor: a last descriptor still saying NEXT was cut off.
            broken = d.has_next();
        }
        if broken || c.slices.is_empty() || c.len < VNET_HDR_LEN || c.slices.len() > MAX_IOVS {
            c.len = 0;
            c.slices.clear();
        }
        c
    }

    /// Writes `data` at byte `offset` of the chain, across buffer boundaries.
    fn write_at(&self, mut offset: usize, data: &[u8]) {
        let mut data = data;
        for s in &self.slices {
            if data.is_empty() {
                break;
            }
            if offset >= s.len() {
                offset -= s.len();
                continue;
            }
            let n = data.len().min(s.len() - offset);
            let _ = s.write_slice(&data[..n], offset);
            (data, offset) = (&data[n..], 0);
        }
    }
}

/// Adds the host slices for `len` bytes at `addr`; false if any byte is outside RAM
/// (vm-memory also refuses a range that wraps around).
fn add_slices<'m>(
    mem: &'m GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    out: &mut Vec<VolatileSlice<'m>>,
) -> bool {
    for s in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
        match s {
            Ok(s) => out.push(s),
            Err(_) => return false,
        }
    }
    true
}

/// The device-readable buffers of a transmit chain, or why it must be dropped.
fn tx_slices<'m>(
    chain: DescriptorChain<&'m GuestMemoryMmap>,
    mem: &'m GuestMemoryMmap,
    ring: usize,
) -> Result<Vec<VolatileSlice<'m>>, &'static str> {
    let (mut bufs, mut total, mut broken) = (Vec::new(), 0, false);
    for (i, d) in chain.enumerate() {
        if i >= ring {
            return Err("chain longer than the queue");
        }
        if d.is_write_only() {
            return Err("device-writable descriptor in a transmit chain");
        }
        total += d.len() as usize;
        if total > MAX_FRAME {
            return Err("frame longer than 64 KiB");
        }
        if !add_slices(mem, d.addr(), d.len(), &mut bufs) {
            return Err("buffer outside guest memory");
        }
        broken = d.has_next();
    }
    if broken {
        return Err("chain broken off (a loop, a bad index or table)");
    }
    if total < VNET_HDR_LEN || bufs.len() > MAX_IOVS {
        return Err("chain shorter than the header, or too fragmented");
    }
    Ok(bufs)
}

/// The next available chain, without virtio-queue's error log (a guest could flood it).
fn pop<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    q.iter(mem).ok()?.next()
}

/// Gives the chains in `window` back to the avail ring (they were the last popped).
fn unpop(q: &mut Queue, window: &mut VecDeque<RxChain>) {
    q.set_next_avail(q.next_avail().wrapping_sub(window.len() as u16));
    window.clear();
}

/// Asks the driver to kick when it makes buffers available past `q.next_avail()`,
/// the avail index up to which the device examined the ring (2.7.10:
/// `avail_event`). Not a fresh read of the avail index: buffers posted after the
/// device looked were never counted, and the driver, which posted them before
/// `avail_event` moved, did not kick for them; with a full ring it posts nothing
/// more, so receive would stop for good. True if the driver made more available
/// meanwhile, in a ring still usable (at most a ring ahead, else a retry would
/// find nothing).
fn want_kick(q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    let examined = Wrapping(q.next_avail());
    q.enable_notification(mem).unwrap_or(false)
        && q.avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|avail| avail - examined <= Wrapping(q.size()))
}

/// Gives the chains in `window` back and asks for a kick past `examined`.
/// True if the driver made more available meanwhile (`want_kick`).
fn rearm(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    window: &mut VecDeque<RxChain>,
    examined: u16,
) -> bool {
    let resume = q.next_avail();
    q.set_next_avail(examined);
    let more = want_kick(q, mem);
    q.set_next_avail(resume);
    unpop(q, window);
    more
}

/// Adds used elements and only then publishes the used index, so the driver never
/// sees part of a multi-buffer frame (virtio-queue's `add_used` publishes each one).
/// A head beyond the ring (a chain without descriptors, so empty) cannot be
/// returned: it is dropped, as transmit and virtio-blk do.
fn publish(q: &mut Queue, mem: &GuestMemoryMmap, used: &[(u16, u32)]) {
    let (size, ring) = (q.size(), GuestAddress(q.used_ring()));
    let mut next = Wrapping(q.next_used());
    for &(head, len) in used.iter().filter(|u| u.0 < size) {
        let slot = u64::from(next.0 % size.max(1));
        let elem = (u64::from(len) << 32 | u64::from(head)).to_le();
        let Some(addr) = ring.checked_add(4 + 8 * slot) else {
            return;
        };
        if mem.write_obj(elem, addr).is_err() {
            return;
        }
        next += Wrapping(1);
    }
    if let Some(idx) = ring.checked_add(2) {
        if mem.store(next.0.to_le(), idx, Ordering::Release).is_ok() {
            q.set_next_used(next.0);
        }
    }
}

/// Whether the driver wants an interrupt for the used entries added since `old`
/// (2.7.10, `used_event`); the counterpart of `Queue::needs_notification` for
/// entries written by `publish`.
fn needs_irq(q: &Queue, mem: &GuestMemoryMmap, old: Wrapping<u16>) -> bool {
    if !q.event_idx_enabled() {
        return true;
    }
    fence(Ordering::SeqCst);
    let addr = GuestAddress(q.avail_ring()).checked_add(4 + 2 * u64::from(q.size()));
    let Some(Ok(event)) = addr.map(|a| mem.load::<u16>(a, Ordering::Relaxed)) else {
        return true;
    };
    let new = Wrapping(q.next_used());
    new - Wrapping(u16::from_le(event)) - Wrapping(1) < new - old
}

fn default_mac(name: &str) -> [u8; 6] {
    // FNV-1a: tiny, stable across builds and releases (unlike std's hasher).
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let [_, a, b, c] = h.to_be_bytes();
    [0x52, 0x54, 0x00, a, b, c]
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
        // What the guest can receive is what the tap may hand over; TSO implies
        // checksum offload (5.1.3.1), and the tap refuses TSO without it.
        let mut offload = 0;
        if features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
            offload |= libc::TUN_F_CSUM;
            if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
                offload |= libc::TUN_F_TSO4;
            }
            if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
                offload |= libc::TUN_F_TSO6;
            }
        }
        if let Err(e) = self.tap.set_offload(offload) {
            guest_log!(Warn, "{e}");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing here is writable through the modern interface (5.1.4).
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, irq: Box<dyn Interrupt>) {
        let Ok([mut rx, mut tx]) = <[Queue; 2]>::try_from(queues) else {
            log::error!("virtio-net {}: expected 2 queues", self.tap.name());
            return;
        };
        let event_idx = self.acked & VIRTIO_F_RING_EVENT_IDX != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        self.active = Some(Active { mem, rx, tx, irq });
        self.rx_waiting = false;
    }

    fn backend_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    fn state(&self) -> DeviceState {
        self.active
            .iter()
            .flat_map(|a| [(&a.rx).into(), (&a.tx).into()])
            .collect()
    }

    fn queue_notify(&mut self, index: usize) -> Served {
        match index {
            // Frames left in the tap keep it readable: the loop comes back by itself.
            RX => self.rx(),
            TX => return self.tx(),
            _ => {}
        }
        Served::All
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.tap.as_raw_fd()]
    }

    fn extra_fd_wanted(&self, n: usize) -> bool {
        n == 0 && self.active.is_some() && !self.rx_waiting
    }

    fn extra_fd_ready(&mut self, n: usize) {
        if n == 0 {
            self.rx();
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.rx_waiting = false;
        if let Err(e) = self.tap.set_offload(0) {
            guest_log!(Warn, "{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    use crate::virtio::test_ring::{put_table, Irqs, Ring};

    const MEM_SIZE: usize = 0x40_0000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const MRG: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);

    struct Rig {
        net: Net,
        mem: GuestMemoryMmap,
        rx: Ring,
        tx: Ring,
        /// The far end of the stand-in tap: what the host network would see.
        peer: File,
        irqs: Irqs,
    }

    impl Rig {
        /// A device over a SOCK_SEQPACKET pair (one message per frame, like a tap),
        /// activated with `features`, an rx ring of `rx_size` and a tx ring of 16.
        fn new(features: u64, rx_size: u16) -> Rig {
            Rig::with(features, rx_size, 16)
        }

        fn with(features: u64, rx_size: u16, tx_size: u16) -> Rig {
            let (mut net, peer) = Net::stand_in([0x52, 0x54, 0, 1, 2, 3]);
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let (rx, tx) = (Ring::new(0x1000, rx_size), Ring::new(0x8000, tx_size));
            let irqs = Irqs::default();
            net.ack_features(features);
            net.activate(
                mem.clone(),
                vec![rx.queue(256), tx.queue(256)],
                Box::new(irqs.clone()),
            );
            Rig {
                net,
                mem,
                rx,
                tx,
                peer,
                irqs,
            }
        }

        fn irq_count(&self, q: usize) -> usize {
            self.irqs.count(q)
        }

        fn recv(&mut self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 70000];
            match self.peer.read(&mut buf) {
                Ok(n) => Some(buf[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("{e}"),
            }
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        fn write(&self, addr: u64, data: &[u8]) {
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    /// Header and payload as the guest or the tap would put them: num_buffers 0.
    fn packet(payload: usize, seed: u8) -> Vec<u8> {
        let mut p = vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        p.extend(frame(payload, seed));
        p
    }

    const EVENT_IDX: u64 = VIRTIO_F_RING_EVENT_IDX;

    #[test]
    fn tx_frame_arrives_byte_exact() {
        let mut r = Rig::new(EVENT_IDX, 256);
        let p = packet(1000, 3);
        // Header alone, then the payload split over two buffers.
        r.write(0x20_0000, &p[..12]);
        r.write(0x20_1000, &p[12..500]);
        r.write(0x20_3000, &p[500..]);
        r.tx.chain(
            &r.mem,
            0,
            &[(0x20_0000, 12, 0), (0x20_1000, 488, 0), (0x20_3000, 512, 0)],
        );
        // Header and payload in one buffer, through an indirect table.
        let q = packet(60, 9);
        r.write(0x20_5000, &q);
        put_table(&r.mem, 0x9000, &[(0x20_5000, q.len() as u32, 0)]);
        r.tx.chain(&r.mem, 3, &[(0x9000, 16, INDIRECT)]);
        assert_eq!(r.net.queue_notify(TX), Served::All);
        assert_eq!(r.recv().unwrap(), p);
        assert_eq!(r.recv().unwrap(), q);
        assert_eq!(r.recv(), None);
        assert_eq!(r.tx.used_idx(&r.mem), 2);
        assert_eq!(r.tx.used(&r.mem, 0), (0, 0));
        assert_eq!(r.tx.used(&r.mem, 1), (3, 0));
        assert_eq!(r.irq_count(TX), 1);
        // Kicks re-armed for what comes next (2.7.10).
        assert_eq!(r.tx.avail_event(&r.mem), 2);
        assert_eq!(r.net.dropped, 0);
    }

    #[test]
    fn rx_frame_lands_in_guest_buffer() {
        let mut r = Rig::new(EVENT_IDX | MRG, 256);
        // Header and the start of the frame in one buffer, the rest in another.
        r.rx.chain(
            &r.mem,
            0,
            &[(0x10_0000, 100, WRITE), (0x10_1000, 1500, WRITE)],
        );
        assert_eq!(r.net.queue_notify(RX), Served::All);
        assert!(r.net.extra_fd_wanted(0));
        let p = packet(400, 5);
        r.peer.write_all(&p).unwrap();
        r.net.extra_fd_ready(0);
        assert_eq!(r.rx.used_idx(&r.mem), 1);
        assert_eq!(r.rx.used(&r.mem, 0), (0, p.len() as u32));
        let mut got = r.read(0x10_0000, 100);
        got.extend(r.read(0x10_1000, p.len() - 100));
        assert_eq!(got[10..12], [1, 0], "num_buffers");
        assert_eq!(got[..10], p[..10]);
        assert_eq!(got[12..], p[12..]);
        assert_eq!(r.irq_count(RX), 1);
        // That was the only buffer: the tap is left alone until the guest posts more.
        assert!(!r.net.extra_fd_wanted(0));
        assert_eq!(r.rx.avail_event(&r.mem), 1);
    }

    #[test]
    fn rx_merges_buffers_for_a_large_frame() {
        let mut r = Rig::new(
            EVENT_IDX | MRG | GUEST_TSO | bit(VIRTIO_NET_F_GUEST_CSUM),
            256,
        );
        // With TSO a frame may be 64 KiB: nothing is read until that much room is posted.
        for i in 0..8u16 {
            r.rx.chain(
                &r.mem,
                i,
                &[(0x10_0000 + u64::from(i) * 0x1000, 1536, WRITE)],
            );
        }
        let p = packet(5000, 11);
        r.peer.write_all(&p).unwrap();
        r.net.extra_fd_ready(0);
        assert_eq!(r.rx.used_idx(&r.mem), 0);
        assert!(!r.net.extra_fd_wanted(0));
        // The driver is asked to kick at its next buffer.
        assert_eq!(r.rx.avail_event(&r.mem), 8);
        for i in 8..48u16 {
            r.rx.chain(
                &r.mem,
                i,
                &[(0x10_0000 + u64::from(i) * 0x1000, 1536, WRITE)],
            );
        }
        assert_eq!(r.net.queue_notify(RX), Served::All);
        assert!(r.net.extra_fd_wanted(0));
        assert_eq!(r.rx.used_idx(&r.mem), 4);
        let lens: Vec<_> = (0..4).map(|i| r.rx.used(&r.mem, i)).collect();
        assert_eq!(
            lens,
            [
                (0, 1536),
                (1, 1536),
                (2, 1536),
                (3, p.len() as u32 - 3 * 1536)
            ]
        );
        let got: Vec<u8> = (0..4u64)
            .flat_map(|i| r.read(0x10_0000 + i * 0x1000, lens[i as usize].1 as usize))
            .collect();
        assert_eq!(got[10..12], [4, 0], "num_buffers");
        assert_eq!(got[12..], p[12..]);
        assert_eq!(r.irq_count(RX), 1);
        // The unused buffers were given back, not consumed: the next frame starts at 4.
        r.peer.write_all(&packet(100, 1)).unwrap();
        r.net.extra_fd_ready(0);
        assert_eq!(r.rx.used(&r.mem, 4), (4, 112));
    }

    #[test]
    fn rx_small_ring_reads_into_what_fits() {
        // A ring too small to ever hold 64 KiB still receives (frames beyond it truncate).
        let mut r = Rig::new(MRG | GUEST_TSO | bit(VIRTIO_NET_F_GUEST_CSUM), 4);
        for i in 0..4u16 {
            r.rx.chain(
                &r.mem,
                i,
                &[(0x10_0000 + u64::from(i) * 0x1000, 2048, WRITE)],
            );
        }
        r.peer.write_all(&packet(3000, 2)).unwrap();
        r.net.extra_fd_ready(0);
        assert_eq!(r.rx.used_idx(&r.mem), 2);
        assert_eq!(r.rx.used(&r.mem, 1), (1, 3012 - 2048));
    }

    #[test]
    fn rx_without_mergeable_buffers_uses_one_chain() {
        let mut r = Rig::new(0, 256);
        r.rx.chain(
            &r.mem,
            0,
            &[(0x10_0000, 12, WRITE), (0x10_1000, 1514, WRITE)],
        );
        r.rx.chain(&r.mem, 2, &[(0x10_2000, 1526, WRITE)]);
        let (p, q) = (packet(60, 1), packet(1514, 2));
        r.peer.write_all(&p).unwrap();
        r.peer.write_all(&q).unwrap();
        r.net.extra_fd_ready(0);
        assert_eq!(r.rx.used_idx(&r.mem), 2);
        assert_eq!(r.rx.used(&r.mem, 0), (0, 72));
        assert_eq!(r.rx.used(&r.mem, 1), (2, 1526));
        assert_eq!(r.read(0x10_0000, 12)[10..], [1, 0]);
        assert_eq!(r.read(0x10_2000 + 12, 1514), q[12..]);
        // Without EVENT_IDX every batch interrupts.
        assert_eq!(r.irq_count(RX), 1);
    }

    #[test]
    fn rx_without_buffers_leaves_the_frame_in_the_tap() {
        let mut r = Rig::new(EVENT_IDX | MRG, 256);
        let p = packet(200, 4);
        r.peer.write_all(&p).unwrap();
        r.net.extra_fd_ready(0);
        assert!(!r.net.extra_fd_wanted(0));
        assert_eq!(r.rx.used_idx(&r.mem), 0);
        assert_eq!(r.irq_count(RX), 0);
        // A kick with still nothing posted changes nothing.
        assert_eq!(r.net.queue_notify(RX), Served::All);
        assert!(!r.net.extra_fd_wanted(0));
        r.rx.chain(&r.mem, 0, &[(0x10_0000, 4096, WRITE)]);
        r.rx.chain(&r.mem, 1, &[(0x10_1000, 4096, WRITE)]);
        assert_eq!(r.net.queue_notify(RX), Served::All);
        assert!(r.net.extra_fd_wanted(0));
        assert_eq!(r.rx.used(&r.mem, 0), (0, p.len() as u32));
        assert_eq!(r.read(0x10_0000 + 12, 200), p[12..]);
        assert_eq!(r.irq_count(RX), 1);
    }

    #[test]
    fn rx_interrupts_follow_used_event() {
        let mut r = Rig::new(EVENT_IDX | MRG, 256);
        for i in 0..3u16 {
            r.rx.chain(
                &r.mem,
                i,
                &[(0x10_0000 + u64::from(i) * 0x1000, 2048, WRITE)],
            );
        }
        // The driver wants an interrupt once used entry 1 is written, not before.
        r.rx.set_used_event(&r.mem, 1);
        r.peer.write_all(&packet(10, 0)).unwrap();
        r.net.extra_fd_ready(0);
        assert_eq!(r.irq_count(RX), 0);
        r.peer.write_all(&packet(10, 0)).unwrap();
        r.peer.write_all(&packet(10, 0)).unwrap();
        r.net.extra_fd_ready(0);
        assert_eq!((r.rx.used_idx(&r.mem), r.irq_count(RX)), (3, 1));
    }

    /// The driver's test for a kick after moving the avail index from `old` to
    /// `new` (2.7.10, `vring_need_event`).
    fn driver_kicks(avail_event: u16, new: u16, old: u16) -> bool {
        new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    #[test]
    fn rx_kick_is_asked_from_where_the_device_looked() {
        // The stall, step by step. Eight 4 KiB buffers are too little room for a
        // TSO frame: the device looks at the ring, finds nothing more, and must ask
        // for a kick. Before it does, the driver fills the ring.
        let mut r = Rig::new(
            EVENT_IDX | MRG | GUEST_TSO | bit(VIRTIO_NET_F_GUEST_CSUM),
            16,
        );
        let buf = |i: u16| [(0x10_0000 + u64::from(i) * 0x1000, 4096, WRITE)];
        for i in 0..8u16 {
            r.rx.chain(&r.mem, i, &buf(i));
        }
        let a = r.net.active.as_mut().unwrap();
        let mut examined = 0;
        while pop(&mut a.rx, &a.mem).is_some() {
            examined += 1;
        }
        assert_eq!((examined, a.rx.next_avail()), (8, 8));
        for i in 8..16u16 {
            r.rx.chain(&r.mem, i, &buf(i));
        }
        // avail_event had not moved: the driver did not kick for buffers 8..16,
        // and with all 16 posted it posts nothing more.
        assert!(!driver_kicks(r.rx.avail_event(&r.mem), 16, 8));
        // Now the device asks for a kick. It must count from the index it examined,
        // so the buffers posted in between are seen, not from the avail index it
        // would read now, which would wait for a 17th buffer that never comes.
        assert!(
            want_kick(&mut a.rx, &a.mem),
            "buffers posted meanwhile missed"
        );
        assert_eq!(r.rx.avail_event(&r.mem), 8);
        assert_eq!(a.rx.next_avail(), 8, "the examined index is left as it was");
    }

    /// Offers 200 small frames on the transmit ring; returns them.
    fn offer_frames(r: &Rig) -> Vec<Vec<u8>> {
        let frames: Vec<_> = (0..200u16).map(|i| packet(50, i as u8)).collect();
        for (i, p) in (0u16..).zip(&frames) {
            let at = 0x20_0000 + u64::from(i) * 0x100;
            r.write(at, p);
            r.tx.chain(&r.mem, i, &[(at, p.len() as u32, 0)]);
        }
        frames
    }

    /// Serves the transmit queue one event at a time until it reports nothing
    /// left: the used index after each event, and every frame the tap took.
    fn tx_events(r: &mut Rig) -> (Vec<u16>, Vec<Vec<u8>>) {
        let (mut after, mut sent) = (Vec::new(), Vec::new());
        loop {
            let served = r.net.queue_notify(TX);
            after.push(r.tx.used_idx(&r.mem));
            sent.extend(std::iter::from_fn(|| r.recv()));
            if served == Served::All {
                return (after, sent);
            }
            assert!(after.len() < 100, "never done");
        }
    }

    /// Receive buffer `i` of `post_buffers_and_frames`.
    fn rx_buf(i: u16) -> u64 {
        0x10_0000 + u64::from(i) * 0x800
    }

    /// Posts 256 receive buffers of 2 KiB and has the tap hold 200 frames.
    fn post_buffers_and_frames(r: &mut Rig) {
        for i in 0..256u16 {
            r.rx.chain(&r.mem, i, &[(rx_buf(i), 2048, WRITE)]);
        }
        for i in 0..200 {
            r.peer.write_all(&packet(100, i as u8)).unwrap();
        }
    }

    /// The tap's 200 frames arrived in order, one per buffer.
    fn assert_frames_received(r: &Rig) {
        for i in 0..200u16 {
            assert_eq!(r.rx.used(&r.mem, i), (u32::from(i), 112), "frame {i}");
            assert_eq!(r.read(rx_buf(i) + 12, 100), frame(100, i as u8));
        }
    }

    #[test]
    fn a_tx_flood_is_sent_one_budget_per_event() {
        let mut r = Rig::with(EVENT_IDX, 256, 256);
        let frames = offer_frames(&r);
        let (after, sent) = tx_events(&mut r);
        assert_eq!(after, [64, 128, 192, 200]);
        assert_eq!(sent, frames, "all sent, in order");
        assert_eq!(r.net.dropped, 0);
        assert_eq!(r.tx.avail_event(&r.mem), 200);
    }

    #[test]
    fn an_rx_flood_is_received_one_budget_per_event() {
        let mut r = Rig::new(EVENT_IDX | MRG, 256);
        post_buffers_and_frames(&mut r);
        let mut after = Vec::new();
        for _ in 0..5 {
            assert!(r.net.extra_fd_wanted(0), "the tap stays watched");
            r.net.extra_fd_ready(0);
            after.push(r.rx.used_idx(&r.mem));
        }
        assert_eq!(after, [64, 128, 192, 200, 200]);
        assert_frames_received(&r);
    }

    #[test]
    fn a_save_mid_flood_loses_and_repeats_nothing() {
        // One event's worth served each way, then the device is saved and a new
        // one on the same tap is restored from it, as a live update does: the
        // new device serves exactly the rest, none twice.
        let features = EVENT_IDX | MRG;
        let mut r = Rig::with(features, 256, 256);
        let frames = offer_frames(&r);
        post_buffers_and_frames(&mut r);
        assert_eq!(r.net.queue_notify(TX), Served::More);
        r.net.extra_fd_ready(0);
        assert_eq!((r.rx.used_idx(&r.mem), r.tx.used_idx(&r.mem)), (64, 64));
        let saved = r.net.state();
        assert_eq!((saved[0].next_avail, saved[1].next_avail), (64, 64));

        // SAFETY: dup takes no pointers; the new descriptor is owned here.
        let tap = unsafe { OwnedFd::from_raw_fd(libc::dup(r.net.tap.as_raw_fd())) };
        let mut net = Net::with_tap(Tap::stand_in(tap), r.net.mac);
        net.ack_features(features);
        let irq = Box::new(r.irqs.clone());
        net.restore(r.mem.clone(), &saved, irq).unwrap();
        assert_eq!(net.state(), saved);
        r.net = net;

        let (after, sent) = tx_events(&mut r);
        assert_eq!(after, [128, 192, 200]);
        assert_eq!(sent, frames, "all sent, in order, once");
        let after: Vec<_> = (0..3)
            .map(|_| {
                r.net.extra_fd_ready(0);
                r.rx.used_idx(&r.mem)
            })
            .collect();
        assert_eq!(after, [128, 192, 200]);
        assert_frames_received(&r);
    }

    #[test]
    fn config_space() {
        let r = Rig::new(0, 256);
        let read = |off: u64, len: usize| {
            let mut b = vec![0xaa; len];
            r.net.read_config(off, &mut b);
            b
        };
        assert_eq!(read(0, 6), [0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(read(0, 8), [0x52, 0x54, 0, 1, 2, 3, 1, 0]);
        assert_eq!(read(3, 1), [1]);
        assert_eq!(read(5, 3), [3, 1, 0]);
        assert_eq!(read(6, 2), [1, 0]);
        assert_eq!(read(7, 4), [0, 0, 0, 0]);
        assert_eq!(read(64, 4), [0; 4]);
        assert_eq!(read(u64::MAX, 2), [0, 0]);
        let mut net = r.net;
        net.write_config(0, &[0xff; 8]);
        let mut b = [0; 8];
        net.read_config(0, &mut b);
        assert_eq!(b, [0x52, 0x54, 0, 1, 2, 3, 1, 0]);
    }

    #[test]
    fn identity_and_features() {
        let r = Rig::new(0, 256);
        assert_eq!(r.net.device_type(), TYPE_NET);
        assert_eq!(r.net.queue_max_sizes(), [256, 256]);
        let f = r.net.features();
        for b in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_MRG_RXBUF,
        ] {
            assert_ne!(f & bit(b), 0, "feature {b}");
        }
        assert_ne!(f & GUEST_TSO, 0);
        assert_ne!(f & EVENT_IDX, 0);
        assert_eq!(
            f & super::super::VIRTIO_F_VERSION_1,
            0,
            "the transport adds it"
        );
        assert_eq!(r.net.extra_fds(), [r.net.tap.as_raw_fd()]);
    }

    #[test]
    fn default_mac_is_stable_and_local() {
        // Frozen: a guest keeps its MAC across molt versions.
        assert_eq!(default_mac("tap0"), [0x52, 0x54, 0x00, 0x4a, 0x63, 0xd6]);
        assert_ne!(default_mac("tap0"), default_mac("tap1"));
        let m = default_mac("anything");
        assert_eq!(m[0] & 3, 2, "locally administered unicast");
    }

    #[test]
    fn reset_stops_and_restart_works() {
        let mut r = Rig::new(EVENT_IDX | MRG, 256);
        r.net.reset();
        assert!(!r.net.extra_fd_wanted(0));
        assert_eq!(r.net.acked, 0);
        r.tx.chain(&r.mem, 0, &[(0x20_0000, 20, 0)]);
        assert_eq!(r.net.queue_notify(TX), Served::All);
        r.net.extra_fd_ready(0);
        assert_eq!(r.recv(), None);
        assert_eq!(r.tx.used_idx(&r.mem), 0);
        r.net.ack_features(EVENT_IDX);
        let irq = Box::new(r.irqs.clone());
        r.net
            .activate(r.mem.clone(), vec![r.rx.queue(256), r.tx.queue(256)], irq);
        assert_eq!(r.net.queue_notify(TX), Served::All);
        assert_eq!(r.recv().map(|f| f.len()), Some(20));
        // Wrong number of queues: stays inactive rather than guessing.
        r.net.reset();
        let irq = Box::new(r.irqs.clone());
        r.net.activate(r.mem.clone(), vec![r.rx.queue(256)], irq);
        assert!(!r.net.extra_fd_wanted(0));
    }

    #[test]
    fn malformed_tx_chains_are_dropped() {
        let mut r = Rig::new(EVENT_IDX, 256);
        let good = packet(100, 8);
        r.write(0x20_0000, &good);
        let m = &r.mem;
        // A loop: 0 -> 1 -> 0.
        r.tx.set_desc(m, 0, (0x20_0000, 56, NEXT), 1);
        r.tx.set_desc(m, 1, (0x20_0000 + 56, 56, NEXT), 0);
        r.tx.offer(m, 0);
        // Outside guest memory; straddling its end; addr + len overflowing.
        r.tx.chain(m, 2, &[(MEM_SIZE as u64 + 0x1000, 100, 0)]);
        r.tx.chain(m, 3, &[(MEM_SIZE as u64 - 50, 100, 0)]);
        r.tx.chain(m, 4, &[(u64::MAX - 10, 100, 0)]);
        // Only zero lengths; shorter than the header.
        r.tx.chain(m, 5, &[(0x20_0000, 0, 0), (0x20_0000, 0, 0)]);
        r.tx.chain(m, 7, &[(0x20_0000, 11, 0)]);
        // A device-writable buffer.
        r.tx.chain(m, 8, &[(0x20_0000, 12, 0), (0x20_0100, 100, WRITE)]);
        // Longer than the queue (16), through an indirect table of 17.
        let long: Vec<_> = (0..17).map(|i| (0x20_0000 + i * 6, 6u32, 0u16)).collect();
        put_table(&r.mem, 0x9000, &long);
        r.tx.chain(m, 10, &[(0x9000, 17 * 16, INDIRECT)]);
        // Bigger than 64 KiB plus header.
        r.tx.chain(m, 11, &[(0x20_0000, MAX_FRAME as u32 + 1, 0)]);
        // A head index beyond the table, and a next index beyond it.
        r.tx.offer(m, 999);
        r.tx.set_desc(m, 12, (0x20_0000, 112, NEXT), 999);
        r.tx.offer(m, 12);
        assert_eq!(r.net.queue_notify(TX), Served::All);
        assert_eq!(r.recv(), None);
        assert_eq!(r.net.dropped, 11);
        // Every head came back but the bogus 999, which cannot.
        assert_eq!(r.tx.used_idx(&r.mem), 10);
        assert_eq!(r.tx.used(&r.mem, 9), (12, 0));

        // An avail index far beyond the ring: refused, nothing consumed.
        let idx = r.tx.avail_idx(&r.mem);
        r.tx.set_avail_idx(&r.mem, idx.wrapping_add(1000));
        assert_eq!(r.net.queue_notify(TX), Served::All);
        assert_eq!(r.tx.used_idx(&r.mem), 10);
        r.tx.set_avail_idx(&r.mem, idx);

        // Still works.
        r.tx.chain(&r.mem, 13, &[(0x20_0000, 112, 0)]);
        assert_eq!(r.net.queue_notify(TX), Served::All);
        assert_eq!(r.recv(), Some(good));
        assert_eq!(r.tx.used_idx(&r.mem), 11);
    }

    #[test]
    fn malformed_rx_chains_are_returned_empty() {
        let mut r = Rig::new(EVENT_IDX | MRG, 16);
        let m = &r.mem;
        r.rx.chain(m, 0, &[(0x10_0000, 8, WRITE)]); // shorter than the header
        r.rx.chain(m, 1, &[(0x10_0000, 100, 0)]); // device-readable
        r.rx.chain(m, 2, &[(MEM_SIZE as u64 - 8, 4096, WRITE)]); // beyond RAM
        r.rx.chain(m, 3, &[(u64::MAX - 10, 4096, WRITE)]); // overflowing
        r.rx.chain(m, 4, &[(0x10_0000, 0, WRITE)]); // empty
        r.rx.set_desc(m, 5, (0x10_0000, 64, WRITE | NEXT), 6); // a loop
        r.rx.set_desc(m, 6, (0x10_1000, 64, WRITE | NEXT), 5);
        r.rx.offer(m, 5);
        r.rx.chain(m, 7, &[(0x10_2000, 1000, WRITE)]); // fine, but too small alone
        r.rx.chain(m, 8, &[(0x10_3000, 8, WRITE)]); // too short, among good ones
        r.rx.chain(m, 9, &[(0x10_4000, 4096, WRITE)]); // fine
        let p = packet(1488, 6);
        r.peer.write_all(&p).unwrap();
        r.net.extra_fd_ready(0);
        let used: Vec<_> = (0..r.rx.used_idx(&r.mem))
            .map(|i| r.rx.used(&r.mem, i))
            .collect();
        // Bad chains come back empty; the frame's two buffers stay consecutive.
        let bad = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (8, 0)];
        assert_eq!(used[..7], bad);
        assert_eq!(used[7..], [(7, 1000), (9, 500)]);
        let mut got = r.read(0x10_2000, 1000);
        got.extend(r.read(0x10_4000, 500));
        assert_eq!(got[10..12], [2, 0], "num_buffers");
        assert_eq!(got[12..], p[12..]);

        // An avail index far beyond the ring: nothing consumed, tap not watched.
        let idx = r.rx.avail_idx(&r.mem);
        r.rx.set_avail_idx(&r.mem, idx.wrapping_add(1000));
        r.peer.write_all(&p).unwrap();
        assert_eq!(r.net.queue_notify(RX), Served::All);
        assert!(!r.net.extra_fd_wanted(0));
        assert_eq!(r.rx.used_idx(&r.mem), 9);
        r.rx.set_avail_idx(&r.mem, idx);

        // Still works.
        r.rx.chain(&r.mem, 10, &[(0x10_5000, 4096, WRITE)]);
        r.rx.chain(&r.mem, 11, &[(0x10_6000, 4096, WRITE)]);
        assert_eq!(r.net.queue_notify(RX), Served::All);
        assert_eq!(r.rx.used(&r.mem, 9), (10, 1500));
        assert!(r.net.extra_fd_wanted(0));

        // Heads beyond the ring are taken and dropped, never returned: the
        // driver could not tell them from its own (tests/fuzz/net/crash-*).
        r.rx.offer(&r.mem, 16);
        r.rx.chain(&r.mem, 12, &[(0x10_7000, 4096, WRITE)]);
        r.rx.offer(&r.mem, 0xffff);
        r.peer.write_all(&p).unwrap();
        r.peer.write_all(&p).unwrap();
        r.net.extra_fd_ready(0);
        assert_eq!(r.rx.used_idx(&r.mem), 12);
        assert_eq!(r.rx.used(&r.mem, 10), (11, 1500));
        assert_eq!(r.rx.used(&r.mem, 11), (12, 1500));
        assert_eq!(r.net.state()[0].next_avail, r.rx.avail_idx(&r.mem));
    }

    #[test]
    fn tx_on_a_full_tap_drops_and_returns_buffers() {
        // The peer never reads: the socket fills after a few 60 KB frames.
        let mut r = Rig::new(EVENT_IDX, 256);
        r.write(0x20_0000, &packet(60_000, 1));
        for i in 0..16 {
            r.tx.chain(&r.mem, i, &[(0x20_0000, 60_012, 0)]);
        }
        assert_eq!(r.net.queue_notify(TX), Served::All);
        assert_eq!(r.tx.used_idx(&r.mem), 16);
        let sent = std::iter::from_fn(|| r.recv()).count() as u64;
        assert!(
            sent > 0 && r.net.dropped > 0,
            "sent {sent}, dropped {}",
            r.net.dropped
        );
        assert_eq!(sent + r.net.dropped, 16);
        assert_eq!(r.irq_count(TX), 1);
    }

    #[test]
    fn random_rings_never_panic() {
        let mut r = Rig::new(EVENT_IDX | MRG | GUEST_TSO, 16);
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..3000 {
            let ring = if rand() % 2 == 0 { &r.rx } else { &r.tx };
            for _ in 0..rand() % 8 {
                let addr = match rand() % 4 {
                    0 => rand(),
                    1 => MEM_SIZE as u64 - rand() % 0x2000,
                    _ => 0x10_0000 + rand() % 0x20_0000,
                };
                let len = [0, 8, 12, 1536, 65_000, rand() as u32][rand() as usize % 6];
                let flags = (rand() % 4) as u16 | if rand() % 8 == 0 { INDIRECT } else { 0 };
                let next = (rand() % 20) as u16;
                ring.set_desc(&r.mem, (rand() % 16) as u16, (addr, len, flags), next);
                if flags & INDIRECT != 0 {
                    let table = [0x9000, 0x20_0000, rand()][rand() as usize % 3];
                    ring.set_desc(&r.mem, 0, (table, (rand() % 40) as u32 * 16, 0), 0);
                }
            }
            let active = r.net.active.as_ref().unwrap();
            let next = [active.rx.next_avail(), active.tx.next_avail()];
            let next = next[usize::from(std::ptr::eq(ring, &r.tx))];
            match rand() % 50 {
                0 => ring.set_avail_idx(&r.mem, rand() as u16),
                1..=5 => ring.set_avail_idx(&r.mem, next.wrapping_add(rand() as u16 % 4)),
                6..=8 => ring.set_used_event(&r.mem, rand() as u16),
                _ => ring.offer(&r.mem, (rand() % 18) as u16),
            }
            let _ = r.peer.write(&packet((rand() % 3000) as usize, round as u8));
            match rand() % 3 {
                0 => {
                    let _ = r.net.queue_notify(RX);
                }
                1 => {
                    let _ = r.net.queue_notify(TX);
                }
                _ => r.net.extra_fd_ready(0),
            }
            while r.recv().is_some() {}
            // What the device counts is what the driver sees.
            let active = r.net.active.as_ref().unwrap();
            assert_eq!(active.rx.next_used(), r.rx.used_idx(&r.mem));
            assert_eq!(active.tx.next_used(), r.tx.used_idx(&r.mem));
        }
        // Still a working device after a reset and a clean start.
        r.net.reset();
        let m = &r.mem;
        for ring in [&r.rx, &r.tx] {
            m.write_slice(&[0; 0x1000], GuestAddress(ring.desc))
                .unwrap();
            m.write_slice(&[0; 0x800], GuestAddress(ring.avail))
                .unwrap();
            m.write_slice(&[0; 0x800], GuestAddress(ring.used)).unwrap();
        }
        while r.recv().is_some() {}
        r.net.ack_features(EVENT_IDX);
        let irq = Box::new(r.irqs.clone());
        r.net
            .activate(r.mem.clone(), vec![r.rx.queue(256), r.tx.queue(256)], irq);
        r.write(0x20_0000, &packet(50, 1));
        r.tx.chain(&r.mem, 0, &[(0x20_0000, 62, 0)]);
        assert_eq!(r.net.queue_notify(TX), Served::All);
        assert_eq!(r.recv(), Some(packet(50, 1)));
    }
}
