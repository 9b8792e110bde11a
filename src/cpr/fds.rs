//! The descriptors a running guest depends on, and how they reach the next
//! process: by slot, never by name. Across `execve` a slot is a descriptor
//! number the new image inherits; across a socket it is a position in the
//! SCM_RIGHTS array. The receiving side checks every slot before using it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use heapless::Vec as BoundedVec;
use serde::{Deserialize, Serialize};

use crate::layout::{MAX_DISKS, MAX_NICS, MAX_VFIO_DEVICES, MAX_VFIO_EVENTFDS};
use crate::vfio::{HandedOver, RawHandles};

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    GuestRam,
    Disk(u8),
    Tap(u8),
    ControlListener,
    /// The control connection that asked for the update: the new process replies.
    Client,
    /// The console's output (stdout or the --serial file) and input.
    ConsoleOut,
    ConsoleIn,
    /// The image that handed over (exec): a rollback execs it by descriptor,
    /// which works even when its file was replaced on disk.
    PreviousExe,
    /// The old image's VM or vCPU descriptor, closed once the guest runs again.
    StaleKvm,
    /// Exec: the line to the guardian (`guardian.rs`), told once the guest runs.
    Guardian,
    /// The passed-through devices' VFIO container.
    VfioContainer,
    /// A VFIO group, by its number.
    VfioGroup(u32),
    /// Passed-through device i (argv order).
    VfioDevice(u8),
    /// An interrupt eventfd of device i: its vectors' irqfds, then the
    /// eventfds VFIO signals masked vectors on, each in vector order.
    VfioIrqfd(u8),
    VfioParked(u8),
    /// A control connection watching events (`events`): the new process sends
    /// them on. At most `MAX_WATCHERS`.
    Watcher,
}

pub const MAX_FDS: usize = 8
    + MAX_DISKS
    + MAX_NICS
    + 1
    + crate::layout::MAX_VCPUS
    + 1
    + 2 * MAX_VFIO_DEVICES
    + MAX_VFIO_EVENTFDS
    + crate::control::MAX_WATCHERS;

/// SCM_RIGHTS carries at most this many descriptors in one message
/// (SCM_MAX_FD): a transfer's FDS is one.
const _: () = assert!(MAX_FDS <= 253);

/// The descriptor table that travels with a `CprState`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdTable {
    pub kinds: BoundedVec<FdKind, MAX_FDS>,
    /// Exec only: the number slot i has in the new image.
    pub numbers: BoundedVec<i32, MAX_FDS>,
}

/// Sets or clears FD_CLOEXEC.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only read and write the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The descriptors an update hands over, borrowed, by kind: the sending
/// side's mirror of `Adopted`. `slots` is the one place that lists them.
#[derive(Debug, Default, Clone)]
pub struct Handover {
    pub ram: Option<RawFd>,
    pub disks: Vec<RawFd>,
    pub taps: Vec<RawFd>,
    pub listener: Option<RawFd>,
    pub client: Option<RawFd>,
    pub console_out: Option<RawFd>,
    pub console_in: Option<RawFd>,
    pub previous_exe: Option<RawFd>,
    pub stale_kvm: Vec<RawFd>,
    pub guardian: Option<RawFd>,
    pub vfio: RawHandles,
    pub watchers: Vec<RawFd>,
}

impl Handover {
    /// What the machine's guest depends on, the control socket, the client
    /// that asked, the event watchers and the console's input. What only an
    /// exec hands over (its own image, the guardian, the KVM descriptors) is
    /// added by exec mode.
    pub fn new(
        machine: &crate::vm::Backends,
        listener: Option<RawFd>,
        client: RawFd,
        watchers: &[RawFd],
        console_in: Option<RawFd>,
        vfio: RawHandles,
    ) -> Handover {
        Handover {
            vfio,
            ram: Some(machine.ram),
            disks: machine.disks.clone(),
            taps: machine.taps.clone(),
            listener,
            client: Some(client),
            console_out: machine.console_out,
            console_in,
            watchers: watchers
                .iter()
                .take(crate::control::MAX_WATCHERS)
                .copied()
                .collect(),
            ..Handover::default()
        }
    }

