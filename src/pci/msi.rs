//! MSI (PCI Local Bus 3.0, 6.8.1): the message a vector sends, the router that
//! points a GSI at it (KVM routing, implemented in `vm/`), the delivery every
//! MSI and MSI-X vector shares (`Vectors`), and the MSI capability of a
//! passed-through function (`Msi`), whose registers live in its config space.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::config::ConfigSpace;
use crate::ratelimit::guest_log;

/// Capability ID of MSI.
pub const CAP_ID: u8 = 0x05;

/// An MSI message as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// Points GSIs at MSI messages in the interrupt controller (KVM routing).
pub trait MsiRouter: Send + Sync {
    /// Installs `routes` (GSI, message) together, in one controller update.
    fn route(&self, routes: &[(u32, MsiMessage)]);
}

/// Routes nothing: for functions in tests and fuzzing, whose vectors are
/// raised through their irqfds alone.
#[cfg(any(test, feature = "fuzz"))]
pub struct NoRoutes;

#[cfg(any(test, feature = "fuzz"))]
impl MsiRouter for NoRoutes {
    fn route(&self, _: &[(u32, MsiMessage)]) {}
}

/// A function's vectors: vector i owns GSI `gsis[i]` and `irqfds[i]`, bound
/// together in KVM, so raising it is one eventfd write, from molt or (VFIO)
/// straight from the host kernel.
///
/// A vector's route is (re)programmed only when the vector becomes live (enabled
/// and unmasked) with a message other than the one its GSI already routes to,
/// as QEMU does. A write to the message of a live vector takes effect at its
/// next unmask: the spec leaves such writes undefined (6.8.2.9) and Linux masks
/// around them, while applying each one would let the guest issue a
/// KVM_SET_GSI_ROUTING, which rebuilds the whole table, per write.
pub struct Vectors {
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    router: Arc<dyn MsiRouter>,
    /// The message each vector's GSI routes to, as last given to the router.
    routed: Vec<Option<MsiMessage>>,
}

// A function's live vectors are a bit mask in a u32.
pub const MAX_VECTORS: usize = 32;

impl Vectors {
    /// `gsis[i]` and `irqfds[i]` (already bound together) serve vector i.
    pub fn new(gsis: Vec<u32>, irqfds: Vec<EventFd>, router: Arc<dyn MsiRouter>) -> Self {
        debug_assert!(gsis.len() == irqfds.len() && gsis.len() <= MAX_VECTORS);
        let routed = vec![None; gsis.len()];
        Vectors {
            gsis,
            irqfds,
            router,
            routed,
        }
    }

    pub fn len(&self) -> usize {
        self.gsis.len()
    }

    /// Routes, in one router call, the vectors in `newly` (bit v: vector v)
    /// whose GSI does not route to `message(v)` yet.
    pub fn route(&mut self, newly: u32, message: impl Fn(usize) -> MsiMessage) {
        let mut routes = Vec::new();
        for v in (0..self.len()).filter(|v| newly & 1 << v != 0) {
            let msg = message(v);
            if self.routed[v] != Some(msg) {
                self.routed[v] = Some(msg);
                routes.push((self.gsis[v], msg));
            }
        }
        if !routes.is_empty() {
            self.router.route(&routes);
        }
    }

    /// Raises vector `v`. Out-of-range is ignored.
    pub fn fire(&self, v: usize) {
        if let Some(fd) = self.irqfds.get(v) {
            if let Err(e) = fd.write(1) {
                guest_log!(Warn, "MSI vector {v}: irqfd write failed: {e}");
            }
        }
    }
}

/// Message control bits (6.8.1.3).
const CONTROL_ENABLE: u16 = 1;
const CONTROL_MMC_SHIFT: u16 = 1;
const CONTROL_MME_SHIFT: u16 = 4;
const CONTROL_MME: u16 = 7 << CONTROL_MME_SHIFT;
const CONTROL_64BIT: u16 = 1 << 7;
const CONTROL_MASKABLE: u16 = 1 << 8;

