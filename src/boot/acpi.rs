//! ACPI tables for SMP bring-up, power-off and reset.
//!
//! Builds one blob for guest-physical `layout::ACPI_START`: the RSDP (ACPI 6.5
//! section 5.2.5) first, then the DSDT with the `\_S5_` sleep type (7.4.2) and
//! COM1, a hardware-reduced FADT (5.2.9) whose reset and sleep registers are the
//! one-byte port `layout::ACPI_SLEEP_PORT`, the MADT (5.2.12) that is the only
//! way Debian's cloud kernel (no MP-table support) finds secondary CPUs, and the
//! XSDT (5.2.8) listing FADT and MADT. As in Firecracker and Cloud Hypervisor the
//! platform is hardware-reduced: no PM1/GPE blocks, no SCI, no FACS, so the VMM
//! emulates one port instead of the fixed-hardware register set.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Name, Package, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::layout;

/// Where the guest finds the RSDP: the first byte of the blob.
pub const RSDP_ADDR: u64 = layout::ACPI_START;

const OEM_ID: [u8; 6] = *b"MOLT  ";
const OEM_REVISION: u32 = 1;
/// Every table starts 16-byte aligned, which covers the RSDP's requirement (and
/// Linux's 16-byte-step scan of 0xe0000..0xfffff) and the 8 bytes the others need.
const TABLE_ALIGN: usize = 16;

/// IA-PC boot architecture flags (ACPI 6.5 section 5.2.9.3). There is no VGA and no
/// CMOS RTC behind ports 0x70/0x71, so Linux must not register rtc_cmos; ASPM
/// has no meaning for emulated links. "MSI not supported" (bit 3) stays clear:
/// virtio-pci uses MSI-X. Bit 1 (8042) stays clear as well: molt only decodes
/// the 0x64 reset command, so Linux should not probe a keyboard controller.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel ones).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT header size: the standard header plus local APIC address and flags.
const MADT_HEADER_LEN: u32 = 44;
/// SDT header size: a DSDT is this header followed by AML.
const SDT_HEADER_LEN: u32 = 36;
/// MADT revision of ACPI 6.2-6.4; Linux 6.1 reads every revision alike.
const MADT_REVISION: u8 = 5;
/// DSDT revision 2 makes AML integers 64 bits wide.
const DSDT_REVISION: u8 = 2;

/// The MADT's address fields are 32 bits wide, the COM1 length field 8.
const LAPIC_ADDR: u32 = {
    assert!(layout::APIC_START <= u32::MAX as u64);
    layout::APIC_START as u32
};
const IOAPIC_ADDR: u32 = {
    assert!(layout::IOAPIC_START <= u32::MAX as u64);
    layout::IOAPIC_START as u32
};
const COM1_LEN: u8 = {
    assert!(layout::SERIAL_PORT_LEN <= u8::MAX as u16);
    layout::SERIAL_PORT_LEN as u8
};

