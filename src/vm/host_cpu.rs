//! Whether this host's KVM can run a saved guest's vCPUs (SPEC.md: a state saved
//! on another CPU model, or under a KVM that lacks a saved CPU feature, is
//! refused before anything is touched, naming the features).
//!
//! What the guest needs is read from the state itself - the CPUID it was
//! started with, its XSAVE image and XCR0, its MSRs - and compared with what
//! this host's KVM offers: KVM_GET_SUPPORTED_CPUID (and what a vCPU given it
//! reads back, see `HostCpu::effective`), KVM_CAP_XSAVE2 and
//! KVM_GET_MSR_INDEX_LIST. The comparison is needed because KVM does not make
//! it: KVM_SET_CPUID2 takes bits the host cannot provide (the guest then meets
//! #UD on its first AVX-512 instruction), and KVM_SET_XSAVE refuses a component
//! it does not know with a bare EINVAL. A different vendor string alone is
//! tolerated (KVM is), as long as every feature bit is offered.
//!
//! Feature names are those of Linux's /proc/cpuinfo (`arch/x86/include/asm/
//! cpufeatures.h`); bit positions follow the Intel SDM vol. 2A (CPUID) and the
//! AMD APM vol. 3 (appendix E), XSAVE components the SDM vol. 1, 13.

use std::fmt;

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::vcpu_state::{self, CpuidEntry, VcpuState, LEGACY_XSAVE_WORDS};

#[derive(Debug)]
pub enum Error {
    OpenKvm(kvm_ioctls::Error),
    CreateVm(kvm_ioctls::Error),
    CreateVcpu(kvm_ioctls::Error),
    GetSupportedCpuid(kvm_ioctls::Error),
    SetCpuid(kvm_ioctls::Error),
    GetCpuid(vcpu_state::Error),
    GetMsrIndexList(kvm_ioctls::Error),
    Incompatible(Incompatible),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OpenKvm(e) => write!(f, "cannot open /dev/kvm: {e}"),
            Error::CreateVm(e) => write!(f, "KVM_CREATE_VM for the CPU check failed: {e}"),
            Error::CreateVcpu(e) => write!(f, "KVM_CREATE_VCPU for the CPU check failed: {e}"),
            Error::GetSupportedCpuid(e) => write!(f, "KVM_GET_SUPPORTED_CPUID failed: {e}"),
            Error::SetCpuid(e) => write!(f, "KVM_SET_CPUID2 for the CPU check failed: {e}"),
            Error::GetCpuid(e) => e.fmt(f),
            Error::GetMsrIndexList(e) => write!(f, "KVM_GET_MSR_INDEX_LIST failed: {e}"),
            Error::Incompatible(i) => i.fmt(f),
        }
    }
}

/// Everything a saved guest needs that this host's KVM does not offer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Incompatible {
    pub saved_vendor: String,
    pub host_vendor: String,
    /// CPU features and XSAVE state components, by name, each once.
    pub missing: Vec<String>,
    /// Everything else that does not fit, one sentence each.
    pub other: Vec<String>,
}

impl Incompatible {
    fn missing(&mut self, name: String) {
        if !self.missing.contains(&name) {
            self.missing.push(name);
        }
    }

    fn other(&mut self, why: String) {
        if !self.other.contains(&why) {
            self.other.push(why);
        }
    }

    fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.other.is_empty()
    }
}

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::with_capacity(1 + self.other.len());
        if !self.missing.is_empty() {
            parts.push(format!(
                "this host's KVM lacks CPU features the guest was started with: {}",
                self.missing.join(", ")
            ));
        }
        parts.extend(self.other.iter().cloned());
        write!(f, "{}", parts.join("; "))?;
        if self.saved_vendor != self.host_vendor {
            write!(
                f,
                " (saved on {}, this host is {})",
                self.saved_vendor, self.host_vendor
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn of(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }
}

/// How the bits of a feature register are called.
enum Names {
    Cpuid(&'static [&'static str]),
    /// XSAVE state components, the register's bit 0 being component `n`.
    Xstate(u32),
}

/// A CPUID register whose set bits each promise the guest a feature.
struct FeatureReg {
    leaf: u32,
    sub: u32,
    reg: Reg,
    /// Bits that are no promise: set by molt (hypervisor, HTT) or by KVM
    /// while the guest runs (OSXSAVE and OSPKE follow CR4).
    ignore: u32,
    /// Bits that repeat leaf 1 EDX (AMD's 0x80000001 EDX): offered if either is.
    mirrors_leaf1_edx: u32,
    names: Names,
}

const fn reg(leaf: u32, sub: u32, reg: Reg, names: Names) -> FeatureReg {
    FeatureReg {
        leaf,
        sub,
        reg,
        ignore: 0,
        mirrors_leaf1_edx: 0,
        names,
    }
}

const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;
/// 0x80000001 EDX bits 0-9, 12-17, 23, 24: the same features as leaf 1 EDX.
const EXT1_EDX_MIRROR: u32 = 0x0183_f3ff;

