//! VFIO PCI passthrough (Documentation/driver-api/vfio.rst): a host PCI
//! function bound to vfio-pci, on molt's PCI bus next to the virtio functions.
//!
//! - `host`: what sysfs says before VFIO is asked (driver, IOMMU group).
//! - `handles`: the descriptors (container, groups, devices, interrupt
//!   eventfds), opened by name or adopted, and guest RAM mapped for DMA.
//! - `ioctl`: the VFIO ioctls, their numbers and structs.
//! - `probe`: the function's config space, BARs and interrupt capabilities.
//! - `device`: the function the guest sees: config space passed through with
//!   BARs, command, MSI and MSI-X virtualized and the ROM hidden.
//! - `bars`: BARs mapped into the guest as memslots, or trapped.
//! - `irqs`: MSI and MSI-X through VFIO eventfds straight into KVM irqfds.
//!
//! INTx is not offered: the guest sees no interrupt pin.

mod bars;
pub mod device;
mod handles;
mod host;
pub mod ioctl;
mod irqs;
pub mod probe;

use std::fmt;
use std::path::PathBuf;

pub use device::VfioPci;
pub use handles::{DeviceHandles, HandedOver, Handles, Iommu, RawHandles};
pub use host::Sysfs;

/// How a guest suspends to RAM, for the refusal of a `cpr-save` while it runs.
pub const HOW_TO_SUSPEND: &str = "reboot mode with VFIO needs the guest suspended to RAM \
     (ACPI S3) first: in a Linux guest `echo deep > /sys/power/mem_sleep; echo mem > \
     /sys/power/state`, then cpr-save once `status` says state=suspended";

/// A PCI address as sysfs names it: domain:bus:device.function (0000:00:04.0).
/// Saved in the state (in `IdentityV1`, frozen): its serde layout
/// must not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bdf {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl std::str::FromStr for Bdf {
    type Err = String;

    /// `DDDD:BB:DD.F`, or `BB:DD.F` in domain 0 (as lspci prints it); hex.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("'{s}' is not a PCI address: expected DOMAIN:BUS:DEVICE.FUNCTION in hex, like 0000:00:04.0")
        };
        let hex = |p: &str, digits: usize, max: u32| {
            (p.len() == digits && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(p, 16).ok())
                .flatten()
                .filter(|&v| v <= max)
        };
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts[..] {
            [d, b, dev] => (hex(d, 4, 0xffff), hex(b, 2, 0xff), hex(dev, 2, 0x1f)),
            [b, dev] => (Some(0), hex(b, 2, 0xff), hex(dev, 2, 0x1f)),
            _ => return Err(bad()),
        };
        match (domain, bus, device, hex(function, 1, 7)) {
            (Some(d), Some(b), Some(dev), Some(f)) => Ok(Bdf {
                domain: d as u16,
                bus: b as u8,
                device: dev as u8,
                function: f as u8,
            }),
            _ => Err(bad()),
        }
    }
}

/// A passed-through device as a saved state records it: its host address,
/// what it is (vendor and device ID) and the PCI slot the guest found it at.
/// Reboot mode opens the device by name again and must find the same device
/// at the same slot (`differences`). Frozen: a change is a new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentityV1 {
    pub bdf: Bdf,
    /// The device number on molt's PCI bus.
    pub slot: u8,
    pub vendor: u16,
    pub device: u16,
}

/// The version this release saves and restores.
pub type Identity = IdentityV1;

impl fmt::Display for IdentityV1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:04x}:{:04x}) at PCI slot {}",
            self.bdf, self.vendor, self.device, self.slot
        )
    }
}

/// A device argv names for a restart: where it will sit, and its IDs if
/// sysfs tells them (a device sysfs does not know is refused when opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Named {
    pub bdf: Bdf,
    pub slot: u8,
    pub ids: Option<(u16, u16)>,
}

