//! Building the machine's devices: the PCI bus with one virtio-pci function per
//! `--disk` and `--net`, each with its BAR, MSI vectors (irqfds on fixed GSIs)
//! and queue notifiers (ioeventfds), all from the deterministic allocator.

use std::fmt;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use super::kvm::{self, GsiRoutes};
use crate::args::RunConfig;
use crate::pci::{AllocError, Allocator, PciBus, SharedFunction};
use crate::virtio::pci::{vectors_needed, Resources, VirtioPci, BAR_SIZE};
use crate::virtio::{block::Block, net::Net, VirtioDevice};

#[derive(Debug)]
pub enum Error {
    Block(crate::virtio::block::Error),
    Net(crate::virtio::net::Error),
    Alloc(AllocError),
    Kvm(kvm::Error),
    Transport(std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Block(e) => e.fmt(f),
            Error::Net(e) => e.fmt(f),
            Error::Alloc(e) => write!(f, "cannot place a PCI device: {e}"),
            Error::Kvm(e) => e.fmt(f),
            Error::Transport(e) => write!(f, "virtio-pci setup failed: {e}"),
        }
    }
}

pub type SharedVirtio = Arc<Mutex<VirtioPci>>;

/// Creates every configured device, disks first, then NICs, in argv order.
pub fn build(
    cfg: &RunConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    routes: &Arc<GsiRoutes>,
) -> Result<(PciBus, Vec<SharedVirtio>, Allocator), Error> {
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
    Ok((bus, virtio, alloc))
}