#[rustfmt::skip]
const LEAF1_ECX: &[&str] = &[
    "pni", "pclmulqdq", "dtes64", "monitor", "ds_cpl", "vmx", "smx", "est",
    "tm2", "ssse3", "cid", "sdbg", "fma", "cx16", "xtpr", "pdcm",
    "", "pcid", "dca", "sse4_1", "sse4_2", "x2apic", "movbe", "popcnt",
    "tsc_deadline_timer", "aes", "xsave", "osxsave", "avx", "f16c", "rdrand", "hypervisor",
];
#[rustfmt::skip]
const LEAF1_EDX: &[&str] = &[
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce",
    "cx8", "apic", "", "sep", "mtrr", "pge", "mca", "cmov",
    "pat", "pse36", "pn", "clflush", "", "dts", "acpi", "mmx",
    "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe",
];
const LEAF6_EAX: &[&str] = &["dtherm", "ida", "arat"];
#[rustfmt::skip]
const LEAF7_EBX: &[&str] = &[
    "fsgsbase", "tsc_adjust", "sgx", "bmi1", "hle", "avx2", "fdp_excptn_only", "smep",
    "bmi2", "erms", "invpcid", "rtm", "cqm", "zero_fcs_fds", "mpx", "rdt_a",
    "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "", "clflushopt",
    "clwb", "intel_pt", "avx512pf", "avx512er", "avx512cd", "sha_ni", "avx512bw", "avx512vl",
];
#[rustfmt::skip]
const LEAF7_ECX: &[&str] = &[
    "prefetchwt1", "avx512vbmi", "umip", "pku", "ospke", "waitpkg", "avx512_vbmi2", "shstk",
    "gfni", "vaes", "vpclmulqdq", "avx512_vnni", "avx512_bitalg", "tme", "avx512_vpopcntdq", "",
    "la57", "", "", "", "", "", "rdpid", "keylocker",
    "bus_lock_detect", "cldemote", "", "movdiri", "movdir64b", "enqcmd", "sgx_lc", "pks",
];
#[rustfmt::skip]
const LEAF7_EDX: &[&str] = &[
    "", "sgx_keys", "avx512_4vnniw", "avx512_4fmaps", "fsrm", "uintr", "", "",
    "avx512_vp2intersect", "srbds_ctrl", "md_clear", "rtm_always_abort", "", "tsx_force_abort", "serialize", "hybrid_cpu",
    "tsxldtrk", "", "pconfig", "arch_lbr", "ibt", "", "amx_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "spec_ctrl", "intel_stibp", "flush_l1d", "arch_capabilities", "core_capabilities", "spec_ctrl_ssbd",
];
#[rustfmt::skip]
const LEAF7_1_EAX: &[&str] = &[
    "sha512", "sm3", "sm4", "", "avx_vnni", "avx512_bf16", "", "cmpccxadd",
    "", "", "fzrm", "fsrs", "fsrc", "", "", "",
    "", "fred", "lkgs", "wrmsrns", "", "amx_fp16", "", "avx_ifma",
    "", "", "lam",
];
const LEAF7_1_EDX: &[&str] = &["", "", "", "", "avx_vnni_int8", "avx_ne_convert"];
#[rustfmt::skip]
const LEAF7_2_EDX: &[&str] = &[
    "intel_psfd", "ipred_ctrl", "rrsba_ctrl", "ddpd_u", "bhi_ctrl", "mcdt_no",
];
const LEAF_D_1_EAX: &[&str] = &["xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd"];
#[rustfmt::skip]
const KVM_FEATURES_EAX: &[&str] = &[
    "kvmclock", "kvm_nopiodelay", "kvm_mmu", "kvmclock2",
    "kvm_asyncpf", "kvm_steal_time", "kvm_pv_eoi", "kvm_pv_unhalt",
    "", "kvm_pv_tlb_flush", "kvm_asyncpf_vmexit", "kvm_pv_send_ipi",
    "kvm_poll_control", "kvm_pv_sched_yield", "kvm_asyncpf_int", "kvm_msi_ext_dest_id",
    "kvm_hc_map_gpa_range", "kvm_migration_control", "", "",
    "", "", "", "",
    "kvmclock_stable_bit",
];
#[rustfmt::skip]
const EXT1_ECX: &[&str] = &[
    "lahf_lm", "cmp_legacy", "svm", "extapic", "cr8_legacy", "abm", "sse4a", "misalignsse",
    "3dnowprefetch", "osvw", "ibs", "xop", "skinit", "wdt", "", "lwp",
    "fma4", "tce", "", "nodeid_msr", "", "tbm", "topoext", "perfctr_core",
    "perfctr_nb", "", "bpext", "ptsc", "perfctr_llc", "mwaitx",
];
#[rustfmt::skip]
const EXT1_EDX: &[&str] = &[
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce",
    "cx8", "apic", "", "syscall", "mtrr", "pge", "mca", "cmov",
    "pat", "pse36", "", "mp", "nx", "", "mmxext", "mmx",
    "fxsr", "fxsr_opt", "pdpe1gb", "rdtscp", "", "lm", "3dnowext", "3dnow",
];
const EXT7_EDX: &[&str] = &["", "", "", "", "", "", "", "", "invtsc"];
#[rustfmt::skip]
const EXT8_EBX: &[&str] = &[
    "clzero", "irperf", "xsaveerptr", "", "rdpru", "", "", "",
    "", "wbnoinvd", "", "", "amd_ibpb", "", "amd_ibrs", "amd_stibp",
    "", "amd_stibp_always_on", "", "", "", "", "", "",
    "amd_ssbd", "virt_ssbd", "amd_ssb_no", "", "amd_psfd", "btc_no", "amd_ibpb_ret",
];
#[rustfmt::skip]
const EXT21_EAX: &[&str] = &[
    "no_nested_data_bp", "", "lfence_rdtsc", "", "", "", "null_sel_clr_base", "",
    "autoibrs",
];
/// XSAVE state components (SDM vol. 1, 13.1), by bit of XCR0 / IA32_XSS.
#[rustfmt::skip]
const XSTATE: &[&str] = &[
    "x87", "sse", "avx", "mpx bndregs", "mpx bndcsr", "avx512 opmask", "avx512 zmm_hi256",
    "avx512 hi16_zmm", "pt", "pkru", "pasid", "cet user", "cet supervisor", "hdc", "uintr",
    "lbr", "hwp", "amx tilecfg", "amx tiledata", "apx",
];

