//! Per-vCPU architectural setup: CPUID topology, boot MSRs, and the register state
//! each boot protocol expects at its entry point, and each way out of ACPI S3
//! at the guest's waking vector.
//!
//! References: Intel SDM vol. 3A 9.1 (processor state after reset), Linux
//! `Documentation/arch/x86/boot.rst` (64-bit boot protocol), the Xen PVH ABI
//! (`xenbits.xen.org/docs/unstable/misc/pvh.html`), and ACPI 6.5 section 5.2.10
//! (FACS waking vectors).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::acpi::Waking;
use crate::boot::Entry;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, PDE_START, PDPTE_START, PML4_START, WAKE_PDPT_START,
    WAKE_PD_START, WAKE_PML4_START,
};

// CPUID bits (Intel SDM vol. 2A, CPUID).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Smallest shift such that `1 << shift >= n`.
fn id_bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// Turns KVM's supported CPUID into vCPU `index`'s view of a single-socket machine
/// with `count` cores, one thread each. APIC id = vCPU index, which the MADT matches.
pub fn patch_cpuid(cpuid: &mut CpuId, index: u32, count: u32) {
    let core_bits = id_bits(count);
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count.min(255)) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1 (Intel deterministic cache leaf).
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core.
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: ECX[15:12] APIC id size, ECX[7:0] number of cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            0x8000_001e => {
                // AMD: extended APIC id, compute unit id, node id.
                e.eax = index;
                e.ebx = (e.ebx & !0xff) | index;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

const LEAF1_ECX_XSAVE: u32 = 1 << 26;
/// XCR0 bit 0: x87 state, which XCR0 must always enable (SDM vol. 1, 13.3).
const XCR0_X87: u64 = 1;

/// The XCR0 a vCPU starts with: every XSAVE component its CPUID offers (leaf
/// 0xD subleaf 0, EDX:EAX), which is what a Linux guest enables; None when
/// the CPUID offers no XSAVE. Architecturally XCR0 resets to x87 only, and on
/// hardware that intercepts XSETBV the guest's own write replaces whatever
/// is set here. Where XSETBV is not intercepted (the lab's L2, QEMU TCG's SVM)
/// the guest's write goes to the CPU directly, KVM never sees it and loads
/// its own XCR0 on every VM entry: with the reset value the guest would run
/// with x87 only (SSE and AVX lost at every context switch) and KVM's
/// CPUID(0xD,0).EBX would not match the guest's XSAVE layout.
pub fn initial_xcr0(cpuid: &CpuId) -> Option<u64> {
    let entries = cpuid.as_slice();
    let leaf1 = entries.iter().find(|e| e.function == 0x1)?;
    if leaf1.ecx & LEAF1_ECX_XSAVE == 0 {
        return None;
    }
    let leaf_d = entries.iter().find(|e| e.function == 0xd && e.index == 0)?;
    Some((u64::from(leaf_d.edx) << 32 | u64::from(leaf_d.eax)) | XCR0_X87)
}

// MSR numbers (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back: otherwise Linux treats all RAM as uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// MSR values every vCPU starts with.
pub fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ])
    .expect("11 entries fit in an Msrs")
}

/// x87 and SSE control words after FNINIT / reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// General registers at the entry point.
pub fn boot_regs(entry: Entry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and must be set
        ..Default::default()
    };
    match entry {
        Entry::Linux64 { rip, zero_page } => {
            regs.rip = rip;
            regs.rsi = zero_page;
        }
        Entry::Pvh { rip, start_info } => {
            regs.rip = rip;
            regs.rbx = start_info;
        }
    }
    regs
}

// Flat descriptors: (flags, base, limit) packed as in a GDT entry.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment(entry: u64, index: u8) -> kvm_segment {
    let flags = |shift: u64, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if flags(55, 1) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: u16::from(index) * 8,
        type_: flags(40, 0xf),
        present: flags(47, 1),
        dpl: flags(45, 3),
        db: flags(54, 1),
        s: flags(44, 1),
        l: flags(53, 1),
        g: flags(55, 1),
        avl: flags(52, 1),
        padding: 0,
        unusable: u8::from(flags(47, 1) == 0),
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// CS after a reset or INIT: F000, based at FFFF0000 (Intel SDM vol. 3A 9.1.4).
pub const RESET_CS_SELECTOR: u16 = 0xf000;

/// Page-table entry bits: present and writable; a 2 MiB page.
const PRESENT_RW: u64 = 0x3;
const HUGE: u64 = 0x80;

/// The boot GDT: null, flat code (64-bit with `long`), flat data, busy TSS.
fn boot_gdt(long: bool) -> [u64; 4] {
    let code = if long {
        gdt_entry(0xa09b, 0, 0xfffff)
    } else {
        gdt_entry(0xc09b, 0, 0xfffff)
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x008b, 0, 0xfffff), // TSS, busy: VMX entry wants a valid TR
    ]
}

