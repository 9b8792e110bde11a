//! The descriptors passed-through devices are known by: the container and
//! IOMMU groups (`Iommu`), and each device with its interrupt eventfds
//! (`DeviceHandles`). A live update (exec, transfer) hands these over as they
//! are, so each is built from descriptors however they were obtained:
//! `Handles::open` opens them by name at boot (and is the only place a device
//! is reset), `Handles::adopt` takes them from the old process, and both use
//! the same constructors.
//!
//! Guest RAM stays DMA-mapped through an update: the old process invalidates
//! its virtual addresses (`Iommu::release_vaddr`), the new one gives the
//! mappings its own (`Iommu::take_vaddr`); the pages stay pinned and the
//! device's DMA goes on meanwhile.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use vfio_bindings::bindings::vfio::{
    VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_DEVICE_FLAGS_RESET, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_TYPE1_IOMMU, VFIO_UPDATE_VADDR,
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
    groups: Vec<(u32, Group)>,
    /// Why this host's kernel cannot move the DMA mappings to another
    /// process, if it cannot: every live update with VFIO is then refused.
    no_update: Option<&'static str>,
}

/// The kernel lacks the vaddr interface (Linux 5.12), or the container is
/// iommufd's compat one (which never offers it).
pub const NO_UPDATE_VADDR: &str = "the host kernel's VFIO container does not offer      VFIO_UPDATE_VADDR (Linux 5.12+ with the type1 IOMMU driver; iommufd's compat      container never does)";
/// The kernel has the vaddr interface but not the fixes that let a new
/// process own the mappings: `VFIO_UPDATE_VADDR` reads 1 before
/// `VFIO_SET_IOMMU`, which the same series changed to 0.
pub const NO_DMA_OWNER_CHANGE: &str = "the host kernel predates the VFIO fixes that let      a new process take over DMA mappings (Linux 6.3, or 6.1.16 and later 6.1 stable)";

/// (guest address, size, host address) of each guest RAM region.
pub type RamRegions = [(u64, u64, u64)];

impl Iommu {
    /// A container with its groups attached and its IOMMU model set;
    /// `no_update` says why its mappings cannot be handed over, if so.
    pub fn new(
        container: Container,
        groups: Vec<(u32, Group)>,
        no_update: Option<&'static str>,
    ) -> Self {
        Iommu {
            container,
            groups,
            no_update,
        }
    }

    /// Maps guest RAM for DMA, IOVA = guest-physical address: each region
    /// is pinned while mapped.
    pub fn map_ram(&self, regions: &RamRegions) -> Result<(), ioctl::Error> {
        for &(gpa, size, host) in regions {
            self.container.map_dma(gpa, size, host)?;
        }
        Ok(())
    }

