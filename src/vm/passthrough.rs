//! The passed-through devices' part of a running machine in a live update:
//! what a state records of them, whether this host can hand them over, their
//! descriptors for the next process, and the release and reclaim of their DMA
//! mappings and interrupts around an update's pause.

use super::{devices, Error, Machine};
use crate::layout::MAX_VFIO_EVENTFDS;
use crate::sync::lock;
use crate::vfio::{self, RawHandles};

impl Machine {
    /// The passed-through devices, in argv order, as a state records them.
    pub fn vfio_devices(&self) -> Vec<vfio::Identity> {
        self.vfio
            .iter()
            .zip(&self.vfio_slots)
            .map(|(d, &slot)| {
                let d = lock(d);
                let (vendor, device) = d.ids();
                vfio::Identity {
                    bdf: d.bdf(),
                    slot,
                    vendor,
                    device,
                }
            })
            .collect()
    }

    /// Why the passed-through devices cannot go through an exec or transfer
    /// update, if they cannot: the host kernel cannot move the DMA mappings,
    /// or there are more interrupt eventfds than one hand-over carries.
    pub fn vfio_update_refusal(&self) -> Option<Error> {
        let iommu = self.iommu.as_ref()?;
        if let Some(why) = iommu.no_update() {
            return Some(Error::VfioUpdate(why.into()));
        }
        let eventfds = self.vfio_handover().eventfds();
        (eventfds > MAX_VFIO_EVENTFDS).then(|| {
            Error::VfioUpdate(format!(
                "the devices have {eventfds} interrupt eventfds (two per vector); an \
                 update hands over at most {MAX_VFIO_EVENTFDS}"
            ))
        })
    }

    /// The passed-through devices' descriptors, for the next process.
    pub fn vfio_handover(&self) -> RawHandles {
        let mut h = RawHandles::default();
        if let Some(iommu) = &self.iommu {
            let (container, groups) = iommu.fds();
            h.container = Some(container);
            h.groups = groups;
        }
        for d in &self.vfio {
            let (device, irqfds, parked) = lock(d).fds();
            h.devices.push(device);
            h.irqfds.push(irqfds);
            h.parked.push(parked);
        }
        h
    }

    /// In an update's pause, before the machine is saved: the passed-through
    /// devices' interrupts stop reaching this VM (they wait in their
    /// eventfds for the next one), and this process's addresses of the DMA
    /// mappings are invalidated. The devices run on. Returns the µs it took.
    /// A failure leaves everything as it was.
    pub fn vfio_release(&self) -> Result<u64, Error> {
        let Some(iommu) = &self.iommu else {
            return Ok(0);
        };
        let start = std::time::Instant::now();
        devices::attach_vfio(&self.vm, &self.vfio, false).map_err(Error::Kvm)?;
        if let Err(e) = iommu.release_vaddr(&self.ram.host_regions()) {
            let _ = devices::attach_vfio(&self.vm, &self.vfio, true);
            return Err(self.vfio_ioctl_error(e));
        }
        Ok(start.elapsed().as_micros() as u64)
    }

    /// The update failed after `vfio_release`: the DMA mappings take this
    /// process's addresses back (from whichever process had them) and the
    /// interrupts reach this VM again, so the guest resumes here with its
    /// devices working.
    pub fn vfio_reclaim(&self) -> Result<(), Error> {
        let Some(iommu) = &self.iommu else {
            return Ok(());
        };
        let taken = iommu
            .take_vaddr(&self.ram.host_regions(), true)
            .map_err(|e| self.vfio_ioctl_error(e));
        let attached = devices::attach_vfio(&self.vm, &self.vfio, true).map_err(Error::Kvm);
        taken.and(attached)
    }

    fn vfio_ioctl_error(&self, e: vfio::ioctl::Error) -> Error {
        match self.vfio.first() {
            Some(d) => Error::Vfio(vfio::Error {
                bdf: lock(d).bdf(),
                why: vfio::Why::Ioctl(e),
            }),
            None => Error::VfioUpdate(e.to_string()),
        }
    }
}
