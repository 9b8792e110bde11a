//! Who is who: molt's own effective uid, and the credentials of the process at
//! the other end of a UNIX socket (SO_PEERCRED, taken by the kernel at
//! connect/listen time). The control socket and transfer mode admit only
//! molt's own uid; files molt keeps guest data in must be its own.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The effective uid molt runs as.
pub fn euid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// The peer's pid, uid and gid.
pub fn peer(s: &UnixStream) -> io::Result<libc::ucred> {
    // SAFETY: ucred is plain data; zeroed is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writing and `len` is cred's size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_pair_shows_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer(&a).unwrap();
        assert_eq!(c.uid, euid());
        assert_eq!(c.pid as u32, std::process::id());
    }
}