/// How the devices argv names differ from those a state was `saved` with,
/// one line per difference (empty if none): a device missing, added, at
/// another slot, or another device (other IDs) at the same address.
pub fn differences(saved: &[Identity], now: &[Named]) -> Vec<String> {
    let mut d = Vec::new();
    for s in saved {
        match now.iter().find(|n| n.bdf == s.bdf) {
            None => d.push(format!("saved {s}, not on argv (--vfio {})", s.bdf)),
            Some(n) if n.slot != s.slot => d.push(format!(
                "saved {s}, now at PCI slot {} (--vfio order or the number of disks and \
                 NICs changed)",
                n.slot
            )),
            Some(Named {
                ids: Some((vendor, device)),
                ..
            }) if (*vendor, *device) != (s.vendor, s.device) => d.push(format!(
                "saved {s}, now {vendor:04x}:{device:04x} at that address: another device"
            )),
            Some(_) => {}
        }
    }
    for n in now.iter().filter(|n| !saved.iter().any(|s| s.bdf == n.bdf)) {
        d.push(format!(
            "--vfio {} at PCI slot {}: the guest was not saved with it",
            n.bdf, n.slot
        ));
    }
    d
}

/// Why a device cannot be passed through, or stopped working.
#[derive(Debug)]
pub enum Why {
    NoDevice,
    /// Bound to another driver (with the device's vendor and device IDs).
    Driver {
        driver: String,
        ids: Option<(u16, u16)>,
    },
    NotBound {
        ids: Option<(u16, u16)>,
    },
    /// No IOMMU group: the host has no IOMMU, or it is off.
    NoIommu,
    /// Devices of the group bound to other drivers, with those drivers.
    NotViable {
        group: u32,
        blockers: Vec<(String, String)>,
    },
    Open(PathBuf, std::io::Error),
    ApiVersion(i32),
    /// Neither type1 IOMMU model is there (`vfio_iommu_type1` not loaded).
    NoIommuModel,
    Ioctl(ioctl::Error),
    NotPci,
    /// A header type other than an endpoint's (a bridge).
    HeaderType(u8),
    ConfigRegion(std::io::Error),
    /// A BAR too large or of an odd size for molt's PCI window.
    BarSize(usize, u64),
    Eventfd(std::io::Error),
    /// The interrupt eventfds handed over do not match the device's vectors.
    Vectors {
        have: usize,
        want: usize,
    },
    Mmap(usize, std::io::Error),
    /// What a live update handed over does not fit the device.
    Handover(String),
    /// The saved state of the device does not fit it.
    State(String),
}

