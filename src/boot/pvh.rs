//! The PVH start-info block (`hvm_start_info`, Xen `arch-x86/hvm/start_info.h`):
//! command line, initrd as module 0, memory map and RSDP for an ELF kernel's
//! 32-bit PVH entry point.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{acpi, ram_map, Entry, Error, Initrd};
use crate::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const MEMMAP_TYPE_RAM: u32 = 1;

pub(super) fn write_start_info(
    mem: &GuestMemoryMmap,
    entry: u64,
    initrd: Option<Initrd>,
) -> Result<Entry, Error> {
    let write_err = |e| Error::Write("the PVH start info", e);
    let map = ram_map(mem);
    let mut addr = PVH_MEMMAP_START;
    for &(base, size) in &map {
        let e = hvm_memmap_table_entry {
            addr: base,
            size,
            type_: MEMMAP_TYPE_RAM,
            reserved: 0,
        };
        mem.write_obj(e, GuestAddress(addr)).map_err(write_err)?;
        addr += std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: acpi::RSDP_ADDR,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(i) = initrd {
        let module = hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(addr))
            .map_err(write_err)?;
        info.nr_modules = 1;
        info.modlist_paddr = addr;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(write_err)?;
    Ok(Entry::Pvh {
        rip: entry,
        start_info: PVH_INFO_START,
    })
}
