//! ACPI tables for SMP bring-up, power-off, reset and suspend to RAM, and the
//! firmware's side of waking from it.
//!
//! Builds one blob for guest-physical `layout::ACPI_START`: the RSDP (ACPI 6.5
//! section 5.2.5) first, then the FACS (5.2.10) at `layout::ACPI_FACS_START`,
//! the DSDT with the `\_S3_` and `\_S5_` sleep types (7.4.2) and COM1, the
//! FADT (5.2.9), the MADT (5.2.12) that is the only way Debian's cloud kernel
//! (no MP-table support) finds secondary CPUs, and the XSDT (5.2.8) listing
//! FADT and MADT.
//!
//! The FADT describes fixed hardware: PM1a event and control registers
//! (`devices::power`) and the FACS, where the guest leaves its waking vector
//! for S3. It used to be hardware-reduced, as in Firecracker and Cloud
//! Hypervisor, but Linux before 6.10 ignores the FACS of a hardware-reduced
//! machine (ACPICA `acpi_tb_initialize_facs`), so it would never say where to
//! resume. There is still no SCI source, GPE block or PM timer. `waking`
//! decodes the FACS as firmware does on the way out of S3.
use std::fmt;

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Name, Package, ResourceTemplate, Scope, IO,
};
use acpi_tables::facs::FACS;
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

/// FACS layout (ACPI 6.5 table 5.14): its length, and the offsets and flags
/// the waking firmware reads.
pub const FACS_LEN: usize = 64;
const FACS_ALIGN: usize = 64;
/// FACS version 2 has the X_Firmware_Waking_Vector and OSPM flags.
const FACS_VERSION: u8 = 2;
const FACS_WAKING_VECTOR: usize = 12;
const FACS_X_WAKING_VECTOR: usize = 24;
const FACS_VERSION_AT: usize = 32;
const FACS_OSPM_FLAGS: usize = 36;
/// FACS flag: the firmware can enter a waking vector in 64-bit mode.
const FACS_64BIT_WAKE_SUPPORTED: u32 = 1 << 1;
/// OSPM flag: the X_Firmware_Waking_Vector wants 64-bit mode.
const OSPM_64BIT_WAKE: u32 = 1 << 0;

/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel ones).
const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags of the SCI's interrupt source override: active high, level
/// triggered, as QEMU declares it (molt never raises it).
const SCI_INTI_FLAGS: u16 = 0x1 | 0x3 << 2;
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
    let facs = append_aligned(&mut blob, &facs(), FACS_ALIGN);
    debug_assert_eq!(facs, layout::ACPI_FACS_START);
    let dsdt = append(&mut blob, &dsdt());
    let fadt = append(&mut blob, &fadt(dsdt, facs));
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
    append_aligned(blob, table, TABLE_ALIGN)
}

fn append_aligned(blob: &mut Vec<u8>, table: &dyn Aml, align: usize) -> u64 {
    blob.resize(blob.len().next_multiple_of(align), 0);
    let addr = layout::ACPI_START + blob.len() as u64;
    table.to_aml_bytes(blob);
    addr
}

fn facs() -> FACS {
    let mut facs = FACS::new();
    facs.version = FACS_VERSION;
    facs.flags = FACS_64BIT_WAKE_SUPPORTED.into();
    facs
}

