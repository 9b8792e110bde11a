//! The machine: guest RAM, the KVM VM, its vCPUs and the port bus. This module
//! and its children are the only users of kvm-ioctls.
//!
//! Boot sequence: RAM -> VM (memslots, irqchip, PIT) -> devices -> guest images
//! -> vCPUs -> threads.

pub mod cpu;
pub mod devices;
pub mod floor;
pub mod host_cpu;
pub mod kvm;
pub mod memory;
mod passthrough;
pub mod pod;
mod saved;
pub mod vcpu;
pub mod vcpu_state;

use std::fmt;
use std::sync::{Arc, Mutex};

use heapless::Vec as BoundedVec;
use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::args::RunConfig;
use crate::boot::acpi::{self, Waking, FACS_LEN};
use crate::boot::{self, BootSpec, Entry};
use crate::bus::Bus;
use crate::devices::power::Power;
use crate::devices::serial::{self, Output, Serial};
use crate::layout::{ACPI_FACS_START, MAX_DISKS, MAX_NICS, SERIAL_IRQ};
use crate::pci::Allocator;
use crate::phases::Phases;
use crate::sync::lock;
use crate::vfio::{self, HandedOver, Handles, Iommu, Sysfs};
use devices::{SharedVfio, SharedVirtio};
use host_cpu::HostCpu;
use kvm::GsiRoutes;
use memory::GuestRam;
use vcpu::{ExitSink, Vcpus};
use vcpu_state::{CpuidEntry, SaveSpec};

pub use saved::{mac_str, MachineState, MachineStateV1, MachineStateV2, MachineStateV3, Shape};

/// Most virtio devices a machine has.
pub const MAX_DEVICES: usize = MAX_DISKS + MAX_NICS;

#[derive(Debug)]
pub enum Error {
    Memory(memory::Error),
    Kvm(kvm::Error),
    Boot(boot::Error),
    Vcpu(vcpu::Error),
    Devices(devices::Error),
    HostCpu(host_cpu::Error),
    /// The saved machine's shape differs from this one's: each difference,
    /// human-readable (`Shape::differences`).
    Shape(Vec<String>),
    /// The devices sit at other PCI addresses than the saved ones.
    Placement,
    /// The UART refuses the saved state.
    Serial(serial::Error),
    /// Virtio device `usize` refuses its saved state.
    Device(usize, crate::virtio::pci::Error),
    /// A machine built without vCPUs: nothing to ask what this host offers.
    NoVcpus,
    Quiesce(usize, std::io::Error),
    /// The eventfd a suspend request is signalled on.
    SleepEvent(std::io::Error),
    /// `wakeup` of a guest that is not suspended.
    NotSuspended,
    ReadFacs(vm_memory::GuestMemoryError),
    /// The FACS holds no usable waking vector.
    Wake(acpi::WakeError),
    /// The waking vector is not in guest RAM.
    WakeOutsideRam(Waking),
    WakeTables(vm_memory::GuestMemoryError),
    Vfio(vfio::Error),
    /// A live update with passed-through devices cannot be made: why.
    VfioUpdate(String),
    /// The saved state has another number of passed-through devices.
    VfioCount {
        saved: usize,
        now: usize,
    },
}