const KVM_LEAF_FEATURES: u32 = 0x4000_0001;

/// Every register of feature bits the comparison looks at.
const FEATURE_REGS: &[FeatureReg] = &[
    FeatureReg {
        ignore: LEAF1_ECX_OSXSAVE | LEAF1_ECX_HYPERVISOR,
        ..reg(0x1, 0, Reg::Ecx, Names::Cpuid(LEAF1_ECX))
    },
    FeatureReg {
        ignore: LEAF1_EDX_HTT,
        ..reg(0x1, 0, Reg::Edx, Names::Cpuid(LEAF1_EDX))
    },
    reg(0x6, 0, Reg::Eax, Names::Cpuid(LEAF6_EAX)),
    reg(0x7, 0, Reg::Ebx, Names::Cpuid(LEAF7_EBX)),
    FeatureReg {
        ignore: LEAF7_ECX_OSPKE,
        ..reg(0x7, 0, Reg::Ecx, Names::Cpuid(LEAF7_ECX))
    },
    reg(0x7, 0, Reg::Edx, Names::Cpuid(LEAF7_EDX)),
    reg(0x7, 1, Reg::Eax, Names::Cpuid(LEAF7_1_EAX)),
    reg(0x7, 1, Reg::Edx, Names::Cpuid(LEAF7_1_EDX)),
    reg(0x7, 2, Reg::Edx, Names::Cpuid(LEAF7_2_EDX)),
    reg(0xd, 0, Reg::Eax, Names::Xstate(0)),
    reg(0xd, 0, Reg::Edx, Names::Xstate(32)),
    reg(0xd, 1, Reg::Eax, Names::Cpuid(LEAF_D_1_EAX)),
    reg(0xd, 1, Reg::Ecx, Names::Xstate(0)),
    reg(0xd, 1, Reg::Edx, Names::Xstate(32)),
    reg(
        KVM_LEAF_FEATURES,
        0,
        Reg::Eax,
        Names::Cpuid(KVM_FEATURES_EAX),
    ),
    reg(0x8000_0001, 0, Reg::Ecx, Names::Cpuid(EXT1_ECX)),
    FeatureReg {
        mirrors_leaf1_edx: EXT1_EDX_MIRROR,
        ..reg(0x8000_0001, 0, Reg::Edx, Names::Cpuid(EXT1_EDX))
    },
    reg(0x8000_0007, 0, Reg::Edx, Names::Cpuid(EXT7_EDX)),
    reg(0x8000_0008, 0, Reg::Ebx, Names::Cpuid(EXT8_EBX)),
    reg(0x8000_0021, 0, Reg::Eax, Names::Cpuid(EXT21_EAX)),
];

impl FeatureReg {
    fn bit_name(&self, bit: u32) -> String {
        match self.names {
            Names::Cpuid(names) => match names.get(bit as usize) {
                Some(n) if !n.is_empty() => (*n).to_string(),
                _ => format!(
                    "leaf {:#x}.{} {} bit {bit}",
                    self.leaf,
                    self.sub,
                    self.reg.name()
                ),
            },
            Names::Xstate(first) => xstate_name(first + bit),
        }
    }
}

fn xstate_name(component: u32) -> String {
    match XSTATE.get(component as usize) {
        Some(n) => format!("{n} state"),
        None => format!("xsave component {component} state"),
    }
}

/// Set bits of `v`, lowest first.
fn bits(v: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |b| v & (1 << b) != 0)
}

/// A CPUID table, looked up as the CPU would answer; for a host, the union of
/// two (a leaf is taken from the first that has it, feature bits from both).
struct Cpuid<'a>(&'a [CpuidEntry], &'a [CpuidEntry]);

fn find(table: &[CpuidEntry], leaf: u32, sub: u32) -> Option<&CpuidEntry> {
    table.iter().find(|e| {
        e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == sub)
    })
}

impl Cpuid<'_> {
    fn entry(&self, leaf: u32, sub: u32) -> Option<&CpuidEntry> {
        find(self.0, leaf, sub).or_else(|| find(self.1, leaf, sub))
    }

    /// A register of a leaf the tables lack reads as 0: nothing offered.
    fn reg(&self, leaf: u32, sub: u32, reg: Reg) -> u32 {
        let of = |t| find(t, leaf, sub).map_or(0, |e| reg.of(e));
        of(self.0) | of(self.1)
    }

    fn vendor(&self) -> String {
        match self.entry(0, 0) {
            Some(e) => [e.ebx, e.edx, e.ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .map(|b| if b.is_ascii_graphic() { b as char } else { '?' })
                .collect(),
            None => "an unknown vendor".into(),
        }
    }

    /// The XSAVE components a guest may enable (leaf 0xD.0 EDX:EAX).
    fn xcr0_mask(&self) -> u64 {
        u64::from(self.reg(0xd, 0, Reg::Edx)) << 32 | u64::from(self.reg(0xd, 0, Reg::Eax))
    }

    /// Physical address width (0x80000008 EAX[7:0]), if the table has it.
    fn phys_bits(&self) -> Option<u32> {
        self.entry(0x8000_0008, 0).map(|e| e.eax & 0xff)
    }
}

