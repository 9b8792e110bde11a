//! MSI-X (PCI Local Bus 3.0, 6.8.2): the vector table and pending-bit array a
//! device exposes in a BAR; its vectors are delivered as MSI's are (`Vectors`).

use heapless::Vec as BoundedVec;
use serde::{Deserialize, Serialize};

use super::msi::{MsiMessage, Vectors};

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryV1 {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

/// The version this release saves and restores.
pub type Entry = MsixEntryV1;

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            addr: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// Most vectors a function has (the saved state's capacity): a virtio
/// device's queues plus one for configuration changes; a passed-through
/// function offers the guest at most this many.
pub const MAX_VECTORS: usize = 8;
// `Msix::live` keeps one bit per vector in a u32.
const _: () = assert!(MAX_VECTORS <= super::msi::MAX_VECTORS);

/// Why a saved MSI-X state does not fit a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Not one table entry per vector.
    Entries { saved: usize, device: usize },
    /// Not one pending bit per vector.
    Pending { saved: usize, device: usize },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Entries { saved, device } => {
                write!(f, "MSI-X state has {saved} vectors, the device {device}")
            }
            Error::Pending { saved, device } => {
                write!(
                    f,
                    "MSI-X state has {saved} pending bits, the device {device} vectors"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

/// Version 1 of the saved MSI-X state: the table, pending bits and control bits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixStateV1 {
    pub entries: BoundedVec<Entry, MAX_VECTORS>,
    pub pending: BoundedVec<bool, MAX_VECTORS>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// The version this release saves and restores.
pub type MsixState = MsixStateV1;

/// One function's MSI-X state. A vector is live when MSI-X is enabled and
/// neither the function nor the vector is masked; it is routed as it becomes
/// live (`Vectors`).
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    vectors: Vectors,
}

impl Msix {
    pub fn new(vectors: Vectors) -> Self {
        let n = vectors.len();
        debug_assert!(n <= MAX_VECTORS, "{n} MSI-X vectors");
        Msix {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            vectors,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The capability body (after id and next): control, table and PBA locations.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 10] {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        body
    }

    /// Which capability bytes the guest may write: the enable and mask bits.
    pub fn capability_writable() -> [u8; 2] {
        [0, 0xc0]
    }

    /// The guest wrote the message control word.
    pub fn set_control(&mut self, control: u16) {
        let before = self.live();
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.route_new(before);
        self.deliver_pending();
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.entries[entry];
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        if data.len() == 8 {
            data[..4].copy_from_slice(&words[field].to_le_bytes());
            data[4..].copy_from_slice(&words[field + 1].to_le_bytes());
        } else {
            data.copy_from_slice(&words[field].to_le_bytes()[..data.len()]);
        }
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let mut words = [0u32; 2];
        for (i, chunk) in data.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b[..chunk.len()].copy_from_slice(chunk);
            words[i] = u32::from_le_bytes(b);
        }
        let before = self.live();
        let was_masked = self.entries[entry].masked();
        for (i, w) in words.iter().take(data.len().div_ceil(4)).enumerate() {
            let e = &mut self.entries[entry];
            match field + i {
                0 => e.addr_lo = *w,
                1 => e.addr_hi = *w,
                2 => e.data = *w,
                _ => e.control = *w & VECTOR_MASKED,
            }
        }
        self.route_new(before);
        if was_masked && !self.entries[entry].masked() {
            self.deliver_pending();
        }
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let byte = offset as usize + i;
            *d = (0..8)
                .filter(|bit| self.pending.get(byte * 8 + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
    }

    /// Signals `vector`, or marks it pending while masked. Out-of-range is ignored.
    pub fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.entries.len() || !self.enabled {
            return;
        }
        if self.function_masked || self.entries[v].masked() {
            self.pending[v] = true;
        } else {
            self.vectors.fire(v);
        }
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Bit v set: vector v can fire (enabled, function and vector unmasked).
    pub fn live(&self) -> u32 {
        if !self.enabled || self.function_masked {
            return 0;
        }
        (0..self.entries.len())
            .filter(|&v| !self.entries[v].masked())
            .fold(0, |acc, v| acc | 1 << v)
    }

    /// Routes, in one router call, the vectors live now but not in `before`
    /// whose GSI does not route to their message yet.
    fn route_new(&mut self, before: u32) {
        let newly = self.live() & !before;
        let entries = &self.entries;
        self.vectors.route(newly, |v| entries[v].message());
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.entries.len() {
            if self.pending[v] && !self.entries[v].masked() {
                self.pending[v] = false;
                self.vectors.fire(v);
            }
        }
    }

    /// Table entry and 32-bit field for an aligned 4- or 8-byte access.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let entry = usize::try_from(offset / ENTRY_SIZE).ok()?;
        (entry < self.entries.len()).then_some((entry, ((offset % ENTRY_SIZE) / 4) as usize))
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.iter().copied().collect(),
            pending: self.pending.iter().copied().collect(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Takes the saved table (same vector count, checked), routes every live
    /// vector into the fresh KVM routing table (one update) and re-raises
    /// pending ones that can fire: an interrupt in flight at save time is not lost.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), Error> {
        let device = self.entries.len();
        if s.entries.len() != device {
            return Err(Error::Entries {
                saved: s.entries.len(),
                device,
            });
        }
        if s.pending.len() != device {
            return Err(Error::Pending {
                saved: s.pending.len(),
                device,
            });
        }
        self.entries.copy_from_slice(&s.entries);
        self.pending.copy_from_slice(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        self.route_new(0);
        self.deliver_pending();
        Ok(())
    }

    /// Masks everything and forgets pending vectors (function reset).
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = Entry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
        }
        self.pending.fill(false);
        self.enabled = false;
        self.function_masked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msi::tests::{msg, vectors, Recorder};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    fn set_mask(m: &mut Msix, v: u64, masked: bool) {
        m.table_write(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    fn msix(n: usize) -> (Msix, Arc<Recorder>, Vec<EventFd>) {
        let (v, rec, fds) = vectors(n);
        (Msix::new(v), rec, fds)
    }

    fn program(m: &mut Msix, v: u64, addr: u32, data: u32) {
        m.table_write(v * 16, &addr.to_le_bytes());
        m.table_write(v * 16 + 4, &0u32.to_le_bytes());
        m.table_write(v * 16 + 8, &data.to_le_bytes());
        m.table_write(v * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn unmasking_routes_and_fires() {
        let (mut m, rec, fds) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 1, 0xfee0_0000, 0x4041);
        assert_eq!(rec.calls(), [vec![(25, msg(0xfee0_0000, 0x4041))]]);
        m.trigger(1);
        assert_eq!(fds[1].read().unwrap(), 1);
        assert!(fds[0].read().is_err(), "vector 0 did not fire");
    }

    #[test]
    fn masked_vectors_are_pending_until_unmasked() {
        let (mut m, _rec, fds) = msix(1);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 0, 0xfee0_0000, 0x41);
        m.trigger(0);
        assert!(fds[0].read().is_err());
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(fds[0].read().unwrap(), 1);
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn message_writes_to_a_live_vector_wait_for_its_next_unmask() {
        let (mut m, rec, _fds) = msix(1);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x41);
        assert_eq!(rec.calls().len(), 1);
        // A guest rewriting a live vector's message in a loop: no route at all.
        for i in 0..10_000u32 {
            m.table_write(0, &(0xfee0_0000 | ((i & 0xff) << 12)).to_le_bytes());
            m.table_write(8, &i.to_le_bytes());
        }
        assert_eq!(rec.calls().len(), 1, "no route per message write");
        // The next unmask installs the last message written, once.
        set_mask(&mut m, 0, true);
        set_mask(&mut m, 0, false);
        let last = msg(0xfee0_0000 | ((9_999 & 0xff) << 12), 9_999);
        assert_eq!(rec.calls()[1..], [vec![(24, last)]]);
    }

    #[test]
    fn unmasking_an_unchanged_message_routes_nothing() {
        let (mut m, rec, fds) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x41);
        for _ in 0..100 {
            set_mask(&mut m, 0, true);
            set_mask(&mut m, 0, false);
            m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
            m.set_control(CONTROL_ENABLE);
        }
        // Nor does a reset: KVM keeps the route, and the message is the same.
        m.reset();
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x41);
        assert_eq!(rec.calls().len(), 1);
        m.trigger(0);
        assert_eq!(fds[0].read().unwrap(), 1, "the vector still fires");
    }

    #[test]
    fn enable_and_restore_route_every_live_vector_in_one_call() {
        let (mut m, rec, _) = msix(4);
        for v in 0..4 {
            program(&mut m, v, 0xfee0_0000, 0x40 + v as u32);
        }
        set_mask(&mut m, 3, true);
        assert!(rec.calls().is_empty(), "MSI-X disabled: nothing can fire");
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(rec.calls().is_empty(), "function masked: nothing can fire");
        m.set_control(CONTROL_ENABLE);
        let live: Vec<_> = (0..3)
            .map(|v| (24 + v, msg(0xfee0_0000, 0x40 + v)))
            .collect();
        assert_eq!(rec.calls(), [live]);
        // Vector 1 was in flight (pending, masked) at save time.
        set_mask(&mut m, 1, true);
        m.trigger(1);
        set_mask(&mut m, 1, false);
        set_mask(&mut m, 1, true);
        m.trigger(1);
        let saved = m.state();
        let (mut fresh, rec, fds) = msix(4);
        fresh.restore(&saved).unwrap();
        let live: Vec<_> = [0, 2].map(|v| (24 + v, msg(0xfee0_0000, 0x40 + v))).into();
        assert_eq!(rec.calls(), [live], "one call for the live vectors");
        assert_eq!(fresh.state(), saved);
        assert!(fds[1].read().is_err(), "still masked: still pending");
        set_mask(&mut fresh, 1, false);
        assert_eq!(rec.calls()[1], [(25, msg(0xfee0_0000, 0x41))]);
        assert_eq!(fds[1].read().unwrap(), 1, "pending vector fires at unmask");
    }

    #[test]
    fn state_round_trips_and_another_size_is_refused() {
        let (mut m, _rec, _fds) = msix(3);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 0, 0xfee0_0000, 0x41);
        program(&mut m, 2, 0xfee0_1000, 0x42);
        // The function is masked: vector 2 fires into its pending bit.
        m.trigger(2);
        let saved = m.state();
        assert_eq!(saved.pending[..], [false, false, true]);
        assert!(saved.enabled && saved.function_masked);

        let (mut fresh, rec, fds) = msix(3);
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.state(), saved);
        assert!(rec.calls().is_empty(), "function masked: nothing can fire");
        let mut d = [0u8; 8];
        fresh.table_read(2 * 16, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0xfee0_1000);
        fresh.pba_read(0, &mut d);
        assert_eq!(d[0], 0b100);
        // Unmasking the function routes the live vectors and delivers vector 2.
        fresh.set_control(CONTROL_ENABLE);
        let live = vec![(24, msg(0xfee0_0000, 0x41)), (26, msg(0xfee0_1000, 0x42))];
        assert_eq!(rec.calls(), [live]);
        assert_eq!(fds[2].read().unwrap(), 1);
        assert!(fds[0].read().is_err());

        let (mut small, _, _) = msix(2);
        let e = small.restore(&saved).unwrap_err();
        assert_eq!(
            e,
            Error::Entries {
                saved: 3,
                device: 2
            }
        );
        assert_eq!(e.to_string(), "MSI-X state has 3 vectors, the device 2");
        let mut short = saved.clone();
        short.pending.pop();
        assert_eq!(
            fresh.restore(&short),
            Err(Error::Pending {
                saved: 2,
                device: 3
            })
        );
        assert_eq!(small.state(), msix(2).0.state(), "left as it was");
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (mut m, _rec, _fds) = msix(2);
        m.table_write(2 * 16, &[1, 2, 3, 4]); // past the table
        m.table_write(3, &[1, 2, 3, 4]); // unaligned
        m.table_write(0, &[1, 2]); // 2-byte access
        m.trigger(7); // no such vector
        let mut d = [0xaa; 4];
        m.table_read(2 * 16, &mut d);
        assert_eq!(d, [0; 4]);
        m.table_read(12, &mut d);
        assert_eq!(
            u32::from_le_bytes(d),
            VECTOR_MASKED,
            "reset state is masked"
        );
    }

    #[test]
    fn capability_describes_the_table() {
        let (m, _, _) = msix(3);
        let c = m.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([c[0], c[1]]), 2);
        assert_eq!(u32::from_le_bytes([c[2], c[3], c[4], c[5]]), 0x4000);
        assert_eq!(u32::from_le_bytes([c[6], c[7], c[8], c[9]]), 0x5000);
    }
}