/// How every refusal of a saved state that does not fit begins.
const MISMATCH: &str = "state does not fit this machine";

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Memory(e) => e.fmt(f),
            Error::Kvm(e) => e.fmt(f),
            Error::Boot(e) => e.fmt(f),
            Error::Vcpu(e) => e.fmt(f),
            Error::Devices(e) => e.fmt(f),
            Error::HostCpu(e) => e.fmt(f),
            Error::Shape(d) => write!(f, "{MISMATCH}: {}", d.join("; ")),
            Error::Placement => write!(f, "{MISMATCH}: devices are placed differently"),
            Error::Serial(e) => write!(f, "{MISMATCH}: {e}"),
            Error::Device(i, e) => write!(f, "{MISMATCH}: device {i}: {e}"),
            Error::NoVcpus => write!(f, "{MISMATCH}: a machine without vCPUs"),
            Error::Quiesce(i, e) => write!(f, "device {i} cannot flush before saving: {e}"),
            Error::SleepEvent(e) => write!(f, "cannot create the ACPI sleep eventfd: {e}"),
            Error::NotSuspended => write!(f, "the guest is not suspended"),
            Error::ReadFacs(e) => write!(f, "cannot read the FACS at {ACPI_FACS_START:#x}: {e}"),
            Error::Wake(e) => e.fmt(f),
            Error::WakeOutsideRam(w) => {
                write!(f, "the FACS waking vector ({w}) is outside guest RAM")
            }
            Error::WakeTables(e) => write!(f, "cannot write the wake page tables: {e}"),
            Error::Vfio(e) => e.fmt(f),
            Error::VfioUpdate(why) => write!(f, "VFIO: {why}"),
            Error::VfioCount { saved, now } => write!(
                f,
                "{MISMATCH}: passed-through devices: saved {saved}, now {now}"
            ),
        }
    }
}

/// What the VFIO part of a live update's pause took, in µs, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct VfioTimes {
    /// New side: the DMA mappings given this process's addresses.
    pub map_vaddr_us: u64,
    /// New side: the interrupt eventfds bound as this VM's irqfds.
    pub irq_attach_us: u64,
}

/// What a machine's guest depends on, borrowed: what an update hands over.
pub struct Backends {
    pub ram: std::os::fd::RawFd,
    /// Disk images and taps, each in argv order.
    pub disks: Vec<std::os::fd::RawFd>,
    pub taps: Vec<std::os::fd::RawFd>,
    /// The console's output, unless it is discarded.
    pub console_out: Option<std::os::fd::RawFd>,
    /// The VM's and the vCPUs' descriptors. Useless to another image, but while
    /// one stays open KVM does not tear the VM down: an exec keeps them open and
    /// the new image closes them after the guest runs again, which takes that
    /// teardown (~16 ms, KVM waiting out SRCU readers) out of the pause.
    pub kvm: Vec<std::os::fd::RawFd>,
}

/// Everything one guest is made of. Fields drop in order: threads stop first.
pub struct Machine {
    pub vcpus: Vcpus,
    pub bus: Arc<Bus>,
    pub virtio: Vec<SharedVirtio>,
    pub vfio: Vec<SharedVfio>,
    vfio_slots: Vec<u8>,
    iommu: Option<Iommu>,
    pub ram: GuestRam,
    pub shape: Shape,
    /// The guest suspended itself to RAM (ACPI S3): its vCPUs stay stopped
    /// until `wakeup`.
    suspended: bool,
    allocator: Allocator,
    _routes: Arc<GsiRoutes>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    /// What a save reads of each vCPU, asked of KVM once, not in the pause.
    save_spec: Arc<SaveSpec>,
}

/// A machine built but not yet holding a saved state: its vCPUs exist, each
/// with its thread, parked before it ever runs, and what this host's KVM
/// offers them is known.
pub struct Prepared {
    parts: Parts,
    vcpus: Vcpus,
    /// The CPUID each vCPU answers with, set from argv and this host's KVM.
    cpuids: Vec<Vec<CpuidEntry>>,
    host: HostCpu,
}

/// A machine holding a saved state, its vCPUs not yet running.
pub struct Restored {
    parts: Parts,
    vcpus: Vcpus,
    /// With adopted passed-through devices: what their part took.
    pub vfio_times: Option<VfioTimes>,
}