/// x87 and SSE state are in every XSAVE image, XSAVE supported or not.
const LEGACY_XSTATE: u64 = 0b11;
/// Where XSTATE_BV sits in an XSAVE image: byte 512, the XSAVE header.
const XSTATE_BV_WORD: usize = 512 / 4;

/// What this host's KVM offers a vCPU.
pub struct HostCpu {
    /// A vCPU's KVM_GET_CPUID2 after KVM_SET_CPUID2 of the supported list: the
    /// same on Linux's KVM, but some paravirtual KVMs report fewer features
    /// as supported than their vCPUs then show the guest (seen: a Firecracker
    /// host's /dev/kvm), and a guest started there saw these.
    effective: Vec<CpuidEntry>,
    /// KVM_GET_SUPPORTED_CPUID.
    supported: Vec<CpuidEntry>,
    /// The XSAVE image size KVM_SET_XSAVE may read, in 32-bit words.
    xsave_words: usize,
    /// KVM_GET_MSR_INDEX_LIST, sorted.
    msrs: Vec<u32>,
}

/// The XSAVE image size of this host's vCPUs in 32-bit words: KVM_CAP_XSAVE2
/// (0 on kernels before 5.17), never less than the legacy `kvm_xsave`.
pub fn xsave_words(kvm: &Kvm) -> usize {
    (kvm.check_extension_int(Cap::Xsave2).max(0) as usize)
        .div_ceil(4)
        .max(LEGACY_XSAVE_WORDS)
}

/// The MSRs this host's KVM saves and restores.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, Error> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(Error::GetMsrIndexList)?
        .as_slice()
        .to_vec())
}

/// KVM_GET_SUPPORTED_CPUID: what vCPUs are given at creation.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)
}

/// `make` while KVM_GET_SUPPORTED_CPUID (~0.3-0.6 ms here) is asked on a
/// second thread: both answers.
pub fn while_supported_is_asked<T: Send>(
    kvm: &Kvm,
    make: impl FnOnce() -> T,
) -> (T, Result<CpuId, Error>) {
    std::thread::scope(|s| {
        let supported = s.spawn(|| supported_cpuid(kvm));
        let made = make();
        let supported = supported
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (made, supported)
    })
}

/// The environment variable an exec hands this host's KVM_GET_SUPPORTED_CPUID
/// on in (`Supported::for_exec`, `Supported::handed_over`): the next image
/// runs on the same kernel, and with the same KVM (the old VM's descriptors
/// stay open across the exec, so the module cannot be replaced meanwhile).
/// This boot's ID leads it: a value from another boot is not taken.
pub const SUPPORTED_ENV: &str = "MOLT_KVM_SUPPORTED_CPUID";

/// This boot's ID (`/proc/sys/kernel/random/boot_id`), if it reads.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string())
}

/// `SUPPORTED_ENV`'s value for `supported` on boot `boot`: the boot ID, then
/// each entry's seven words (function, index, flags, EAX-EDX) in hex.
fn supported_text(boot: &str, supported: &CpuId) -> String {
    let mut text = boot.to_string();
    for e in supported.as_slice() {
        let words = [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx];
        text.push(';');
        let words: Vec<String> = words.iter().map(|w| format!("{w:x}")).collect();
        text.push_str(&words.join(","));
    }
    text
}

/// The CPUID `supported_text` wrote, if it was written on boot `boot` and
/// reads whole.
fn supported_of_text(boot: &str, text: &str) -> Option<CpuId> {
    let mut parts = text.split(';');
    if parts.next()? != boot {
        return None;
    }
    let entries = parts
        .map(|e| {
            let w: Vec<u32> = e
                .split(',')
                .map(|w| u32::from_str_radix(w, 16).ok())
                .collect::<Option<_>>()?;
            let [function, index, flags, eax, ebx, ecx, edx] = w[..] else {
                return None;
            };
            Some(kvm_bindings::kvm_cpuid_entry2 {
                function,
                index,
                flags,
                eax,
                ebx,
                ecx,
                edx,
                ..Default::default()
            })
        })
        .collect::<Option<Vec<_>>>()?;
    if entries.is_empty() || entries.len() > KVM_MAX_CPUID_ENTRIES {
        return None;
    }
    CpuId::from_entries(&entries).ok()
}

/// KVM_GET_SUPPORTED_CPUID (~0.35-0.6 ms here), asked ahead: on a thread of
/// its own from the moment an arriving guest's process knows it will build a
/// VM, or already known (reboot mode's probe asked it, or an exec's previous
/// image handed it over: `SUPPORTED_ENV`).
pub enum Supported {
    Known(CpuId),
    Asking(std::thread::JoinHandle<Result<CpuId, Error>>),
    /// No thread could start: asked when needed.
    Later,
}

/// Opens /dev/kvm and asks KVM_GET_SUPPORTED_CPUID.
fn ask_supported() -> Result<CpuId, Error> {
    supported_cpuid(&Kvm::new().map_err(Error::OpenKvm)?)
}

