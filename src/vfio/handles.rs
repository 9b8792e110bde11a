//! The descriptors passed-through devices are known by: the container and
//! IOMMU groups (`Iommu`), and each device with its interrupt eventfds
//! (`DeviceHandles`). A live update will hand these over as they are, so each
//! is built from descriptors however they were obtained: `Handles::open` opens
//! them by name at boot (and is the only place a device is reset), then uses
//! the same constructors an adopting process would.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use vfio_bindings::bindings::vfio::{
    VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_DEVICE_FLAGS_RESET, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_TYPE1_IOMMU,
};
use vmm_sys_util::eventfd::EventFd;

use super::host::Sysfs;
use super::ioctl::{self, Container, Device, Group};
use super::probe::Layout;
use super::{Bdf, Error, Why};

/// The container and the IOMMU groups attached to it: the IOMMU context every
/// passed-through device's DMA goes through.
pub struct Iommu {
    container: Container,
    /// Kept open: closing a group detaches it from the container.
    _groups: Vec<(u32, Group)>,
}

impl Iommu {
    /// A container with its groups attached and its IOMMU model set.
    pub fn new(container: Container, groups: Vec<(u32, Group)>) -> Self {
        Iommu {
            container,
            _groups: groups,
        }
    }

    /// Maps guest RAM for DMA, IOVA = guest-physical address: each region
    /// (guest address, size, host address) is pinned while mapped.
    pub fn map_ram(&self, regions: &[(u64, u64, u64)]) -> Result<(), ioctl::Error> {
        for &(gpa, size, host) in regions {
            self.container.map_dma(gpa, size, host)?;
        }
        Ok(())
    }
}

/// One device: its descriptor, its layout, and two eventfds per vector (MSI's
/// vectors, then MSI-X's).
pub struct DeviceHandles {
    pub bdf: Bdf,
    pub device: Device,
    pub layout: Layout,
    /// Bound to the vectors' GSIs (KVM irqfds): where a live vector's
    /// interrupts go.
    pub irqfds: Vec<EventFd>,
    /// Where VFIO signals a masked vector until it is unmasked.
    pub parked: Vec<EventFd>,
}

impl DeviceHandles {
    /// `device` with its interrupt eventfds: `eventfds` (irqfds, parked)
    /// handed over, which must match its vectors, or None for new ones.
    pub fn new(
        bdf: Bdf,
        device: Device,
        eventfds: Option<(Vec<EventFd>, Vec<EventFd>)>,
    ) -> Result<Self, Why> {
        let layout = Layout::probe(&device)?;
        let want = layout.msi_vectors() + layout.msix_vectors();
        let (irqfds, parked) = match eventfds {
            Some((i, p)) if i.len() == want && p.len() == want => (i, p),
            Some((i, _)) => {
                return Err(Why::Vectors {
                    have: i.len(),
                    want,
                })
            }
            None => {
                let new = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
                let make = || (0..want).map(|_| new()).collect::<Result<Vec<_>, _>>();
                (make().map_err(Why::Eventfd)?, make().map_err(Why::Eventfd)?)
            }
        };
        Ok(DeviceHandles {
            bdf,
            device,
            layout,
            irqfds,
            parked,
        })
    }
}

/// Everything `--vfio` opened: the IOMMU context (None without devices) and
/// the devices in argv order.
pub struct Handles {
    pub iommu: Option<Iommu>,
    pub devices: Vec<DeviceHandles>,
}

const CONTAINER: &str = "/dev/vfio/vfio";

fn open_node(path: PathBuf) -> Result<OwnedFd, Why> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map(OwnedFd::from)
        .map_err(|e| Why::Open(path, e))
}

impl Handles {
    /// Opens the devices `bdfs` and everything they need: each is checked in
    /// sysfs first, then its group must be viable, and the container must offer
    /// a type1 IOMMU. The first device that cannot be used is named with why.
    /// Devices with a reset mechanism are reset: the guest finds them as after
    /// a power-on.
    pub fn open(bdfs: &[Bdf], sysfs: &Sysfs) -> Result<Handles, Error> {
        let Some(&first) = bdfs.first() else {
            return Ok(Handles {
                iommu: None,
                devices: Vec::new(),
            });
        };
        let at = |bdf: Bdf| move |why: Why| Error { bdf, why };
        let groups = bdfs
            .iter()
            .map(|b| sysfs.group(b).map_err(at(*b)))
            .collect::<Result<Vec<u32>, _>>()?;
        let container = Container::new(open_node(CONTAINER.into()).map_err(at(first))?);
        let version = container
            .api_version()
            .map_err(|e| at(first)(Why::Ioctl(e)))?;
        if version != VFIO_API_VERSION as i32 {
            return Err(at(first)(Why::ApiVersion(version)));
        }
        let model = [VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU]
            .into_iter()
            .find(|&t| container.check_extension(t).unwrap_or(false))
            .ok_or(at(first)(Why::NoIommuModel))?;
        let mut opened: Vec<(u32, Group)> = Vec::new();
        for (&bdf, &id) in bdfs.iter().zip(&groups) {
            if opened.iter().any(|(g, _)| *g == id) {
                continue;
            }
            let group = Group::new(open_node(format!("/dev/vfio/{id}").into()).map_err(at(bdf))?);
            let ioctl = |e| at(bdf)(Why::Ioctl(e));
            if group.status().map_err(ioctl)? & VFIO_GROUP_FLAGS_VIABLE == 0 {
                return Err(at(bdf)(Why::NotViable {
                    group: id,
                    blockers: sysfs.group_blockers(id),
                }));
            }
            group.set_container(&container).map_err(ioctl)?;
            // The IOMMU model is set once the container has a group.
            if opened.is_empty() {
                container.set_iommu(model).map_err(ioctl)?;
            }
            opened.push((id, group));
        }
        let mut devices = Vec::with_capacity(bdfs.len());
        for (&bdf, id) in bdfs.iter().zip(&groups) {
            let ioctl = |e| at(bdf)(Why::Ioctl(e));
            let group = &opened
                .iter()
                .find(|(g, _)| g == id)
                .expect("opened above")
                .1;
            let device = Device::new(group.device_fd(&bdf.to_string()).map_err(ioctl)?);
            let (flags, _) = device.info().map_err(ioctl)?;
            if flags & VFIO_DEVICE_FLAGS_RESET == 0 {
                log::info!(
                    "VFIO device {bdf} has no reset mechanism: the guest finds it as its \
                     last user left it"
                );
            } else if let Err(e) = device.reset() {
                log::warn!("VFIO device {bdf}: {e}; the guest finds it as its last user left it");
            }
            devices.push(DeviceHandles::new(bdf, device, None).map_err(at(bdf))?);
        }
        Ok(Handles {
            iommu: Some(Iommu::new(container, opened)),
            devices,
        })
    }
}