/// The MSI capability of a function whose registers sit in its config space at
/// `cap`: 32- or 64-bit addresses, optional per-vector masking. Which vectors
/// are live follows the registers after each guest write (`update`); a vector
/// raised while masked waits in its pending bit.
pub struct Msi {
    cap: usize,
    control: u16,
    vectors: Vectors,
    /// Vectors live as of the last `update`.
    live: u32,
}

impl Msi {
    /// The capability at `cap` whose read-only control bits (vector count,
    /// 64-bit, maskable) are `control`'s; `vectors` holds one vector per
    /// supported vector (`supported`).
    pub fn new(cap: usize, control: u16, vectors: Vectors) -> Self {
        let control = control & (CONTROL_64BIT | CONTROL_MASKABLE | (7 << CONTROL_MMC_SHIFT));
        Msi {
            cap,
            control,
            vectors,
            live: 0,
        }
    }

    /// Vectors the function supports (Multiple Message Capable).
    pub fn supported(control: u16) -> usize {
        1 << ((control >> CONTROL_MMC_SHIFT) & 7).min(5)
    }

    fn is64(&self) -> bool {
        self.control & CONTROL_64BIT != 0
    }

    fn maskable(&self) -> bool {
        self.control & CONTROL_MASKABLE != 0
    }

    fn data_reg(&self) -> usize {
        self.cap + if self.is64() { 12 } else { 8 }
    }

    fn mask_reg(&self) -> usize {
        self.data_reg() + 4
    }

    fn pending_reg(&self) -> usize {
        self.data_reg() + 8
    }

    /// Bytes of the capability, id and next included.
    pub fn len(&self) -> usize {
        Msi::cap_len(self.control)
    }