#[cfg(test)]
impl PartialEq for Why {
    /// Variants and their plain fields; errors compare by errno.
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

const BIND_HINT: &str =
    "modprobe vfio-pci; echo VENDOR DEVICE > /sys/bus/pci/drivers/vfio-pci/new_id";

fn bind_hint(ids: &Option<(u16, u16)>) -> String {
    match ids {
        Some((v, d)) => BIND_HINT.replace("VENDOR DEVICE", &format!("{v:04x} {d:04x}")),
        None => BIND_HINT.to_string(),
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::NoDevice => write!(f, "no such PCI device in /sys/bus/pci/devices"),
            Why::Driver { driver, ids } => write!(
                f,
                "is bound to {driver}, not vfio-pci: unbind it (echo BDF > \
                 /sys/bus/pci/drivers/{driver}/unbind), then bind it to vfio-pci ({})",
                bind_hint(ids)
            ),
            Why::NotBound { ids } => write!(
                f,
                "is bound to no driver: bind it to vfio-pci ({})",
                bind_hint(ids)
            ),
            Why::NoIommu => write!(
                f,
                "has no IOMMU group: the host has no IOMMU enabled (turn on VT-d or \
                 AMD-Vi in the firmware; boot with intel_iommu=on on Intel)"
            ),
            Why::NotViable { group, blockers } => {
                write!(
                    f,
                    "IOMMU group {group} is not viable: every device in it must be bound \
                     to vfio-pci or to no driver"
                )?;
                for (dev, driver) in blockers {
                    write!(f, "; {dev} is bound to {driver}")?;
                }
                Ok(())
            }
            Why::Open(path, e) => {
                let p = path.display();
                match e.raw_os_error() {
                    Some(libc::ENOENT) if path.ends_with("vfio") => write!(
                        f,
                        "{p} does not exist: load the VFIO modules (modprobe vfio-pci)"
                    ),
                    Some(libc::ENOENT) => write!(f, "{p} does not exist (is vfio-pci loaded?)"),
                    Some(libc::EACCES | libc::EPERM) => write!(
                        f,
                        "permission denied opening {p}: run molt as root, or give its \
                         user access to {p} and /dev/vfio/vfio"
                    ),
                    Some(libc::EBUSY) => write!(
                        f,
                        "{p} is busy: another process (another VMM?) has the group open"
                    ),
                    _ => write!(f, "cannot open {p}: {e}"),
                }
            }
            Why::ApiVersion(v) => write!(f, "VFIO API version {v}, molt speaks version 0"),
            Why::NoIommuModel => write!(
                f,
                "No available IOMMU models: the type1 IOMMU driver is not loaded \
                 (modprobe vfio_iommu_type1)"
            ),
            Why::Ioctl(e @ ioctl::Error::SetIommu(..)) if e.errno() == Some(libc::EPERM) => {
                write!(
                    f,
                    "{e} (without interrupt remapping, vfio_iommu_type1 needs its \
                     allow_unsafe_interrupts=1 parameter)"
                )
            }
            Why::Ioctl(e @ ioctl::Error::MapDma { .. }) if e.errno() == Some(libc::ENOMEM) => {
                write!(
                    f,
                    "{e} (guest RAM is pinned for DMA and counts against RLIMIT_MEMLOCK)"
                )
            }
            Why::Ioctl(e) => e.fmt(f),
            Why::NotPci => write!(f, "VFIO says it is not a PCI device"),
            Why::HeaderType(t) => write!(
                f,
                "has config header type {t:#x}: only endpoints (type 0) can be passed through"
            ),
            Why::ConfigRegion(e) => write!(f, "cannot read its config space: {e}"),
            Why::BarSize(i, size) => write!(
                f,
                "BAR {i} of {size:#x} bytes does not fit molt's PCI window"
            ),
            Why::Eventfd(e) => write!(f, "eventfd failed: {e}"),
            Why::Vectors { have, want } => write!(
                f,
                "{have} interrupt eventfds handed over, the device has {want} vectors"
            ),
            Why::Mmap(i, e) => write!(f, "cannot mmap BAR {i}: {e}"),
            Why::Handover(why) => write!(f, "handover: {why}"),
            Why::State(why) => write!(f, "saved state: {why}"),
        }
    }
}

