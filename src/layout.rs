//! The guest-physical address map, I/O ports, interrupt lines and capacities.
//!
//! Everything here is fixed: a saved state never needs to record where a table or
//! a device lives, because every release puts them in the same place.

/// Top of the boot GDT (three flat descriptors: null, code, data, plus TSS).
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT loaded at boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries directly after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux zero page (`boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, then 4 PDs.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line, at most `CMDLINE_MAX_SIZE` bytes including the NUL.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the EBDA: low memory usable by the guest ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Kernels load here (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

/// Guest RAM below 4 GiB ends here; the gap above holds MMIO, the IOAPIC and LAPIC.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// PCI memory window for BARs, at the bottom of the MMIO gap.
pub const PCI_MMIO_START: u64 = MMIO_GAP_START;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;

/// PCI configuration mechanism 1: address at 0xcf8, data at 0xcfc..0xcff.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
/// Device slots on bus 0; slot 0 is the host bridge.
pub const MAX_PCI_SLOTS: usize = 32;
/// First GSI for MSI routes: 0..24 are the IOAPIC's pins.
pub const MSI_GSI_START: u32 = 24;
/// MSI routes available to devices (KVM allows 4096 routes in all).
pub const MAX_MSI_GSIS: u32 = 1024;

/// 16550 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// The FADT reset register (one byte port). Guests booted by releases before
/// ACPI S3 support, whose FADT was hardware-reduced, also use it as their sleep
/// control and status register.
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// Value written to `ACPI_SLEEP_PORT` to reset (FADT reset value).
pub const ACPI_RESET_VALUE: u8 = 1;
/// ACPI fixed-hardware PM1a event block: status, then enable, 16 bits each.
pub const ACPI_PM1_EVT_PORT: u16 = 0x604;
pub const ACPI_PM1_EVT_LEN: u8 = 4;
/// ACPI fixed-hardware PM1a control register (16 bits): SCI_EN, SLP_TYP, SLP_EN.
pub const ACPI_PM1_CNT_PORT: u16 = 0x608;
pub const ACPI_PM1_CNT_LEN: u8 = 2;
/// Sleep types the DSDT's `\_S3_` (suspend to RAM) and `\_S5_` (soft off)
/// objects announce: the SLP_TYP values the guest writes to enter them.
pub const ACPI_S3_TYPE: u8 = 3;
pub const ACPI_S5_TYPE: u8 = 5;
/// SCI interrupt announced in the FADT (molt raises no ACPI event).
pub const ACPI_SCI_IRQ: u16 = 9;
/// The FACS (64 bytes, 64-byte aligned), where the guest leaves its waking
/// vector: the first table after the RSDP.
pub const ACPI_FACS_START: u64 = ACPI_START + 0x40;
/// Page tables for entering a 64-bit waking vector (PML4, PDPT, PD), at the
/// top of the ACPI area, which the memory map keeps from the guest's RAM.
pub const WAKE_PML4_START: u64 = ACPI_END - 0x3000;
pub const WAKE_PDPT_START: u64 = ACPI_END - 0x2000;
pub const WAKE_PD_START: u64 = ACPI_END - 0x1000;
/// i8042 command port; 0xfe written here is the legacy keyboard-controller reset.
pub const I8042_PORT: u16 = 0x64;

/// Device limits: argv refuses more.
pub const MAX_DISKS: usize = 8;
pub const MAX_NICS: usize = 4;
pub const MAX_VFIO_DEVICES: usize = 4;
/// Most interrupt eventfds (two per vector) of all passed-through devices
/// that an exec or transfer hands over: with the other descriptors, one
/// SCM_RIGHTS message's 253 must hold them all.
pub const MAX_VFIO_EVENTFDS: usize = 128;

/// KVM memslots: guest RAM uses 0 and 1 (below and above the MMIO gap);
/// passed-through devices' BARs use `vfio::device::MEMSLOTS` each from here.
pub const VFIO_MEMSLOT_START: u32 = 8;

/// vCPU limit: argv accepts 1..=MAX_VCPUS.
pub const MAX_VCPUS: usize = 32;

/// Below this a Linux guest cannot even decompress itself; tiny guests fit easily.
pub const MIN_MEM: u64 = 16 << 20;