fn dsdt() -> Sdt {
    // The aml builders borrow their children, so each statement builds and
    // serializes one top-level object while its temporaries are alive.
    let mut body = Vec::new();
    // Linux takes a sleep type from the first element and writes it as SLP_TYP,
    // with SLP_EN, to PM1a control. It offers S3 (`mem` in /sys/power/state)
    // because `\_S3_` exists.
    for (name, typ) in [
        ("_S3_", layout::ACPI_S3_TYPE),
        ("_S5_", layout::ACPI_S5_TYPE),
    ] {
        Name::new(
            name.into(),
            &Package::new(vec![&typ, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
        )
        .to_aml_bytes(&mut body);
    }
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

fn fadt(dsdt: u64, facs: u64) -> impl Aml {
    let port = |bits: u8, access: AccessSize, port: u16| {
        GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
    };
    // FADTBuilder::new makes an ACPI 6.5 FADT (revision 6.5, 276 bytes), which
    // ACPICA in Linux 6.1 parses in full. PWR_BUTTON and SLP_BUTTON say there
    // are no fixed-feature buttons; WBINVD is required of every post-1.0 system.
    let mut fadt = FADTBuilder::new(OEM_ID, *b"MOLTFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        .flag(Flags::Wbinvd)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    // SMI_CMD stays 0: always in ACPI mode. Nothing ever raises the SCI.
    fadt.sci_int = layout::ACPI_SCI_IRQ.into();
    fadt.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.reset_reg = port(8, AccessSize::ByteAccess, layout::ACPI_SLEEP_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    // The PM1a blocks, in both the 32-bit and the GAS fields: ACPICA warns
    // when they disagree. No PM1b, PM2, PM timer or GPE blocks (all optional).
    // Their registers are 16 bits wide.
    let block = |at: u16, len: u8| {
        let gas = port(8 * len, AccessSize::WordAccess, at);
        (u32::from(at).into(), len, gas)
    };
    (fadt.pm1a_evt_blk, fadt.pm1_evt_len, fadt.x_pm1a_evt_blk) =
        block(layout::ACPI_PM1_EVT_PORT, layout::ACPI_PM1_EVT_LEN);
    (fadt.pm1a_cnt_blk, fadt.pm1_cnt_len, fadt.x_pm1a_cnt_blk) =
        block(layout::ACPI_PM1_CNT_PORT, layout::ACPI_PM1_CNT_LEN);
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
    // KVM's default routing wires ISA IRQ n to IOAPIC pin n (the PIT
    // included), which is what Linux assumes without an override. The SCI
    // gets one (5.2.12.5), as on QEMU: without it Linux would program its pin
    // active-low, which is not how molt would drive it.
    let sci = u32::from(layout::ACPI_SCI_IRQ);
    entries.extend_from_slice(&[2, 10, 0, sci as u8]);
    entries.extend_from_slice(&sci.to_le_bytes());
    entries.extend_from_slice(&SCI_INTI_FLAGS.to_le_bytes());
    // Local APIC NMI (5.2.12.7): LINT1 of all processors (UID 0xff) carries NMI.
    entries.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.append_slice(&entries);
    madt
}

/// How firmware enters the guest's waking vector on the way out of S3 (ACPI
/// 6.5 section 5.2.10: the FACS Firmware_Waking_Vector and
/// X_Firmware_Waking_Vector fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waking {
    /// The 32-bit vector, below 1 MiB: real mode at CS:IP = vector >> 4 :
    /// vector & 0xf. Linux's x86 wakeup trampoline starts this way.
    RealMode { segment: u16, offset: u16 },
    /// The 64-bit vector, 64BIT_WAKE_F clear: 32-bit protected mode, flat
    /// segments, paging off.
    Protected { eip: u32 },
    /// The 64-bit vector, 64BIT_WAKE_F set: 64-bit mode, flat segments, the
    /// vector's page identity-mapped.
    Long { rip: u64 },
}

impl Waking {
    /// The guest-physical address entered.
    pub fn address(self) -> u64 {
        match self {
            Waking::RealMode { segment, offset } => (u64::from(segment) << 4) + u64::from(offset),
            Waking::Protected { eip } => u64::from(eip),
            Waking::Long { rip } => rip,
        }
    }
}

impl fmt::Display for Waking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Waking::RealMode { segment, offset } => write!(
                f,
                "real mode at {segment:04x}:{offset:04x} ({:#x})",
                self.address()
            ),
            Waking::Protected { eip } => write!(f, "32-bit protected mode at {eip:#x}"),
            Waking::Long { rip } => write!(f, "64-bit mode at {rip:#x}"),
        }
    }
}

/// Why the FACS holds no usable waking vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WakeError {
    /// The guest overwrote the FACS header (or, booted by an earlier release,
    /// has no FACS there).
    Damaged { signature: [u8; 4], length: u32 },
    /// Both vectors are zero: the guest did not say where to resume.
    NoVector,
    /// A real-mode vector must lie below 1 MiB.
    RealModeAbove1MiB(u32),
    /// A 32-bit protected-mode vector must lie below 4 GiB.
    ProtectedAbove4GiB(u64),
}