impl Prepared {
    /// Fills the VM's page tables for the RAM holding data, within `budget`
    /// (`kvm::prefault`, through vCPU 0, parked): a transfer's new side does it
    /// before the pause, so the guest does not refill them after it.
    pub fn prefault(&self, budget: std::time::Duration) -> kvm::Prefault {
        let vcpu = self.vcpus.raw_fds()[0];
        kvm::prefault(&self.parts.vm, vcpu, &self.parts.ram, budget)
    }

    /// Loads `state`: the reverse of `save`, devices first (raising their pending
    /// interrupts again), then the VM's interrupt controllers and clock, then the
    /// vCPUs, each on its own thread, all at once. Refuses a state of another
    /// shape, listing the differences, and one whose vCPUs need what this
    /// host's KVM lacks, naming it, before any of it is loaded.
    pub fn restore(self, state: &MachineState, phases: &mut Phases) -> Result<Restored, Error> {
        let Prepared {
            parts,
            vcpus,
            cpuids,
            host,
        } = self;
        let diff = parts.shape(vcpus.count() as u8).differences(&state.shape);
        if !diff.is_empty() {
            return Err(Error::Shape(diff));
        }
        if parts.allocator != state.allocator {
            return Err(Error::Placement);
        }
        if parts.vfio.len() != state.vfio.len() {
            return Err(Error::VfioCount {
                saved: state.vfio.len(),
                now: parts.vfio.len(),
            });
        }
        host.check(state.vcpus.iter().map(|v| &**v))
            .map_err(Error::HostCpu)?;
        // Adopted passed-through devices: the DMA mappings take this
        // process's addresses (the old one released them in its pause), then
        // the virtualized registers and interrupt routes come back.
        let mut times = None;
        if parts.vfio_adopted {
            let t = std::time::Instant::now();
            if let Some(iommu) = &parts.iommu {
                iommu
                    .take_vaddr(&parts.ram.host_regions(), parts.vfio_take_back)
                    .map_err(|e| parts.vfio_error(vfio::Why::Ioctl(e)))?;
            }
            crate::cpr::fault::point("vaddr");
            times = Some(VfioTimes {
                map_vaddr_us: t.elapsed().as_micros() as u64,
                ..VfioTimes::default()
            });
        }
        // Devices opened afresh (reboot mode: the guest was suspended to RAM)
        // start as opened: the guest's PCI core writes their registers back
        // when it wakes, and molt arms their interrupts as it does.
        let adopted_vfio = if parts.vfio_adopted {
            &parts.vfio[..]
        } else {
            &[]
        };
        for (dev, saved) in adopted_vfio.iter().zip(&state.vfio) {
            let mut dev = lock(dev);
            let bdf = dev.bdf();
            dev.restore(saved)
                .map_err(|why| Error::Vfio(vfio::Error { bdf, why }))?;
        }
        lock(&parts.bus.serial)
            .restore(&state.serial)
            .map_err(Error::Serial)?;
        lock(&parts.bus.power).restore(&state.power);
        for (i, (dev, saved)) in parts.virtio.iter().zip(&state.virtio).enumerate() {
            lock(dev).restore(saved).map_err(|e| Error::Device(i, e))?;
        }
        phases.mark("restore_devices");
        kvm::restore_vm(&parts.vm, &state.vm).map_err(Error::Kvm)?;
        phases.mark("restore_vm");
        // The CPUID was set when the vCPUs were made: it is set again only if the
        // guest's differs (saved under another host kernel or KVM).
        let cpuid_set: vcpu::Jobs<bool> = state
            .vcpus
            .iter()
            .zip(&cpuids)
            .map(|(v, set)| !set.is_empty() && vcpu_state::cpuid_matches(&v.cpuid, set))
            .collect();
        let took = vcpus
            .restore(&state.vcpus, &cpuid_set)
            .map_err(Error::Vcpu)?;
        phases.mark("restore_vcpus");
        phases.slowest("vcpu_restore_max", took);
        // Interrupts that arrived while no VM listened wait in the eventfds:
        // binding them as this VM's irqfds delivers them, into the restored
        // interrupt controllers.
        if let Some(t) = &mut times {
            let start = std::time::Instant::now();
            devices::attach_vfio(&parts.vm, &parts.vfio, true).map_err(Error::Kvm)?;
            t.irq_attach_us = start.elapsed().as_micros() as u64;
        }
        Ok(Restored {
            parts,
            vcpus,
            vfio_times: times,
        })
    }
}