impl Supported {
    /// `SUPPORTED_ENV=VALUE` for an exec's next image, asked now (None if
    /// KVM does not answer: that image asks).
    pub fn for_exec() -> Option<String> {
        let supported = ask_supported().ok()?;
        Some(format!(
            "{SUPPORTED_ENV}={}",
            supported_text(&boot_id()?, &supported)
        ))
    }

    /// What the previous image handed over in `SUPPORTED_ENV` (exec mode's
    /// new image only), if it came from this boot.
    pub fn handed_over() -> Option<CpuId> {
        let text = std::env::var(SUPPORTED_ENV).ok()?;
        supported_of_text(&boot_id()?, &text)
    }

    /// Starts asking on a thread of its own.
    pub fn ask() -> Self {
        std::thread::Builder::new()
            .name("supported-cpuid".into())
            .spawn(ask_supported)
            .map_or(Supported::Later, Supported::Asking)
    }

    /// The answer, waited for if need be.
    pub fn get(self) -> Result<CpuId, Error> {
        match self {
            Supported::Known(c) => Ok(c),
            Supported::Asking(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            Supported::Later => ask_supported(),
        }
    }
}

/// The VM `HostCpu::open` asked through: dropped, KVM tears it down there
/// and then. Held only to be released; fields drop in order, vCPU first.
pub struct Probe {
    _vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
}

impl Probe {
    /// Tears the VM down on a thread of its own (here if none can start).
    pub fn release(self) {
        let _ = std::thread::Builder::new()
            .name("probe-vm-release".into())
            .spawn(move || drop(self));
    }
}

impl HostCpu {
    /// Asks `kvm` what it offers; `supported` is its KVM_GET_SUPPORTED_CPUID
    /// and `vcpu` a fresh vCPU of it given that.
    pub fn query(kvm: &Kvm, supported: &CpuId, vcpu: &VcpuFd) -> Result<Self, Error> {
        let mut msrs = msr_indices(kvm)?;
        msrs.sort_unstable();
        Ok(HostCpu {
            effective: vcpu_state::read_cpuid(vcpu).map_err(Error::GetCpuid)?,
            supported: supported.as_slice().iter().map(CpuidEntry::from).collect(),
            xsave_words: xsave_words(kvm),
            msrs,
        })
    }

    /// Opens /dev/kvm and asks it through a VM of its own, for a check before
    /// any machine exists. A reboot mode restart does this inside the pause
    /// when it could not make its machine's VM first (`vm::Early`), so what
    /// can overlap does: KVM_GET_SUPPORTED_CPUID (~300 us here) runs
    /// while the VM and its vCPU are created. The VM comes back with the
    /// answer: tearing it down takes up to ~1.5 ms of CPU (`Probe::release`).
    pub fn open() -> Result<(Self, Probe, CpuId), Error> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let (probe, supported) = while_supported_is_asked(&kvm, || {
            kvm.create_vm()
                .map_err(Error::CreateVm)
                .and_then(|vm| Ok((vm.create_vcpu(0).map_err(Error::CreateVcpu)?, vm)))
        });
        let ((vcpu, vm), supported) = (probe?, supported?);
        vcpu.set_cpuid2(&supported).map_err(Error::SetCpuid)?;
        let host = Self::query(&kvm, &supported, &vcpu)?;
        let probe = Probe {
            _vcpu: vcpu,
            _vm: vm,
            _kvm: kvm,
        };
        Ok((host, probe, supported))
    }