/// Builds the tables for `vcpus` processors; the result is copied to `layout::ACPI_START`, RSDP first.
pub fn build(vcpus: u8) -> Vec<u8> {
    // Pointees go in before the tables that point at them, so every address is
    // known when it is written; the RSDP slot at offset 0 is filled in last.
    let mut blob = vec![0; Rsdp::len()];
    let dsdt = append(&mut blob, &dsdt());
    let fadt = append(&mut blob, &fadt(dsdt));
    let madt = append(&mut blob, &madt(vcpus));
    let mut xsdt = XSDT::new(OEM_ID, *b"MOLTXSDT", OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = append(&mut blob, &xsdt);

    let mut rsdp = Vec::with_capacity(Rsdp::len());
    Rsdp::new(OEM_ID, xsdt).to_aml_bytes(&mut rsdp);
    blob[..rsdp.len()].copy_from_slice(&rsdp);
    blob
}

/// Appends `table` at the next aligned offset and returns its guest-physical address.
fn append(blob: &mut Vec<u8>, table: &dyn Aml) -> u64 {
    blob.resize(blob.len().next_multiple_of(TABLE_ALIGN), 0);
    let addr = layout::ACPI_START + blob.len() as u64;
    table.to_aml_bytes(blob);
    addr
}

fn dsdt() -> Sdt {
    // The aml builders borrow their children, so each statement builds and
    // serializes one top-level object while its temporaries are alive.
    let mut body = Vec::new();
    // Linux takes the S5 sleep type from the first element, writes
    // (SLP_TYP << 2) | SLP_EN to the sleep control register and expects to stop.
    Name::new(
        "_S5_".into(),
        &Package::new(vec![
            &layout::ACPI_S5_TYPE,
            &aml::ZERO,
            &aml::ZERO,
            &aml::ZERO,
        ]),
    )
    .to_aml_bytes(&mut body);
    // Declaring COM1 lets the 8250 PNP driver bind it with the right IRQ, as on
    // QEMU and Cloud Hypervisor, instead of relying on the legacy port probe.
    Scope::new(
        "\\_SB_".into(),
        vec![
            &Device::new(
                "COM1".into(),
                vec![
                    &Name::new("_HID".into(), &EISAName::new("PNP0501")),
                    &Name::new("_UID".into(), &aml::ZERO),
                    &Name::new(
                        "_CRS".into(),
                        &ResourceTemplate::new(vec![
                            &IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 0, COM1_LEN),
                            // Consumer, edge-triggered, active-high, exclusive: an ISA IRQ.
                            &Interrupt::new(true, true, false, false, layout::SERIAL_IRQ),
                        ]),
                    ),
                ],
            ),
            // The PCI root bridge: without it an ACPI kernel never scans bus 0. Plain
            // PCI (PNP0A03) on config mechanism 1, so there is no MCFG and no _OSC.
            &Device::new(
                "PCI0".into(),
                vec![
                    &Name::new("_HID".into(), &EISAName::new("PNP0A03")),
                    &Name::new("_UID".into(), &aml::ZERO),
                    &Name::new("_SEG".into(), &aml::ZERO),
                    &Name::new("_BBN".into(), &aml::ZERO),
                    &Name::new(
                        "_CRS".into(),
                        &ResourceTemplate::new(vec![
                            &aml::AddressSpace::new_bus_number(0u16, 0u16),
                            &IO::new(layout::PCI_CONFIG_PORT, layout::PCI_CONFIG_PORT, 1, 8),
                            &aml::AddressSpace::new_memory(
                                aml::AddressSpaceCacheable::NotCacheable,
                                true,
                                layout::PCI_MMIO_START as u32,
                                (layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE - 1) as u32,
                                None,
                            ),
                        ]),
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"MOLTDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt
}

fn fadt(dsdt: u64) -> impl Aml {
    let port = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::ACPI_SLEEP_PORT),
    );
    // FADTBuilder::new makes an ACPI 6.5 FADT (revision 6.5, 276 bytes), which
    // ACPICA in Linux 6.1 parses in full. PWR_BUTTON and SLP_BUTTON say there
    // are no fixed-feature buttons; WBINVD is required of every post-1.0 system.
    let mut fadt = FADTBuilder::new(OEM_ID, *b"MOLTFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .flag(Flags::HwReducedAcpi);
    // Ignored by a hardware-reduced OSPM, but harmless and what the layout names.
    fadt.sci_int = layout::ACPI_SCI_IRQ.into();
    fadt.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.reset_reg = port;
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    // Linux only offers ACPI power-off on a hardware-reduced machine when both
    // sleep registers exist; it writes WAK_STS (0x80) to the status register
    // before the sleep command, so sharing one port is fine (decoded as None).
    fadt.sleep_control_reg = port;
    fadt.sleep_status_reg = port;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"MOLTVMM ").into();
    fadt.finalize()
}

fn madt(vcpus: u8) -> Sdt {
    // acpi_tables' MADT cannot set PCAT_COMPAT and has no local APIC NMI
    // entries (adding them needs zerocopy derives), so
    // the table is assembled on its generic Sdt, reusing its x86 entry structs.
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"MOLTAPIC",
        OEM_REVISION,
    );
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut entries = Vec::new();
    for id in 0..vcpus {
        // The UID only has to be unique; there are no processor objects to match.
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(0, IOAPIC_ADDR, 0).to_aml_bytes(&mut entries);
    // No interrupt source override: KVM's default routing wires ISA IRQ n to
    // IOAPIC pin n (the PIT included), which is what Linux assumes without one.
    // Local APIC NMI (5.2.12.7): LINT1 of all processors (UID 0xff) carries NMI.
    entries.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.append_slice(&entries);
    madt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// The table at guest address `addr`, checked to lie inside the blob.
    fn table(blob: &[u8], addr: u64) -> &[u8] {
        assert!(addr >= layout::ACPI_START, "{addr:#x} below the blob");
        let off = (addr - layout::ACPI_START) as usize;
        assert_eq!(off % 8, 0, "table at {addr:#x} not 8-byte aligned");
        let len = u32_at(blob, off + 4) as usize;
        assert!(
            off + len <= blob.len(),
            "table at {addr:#x} overruns the blob"
        );
        &blob[off..off + len]
    }

    fn xsdt(blob: &[u8]) -> &[u8] {
        table(blob, u64_at(blob, 24))
    }

    /// The XSDT entry with signature `sig`.
    fn find(blob: &[u8], sig: &[u8; 4]) -> Vec<u8> {
        let xsdt = xsdt(blob);
        let mut found = (36..xsdt.len())
            .step_by(8)
            .map(|off| table(blob, u64_at(xsdt, off)))
            .filter(|t| &t[..4] == sig);
        let t = found.next().expect("table missing from the XSDT").to_vec();
        assert!(found.next().is_none(), "table listed twice");
        t
    }

    fn dsdt(blob: &[u8]) -> &[u8] {
        table(blob, u64_at(&find(blob, b"FACP"), 140))
    }

    #[test]
    fn rsdp_is_first_with_both_checksums() {
        let blob = build(2);
        assert_eq!(RSDP_ADDR % 16, 0);
        assert_eq!(&blob[..8], b"RSD PTR ");
        assert_eq!(blob[15], 2, "revision");
        assert_eq!(u32_at(&blob, 20), 36, "length");
        assert_eq!(sum(&blob[..20]), 0);
        assert_eq!(sum(&blob[..36]), 0);
        assert_eq!(u32_at(&blob, 16), 0, "no RSDT");
    }

    #[test]
    fn xsdt_lists_fadt_and_madt() {
        let blob = build(4);
        let xsdt = xsdt(&blob);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let sigs: Vec<&[u8]> = (36..xsdt.len())
            .step_by(8)
            .map(|off| &table(&blob, u64_at(xsdt, off))[..4])
            .collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
    }

    #[test]
    fn every_table_checksums_to_zero() {
        for vcpus in [1, 2, 7, 32] {
            let blob = build(vcpus);
            assert_eq!(sum(xsdt(&blob)), 0, "XSDT");
            assert_eq!(sum(&find(&blob, b"FACP")), 0, "FADT");
            assert_eq!(sum(&find(&blob, b"APIC")), 0, "MADT");
            assert_eq!(sum(dsdt(&blob)), 0, "DSDT");
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_reset_and_sleep_registers() {
        let blob = build(1);
        let fadt = find(&blob, b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT version 6.5");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let boot_arch = u16_at(&fadt, 109);
        assert_eq!(boot_arch & (1 << 3), 0, "MSI must stay usable");
        assert_ne!(boot_arch & (1 << 2), 0, "no VGA");
        let port = u64::from(layout::ACPI_SLEEP_PORT);
        // Reset register, sleep control, sleep status: SystemIO, 8 bits, byte access.
        for off in [116, 244, 256] {
            assert_eq!(&fadt[off..off + 4], &[1, 8, 0, 1], "GAS at {off}");
            assert_eq!(u64_at(&fadt, off + 4), port, "GAS at {off}");
        }
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
        assert_eq!(u32_at(&fadt, 40), 0, "32-bit DSDT pointer unused");
        assert_eq!(&dsdt(&blob)[..4], b"DSDT");
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu() {
        for vcpus in [1u8, 2, 5, layout::MAX_VCPUS as u8] {
            let blob = build(vcpus);
            let madt = find(&blob, b"APIC");
            assert_eq!(u32_at(&madt, 36) as u64, layout::APIC_START);
            assert_eq!(u32_at(&madt, 40), MADT_PCAT_COMPAT);
            let (mut lapics, mut ioapics, mut isos, mut nmis) = (vec![], vec![], vec![], vec![]);
            let mut off = 44;
            while off < madt.len() {
                let e = &madt[off..off + madt[off + 1] as usize];
                match e[0] {
                    0 => lapics.push(e.to_vec()),
                    1 => ioapics.push(e.to_vec()),
                    2 => isos.push(e.to_vec()),
                    4 => nmis.push(e.to_vec()),
                    t => panic!("unexpected MADT entry type {t}"),
                }
                off += e.len();
            }
            assert_eq!(off, madt.len(), "entries fill the table exactly");
            assert_eq!(lapics.len(), vcpus as usize);
            for (i, e) in lapics.iter().enumerate() {
                assert_eq!(e.len(), 8);
                assert_eq!(e[3] as usize, i, "APIC id");
                assert_eq!(u32_at(e, 4), 1, "enabled");
            }
            assert_eq!(ioapics.len(), 1);
            assert_eq!(ioapics[0][2], 0, "IOAPIC id");
            assert_eq!(u32_at(&ioapics[0], 4) as u64, layout::IOAPIC_START);
            assert_eq!(u32_at(&ioapics[0], 8), 0, "GSI base");
            assert!(isos.is_empty(), "IRQ n is GSI n: no overrides");
            assert_eq!(nmis, [vec![4, 6, 0xff, 0, 0, 1]]);
        }
    }

    #[test]
    fn dsdt_announces_s5_sleep_type() {
        let blob = build(1);
        let dsdt = dsdt(&blob);
        assert_eq!(dsdt[8], DSDT_REVISION);
        let at = dsdt
            .windows(4)
            .position(|w| w == b"_S5_")
            .expect("_S5_ missing");
        // PackageOp, PkgLength, NumElements 4, BytePrefix ACPI_S5_TYPE.
        assert_eq!(dsdt[at + 4], 0x12);
        assert_eq!(&dsdt[at + 6..at + 9], &[4, 0x0a, layout::ACPI_S5_TYPE]);
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
    }

    #[test]
    fn blob_fits_below_acpi_end_with_max_vcpus() {
        let blob = build(layout::MAX_VCPUS as u8);
        assert!(layout::ACPI_START + blob.len() as u64 <= layout::ACPI_END);
    }
}
