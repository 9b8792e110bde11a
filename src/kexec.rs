//! `molt kexec`: boots another host kernel in place (reboot mode's host-update
//! path). `kexec_file_load(2)` stages the kernel, `reboot(LINUX_REBOOT_CMD_KEXEC)`
//! jumps into it; the staged initramfs restarts molt with `--incoming`.
//! Debian's kexec-tools links Xen libraries; two syscalls need nothing.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    Open(&'static str, PathBuf, std::io::Error),
    Cmdline,
    Load(std::io::Error),
    Reboot(std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open(what, p, e) => write!(f, "cannot open {what} {}: {e}", p.display()),
            Error::Cmdline => write!(f, "--cmdline contains a NUL byte"),
            Error::Load(e) => write!(f, "kexec_file_load failed: {e}"),
            Error::Reboot(e) => write!(f, "reboot(LINUX_REBOOT_CMD_KEXEC) failed: {e}"),
        }
    }
}

/// Stages `kernel` (with `initrd` and `cmdline`) and, if `exec`, jumps into it.
/// Only returns on failure (or after staging, when `exec` is false).
pub fn kexec(kernel: &Path, initrd: Option<&Path>, cmdline: &str, exec: bool) -> Result<(), Error> {
    let k = File::open(kernel).map_err(|e| Error::Open("--kernel", kernel.into(), e))?;
    let i = initrd
        .map(|p| File::open(p).map_err(|e| Error::Open("--initrd", p.into(), e)))
        .transpose()?;
    let c = CString::new(cmdline).map_err(|_| Error::Cmdline)?;
    let flags = if i.is_none() {
        libc::KEXEC_FILE_NO_INITRAMFS
    } else {
        0
    };
    // SAFETY: the descriptors are open files, the command line is NUL-terminated
    // and its length includes the NUL, as kexec_file_load(2) requires.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            k.as_raw_fd(),
            i.as_ref().map_or(-1, |f| f.as_raw_fd()),
            c.as_bytes_with_nul().len(),
            c.as_ptr(),
            flags,
        )
    };
    if r != 0 {
        return Err(Error::Load(std::io::Error::last_os_error()));
    }
    if !exec {
        return Ok(());
    }
    Err(exec_staged())
}

/// Reboots into the staged kernel; returns only on failure.
pub fn exec_staged() -> Error {
    // SAFETY: flushing buffers has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot with the KEXEC command only returns on failure.
    let r = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC) };
    Error::Reboot(if r != 0 {
        std::io::Error::last_os_error()
    } else {
        std::io::Error::other("returned")
    })
}
