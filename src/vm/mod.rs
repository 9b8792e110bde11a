//! The machine: guest RAM, the KVM VM, its vCPUs and the port bus. This module
//! and its children are the only users of kvm-ioctls.
//!
//! Boot sequence: RAM -> VM (irqchip, PIT, memslots) -> devices -> guest images
//! -> vCPUs -> threads.

pub mod cpu;
pub mod devices;
pub mod kvm;
pub mod memory;
pub mod vcpu;

use std::fmt;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};

use crate::args::RunConfig;
use crate::boot::{self, BootSpec};
use crate::bus::Bus;
use crate::devices::serial::{Output, Serial};
use crate::layout::SERIAL_IRQ;
use devices::SharedVirtio;
use kvm::GsiRoutes;
use memory::GuestRam;
use vcpu::{ExitSink, Vcpus};

#[derive(Debug)]
pub enum Error {
    Memory(memory::Error),
    Kvm(kvm::Error),
    Boot(boot::Error),
    Vcpu(vcpu::Error),
    Devices(devices::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Memory(e) => e.fmt(f),
            Error::Kvm(e) => e.fmt(f),
            Error::Boot(e) => e.fmt(f),
            Error::Vcpu(e) => e.fmt(f),
            Error::Devices(e) => e.fmt(f),
        }
    }
}

/// Everything one guest is made of. Fields drop in order: threads stop first.
pub struct Machine {
    pub vcpus: Vcpus,
    pub bus: Arc<Bus>,
    pub virtio: Vec<SharedVirtio>,
    pub ram: GuestRam,
    _routes: Arc<GsiRoutes>,
    _vm: Arc<VmFd>,
    _kvm: Kvm,
}

impl Machine {
    /// Builds the machine for `cfg` and starts its vCPUs.
    pub fn boot(cfg: &RunConfig, console: Output, exit: ExitSink) -> Result<Self, Error> {
        let ram = GuestRam::create(cfg.mem_size, cfg.mem_file.as_deref()).map_err(Error::Memory)?;
        let (kvm, vm) = kvm::create_vm(&ram).map_err(Error::Kvm)?;
        let vm = Arc::new(vm);
        let serial_irq = kvm::irq_eventfd(&vm, SERIAL_IRQ).map_err(Error::Kvm)?;
        let routes = Arc::new(GsiRoutes::new(vm.clone()));
        let (pci, virtio) =
            devices::build(cfg, &vm, &ram.memory, &routes).map_err(Error::Devices)?;
        let bus = Arc::new(Bus {
            serial: Mutex::new(Serial::new(Some(serial_irq), console)),
            pci,
        });
        let spec = BootSpec {
            kernel: &cfg.kernel,
            initrd: cfg.initrd.as_deref(),
            cmdline: &cfg.cmdline,
            vcpus: cfg.vcpus,
            ram: &ram.regions,
        };
        let entry = boot::load(&ram.memory, &spec).map_err(Error::Boot)?;
        let fds = (0..cfg.vcpus)
            .map(|i| vcpu::create(&kvm, &vm, &ram.memory, i, cfg.vcpus, entry))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Vcpu)?;
        let vcpus = Vcpus::start(fds, bus.clone(), exit).map_err(Error::Vcpu)?;
        Ok(Machine {
            vcpus,
            bus,
            virtio,
            ram,
            _routes: routes,
            _vm: vm,
            _kvm: kvm,
        })
    }

    pub fn mem_size(&self) -> u64 {
        self.ram.regions.iter().map(|r| r.size).sum()
    }
}
