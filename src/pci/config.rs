//! A type-0 PCI configuration header (PCI Local Bus 3.0, 6.1) with capabilities
//! and 32-bit memory BARs, as seen through configuration mechanism 1.

/// Standard header registers (byte offsets).
const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const CLASS_PROG_IF: usize = 0x09;
const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAP_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
/// First byte available to capabilities.
const CAP_START: usize = 0x40;
pub const CONFIG_SIZE: usize = 256;
pub const NUM_BARS: usize = 6;

pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 = COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE;
/// Memory BAR flags (6.2.5.1), read-only: a 64-bit BAR also takes the next
/// BAR register for the upper half of its address.
pub const BAR_MEM64: u32 = 1 << 2;
pub const BAR_PREFETCH: u32 = 1 << 3;
const STATUS_CAP_LIST: u16 = 1 << 4;

/// Why saved config space bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Not `CONFIG_SIZE` bytes.
    Size(usize),
    /// A byte the guest cannot write differs: the identity, a BAR's size or the
    /// capability layout of another device.
    OtherDevice,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Size(n) => write!(f, "config space of {n} bytes"),
            Error::OtherDevice => write!(f, "saved PCI config space belongs to another device"),
        }
    }
}

impl std::error::Error for Error {}

/// Identity of a function.
pub struct Header {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// class << 16 | subclass << 8 | prog-if
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem_id: u16,
}

/// Configuration space: the bytes, which of them the guest may write, and BARs.
#[derive(Clone)]
pub struct ConfigSpace {
    regs: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    bar_sizes: [u64; NUM_BARS],
    next_cap: usize,
    last_cap_next: usize,
}

