//! Loading a guest: kernel (bzImage or PVH ELF), initrd, command line, the memory
//! map and the ACPI tables. Produces the entry point for the boot vCPU.

pub mod acpi;
mod bzimage;
mod pvh;

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::{elf::Elf, elf::PvhBootCapability, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{
    ACPI_END, ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START,
};

/// Where the boot vCPU starts, and which protocol it expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit Linux boot protocol: long mode, RSI = zero page.
    Linux64 { rip: u64, zero_page: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = start info.
    Pvh { rip: u64, start_info: u64 },
}

#[derive(Debug)]
pub enum Error {
    OpenKernel(PathBuf, std::io::Error),
    NotAKernel(PathBuf),
    LoadKernel(PathBuf, linux_loader::loader::Error),
    NoPvhEntry(PathBuf),
    OpenInitrd(PathBuf, std::io::Error),
    InitrdTooLarge(PathBuf, u64),
    Cmdline(&'static str),
    Write(&'static str, vm_memory::GuestMemoryError),
    BootParams(linux_loader::configurator::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OpenKernel(p, e) => write!(f, "cannot open --kernel {}: {e}", p.display()),
            Error::NotAKernel(p) => write!(
                f,
                "--kernel {} is neither a bzImage nor an ELF vmlinux",
                p.display()
            ),
            Error::LoadKernel(p, e) => write!(f, "cannot load --kernel {}: {e}", p.display()),
            Error::NoPvhEntry(p) => write!(
                f,
                "--kernel {} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)",
                p.display()
            ),
            Error::OpenInitrd(p, e) => write!(f, "cannot read --initrd {}: {e}", p.display()),
            Error::InitrdTooLarge(p, n) => write!(
                f,
                "--initrd {} ({n} bytes) does not fit in guest RAM below 4 GiB",
                p.display()
            ),
            Error::Cmdline(why) => write!(f, "bad --cmdline: {why}"),
            Error::Write(what, e) => write!(f, "cannot write {what} into guest RAM: {e}"),
            // The configurator's own message is generic; its source names the part.
            Error::BootParams(e) => match std::error::Error::source(e) {
                Some(why) => write!(f, "cannot write the boot parameters: {why}"),
                None => write!(f, "cannot write the boot parameters: {e}"),
            },
        }
    }
}

/// What the VMM asks the loader to place in guest memory.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub vcpus: u8,
}

/// The initrd's place in guest memory.
#[derive(Debug, Clone, Copy)]
struct Initrd {
    addr: u64,
    size: u64,
}

enum KernelKind {
    BzImage,
    Elf,
}

fn kernel_kind(path: &Path, file: &mut File) -> Result<KernelKind, Error> {
    let mut head = [0u8; 0x206];
    let n = read_up_to(file, &mut head).map_err(|e| Error::OpenKernel(path.into(), e))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelKind::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelKind::BzImage)
    } else {
        Err(Error::NotAKernel(path.into()))
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads everything for `spec` into `mem` and returns where the boot vCPU starts.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<Entry, Error> {
    let path = spec.kernel;
    let mut file = File::open(path).map_err(|e| Error::OpenKernel(path.into(), e))?;
    let kind = kernel_kind(path, &mut file)?;
    let load_err = |e| Error::LoadKernel(path.into(), e);
    let high = Some(GuestAddress(HIMEM_START));

    write_cmdline(mem, spec.cmdline)?;
    let tables = acpi::build(spec.vcpus);
    debug_assert!(ACPI_START + tables.len() as u64 <= ACPI_END);
    mem.write_slice(&tables, GuestAddress(ACPI_START))
        .map_err(|e| Error::Write("ACPI tables", e))?;

    match kind {
        KernelKind::BzImage => {
            let loaded = BzImage::load(mem, None, &mut file, high).map_err(load_err)?;
            let hdr = loaded.setup_header.ok_or(Error::NotAKernel(path.into()))?;
            let initrd = load_initrd(mem, spec, u64::from(hdr.initrd_addr_max))?;
            bzimage::write_zero_page(mem, hdr, spec.cmdline, initrd)
        }
        KernelKind::Elf => {
            let loaded = Elf::load(mem, None, &mut file, high).map_err(load_err)?;
            let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
                return Err(Error::NoPvhEntry(path.into()));
            };
            let initrd = load_initrd(mem, spec, u64::from(u32::MAX))?;
            pvh::write_start_info(mem, entry.0, initrd)
        }
    }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), Error> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::Cmdline("longer than 64 KiB"));
    }
    if cmdline.contains('\0') {
        return Err(Error::Cmdline("contains a NUL byte"));
    }
    let at = GuestAddress(CMDLINE_START);
    mem.write_slice(cmdline.as_bytes(), at)
        .and_then(|()| mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64)))
        .map_err(|e| Error::Write("the command line", e))
}

/// Places the initrd page-aligned at the top of low RAM, below `addr_max`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    addr_max: u64,
) -> Result<Option<Initrd>, Error> {
    let Some(path) = spec.initrd else {
        return Ok(None);
    };
    let mut file = File::open(path).map_err(|e| Error::OpenInitrd(path.into(), e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::OpenInitrd(path.into(), e))?
        .len();
    let low_ram = mem.iter().next().map_or(0, |r| r.len());
    let low_end = low_ram.min(addr_max.saturating_add(1));
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIMEM_START)
        .ok_or(Error::InitrdTooLarge(path.into(), size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::Write("the initrd", e))?;
    Ok(Some(Initrd { addr, size }))
}

/// The E820-style RAM map both protocols hand over: low RAM below the EBDA, then
/// everything from 1 MiB up, around the MMIO gap.
fn ram_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for r in mem.iter() {
        let start = r.start_addr().0.max(HIMEM_START);
        let end = r.start_addr().0 + r.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_map_skips_bios_area_and_gap() {
        // RAM below and above the MMIO gap; small, so the test maps little.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 << 20),
            (GuestAddress(1 << 32), 16 << 20),
        ])
        .unwrap();
        let map = ram_map(&mem);
        assert_eq!(map[0], (0, 0x9fc00));
        assert_eq!(map[1], (HIMEM_START, (16 << 20) - HIMEM_START));
        assert_eq!(map[2], (1 << 32, 16 << 20));
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn text_file_is_not_a_kernel() {
        let path = std::env::temp_dir().join(format!("molt-notkernel-{}", std::process::id()));
        std::fs::write(&path, b"hello, I am not a kernel\n").unwrap();
        let mut f = File::open(&path).unwrap();
        assert!(matches!(
            kernel_kind(&path, &mut f),
            Err(Error::NotAKernel(_))
        ));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn cmdline_is_bounded_and_nul_terminated() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let end: u8 = mem.read_obj(GuestAddress(CMDLINE_START + 13)).unwrap();
        assert_eq!(end, 0);
        assert!(write_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
        assert!(write_cmdline(&mem, "a\0b").is_err());
    }
}