impl Restored {
    /// Runs the vCPUs: the guest's pause ends here, as the first one is let
    /// run (the `start` mark, just before). With `paused`, they stay parked,
    /// as a guest the user had paused: `resume` runs them.
    pub fn start(self, paused: bool, phases: &mut Phases) -> Machine {
        phases.mark("start");
        if !paused {
            self.vcpus.resume();
        }
        self.parts.into_machine(self.vcpus)
    }
}

/// What a save reads of each vCPU on this host.
fn save_spec(kvm: &Kvm) -> Result<SaveSpec, Error> {
    Ok(SaveSpec {
        msr_indices: host_cpu::msr_indices(kvm).map_err(Error::HostCpu)?,
        xsave_words: host_cpu::xsave_words(kvm),
    })
}

/// vCPUs made, and the CPUID each was given.
type NewVcpus = (Vec<VcpuFd>, Vec<Vec<CpuidEntry>>);

/// `count` vCPUs of `vm` with their CPUID (`vcpu::create`), and that CPUID.
fn create_vcpus(
    vm: &VmFd,
    memory: &vm_memory::GuestMemoryMmap,
    supported: &CpuId,
    count: u8,
    entry: Option<Entry>,
) -> Result<NewVcpus, Error> {
    (0..count)
        .map(|i| vcpu::create(supported, vm, memory, i, count, entry))
        .collect::<Result<Vec<_>, _>>()
        .map(|v| v.into_iter().unzip())
        .map_err(Error::Vcpu)
}

/// `create_vcpus` for a restore (no entry point), and what this host's KVM
/// offers them, asked of vCPU 0.
fn vcpus_with_host(
    kvm: &Kvm,
    vm: &VmFd,
    memory: &vm_memory::GuestMemoryMmap,
    supported: &CpuId,
    count: u8,
) -> Result<(NewVcpus, HostCpu), Error> {
    let (fds, cpuids) = create_vcpus(vm, memory, supported, count, None)?;
    let probe = fds.first().ok_or(Error::NoVcpus)?;
    let host = HostCpu::query(kvm, supported, probe).map_err(Error::HostCpu)?;
    Ok(((fds, cpuids), host))
}

/// A machine's VM (memslots over its RAM, irqchip, PIT) and its vCPUs with
/// their CPUID, made before anything else, and what this host's KVM offers
/// them (asked of vCPU 0). Reboot mode makes them on a second thread while
/// it reads and checks the state: none of it touches what the state names
/// (RAM is mapped only as it is, `GuestRam::map_as_is`), and a refused state
/// drops it. `Machine::prepare_early` builds the rest around it.
pub struct Early {
    /// What this host's KVM offers the vCPUs: the state's are checked against it.
    pub host: HostCpu,
    kvm: Kvm,
    vm: VmFd,
    save_spec: SaveSpec,
    fds: Vec<VcpuFd>,
    cpuids: Vec<Vec<CpuidEntry>>,
}