impl fmt::Display for WakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WakeError::Damaged { signature, length } => write!(
                f,
                "the FACS at {:#x} is damaged (signature {:?}, length {length})",
                layout::ACPI_FACS_START,
                String::from_utf8_lossy(signature)
            ),
            WakeError::NoVector => write!(
                f,
                "the guest left no waking vector in its FACS (both are zero)"
            ),
            WakeError::RealModeAbove1MiB(v) => write!(
                f,
                "the FACS waking vector {v:#x} is not below 1 MiB, so real mode cannot reach it"
            ),
            WakeError::ProtectedAbove4GiB(v) => write!(
                f,
                "the FACS 64-bit waking vector {v:#x} asks for 32-bit mode but is not below 4 GiB"
            ),
        }
    }
}

/// Decodes the FACS as firmware does when the machine wakes: the 64-bit
/// vector if the FACS has one (version 1 and up) and it is non-zero, else
/// the 32-bit one. The guest may have written anything here: every field is
/// checked. Whether the vector lies in guest RAM is the caller's to check.
pub fn waking(facs: &[u8; FACS_LEN]) -> Result<Waking, WakeError> {
    let u32_at =
        |at: usize| u32::from_le_bytes([facs[at], facs[at + 1], facs[at + 2], facs[at + 3]]);
    let length = u32_at(4);
    let signature = [facs[0], facs[1], facs[2], facs[3]];
    if &signature != b"FACS" || (length as usize) < FACS_LEN {
        return Err(WakeError::Damaged { signature, length });
    }
    let version = facs[FACS_VERSION_AT];
    let x = if version >= 1 {
        u64::from(u32_at(FACS_X_WAKING_VECTOR)) | u64::from(u32_at(FACS_X_WAKING_VECTOR + 4)) << 32
    } else {
        0
    };
    if x != 0 {
        // The OSPM flags came with version 2; molt's FACS offers 64-bit wake.
        let ospm = if version >= 2 {
            u32_at(FACS_OSPM_FLAGS)
        } else {
            0
        };
        if ospm & OSPM_64BIT_WAKE != 0 {
            return Ok(Waking::Long { rip: x });
        }
        let eip = u32::try_from(x).map_err(|_| WakeError::ProtectedAbove4GiB(x))?;
        return Ok(Waking::Protected { eip });
    }
    match u32_at(FACS_WAKING_VECTOR) {
        0 => Err(WakeError::NoVector),
        v if v >= 1 << 20 => Err(WakeError::RealModeAbove1MiB(v)),
        v => Ok(Waking::RealMode {
            segment: (v >> 4) as u16,
            offset: (v & 0xf) as u16,
        }),
    }
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
    fn fadt_has_pm1_blocks_the_facs_and_the_reset_register() {
        let blob = build(1);
        let fadt = find(&blob, b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT version 6.5");
        let flags = u32_at(&fadt, 112);
        assert_eq!(
            flags & (1 << 20),
            0,
            "not HW_REDUCED_ACPI: Linux 6.1 would ignore the FACS"
        );
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let boot_arch = u16_at(&fadt, 109);
        assert_eq!(boot_arch & (1 << 3), 0, "MSI must stay usable");
        assert_ne!(boot_arch & (1 << 2), 0, "no VGA");
        // Reset register: SystemIO, 8 bits, byte access.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 120), u64::from(layout::ACPI_SLEEP_PORT));
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
        // PM1a event (4 bytes) and control (2 bytes), 32-bit and GAS fields alike.
        assert_eq!(u32_at(&fadt, 56), u32::from(layout::ACPI_PM1_EVT_PORT));
        assert_eq!(u32_at(&fadt, 64), u32::from(layout::ACPI_PM1_CNT_PORT));
        assert_eq!((fadt[88], fadt[89]), (4, 2), "PM1_EVT_LEN, PM1_CNT_LEN");
        assert_eq!(&fadt[148..152], &[1, 32, 0, 2], "X_PM1a_EVT_BLK");
        assert_eq!(u64_at(&fadt, 152), u64::from(layout::ACPI_PM1_EVT_PORT));
        assert_eq!(&fadt[172..176], &[1, 16, 0, 2], "X_PM1a_CNT_BLK");
        assert_eq!(u64_at(&fadt, 176), u64::from(layout::ACPI_PM1_CNT_PORT));
        // No SMI_CMD (always in ACPI mode), PM1b, PM timer or GPE block.
        assert_eq!(u32_at(&fadt, 48), 0, "SMI_CMD");
        for off in [60, 68, 76, 80, 84] {
            assert_eq!(u32_at(&fadt, off), 0, "block at {off}");
        }
        // The FACS through X_FIRMWARE_CTRL only; the hardware-reduced sleep
        // registers are unused.
        assert_eq!(u32_at(&fadt, 36), 0, "32-bit FIRMWARE_CTRL unused");
        assert_eq!(
            u64_at(&fadt, 132),
            layout::ACPI_FACS_START,
            "X_FIRMWARE_CTRL"
        );
        assert_eq!(u32_at(&fadt, 40), 0, "32-bit DSDT pointer unused");
        assert_eq!(&fadt[244..268], &[0; 24], "sleep control and status");
        assert_eq!(&dsdt(&blob)[..4], b"DSDT");
    }

    #[test]
    fn facs_is_aligned_empty_and_offers_64_bit_wake() {
        let blob = build(2);
        let at = (layout::ACPI_FACS_START - layout::ACPI_START) as usize;
        assert_eq!(layout::ACPI_FACS_START % 64, 0);
        let facs: [u8; FACS_LEN] = blob[at..at + FACS_LEN].try_into().unwrap();
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(&facs, 4), 64);
        assert_eq!(facs[32], 2, "version");
        assert_eq!(u32_at(&facs, 20), 1 << 1, "64BIT_WAKE_SUPPORTED_F");
        assert_eq!(u32_at(&facs, 16), 0, "global lock free");
        // Nothing follows the RSDP before it.
        assert!(Rsdp::len() <= at);
        // No vector until the guest writes one.
        assert_eq!(waking(&facs), Err(WakeError::NoVector));
    }

    /// molt's FACS with the guest's fields written.
    fn facs_with(vector: u32, x_vector: u64, ospm: u32) -> [u8; FACS_LEN] {
        let blob = build(1);
        let at = (layout::ACPI_FACS_START - layout::ACPI_START) as usize;
        let mut facs: [u8; FACS_LEN] = blob[at..at + FACS_LEN].try_into().unwrap();
        facs[12..16].copy_from_slice(&vector.to_le_bytes());
        facs[24..32].copy_from_slice(&x_vector.to_le_bytes());
        facs[36..40].copy_from_slice(&ospm.to_le_bytes());
        facs
    }

    #[test]
    fn real_mode_vector_is_segment_and_offset() {
        let w = waking(&facs_with(0x12345, 0, 0)).unwrap();
        assert_eq!(
            w,
            Waking::RealMode {
                segment: 0x1234,
                offset: 5
            }
        );
        assert_eq!(w.address(), 0x12345);
        assert_eq!(w.to_string(), "real mode at 1234:0005 (0x12345)");
        // Linux's trampoline sits below 1 MiB, page aligned.
        let w = waking(&facs_with(0x9a000, 0, 0)).unwrap();
        assert_eq!(
            w,
            Waking::RealMode {
                segment: 0x9a00,
                offset: 0
            }
        );
        // The highest address real mode reaches.
        assert_eq!(
            waking(&facs_with(0xfffff, 0, 0)).unwrap().address(),
            0xfffff
        );
        // The 64BIT_WAKE_F flag concerns the 64-bit vector only.
        let w = waking(&facs_with(0x9a000, 0, 1)).unwrap();
        assert_eq!(w.address(), 0x9a000);
    }

    #[test]
    fn the_64_bit_vector_wins_and_its_flag_picks_the_mode() {
        let w = waking(&facs_with(0x9a000, 0x20_0000, 0)).unwrap();
        assert_eq!(w, Waking::Protected { eip: 0x20_0000 });
        assert_eq!(w.to_string(), "32-bit protected mode at 0x200000");
        let w = waking(&facs_with(0x9a000, 0x1_2345_6000, 1)).unwrap();
        assert_eq!(w, Waking::Long { rip: 0x1_2345_6000 });
        assert_eq!(w.to_string(), "64-bit mode at 0x123456000");
        // Version 0 has no 64-bit vector; version 1 has no OSPM flags.
        let mut v0 = facs_with(0x9a000, 0x20_0000, 1);
        v0[32] = 0;
        assert_eq!(waking(&v0).unwrap().address(), 0x9a000);
        let mut v1 = facs_with(0, 0x20_0000, 1);
        v1[32] = 1;
        assert_eq!(waking(&v1), Ok(Waking::Protected { eip: 0x20_0000 }));
    }

    #[test]
    fn garbage_in_the_facs_is_refused() {
        assert_eq!(waking(&facs_with(0, 0, 0)), Err(WakeError::NoVector));
        assert_eq!(
            waking(&facs_with(0x10_0000, 0, 0)),
            Err(WakeError::RealModeAbove1MiB(0x10_0000))
        );
        assert_eq!(
            waking(&facs_with(u32::MAX, 0, 0)),
            Err(WakeError::RealModeAbove1MiB(u32::MAX))
        );
        assert_eq!(
            waking(&facs_with(0, 1 << 32, 0)),
            Err(WakeError::ProtectedAbove4GiB(1 << 32))
        );
        let mut sig = facs_with(0x9a000, 0, 0);
        sig[0] = b'X';
        let e = waking(&sig).unwrap_err();
        assert_eq!(
            e,
            WakeError::Damaged {
                signature: *b"XACS",
                length: 64
            }
        );
        assert!(e.to_string().contains("is damaged"), "{e}");
        let mut short = facs_with(0x9a000, 0, 0);
        short[4..8].copy_from_slice(&32u32.to_le_bytes());
        assert!(matches!(
            waking(&short),
            Err(WakeError::Damaged { length: 32, .. })
        ));
        // Nothing but zeros: the FACS of a guest booted by an earlier release
        // may be anything.
        assert!(matches!(
            waking(&[0; FACS_LEN]),
            Err(WakeError::Damaged { .. })
        ));
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
            // Only the SCI is overridden: IRQ 9 on GSI 9, active high, level.
            assert_eq!(isos, [vec![2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]]);
            assert_eq!(nmis, [vec![4, 6, 0xff, 0, 0, 1]]);
        }
    }

    #[test]
    fn dsdt_announces_s3_and_s5_sleep_types() {
        let blob = build(1);
        let dsdt = dsdt(&blob);
        assert_eq!(dsdt[8], DSDT_REVISION);
        for (name, typ) in [
            (b"_S3_", layout::ACPI_S3_TYPE),
            (b"_S5_", layout::ACPI_S5_TYPE),
        ] {
            let at = dsdt
                .windows(4)
                .position(|w| w == name)
                .unwrap_or_else(|| panic!("{} missing", String::from_utf8_lossy(name)));
            // PackageOp, PkgLength, NumElements 4, BytePrefix SLP_TYP, then zeros.
            assert_eq!(dsdt[at + 4], 0x12);
            assert_eq!(&dsdt[at + 6..at + 9], &[4, 0x0a, typ]);
            assert_eq!(&dsdt[at + 9..at + 12], &[0, 0, 0]);
        }
        assert_ne!(layout::ACPI_S3_TYPE, layout::ACPI_S5_TYPE);
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
    }

    #[test]
    fn blob_fits_below_acpi_end_with_max_vcpus() {
        let blob = build(layout::MAX_VCPUS as u8);
        // The wake page tables sit above the tables.
        assert!(layout::ACPI_START + blob.len() as u64 <= layout::WAKE_PML4_START);
        const { assert!(layout::WAKE_PD_START + 0x1000 <= layout::ACPI_END) };
    }
}
