//! What the host says about a PCI device before VFIO is asked: sysfs
//! (`/sys/bus/pci/devices/BDF`: its IDs, driver and IOMMU group, and the
//! group's other devices). Every path goes through a root directory, so the
//! tests give a fake tree.

use std::path::{Path, PathBuf};

use super::{Bdf, Why};

/// Drivers a device may be bound to without making its IOMMU group unusable:
/// vfio-pci, the stub, and the port driver of a bridge (the kernel's rule,
/// drivers/vfio/group.c).
const GROUP_SAFE_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    pub fn host() -> Self {
        Sysfs { root: "/".into() }
    }

    #[cfg(test)]
    pub fn at(root: &Path) -> Self {
        Sysfs { root: root.into() }
    }

    fn device_dir(&self, name: &str) -> PathBuf {
        self.root.join("sys/bus/pci/devices").join(name)
    }

    /// The IOMMU group of `bdf`, once sysfs shows it can be passed through: it
    /// exists, vfio-pci has it, and it is in a group.
    pub fn group(&self, bdf: &Bdf) -> Result<u32, Why> {
        let dir = self.device_dir(&bdf.to_string());
        if !dir.is_dir() {
            return Err(Why::NoDevice);
        }
        let group = link_name(&dir.join("iommu_group"));
        match driver(&dir) {
            Some(d) if d == "vfio-pci" => {}
            Some(driver) => {
                return Err(Why::Driver {
                    driver,
                    ids: ids(&dir),
                })
            }
            // vfio-pci cannot bind a device without a group: that comes first.
            None if group.is_none() => return Err(Why::NoIommu),
            None => return Err(Why::NotBound { ids: ids(&dir) }),
        }
        group.and_then(|g| g.parse().ok()).ok_or(Why::NoIommu)
    }

    /// The vendor and device ID of `bdf`, if sysfs has it.
    pub fn ids(&self, bdf: &Bdf) -> Option<(u16, u16)> {
        ids(&self.device_dir(&bdf.to_string()))
    }

    /// The devices of IOMMU `group` bound to drivers that make it unusable, with
    /// their drivers: why the kernel says the group is not viable.
    pub fn group_blockers(&self, group: u32) -> Vec<(String, String)> {
        let dir = self
            .root
            .join("sys/kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .into_iter()
            .filter_map(|name| {
                let d = driver(&self.device_dir(&name))?;
                (!GROUP_SAFE_DRIVERS.contains(&d.as_str())).then_some((name, d))
            })
            .collect()
    }
}

/// The last component of the symlink at `link`, if it is one.
fn link_name(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn driver(dir: &Path) -> Option<String> {
    link_name(&dir.join("driver"))
}

/// Vendor and device ID, for the hints that name them.
fn ids(dir: &Path) -> Option<(u16, u16)> {
    let id = |f: &str| {
        let s = std::fs::read_to_string(dir.join(f)).ok()?;
        u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
    };
    Some((id("vendor")?, id("device")?))
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake /sys with PCI devices and IOMMU groups, under a temp dir.
    pub struct FakeSysfs {
        pub root: PathBuf,
    }

    impl FakeSysfs {
        pub fn new(tag: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("molt-sysfs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
            std::fs::create_dir_all(root.join("sys/bus/pci/drivers")).unwrap();
            FakeSysfs { root }
        }

        /// A device `name` with `driver` (None: unbound) in `group` (None: no IOMMU).
        pub fn device(&self, name: &str, driver: Option<&str>, group: Option<u32>) {
            let dir = self.root.join("sys/bus/pci/devices").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("vendor"), "0x1234\n").unwrap();
            std::fs::write(dir.join("device"), "0x11e8\n").unwrap();
            if let Some(d) = driver {
                let drv = self.root.join("sys/bus/pci/drivers").join(d);
                std::fs::create_dir_all(&drv).unwrap();
                symlink(&drv, dir.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gdir = self
                    .root
                    .join("sys/kernel/iommu_groups")
                    .join(g.to_string());
                std::fs::create_dir_all(gdir.join("devices")).unwrap();
                symlink(&gdir, dir.join("iommu_group")).unwrap();
                symlink(&dir, gdir.join("devices").join(name)).unwrap();
            }
        }

        pub fn sysfs(&self) -> Sysfs {
            Sysfs::at(&self.root)
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn each_reason_a_device_cannot_be_used_is_told_apart() {
        let fake = FakeSysfs::new("reasons");
        fake.device("0000:00:04.0", Some("vfio-pci"), Some(7));
        fake.device("0000:00:05.0", Some("e1000e"), Some(8));
        fake.device("0000:00:06.0", None, Some(9));
        fake.device("0000:00:07.0", None, None);
        fake.device("0000:00:08.0", Some("virtio-pci"), None);
        let s = fake.sysfs();
        assert_eq!(s.group(&bdf("0000:00:04.0")), Ok(7));
        assert_eq!(
            s.group(&bdf("0000:00:05.0")),
            Err(Why::Driver {
                driver: "e1000e".into(),
                ids: Some((0x1234, 0x11e8))
            })
        );
        assert_eq!(
            s.group(&bdf("0000:00:06.0")),
            Err(Why::NotBound {
                ids: Some((0x1234, 0x11e8))
            })
        );
        assert_eq!(s.group(&bdf("0000:00:07.0")), Err(Why::NoIommu));
        // Bound elsewhere is what to fix first, IOMMU or not.
        assert!(matches!(
            s.group(&bdf("0000:00:08.0")),
            Err(Why::Driver { .. })
        ));
        assert_eq!(s.group(&bdf("0000:00:1f.7")), Err(Why::NoDevice));
    }

    #[test]
    fn a_group_is_blocked_by_devices_bound_elsewhere() {
        let fake = FakeSysfs::new("group");
        fake.device("0000:01:00.0", Some("vfio-pci"), Some(3));
        fake.device("0000:01:00.1", Some("snd_hda_intel"), Some(3));
        fake.device("0000:01:00.2", None, Some(3));
        fake.device("0000:00:01.0", Some("pcieport"), Some(3));
        let s = fake.sysfs();
        assert_eq!(
            s.group_blockers(3),
            vec![("0000:01:00.1".to_string(), "snd_hda_intel".to_string())]
        );
        assert!(s.group_blockers(4).is_empty(), "no such group");
    }
}
