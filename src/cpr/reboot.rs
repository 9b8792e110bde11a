//! Reboot mode: the state goes to a file, molt exits, and a later `molt run`
//! with the same arguments and `--incoming file:PATH` resumes the guest - after
//! a restart of molt, or a kexec into another host kernel.
//!
//! The file is written to `PATH.tmp`, fsynced, renamed over PATH and the
//! directory fsynced: PATH is either the old file or the complete new one. The
//! temporary is created anew, mode 0600 (a stale file or planted link there is
//! removed first, see `files`), and the rename replaces a link named PATH rather
//! than writing through it. A state is loaded only from a file molt would have
//! written: not through a link, not readable by other users.
//! Guest RAM stays where it is when it lives in a `--mem-file` (flushed to it
//! first); otherwise it follows the state as a RAM section:
//! `"MOLTRAM\0"`, records `(offset u64, len u64, bytes)` of the populated
//! parts of RAM, an end record `(u64::MAX, 0)`, and the CRC32 of the records.

use std::fmt;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::Bytes;

use super::state::{self, CprState, RamLocation, HEADER_LEN};
use crate::files::{self, Access};
use crate::vm::memory::GuestRam;

const RAM_MAGIC: [u8; 8] = *b"MOLTRAM\0";
const END: u64 = u64::MAX;
/// RAM is copied in pieces of at most this much.
const CHUNK: u64 = 8 << 20;

/// A RAM copy's progress, said once a second: copying gigabytes through the
/// state file takes long enough for an operator to wonder.
struct Progress {
    /// "saving guest RAM", "restoring guest RAM".
    what: &'static str,
    done: u64,
    total: u64,
    next: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(1);

    fn new(what: &'static str, total: u64, now: Instant) -> Progress {
        Progress {
            what,
            done: 0,
            total,
            next: now + Self::EVERY,
        }
    }

    /// Counts `n` more bytes copied by `now`; the line to log, once a second.
    fn add(&mut self, n: u64, now: Instant) -> Option<String> {
        self.done += n;
        if now < self.next {
            return None;
        }
        self.next = now + Self::EVERY;
        Some(format!(
            "{}: {} of {} MiB ({}%)",
            self.what,
            self.done >> 20,
            self.total >> 20,
            self.done * 100 / self.total.max(1)
        ))
    }

    fn tick(&mut self, n: u64) {
        if let Some(line) = self.add(n, Instant::now()) {
            log::info!("{line}");
        }
    }
}

#[derive(Debug)]
pub enum Error {
    Access(files::Error),
    Io(&'static str, PathBuf, std::io::Error),
    State(PathBuf, state::Error),
    Ram(PathBuf, RamError),
}

/// Why the RAM section of a state file is refused, or could not be loaded.
#[derive(Debug)]
pub enum RamError {
    /// The file ends inside the section.
    Truncated,
    Read(std::io::Error),
    BadMagic,
    /// A record that does not lie within one region of guest RAM.
    OutsideRam {
        off: u64,
        len: u64,
    },
    Crc {
        actual: u32,
        stored: u32,
    },
    /// Bytes after the section's CRC.
    Trailing,
    /// A checked record could not be copied into guest RAM.
    Write(vm_memory::GuestMemoryError),
}

impl fmt::Display for RamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RamError::Truncated => write!(f, "truncated"),
            RamError::Read(e) => write!(f, "read failed: {e}"),
            RamError::BadMagic => write!(f, "missing (bad magic)"),
            RamError::OutsideRam { off, len } => {
                write!(f, "record at {off:#x}+{len:#x} is outside guest RAM")
            }
            RamError::Crc { actual, stored } => write!(
                f,
                "CRC32 {actual:#010x} does not match the stored {stored:#010x}"
            ),
            RamError::Trailing => write!(f, "unexpected bytes after the RAM section"),
            RamError::Write(e) => e.fmt(f),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Access(e) => e.fmt(f),
            Error::Io(what, p, e) => write!(f, "cannot {what} {}: {e}", p.display()),
            Error::State(p, e) => write!(f, "state file {}: {e}", p.display()),
            Error::Ram(p, why) => write!(f, "state file {}: RAM section: {why}", p.display()),
        }
    }
}

/// A state file about to be written: its temporary created and the
/// encoding's buffer made (its pages written) before the pause, so that the
/// pause only encodes and writes. Dropped unsaved, the temporary goes again.
pub struct Pending {
    path: PathBuf,
    tmp: PathBuf,
    /// Taken by `save`.
    file: Option<File>,
    buf: Vec<u8>,
    /// The temporary became the state file: nothing to remove.
    renamed: bool,
}

