//! Guest RAM: one shared file (an anonymous memfd, or `--mem-file`) mapped in one
//! or two regions around the 32-bit MMIO gap.
//!
//! RAM always lives in a file that can be mapped again by another process or a new
//! image of this one: that is what lets live update keep RAM in place.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::seek_hole::SeekHole;

use crate::files::{self, Access};
use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

#[derive(Debug)]
pub enum Error {
    Memfd(std::io::Error),
    MemFile(files::Error),
    Adopt(PathBuf, std::io::Error),
    MemFileSize(PathBuf, std::io::Error),
    MemFileTooSmall(PathBuf, u64, u64),
    SetSize(std::io::Error),
    Mmap(vm_memory::mmap::MmapRegionError),
    Regions(vm_memory::GuestRegionCollectionError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Memfd(e) => write!(f, "memfd_create for guest RAM failed: {e}"),
            Error::MemFile(e) => e.fmt(f),
            Error::Adopt(p, e) => {
                write!(
                    f,
                    "cannot reopen the handed-over guest RAM {}: {e}",
                    p.display()
                )
            }
            Error::MemFileSize(p, e) => {
                write!(f, "cannot find the size of --mem-file {}: {e}", p.display())
            }
            Error::MemFileTooSmall(p, have, want) => write!(
                f,
                "--mem-file {} holds {have} bytes and cannot grow to {want}",
                p.display()
            ),
            Error::SetSize(e) => write!(f, "cannot size guest RAM file: {e}"),
            Error::Mmap(e) => write!(f, "cannot map guest RAM: {e}"),
            Error::Regions(e) => write!(f, "bad guest RAM layout: {e}"),
        }
    }
}

/// One contiguous piece of guest-physical RAM and where it sits in the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the MMIO gap: low RAM below it, the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<RamRegion> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![RamRegion {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        regions.push(RamRegion {
            guest_addr: MMIO_GAP_END,
            size: size - low,
            file_offset: low,
        });
    }
    regions
}

/// Guest RAM: the backing file and its mapping.
pub struct GuestRam {
    pub regions: Vec<RamRegion>,
    pub memory: GuestMemoryMmap,
}

impl GuestRam {
    /// Creates (or opens) the backing file of `size` bytes and maps it shared.
    pub fn create(size: u64, mem_file: Option<&Path>) -> Result<Self, Error> {
        let file = match mem_file {
            None => {
                let file = memfd("molt-ram")?;
                file.set_len(size).map_err(Error::SetSize)?;
                file
            }
            Some(path) => {
                let file =
                    files::open("--mem-file", path, Access::ReadWrite).map_err(Error::MemFile)?;
                fit(file, path, size)?
            }
        };
        Self::map(file, size)
    }

    /// `create` for a machine whose state is not yet checked: None where
    /// that would change anything (create or grow `--mem-file`), open
    /// anything but a regular file, or fail; `create` then does it, or says
    /// why not, once the state is accepted.
    pub fn map_as_is(size: u64, mem_file: Option<&Path>) -> Option<Self> {
        let file = match mem_file {
            None => return Self::create(size, None).ok(),
            Some(path) => {
                let regular = std::fs::symlink_metadata(path).ok()?.is_file();
                let file = regular.then(|| files::open("--mem-file", path, Access::Existing));
                file?.ok()?
            }
        };
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.len() < size {
            return None;
        }
        Self::map(file, size).ok()
    }

    /// Maps the RAM a previous molt handed over (exec, transfer), reopened
    /// through `path`, a `/proc/self/fd/N` link to it (a fresh open file
    /// description). Not checked by `files`: the descriptor is already the
    /// guest's RAM (a memfd, mode 0777, or a `--mem-file` checked when first
    /// opened by name), and the path is a link by design.
    pub fn adopt(size: u64, path: &Path) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::Adopt(path.to_path_buf(), e))?;
        Self::map(fit(file, path, size)?, size)
    }

    fn map(file: File, size: u64) -> Result<Self, Error> {
        let regions = ram_regions(size);
        let mut mapped = Vec::with_capacity(regions.len());
        for r in &regions {
            let offset = FileOffset::new(file.try_clone().map_err(Error::SetSize)?, r.file_offset);
            let mmap = MmapRegion::from_file(offset, r.size as usize).map_err(Error::Mmap)?;
            advise_huge_pages(&mmap);
            // from_file never fails for a non-overflowing base, checked by ram_regions.
            let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_addr))
                .ok_or(Error::SetSize(std::io::Error::other("region overflows")))?;
            mapped.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(mapped).map_err(Error::Regions)?;
        Ok(GuestRam { regions, memory })
    }
}

