//! A passed-through function as VFIO reports it: its config space as first
//! read (PCI Local Bus 3.0, 6.1), its memory BARs (VFIO regions: size, offset
//! in the device descriptor, whether they may be mmap'ed), and where its MSI
//! and MSI-X capabilities are (6.7, 6.8). Every value the device gives is
//! checked before use.

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};

use super::ioctl::{Device, RegionInfo};
use super::Why;
use crate::layout::PCI_MMIO_SIZE;
use crate::pci::config::{BAR0, BAR_MEM64, BAR_PREFETCH, CONFIG_SIZE, NUM_BARS};
use crate::pci::{msi, msix};

const HEADER_TYPE: usize = 0x0e;
const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_POINTER: usize = 0x34;
const BAR_IO: u32 = 1;
/// Capabilities are dword-aligned in 0x40..0x100; more than 48 is a loop.
const MAX_CAPS: usize = 48;

/// A memory BAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarInfo {
    pub region: RegionInfo,
    /// `BAR_MEM64`, `BAR_PREFETCH`: kept as the device has them.
    pub flags: u32,
}

impl BarInfo {
    pub fn size(&self) -> u64 {
        self.region.size
    }

    /// The parts that may be mmap'ed, (offset, size) within the BAR.
    pub fn mmap_areas(&self) -> Vec<(u64, u64)> {
        if self.region.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Vec::new();
        }
        match &self.region.sparse {
            Some(areas) => areas.clone(),
            None => vec![(0, self.region.size)],
        }
    }
}

/// Where an MSI-X table or PBA is: a BAR and an offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarPlace {
    pub bar: usize,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixInfo {
    pub cap: usize,
    pub table: BarPlace,
    pub pba: BarPlace,
    /// Vectors offered to the guest: the device's, at most `msix::MAX_VECTORS`.
    pub vectors: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub config: Vec<u8>,
    /// Where config space starts in the device descriptor.
    pub config_offset: u64,
    pub bars: [Option<BarInfo>; NUM_BARS],
    /// The MSI capability's offset and message control word.
    pub msi: Option<(usize, u16)>,
    pub msix: Option<MsixInfo>,
}