    fn offered(&self) -> Cpuid<'_> {
        Cpuid(&self.effective, &self.supported)
    }

    /// This host's vendor string, family and model.
    pub fn describe(&self) -> String {
        describe(&self.offered())
    }

    /// Refuses vCPUs that need what this host's KVM does not offer.
    pub fn check<'a>(&self, vcpus: impl IntoIterator<Item = &'a VcpuState>) -> Result<(), Error> {
        let host = self.offered();
        let mut found = Incompatible {
            host_vendor: host.vendor(),
            ..Default::default()
        };
        for v in vcpus {
            found.saved_vendor = Cpuid(&v.cpuid, &[]).vendor();
            self.compare(v, &mut found);
        }
        if !found.is_empty() {
            return Err(Error::Incompatible(found));
        }
        if found.saved_vendor != found.host_vendor {
            log::warn!(
                "the state was saved on {}, this host is {}: every CPU feature the guest saw \
                 is offered here",
                found.saved_vendor,
                found.host_vendor
            );
        }
        Ok(())
    }

    fn compare(&self, v: &VcpuState, out: &mut Incompatible) {
        let (saved, host) = (Cpuid(&v.cpuid, &[]), self.offered());
        for r in FEATURE_REGS {
            let wanted = saved.reg(r.leaf, r.sub, r.reg) & !r.ignore;
            let offered =
                host.reg(r.leaf, r.sub, r.reg) | (host.reg(0x1, 0, Reg::Edx) & r.mirrors_leaf1_edx);
            for bit in bits(u64::from(wanted & !offered)) {
                out.missing(r.bit_name(bit));
            }
        }
        if let (Some(s), Some(h)) = (saved.phys_bits(), host.phys_bits()) {
            if s > h {
                out.other(format!(
                    "the guest has {s}-bit physical addresses, this host's KVM offers {h}"
                ));
            }
        }
        self.compare_xsave(v, &saved, &host, out);
        let unknown: Vec<String> = v
            .msrs
            .iter()
            .filter(|m| self.msrs.binary_search(&m.index).is_err())
            .map(|m| format!("{:#x}", m.index))
            .collect();
        if !unknown.is_empty() {
            out.other(format!(
                "this host's KVM does not save or restore MSRs the guest had: {}",
                unknown.join(", ")
            ));
        }
    }

    /// The image must fit the host's buffer, its components (XSTATE_BV) and
    /// the guest's XCR0 must be ones the host offers, and each component the
    /// guest was told of must sit where the host's XSAVE puts it: KVM copies
    /// the standard-format image as it is, and the guest computes offsets from
    /// its own CPUID (AVX-512 state sits at 0x440 on Intel, 0x340 on AMD Zen 4).
    fn compare_xsave(&self, v: &VcpuState, saved: &Cpuid, host: &Cpuid, out: &mut Incompatible) {
        let len = v.xsave.len();
        if len < LEGACY_XSAVE_WORDS {
            out.other(format!(
                "the saved XSAVE image is {} bytes, less than the {}-byte legacy area",
                len * 4,
                LEGACY_XSAVE_WORDS * 4
            ));
            return;
        }
        if len > self.xsave_words {
            let too_large = vcpu_state::Error::XsaveTooLarge {
                saved: len * 4,
                host: self.xsave_words * 4,
            };
            out.other(too_large.to_string());
        }
        let xstate_bv =
            u64::from(v.xsave[XSTATE_BV_WORD + 1]) << 32 | u64::from(v.xsave[XSTATE_BV_WORD]);
        let xcrs = &v.xcrs.0;
        let xcr0 = xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(0, |x| x.value);
        let offered = host.xcr0_mask() | LEGACY_XSTATE;
        for c in bits((xstate_bv | xcr0) & !offered) {
            out.missing(xstate_name(c));
        }
        for c in bits(saved.xcr0_mask() & offered & !LEGACY_XSTATE) {
            let size_at = |t: &Cpuid| t.entry(0xd, c).map_or((0, 0), |e| (e.eax, e.ebx));
            let ((ss, so), (hs, ho)) = (size_at(saved), size_at(host));
            if (ss, so) != (hs, ho) {
                out.other(format!(
                    "the {} is {ss:#x} bytes at offset {so:#x} in the guest's XSAVE layout, \
                     {hs:#x} bytes at {ho:#x} on this host",
                    xstate_name(c)
                ));
            }
        }
    }
}

/// "GenuineIntel family 0x6 model 0xcf" from the CPUID a guest saw.
pub fn describe_saved(cpuid: &[CpuidEntry]) -> String {
    describe(&Cpuid(cpuid, &[]))
}