/// Creates `path`'s temporary and the buffer for a machine of `vcpus` vCPUs.
pub fn prepare(path: &Path, vcpus: usize) -> Result<Pending, Error> {
    let tmp = tmp_path(path);
    let file =
        files::open("temporary state file", &tmp, Access::CreateNew).map_err(Error::Access)?;
    Ok(Pending {
        path: path.into(),
        tmp,
        file: Some(file),
        buf: state::buffer(vcpus),
        renamed: false,
    })
}

impl Pending {
    /// Writes `state` in state format `format` (and RAM, unless it stays in
    /// place) to the path atomically. Returns the file's size. On failure
    /// nothing is left at the path that was not there before.
    pub fn save(mut self, (state, format): (&CprState, u32), ram: &GuestRam) -> Result<u64, Error> {
        let (path, tmp) = (self.path.clone(), self.tmp.clone());
        let buf = std::mem::take(&mut self.buf);
        let bytes =
            state::encode_into(state, format, buf).map_err(|e| Error::State(path.clone(), e))?;
        if matches!(state.ram, RamLocation::InPlace { .. }) {
            // A --mem-file on pmem or disk holds dirty pages in the page cache: they
            // must reach the device before a kexec throws the cache away.
            ram.file().sync_data().map_err(|e| {
                Error::Io("flush guest RAM to its file before saving", path.clone(), e)
            })?;
        }
        // `tmp` is the file molt created: removed again on failure (`drop`).
        let file = self.file.take().ok_or_else(|| {
            Error::Io(
                "write",
                tmp.clone(),
                std::io::Error::other("written already"),
            )
        })?;
        let size = write_file(file, &tmp, &bytes, state, ram)?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::Io("rename to", path.clone(), e))?;
        self.renamed = true;
        sync_dir(&path)?;
        Ok(size)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn sync_dir(path: &Path) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::Io("sync directory of", path.into(), e))
}

fn write_file(
    file: File,
    tmp: &Path,
    bytes: &[u8],
    state: &CprState,
    ram: &GuestRam,
) -> Result<u64, Error> {
    let io = |what| move |e| Error::Io(what, tmp.to_path_buf(), e);
    let file = if state.ram == RamLocation::InStateFile {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(bytes).map_err(io("write"))?;
        write_ram(&mut w, ram).map_err(io("write RAM to"))?;
        w.into_inner()
            .map_err(|e| Error::Io("write", tmp.into(), e.into_error()))?
    } else {
        // The state alone: one write, no buffer to fault in.
        let mut file = file;
        file.write_all(bytes).map_err(io("write"))?;
        file
    };
    file.sync_all().map_err(io("fsync"))?;
    file.metadata().map(|m| m.len()).map_err(io("stat"))
}

fn write_ram(w: &mut impl Write, ram: &GuestRam) -> std::io::Result<()> {
    let mut crc = crc32fast::Hasher::new();
    w.write_all(&RAM_MAGIC)?;
    let mut buf = Vec::new();
    let populated = ram.populated()?;
    let total = populated.iter().map(|&(_, len)| len).sum();
    let mut progress = Progress::new("saving guest RAM", total, Instant::now());
    for (start, len) in populated {
        let mut off = start;
        while off < start + len {
            let n = CHUNK.min(start + len - off);
            let addr = ram
                .guest_addr(off)
                .ok_or_else(|| std::io::Error::other("offset outside RAM"))?;
            buf.resize(n as usize, 0);
            ram.memory
                .read_slice(&mut buf, addr)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let head = [off.to_le_bytes(), n.to_le_bytes()].concat();
            crc.update(&head);
            crc.update(&buf);
            w.write_all(&head)?;
            w.write_all(&buf)?;
            progress.tick(n);
            off += n;
        }
    }
    let end = [END.to_le_bytes(), 0u64.to_le_bytes()].concat();
    crc.update(&end);
    w.write_all(&end)?;
    w.write_all(&crc.finalize().to_le_bytes())
}