impl Early {
    /// `cfg`'s VM and vCPUs over `ram` (given to `prepare_early` with
    /// them). KVM_GET_SUPPORTED_CPUID (~0.3-0.6 ms here) is asked on another
    /// thread while the VM is created. The vCPUs (~0.15 ms each here) are
    /// made one after the other: half of them on a third thread was slower
    /// on this 2-core machine, the state being read and checked meanwhile.
    pub fn make(cfg: &RunConfig, ram: &GuestRam) -> Result<Self, Error> {
        let kvm = Kvm::new()
            .map_err(kvm::Error::OpenKvm)
            .map_err(Error::Kvm)?;
        let (vm, supported) =
            host_cpu::while_supported_is_asked(&kvm, || kvm::create_vm_of(&kvm, ram));
        let vm = vm.map_err(Error::Kvm)?;
        let supported = supported.map_err(Error::HostCpu)?;
        let ((fds, cpuids), host) = vcpus_with_host(&kvm, &vm, &ram.memory, &supported, cfg.vcpus)?;
        let save_spec = save_spec(&kvm)?;
        Ok(Early {
            host,
            kvm,
            vm,
            save_spec,
            fds,
            cpuids,
        })
    }
}

/// A machine with RAM, VM and devices but no vCPUs yet.
struct Parts {
    ram: GuestRam,
    kvm: Kvm,
    vm: Arc<VmFd>,
    routes: Arc<GsiRoutes>,
    bus: Arc<Bus>,
    virtio: Vec<SharedVirtio>,
    vfio: Vec<SharedVfio>,
    vfio_slots: Vec<u8>,
    iommu: Option<Iommu>,
    /// The passed-through devices were handed over by a live update: DMA
    /// mappings and irqfds are taken over at restore.
    vfio_adopted: bool,
    /// ... and mappings a failed process took may be taken back from it
    /// (`HandedOver::take_back`).
    vfio_take_back: bool,
    allocator: Allocator,
    save_spec: Arc<SaveSpec>,
}

impl Parts {
    /// `vfio`: the passed-through devices' descriptors a live update handed
    /// over, or None to open `cfg.vfio` by name.
    /// `made`: the VM `Early` made over `ram`, and what a save reads of its
    /// vCPUs (None: made here).
    fn build(
        cfg: &RunConfig,
        ram: GuestRam,
        console: Output,
        vfio: Option<HandedOver>,
        made: Option<(Kvm, VmFd, SaveSpec)>,
    ) -> Result<Self, Error> {
        // Passed-through devices first: one that cannot be used is refused
        // before KVM is touched (but for a VM `Early` made, which uses none).
        let adopted = vfio.is_some();
        let take_back = vfio.as_ref().is_some_and(|v| v.take_back);
        let handles = match vfio {
            Some(fds) => Handles::adopt(&cfg.vfio, fds, &Sysfs::host()),
            None => Handles::open(&cfg.vfio, &Sysfs::host()),
        };
        let Handles { iommu, devices } = handles.map_err(Error::Vfio)?;
        if let (Some(iommu), Some(d), false) = (&iommu, devices.first(), adopted) {
            iommu.map_ram(&ram.host_regions()).map_err(|e| {
                Error::Vfio(vfio::Error {
                    bdf: d.bdf,
                    why: vfio::Why::Ioctl(e),
                })
            })?;
        }
        let (kvm, vm, save_spec) = match made {
            Some(made) => made,
            None => {
                let (kvm, vm) = kvm::create_vm(&ram).map_err(Error::Kvm)?;
                let spec = save_spec(&kvm)?;
                (kvm, vm, spec)
            }
        };
        let (vm, save_spec) = (Arc::new(vm), Arc::new(save_spec));
        let serial_irq = kvm::irq_eventfd(&vm, SERIAL_IRQ).map_err(Error::Kvm)?;
        let routes = Arc::new(GsiRoutes::new(vm.clone()));
        let built = devices::build(cfg, &vm, &ram.memory, &routes, devices, adopted)
            .map_err(Error::Devices)?;
        if !adopted {
            devices::attach_vfio(&vm, &built.vfio, true).map_err(Error::Kvm)?;
        }
        let serial = Serial::new(Some(serial_irq), console);
        let sleep_evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(Error::SleepEvent)?;
        let bus = Arc::new(Bus {
            serial: Mutex::new(serial),
            power: Mutex::new(Power::new(sleep_evt)),
            pci: built.bus,
        });
        Ok(Parts {
            ram,
            kvm,
            vm,
            routes,
            bus,
            virtio: built.virtio,
            vfio: built.vfio,
            vfio_slots: built.vfio_slots,
            iommu,
            vfio_adopted: adopted,
            vfio_take_back: take_back,
            allocator: built.allocator,
            save_spec,
        })
    }