/// Vendor, family and model (SDM vol. 2A, CPUID leaf 1 EAX: the extended
/// fields count for family 0xf, the extended model for 0x6 too).
fn describe(t: &Cpuid) -> String {
    let eax = t.reg(1, 0, Reg::Eax);
    let base = (eax >> 8) & 0xf;
    let family = if base == 0xf {
        base + ((eax >> 20) & 0xff)
    } else {
        base
    };
    let mut model = (eax >> 4) & 0xf;
    if base == 0x6 || base == 0xf {
        model |= ((eax >> 16) & 0xf) << 4;
    }
    format!("{} family {family:#x} model {model:#x}", t.vendor())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu_state::MsrEntry;
    use kvm_bindings::kvm_xcrs;

    const INTEL: [u32; 3] = [0x756e_6547, 0x6c65_746e, 0x4965_6e69]; // ebx ecx edx
    const AMD: [u32; 3] = [0x6874_7541, 0x444d_4163, 0x6974_6e65];

    fn e(function: u32, index: u32, regs: [u32; 4]) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
        }
    }

    fn vendor(v: [u32; 3]) -> CpuidEntry {
        CpuidEntry {
            flags: 0,
            ..e(0, 0, [0xd, v[0], v[1], v[2]])
        }
    }

    #[test]
    fn the_supported_cpuid_an_exec_hands_over_reads_back_only_on_its_boot() {
        let entries: Vec<_> = cpu(AMD)
            .iter()
            .map(kvm_bindings::kvm_cpuid_entry2::from)
            .collect();
        let supported = CpuId::from_entries(&entries).unwrap();
        let boot = "6a1a47c4-0b0e-4b34-a0e3-2d0b0f3f0c11";
        let text = supported_text(boot, &supported);
        let back = supported_of_text(boot, &text).expect("reads back");
        assert_eq!(back.as_slice(), supported.as_slice());
        // Another boot's (a kexec since, or a stale environment) is not taken.
        assert!(supported_of_text("another-boot", &text).is_none());
        // Nor one that does not read whole.
        for bad in [
            boot.to_string(),
            format!("{boot};1,2,3"),
            format!("{boot};1,2,3,4,5,6,7,8"),
            format!("{boot};1,2,3,4,5,6,x"),
            format!("{text};"),
            format!(
                "{boot}{}",
                ";0,0,0,0,0,0,0".repeat(KVM_MAX_CPUID_ENTRIES + 1)
            ),
        ] {
            assert!(supported_of_text(boot, &bad).is_none(), "{bad}");
        }
    }

    /// A CPU with SSE2, AVX2, x87/SSE/AVX state and 48-bit addresses.
    fn cpu(v: [u32; 3]) -> Vec<CpuidEntry> {
        vec![
            vendor(v),
            e(1, 0, [0x000c_06f2, 0, 1 << 28, 1 << 26]),
            e(7, 0, [0, 1 << 5, 0, 0]),
            e(0xd, 0, [0b111, 0x340, 0x340, 0]),
            e(0xd, 2, [0x100, 0x240, 0, 0]),
            e(0x8000_0008, 0, [48, 0, 0, 0]),
        ]
    }

    fn host(cpuid: Vec<CpuidEntry>) -> HostCpu {
        HostCpu {
            effective: cpuid,
            supported: Vec::new(),
            xsave_words: LEGACY_XSAVE_WORDS,
            msrs: vec![0x10, 0x1a0],
        }
    }

    /// A vCPU that saw `cpuid`, with XCR0 and XSTATE_BV as given.
    fn vcpu(cpuid: &[CpuidEntry], xcr0: u64, xstate_bv: u64) -> VcpuState {
        let mut v = VcpuState {
            cpuid: heapless::Vec::from_slice(cpuid).unwrap(),
            ..Default::default()
        };
        v.xsave.resize(LEGACY_XSAVE_WORDS, 0).unwrap();
        v.xsave[XSTATE_BV_WORD] = xstate_bv as u32;
        v.xsave[XSTATE_BV_WORD + 1] = (xstate_bv >> 32) as u32;
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].value = xcr0;
        v.xcrs.0 = xcrs;
        v.msrs
            .push(MsrEntry {
                index: 0x10,
                data: 0,
            })
            .unwrap();
        v
    }

    fn refusal(h: &HostCpu, v: &VcpuState) -> Incompatible {
        match h.check([v]) {
            Err(Error::Incompatible(i)) => i,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn set(cpuid: &mut [CpuidEntry], leaf: u32, sub: u32, f: impl Fn(&mut CpuidEntry)) {
        f(cpuid
            .iter_mut()
            .find(|e| e.function == leaf && e.index == sub)
            .unwrap());
    }

    #[test]
    fn the_same_cpu_is_accepted() {
        let c = cpu(INTEL);
        assert!(host(c.clone()).check([&vcpu(&c, 0b111, 0b111)]).is_ok());
    }

    #[test]
    fn a_subset_is_accepted_and_dynamic_bits_are_no_promise() {
        let h = cpu(INTEL);
        let mut saved = cpu(INTEL);
        // Fewer features, plus what molt and KVM set themselves: hypervisor and
        // HTT (molt), OSXSAVE and OSPKE (KVM, following CR4).
        set(&mut saved, 7, 0, |e| {
            e.ebx = 0;
            e.ecx = LEAF7_ECX_OSPKE;
        });
        set(&mut saved, 1, 0, |e| {
            e.ecx |= LEAF1_ECX_OSXSAVE | LEAF1_ECX_HYPERVISOR;
            e.edx |= LEAF1_EDX_HTT;
        });
        assert!(host(h).check([&vcpu(&saved, 0b11, 0b1)]).is_ok());
    }

    #[test]
    fn missing_features_are_named() {
        let h = host(cpu(AMD));
        let mut saved = cpu(INTEL);
        set(&mut saved, 7, 0, |e| {
            e.ebx |= 1 << 16; // avx512f
            e.ecx |= 1 << 3; // pku
            e.edx |= 1 << 12; // no name
        });
        let i = refusal(&h, &vcpu(&saved, 0b111, 0b11));
        assert_eq!(i.missing, ["avx512f", "pku", "leaf 0x7.0 edx bit 12"]);
        assert_eq!(
            i.to_string(),
            "this host's KVM lacks CPU features the guest was started with: avx512f, pku, \
             leaf 0x7.0 edx bit 12 (saved on GenuineIntel, this host is AuthenticAMD)"
        );
    }

    #[test]
    fn what_a_vcpu_shows_beyond_the_supported_list_is_offered() {
        let mut saved = cpu(INTEL);
        set(&mut saved, 7, 0, |e| e.ebx |= 1 << 16); // avx512f
        let mut h = host(saved.clone());
        h.supported = cpu(INTEL);
        assert!(h.check([&vcpu(&saved, 0b111, 0b111)]).is_ok());
        // And the reverse: a bit only KVM_GET_SUPPORTED_CPUID reports.
        std::mem::swap(&mut h.supported, &mut h.effective);
        assert!(h.check([&vcpu(&saved, 0b111, 0b111)]).is_ok());
        h.supported = cpu(INTEL);
        assert_eq!(
            refusal(&h, &vcpu(&saved, 0b111, 0b111)).missing,
            ["avx512f"]
        );
    }

    #[test]
    fn another_vendor_alone_is_accepted() {
        let c = cpu(INTEL);
        assert!(host(cpu(AMD)).check([&vcpu(&c, 0b111, 0b111)]).is_ok());
    }

    #[test]
    fn amd_extended_edx_counts_what_leaf_1_offers() {
        let mut saved = cpu(AMD);
        saved.push(e(0x8000_0001, 0, [0, 0, 0, 1 << 23 | 1 << 22])); // mmx, mmxext
        let mut h = cpu(INTEL);
        set(&mut h, 1, 0, |e| e.edx |= 1 << 23); // mmx, in leaf 1 only
        h.push(e(0x8000_0001, 0, [0, 0, 0, 0]));
        let i = refusal(&host(h), &vcpu(&saved, 0b111, 0b111));
        assert_eq!(i.missing, ["mmxext"]);
    }

    #[test]
    fn xsave_components_the_host_lacks_are_refused() {
        let mut saved = cpu(INTEL);
        set(&mut saved, 0xd, 0, |e| e.eax |= 1 << 9); // the guest saw PKRU state
        saved.push(e(0xd, 9, [8, 0xa80, 0, 0]));
        // Its XCR0 enables it, XSTATE_BV holds it: both are named once.
        let i = refusal(&host(cpu(INTEL)), &vcpu(&saved, 0x207, 0x200));
        assert_eq!(i.missing, ["pkru state"]);
        assert!(i.other.is_empty(), "{i}");
        // A hostile XSTATE_BV beyond the CPUID the guest saw is refused too.
        let c = cpu(INTEL);
        let i = refusal(&host(c.clone()), &vcpu(&c, 0b111, 1 << 18));
        assert_eq!(i.missing, ["amx tiledata state"]);
    }

    #[test]
    fn xsave_layout_differences_are_refused() {
        let saved = cpu(INTEL);
        let mut h = cpu(AMD);
        set(&mut h, 0xd, 2, |e| e.ebx = 0x300);
        let i = refusal(&host(h), &vcpu(&saved, 0b111, 0b111));
        assert!(i.missing.is_empty());
        assert_eq!(
            i.other,
            [
                "the avx state is 0x100 bytes at offset 0x240 in the guest's XSAVE layout, \
              0x100 bytes at 0x300 on this host"
            ]
        );
    }

    #[test]
    fn xsave_image_must_fit_the_host_buffer() {
        let c = cpu(INTEL);
        let mut v = vcpu(&c, 0b111, 0b111);
        v.xsave.resize(LEGACY_XSAVE_WORDS + 16, 0).unwrap();
        let i = refusal(&host(c.clone()), &v);
        assert_eq!(
            i.other,
            ["the saved XSAVE image is 4160 bytes, this host's KVM takes 4096 (KVM_CAP_XSAVE2)"]
        );
        let mut bigger = host(c.clone());
        bigger.xsave_words = LEGACY_XSAVE_WORDS + 16;
        assert!(bigger.check([&v]).is_ok());
        v.xsave.truncate(16);
        let i = refusal(&host(c), &v);
        assert!(i.other[0].contains("64 bytes, less than"), "{i}");
    }

    #[test]
    fn wider_physical_addresses_and_unknown_msrs_are_refused() {
        let mut saved = cpu(INTEL);
        set(&mut saved, 0x8000_0008, 0, |e| e.eax = 52);
        let mut v = vcpu(&saved, 0b111, 0b111);
        v.msrs
            .push(MsrEntry {
                index: 0xe1,
                data: 0,
            })
            .unwrap();
        let i = refusal(&host(cpu(INTEL)), &v);
        assert_eq!(
            i.other,
            [
                "the guest has 52-bit physical addresses, this host's KVM offers 48",
                "this host's KVM does not save or restore MSRs the guest had: 0xe1",
            ]
        );
        assert_eq!(
            i.to_string(),
            "the guest has 52-bit physical addresses, this host's KVM offers 48; this host's \
             KVM does not save or restore MSRs the guest had: 0xe1"
        );
    }

    #[test]
    fn every_vcpu_is_checked_and_findings_are_merged() {
        let c = cpu(INTEL);
        let mut avx512 = c.clone();
        set(&mut avx512, 7, 0, |e| e.ebx |= 1 << 16);
        let h = host(c.clone());
        let (a, b) = (vcpu(&c, 0b111, 0b111), vcpu(&avx512, 0b111, 0b111));
        match h.check([&a, &b, &b]) {
            Err(Error::Incompatible(i)) => assert_eq!(i.missing, ["avx512f"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn describe_names_vendor_family_and_model() {
        assert_eq!(
            describe_saved(&cpu(INTEL)),
            "GenuineIntel family 0x6 model 0xcf"
        );
        let mut amd = cpu(AMD);
        set(&mut amd, 1, 0, |e| e.eax = 0x00b0_0f21);
        assert_eq!(describe_saved(&amd), "AuthenticAMD family 0x1a model 0x2");
        assert_eq!(
            describe_saved(&[]),
            "an unknown vendor family 0x0 model 0x0"
        );
    }

    /// The golden state (an Intel Xeon, family 6 model 0xcf) against its own CPUID
    /// (accepted) and against that CPUID without AVX-512F and PKRU state.
    #[test]
    fn golden_state_against_fixed_hosts() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/state-v1.bin");
        let bytes = std::fs::read(&path).unwrap();
        let (_, len) = crate::cpr::state::header(&bytes).unwrap();
        let state =
            crate::cpr::state::decode(&bytes[..crate::cpr::state::HEADER_LEN + len]).unwrap();
        let v = &state.machine.vcpus[0];
        let mut own = HostCpu {
            effective: v.cpuid.to_vec(),
            supported: Vec::new(),
            xsave_words: LEGACY_XSAVE_WORDS,
            msrs: v.msrs.iter().map(|m| m.index).collect(),
        };
        own.msrs.sort_unstable();
        assert!(own.check([&**v]).is_ok());
        let mut lesser = own;
        set(&mut lesser.effective, 7, 0, |e| e.ebx &= !(1 << 16));
        set(&mut lesser.effective, 0xd, 0, |e| e.eax &= !(1 << 9));
        let i = refusal(&lesser, v);
        assert_eq!(i.missing, ["avx512f", "pkru state"]);
    }
}