    /// Whether the mappings can move to another process (or image): None,
    /// or why not.
    pub fn no_update(&self) -> Option<&'static str> {
        self.no_update
    }

    /// Before a hand-over: invalidates this process's virtual address of
    /// every RAM mapping; the mappings, their pinned pages and the device's
    /// DMA stay. All or nothing: a failure takes back the ones done.
    pub fn release_vaddr(&self, regions: &RamRegions) -> Result<(), ioctl::Error> {
        for (i, &(gpa, size, _)) in regions.iter().enumerate() {
            if let Err(e) = self.container.invalidate_vaddr(gpa, size) {
                // Best effort: what cannot be taken back stays invalid and
                // the error says why the update failed.
                let _ = self.take_vaddr(&regions[..i], true);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Gives every RAM mapping this process's addresses (`regions`), after
    /// another process (or image) released them. With `take_back`, a mapping
    /// another one took meanwhile (a new process that took it, then failed)
    /// is released and taken again: after a failed update the old process
    /// (or the guardian's rollback) takes its mappings back whatever step
    /// the new one reached. A transfer's new process never takes them back:
    /// the old one may run the guest again.
    pub fn take_vaddr(&self, regions: &RamRegions, take_back: bool) -> Result<(), ioctl::Error> {
        for &(gpa, size, host) in regions {
            match self.container.map_vaddr(gpa, size, host) {
                Err(e) if take_back && e.errno() == Some(libc::EINVAL) => {
                    self.container.invalidate_vaddr(gpa, size)?;
                    self.container.map_vaddr(gpa, size, host)?;
                    log::info!(
                        "VFIO: the DMA mapping at IOVA {gpa:#x} had another process's \
                         address (a new process that took it, then failed): taken back"
                    );
                }
                r => r?,
            }
        }
        Ok(())
    }

    /// The descriptors to hand over: the container, then each group with
    /// its number.
    pub fn fds(&self) -> (RawFd, Vec<(u32, RawFd)>) {
        (
            self.container.fd(),
            self.groups.iter().map(|(id, g)| (*id, g.fd())).collect(),
        )
    }
}

/// The descriptors of `Handles` as an update hands them over: the
/// container, each group with its number, and each device (argv order) with
/// its interrupt eventfds (irqfds, parked).
#[derive(Debug, Default)]
pub struct HandedOver {
    /// Whether the DMA mappings may be taken back from a process that took
    /// them and failed (`Iommu::take_vaddr`): exec and its rollbacks, where
    /// no other process can be running the guest; not a transfer.
    pub take_back: bool,
    pub container: Option<OwnedFd>,
    pub groups: Vec<(u32, OwnedFd)>,
    pub devices: Vec<OwnedFd>,
    pub irqfds: Vec<Vec<OwnedFd>>,
    pub parked: Vec<Vec<OwnedFd>>,
}

impl HandedOver {
    /// Duplicates of every descriptor: the originals stay with the caller
    /// (for a rollback to hand on).
    pub fn try_clone(&self) -> std::io::Result<HandedOver> {
        let all = |v: &[OwnedFd]| v.iter().map(OwnedFd::try_clone).collect();
        Ok(HandedOver {
            take_back: self.take_back,
            container: self
                .container
                .as_ref()
                .map(OwnedFd::try_clone)
                .transpose()?,
            groups: self
                .groups
                .iter()
                .map(|(id, g)| Ok((*id, g.try_clone()?)))
                .collect::<std::io::Result<_>>()?,
            devices: all(&self.devices)?,
            irqfds: self
                .irqfds
                .iter()
                .map(|v| all(v))
                .collect::<std::io::Result<_>>()?,
            parked: self
                .parked
                .iter()
                .map(|v| all(v))
                .collect::<std::io::Result<_>>()?,
        })
    }

    /// The raw descriptors, for the next hand-over: container, groups,
    /// devices, irqfds and parked eventfds per device.
    pub fn raw(&self) -> RawHandles {
        let raw = |v: &[OwnedFd]| v.iter().map(AsRawFd::as_raw_fd).collect::<Vec<_>>();
        RawHandles {
            container: self.container.as_ref().map(AsRawFd::as_raw_fd),
            groups: self
                .groups
                .iter()
                .map(|(i, g)| (*i, g.as_raw_fd()))
                .collect(),
            devices: raw(&self.devices),
            irqfds: self.irqfds.iter().map(|v| raw(v)).collect(),
            parked: self.parked.iter().map(|v| raw(v)).collect(),
        }
    }
}

/// `HandedOver`, borrowed: what the sending side lists.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RawHandles {
    pub container: Option<RawFd>,
    pub groups: Vec<(u32, RawFd)>,
    pub devices: Vec<RawFd>,
    pub irqfds: Vec<Vec<RawFd>>,
    pub parked: Vec<Vec<RawFd>>,
}

impl RawHandles {
    /// The interrupt eventfds, all devices together.
    pub fn eventfds(&self) -> usize {
        self.irqfds.iter().chain(&self.parked).map(Vec::len).sum()
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

    /// The device's descriptor and its eventfds (irqfds, parked), to hand over.
    pub fn fds(&self) -> (RawFd, Vec<RawFd>, Vec<RawFd>) {
        let raw = |v: &[EventFd]| v.iter().map(AsRawFd::as_raw_fd).collect();
        (self.device.fd(), raw(&self.irqfds), raw(&self.parked))
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
        // Before VFIO_SET_IOMMU a kernel with the DMA-owner fixes answers 0
        // for VFIO_UPDATE_VADDR (no IOMMU to ask yet); one without them, 1.
        let early_vaddr = container
            .check_extension(VFIO_UPDATE_VADDR)
            .unwrap_or(false);
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
        let no_update = if !container
            .check_extension(VFIO_UPDATE_VADDR)
            .unwrap_or(false)
        {
            Some(NO_UPDATE_VADDR)
        } else if early_vaddr {
            Some(NO_DMA_OWNER_CHANGE)
        } else {
            None
        };
        if let Some(why) = no_update {
            log::info!("VFIO: live update will be refused: {why}");
        }
        Ok(Handles {
            iommu: Some(Iommu::new(container, opened, no_update)),
            devices,
        })
    }

    /// Takes over the descriptors an update handed over for the devices
    /// `bdfs` (argv order): no device is opened, reset or reprogrammed. Each
    /// device's group must be among the groups handed over, and the container
    /// must still offer `VFIO_UPDATE_VADDR`. The RAM mappings keep their
    /// released addresses until `Iommu::take_vaddr`.
    pub fn adopt(bdfs: &[Bdf], fds: HandedOver, sysfs: &Sysfs) -> Result<Handles, Error> {
        let HandedOver {
            take_back: _,
            container,
            groups,
            devices,
            irqfds,
            parked,
        } = fds;
        let Some(&first) = bdfs.first() else {
            return Ok(Handles {
                iommu: None,
                devices: Vec::new(),
            });
        };
        let at = |bdf: Bdf| move |why: Why| Error { bdf, why };
        let handed =
            |what: &str| at(first)(Why::Handover(format!("{what} for {} devices", bdfs.len())));
        let container = Container::new(container.ok_or_else(|| handed("no container"))?);
        if devices.len() != bdfs.len() || irqfds.len() != bdfs.len() || parked.len() != bdfs.len() {
            return Err(handed(&format!("{} device descriptors", devices.len())));
        }
        if !container
            .check_extension(VFIO_UPDATE_VADDR)
            .map_err(|e| at(first)(Why::Ioctl(e)))?
        {
            return Err(at(first)(Why::Handover(NO_UPDATE_VADDR.into())));
        }
        for &bdf in bdfs {
            let id = sysfs.group(&bdf).map_err(at(bdf))?;
            if !groups.iter().any(|(g, _)| *g == id) {
                return Err(at(bdf)(Why::Handover(format!(
                    "its IOMMU group {id} was not handed over"
                ))));
            }
        }
        let groups = groups
            .into_iter()
            .map(|(id, fd)| (id, Group::new(fd)))
            .collect();
        let mut handles = Vec::with_capacity(bdfs.len());
        for (((&bdf, device), irqfds), parked) in bdfs.iter().zip(devices).zip(irqfds).zip(parked) {
            let events = |v: Vec<OwnedFd>| {
                v.into_iter()
                    // SAFETY: each eventfd was handed over for exactly this
                    // and is owned by nothing else (it was an `OwnedFd`).
                    .map(|fd| unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
                    .collect::<Vec<_>>()
            };
            let eventfds = Some((events(irqfds), events(parked)));
            let h = DeviceHandles::new(bdf, Device::new(device), eventfds).map_err(at(bdf))?;
            handles.push(h);
        }
        Ok(Handles {
            iommu: Some(Iommu::new(container, groups, None)),
            devices: handles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::host::tests::FakeSysfs;

    fn null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn an_adoption_that_does_not_fit_is_refused_naming_why() {
        let fake = FakeSysfs::new("adopt");
        fake.device("0000:00:04.0", Some("vfio-pci"), Some(7));
        let bdfs = ["0000:00:04.0".parse().unwrap()];
        let refused = |fds: HandedOver| {
            Handles::adopt(&bdfs, fds, &fake.sysfs())
                .err()
                .expect("refused")
                .to_string()
        };
        let e = refused(HandedOver::default());
        assert_eq!(
            e,
            "VFIO device 0000:00:04.0: handover: no container for 1 devices"
        );
        let e = refused(HandedOver {
            container: Some(null()),
            ..HandedOver::default()
        });
        assert!(
            e.ends_with("handover: 0 device descriptors for 1 devices"),
            "{e}"
        );
        // Not a VFIO container: the extension cannot even be asked for.
        let e = refused(HandedOver {
            container: Some(null()),
            groups: vec![(7, null())],
            devices: vec![null()],
            irqfds: vec![Vec::new()],
            parked: vec![Vec::new()],
            take_back: false,
        });
        assert!(e.contains("VFIO_CHECK_EXTENSION(10) failed"), "{e}");
        // No devices, nothing to adopt.
        let none = Handles::adopt(&[], HandedOver::default(), &fake.sysfs()).unwrap();
        assert!(none.iommu.is_none() && none.devices.is_empty());
    }

    #[test]
    fn duplicates_keep_the_originals_and_their_order() {
        let h = HandedOver {
            take_back: true,
            container: Some(null()),
            groups: vec![(3, null()), (9, null())],
            devices: vec![null()],
            irqfds: vec![vec![null(), null()]],
            parked: vec![vec![null(), null()]],
        };
        let d = h.try_clone().unwrap();
        assert!(d.take_back);
        let (a, b) = (h.raw(), d.raw());
        assert_eq!(b.groups.iter().map(|g| g.0).collect::<Vec<_>>(), [3, 9]);
        assert_eq!(b.eventfds(), 4);
        assert_ne!(
            a.container, b.container,
            "a duplicate is another descriptor"
        );
        assert_eq!(a.irqfds[0].len(), b.irqfds[0].len());
    }
}