impl ConfigSpace {
    pub fn new(h: &Header) -> Self {
        let mut c = ConfigSpace {
            regs: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bar_sizes: [0; NUM_BARS],
            next_cap: CAP_START,
            last_cap_next: CAP_POINTER,
        };
        c.put(VENDOR_ID, &h.vendor.to_le_bytes());
        c.put(DEVICE_ID, &h.device.to_le_bytes());
        c.regs[REVISION] = h.revision;
        c.put(CLASS_PROG_IF, &h.class.to_le_bytes()[..3]);
        c.regs[HEADER_TYPE] = 0;
        c.put(SUBSYSTEM_VENDOR, &h.subsystem_vendor.to_le_bytes());
        c.put(SUBSYSTEM_ID, &h.subsystem_id.to_le_bytes());
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.regs[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Declares BAR `index` as 32-bit, non-prefetchable memory of `size` (a power
    /// of two, at least 16 bytes) at `addr`.
    pub fn set_bar(&mut self, index: usize, addr: u32, size: u32) {
        self.set_memory_bar(index, u64::from(addr), u64::from(size), 0);
    }

    /// Declares BAR `index` as memory of `size` (a power of two, 16 bytes to
    /// 2 GiB) at `addr`, with `flags` (`BAR_MEM64`: BAR `index + 1` holds the
    /// upper half of the address; `BAR_PREFETCH`).
    pub fn set_memory_bar(&mut self, index: usize, addr: u64, size: u64, flags: u32) {
        debug_assert!(size.is_power_of_two() && (16..=1 << 31).contains(&size));
        debug_assert!(addr.is_multiple_of(size) && flags & !(BAR_MEM64 | BAR_PREFETCH) == 0);
        self.bar_sizes[index] = size;
        let off = BAR0 + 4 * index;
        self.put(off, &(addr as u32 | flags).to_le_bytes());
        // Address bits are writable; the low flag bits are not.
        let mask = !(size as u32 - 1) & !0xf;
        self.writable[off..off + 4].copy_from_slice(&mask.to_le_bytes());
        if flags & BAR_MEM64 != 0 {
            self.put(off + 4, &((addr >> 32) as u32).to_le_bytes());
            self.writable[off + 4..off + 8].fill(0xff);
        }
    }

    /// BAR `index`'s current base and size, if it is implemented.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let size = *self.bar_sizes.get(index)?;
        if size == 0 {
            return None;
        }
        let lo = self.read_u32(BAR0 + 4 * index);
        let hi = match lo & BAR_MEM64 {
            0 => 0,
            _ => self.read_u32(BAR0 + 4 * index + 4),
        };
        Some((u64::from(hi) << 32 | u64::from(lo & !0xf), size))
    }

    /// Appends a capability; `body` starts after the id and next bytes.
    /// `writable` marks which body bytes the guest may change. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let off = self.next_cap;
        let len = (2 + body.len()).next_multiple_of(4);
        assert!(
            off + len <= CONFIG_SIZE,
            "capabilities overflow config space"
        );
        self.regs[off] = id;
        self.put(off + 2, body);
        for (i, w) in writable.iter().enumerate() {
            self.writable[off + 2 + i] = *w;
        }
        self.regs[self.last_cap_next] = off as u8;
        self.last_cap_next = off + 1;
        self.next_cap = off + len;
        let status = u16::from_le_bytes([self.regs[STATUS], self.regs[STATUS + 1]]);
        self.put(STATUS, &(status | STATUS_CAP_LIST).to_le_bytes());
        off
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let o = offset & !3;
        u32::from_le_bytes([
            self.regs[o],
            self.regs[o + 1],
            self.regs[o + 2],
            self.regs[o + 3],
        ])
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.regs[offset], self.regs[offset + 1]])
    }

    /// A guest write of `data` at `offset`: only writable bits change.
    /// Out-of-range bytes are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SIZE) else {
                break;
            };
            let w = self.writable[o];
            self.regs[o] = (self.regs[o] & !w) | (b & w);
        }
    }

    /// Reads `data.len()` bytes at `offset`; out-of-range bytes read as 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i)
                .and_then(|o| self.regs.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Whether the guest enabled memory decoding.
    pub fn memory_enabled(&self) -> bool {
        self.read_u16(COMMAND) & COMMAND_MEMORY != 0
    }

    /// All 256 bytes, for saving.
    pub fn bytes(&self) -> &[u8] {
        &self.regs
    }

    /// Takes saved bytes back. The identity, BARs' sizes and the capability
    /// layout come from the device itself, so they must match; only what the
    /// guest could write may differ.
    pub fn restore_bytes(&mut self, saved: &[u8]) -> Result<(), Error> {
        if saved.len() != CONFIG_SIZE {
            return Err(Error::Size(saved.len()));
        }
        let fixed_differs = (0..CONFIG_SIZE).any(|i| {
            let ro = !self.writable[i];
            // Status bits other than the capability list are the guest's to clear.
            i != STATUS && i != STATUS + 1 && (saved[i] & ro) != (self.regs[i] & ro)
        });
        if fixed_differs {
            return Err(Error::OtherDevice);
        }
        self.regs.copy_from_slice(saved);
        Ok(())
    }

    /// Replaces capability bytes the device itself owns (not guest-writable).
    pub fn set_bytes(&mut self, offset: usize, bytes: &[u8]) {
        self.put(offset, bytes);
    }

    /// Which bits of the bytes at `offset` the guest may write from now on.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(&Header {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1af4,
            subsystem_id: 0x40,
        })
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = space();
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(8) >> 8, 0x01_80_00);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = space();
        c.set_bar(0, 0xc000_0000, 0x8000);
        c.write(BAR0, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_u32(BAR0), !0x7fff, "size mask, memory/32-bit flags");
        c.write(BAR0, &0xc000_8000u32.to_le_bytes());
        assert_eq!(c.bar(0), Some((0xc000_8000, 0x8000)));
        // Unimplemented BARs stay zero.
        c.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_u32(BAR0 + 4), 0);
        assert_eq!(c.bar(1), None);
    }

    #[test]
    fn bar_64bit_prefetchable_sizing() {
        let mut c = space();
        c.set_memory_bar(2, 0xc010_0000, 0x10_0000, BAR_MEM64 | BAR_PREFETCH);
        assert_eq!(c.read_u32(BAR0 + 8), 0xc010_000c);
        assert_eq!(c.bar(2), Some((0xc010_0000, 0x10_0000)));
        // Linux sizes both halves: all ones, read back, restore.
        c.write(BAR0 + 8, &u32::MAX.to_le_bytes());
        c.write(BAR0 + 12, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_u32(BAR0 + 8), 0xfff0_000c, "size mask, flags kept");
        assert_eq!(c.read_u32(BAR0 + 12), u32::MAX);
        c.write(BAR0 + 8, &0x0020_0000u32.to_le_bytes());
        c.write(BAR0 + 12, &1u32.to_le_bytes());
        assert_eq!(c.bar(2), Some((0x1_0020_0000, 0x10_0000)));
        assert_eq!(c.bar(3), None, "the upper half is no BAR of its own");
    }

    #[test]
    fn capabilities_chain() {
        let mut c = space();
        let a = c.add_capability(0x09, &[1, 2, 3], &[]);
        let b = c.add_capability(0x11, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0xc0]);
        assert_eq!(c.read_u16(STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        assert_eq!(c.regs[CAP_POINTER] as usize, a);
        assert_eq!(c.regs[a + 1] as usize, b);
        assert_eq!(c.regs[b + 1], 0);
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(c.read_u16(b + 2), 0xc000, "only the writable bits changed");
    }

    #[test]
    fn restore_takes_guest_writes_and_refuses_other_devices() {
        let mut c = space();
        c.set_bar(0, 0xc000_0000, 0x8000);
        c.write(COMMAND, &[0x06, 0]);
        let saved = c.bytes().to_vec();
        let mut fresh = space();
        fresh.set_bar(0, 0xc000_0000, 0x8000);
        fresh.restore_bytes(&saved).unwrap();
        assert!(fresh.memory_enabled());
        let mut other = saved.clone();
        other[DEVICE_ID] ^= 1;
        assert_eq!(fresh.restore_bytes(&other), Err(Error::OtherDevice));
        assert_eq!(fresh.restore_bytes(&saved[..100]), Err(Error::Size(100)));
    }

    #[test]
    fn out_of_range_access_is_harmless() {
        let mut c = space();
        c.write(254, &[1, 2, 3, 4]);
        let mut d = [0u8; 4];
        c.read(254, &mut d);
        assert_eq!(&d[2..], &[0xff, 0xff]);
        c.read(usize::MAX, &mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
