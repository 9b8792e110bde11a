//! The VFIO ioctls molt makes (include/uapi/linux/vfio.h, Documentation/
//! driver-api/vfio.rst): their numbers and the calls on the container, group
//! and device descriptors, each failing call with its own error. The structs
//! come from vfio-bindings; vfio-ioctls is not used: it can neither adopt
//! inherited descriptors nor use the VADDR flags a live update needs (DEPS.md).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_region_info, VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_VADDR, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_TYPE,
};
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};
use vmm_sys_util::ioctl_io_nr;

const TYPE: u32 = VFIO_TYPE as u32;
ioctl_io_nr!(VFIO_GET_API_VERSION, TYPE, VFIO_BASE);
ioctl_io_nr!(VFIO_CHECK_EXTENSION, TYPE, VFIO_BASE + 1);
ioctl_io_nr!(VFIO_SET_IOMMU, TYPE, VFIO_BASE + 2);
ioctl_io_nr!(VFIO_GROUP_GET_STATUS, TYPE, VFIO_BASE + 3);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, TYPE, VFIO_BASE + 4);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, TYPE, VFIO_BASE + 6);
ioctl_io_nr!(VFIO_DEVICE_GET_INFO, TYPE, VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, TYPE, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, TYPE, VFIO_BASE + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, TYPE, VFIO_BASE + 11);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, TYPE, VFIO_BASE + 13);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, TYPE, VFIO_BASE + 14);

#[derive(Debug)]
pub enum Error {
    GetApiVersion(io::Error),
    CheckExtension(u32, io::Error),
    SetIommu(u32, io::Error),
    GroupGetStatus(io::Error),
    GroupSetContainer(io::Error),
    GroupGetDeviceFd(io::Error),
    DeviceGetInfo(io::Error),
    GetRegionInfo(u32, io::Error),
    SetIrqs(u32, io::Error),
    Reset(io::Error),
    MapDma {
        iova: u64,
        size: u64,
        e: io::Error,
    },
    /// VFIO_DMA_MAP_FLAG_VADDR: a mapping's new virtual address.
    MapVaddr {
        iova: u64,
        size: u64,
        e: io::Error,
    },
    /// VFIO_DMA_UNMAP_FLAG_VADDR: a mapping's virtual address invalidated.
    UnmapVaddr {
        iova: u64,
        size: u64,
        e: io::Error,
    },
}

impl Error {
    /// The errno of the failed call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::GetApiVersion(e)
            | Error::CheckExtension(_, e)
            | Error::SetIommu(_, e)
            | Error::GroupGetStatus(e)
            | Error::GroupSetContainer(e)
            | Error::GroupGetDeviceFd(e)
            | Error::DeviceGetInfo(e)
            | Error::GetRegionInfo(_, e)
            | Error::SetIrqs(_, e)
            | Error::Reset(e)
            | Error::MapDma { e, .. }
            | Error::MapVaddr { e, .. }
            | Error::UnmapVaddr { e, .. } => e.raw_os_error(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::GetApiVersion(e) => write!(f, "VFIO_GET_API_VERSION failed: {e}"),
            Error::CheckExtension(x, e) => write!(f, "VFIO_CHECK_EXTENSION({x}) failed: {e}"),
            Error::SetIommu(t, e) => write!(f, "VFIO_SET_IOMMU({t}) failed: {e}"),
            Error::GroupGetStatus(e) => write!(f, "VFIO_GROUP_GET_STATUS failed: {e}"),
            Error::GroupSetContainer(e) => write!(f, "VFIO_GROUP_SET_CONTAINER failed: {e}"),
            Error::GroupGetDeviceFd(e) => write!(f, "VFIO_GROUP_GET_DEVICE_FD failed: {e}"),
            Error::DeviceGetInfo(e) => write!(f, "VFIO_DEVICE_GET_INFO failed: {e}"),
            Error::GetRegionInfo(i, e) => {
                write!(f, "VFIO_DEVICE_GET_REGION_INFO({i}) failed: {e}")
            }
            Error::SetIrqs(i, e) => write!(f, "VFIO_DEVICE_SET_IRQS({i}) failed: {e}"),
            Error::Reset(e) => write!(f, "VFIO_DEVICE_RESET failed: {e}"),
            Error::MapDma { iova, size, e } => write!(
                f,
                "VFIO_IOMMU_MAP_DMA of {size:#x} bytes at IOVA {iova:#x} failed: {e}"
            ),
            Error::MapVaddr { iova, size, e } => write!(
                f,
                "VFIO_IOMMU_MAP_DMA(FLAG_VADDR) of {size:#x} bytes at IOVA {iova:#x} failed: {e}"
            ),
            Error::UnmapVaddr { iova, size, e } => write!(
                f,
                "VFIO_IOMMU_UNMAP_DMA(FLAG_VADDR) of {size:#x} bytes at IOVA {iova:#x} failed: {e}"
            ),
        }
    }
}

