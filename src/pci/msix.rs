//! MSI-X (PCI Local Bus 3.0, 6.8.2): the vector table and pending-bit array a
//! device exposes in a BAR, and delivery of its vectors through KVM irqfds.

use std::sync::Arc;

use heapless::Vec as BoundedVec;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// An MSI message as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// Points a GSI at an MSI message in the interrupt controller (KVM routing).
pub trait MsiRouter: Send + Sync {
    fn route(&self, gsi: u32, msg: MsiMessage);
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

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

/// Most vectors a function has: queues plus one for configuration changes.
pub const MAX_VECTORS: usize = 8;

/// Version 1 of the saved MSI-X state: the table, pending bits and control bits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: BoundedVec<Entry, MAX_VECTORS>,
    pub pending: BoundedVec<bool, MAX_VECTORS>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// One function's MSI-X state. Each vector owns a GSI and an irqfd on it.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    router: Arc<dyn MsiRouter>,
}

impl Msix {
    /// `gsis[i]` and `irqfds[i]` (already bound together) serve vector i.
    pub fn new(gsis: Vec<u32>, irqfds: Vec<EventFd>, router: Arc<dyn MsiRouter>) -> Self {
        let n = gsis.len();
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
            gsis,
            irqfds,
            router,
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
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
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
        let e = self.entries[entry];
        // Route when the vector can fire: at unmask, or on a message change while
        // unmasked (Linux rewrites address/data of live vectors when it migrates IRQs).
        if !e.masked() && (was_masked || field < 3) {
            self.router.route(self.gsis[entry], e.message());
        }
        if was_masked && !e.masked() {
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
        } else if let Err(e) = self.irqfds[v].write(1) {
            log::warn!("MSI-X vector {v}: irqfd write failed: {e}");
        }
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.entries.len() {
            if self.pending[v] && !self.entries[v].masked() {
                self.pending[v] = false;
                let _ = self.irqfds[v].write(1);
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
    /// vector into the fresh KVM routing table and re-raises pending ones that
    /// can fire: an interrupt in flight at save time is not lost.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        let n = self.entries.len();
        if s.entries.len() != n || s.pending.len() != n {
            return Err(format!(
                "MSI-X state has {} vectors, the device {n}",
                s.entries.len()
            ));
        }
        self.entries.copy_from_slice(&s.entries);
        self.pending.copy_from_slice(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        for (e, gsi) in self.entries.iter().zip(&self.gsis) {
            if !e.masked() {
                self.router.route(*gsi, e.message());
            }
        }
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
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u32, MsiMessage)>>);
    impl MsiRouter for Recorder {
        fn route(&self, gsi: u32, msg: MsiMessage) {
            self.0.lock().unwrap().push((gsi, msg));
        }
    }

    fn msix(n: usize) -> (Msix, Arc<Recorder>, Vec<EventFd>) {
        let rec = Arc::new(Recorder::default());
        let fds: Vec<EventFd> = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let clones = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let m = Msix::new((24..24 + n as u32).collect(), clones, rec.clone());
        (m, rec, fds)
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
        let routes = rec.0.lock().unwrap().clone();
        assert_eq!(
            routes.last(),
            Some(&(
                25,
                MsiMessage {
                    addr: 0xfee0_0000,
                    data: 0x4041
                }
            ))
        );
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