/// A device that cannot be passed through, and why.
#[derive(Debug)]
pub struct Error {
    pub bdf: Bdf,
    pub why: Why,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = self.why.to_string().replace("BDF", &self.bdf.to_string());
        write!(f, "VFIO device {}: {why}", self.bdf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_parse_and_print_in_sysfs_form() {
        let b: Bdf = "0000:00:04.0".parse().unwrap();
        assert_eq!((b.domain, b.bus, b.device, b.function), (0, 0, 4, 0));
        assert_eq!(b.to_string(), "0000:00:04.0");
        assert_eq!(
            "3a:1f.7".parse::<Bdf>().unwrap().to_string(),
            "0000:3a:1f.7"
        );
        assert_eq!(
            "ABCD:ff:1F.7".parse::<Bdf>().unwrap().to_string(),
            "abcd:ff:1f.7"
        );
        for bad in [
            "",
            "00:04",
            "0000:00:04",
            "0000:00:20.0",
            "0000:00:04.8",
            "0:00:04.0",
            "0000:000:04.0",
            "0000:00:04.0.1",
            "x000:00:04.0",
            "0000:00:04.00",
            "1:2:3:4.0",
            "0000:00:+4.0",
        ] {
            let e = bad.parse::<Bdf>().unwrap_err();
            assert!(e.contains("not a PCI address"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_restart_must_name_the_saved_devices_at_their_slots() {
        let b = |s: &str| s.parse::<Bdf>().unwrap();
        let saved = [
            Identity {
                bdf: b("0000:00:04.0"),
                slot: 3,
                vendor: 0x1234,
                device: 0x11e8,
            },
            Identity {
                bdf: b("0000:00:05.0"),
                slot: 4,
                vendor: 0x8086,
                device: 0x10d3,
            },
        ];
        let named = |s: &str, slot, ids| Named {
            bdf: b(s),
            slot,
            ids,
        };
        let same = [
            named("00:04.0", 3, Some((0x1234, 0x11e8))),
            named("00:05.0", 4, None),
        ];
        assert!(differences(&saved, &same).is_empty());
        assert!(differences(&[], &[]).is_empty());
        // Swapped on argv: both at the other's slot.
        let swapped = [same[1], same[0]].map(|n| Named {
            slot: 7 - n.slot,
            ..n
        });
        let d = differences(&saved, &swapped);
        assert_eq!(
            d,
            [
                "saved 0000:00:04.0 (1234:11e8) at PCI slot 3, now at PCI slot 4 (--vfio \
                 order or the number of disks and NICs changed)",
                "saved 0000:00:05.0 (8086:10d3) at PCI slot 4, now at PCI slot 3 (--vfio \
                 order or the number of disks and NICs changed)"
            ]
        );
        // One missing, one added, another device at a saved address.
        let d = differences(
            &saved,
            &[
                named("00:04.0", 3, Some((0x1af4, 0x1041))),
                named("00:06.0", 4, None),
            ],
        );
        assert_eq!(
            d,
            [
                "saved 0000:00:04.0 (1234:11e8) at PCI slot 3, now 1af4:1041 at that \
                 address: another device",
                "saved 0000:00:05.0 (8086:10d3) at PCI slot 4, not on argv (--vfio \
                 0000:00:05.0)",
                "--vfio 0000:00:06.0 at PCI slot 4: the guest was not saved with it"
            ]
        );
        // A state without devices (or of a format before 4) and --vfio.
        assert_eq!(
            differences(&[], &same[..1]),
            ["--vfio 0000:00:04.0 at PCI slot 3: the guest was not saved with it"]
        );
        assert_eq!(differences(&saved[..1], &[]).len(), 1);
    }

    #[test]
    fn errors_name_the_device_and_what_to_do() {
        let bdf: Bdf = "0000:00:04.0".parse().unwrap();
        let e = |why| Error { bdf, why }.to_string();
        let driver = e(Why::Driver {
            driver: "e1000e".into(),
            ids: Some((0x8086, 0x10d3)),
        });
        assert!(driver.starts_with("VFIO device 0000:00:04.0: is bound to e1000e, not vfio-pci"));
        assert!(driver.contains("echo 0000:00:04.0 > /sys/bus/pci/drivers/e1000e/unbind"));
        assert!(driver.contains("echo 8086 10d3 > /sys/bus/pci/drivers/vfio-pci/new_id"));
        assert!(e(Why::NoIommuModel).contains("No available IOMMU models"));
        assert!(e(Why::NoIommu).contains("no IOMMU"));
        let blocked = e(Why::NotViable {
            group: 3,
            blockers: vec![("0000:01:00.1".into(), "snd_hda_intel".into())],
        });
        assert!(blocked.contains("IOMMU group 3 is not viable"), "{blocked}");
        assert!(
            blocked.ends_with("; 0000:01:00.1 is bound to snd_hda_intel"),
            "{blocked}"
        );
        let open = |errno| {
            e(Why::Open(
                "/dev/vfio/7".into(),
                std::io::Error::from_raw_os_error(errno),
            ))
        };
        assert!(open(libc::EACCES).contains("permission denied opening /dev/vfio/7"));
        assert!(open(libc::EPERM).contains("permission denied"));
        assert!(open(libc::EBUSY).contains("another process"));
        assert!(open(libc::ENOENT).contains("/dev/vfio/7 does not exist"));
        let container = e(Why::Open(
            "/dev/vfio/vfio".into(),
            std::io::Error::from_raw_os_error(libc::ENOENT),
        ));
        assert!(container.contains("modprobe vfio-pci"), "{container}");
        let eperm = std::io::Error::from_raw_os_error(libc::EPERM);
        let iommu = e(Why::Ioctl(ioctl::Error::SetIommu(3, eperm)));
        assert!(iommu.contains("allow_unsafe_interrupts"), "{iommu}");
    }
}