/// `sregs` with the boot GDT's flat segments loaded and the control registers
/// for 32-bit protected mode, paging off, or with `long` for 64-bit mode
/// (CR3 is the caller's).
fn flat_sregs(mut sregs: kvm_sregs, long: bool) -> kvm_sregs {
    let gdt = boot_gdt(long);
    let data = segment(gdt[2], 2);
    sregs.cs = segment(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    if long {
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    sregs
}

/// Writes the boot GDT, IDT and (for 64-bit entry) identity page tables, and returns
/// `sregs` with segments and control registers for `entry`.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    entry: Entry,
    sregs: kvm_sregs,
) -> Result<kvm_sregs, vm_memory::GuestMemoryError> {
    let long = matches!(entry, Entry::Linux64 { .. });
    let gdt = boot_gdt(long);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let mut sregs = flat_sregs(sregs, long);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    if long {
        write_identity_map(mem)?;
        sregs.cr3 = PML4_START;
    }
    Ok(sregs)
}

/// Identity-maps the first 4 GiB with 2 MiB pages: the kernel builds its own tables
/// early, but until then it touches its image, the zero page, cmdline and initrd.
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPTE_START + gib * 8))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | PRESENT_RW | HUGE, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// General registers at a waking vector: its offset, interrupts off.
pub fn wake_regs(waking: Waking) -> kvm_regs {
    let rip = match waking {
        Waking::RealMode { offset, .. } => u64::from(offset),
        Waking::Protected { eip } => u64::from(eip),
        Waking::Long { rip } => rip,
    };
    kvm_regs {
        rip,
        rflags: 0x2,
        ..Default::default()
    }
}

/// `sregs` of a vCPU just after INIT (real mode, CS at the reset vector),
/// changed to enter `waking`. Selectors of the protected and 64-bit modes are
/// flat and otherwise unused: there is no GDT in memory (ACPI 6.5 5.2.10).
pub fn wake_sregs(waking: Waking, mut sregs: kvm_sregs) -> kvm_sregs {
    match waking {
        Waking::RealMode { segment, .. } => {
            sregs.cs.selector = segment;
            sregs.cs.base = u64::from(segment) << 4;
            sregs
        }
        Waking::Protected { .. } => flat_sregs(sregs, false),
        Waking::Long { .. } => {
            let mut sregs = flat_sregs(sregs, true);
            sregs.cr3 = WAKE_PML4_START;
            sregs
        }
    }
}

