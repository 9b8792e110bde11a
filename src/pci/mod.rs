//! PCI bus 0 behind configuration mechanism 1 (PCI Local Bus 3.0, 3.2.2.3.2):
//! a host bridge in slot 0, devices in the slots the allocator hands out, and
//! MMIO dispatch to their BARs. Addresses come from `layout.rs`.

mod alloc;
pub mod config;
pub mod msi;
pub mod msix;

use std::sync::{Arc, Mutex};

pub use alloc::{AllocError, Allocator};
use config::{ConfigSpace, Header, NUM_BARS};

use crate::layout::{MAX_PCI_SLOTS, PCI_CONFIG_DATA, PCI_CONFIG_PORT};
use crate::sync::lock;

/// A PCI function as the bus sees it.
pub trait PciFunction: Send {
    /// The function's config space as emulated: its BARs and command register
    /// decide which MMIO it decodes.
    fn config(&self) -> &ConfigSpace;
    /// A guest read of config space; a passed-through function reads some
    /// bytes from its device.
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]);
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// Slot 0: tells the guest this is a PCI host bridge and nothing more.
struct HostBridge(ConfigSpace);

impl PciFunction for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Puts host memory at guest-physical addresses: KVM memslots, implemented
/// in `vm/`. The BARs of a passed-through function that molt may mmap.
pub trait MemoryMapper: Send + Sync {
    /// Makes memslot `slot` map the `len` bytes at `host` at guest address
    /// `gpa`; `len` 0 empties the slot.
    ///
    /// # Safety
    /// The host memory must stay mapped until the slot is emptied.
    unsafe fn set_slot(&self, slot: u32, gpa: u64, host: *mut u8, len: u64) -> std::io::Result<()>;
}

pub struct PciBus {
    /// The CONFIG_ADDRESS register.
    address: Mutex<u32>,
    slots: Vec<Option<SharedFunction>>,
}

const ENABLE_BIT: u32 = 1 << 31;

impl PciBus {
    pub fn new() -> Self {
        let bridge = HostBridge(ConfigSpace::new(&Header {
            vendor: 0x1b36, // Red Hat, as QEMU's generic host bridges
            device: 0x0008,
            revision: 0,
            class: 0x06_00_00,
            subsystem_vendor: 0x1b36,
            subsystem_id: 0,
        }));
        let mut slots = vec![None; MAX_PCI_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(bridge)) as SharedFunction);
        PciBus {
            address: Mutex::new(0),
            slots,
        }
    }

    pub fn add(&mut self, slot: u8, function: SharedFunction) {
        self.slots[usize::from(slot)] = Some(function);
    }

    /// The function CONFIG_ADDRESS selects, with the register offset for a data
    /// port access at `port`. None: disabled, another bus/function, or empty slot.
    fn selected(&self, port: u16) -> Option<(SharedFunction, usize)> {
        let addr = *lock(&self.address);
        let (bus, slot, func) = ((addr >> 16) & 0xff, (addr >> 11) & 0x1f, (addr >> 8) & 7);
        if addr & ENABLE_BIT == 0 || bus != 0 || func != 0 {
            return None;
        }
        let f = self.slots.get(slot as usize)?.clone()?;
        Some((
            f,
            (addr & 0xfc) as usize + usize::from(port - PCI_CONFIG_DATA),
        ))
    }

    /// Port reads; false when the port is not the bus's.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            PCI_CONFIG_PORT if data.len() == 4 => {
                data.copy_from_slice(&lock(&self.address).to_le_bytes());
            }
            p if (PCI_CONFIG_DATA..PCI_CONFIG_DATA + 4).contains(&p) => match self.selected(p) {
                Some((f, off)) => lock(&f).config_read(off, data),
                None => data.fill(0xff),
            },
            _ => return false,
        }
        true
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            PCI_CONFIG_PORT if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                *lock(&self.address) = v;
            }
            p if (PCI_CONFIG_DATA..PCI_CONFIG_DATA + 4).contains(&p) => {
                if let Some((f, off)) = self.selected(p) {
                    lock(&f).config_write(off, data);
                }
            }
            _ => return false,
        }
        true
    }

    /// The function, BAR and offset decoding `addr`, if any.
    fn decode(&self, addr: u64) -> Option<(SharedFunction, usize, u64)> {
        for f in self.slots.iter().flatten() {
            let guard = lock(f);
            let c = guard.config();
            if !c.memory_enabled() {
                continue;
            }
            for bar in 0..NUM_BARS {
                if let Some((base, size)) = c.bar(bar) {
                    if addr >= base && addr - base < size {
                        drop(guard);
                        return Some((f.clone(), bar, addr - base));
                    }
                }
            }
        }
        None
    }

    /// MMIO reads; false when no BAR decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.decode(addr) {
            Some((f, bar, off)) => {
                lock(&f).bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.decode(addr) {
            Some((f, bar, off)) => {
                lock(&f).bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_addr(slot: u32, reg: u32) -> [u8; 4] {
        (ENABLE_BIT | (slot << 11) | reg).to_le_bytes()
    }

    #[test]
    fn host_bridge_answers_and_empty_slots_float() {
        let bus = PciBus::new();
        assert!(bus.pio_write(PCI_CONFIG_PORT, &config_addr(0, 0)));
        let mut d = [0u8; 4];
        bus.pio_read(PCI_CONFIG_DATA, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        bus.pio_write(PCI_CONFIG_PORT, &config_addr(5, 0));
        bus.pio_read(PCI_CONFIG_DATA, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Disabled address register: nothing selected.
        bus.pio_write(PCI_CONFIG_PORT, &[0, 0, 0, 0]);
        bus.pio_read(PCI_CONFIG_DATA, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Byte access at an offset inside the dword.
        bus.pio_write(PCI_CONFIG_PORT, &config_addr(0, 8));
        let mut b = [0u8; 1];
        bus.pio_read(PCI_CONFIG_DATA + 3, &mut b);
        assert_eq!(b[0], 0x06, "class: bridge");
        assert!(!bus.pio_read(0x80, &mut b));
    }
}