/// An ioctl's result: negative is the errno.
fn check(r: i32) -> io::Result<i32> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `/dev/vfio/vfio`: the IOMMU context devices' DMA goes through.
#[derive(Debug)]
pub struct Container(File);

impl Container {
    pub fn new(fd: OwnedFd) -> Self {
        Container(File::from(fd))
    }

    /// The descriptor, to hand over.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn api_version(&self) -> Result<i32, Error> {
        // SAFETY: VFIO_GET_API_VERSION takes no argument and touches no memory.
        check(unsafe { ioctl(&self.0, VFIO_GET_API_VERSION()) }).map_err(Error::GetApiVersion)
    }

    /// Whether the container supports `extension` (an IOMMU type, a feature).
    pub fn check_extension(&self, extension: u32) -> Result<bool, Error> {
        // SAFETY: VFIO_CHECK_EXTENSION takes its argument by value.
        let r = unsafe {
            ioctl_with_val(
                &self.0,
                VFIO_CHECK_EXTENSION(),
                libc::c_ulong::from(extension),
            )
        };
        check(r)
            .map(|r| r > 0)
            .map_err(|e| Error::CheckExtension(extension, e))
    }

    pub fn set_iommu(&self, kind: u32) -> Result<(), Error> {
        // SAFETY: VFIO_SET_IOMMU takes its argument by value.
        let r = unsafe { ioctl_with_val(&self.0, VFIO_SET_IOMMU(), libc::c_ulong::from(kind)) };
        check(r).map(drop).map_err(|e| Error::SetIommu(kind, e))
    }

    /// Maps `size` bytes of this process's memory at `vaddr` for device DMA at
    /// `iova`, readable and writable; the pages are pinned until unmapped.
    pub fn map_dma(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), Error> {
        let flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
        self.dma_map(flags, iova, size, vaddr)
            .map_err(|e| Error::MapDma { iova, size, e })
    }

    /// Gives the mapping at `iova` (exactly as mapped) this process's virtual
    /// address `vaddr` for its pages: the pages stay pinned and the device's
    /// DMA goes on; the mapping's pinned-page account moves to this process.
    /// Only a mapping whose address was invalidated (`invalidate_vaddr`)
    /// takes one (EINVAL otherwise).
    pub fn map_vaddr(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), Error> {
        self.dma_map(VFIO_DMA_MAP_FLAG_VADDR, iova, size, vaddr)
            .map_err(|e| Error::MapVaddr { iova, size, e })
    }

    /// `VFIO_IOMMU_MAP_DMA` of `size` bytes at `iova` to `vaddr`, with `flags`.
    fn dma_map(&self, flags: u32, iova: u64, size: u64, vaddr: u64) -> io::Result<()> {
        let map = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr,
            iova,
            size,
        };
        // SAFETY: the kernel reads `map`, which lives through the call; the
        // callers keep the memory at `vaddr` mapped while the device or the
        // mapping may use it.
        let r = unsafe { ioctl_with_ref(&self.0, VFIO_IOMMU_MAP_DMA(), &map) };
        check(r).map(drop)
    }

    /// Invalidates the virtual address of the mapping at `iova`, keeping the
    /// mapping and its pinned pages: the device's DMA goes on, and another
    /// process (or this one after execve) gives it a new address with
    /// `map_vaddr`. EINVAL if it is already invalid.
    pub fn invalidate_vaddr(&self, iova: u64, size: u64) -> Result<(), Error> {
        let mut unmap = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: VFIO_DMA_UNMAP_FLAG_VADDR,
            iova,
            size,
            ..Default::default()
        };
        // SAFETY: the kernel reads `unmap` and writes its size back; it lives
        // through the call and is the size argsz says.
        let r = unsafe { ioctl_with_mut_ref(&self.0, VFIO_IOMMU_UNMAP_DMA(), &mut unmap) };
        check(r)
            .map(drop)
            .map_err(|e| Error::UnmapVaddr { iova, size, e })
    }
}

/// `/dev/vfio/N`: an IOMMU group, the unit of isolation.
#[derive(Debug)]
pub struct Group(File);