impl Layout {
    /// Asks VFIO about `dev` and reads its config space.
    pub fn probe(dev: &Device) -> Result<Layout, Why> {
        let (flags, regions) = dev.info().map_err(Why::Ioctl)?;
        if flags & VFIO_DEVICE_FLAGS_PCI == 0 || regions <= VFIO_PCI_CONFIG_REGION_INDEX {
            return Err(Why::NotPci);
        }
        let cfg = dev
            .region_info(VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(Why::Ioctl)?;
        let mut config = vec![0u8; CONFIG_SIZE];
        dev.read_at(&mut config, cfg.offset)
            .map_err(Why::ConfigRegion)?;
        let bars = (0..NUM_BARS as u32)
            .map(|i| dev.region_info(i).map_err(Why::Ioctl))
            .collect::<Result<Vec<_>, _>>()?;
        Layout::parse(config, cfg.offset, &bars)
    }

    /// The layout of a function whose config space is `config` and whose BAR
    /// regions are `regions` (index 0..6).
    pub fn parse(config: Vec<u8>, config_offset: u64, regions: &[RegionInfo]) -> Result<Self, Why> {
        if config.len() != CONFIG_SIZE {
            return Err(Why::ConfigRegion(std::io::Error::other(
                "short config space",
            )));
        }
        if config[HEADER_TYPE] & 0x7f != 0 {
            return Err(Why::HeaderType(config[HEADER_TYPE]));
        }
        let mut bars: [Option<BarInfo>; NUM_BARS] = Default::default();
        let mut i = 0;
        while i < NUM_BARS {
            let reg = u32_at(&config, BAR0 + 4 * i);
            let flags = reg & (BAR_MEM64 | BAR_PREFETCH);
            let region = regions.get(i).cloned().unwrap_or_default();
            // A 64-bit BAR's upper half is the next register, never a BAR.
            let next = if flags & BAR_MEM64 != 0 { i + 2 } else { i + 1 };
            if reg & BAR_IO == 0 && region.size != 0 {
                if flags & BAR_MEM64 != 0 && i + 1 == NUM_BARS {
                    return Err(Why::BarSize(i, region.size));
                }
                let size = region.size;
                if !size.is_power_of_two() || !(16..=PCI_MMIO_SIZE).contains(&size) {
                    return Err(Why::BarSize(i, size));
                }
                bars[i] = Some(BarInfo { region, flags });
            }
            i = next;
        }
        let mut layout = Layout {
            config,
            config_offset,
            bars,
            msi: None,
            msix: None,
        };
        let c = &layout.config;
        if u16_at(c, STATUS) & STATUS_CAP_LIST == 0 {
            return Ok(layout);
        }
        let mut at = usize::from(c[CAP_POINTER] & 0xfc);
        let (mut msi, mut msix) = (None, None);
        for _ in 0..MAX_CAPS {
            if at < 0x40 {
                break;
            }
            match c[at] {
                msi::CAP_ID => {
                    let control = u16_at(c, at + 2);
                    if at + msi::Msi::cap_len(control) <= CONFIG_SIZE {
                        msi = Some((at, control));
                    }
                }
                msix::CAP_ID if at + 12 <= CONFIG_SIZE => {
                    let (table, pba) = (u32_at(c, at + 4), u32_at(c, at + 8));
                    msix = layout.msix_info(at, u16_at(c, at + 2), table, pba);
                }
                _ => {}
            }
            at = usize::from(c[at + 1] & 0xfc);
        }
        layout.msi = msi;
        layout.msix = msix;
        Ok(layout)
    }

    /// The MSI-X capability at `cap`, if its table and PBA lie in a memory BAR.
    fn msix_info(&self, cap: usize, control: u16, table: u32, pba: u32) -> Option<MsixInfo> {
        let n = usize::from(control & 0x7ff) + 1;
        let place = |reg: u32, len: u64| {
            let bar = (reg & 7) as usize;
            let offset = u64::from(reg & !7);
            let size = self.bars.get(bar)?.as_ref()?.size();
            (offset + len <= size).then_some(BarPlace { bar, offset, len })
        };
        let info = place(table, 16 * n as u64).zip(place(pba, 8 * n.div_ceil(64) as u64));
        if info.is_none() {
            log::warn!("the MSI-X capability points outside the device's BARs: MSI-X not offered");
        }
        let (table, pba) = info?;
        Some(MsixInfo {
            cap,
            table,
            pba,
            vectors: n.min(msix::MAX_VECTORS),
        })
    }

    /// MSI vectors the function supports.
    pub fn msi_vectors(&self) -> usize {
        self.msi
            .map_or(0, |(_, control)| msi::Msi::supported(control))
    }

    /// MSI-X vectors offered to the guest.
    pub fn msix_vectors(&self) -> usize {
        self.msix.as_ref().map_or(0, |m| m.vectors)
    }
}

fn u16_at(c: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([c[o], c[o + 1]])
}

fn u32_at(c: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]])
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// edu's config space as QEMU builds it: 1234:11e8, a 1 MiB BAR 0, a
    /// 64-bit single-vector MSI capability at 0x40.
    pub fn edu_config() -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_SIZE];
        c[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
        c[STATUS..STATUS + 2].copy_from_slice(&STATUS_CAP_LIST.to_le_bytes());
        c[8] = 0x10;
        c[0x0b] = 0x00;
        c[0x3d] = 1; // INTx pin A
        c[CAP_POINTER] = 0x40;
        c[0x40] = msi::CAP_ID;
        c[0x42..0x44].copy_from_slice(&0x0080u16.to_le_bytes());
        c
    }

    pub fn mmap_region(size: u64, offset: u64) -> RegionInfo {
        RegionInfo {
            flags: VFIO_REGION_INFO_FLAG_MMAP | 3,
            size,
            offset,
            sparse: None,
        }
    }

    #[test]
    fn edu_has_one_bar_and_msi() {
        let mut regions = vec![RegionInfo::default(); NUM_BARS];
        regions[0] = mmap_region(1 << 20, 0);
        let l = Layout::parse(edu_config(), 7 << 40, &regions).unwrap();
        assert_eq!(l.bars[0].as_ref().map(BarInfo::size), Some(1 << 20));
        assert!(l.bars[1..].iter().all(Option::is_none));
        assert_eq!(l.bars[0].as_ref().unwrap().mmap_areas(), vec![(0, 1 << 20)]);
        assert_eq!(l.msi, Some((0x40, 0x0080)));
        assert_eq!((l.msi_vectors(), l.msix_vectors()), (1, 0));
    }

    #[test]
    fn bar_kinds_msix_and_malformed_devices() {
        let mut c = edu_config();
        // BAR 0: I/O; BAR 1-2: 64-bit prefetchable; BAR 3: 32-bit.
        c[0x10..0x14].copy_from_slice(&0xc001u32.to_le_bytes());
        c[0x14..0x18].copy_from_slice(&0xc_u32.to_le_bytes());
        // MSI-X after MSI: 16 vectors, table at BAR 3 + 0x2000, PBA at + 0x3000.
        c[0x41] = 0x50;
        c[0x50] = msix::CAP_ID;
        c[0x52..0x54].copy_from_slice(&15u16.to_le_bytes());
        c[0x54..0x58].copy_from_slice(&0x2003u32.to_le_bytes());
        c[0x58..0x5c].copy_from_slice(&0x3003u32.to_le_bytes());
        let mut regions = vec![RegionInfo::default(); NUM_BARS];
        regions[0] = mmap_region(0x100, 0);
        regions[1] = mmap_region(0x10_0000, 1 << 40);
        regions[2] = mmap_region(0x10_0000, 2 << 40); // the upper half: ignored
        regions[3] = RegionInfo {
            sparse: Some(vec![(0, 0x1000)]),
            ..mmap_region(0x4000, 3 << 40)
        };
        let l = Layout::parse(c.clone(), 0, &regions).unwrap();
        assert!(l.bars[0].is_none(), "I/O BARs are not offered");
        assert_eq!(l.bars[1].as_ref().unwrap().flags, BAR_MEM64 | BAR_PREFETCH);
        assert!(l.bars[2].is_none());
        assert_eq!(l.bars[3].as_ref().unwrap().mmap_areas(), vec![(0, 0x1000)]);
        let m = l.msix.as_ref().unwrap();
        assert_eq!(
            m.table,
            BarPlace {
                bar: 3,
                offset: 0x2000,
                len: 256
            }
        );
        assert_eq!(
            m.pba,
            BarPlace {
                bar: 3,
                offset: 0x3000,
                len: 8
            }
        );
        assert_eq!(l.msix_vectors(), msix::MAX_VECTORS, "capped");

        // A table past the end of its BAR: MSI-X is not offered.
        let mut past = c.clone();
        past[0x54..0x58].copy_from_slice(&0x3ff3u32.to_le_bytes());
        assert_eq!(Layout::parse(past, 0, &regions).unwrap().msix, None);
        // A capability list that loops ends.
        let mut looped = c.clone();
        looped[0x51] = 0x40;
        assert!(Layout::parse(looped, 0, &regions).is_ok());
        // A bridge, an odd-sized or oversized BAR: refused.
        let mut bridge = c.clone();
        bridge[HEADER_TYPE] = 0x81;
        assert!(matches!(
            Layout::parse(bridge, 0, &regions),
            Err(Why::HeaderType(0x81))
        ));
        let mut odd = regions.clone();
        odd[3].size = 0x3000;
        assert!(matches!(
            Layout::parse(c.clone(), 0, &odd),
            Err(Why::BarSize(3, 0x3000))
        ));
        let mut huge = regions.clone();
        huge[1].size = PCI_MMIO_SIZE * 2;
        assert!(matches!(
            Layout::parse(c, 0, &huge),
            Err(Why::BarSize(1, _))
        ));
    }
}
