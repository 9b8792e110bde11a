//! Building the machine's devices: the PCI bus with one virtio-pci function per
//! `--disk` and `--net`, each with its BAR, MSI vectors (irqfds on fixed GSIs)
//! and queue notifiers (ioeventfds), then one passed-through function per
//! `--vfio` with its BARs, MSI and MSI-X vectors and memslots, all from the
//! deterministic allocator. Passed-through functions come last, so a machine
//! without them is placed as before they existed.

use std::fmt;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use super::kvm::{self, DeviceMemory, GsiRoutes};
use crate::args::RunConfig;
use crate::layout::VFIO_MEMSLOT_START;
use crate::pci::config::NUM_BARS;
use crate::pci::{AllocError, Allocator, PciBus, SharedFunction};
use crate::vfio::device::{Resources as VfioResources, MEMSLOTS};
use crate::vfio::{self, DeviceHandles, VfioPci};
use crate::virtio::pci::{vectors_needed, Resources, VirtioPci, BAR_SIZE};
use crate::virtio::{block::Block, net::Net, VirtioDevice};

#[derive(Debug)]
pub enum Error {
    Block(crate::virtio::block::Error),
    Net(crate::virtio::net::Error),
    Alloc(AllocError),
    Kvm(kvm::Error),
    Transport(std::io::Error),
    Vfio(vfio::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Block(e) => e.fmt(f),
            Error::Net(e) => e.fmt(f),
            Error::Alloc(e) => write!(f, "cannot place a PCI device: {e}"),
            Error::Kvm(e) => e.fmt(f),
            Error::Transport(e) => write!(f, "virtio-pci setup failed: {e}"),
            Error::Vfio(e) => e.fmt(f),
        }
    }
}

pub type SharedVirtio = Arc<Mutex<VirtioPci>>;
pub type SharedVfio = Arc<Mutex<VfioPci>>;

/// The machine's devices, as `build` made them.
pub struct Built {
    pub bus: PciBus,
    pub virtio: Vec<SharedVirtio>,
    pub vfio: Vec<SharedVfio>,
    /// The PCI slot of each passed-through device, as `vfio_slot` predicts.
    pub vfio_slots: Vec<u8>,
    pub allocator: Allocator,
}

/// The PCI slot `build` gives passed-through device `i` of a machine with
/// `virtio` virtio functions: the allocator hands slots out in order from 1,
/// virtio functions first (argv's limits keep them all on the bus). A restart
/// checks argv against the saved slots with it before anything is built.
pub fn vfio_slot(virtio: usize, i: usize) -> u8 {
    (1 + virtio + i) as u8
}

/// Creates every configured device: disks, then NICs, then the
/// passed-through devices `vfio` (opened, or `adopted` from a live update),
/// each in argv order. Their irqfds are bound by the caller (`attach_vfio`).
pub fn build(
    cfg: &RunConfig,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    routes: &Arc<GsiRoutes>,
    vfio: Vec<DeviceHandles>,
    adopted: bool,
) -> Result<Built, Error> {
    let mut bus = PciBus::new();
    let mut alloc = Allocator::new();
    let mut virtio = Vec::new();
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in &cfg.disks {
        devices.push(Box::new(Block::new(d).map_err(Error::Block)?));
    }
    for n in &cfg.nets {
        devices.push(Box::new(Net::new(n).map_err(Error::Net)?));
    }
    for device in devices {
        let slot = alloc.slot().map_err(Error::Alloc)?;
        let bar_addr = alloc.mmio(BAR_SIZE).map_err(Error::Alloc)?;
        let gsis = alloc
            .gsis(vectors_needed(device.as_ref()))
            .map_err(Error::Alloc)?;
        let irqfds = gsis
            .iter()
            .map(|&g| kvm::irq_eventfd(vm, g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Kvm)?;
        let res = Resources {
            bar_addr,
            gsis,
            irqfds,
            router: routes.clone(),
        };
        let function = VirtioPci::new(device, mem.clone(), res).map_err(Error::Transport)?;
        for (evt, addr) in function.notifiers() {
            kvm::ioeventfd(vm, evt, addr).map_err(Error::Kvm)?;
        }
        let shared = Arc::new(Mutex::new(function));
        bus.add(slot, shared.clone() as SharedFunction);
        virtio.push(shared);
    }
    let mapper = Arc::new(DeviceMemory(vm.clone()));
    let mut passed = Vec::new();
    let mut vfio_slots = Vec::new();
    for (i, h) in (0..).zip(vfio) {
        let slot = alloc.slot().map_err(Error::Alloc)?;
        vfio_slots.push(slot);
        let mut bars = [0; NUM_BARS];
        for (addr, bar) in bars.iter_mut().zip(&h.layout.bars) {
            if let Some(bar) = bar {
                *addr = alloc.mmio(bar.size()).map_err(Error::Alloc)?;
            }
        }
        let vectors = h.layout.msi_vectors() + h.layout.msix_vectors();
        let gsis = alloc.gsis(vectors as u32).map_err(Error::Alloc)?;
        let bdf = h.bdf;
        let res = VfioResources {
            bars,
            gsis,
            router: routes.clone(),
            mapper: mapper.clone(),
            first_slot: VFIO_MEMSLOT_START + i * MEMSLOTS,
            adopted,
        };
        let function = VfioPci::new(h, res).map_err(|why| Error::Vfio(vfio::Error { bdf, why }))?;
        let shared = Arc::new(Mutex::new(function));
        bus.add(slot, shared.clone() as SharedFunction);
        passed.push(shared);
    }
    Ok(Built {
        bus,
        virtio,
        vfio: passed,
        vfio_slots,
        allocator: alloc,
    })
}

/// Binds (or, `on` false, unbinds) every passed-through vector's irqfd to
/// its GSI: VFIO's interrupts reach the guest without molt while bound, and
/// wait in the eventfd while not. All or nothing.
pub fn attach_vfio(vm: &VmFd, vfio: &[SharedVfio], on: bool) -> Result<(), kvm::Error> {
    let devices: Vec<_> = vfio.iter().map(|d| crate::sync::lock(d)).collect();
    let all: Vec<_> = devices.iter().flat_map(|d| d.irqfds()).collect();
    let switch = |(evt, gsi): &(&vmm_sys_util::eventfd::EventFd, u32), on: bool| {
        if on {
            kvm::bind_irqfd(vm, evt, *gsi)
        } else {
            kvm::unbind_irqfd(vm, evt, *gsi)
        }
    };
    for (i, v) in all.iter().enumerate() {
        if let Err(e) = switch(v, on) {
            for done in &all[..i] {
                let _ = switch(done, !on);
            }
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MAX_DISKS, MAX_NICS, MAX_VFIO_DEVICES};

    #[test]
    fn passed_through_devices_follow_the_virtio_functions() {
        // As the allocator hands them out, for every machine argv allows.
        for virtio in 0..=MAX_DISKS + MAX_NICS {
            let mut alloc = Allocator::new();
            for _ in 0..virtio {
                alloc.slot().unwrap();
            }
            for i in 0..MAX_VFIO_DEVICES {
                assert_eq!(Ok(vfio_slot(virtio, i)), alloc.slot(), "{virtio} {i}");
            }
        }
    }
}