    /// What a rollback hands on: everything it received, but the previous
    /// image (which it execs) and the old VM (which it closed).
    pub fn of(a: &Adopted) -> Handover {
        let raw = |f: &Option<OwnedFd>| f.as_ref().map(AsRawFd::as_raw_fd);
        Handover {
            ram: a.ram.as_ref().map(AsRawFd::as_raw_fd),
            disks: a.disks.iter().map(AsRawFd::as_raw_fd).collect(),
            taps: a.taps.iter().map(AsRawFd::as_raw_fd).collect(),
            listener: raw(&a.listener),
            client: raw(&a.client),
            console_out: a.console_out.as_ref().map(AsRawFd::as_raw_fd),
            console_in: raw(&a.console_in),
            guardian: raw(&a.guardian),
            vfio: a.vfio.raw(),
            watchers: a.watchers.iter().map(AsRawFd::as_raw_fd).collect(),
            ..Handover::default()
        }
    }

    /// The slot list that travels: each descriptor with its kind.
    pub fn slots(&self) -> Vec<(FdKind, RawFd)> {
        let one = |kind, fd: Option<RawFd>| fd.map(|fd| (kind, fd));
        let mut s: Vec<(FdKind, RawFd)> = one(FdKind::GuestRam, self.ram).into_iter().collect();
        s.extend(
            (0u8..)
                .zip(&self.disks)
                .map(|(i, &fd)| (FdKind::Disk(i), fd)),
        );
        s.extend((0u8..).zip(&self.taps).map(|(i, &fd)| (FdKind::Tap(i), fd)));
        s.extend(one(FdKind::ControlListener, self.listener));
        s.extend(one(FdKind::Client, self.client));
        s.extend(one(FdKind::ConsoleOut, self.console_out));
        s.extend(one(FdKind::ConsoleIn, self.console_in));
        s.extend(one(FdKind::PreviousExe, self.previous_exe));
        s.extend(one(FdKind::Guardian, self.guardian));
        s.extend(self.stale_kvm.iter().map(|&fd| (FdKind::StaleKvm, fd)));
        let v = &self.vfio;
        s.extend(one(FdKind::VfioContainer, v.container));
        s.extend(v.groups.iter().map(|&(id, fd)| (FdKind::VfioGroup(id), fd)));
        for (i, ((&dev, irqfds), parked)) in
            (0u8..).zip(v.devices.iter().zip(&v.irqfds).zip(&v.parked))
        {
            s.push((FdKind::VfioDevice(i), dev));
            s.extend(irqfds.iter().map(|&fd| (FdKind::VfioIrqfd(i), fd)));
            s.extend(parked.iter().map(|&fd| (FdKind::VfioParked(i), fd)));
        }
        s.extend(self.watchers.iter().map(|&fd| (FdKind::Watcher, fd)));
        s
    }
}

/// Descriptors received from the old process, owned, sorted by kind.
#[derive(Debug, Default)]
pub struct Adopted {
    pub ram: Option<File>,
    pub disks: Vec<File>,
    pub taps: Vec<OwnedFd>,
    pub listener: Option<OwnedFd>,
    pub client: Option<OwnedFd>,
    pub console_out: Option<File>,
    pub console_in: Option<OwnedFd>,
    pub previous_exe: Option<OwnedFd>,
    pub stale_kvm: Vec<OwnedFd>,
    pub guardian: Option<OwnedFd>,
    pub vfio: HandedOver,
    pub watchers: Vec<OwnedFd>,
}

