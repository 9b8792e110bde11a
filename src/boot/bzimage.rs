//! The zero page (`struct boot_params`) for Linux's 64-bit boot protocol
//! (`Documentation/arch/x86/boot.rst`, "64-bit Boot Protocol").

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{acpi, ram_map, Entry, Error, Initrd};
use crate::layout::{CMDLINE_START, ZERO_PAGE_START};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;

pub(super) fn write_zero_page(
    mem: &GuestMemoryMmap,
    mut hdr: setup_header,
    cmdline: &str,
    initrd: Option<Initrd>,
) -> Result<Entry, Error> {
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    if let Some(i) = initrd {
        hdr.ramdisk_image = i.addr as u32;
        hdr.ramdisk_size = i.size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: acpi::RSDP_ADDR,
        ..Default::default()
    };
    let map = ram_map(mem);
    for (slot, &(addr, size)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    let zero_page = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&zero_page, mem).map_err(Error::BootParams)?;
    Ok(Entry::Linux64 {
        rip: u64::from(hdr.code32_start) + STARTUP_64_OFFSET,
        zero_page: ZERO_PAGE_START,
    })
}
