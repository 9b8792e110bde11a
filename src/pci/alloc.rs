//! The machine-wide resource allocator: PCI slots, BAR space in the PCI MMIO
//! window and MSI GSIs, handed out in a fixed order. It is saved in the state
//! (`MachineState::allocator`, frozen): its serde layout must not change.

use crate::layout::{MAX_MSI_GSIS, MAX_PCI_SLOTS, MSI_GSI_START, PCI_MMIO_SIZE, PCI_MMIO_START};

/// Hands out slots, BAR space and MSI GSIs in a fixed order: the same devices on
/// the same command line always get the same resources, so a restored machine
/// matches the saved one without recording an allocation log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AllocatorV1 {
    next_slot: u8,
    next_mmio: u64,
    next_gsi: u32,
}

/// The version this release saves and restores.
pub type Allocator = AllocatorV1;

#[derive(Debug, PartialEq, Eq)]
pub enum AllocError {
    Slots,
    Mmio(u64),
    Gsis(u32),
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllocError::Slots => write!(f, "no free PCI slot (at most {})", MAX_PCI_SLOTS - 1),
            AllocError::Mmio(size) => write!(f, "no room for a {size}-byte BAR"),
            AllocError::Gsis(n) => write!(f, "no room for {n} more MSI routes"),
        }
    }
}

impl Allocator {
    pub fn new() -> Self {
        Allocator {
            next_slot: 1,
            next_mmio: PCI_MMIO_START,
            next_gsi: MSI_GSI_START,
        }
    }

    pub fn slot(&mut self) -> Result<u8, AllocError> {
        if usize::from(self.next_slot) >= MAX_PCI_SLOTS {
            return Err(AllocError::Slots);
        }
        self.next_slot += 1;
        Ok(self.next_slot - 1)
    }

    /// A naturally aligned BAR of `size` (a power of two).
    pub fn mmio(&mut self, size: u64) -> Result<u64, AllocError> {
        let base = self.next_mmio.next_multiple_of(size);
        if base + size > PCI_MMIO_START + PCI_MMIO_SIZE {
            return Err(AllocError::Mmio(size));
        }
        self.next_mmio = base + size;
        Ok(base)
    }

    pub fn gsis(&mut self, n: u32) -> Result<Vec<u32>, AllocError> {
        if self.next_gsi + n > MSI_GSI_START + MAX_MSI_GSIS {
            return Err(AllocError::Gsis(n));
        }
        self.next_gsi += n;
        Ok((self.next_gsi - n..self.next_gsi).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_is_deterministic_and_bounded() {
        let mut a = Allocator::new();
        assert_eq!(a.slot(), Ok(1));
        assert_eq!(a.mmio(0x8000), Ok(PCI_MMIO_START));
        assert_eq!(a.mmio(0x4000), Ok(PCI_MMIO_START + 0x8000));
        assert_eq!(a.mmio(0x8000), Ok(PCI_MMIO_START + 0x10000));
        assert_eq!(a.gsis(3), Ok(vec![24, 25, 26]));
        assert_eq!(a.gsis(MAX_MSI_GSIS), Err(AllocError::Gsis(MAX_MSI_GSIS)));
        assert_eq!(a.mmio(PCI_MMIO_SIZE), Err(AllocError::Mmio(PCI_MMIO_SIZE)));
        for _ in 2..MAX_PCI_SLOTS {
            a.slot().unwrap();
        }
        assert_eq!(a.slot(), Err(AllocError::Slots));
    }
}
