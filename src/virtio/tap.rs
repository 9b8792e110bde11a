//! The host side of a virtio-net device: a Linux tap interface (linux
//! Documentation/networking/tuntap.rst) opened with `IFF_VNET_HDR`, so every frame
//! read or written carries the 12-byte `struct virtio_net_hdr_v1` (virtio v1.2
//! 5.1.6) in front of it and the kernel does checksum and segmentation offload.
//!
//! A tap is either created (or attached, when persistent) by name, or adopted as
//! an already-open descriptor, which is how a live update hands it over.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use libc::{c_int, c_short, c_uint, c_ulong};
use vm_memory::VolatileSlice;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// `struct virtio_net_hdr_v1`: the header size set with TUNSETVNETHDRSZ. With
/// VIRTIO_F_VERSION_1 the header always has `num_buffers` (5.1.6).
pub const VNET_HDR_LEN: usize = 12;

/// Tap features molt relies on: Ethernet frames, no packet-info prefix, a vnet header.
const TAP_FLAGS: c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name and `ifr_flags` (the
/// rest of the 24-byte union is unused here).
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

impl IfReq {
    fn name(&self) -> String {
        let len = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..len]).into_owned()
    }
}

#[derive(Debug)]
pub enum Error {
    /// The interface name is empty, too long or contains a NUL.
    Name(String),
    Open(String, io::Error),
    SetIff(String, io::Error),
    /// The descriptor is not open.
    BadFd(i32, io::Error),
    GetIff(i32, io::Error),
    /// The descriptor is a tun/tap without the flags molt needs (IFF_* bits).
    NotTap(i32, String, c_short),
    Fcntl(String, &'static str, io::Error),
    SetVnetHdrSz(String, io::Error),
    SetOffload(String, c_uint, io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Name(n) => write!(f, "tap name '{n}' must be 1 to 15 bytes without NUL"),
            Error::Open(n, e) => write!(f, "tap {n}: cannot open /dev/net/tun: {e}"),
            Error::SetIff(n, e) => write!(f, "tap {n}: TUNSETIFF: {e}"),
            Error::BadFd(fd, e) => write!(f, "tap fd {fd}: not an open descriptor: {e}"),
            Error::GetIff(fd, e) => write!(f, "tap fd {fd}: TUNGETIFF failed, not a tap: {e}"),
            Error::NotTap(fd, n, flags) => write!(
                f,
                "tap fd {fd} ({n}): flags {flags:#x} lack IFF_TAP, IFF_NO_PI or IFF_VNET_HDR"
            ),
            Error::Fcntl(n, what, e) => write!(f, "tap {n}: fcntl {what}: {e}"),
            Error::SetVnetHdrSz(n, e) => write!(f, "tap {n}: TUNSETVNETHDRSZ: {e}"),
            Error::SetOffload(n, flags, e) => write!(f, "tap {n}: TUNSETOFFLOAD {flags:#x}: {e}"),
        }
    }
}

/// An open tap queue in non-blocking mode with a 12-byte vnet header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    /// What errors call it: the interface name, or "NAME (fd N)" when adopted.
    label: String,
    /// The interface name.
    name: String,
}