/// Why a hand-over's descriptors were refused.
#[derive(Debug)]
pub enum Error {
    Count {
        slots: usize,
        fds: usize,
    },
    Unusable(RawFd, io::Error),
    Twice(FdKind),
    Unexpected {
        kind: FdKind,
        disks: usize,
        nets: usize,
    },
    NoRam,
    Watchers,
    Backends {
        disks: usize,
        taps: usize,
        want_disks: usize,
        want_nets: usize,
    },
    /// The VFIO descriptors do not match the `--vfio` devices.
    Vfio {
        devices: usize,
        container: bool,
        want: usize,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Count { slots, fds } => write!(f, "{slots} slots for {fds} descriptors"),
            Error::Unusable(fd, e) => write!(f, "descriptor {fd} is not usable: {e}"),
            Error::Twice(kind) => write!(f, "the handover names the {kind:?} twice"),
            Error::Unexpected { kind, disks, nets } => write!(
                f,
                "unexpected {kind:?} (configured: {disks} disks, {nets} NICs)"
            ),
            Error::NoRam => write!(f, "the handover has no guest RAM"),
            Error::Watchers => write!(
                f,
                "the handover has more than {} event watchers",
                crate::control::MAX_WATCHERS
            ),
            Error::Backends {
                disks,
                taps,
                want_disks,
                want_nets,
            } => write!(
                f,
                "the handover has {disks} disks and {taps} taps, the command line \
                 {want_disks} and {want_nets}"
            ),
            Error::Vfio {
                devices,
                container,
                want,
            } => write!(
                f,
                "the handover has {devices} VFIO devices ({}), the command line {want}",
                if *container {
                    "with a container"
                } else {
                    "without a container"
                }
            ),
        }
    }
}

/// How many of each device the command line configures: a hand-over must
/// bring exactly their descriptors.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub disks: usize,
    pub nets: usize,
    pub vfio: usize,
}

/// Takes ownership of `fds[i]` as `kinds[i]`, checking each kind appears
/// once, disks, taps and VFIO devices come in order and match the configured
/// counts (a device's eventfds after it), and every descriptor is open. Sets
/// CLOEXEC on all: they are this process's now.
pub fn adopt(kinds: &[FdKind], fds: &[RawFd], want: Counts) -> Result<Adopted, Error> {
    let Counts { disks, nets, vfio } = want;
    if kinds.len() != fds.len() {
        return Err(Error::Count {
            slots: kinds.len(),
            fds: fds.len(),
        });
    }
    for &fd in fds {
        set_cloexec(fd, true).map_err(|e| Error::Unusable(fd, e))?;
    }
    let mut a = Adopted::default();
    for (&kind, &fd) in kinds.iter().zip(fds) {
        // SAFETY: the descriptor was handed to this process for exactly this slot
        // (inherited across exec or received by SCM_RIGHTS), is open (checked
        // above) and nothing else owns it; each slot is taken once (checked below).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match kind {
            FdKind::GuestRam if a.ram.is_none() => a.ram = Some(File::from(owned)),
            FdKind::Disk(i) if usize::from(i) == a.disks.len() && a.disks.len() < disks => {
                a.disks.push(File::from(owned))
            }
            FdKind::Tap(i) if usize::from(i) == a.taps.len() && a.taps.len() < nets => {
                a.taps.push(owned)
            }
            FdKind::ControlListener if a.listener.is_none() => a.listener = Some(owned),
            FdKind::Client if a.client.is_none() => a.client = Some(owned),
            FdKind::ConsoleOut if a.console_out.is_none() => {
                a.console_out = Some(File::from(owned))
            }
            FdKind::ConsoleIn if a.console_in.is_none() => a.console_in = Some(owned),
            FdKind::PreviousExe if a.previous_exe.is_none() => a.previous_exe = Some(owned),
            FdKind::StaleKvm => a.stale_kvm.push(owned),
            FdKind::Guardian if a.guardian.is_none() => a.guardian = Some(owned),
            FdKind::VfioContainer if a.vfio.container.is_none() => a.vfio.container = Some(owned),
            FdKind::VfioGroup(id)
                if a.vfio.groups.len() < MAX_VFIO_DEVICES
                    && a.vfio.groups.iter().all(|(g, _)| *g != id) =>
            {
                a.vfio.groups.push((id, owned))
            }
            FdKind::Watcher if a.watchers.len() < crate::control::MAX_WATCHERS => {
                a.watchers.push(owned)
            }
            FdKind::Watcher => return Err(Error::Watchers),
            FdKind::VfioDevice(i)
                if usize::from(i) == a.vfio.devices.len() && usize::from(i) < vfio =>
            {
                a.vfio.devices.push(owned);
                a.vfio.irqfds.push(Vec::new());
                a.vfio.parked.push(Vec::new());
            }
            // A device's eventfds follow it, before the next device.
            FdKind::VfioIrqfd(i) if usize::from(i) + 1 == a.vfio.devices.len() => {
                a.vfio.irqfds[usize::from(i)].push(owned)
            }
            FdKind::VfioParked(i) if usize::from(i) + 1 == a.vfio.devices.len() => {
                a.vfio.parked[usize::from(i)].push(owned)
            }
            FdKind::Disk(_)
            | FdKind::Tap(_)
            | FdKind::VfioDevice(_)
            | FdKind::VfioIrqfd(_)
            | FdKind::VfioParked(_) => return Err(Error::Unexpected { kind, disks, nets }),
            other => return Err(Error::Twice(other)),
        }
    }
    if a.ram.is_none() {
        return Err(Error::NoRam);
    }
    if a.disks.len() != disks || a.taps.len() != nets {
        return Err(Error::Backends {
            disks: a.disks.len(),
            taps: a.taps.len(),
            want_disks: disks,
            want_nets: nets,
        });
    }
    if a.vfio.devices.len() != vfio || a.vfio.container.is_some() != (vfio > 0) {
        return Err(Error::Vfio {
            devices: a.vfio.devices.len(),
            container: a.vfio.container.is_some(),
            want: vfio,
        });
    }
    Ok(a)
}