/// Asks for transparent huge pages: fewer faults and nested page-table entries.
/// Shared memory gets them only where the host allows it (`shmem_enabled` set
/// to `advise` or `always`); elsewhere this is a harmless no-op.
fn advise_huge_pages(mmap: &MmapRegion) {
    // SAFETY: the range is exactly the mapping `mmap` owns; madvise changes no
    // contents, only the kernel's paging policy for it.
    let r = unsafe { libc::madvise(mmap.as_ptr().cast(), mmap.size(), libc::MADV_HUGEPAGE) };
    if r != 0 {
        log::debug!("MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
    }
}

impl GuestRam {
    /// The backing file (memfd or `--mem-file`).
    pub fn file(&self) -> &File {
        self.memory
            .iter()
            .next()
            .and_then(|r| r.file_offset())
            .map(FileOffset::file)
            .expect("guest RAM is always file-backed")
    }

    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Each mapped region: (guest address, size, host address).
    pub fn host_regions(&self) -> Vec<(u64, u64, u64)> {
        self.memory
            .iter()
            .map(|region| {
                let host = self
                    .memory
                    .get_host_address(region.start_addr())
                    .expect("a mapped region has a host address");
                (region.start_addr().0, region.len(), host as u64)
            })
            .collect()
    }

    /// The guest address of byte `offset` of the backing file.
    pub fn guest_addr(&self, offset: u64) -> Option<GuestAddress> {
        self.regions
            .iter()
            .find(|r| offset >= r.file_offset && offset - r.file_offset < r.size)
            .map(|r| GuestAddress(r.guest_addr + (offset - r.file_offset)))
    }

    /// CRC32 of a fixed sample of guest pages: the zero page and the kernel's
    /// first page (both always written at boot) and 62 pages spread evenly.
    /// Read through the file, not the mapping, where the file allows it: a
    /// page this process has not touched is not faulted into its page tables
    /// (about 3 µs each under a paravirtual KVM), which would all fall inside
    /// an update's pause.
    pub fn sample_crc(&self) -> u32 {
        use std::os::unix::fs::FileExt;
        const PAGE: usize = 4096;
        let size = self.size();
        let stride = (size / 62).max(PAGE as u64) & !(PAGE as u64 - 1);
        let offsets = [crate::layout::ZERO_PAGE_START, crate::layout::HIMEM_START]
            .into_iter()
            .chain((0..62).map(|i| i * stride));
        let mut crc = crc32fast::Hasher::new();
        let mut page = [0u8; PAGE];
        for off in offsets.filter(|&o| o + PAGE as u64 <= size) {
            if let Some(addr) = self.guest_addr(off) {
                // A device (/dev/dax) may not be read(2)able: then the mapping.
                if self.file().read_exact_at(&mut page, off).is_ok()
                    || self.memory.read_slice(&mut page, addr).is_ok()
                {
                    crc.update(&page);
                }
            }
        }
        crc.finalize()
    }

    /// Byte ranges `(offset, len)` of the backing file that hold data, split at
    /// region boundaries; holes (never-touched memfd pages) are skipped.
    pub fn populated(&self) -> std::io::Result<Vec<(u64, u64)>> {
        // A duplicate: seeking needs `&mut File`. It shares the file offset, which
        // nothing relies on: RAM is read and written through its mapping.
        let mut file = self.file().try_clone()?;
        let mut out = Vec::new();
        for r in &self.regions {
            let end = r.file_offset + r.size;
            let mut pos = r.file_offset;
            while pos < end {
                let Some(data) = file.seek_data(pos)?.filter(|&d| d < end) else {
                    break;
                };
                let hole = file.seek_hole(data)?.unwrap_or(end).min(end);
                out.push((data, hole - data));
                pos = hole;
            }
        }
        Ok(out)
    }
}

fn memfd(name: &str) -> Result<File, Error> {
    let cname = std::ffi::CString::new(name).expect("static name has no NUL");
    // SAFETY: cname is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Sizes a file for RAM: a regular file grows to `size`; a device (devdax,
/// pmem) must already be large enough.
fn fit(file: File, path: &Path, size: u64) -> Result<File, Error> {
    let meta = file
        .metadata()
        .map_err(|e| Error::MemFileSize(path.to_path_buf(), e))?;
    if meta.is_file() {
        if meta.len() < size {
            file.set_len(size).map_err(Error::SetSize)?;
        }
    } else {
        let have = device_size(&file).map_err(|e| Error::MemFileSize(path.to_path_buf(), e))?;
        if have < size {
            return Err(Error::MemFileTooSmall(path.to_path_buf(), have, size));
        }
    }
    Ok(file)
}

fn device_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_mapped_as_is_changes_no_file() {
        use std::os::unix::fs::{symlink, FileExt, OpenOptionsExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("molt-map-as-is-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let size = 4 << 20;
        let new = |name: &str, len: u64| {
            let path = dir.join(name);
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap();
            f.set_len(len).unwrap();
            path
        };
        // Missing: not created.
        let missing = dir.join("missing");
        assert!(GuestRam::map_as_is(size, Some(&missing)).is_none());
        assert!(!missing.exists());
        // Too small: not grown (`create` would grow it).
        let small = new("small", size / 2);
        assert!(GuestRam::map_as_is(size, Some(&small)).is_none());
        assert_eq!(std::fs::metadata(&small).unwrap().len(), size / 2);
        // A link, and a file other users may read: left to `create` to refuse.
        let link = dir.join("link");
        symlink(new("target", size), &link).unwrap();
        assert!(GuestRam::map_as_is(size, Some(&link)).is_none());
        let shared = new("shared", size);
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(GuestRam::map_as_is(size, Some(&shared)).is_none());
        // Large enough and private: mapped, its contents the file's.
        let ok = new("ok", size);
        let f = OpenOptions::new().write(true).open(&ok).unwrap();
        f.write_all_at(b"saved", 0).unwrap();
        let ram = GuestRam::map_as_is(size, Some(&ok)).unwrap();
        let mut head = [0u8; 5];
        ram.memory.read_slice(&mut head, GuestAddress(0)).unwrap();
        assert_eq!(&head, b"saved");
        assert_eq!(std::fs::metadata(&ok).unwrap().len(), size);
        // No --mem-file: a memfd.
        assert!(GuestRam::map_as_is(size, None).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn small_ram_is_one_region() {
        assert_eq!(
            ram_regions(256 << 20),
            vec![RamRegion {
                guest_addr: 0,
                size: 256 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_ram_skips_the_mmio_gap() {
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, MMIO_GAP_START);
        assert_eq!(r[1].guest_addr, MMIO_GAP_END);
        assert_eq!(r[1].file_offset, MMIO_GAP_START);
        assert_eq!(r[0].size + r[1].size, 4 << 30);
    }

    #[test]
    fn memfd_ram_is_shared_with_the_file() {
        let ram = GuestRam::create(16 << 20, None).unwrap();
        ram.memory
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        let region = ram.memory.iter().next().unwrap();
        let file = &region.file_offset().unwrap().file();
        std::os::unix::fs::FileExt::read_exact_at(*file, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn populated_ranges_skip_holes() {
        let ram = GuestRam::create(16 << 20, None).unwrap();
        assert!(ram.populated().unwrap().is_empty());
        ram.memory.write_obj(1u8, GuestAddress(0x20_0000)).unwrap();
        let ranges = ram.populated().unwrap();
        assert_eq!(ranges.len(), 1);
        let (off, len) = ranges[0];
        assert!(off <= 0x20_0000 && off + len > 0x20_0000 && len <= 4 << 20);
        assert_eq!(ram.guest_addr(0x1000), Some(GuestAddress(0x1000)));
        assert_eq!(ram.guest_addr(16 << 20), None);
    }

    #[test]
    fn handed_over_memfd_is_adopted_through_proc_self_fd() {
        use std::os::fd::AsRawFd;
        let ram = GuestRam::create(16 << 20, None).unwrap();
        ram.memory
            .write_obj(0x1234_5678u32, GuestAddress(0x2000))
            .unwrap();
        // A memfd has mode 0777 and the path is a link: what `files` refuses.
        let path = PathBuf::from(format!("/proc/self/fd/{}", ram.file().as_raw_fd()));
        let again = GuestRam::adopt(16 << 20, &path).unwrap();
        let got: u32 = again.memory.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(got, 0x1234_5678);
    }

    #[test]
    fn mem_file_grows_to_size() {
        let dir = std::env::temp_dir().join(format!("molt-memtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram");
        let ram = GuestRam::create(8 << 20, Some(&path)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 << 20);
        drop(ram);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