impl Tap {
    /// Creates the tap interface `name`, or attaches to it if it exists and is persistent.
    pub fn open(name: &str) -> Result<Tap, Error> {
        let mut req = IfReq::default();
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(Error::Name(name.into()));
        }
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = TAP_FLAGS as c_short;
        // std opens with O_CLOEXEC.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|e| Error::Open(name.into(), e))?;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
        if unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as c_ulong, &mut req) } < 0 {
            return Err(Error::SetIff(name.into(), io::Error::last_os_error()));
        }
        let name = req.name();
        Tap::finish(file, name.clone(), name)
    }

    /// Adopts `fd`, an open tap queue handed to molt (by argv or a live update).
    /// It is checked before molt takes ownership, so a wrong number is not closed.
    pub fn from_fd(fd: i32) -> Result<Tap, Error> {
        // SAFETY: F_GETFD only reads descriptor flags; an invalid fd gives EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::BadFd(fd, io::Error::last_os_error()));
        }
        let mut req = IfReq::default();
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`; on anything but a
        // tun/tap the call fails without writing.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF as _, &mut req) } < 0 {
            return Err(Error::GetIff(fd, io::Error::last_os_error()));
        }
        let name = req.name();
        if c_int::from(req.flags) & TAP_FLAGS != TAP_FLAGS {
            return Err(Error::NotTap(fd, name, req.flags));
        }
        // SAFETY: `fd` is open and is a tap; argv (or the live update) gives it to this
        // NIC alone, so owning and eventually closing it is right.
        let file = unsafe { File::from_raw_fd(fd) };
        let label = format!("{name} (fd {fd})");
        // SAFETY: plain fcntl calls on a descriptor we own.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(Error::Fcntl(
                label,
                "O_NONBLOCK",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(Error::Fcntl(
                label,
                "FD_CLOEXEC",
                io::Error::last_os_error(),
            ));
        }
        Tap::finish(file, label, name)
    }

    fn finish(file: File, label: String, name: String) -> Result<Tap, Error> {
        let size = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ as c_ulong, &size) } < 0 {
            return Err(Error::SetVnetHdrSz(label, io::Error::last_os_error()));
        }
        Ok(Tap { file, label, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets which offloads (`TUN_F_*`) frames read from the tap may use: what the
    /// guest said it can receive.
    pub fn set_offload(&self, flags: c_uint) -> Result<(), Error> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD as c_ulong, flags.into()) } < 0 {
            let e = io::Error::last_os_error();
            return Err(Error::SetOffload(self.label.clone(), flags, e));
        }
        Ok(())
    }

    /// Whether a read would find something now: a frame, or an error to
    /// report (a zero-timeout poll).
    pub fn has_input(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        unsafe { libc::poll(&mut p, 1, 0) != 0 }
    }

    /// Reads one frame (header first) into `bufs`, in order; a frame longer than
    /// `bufs` is truncated by the kernel. `WouldBlock` when none is queued.
    pub fn readv(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
        let iov: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .map(|(g, b)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let count = c_int::try_from(iov.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: each iovec covers a live VolatileSlice (valid, writable memory that
        // others only access volatilely) whose guard outlives the call.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame (header first) gathered from `bufs`.
    pub fn writev(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
        let iov: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .map(|(g, b)| libc::iovec {
                iov_base: g.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let count = c_int::try_from(iov.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: each iovec covers a live VolatileSlice whose guard outlives the
        // call; writev only reads from them.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// A tap stand-in for tests that need no TUN: any message-preserving descriptor
    /// (a SOCK_SEQPACKET socket), taken as is.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn stand_in(fd: std::os::fd::OwnedFd) -> Tap {
        Tap {
            file: File::from(fd),
            label: "stand-in".into(),
            name: "stand-in".into(),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Opens a tap, or says why this machine cannot: a failure to open
    /// /dev/net/tun or create an interface fails the test unless MOLT_ALLOW_NO_TUN=1.
    fn open_or_skip(name: &str, flags: c_int) -> Option<File> {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun");
        let result = opened
            .map_err(|e| format!("open /dev/net/tun: {e}"))
            .and_then(|file| {
                let mut req = IfReq::default();
                req.name[..name.len()].copy_from_slice(name.as_bytes());
                req.flags = flags as c_short;
                // SAFETY: TUNSETIFF reads and writes one `struct ifreq`.
                match unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as c_ulong, &mut req) } {
                    0 => Ok(file),
                    _ => Err(format!("TUNSETIFF: {}", io::Error::last_os_error())),
                }
            });
        match result {
            Ok(file) => Some(file),
            Err(why) if std::env::var("MOLT_ALLOW_NO_TUN").as_deref() == Ok("1") => {
                eprintln!("TUN unavailable ({why}): skipped, as MOLT_ALLOW_NO_TUN=1 allows");
                None
            }
            Err(why) => panic!("TUN unavailable ({why}); set MOLT_ALLOW_NO_TUN=1 to skip"),
        }
    }

    fn unique_name(tag: &str) -> String {
        format!("mt{tag}{}", std::process::id() % 1_000_000)
    }

    #[test]
    fn open_creates_interface_and_from_fd_adopts_it() {
        if open_or_skip(&unique_name("p"), TAP_FLAGS).is_none() {
            return;
        }
        let name = unique_name("a");
        let tap = Tap::open(&name).unwrap();
        assert_eq!(tap.name(), name);
        assert!(Path::new("/sys/class/net").join(&name).exists());
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        tap.set_offload(0).unwrap();

        // SAFETY: dup of a descriptor we own; the copy is handed to from_fd.
        let fd = unsafe { libc::dup(tap.as_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: clearing O_NONBLOCK and CLOEXEC on our own copy, to see them set again.
        unsafe {
            libc::fcntl(fd, libc::F_SETFL, 0);
            libc::fcntl(fd, libc::F_SETFD, 0);
        }
        let adopted = Tap::from_fd(fd).unwrap();
        assert_eq!(adopted.name(), name);
        assert_eq!(adopted.as_raw_fd(), fd);
        // SAFETY: reading flags of a descriptor `adopted` owns.
        let (fl, fdfl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fdfl & libc::FD_CLOEXEC, 0);

        // Nothing queued: a non-blocking read says so instead of hanging.
        let mut buf = [0u8; 64];
        let slice = VolatileSlice::from(&mut buf[..]);
        let e = adopted.readv(&[slice]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);

        drop((tap, adopted));
        assert!(!Path::new("/sys/class/net").join(&name).exists());
    }

    #[test]
    fn from_fd_rejects_non_taps() {
        let null = File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        let e = Tap::from_fd(fd).unwrap_err();
        assert!(matches!(e, Error::GetIff(f, _) if f == fd), "{e}");
        assert!(e.to_string().contains(&format!("fd {fd}")), "{e}");
        // The rejected descriptor was not taken over (and so not closed).
        // SAFETY: F_GETFD only reads flags.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);

        let e = Tap::from_fd(987_654).unwrap_err();
        assert!(matches!(e, Error::BadFd(987_654, _)), "{e}");

        // A tap without a vnet header would mis-frame every packet.
        let name = unique_name("b");
        let Some(file) = open_or_skip(&name, libc::IFF_TAP | libc::IFF_NO_PI) else {
            return;
        };
        let fd = file.as_raw_fd();
        let e = Tap::from_fd(fd).unwrap_err();
        assert!(
            matches!(e, Error::NotTap(f, ref n, _) if f == fd && *n == name),
            "{e}"
        );
        assert!(e.to_string().contains(&name), "{e}");
    }

    #[test]
    fn open_rejects_bad_names() {
        assert!(matches!(Tap::open(""), Err(Error::Name(_))));
        assert!(matches!(Tap::open("sixteen-bytes-xx"), Err(Error::Name(_))));
        assert!(matches!(Tap::open("a\0b"), Err(Error::Name(_))));
    }
}
