//! The files molt keeps guest data in (SPEC.md "Files molt creates"): state
//! files and their temporaries, `--mem-file` and `--serial file:`.
//!
//! They hold guest RAM or what the guest printed, and molt usually runs as root,
//! so a path is never followed through a symlink (O_NOFOLLOW: a link planted in
//! /tmp or /dev/shm cannot make molt overwrite, grow or read another file), files
//! are created mode 0600, and an existing regular file that other users may read
//! or write, or that another user owns, is refused. Devices (/dev/pmem0,
//! /dev/dax0.0) are the administrator's to protect and are not checked.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The mode of every file molt creates.
const MODE: u32 = 0o600;
/// Permission bits that let the group or others read or write.
const SHARED: u32 = 0o066;

#[derive(Debug)]
pub enum Error {
    Open(&'static str, PathBuf, io::Error),
    Symlink(&'static str, PathBuf),
    /// Mode bits (`st_mode & 0o7777`) that give other users access.
    Shared(&'static str, PathBuf, u32),
    /// The file's owner, and molt's effective uid.
    Owner(&'static str, PathBuf, u32, u32),
    /// A new file's name was taken; with why removing it failed, if it did.
    Exists(&'static str, PathBuf, Option<io::Error>),
    /// A socket's path is another process's live socket.
    InUse(&'static str, PathBuf),
    Bind(&'static str, PathBuf, io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open(what, p, e) => write!(f, "cannot open {what} {}: {e}", p.display()),
            Error::InUse(what, p) => {
                write!(f, "{what} {} is in use by another process", p.display())
            }
            Error::Bind(what, p, e) => write!(f, "cannot create {what} {}: {e}", p.display()),
            Error::Symlink(what, p) => write!(
                f,
                "{what} {} is a symbolic link; molt does not follow links for the files \
                 it keeps guest data in: name the file itself",
                p.display()
            ),
            Error::Shared(what, p, mode) => {
                let access = match (mode & 0o044 != 0, mode & 0o022 != 0) {
                    (true, true) => "readable and writable",
                    (true, false) => "readable",
                    _ => "writable",
                };
                write!(
                    f,
                    "{what} {} is {access} by other users (mode {mode:04o}): chmod 600 it",
                    p.display()
                )
            }
            Error::Owner(what, p, owner, ours) => write!(
                f,
                "{what} {} is owned by uid {owner}, not by molt's uid {ours}: chown it \
                 or use another file",
                p.display()
            ),
            Error::Exists(what, p, None) => write!(
                f,
                "cannot create {what} {}: it was created again by someone else after \
                 molt removed the stale one",
                p.display()
            ),
            Error::Exists(what, p, Some(e)) => write!(
                f,
                "cannot create {what} {}: a stale one is there and cannot be removed: {e}",
                p.display()
            ),
        }
    }
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// An existing file, read only (a state to load).
    Read,
    /// Read and write, created if missing, never truncated (`--mem-file`).
    ReadWrite,
    /// Read and write, an existing file only (`--mem-file` mapped while a
    /// restart's state is still being checked: nothing may be created).
    Existing,
    /// Appended to, created if missing (`--serial file:`).
    Append,
    /// A file molt alone writes (a state's temporary): whatever is at the path
    /// is removed first (unlink never follows a link), then the file is created
    /// with O_EXCL, so a link or file planted between the two fails the create.
    CreateNew,
}

/// Opens `path` (`what` names it in errors: "--mem-file", "state file") without
/// following a symlink, creating it mode 0600 where `access` creates, and checks
/// who else may use it.
pub fn open(what: &'static str, path: &Path, access: Access) -> Result<File, Error> {
    let mut opts = OpenOptions::new();
    match access {
        Access::Read => opts.read(true),
        Access::ReadWrite => opts.read(true).write(true).create(true).truncate(false),
        Access::Existing => opts.read(true).write(true),
        Access::Append => opts.append(true).create(true),
        Access::CreateNew => opts.write(true).create_new(true),
    };
    // std adds O_CLOEXEC.
    opts.custom_flags(libc::O_NOFOLLOW).mode(MODE);
    let removed = match access {
        Access::CreateNew => match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Some(e),
            _ => None,
        },
        _ => None,
    };
    let file = opts.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            Error::Exists(what, path.into(), removed)
        } else if e.raw_os_error() == Some(libc::ELOOP) && is_symlink(path) {
            Error::Symlink(what, path.into())
        } else {
            Error::Open(what, path.into(), e)
        }
    })?;
    check(what, path, &file)?;
    Ok(file)
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Refuses a regular file another user owns or may read or write.
fn check(what: &'static str, path: &Path, file: &File) -> Result<(), Error> {
    let meta = file
        .metadata()
        .map_err(|e| Error::Open(what, path.into(), e))?;
    if !meta.is_file() {
        return Ok(());
    }
    let ours = crate::creds::euid();
    if meta.uid() != ours {
        return Err(Error::Owner(what, path.into(), meta.uid(), ours));
    }
    let mode = meta.mode() & 0o7777;
    if mode & SHARED != 0 {
        return Err(Error::Shared(what, path.into(), mode));
    }
    Ok(())
}

/// Creates a listening socket (non-blocking), mode 0600. A stale socket file
/// nobody listens on is replaced; a live one is an error, so two VMMs never
/// share a path.
pub fn bind_socket(what: &'static str, path: &Path) -> Result<UnixListener, Error> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::Bind(
                what,
                path.into(),
                std::io::Error::new(ErrorKind::AlreadyExists, "exists and is not a socket"),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::InUse(what, path.into()));
        }
        std::fs::remove_file(path).map_err(|e| Error::Bind(what, path.into(), e))?;
    }
    // The umask makes the socket 0600 from birth: a chmod after bind leaves a window.
    // SAFETY: umask has no preconditions; molt has started no other thread yet.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| Error::Bind(what, path.into(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Bind(what, path.into(), e))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory under the temp dir, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("molt-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir(&d).unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn write_with_mode(p: &Path, bytes: &[u8], m: u32) {
        std::fs::write(p, bytes).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn created_files_are_0600() {
        let d = Dir::new("create");
        for (name, access) in [
            ("rw", Access::ReadWrite),
            ("append", Access::Append),
            ("new", Access::CreateNew),
        ] {
            let p = d.0.join(name);
            open("test file", &p, access).unwrap();
            assert_eq!(mode(&p), 0o600, "{access:?}");
        }
    }

    #[test]
    fn a_symlink_is_refused_and_its_target_untouched() {
        let d = Dir::new("link");
        let victim = d.0.join("victim");
        write_with_mode(&victim, b"victim", 0o600);
        let link = d.0.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        for access in [Access::Read, Access::ReadWrite, Access::Append] {
            let e = open("test file", &link, access).unwrap_err();
            assert!(matches!(e, Error::Symlink(..)), "{access:?}: {e}");
            assert!(e.to_string().contains("is a symbolic link"), "{e}");
        }
        // A dangling link is not created through either.
        let dangling = d.0.join("dangling");
        std::os::unix::fs::symlink(d.0.join("nowhere"), &dangling).unwrap();
        let e = open("test file", &dangling, Access::Append).unwrap_err();
        assert!(matches!(e, Error::Symlink(..)), "{e}");
        assert!(!d.0.join("nowhere").exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
    }

    #[test]
    fn create_new_replaces_a_planted_link_or_stale_file() {
        let d = Dir::new("new");
        let victim = d.0.join("victim");
        write_with_mode(&victim, b"victim", 0o644);
        let tmp = d.0.join("state.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        open("temp", &tmp, Access::CreateNew)
            .unwrap()
            .write_all(b"new")
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        assert_eq!(mode(&victim), 0o644);
        assert_eq!(mode(&tmp), 0o600, "a regular file now");
        assert_eq!(std::fs::read(&tmp).unwrap(), b"new");

        write_with_mode(&tmp, b"stale", 0o644);
        open("temp", &tmp, Access::CreateNew).unwrap();
        assert_eq!(mode(&tmp), 0o600);
        assert_eq!(std::fs::read(&tmp).unwrap(), b"");

        // What cannot be removed (here a directory) fails the create, naming it.
        std::fs::remove_file(&tmp).unwrap();
        std::fs::create_dir(&tmp).unwrap();
        let e = open("temp", &tmp, Access::CreateNew).unwrap_err();
        assert!(matches!(e, Error::Exists(_, _, Some(_))), "{e}");
        assert!(e.to_string().contains(&tmp.display().to_string()), "{e}");
    }

    #[test]
    fn files_other_users_may_use_are_refused() {
        let d = Dir::new("shared");
        let p = d.0.join("f");
        for (m, words) in [
            (
                0o644,
                "is readable by other users (mode 0644): chmod 600 it",
            ),
            (0o640, "is readable by other users (mode 0640)"),
            (0o602, "is writable by other users (mode 0602)"),
            (0o666, "is readable and writable by other users (mode 0666)"),
        ] {
            write_with_mode(&p, b"data", m);
            for access in [Access::Read, Access::ReadWrite, Access::Append] {
                let e = open("test file", &p, access).unwrap_err();
                assert!(e.to_string().contains(words), "{m:o} {access:?}: {e}");
            }
            assert_eq!(std::fs::read(&p).unwrap(), b"data");
        }
        // Only group and others count: 0700 is molt's own business.
        write_with_mode(&p, b"data", 0o700);
        let mut s = String::new();
        open("test file", &p, Access::Read)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "data");
    }

    #[test]
    fn a_file_of_another_owner_is_refused() {
        let d = Dir::new("owner");
        let p = d.0.join("f");
        write_with_mode(&p, b"data", 0o600);
        if crate::creds::euid() != 0 {
            // Straight to fd 2, so that the skip shows in the log.
            let _ = writeln!(
                io::stderr(),
                "SKIPPED a_file_of_another_owner_is_refused: not root"
            );
            return;
        }
        std::os::unix::fs::chown(&p, Some(65534), None).expect("chown to uid 65534");
        let e = open("test file", &p, Access::ReadWrite).unwrap_err();
        assert!(matches!(e, Error::Owner(_, _, 65534, _)), "{e}");
        assert!(e.to_string().contains("is owned by uid 65534"), "{e}");
    }

    #[test]
    fn devices_are_not_checked() {
        // /dev/null is mode 0666 and root's: a device is the administrator's to protect.
        open("test device", Path::new("/dev/null"), Access::ReadWrite).unwrap();
        open("test device", Path::new("/dev/null"), Access::Append).unwrap();
    }
}