/// Reads and validates the state in `path` (the file is only read).
pub fn load_state(path: &Path) -> Result<(CprState, BufReader<File>), Error> {
    let file = files::open("state file", path, Access::Read).map_err(Error::Access)?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let bad = |e| Error::State(path.into(), e);
    let mut bytes = vec![0u8; HEADER_LEN];
    let got = read_up_to(&mut r, &mut bytes).map_err(|e| Error::Io("read", path.into(), e))?;
    bytes.truncate(got);
    let (_, len) = state::header(&bytes).map_err(bad)?;
    bytes.resize(HEADER_LEN + len, 0);
    let got = read_up_to(&mut r, &mut bytes[HEADER_LEN..])
        .map_err(|e| Error::Io("read", path.into(), e))?;
    if got < len {
        return Err(bad(state::Error::Truncated(len - got)));
    }
    let state = state::decode(&bytes).map_err(bad)?;
    Ok((state, r))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads the RAM section that follows the state into `ram`, checking every
/// record's bounds and the section's CRC.
/// Says its progress once a second, against the file's size.
pub fn load_ram(path: &Path, r: &mut impl Read, ram: &GuestRam) -> Result<(), Error> {
    let total = std::fs::metadata(path).map_or(ram.size(), |m| m.len());
    let mut progress = Progress::new("restoring guest RAM", total, Instant::now());
    read_ram(path, r, ram.size(), |off, buf| {
        let addr = ram.guest_addr(off).expect("checked by read_ram");
        ram.memory.write_slice(buf, addr).map_err(RamError::Write)?;
        progress.tick(buf.len() as u64);
        Ok(())
    })
}

/// Checks the RAM section without keeping it (`molt state`).
pub fn verify_ram(path: &Path, r: &mut impl Read, mem_size: u64) -> Result<(), Error> {
    read_ram(path, r, mem_size, |_, _| Ok(()))
}

/// After a state whose RAM stays in place the file must end.
pub fn expect_end(path: &Path, r: &mut impl Read) -> Result<(), Error> {
    let mut rest = [0u8; 1];
    match r.read(&mut rest) {
        Ok(0) => Ok(()),
        Ok(_) => Err(Error::State(path.into(), state::Error::TrailingBytes(1))),
        Err(e) => Err(Error::Io("read", path.into(), e)),
    }
}

/// Walks the RAM section, handing each checked record to `sink`.
fn read_ram(
    path: &Path,
    r: &mut impl Read,
    size: u64,
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), RamError>,
) -> Result<(), Error> {
    let regions = crate::vm::memory::ram_regions(size);
    let bad = |why| Error::Ram(path.into(), why);
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad(RamError::Truncated)
        } else {
            bad(RamError::Read(e))
        }
    };
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(io)?;
    if magic != RAM_MAGIC {
        return Err(bad(RamError::BadMagic));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buf = Vec::new();
    loop {
        let mut head = [0u8; 16];
        r.read_exact(&mut head).map_err(io)?;
        crc.update(&head);
        let off = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
        if off == END {
            break;
        }
        let in_one_region = len > 0
            && len <= CHUNK
            && off.checked_add(len).is_some_and(|e| e <= size)
            && regions
                .iter()
                .any(|g| off >= g.file_offset && off + len <= g.file_offset + g.size);
        if !in_one_region {
            return Err(bad(RamError::OutsideRam { off, len }));
        }
        buf.resize(len as usize, 0);
        r.read_exact(&mut buf).map_err(io)?;
        crc.update(&buf);
        sink(off, &buf).map_err(bad)?;
    }
    let mut stored = [0u8; 4];
    r.read_exact(&mut stored).map_err(io)?;
    let (actual, stored) = (crc.finalize(), u32::from_le_bytes(stored));
    if stored != actual {
        return Err(bad(RamError::Crc { actual, stored }));
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest).map_err(io)? != 0 {
        return Err(bad(RamError::Trailing));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_state_file_never_saved_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("molt-pending-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        std::fs::write(&path, b"the previous state").unwrap();
        let pending = prepare(&path, 2).unwrap();
        assert!(tmp_path(&path).exists());
        assert!(pending.buf.capacity() > 0);
        drop(pending);
        assert!(!tmp_path(&path).exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"the previous state");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn progress_is_said_once_a_second_with_the_share_done() {
        let t0 = Instant::now();
        let mut p = Progress::new("saving guest RAM", 4 << 20, t0);
        assert_eq!(p.add(1 << 20, t0 + Duration::from_millis(500)), None);
        assert_eq!(
            p.add(1 << 20, t0 + Duration::from_millis(1100)).as_deref(),
            Some("saving guest RAM: 2 of 4 MiB (50%)")
        );
        // The next line is due a second after the last one, not after t0.
        assert_eq!(p.add(1 << 20, t0 + Duration::from_millis(2000)), None);
        assert_eq!(
            p.add(1 << 20, t0 + Duration::from_millis(2100)).as_deref(),
            Some("saving guest RAM: 4 of 4 MiB (100%)")
        );
        // A total of 0 (an empty file) divides by nothing.
        let mut empty = Progress::new("restoring guest RAM", 0, t0);
        assert_eq!(
            empty.add(0, t0 + Progress::EVERY).as_deref(),
            Some("restoring guest RAM: 0 of 0 MiB (0%)")
        );
    }
}