    /// A failure of the passed-through devices, named by the first one.
    fn vfio_error(&self, why: vfio::Why) -> Error {
        let bdf = self.vfio.first().map(|d| lock(d).bdf());
        match bdf {
            Some(bdf) => Error::Vfio(vfio::Error { bdf, why }),
            None => Error::VfioUpdate(why.to_string()),
        }
    }

    fn shape(&self, vcpus: u8) -> Shape {
        let mut disks = BoundedVec::new();
        let mut nets = BoundedVec::new();
        for d in &self.virtio {
            let d = lock(d);
            let dev = d.device();
            // Capacities match argv's limits, so the pushes cannot fail.
            if dev.device_type() == crate::virtio::TYPE_NET {
                let mut mac = [0u8; 6];
                dev.read_config(0, &mut mac);
                let _ = nets.push(mac);
            } else {
                let _ = disks.push(dev.features() & crate::virtio::block::FEATURE_RO != 0);
            }
        }
        Shape {
            vcpus,
            mem_size: self.ram.regions.iter().map(|r| r.size).sum(),
            disks,
            nets,
        }
    }

    /// vCPUs 0..`count`, with the CPUID KVM offers, and that CPUID; see
    /// `vcpu::create`.
    fn create_vcpus(
        &self,
        supported: &CpuId,
        count: u8,
        entry: Option<Entry>,
    ) -> Result<NewVcpus, Error> {
        create_vcpus(&self.vm, &self.ram.memory, supported, count, entry)
    }

    /// Every vCPU with its CPUID, and that CPUID; what this host's KVM
    /// offers them (asked of vCPU 0); their threads, parked.
    fn vcpus_parked(
        &self,
        supported: &CpuId,
        count: u8,
        exit: ExitSink,
    ) -> Result<(Vcpus, Vec<Vec<CpuidEntry>>, HostCpu), Error> {
        let ((fds, cpuids), host) =
            vcpus_with_host(&self.kvm, &self.vm, &self.ram.memory, supported, count)?;
        let xsave_words = self.save_spec.xsave_words;
        let vcpus =
            Vcpus::start(fds, self.bus.clone(), exit, true, xsave_words).map_err(Error::Vcpu)?;
        Ok((vcpus, cpuids, host))
    }

    fn start(self, fds: Vec<VcpuFd>, exit: ExitSink) -> Result<Machine, Error> {
        let xsave_words = self.save_spec.xsave_words;
        let vcpus =
            Vcpus::start(fds, self.bus.clone(), exit, false, xsave_words).map_err(Error::Vcpu)?;
        Ok(self.into_machine(vcpus))
    }

    fn into_machine(self, vcpus: Vcpus) -> Machine {
        let shape = self.shape(vcpus.count() as u8);
        Machine {
            shape,
            vcpus,
            suspended: false,
            bus: self.bus,
            virtio: self.virtio,
            vfio: self.vfio,
            vfio_slots: self.vfio_slots,
            iommu: self.iommu,
            ram: self.ram,
            allocator: self.allocator,
            _routes: self.routes,
            vm: self.vm,
            _kvm: self.kvm,
            save_spec: self.save_spec,
        }
    }
}