/// A path that opens the same file as `f` (a fresh open file description).
pub fn proc_path(f: &impl AsRawFd) -> std::path::PathBuf {
    format!("/proc/self/fd/{}", f.as_raw_fd()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> RawFd {
        use std::os::fd::IntoRawFd;
        File::open("/dev/null").unwrap().into_raw_fd()
    }

    #[test]
    fn adopt_checks_slots() {
        let kinds = [FdKind::GuestRam, FdKind::Disk(0), FdKind::Client];
        let counts = |disks, nets| Counts {
            disks,
            nets,
            vfio: 0,
        };
        let a = adopt(&kinds, &[fd(), fd(), fd()], counts(1, 0)).unwrap();
        assert!(a.ram.is_some() && a.client.is_some());
        assert_eq!(a.disks.len(), 1);
        assert!(adopt(
            &[FdKind::GuestRam, FdKind::GuestRam],
            &[fd(), fd()],
            counts(0, 0)
        )
        .unwrap_err()
        .to_string()
        .contains("twice"));
        assert!(adopt(
            &[FdKind::GuestRam, FdKind::Tap(1)],
            &[fd(), fd()],
            counts(0, 2)
        )
        .is_err());
        let refused = |kinds: &[FdKind], fds: &[RawFd], disks| {
            adopt(kinds, fds, counts(disks, 0)).unwrap_err().to_string()
        };
        assert!(refused(&[FdKind::Disk(0)], &[fd()], 1).contains("RAM"));
        assert!(refused(&[FdKind::GuestRam], &[fd()], 1).contains("disks"));
        assert!(refused(&[FdKind::GuestRam], &[9999], 0).contains("9999"));
    }

    #[test]
    fn vfio_descriptors_come_in_order_each_device_with_its_eventfds() {
        let want = |vfio| Counts {
            disks: 0,
            nets: 0,
            vfio,
        };
        let handover = Handover {
            ram: Some(fd()),
            vfio: RawHandles {
                container: Some(fd()),
                groups: vec![(7, fd())],
                devices: vec![fd(), fd()],
                irqfds: vec![vec![fd()], vec![fd(), fd()]],
                parked: vec![vec![fd()], vec![fd(), fd()]],
            },
            ..Handover::default()
        };
        let slots = handover.slots();
        let kinds: Vec<FdKind> = slots.iter().map(|s| s.0).collect();
        assert_eq!(
            kinds[1..5],
            [
                FdKind::VfioContainer,
                FdKind::VfioGroup(7),
                FdKind::VfioDevice(0),
                FdKind::VfioIrqfd(0)
            ]
        );
        let raw: Vec<RawFd> = slots.iter().map(|s| s.1).collect();
        let a = adopt(&kinds, &raw, want(2)).unwrap();
        assert_eq!(a.vfio.groups.len(), 1);
        assert_eq!(a.vfio.devices.len(), 2);
        assert_eq!(
            a.vfio.irqfds.iter().map(Vec::len).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(a.vfio.parked[1].len(), 2);
        // A rollback hands on exactly what came.
        let again: Vec<FdKind> = Handover::of(&a).slots().iter().map(|s| s.0).collect();
        assert_eq!(again, kinds);
        assert_eq!(a.vfio.raw().eventfds(), 6);
        // Refused: another device count, no container, an eventfd before its
        // device, a device out of order.
        let refused = |kinds: &[FdKind], vfio| {
            let fds: Vec<RawFd> = kinds.iter().map(|_| fd()).collect();
            adopt(kinds, &fds, want(vfio)).unwrap_err().to_string()
        };
        let dev = |i| FdKind::VfioDevice(i);
        let (ram, box_) = (FdKind::GuestRam, FdKind::VfioContainer);
        assert!(refused(&[ram, box_, dev(0)], 2).contains("1 VFIO devices"));
        assert!(refused(&[ram, dev(0)], 1).contains("without a container"));
        assert!(refused(&[ram, box_], 0).contains("with a container"));
        assert!(refused(&[ram, box_, FdKind::VfioIrqfd(0), dev(0)], 1).contains("unexpected"));
        assert!(refused(&[ram, box_, dev(1)], 2).contains("unexpected"));
        assert!(refused(&[ram, box_, dev(0), dev(1)], 1).contains("unexpected"));
        let twice = [ram, FdKind::VfioGroup(3), FdKind::VfioGroup(3)];
        assert!(refused(&twice, 0).contains("twice"));
    }

    #[test]
    fn watchers_are_handed_over_up_to_the_bound() {
        use crate::control::MAX_WATCHERS;
        let mut kinds = vec![FdKind::GuestRam];
        kinds.extend([FdKind::Watcher; MAX_WATCHERS]);
        let fds: Vec<RawFd> = kinds.iter().map(|_| fd()).collect();
        let a = adopt(&kinds, &fds, Counts::default()).unwrap();
        assert_eq!(a.watchers.len(), MAX_WATCHERS);
        let back = Handover::of(&a).slots();
        let watchers = back.iter().filter(|(k, _)| *k == FdKind::Watcher);
        assert_eq!(watchers.count(), MAX_WATCHERS, "a rollback hands them on");

        kinds.push(FdKind::Watcher);
        let fds: Vec<RawFd> = kinds.iter().map(|_| fd()).collect();
        let e = adopt(&kinds, &fds, Counts::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("more than {MAX_WATCHERS} event watchers")),
            "{e}"
        );
        assert!(kinds.len() <= MAX_FDS);
    }

    #[test]
    fn cloexec_toggles() {
        let f = File::open("/dev/null").unwrap();
        // SAFETY: F_GETFD only reads the flags of an open descriptor.
        let flags = || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
        set_cloexec(f.as_raw_fd(), false).unwrap();
        assert_eq!(flags() & libc::FD_CLOEXEC, 0);
        set_cloexec(f.as_raw_fd(), true).unwrap();
        assert_ne!(flags() & libc::FD_CLOEXEC, 0);
    }
}