/// The page tables a 64-bit waking vector at `rip` starts with: the 2 MiB
/// page holding it, identity-mapped, and nothing else.
pub fn write_wake_page_tables(
    mem: &GuestMemoryMmap,
    rip: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    for table in [WAKE_PML4_START, WAKE_PDPT_START, WAKE_PD_START] {
        mem.write_slice(&[0; 0x1000], GuestAddress(table))?;
    }
    let entry = |shift: u32| 8 * ((rip >> shift) & 0x1ff);
    mem.write_obj(
        WAKE_PDPT_START | PRESENT_RW,
        GuestAddress(WAKE_PML4_START + entry(39)),
    )?;
    mem.write_obj(
        WAKE_PD_START | PRESENT_RW,
        GuestAddress(WAKE_PDPT_START + entry(30)),
    )?;
    mem.write_obj(
        (rip & !0x1f_ffff) | PRESENT_RW | HUGE,
        GuestAddress(WAKE_PD_START + entry(21)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(32), 5);
    }

    #[test]
    fn cpuid_topology_names_the_vcpu() {
        let entry = |function, index| kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        };
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        patch_cpuid(&mut cpuid, 3, 4);
        let s = cpuid.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!((s[1].ebx, s[1].edx), (1, 3));
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (2, 4, LEVEL_TYPE_CORE));
    }

    #[test]
    fn xcr0_enables_what_leaf_0xd_offers() {
        let entry = |function, index, eax, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ecx,
            edx,
            ..Default::default()
        };
        let leaf1 = |ecx| entry(1, 0, 0, ecx, 0);
        // x87, SSE, AVX (the lab's EPYC-v3): 0x7, whatever other leaves say.
        let lab = CpuId::from_entries(&[
            leaf1(LEAF1_ECX_XSAVE),
            entry(0xd, 1, 0x1, 0, 0),
            entry(0xd, 0, 0x7, 0x340, 0),
        ])
        .unwrap();
        assert_eq!(initial_xcr0(&lab), Some(0x7));
        // AVX-512 and PKRU (an EPYC Genoa host), and high bits from EDX.
        let wide =
            CpuId::from_entries(&[leaf1(LEAF1_ECX_XSAVE), entry(0xd, 0, 0x2e7, 0, 0x1)]).unwrap();
        assert_eq!(initial_xcr0(&wide), Some(0x1_0000_02e7));
        // x87 is always on, even if the leaf forgot it.
        let bare =
            CpuId::from_entries(&[leaf1(LEAF1_ECX_XSAVE), entry(0xd, 0, 0x6, 0, 0)]).unwrap();
        assert_eq!(initial_xcr0(&bare), Some(0x7));
        // No XSAVE, or no leaf 0xD: XCR0 is left alone.
        let no_xsave = CpuId::from_entries(&[leaf1(0), entry(0xd, 0, 0x7, 0, 0)]).unwrap();
        assert_eq!(initial_xcr0(&no_xsave), None);
        let no_leaf = CpuId::from_entries(&[leaf1(LEAF1_ECX_XSAVE)]).unwrap();
        assert_eq!(initial_xcr0(&no_leaf), None);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let m = mem();
        let entry = Entry::Linux64 {
            rip: 0x100200,
            zero_page: 0x7000,
        };
        let s = boot_sregs(&m, entry, kvm_sregs::default()).unwrap();
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.efer & EFER_LMA, 0);
        let pde: u64 = m.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, (4u64 << 30) - (2 << 20));
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode() {
        let m = mem();
        let s = boot_sregs(
            &m,
            Entry::Pvh {
                rip: 0x100000,
                start_info: 0x6000,
            },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit), (1, 0, 0xffff_ffff));
        assert_eq!(s.ds.type_, 3);
        assert_eq!(s.efer, 0);
        let r = boot_regs(Entry::Pvh {
            rip: 0x100000,
            start_info: 0x6000,
        });
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100000, 0x6000, 2));
    }

    /// Real mode as INIT leaves it (Intel SDM vol. 3A table 9-1).
    fn after_init() -> kvm_sregs {
        let real = |selector: u16, base: u64, type_: u8| kvm_segment {
            selector,
            base,
            limit: 0xffff,
            type_,
            present: 1,
            s: 1,
            ..Default::default()
        };
        kvm_sregs {
            cs: real(RESET_CS_SELECTOR, 0xffff_0000, 0xb),
            ds: real(0, 0, 3),
            cr0: X86_CR0_ET,
            ..Default::default()
        }
    }

    #[test]
    fn real_mode_wake_is_cs_ip_from_the_vector() {
        let w = Waking::RealMode {
            segment: 0x9a00,
            offset: 5,
        };
        let s = wake_sregs(w, after_init());
        assert_eq!(
            (s.cs.selector, s.cs.base, s.cs.limit),
            (0x9a00, 0x9a000, 0xffff)
        );
        assert_eq!(s.cr0 & X86_CR0_PE, 0, "real mode");
        assert_eq!(s.ds, after_init().ds, "data segments as INIT left them");
        let r = wake_regs(w);
        assert_eq!((r.rip, r.rflags), (5, 2));
    }

    #[test]
    fn protected_wake_is_flat_32_bit_without_paging() {
        let w = Waking::Protected { eip: 0x20_0000 };
        let s = wake_sregs(w, after_init());
        assert_eq!(
            (s.cs.base, s.cs.limit, s.cs.db, s.cs.l),
            (0, 0xffff_ffff, 1, 0)
        );
        assert_eq!((s.ss.base, s.ss.limit, s.ss.type_), (0, 0xffff_ffff, 3));
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!(wake_regs(w).rip, 0x20_0000);
    }

    #[test]
    fn long_wake_maps_the_vectors_2_mib_page_only() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // What the guest left in the area is wiped.
        m.write_slice(&[0xff; 0x3000], GuestAddress(WAKE_PML4_START))
            .unwrap();
        let rip = 0x1_2345_6789;
        write_wake_page_tables(&m, rip).unwrap();
        let read = |a: u64| -> u64 { m.read_obj(GuestAddress(a)).unwrap() };
        let nonzero = |table: u64| {
            (0..512)
                .filter(|i| read(table + 8 * i) != 0)
                .collect::<Vec<_>>()
        };
        assert_eq!(nonzero(WAKE_PML4_START), [0]);
        assert_eq!(nonzero(WAKE_PDPT_START), [4], "the fifth GiB");
        assert_eq!(nonzero(WAKE_PD_START), [(0x2345_6789 >> 21) as u64]);
        assert_eq!(read(WAKE_PML4_START), WAKE_PDPT_START | 3);
        assert_eq!(read(WAKE_PDPT_START + 32), WAKE_PD_START | 3);
        assert_eq!(
            read(WAKE_PD_START + 8 * (0x2345_6789 >> 21)),
            (rip & !0x1f_ffff) | 0x83
        );
        let s = wake_sregs(Waking::Long { rip }, after_init());
        assert_eq!((s.cs.l, s.cs.db), (1, 0));
        assert_eq!(s.cr3, WAKE_PML4_START);
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_PG | X86_CR0_ET);
        assert_eq!(s.cr4, X86_CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(wake_regs(Waking::Long { rip }).rip, rip);
    }
}