impl Machine {
    /// Builds the machine for `cfg`, loads the guest and starts its vCPUs.
    pub fn boot(cfg: &RunConfig, console: Output, exit: ExitSink) -> Result<Self, Error> {
        let ram = GuestRam::create(cfg.mem_size, cfg.mem_file.as_deref()).map_err(Error::Memory)?;
        let parts = Parts::build(cfg, ram, console, None, None)?;
        let spec = BootSpec {
            kernel: &cfg.kernel,
            initrd: cfg.initrd.as_deref(),
            cmdline: &cfg.cmdline,
            vcpus: cfg.vcpus,
        };
        let entry = boot::load(&parts.ram.memory, &spec).map_err(Error::Boot)?;
        let supported = host_cpu::supported_cpuid(&parts.kvm).map_err(Error::HostCpu)?;
        let (fds, _) = parts.create_vcpus(&supported, cfg.vcpus, Some(entry))?;
        parts.start(fds, exit)
    }

    /// Everything that needs no saved state: RAM mapped, VM, memslots, devices,
    /// vCPUs and their threads (parked), and what this host's KVM offers them
    /// (asked of vCPU 0). A transfer does this while the old process still
    /// runs the guest; exec and reboot mode inside the pause (reboot mode mostly
    /// through `Early`, made while it reads the state). Every vCPU gets
    /// its CPUID here, and a restore sets it again only if the saved one
    /// differs. `vfio`: the passed-through devices' descriptors an exec or
    /// transfer handed over (None: opened by name); `supported`: this host's
    /// KVM_GET_SUPPORTED_CPUID, asked ahead.
    pub fn prepare(
        cfg: &RunConfig,
        ram: GuestRam,
        console: Output,
        vfio: Option<HandedOver>,
        (exit, supported): (ExitSink, host_cpu::Supported),
    ) -> Result<Prepared, Error> {
        // `supported` was asked ahead (`Supported::ask`): in an exec, from
        // the new image's start, while it decodes and builds.
        let parts = Parts::build(cfg, ram, console, vfio, None)?;
        let supported = supported.get().map_err(Error::HostCpu)?;
        let (vcpus, cpuids, host) = parts.vcpus_parked(&supported, cfg.vcpus, exit)?;
        Ok(Prepared {
            parts,
            vcpus,
            cpuids,
            host,
        })
    }

    /// `prepare` around the VM and vCPUs `early` made over `ram`: the
    /// devices (and passed-through devices, opened by name) and the vCPUs'
    /// threads, parked.
    pub fn prepare_early(
        cfg: &RunConfig,
        (early, ram): (Early, GuestRam),
        console: Output,
        exit: ExitSink,
    ) -> Result<Prepared, Error> {
        let made = (early.kvm, early.vm, early.save_spec);
        let parts = Parts::build(cfg, ram, console, None, Some(made))?;
        let xsave_words = parts.save_spec.xsave_words;
        let vcpus = Vcpus::start(early.fds, parts.bus.clone(), exit, true, xsave_words)
            .map_err(Error::Vcpu)?;
        Ok(Prepared {
            parts,
            vcpus,
            cpuids: early.cpuids,
            host: early.host,
        })
    }

    /// Saves a paused machine. The quiesce contract: vCPUs are paused (the
    /// caller's job); devices are drained (each queue served once more, within
    /// its budget: a request completes before the notification returns or is left
    /// untouched in the avail ring for the next process's `kick_all`; virtio-net
    /// reads the tap only from the event loop, which is busy here), then saved; then the VM (irqchip,
    /// PIT, clock); then the vCPUs, each on its own thread.
    pub fn save(&self, phases: &mut Phases) -> Result<MachineState, Error> {
        for (i, d) in self.virtio.iter().enumerate() {
            lock(d).quiesce().map_err(|e| Error::Quiesce(i, e))?;
        }
        let virtio = self.virtio.iter().map(|d| lock(d).state()).collect();
        let serial = lock(&self.bus.serial).state();
        let power = lock(&self.bus.power).state();
        phases.mark("save_devices");
        let vm = kvm::save_vm(&self.vm).map_err(Error::Kvm)?;
        phases.mark("save_vm");
        let (vcpus, took) = self.vcpus.save(&self.save_spec).map_err(Error::Vcpu)?;
        phases.mark("save_vcpus");
        phases.slowest("vcpu_save_max", took);
        Ok(MachineState {
            shape: self.shape.clone(),
            vcpus,
            vm,
            serial,
            allocator: self.allocator.clone(),
            virtio,
            power,
            vfio: self.vfio.iter().map(|d| lock(d).state()).collect(),
        })
    }