    /// Where the capability is in config space.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.cap..self.cap + self.len()
    }

    /// Bytes of a capability whose message control word is `control`.
    pub fn cap_len(control: u16) -> usize {
        let data = if control & CONTROL_64BIT != 0 { 12 } else { 8 };
        data + if control & CONTROL_MASKABLE != 0 {
            12
        } else {
            2
        }
    }

    /// The capability's reset body (after id and next) and which of its bits
    /// the guest may write: enable and Multiple Message Enable, the address,
    /// the data and the mask bits of supported vectors. Pending bits are read-only.
    pub fn body(&self) -> (Vec<u8>, Vec<u8>) {
        let n = self.len() - 2;
        let mut body = vec![0u8; n];
        body[..2].copy_from_slice(&self.control.to_le_bytes());
        let mut writable = vec![0u8; n];
        writable[..2].copy_from_slice(&(CONTROL_ENABLE | CONTROL_MME).to_le_bytes());
        writable[2..6].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        let data = self.data_reg() - self.cap - 2;
        if self.is64() {
            writable[6..10].fill(0xff);
        }
        writable[data..data + 2].fill(0xff);
        if self.maskable() {
            let bits = (1u64 << self.vectors.len()) - 1;
            writable[data + 4..data + 8].copy_from_slice(&(bits as u32).to_le_bytes());
        }
        (body, writable)
    }

    /// Whether the guest enabled MSI.
    pub fn enabled(&self, c: &ConfigSpace) -> bool {
        c.read_u16(self.cap + 2) & CONTROL_ENABLE != 0
    }

    /// Vectors the guest enabled (Multiple Message Enable, at most supported).
    pub fn count(&self, c: &ConfigSpace) -> usize {
        let mme = (c.read_u16(self.cap + 2) & CONTROL_MME) >> CONTROL_MME_SHIFT;
        (1usize << mme.min(5)).min(self.vectors.len())
    }

    /// Bit v set: vector v can fire (MSI enabled, v enabled and unmasked).
    pub fn live(&self, c: &ConfigSpace) -> u32 {
        if !self.enabled(c) {
            return 0;
        }
        let enabled = ((1u64 << self.count(c)) - 1) as u32;
        let masked = if self.maskable() {
            c.read_u32(self.mask_reg())
        } else {
            0
        };
        enabled & !masked
    }

    /// The message of vector `v` is this one with `v` in the data's low bits
    /// (the second value: those bits' mask), as the function sends it.
    fn message(&self, c: &ConfigSpace) -> (MsiMessage, u32) {
        let lo = u64::from(c.read_u32(self.cap + 4));
        let hi = if self.is64() {
            u64::from(c.read_u32(self.cap + 8))
        } else {
            0
        };
        let low = self.count(c) as u32 - 1;
        let data = u32::from(c.read_u16(self.data_reg()));
        let base = MsiMessage {
            addr: hi << 32 | lo,
            data: data & !low,
        };
        (base, low)
    }

    /// After a guest write to the capability: routes the vectors that became
    /// live and raises those of them that were pending.
    pub fn update(&mut self, c: &mut ConfigSpace) {
        let live = self.live(c);
        let newly = live & !self.live;
        self.live = live;
        let (base, low) = self.message(c);
        self.vectors.route(newly, |v| MsiMessage {
            data: base.data | (v as u32 & low),
            ..base
        });
        if self.maskable() {
            let pending = c.read_u32(self.pending_reg());
            let deliver = pending & newly;
            for v in (0..self.vectors.len()).filter(|v| deliver & 1 << v != 0) {
                self.vectors.fire(v);
            }
            c.set_bytes(self.pending_reg(), &(pending & !deliver).to_le_bytes());
        }
    }

    /// Vector `v` fired: raises it, or sets its pending bit while it is masked.
    /// Nothing happens while MSI or the vector is disabled.
    pub fn trigger(&mut self, c: &mut ConfigSpace, v: usize) {
        if v >= self.count(c) || !self.enabled(c) {
            return;
        }
        if self.live & 1 << v != 0 {
            self.vectors.fire(v);
        } else if self.maskable() {
            let pending = c.read_u32(self.pending_reg()) | 1 << v;
            c.set_bytes(self.pending_reg(), &pending.to_le_bytes());
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::pci::config::Header;
    use std::sync::Mutex;

    /// Every router call, with the routes it installed.
    #[derive(Default)]
    pub struct Recorder(Mutex<Vec<Vec<(u32, MsiMessage)>>>);
    impl MsiRouter for Recorder {
        fn route(&self, routes: &[(u32, MsiMessage)]) {
            self.0.lock().unwrap().push(routes.to_vec());
        }
    }
    impl Recorder {
        pub fn calls(&self) -> Vec<Vec<(u32, MsiMessage)>> {
            self.0.lock().unwrap().clone()
        }
    }

    pub fn msg(addr: u64, data: u32) -> MsiMessage {
        MsiMessage { addr, data }
    }

    /// `n` vectors on GSIs 24.., the recorder, and the irqfds' other ends.
    pub fn vectors(n: usize) -> (Vectors, Arc<Recorder>, Vec<EventFd>) {
        let rec = Arc::new(Recorder::default());
        let fds: Vec<EventFd> = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let clones = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let v = Vectors::new((24..24 + n as u32).collect(), clones, rec.clone());
        (v, rec, fds)
    }

    const CAP: usize = 0x50;

    /// A config space with an MSI capability at CAP of `control`'s shape.
    fn msi(control: u16) -> (Msi, ConfigSpace, Arc<Recorder>, Vec<EventFd>) {
        let (v, rec, fds) = vectors(Msi::supported(control));
        let m = Msi::new(CAP, control, v);
        let mut c = ConfigSpace::new(&Header {
            vendor: 0x1234,
            device: 0x11e8,
            revision: 0,
            class: 0xff_00_00,
            subsystem_vendor: 0,
            subsystem_id: 0,
        });
        let (body, writable) = m.body();
        c.set_bytes(CAP + 2, &body);
        c.set_writable(CAP + 2, &writable);
        (m, c, rec, fds)
    }

    fn write(m: &mut Msi, c: &mut ConfigSpace, off: usize, data: &[u8]) {
        c.write(CAP + off, data);
        m.update(c);
    }

    #[test]
    fn layouts_follow_the_control_word() {
        assert_eq!(msi(0).0.len(), 10);
        assert_eq!(msi(CONTROL_64BIT).0.len(), 14);
        assert_eq!(msi(CONTROL_MASKABLE).0.len(), 20);
        assert_eq!(msi(CONTROL_64BIT | CONTROL_MASKABLE).0.len(), 24);
        assert_eq!(Msi::supported(3 << CONTROL_MMC_SHIFT), 8);
        assert_eq!(
            Msi::supported(7 << CONTROL_MMC_SHIFT),
            32,
            "reserved values clamp"
        );
    }

    #[test]
    fn enabling_routes_the_message_and_fires() {
        // edu's capability: one vector, 64-bit, not maskable.
        let (mut m, mut c, rec, fds) = msi(CONTROL_64BIT);
        write(&mut m, &mut c, 4, &0xfee0_1000u32.to_le_bytes());
        write(&mut m, &mut c, 8, &0u32.to_le_bytes());
        write(&mut m, &mut c, 12, &0x4041u16.to_le_bytes());
        assert!(rec.calls().is_empty(), "disabled: nothing routed");
        m.trigger(&mut c, 0);
        assert!(fds[0].read().is_err(), "disabled: nothing fires");
        write(&mut m, &mut c, 2, &(CONTROL_ENABLE | 0x70).to_le_bytes());
        assert_eq!(c.read_u16(CAP + 2), CONTROL_64BIT | CONTROL_ENABLE | 0x70);
        assert_eq!(m.count(&c), 1, "MME beyond what the function supports");
        assert_eq!(rec.calls(), [vec![(24, msg(0xfee0_1000, 0x4041))]]);
        m.trigger(&mut c, 0);
        assert_eq!(fds[0].read().unwrap(), 1);
        // Read-only bits stay: the guest cannot make it maskable or 32-bit.
        write(&mut m, &mut c, 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(CAP + 2) & !0x71, CONTROL_64BIT);
    }

    #[test]
    fn multiple_vectors_carry_their_number_in_the_data() {
        let (mut m, mut c, rec, _fds) = msi(2 << CONTROL_MMC_SHIFT);
        write(&mut m, &mut c, 4, &0xfee0_0000u32.to_le_bytes());
        write(&mut m, &mut c, 8, &0x4043u16.to_le_bytes());
        write(&mut m, &mut c, 2, &(CONTROL_ENABLE | 2 << 4).to_le_bytes());
        let want: Vec<_> = (0..4)
            .map(|v| (24 + v, msg(0xfee0_0000, 0x4040 | v)))
            .collect();
        assert_eq!(rec.calls(), [want]);
    }

    #[test]
    fn masked_vectors_wait_in_their_pending_bit() {
        let (mut m, mut c, rec, fds) = msi(CONTROL_MASKABLE | 1 << CONTROL_MMC_SHIFT);
        let mask = CAP + 12;
        let pending = CAP + 16;
        write(&mut m, &mut c, 4, &0xfee0_0000u32.to_le_bytes());
        write(&mut m, &mut c, 8, &0x41u16.to_le_bytes());
        write(&mut m, &mut c, 12, &0b11u32.to_le_bytes());
        write(&mut m, &mut c, 2, &(CONTROL_ENABLE | 1 << 4).to_le_bytes());
        assert!(rec.calls().is_empty(), "both masked");
        m.trigger(&mut c, 1);
        assert!(fds[1].read().is_err());
        assert_eq!(c.read_u32(pending), 0b10);
        // The guest cannot clear a pending bit, nor set mask bits past its vectors.
        c.write(pending, &0u32.to_le_bytes());
        c.write(mask, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_u32(pending), 0b10);
        assert_eq!(c.read_u32(mask), 0b11);
        write(&mut m, &mut c, 12, &0b01u32.to_le_bytes());
        assert_eq!(rec.calls(), [vec![(25, msg(0xfee0_0000, 0x41))]]);
        assert_eq!(fds[1].read().unwrap(), 1, "delivered at unmask");
        assert_eq!(c.read_u32(pending), 0);
        m.trigger(&mut c, 5);
        m.trigger(&mut c, 0);
        assert_eq!(
            c.read_u32(pending),
            0b01,
            "out of range ignored, vector 0 held"
        );
    }
}
