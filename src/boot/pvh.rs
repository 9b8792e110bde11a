//! The PVH start-info block (`hvm_start_info`, Xen `arch-x86/hvm/start_info.h`):
//! command line, initrd as module 0, memory map and RSDP for an ELF kernel's
//! 32-bit PVH entry point.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{acpi, ram_map, Entry, Error, Initrd};
use crate::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const MEMMAP_TYPE_RAM: u32 = 1;

pub(super) fn write_start_info(
    mem: &GuestMemoryMmap,
    entry: u64,
    initrd: Option<Initrd>,
) -> Result<Entry, Error> {
    let memmap: Vec<hvm_memmap_table_entry> = ram_map(mem)
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: MEMMAP_TYPE_RAM,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: acpi::RSDP_ADDR,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    // The module list follows the memory map.
    let modlist_paddr = PVH_MEMMAP_START + std::mem::size_of_val(memmap.as_slice()) as u64;
    let module = initrd.map(|i| hvm_modlist_entry {
        paddr: i.addr,
        size: i.size,
        ..Default::default()
    });
    if module.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_paddr;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(m) = module {
        params.set_modules(&[m], GuestAddress(modlist_paddr));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::BootParams)?;
    Ok(Entry::Pvh {
        rip: entry,
        start_info: PVH_INFO_START,
    })
}