    /// The descriptors the guest depends on, for the next process.
    pub fn backends(&self) -> Backends {
        use std::os::fd::AsRawFd;
        let (mut disks, mut taps) = (Vec::new(), Vec::new());
        for d in &self.virtio {
            let d = lock(d);
            let dev = d.device();
            if dev.device_type() == crate::virtio::TYPE_NET {
                taps.push(dev.backend_fd());
            } else {
                disks.push(dev.backend_fd());
            }
        }
        let mut kvm = vec![self.vm.as_raw_fd()];
        kvm.extend_from_slice(self.vcpus.raw_fds());
        Backends {
            ram: self.ram.file().as_raw_fd(),
            disks,
            taps,
            console_out: lock(&self.bus.serial).output_fd(),
            kvm,
        }
    }

    /// Closes the devices' backends (disk images, taps) so a successor process
    /// can open them by name while this one is still exiting. Only for a machine
    /// that will never run again: the process must exit without dropping it.
    pub fn release_backends(&self) {
        for d in &self.virtio {
            let fd = lock(d).device().backend_fd();
            // SAFETY: the caller exits right after (std::process::exit, no Drop),
            // so nothing uses or closes this descriptor again.
            unsafe { libc::close(fd) };
        }
    }

    pub fn mem_size(&self) -> u64 {
        self.shape.mem_size
    }

    /// Whether the guest is suspended to RAM (ACPI S3).
    pub fn is_suspended(&self) -> bool {
        self.suspended
    }

    /// The descriptor that becomes readable when the guest asks to suspend.
    pub fn sleep_fd(&self) -> std::os::fd::RawFd {
        lock(&self.bus.power).sleep_fd()
    }

    /// Whether the guest asked to suspend since the last call.
    pub fn take_sleep_request(&self) -> bool {
        lock(&self.bus.power).take_sleep_request()
    }

    /// The guest entered S3: its vCPUs stop until `wakeup`.
    pub fn suspend(&mut self) -> Result<(), Error> {
        self.vcpus.pause().map_err(Error::Vcpu)?;
        self.suspended = true;
        Ok(())
    }

    /// Wakes a suspended guest as firmware would: at the waking vector it left
    /// in the FACS, with an INIT to every vCPU first; the boot vCPU enters the
    /// vector, the others wait for SIPI. Devices keep their state (the guest's
    /// drivers reset or resume them). Refused, the guest staying suspended,
    /// when the FACS holds no vector in guest RAM. Returns where it entered.
    pub fn wakeup(&mut self) -> Result<Waking, Error> {
        if !self.suspended {
            return Err(Error::NotSuspended);
        }
        let mut facs = [0u8; FACS_LEN];
        self.ram
            .memory
            .read_slice(&mut facs, GuestAddress(ACPI_FACS_START))
            .map_err(Error::ReadFacs)?;
        let waking = acpi::waking(&facs).map_err(Error::Wake)?;
        if !self
            .ram
            .memory
            .address_in_range(GuestAddress(waking.address()))
        {
            return Err(Error::WakeOutsideRam(waking));
        }
        if let Waking::Long { rip } = waking {
            cpu::write_wake_page_tables(&self.ram.memory, rip).map_err(Error::WakeTables)?;
        }
        self.vcpus.wake(waking).map_err(Error::Vcpu)?;
        lock(&self.bus.power).woke();
        self.suspended = false;
        self.vcpus.resume();
        Ok(waking)
    }
}