impl Group {
    pub fn new(fd: OwnedFd) -> Self {
        Group(File::from(fd))
    }

    /// The descriptor, to hand over.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// VFIO_GROUP_FLAGS_* of the group.
    pub fn status(&self) -> Result<u32, Error> {
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: the kernel writes into `status`, which is the size argsz says.
        let r = unsafe { ioctl_with_mut_ref(&self.0, VFIO_GROUP_GET_STATUS(), &mut status) };
        check(r).map_err(Error::GroupGetStatus)?;
        Ok(status.flags)
    }

    pub fn set_container(&self, container: &Container) -> Result<(), Error> {
        let fd: RawFd = container.0.as_raw_fd();
        // SAFETY: the kernel reads one int, the container's descriptor.
        let r = unsafe { ioctl_with_ref(&self.0, VFIO_GROUP_SET_CONTAINER(), &fd) };
        check(r).map(drop).map_err(Error::GroupSetContainer)
    }

    /// The descriptor of the group's device named `name` (its PCI address).
    pub fn device_fd(&self, name: &str) -> Result<OwnedFd, Error> {
        let name = std::ffi::CString::new(name)
            .map_err(|_| Error::GroupGetDeviceFd(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: the kernel reads a NUL-terminated string that outlives the call.
        let r = unsafe { ioctl_with_ptr(&self.0, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
        let fd = check(r).map_err(Error::GroupGetDeviceFd)?;
        // SAFETY: the ioctl returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// A region of a device (a BAR, the ROM, config space) as VFIO reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub flags: u32,
    pub size: u64,
    /// Where it starts in the device descriptor's file offsets.
    pub offset: u64,
    /// The parts that may be mmap'ed (offset, size), when the kernel names
    /// them (a sparse-mmap capability); None: the whole region, if flags allow.
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// A device descriptor: its regions are read and written at file offsets.
#[derive(Debug)]
pub struct Device(File);

impl Device {
    pub fn new(fd: OwnedFd) -> Self {
        Device(File::from(fd))
    }

    /// (flags, number of regions).
    pub fn info(&self) -> Result<(u32, u32), Error> {
        let mut info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes into `info`, which is the size argsz says.
        let r = unsafe { ioctl_with_mut_ref(&self.0, VFIO_DEVICE_GET_INFO(), &mut info) };
        check(r).map_err(Error::DeviceGetInfo)?;
        Ok((info.flags, info.num_regions))
    }

    pub fn region_info(&self, index: u32) -> Result<RegionInfo, Error> {
        const HEAD: usize = std::mem::size_of::<vfio_region_info>();
        // The kernel says how much room the capabilities need: ask again with it.
        let mut words = vec![0u64; HEAD / 8];
        for _ in 0..2 {
            let bytes = words.len() * 8;
            let head = vfio_region_info {
                argsz: bytes as u32,
                index,
                ..Default::default()
            };
            // SAFETY: `head` is plain data, copied into the buffer's start.
            unsafe { std::ptr::write(words.as_mut_ptr().cast::<vfio_region_info>(), head) };
            // SAFETY: the kernel writes at most argsz bytes, the buffer's size.
            let r = unsafe {
                ioctl_with_mut_ptr(&self.0, VFIO_DEVICE_GET_REGION_INFO(), words.as_mut_ptr())
            };
            check(r).map_err(|e| Error::GetRegionInfo(index, e))?;
            // SAFETY: the buffer starts with a vfio_region_info the kernel filled.
            let info = unsafe { std::ptr::read(words.as_ptr().cast::<vfio_region_info>()) };
            let want = info.argsz as usize;
            if info.flags & VFIO_REGION_INFO_FLAG_CAPS == 0 || want <= bytes {
                let buf: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                let sparse = (info.flags & VFIO_REGION_INFO_FLAG_CAPS != 0)
                    .then(|| sparse_areas(&buf, info.cap_offset))
                    .flatten();
                return Ok(RegionInfo {
                    flags: info.flags,
                    size: info.size,
                    offset: info.offset,
                    sparse,
                });
            }
            // Bounded: the kernel's capability chains are a few hundred bytes.
            words = vec![0u64; want.min(1 << 16).div_ceil(8)];
        }
        Err(Error::GetRegionInfo(
            index,
            io::Error::other("capability chain keeps growing"),
        ))
    }

    pub fn reset(&self) -> Result<(), Error> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        check(unsafe { ioctl(&self.0, VFIO_DEVICE_RESET()) })
            .map(drop)
            .map_err(Error::Reset)
    }

    pub fn read_at(&self, data: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(data, offset)
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }

    /// The descriptor, to mmap a region.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Switches a device's interrupts: what the interrupt code needs of a device
/// (a trait so its tests can watch the calls).
pub trait IrqControl {
    /// Interrupt index `index`, vectors `start..start + fds.len()`, signal `fds`
    /// (enabling the index with that many vectors if it was disabled).
    fn set_irqs(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), Error>;
    /// Disables interrupt index `index`.
    fn disable_irqs(&self, index: u32) -> Result<(), Error>;
}

impl IrqControl for Device {
    fn set_irqs(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), Error> {
        self.irq_set(index, VFIO_IRQ_SET_DATA_EVENTFD, start, fds)
    }

    fn disable_irqs(&self, index: u32) -> Result<(), Error> {
        self.irq_set(index, VFIO_IRQ_SET_DATA_NONE, 0, &[])
    }
}

impl Device {
    fn irq_set(&self, index: u32, data: u32, start: u32, fds: &[RawFd]) -> Result<(), Error> {
        // struct vfio_irq_set: argsz, flags, index, start, count, then the fds.
        let mut words: Vec<u32> = vec![
            (20 + 4 * fds.len()) as u32,
            data | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            fds.len() as u32,
        ];
        words.extend(fds.iter().map(|&fd| fd as u32));
        // SAFETY: the kernel reads argsz bytes: the header and `count` fds.
        let r = unsafe { ioctl_with_ptr(&self.0, VFIO_DEVICE_SET_IRQS(), words.as_ptr()) };
        check(r).map(drop).map_err(|e| Error::SetIrqs(index, e))
    }
}

/// The sparse-mmap areas in a region info's capability chain `buf`, starting
/// at `cap_offset`; None without such a capability or if the chain is malformed.
pub fn sparse_areas(buf: &[u8], cap_offset: u32) -> Option<Vec<(u64, u64)>> {
    let u32_at = |o: usize| Some(u32::from_le_bytes(buf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(buf.get(o..o + 8)?.try_into().ok()?));
    let mut at = cap_offset as usize;
    // Header: id (u16), version (u16), next (u32). A chain only moves forward.
    for _ in 0..16 {
        if at == 0 || at + 8 > buf.len() {
            return None;
        }
        let id = u32_at(at)? & 0xffff;
        if id == VFIO_REGION_INFO_CAP_SPARSE_MMAP {
            let n = u32_at(at + 8)? as usize;
            return (0..n.min(64))
                .map(|i| Some((u64_at(at + 16 + 16 * i)?, u64_at(at + 24 + 16 * i)?)))
                .collect();
        }
        let next = u32_at(at + 4)? as usize;
        if next <= at {
            return None;
        }
        at = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // _IO(';', 100 + n), as include/uapi/linux/vfio.h defines them.
        assert_eq!(VFIO_GET_API_VERSION(), 0x3b64);
        assert_eq!(VFIO_SET_IOMMU(), 0x3b66);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD(), 0x3b6a);
        assert_eq!(VFIO_DEVICE_SET_IRQS(), 0x3b6e);
        assert_eq!(VFIO_IOMMU_MAP_DMA(), 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA(), 0x3b72);
    }

    fn cap(id: u16, next: u32, body: &[u8]) -> Vec<u8> {
        let mut c = id.to_le_bytes().to_vec();
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&next.to_le_bytes());
        c.extend_from_slice(body);
        c
    }

    #[test]
    fn sparse_areas_are_found_along_the_chain() {
        let mut buf = vec![0u8; 32];
        // A type capability at 32 pointing at the sparse one at 48.
        buf.extend(cap(2, 48, &[0; 8]));
        let mut body = 2u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        for (o, s) in [(0u64, 0x1000u64), (0x3000, 0x1000)] {
            body.extend_from_slice(&o.to_le_bytes());
            body.extend_from_slice(&s.to_le_bytes());
        }
        buf.extend(cap(1, 0, &body));
        assert_eq!(
            sparse_areas(&buf, 32),
            Some(vec![(0, 0x1000), (0x3000, 0x1000)])
        );
        // No sparse capability; a chain pointing back; a truncated buffer.
        assert_eq!(sparse_areas(&buf[..48], 32), None);
        let mut looped = buf.clone();
        looped[36..40].copy_from_slice(&32u32.to_le_bytes());
        assert_eq!(sparse_areas(&looped, 32), None);
        assert_eq!(sparse_areas(&buf[..70], 32), None);
        assert_eq!(sparse_areas(&buf, 0), None);
    }
}
