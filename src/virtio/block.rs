//! virtio-blk over a raw image file or block device (OASIS virtio v1.2, 5.2 Block
//! Device): one request queue (5.2.2), the feature bits of 5.2.3, the configuration
//! layout of 5.2.4 (`struct virtio_blk_config`) and the requests of 5.2.6 (read,
//! write, flush, get-id, discard, write-zeroes).
//!
//! The guest is untrusted. Descriptor chains are walked by `virtio-queue`, which
//! stops at loops, out-of-range indices and bad indirect tables (2.7.5); every
//! guest buffer is checked to lie inside guest RAM before it is touched, and data
//! moves with preadv/pwritev straight between the image and guest memory. A
//! malformed request completes with an error status and the device carries on.
//!
//! Requests are handled synchronously on the caller's thread, so none is ever in
//! flight between calls; each call serves at most one `Budget` of them and leaves
//! the rest in the avail ring for the event loop's next turn. The device's state is therefore only: the features the
//! driver acked, and (while active) the queue, whose indices are the only queue
//! state a live update must carry. Everything else is fixed when the image is opened.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::{
    read_config_bytes, Budget, DeviceState, Interrupt, Served, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_RING_EVENT_IDX,
};
use crate::ratelimit::guest_log;

/// Protocol sector size: capacity, `sector` and data lengths count in these (5.2.4).
const SECTOR_SIZE: u64 = 512;
/// Entries in the one request queue.
const QUEUE_SIZE: u16 = 256;
/// The maximum size of each queue (one request queue).
pub const QUEUE_MAX_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Data segments per request. Header and status take two descriptors of a
/// direct chain, as in QEMU; more could only come through indirect tables.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest single segment (`size_max`). Offering it bounds a request at
/// `SEG_MAX * SIZE_MAX` bytes for a conforming driver, so the cap below never
/// fails a Linux guest, whatever `max_sectors_kb` it sets.
const SIZE_MAX: u32 = 128 << 10;
/// Data bytes of one read or write. Nothing is buffered (I/O goes straight to guest
/// memory), so this bounds the time one request holds the event loop, not memory.
const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Discard: segments per request and sectors per segment. Punching holes is cheap.
const MAX_DISCARD_SEG: u32 = 32;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Write-zeroes may fall back to writing zeroes, so it is kept to one 32 MiB segment.
const MAX_WRITE_ZEROES_SEG: u32 = 1;
const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 16;
/// Discard granularity in sectors: a 4 KiB filesystem block.
const DISCARD_ALIGNMENT: u32 = 8;
/// `struct virtio_blk_outhdr`: le32 type, le32 reserved, le64 sector.
const HEADER_LEN: u32 = 16;
/// `struct virtio_blk_discard_write_zeroes`: le64 sector, le32 num_sectors, le32 flags.
const SEGMENT_LEN: usize = 16;
/// Bytes of `struct virtio_blk_config` molt fills in: up to `write_zeroes_may_unmap`
/// and its padding. Everything beyond reads as 0.
const CONFIG_LEN: usize = 60;
/// Linux refuses preadv/pwritev with more vectors than this (UIO_MAXIOV).
const IOV_MAX: usize = 1024;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Why a disk could not be opened.
#[derive(Debug)]
pub enum Error {
    Open(PathBuf, io::Error),
    Size(PathBuf, io::Error),
    /// The image holds less than one sector.
    TooSmall(PathBuf, u64),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open(p, e) => write!(f, "disk {}: cannot open: {e}", p.display()),
            Error::Size(p, e) => write!(f, "disk {}: cannot find its size: {e}", p.display()),
            Error::TooSmall(p, n) => write!(
                f,
                "disk {}: {n} bytes is smaller than one {SECTOR_SIZE}-byte sector",
                p.display()
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Open(_, e) | Error::Size(_, e) => Some(e),
            Error::TooSmall(..) => None,
        }
    }
}

/// Which image a disk opens, and whether the guest may write it (`--disk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The image and what was learnt from it when it was opened; fixed for the
/// device's lifetime.
struct Disk {
    file: File,
    path: PathBuf,
    /// Capacity in sectors.
    sectors: u64,
    read_only: bool,
    /// GET_ID answer: NUL-padded ASCII.
    serial: [u8; ID_BYTES],
}

/// What the device holds between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: Box<dyn Interrupt>,
    /// A driver that breaks the ring is reported once, not on every notification.
    warned: bool,
}

/// Which image a disk is, as a saved state records it (`cpr::state`, version
/// 2; frozen): a restart refuses an image that is not the one the guest wrote.
/// Device numbers are not part of it: those of dynamically numbered block
/// devices (pmem, NVMe, ...) change across a reboot, and with them the `st_dev`
/// of every file on them (seen: 259:1 before a kexec, 259:0 after).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskIdentityV2 {
    /// In bytes; the guest sees it rounded down to whole sectors.
    pub size: u64,
    /// A regular file's inode number and birth time (ns since the epoch; 0
    /// where the filesystem keeps none): a copy has others. Both are 0 for a
    /// block device, whose node and numbers a reboot may change: only its
    /// size identifies it.
    pub ino: u64,
    pub born_ns: u64,
}

/// The version this release saves and restores.
pub type Identity = DiskIdentityV2;

impl Identity {
    /// The identity of an open image. Seeks to find the size (block devices
    /// report 0 in `st_size`); the device does its I/O at explicit offsets.
    pub fn of(file: &File) -> io::Result<Identity> {
        use std::os::unix::fs::FileTypeExt;
        let size = { file }.seek(SeekFrom::End(0))?;
        let meta = file.metadata()?;
        if meta.file_type().is_block_device() {
            return Ok(Identity {
                size,
                ino: 0,
                born_ns: 0,
            });
        }
        let born_ns = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Identity {
            size,
            ino: meta.ino(),
            born_ns,
        })
    }

    /// The same file, whatever its size now.
    pub fn same_file(&self, other: &Identity) -> bool {
        self.ino == other.ino && self.born_ns == other.born_ns
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ino == 0 {
            return write!(f, "{} bytes, a block device", self.size);
        }
        write!(
            f,
            "{} bytes, inode {}, born {}.{:09}",
            self.size,
            self.ino,
            self.born_ns / 1_000_000_000,
            self.born_ns % 1_000_000_000
        )
    }
}

/// The read-only feature bit, as the machine's shape reports disks.
pub const FEATURE_RO: u64 = 1 << VIRTIO_BLK_F_RO;

/// A virtio-blk device.
pub struct Block {
    disk: Disk,
    acked_features: u64,
    active: Option<Active>,
}

impl Block {
    /// Opens the image (O_CLOEXEC, as std always does; read-only if asked). Its
    /// size is rounded down to whole sectors, with a warning: the guest cannot
    /// address a partial sector, and refusing would reject images that merely
    /// were not padded.
    pub fn new(cfg: &DiskConfig) -> Result<Block, Error> {
        let path = cfg.path.clone();
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&path)
            .map_err(|e| Error::Open(path.clone(), e))?;
        let meta = file.metadata().map_err(|e| Error::Size(path.clone(), e))?;
        let id = Identity::of(&file).map_err(|e| Error::Size(path.clone(), e))?;
        let size = id.size;
        if size < SECTOR_SIZE {
            return Err(Error::TooSmall(path, size));
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "disk {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Block {
            disk: Disk {
                file,
                path,
                sectors: size / SECTOR_SIZE,
                read_only: cfg.read_only,
                serial: serial(meta.dev(), meta.ino()),
            },
            acked_features: 0,
            active: None,
        })
    }

    /// `struct virtio_blk_config` (5.2.4), little-endian.
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &self.disk.sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        if !self.disk.read_only {
            put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(40, &MAX_DISCARD_SEG.to_le_bytes());
            put(44, &DISCARD_ALIGNMENT.to_le_bytes());
            put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
            put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
            // Unmapping punches a hole, after which reads return zeroes.
            put(56, &[1]);
        }
        c
    }
}

/// A serial that stays the same across restarts and live updates of molt, as long
/// as the image is the same file: its device and inode numbers, in hex.
fn serial(dev: u64, ino: u64) -> [u8; ID_BYTES] {
    let s = format!("{dev:x}-{ino:x}");
    // Keep the tail if too long: the inode's low digits differ most between images.
    let tail = &s.as_bytes()[s.len().saturating_sub(ID_BYTES)..];
    let mut out = [0u8; ID_BYTES];
    out[..tail.len()].copy_from_slice(tail);
    out
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn features(&self) -> u64 {
        let common = bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | VIRTIO_F_RING_EVENT_IDX;
        if self.disk.read_only {
            common | FEATURE_RO
        } else {
            common | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only: `writeback` needs VIRTIO_BLK_F_CONFIG_WCE.
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, irq: Box<dyn Interrupt>) {
        let Some(mut queue) = queues.into_iter().next() else {
            log::error!(
                "disk {}: activated without a queue",
                self.disk.path.display()
            );
            return;
        };
        queue.set_event_idx(self.acked_features & VIRTIO_F_RING_EVENT_IDX != 0);
        self.active = Some(Active {
            mem,
            queue,
            irq,
            warned: false,
        });
    }

    fn backend_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.disk.file)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.disk.read_only {
            return Ok(());
        }
        self.disk.file.sync_data()
    }

    fn state(&self) -> DeviceState {
        self.active.iter().map(|a| (&a.queue).into()).collect()
    }

    fn queue_notify(&mut self, index: usize) -> Served {
        let Some(a) = self.active.as_mut().filter(|_| index == 0) else {
            return Served::All;
        };
        let mut added = 0;
        let served = drain(&self.disk, self.acked_features, a, &mut added).unwrap_or_else(|e| {
            if !a.warned {
                guest_log!(
                    Warn,
                    "disk {}: queue unusable: {e}",
                    self.disk.path.display()
                );
                a.warned = true;
            }
            // Nothing more until the driver kicks again.
            Served::All
        });
        // On a failed check, interrupt anyway: a spurious interrupt is harmless,
        // a lost one hangs the guest.
        if added > 0 && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            a.irq.queue(0);
        }
        served
    }

    fn reset(&mut self) {
        // Requests complete before queue_notify returns, so nothing is in flight.
        self.active = None;
        self.acked_features = 0;
    }
}

/// Handles the chains the driver made available, one `Budget`'s worth, counting
/// in `added` those put in the used ring. With EVENT_IDX, notifications stay off
/// while draining and the ring is checked once more after turning them on, so
/// that no request made available in between is missed (virtio-queue's
/// documented loop). That check also tells whether a spent budget left work.
fn drain(
    disk: &Disk,
    acked: u64,
    a: &mut Active,
    added: &mut usize,
) -> Result<Served, virtio_queue::Error> {
    let mut budget = Budget::default();
    loop {
        a.queue.disable_notification(&a.mem)?;
        while !budget.exhausted() {
            // Fails if avail.idx runs more than a ring ahead: the ring is unusable
            // until the driver fixes it or resets the device.
            let next = a.queue.iter(&a.mem)?.next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let (len, bytes) = disk.handle(&a.mem, chain, a.queue.size(), acked);
            budget.spend(bytes);
            // A head beyond the ring cannot be returned: it is dropped here, before
            // add_used would log an error for every such request.
            if head < a.queue.size() {
                a.queue.add_used(&a.mem, head, len)?;
                *added += 1;
            }
        }
        if !a.queue.enable_notification(&a.mem)? {
            return Ok(Served::All);
        }
        if budget.exhausted() {
            return Ok(Served::More);
        }
    }
}

/// `status` and the number of data bytes written into the guest's buffers.
type Outcome = (u8, u32);
const IOERR: Outcome = (VIRTIO_BLK_S_IOERR as u8, 0);
const UNSUPP: Outcome = (VIRTIO_BLK_S_UNSUPP as u8, 0);
const OK: Outcome = (VIRTIO_BLK_S_OK as u8, 0);

impl Disk {
    /// Executes one request and returns the used length (the bytes written into
    /// device-writable buffers, the status byte included; 0 if there is none) and
    /// the bytes its buffers hold, which is what it costs the budget.
    fn handle(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        queue_size: u16,
        acked: u64,
    ) -> (u32, u64) {
        // A chain never exceeds the queue size (2.7.5.3.1) without an indirect table;
        // keep that many, and count the rest only to find the last descriptor.
        let mut descs = Vec::with_capacity(4);
        let (mut count, mut bytes) = (0usize, 0u64);
        let mut last = None;
        for d in chain {
            if count < usize::from(queue_size) {
                descs.push(d);
            }
            count += 1;
            bytes += u64::from(d.len());
            last = Some(d);
        }
        // The status is the request's last byte. Without a last descriptor that ends
        // the chain (virtio-queue stopped at a loop, a bad index or a bad indirect
        // table) or one the device may write, there is nowhere to report anything.
        let Some(status) = last.filter(|d| !d.has_next() && d.is_write_only() && d.len() > 0)
        else {
            return (0, bytes);
        };
        let Some(status_addr) = status.addr().checked_add(u64::from(status.len()) - 1) else {
            return (0, bytes);
        };
        if !GuestMemoryBackend::check_range(mem, status_addr, 1) {
            return (0, bytes);
        }
        let (code, written) = if count > usize::from(queue_size) {
            IOERR
        } else {
            self.execute(mem, &descs[..count - 1], acked)
        };
        match mem.write_obj(code, status_addr) {
            Ok(()) => (written + 1, bytes),
            Err(_) => (0, bytes),
        }
    }

    /// Validates and runs a request given its descriptors minus the status one.
    fn execute(&self, mem: &GuestMemoryMmap, descs: &[Descriptor], acked: u64) -> Outcome {
        // The header sits alone in the first descriptor, as every driver lays it
        // out; a chain that splits it differently is refused, not reassembled.
        let Some((hdr, data)) = descs.split_first() else {
            return IOERR;
        };
        let mut h = [0u8; HEADER_LEN as usize];
        if hdr.is_write_only()
            || hdr.len() < HEADER_LEN
            || mem.read_slice(&mut h, hdr.addr()).is_err()
        {
            return IOERR;
        }
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = h;
        let (rtype, sector) = (u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le_bytes(s));
        let negotiated = |b| acked & bit(b) != 0;
        let writable = match rtype {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => true,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH => false,
            VIRTIO_BLK_T_DISCARD if negotiated(VIRTIO_BLK_F_DISCARD) => false,
            VIRTIO_BLK_T_WRITE_ZEROES if negotiated(VIRTIO_BLK_F_WRITE_ZEROES) => false,
            _ => return UNSUPP,
        };
        let in_ram =
            |d: &Descriptor| GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize);
        if data.len() > SEG_MAX as usize
            || !data
                .iter()
                .all(|d| d.is_write_only() == writable && in_ram(d))
        {
            return IOERR;
        }
        match rtype {
            VIRTIO_BLK_T_IN => self.read_write(mem, sector, data, false),
            VIRTIO_BLK_T_OUT => self.read_write(mem, sector, data, true),
            VIRTIO_BLK_T_FLUSH => self.flush(),
            VIRTIO_BLK_T_GET_ID => match scatter(mem, data, &self.serial) {
                Ok(()) => (VIRTIO_BLK_S_OK as u8, ID_BYTES as u32),
                // Too little room, checked before anything is written.
                Err(()) => IOERR,
            },
            _ => self.discard_or_zero(mem, data, rtype == VIRTIO_BLK_T_WRITE_ZEROES),
        }
    }

    /// The byte offset of `sector` if `bytes` from there fit in the disk.
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(bytes)?;
        (end <= self.sectors * SECTOR_SIZE).then_some(offset)
    }

    /// VIRTIO_BLK_T_IN (`to_disk` false) or VIRTIO_BLK_T_OUT (true).
    fn read_write(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Descriptor],
        to_disk: bool,
    ) -> Outcome {
        // "MUST set the status byte to VIRTIO_BLK_S_IOERR for a write request if
        // the VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data."
        if to_disk && self.read_only {
            return IOERR;
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        // An empty transfer is refused too: it is what a driver that merged data
        // into the status descriptor would send, and it must not read as success.
        if total == 0 || !total.is_multiple_of(SECTOR_SIZE) || total > MAX_REQUEST_BYTES {
            return IOERR;
        }
        let Some(offset) = self.range(sector, total) else {
            return IOERR;
        };
        let mut done = 0;
        let result = self.transfer(mem, data, offset, to_disk, &mut done);
        // `done` is at most MAX_REQUEST_BYTES, which fits in u32.
        let written = if to_disk { 0 } else { done as u32 };
        match result {
            Ok(()) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                guest_log!(
                    Warn,
                    "disk {}: I/O error at byte {offset}: {e}",
                    self.path.display()
                );
                (VIRTIO_BLK_S_IOERR as u8, written)
            }
        }
    }

    /// Moves the bytes of `bufs` (already checked to lie in guest RAM) between guest
    /// memory and the image at `offset`, one preadv/pwritev per pass; `done` counts
    /// the bytes moved, also when an error ends the transfer part-way.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        bufs: &[Descriptor],
        offset: u64,
        to_disk: bool,
        done: &mut u64,
    ) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|d| u64::from(d.len())).sum();
        while *done < total {
            let slices = guest_slices(mem, bufs, *done)?;
            // molt's guest memory has no dirty bitmap (`GuestMemoryMmap<()>`) and no
            // Xen mappings, so the guards are plain pointers; they live until the call
            // returns all the same.
            let guards: Vec<_> = slices.iter().map(VolatileSlice::ptr_guard_mut).collect();
            let iov: Vec<libc::iovec> = guards
                .iter()
                .map(|g| libc::iovec {
                    iov_base: g.as_ptr().cast(),
                    iov_len: g.len(),
                })
                .collect();
            let pos = libc::off_t::try_from(offset + *done)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let fd = self.file.as_raw_fd();
            // `iov` has at most IOV_MAX entries.
            let n = if to_disk {
                // SAFETY: each iovec covers a VolatileSlice that vm-memory checked to lie
                // inside a mapped guest RAM region, which `mem` keeps mapped for the
                // call; the kernel only reads from it.
                unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, pos) }
            } else {
                // SAFETY: as above; the kernel writes into guest RAM through the raw
                // pointers, never through a Rust reference, so a guest changing the
                // same memory at the same time is a data race only for the guest.
                unsafe { libc::preadv(fd, iov.as_ptr(), iov.len() as libc::c_int, pos) }
            };
            match n {
                n if n > 0 => *done += n as u64,
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// VIRTIO_BLK_T_FLUSH: everything completed so far reaches stable storage
    /// before the status says so (5.2.6.2).
    fn flush(&self) -> Outcome {
        if self.read_only {
            return OK;
        }
        match self.file.sync_data() {
            Ok(()) => OK,
            Err(e) => {
                guest_log!(Warn, "disk {}: flush failed: {e}", self.path.display());
                IOERR
            }
        }
    }

    /// VIRTIO_BLK_T_DISCARD or VIRTIO_BLK_T_WRITE_ZEROES: a list of
    /// `virtio_blk_discard_write_zeroes` segments in the device-readable data.
    fn discard_or_zero(&self, mem: &GuestMemoryMmap, data: &[Descriptor], zero: bool) -> Outcome {
        let (max_seg, max_sectors) = if zero {
            (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
        } else {
            (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
        };
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let n = (total / SEGMENT_LEN as u64) as usize;
        if !total.is_multiple_of(SEGMENT_LEN as u64) || n == 0 || n > max_seg as usize {
            return IOERR;
        }
        let mut buf = [0u8; MAX_DISCARD_SEG as usize * SEGMENT_LEN];
        if gather(mem, data, &mut buf[..n * SEGMENT_LEN]).is_err() {
            return IOERR;
        }
        let mut segs = Vec::with_capacity(n);
        for s in buf[..n * SEGMENT_LEN].chunks_exact(SEGMENT_LEN) {
            let [a, b, c, d, e, f, g, h, n0, n1, n2, n3, f0, f1, f2, f3] =
                <[u8; SEGMENT_LEN]>::try_from(s).unwrap_or_default();
            let sector = u64::from_le_bytes([a, b, c, d, e, f, g, h]);
            let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            // Unknown flags, or unmap on a discard: UNSUPP, as 5.2.6.2 requires.
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !zero) {
                return UNSUPP;
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            match self.range(sector, len) {
                Some(offset) if sectors <= max_sectors => segs.push((offset, len, unmap)),
                _ => return IOERR,
            }
        }
        for (offset, len, unmap) in segs {
            if !zero {
                // Discard is a hint (the device MAY deallocate): a filesystem that
                // cannot punch holes simply keeps the data.
                let _ = self.fallocate(FallocateMode::PunchHole, offset, len);
            } else if let Err(e) = self.zero(offset, len, unmap) {
                guest_log!(
                    Warn,
                    "disk {}: write-zeroes failed: {e}",
                    self.path.display()
                );
                return IOERR;
            }
        }
        OK
    }

    /// Zeroes a range: punching a hole when the driver allows unmapping, else
    /// ZERO_RANGE, else by writing zeroes.
    fn zero(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if (unmap
            && self
                .fallocate(FallocateMode::PunchHole, offset, len)
                .is_ok())
            || self
                .fallocate(FallocateMode::ZeroRange, offset, len)
                .is_ok()
        {
            return Ok(());
        }
        // At most MAX_WRITE_ZEROES_SECTORS, i.e. 32 MiB, in 1 MiB writes.
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// KEEP_SIZE, so that a range at the end never changes the image's size.
    fn fallocate(&self, mode: FallocateMode, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.file, mode, true, offset, len).map_err(io::Error::from)
    }
}

/// The guest memory behind `bufs` from byte `skip` on, as at most IOV_MAX slices
/// (a buffer crossing from one RAM region into the next takes two).
fn guest_slices<'a>(
    mem: &'a GuestMemoryMmap,
    bufs: &[Descriptor],
    mut skip: u64,
) -> io::Result<Vec<VolatileSlice<'a>>> {
    let bad = || io::Error::from(io::ErrorKind::InvalidInput);
    let mut out = Vec::with_capacity(bufs.len().min(IOV_MAX));
    for d in bufs {
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        let addr = d.addr().checked_add(skip).ok_or_else(bad)?;
        for s in GuestMemoryBackend::get_slices(mem, addr, (len - skip) as usize) {
            out.push(s.map_err(|_| bad())?);
            if out.len() == IOV_MAX {
                return Ok(out);
            }
        }
        skip = 0;
    }
    Ok(out)
}

/// Copies `src` into the guest buffers in order; without room for all of it,
/// nothing is written.
fn scatter(mem: &GuestMemoryMmap, bufs: &[Descriptor], mut src: &[u8]) -> Result<(), ()> {
    if bufs.iter().map(|d| u64::from(d.len())).sum::<u64>() < src.len() as u64 {
        return Err(());
    }
    for d in bufs {
        let n = src.len().min(d.len() as usize);
        mem.write_slice(&src[..n], d.addr()).map_err(|_| ())?;
        src = &src[n..];
    }
    Ok(())
}

/// Fills `dst` from the guest buffers in order.
fn gather(mem: &GuestMemoryMmap, bufs: &[Descriptor], mut dst: &mut [u8]) -> Result<(), ()> {
    for d in bufs {
        let n = dst.len().min(d.len() as usize);
        let (now, rest) = dst.split_at_mut(n);
        mem.read_slice(now, d.addr()).map_err(|_| ())?;
        dst = rest;
    }
    if dst.is_empty() {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::GuestAddress;

    use crate::virtio::test_ring::{put_desc, put_table, Desc, Irqs, Ring};

    /// Guest RAM: two adjacent 2 MiB regions, nothing above.
    const REGION: u64 = 2 << 20;
    const MEM_END: u64 = 2 * REGION;
    /// Where the rings start; a 256-entry queue's end before 0x2000.
    const RINGS: u64 = 0;
    const INDIRECT: u64 = 0x10_0000;
    const HDR: u64 = 0x8000;
    const STATUS: u64 = 0x8100;
    const DATA: u64 = 0x10000;
    const DATA2: u64 = 0x20000;
    /// The image: 128 sectors, byte i holding `pattern(i)`.
    const SECTORS: u64 = 128;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const R: u16 = 0;

    fn pattern(i: u64) -> u8 {
        (i % 251) as u8
    }

    /// A temporary image, removed on drop.
    struct Image(PathBuf);

    impl Image {
        fn new(len: u64) -> Image {
            static N: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "molt-blk-{}-{}.img",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            let bytes: Vec<u8> = (0..len).map(pattern).collect();
            std::fs::write(&path, bytes).unwrap();
            Image(path)
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// The driver side: requests on the shared test ring.
    struct Driver {
        mem: GuestMemoryMmap,
        blk: Block,
        irqs: Irqs,
        ring: Ring,
        /// Where `chain` writes next.
        next_desc: u16,
        img: Image,
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .unwrap()
    }

    impl Driver {
        /// A 16-entry queue on a writable disk, every feature but EVENT_IDX acked.
        fn new() -> Driver {
            Driver::with(false, 16, !VIRTIO_F_RING_EVENT_IDX)
        }

        fn with(read_only: bool, size: u16, features: u64) -> Driver {
            let img = Image::new(SECTORS * SECTOR_SIZE);
            let mut blk = Block::new(&DiskConfig {
                path: img.0.clone(),
                read_only,
            })
            .unwrap();
            let mem = memory();
            let irqs = Irqs::default();
            let ring = Ring::new(RINGS, size);
            blk.ack_features(features);
            blk.activate(
                mem.clone(),
                vec![ring.queue(QUEUE_SIZE)],
                Box::new(irqs.clone()),
            );
            Driver {
                mem,
                blk,
                irqs,
                ring,
                next_desc: 0,
                img,
            }
        }

        /// Writes `bufs` as a linked chain in the next free descriptors and
        /// returns its head, unpublished.
        fn chain(&mut self, bufs: &[Desc]) -> u16 {
            let head = self.next_desc;
            self.ring.write_chain(&self.mem, head, bufs);
            self.next_desc = (head + bufs.len() as u16) % self.ring.size;
            head
        }

        fn publish(&self, head: u16) {
            self.ring.offer(&self.mem, head);
        }

        fn used_idx(&self) -> u16 {
            self.ring.used_idx(&self.mem)
        }

        /// Publishes `head`, notifies, and returns the one used entry's length.
        fn run(&mut self, head: u16) -> u32 {
            let before = self.used_idx();
            self.publish(head);
            assert_eq!(self.blk.queue_notify(0), Served::All);
            assert_eq!(self.used_idx(), before.wrapping_add(1), "one used entry");
            let (id, len) = self.ring.used(&self.mem, before);
            assert_eq!(id, u32::from(head));
            len
        }

        /// Runs a chain given in full and returns (status byte, used length).
        fn raw(&mut self, bufs: &[Desc]) -> (u8, u32) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let head = self.chain(bufs);
            let len = self.run(head);
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }

        fn header(&self, rtype: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&rtype.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        }

        /// A well-formed request: header, `data`, one status byte.
        fn request(&mut self, rtype: u32, sector: u64, data: &[Desc]) -> (u8, u32) {
            self.header(rtype, sector);
            let mut bufs = vec![(HDR, 16, R)];
            bufs.extend_from_slice(data);
            bufs.push((STATUS, 1, W));
            self.raw(&bufs)
        }

        fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        fn fill(&self, addr: u64, bytes: &[u8]) {
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        }

        /// The device still serves a write and a read after whatever came before.
        fn assert_works(&mut self) {
            let data: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
            self.fill(DATA, &data);
            let out = self.request(VIRTIO_BLK_T_OUT, 3, &[(DATA, 512, R)]);
            assert_eq!(out, (VIRTIO_BLK_S_OK as u8, 1));
            self.fill(DATA2, &[0; 512]);
            let read = self.request(VIRTIO_BLK_T_IN, 3, &[(DATA2, 512, W)]);
            assert_eq!(read, (VIRTIO_BLK_S_OK as u8, 513));
            assert_eq!(self.guest(DATA2, 512), data);
            assert_eq!(self.img.bytes()[3 * 512..4 * 512], data[..]);
        }
    }

    const OK_S: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR_S: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP_S: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    }

    #[test]
    fn read_write_round_trip() {
        let mut d = Driver::new();
        // A read of what the image held, split over two buffers.
        let r = d.request(VIRTIO_BLK_T_IN, 2, &[(DATA, 512, W), (DATA2, 1024, W)]);
        assert_eq!(r, (OK_S, 1537));
        let want: Vec<u8> = (1024..2560).map(pattern).collect();
        assert_eq!(d.guest(DATA, 512), want[..512]);
        assert_eq!(d.guest(DATA2, 1024), want[512..]);
        assert_eq!(d.irqs.count(0), 1);

        for (i, sector) in [0, 5, 64, SECTORS - 2].into_iter().enumerate() {
            let data: Vec<u8> = (0..1024).map(|b| (b as u8) ^ (i as u8 + 1)).collect();
            d.fill(DATA, &data);
            let w = d.request(
                VIRTIO_BLK_T_OUT,
                sector,
                &[(DATA, 512, R), (DATA + 512, 512, R)],
            );
            assert_eq!(w, (OK_S, 1));
            let at = (sector * 512) as usize;
            assert_eq!(d.img.bytes()[at..at + 1024], data[..]);
            d.fill(DATA2, &[0; 1024]);
            let r = d.request(VIRTIO_BLK_T_IN, sector, &[(DATA2, 1024, W)]);
            assert_eq!(r, (OK_S, 1025));
            assert_eq!(d.guest(DATA2, 1024), data);
        }
        assert_eq!(d.irqs.count(0), 9);
        assert_eq!(d.img.bytes().len() as u64, SECTORS * 512);
    }

    #[test]
    fn buffer_spanning_two_ram_regions() {
        let mut d = Driver::new();
        let at = REGION - 256;
        let r = d.request(VIRTIO_BLK_T_IN, 1, &[(at, 1024, W)]);
        assert_eq!(r, (OK_S, 1025));
        let want: Vec<u8> = (512..1536).map(pattern).collect();
        assert_eq!(d.guest(at, 1024), want);
        d.fill(at, &[0xab; 1024]);
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, 0, &[(at, 1024, R)]), (OK_S, 1));
        assert_eq!(d.img.bytes()[..1024], [0xab; 1024]);
    }

    #[test]
    fn flush_and_get_id() {
        let mut d = Driver::new();
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK_S, 1));

        let meta = std::fs::metadata(&d.img.0).unwrap();
        let want = serial(meta.dev(), meta.ino());
        assert!(want.iter().any(|&b| b != 0));
        d.fill(DATA, &[0xee; 32]);
        let r = d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 32, W)]);
        assert_eq!(r, (OK_S, 21));
        assert_eq!(d.guest(DATA, 20), want);
        assert_eq!(d.guest(DATA + 20, 12), [0xee; 12]);
        // Split over two buffers.
        let r = d.request(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(DATA2, 8, W), (DATA2 + 100, 12, W)],
        );
        assert_eq!(r, (OK_S, 21));
        assert_eq!(d.guest(DATA2, 8), want[..8]);
        assert_eq!(d.guest(DATA2 + 100, 12), want[8..]);
        // No room: nothing written.
        d.fill(DATA, &[0xee; 32]);
        assert_eq!(
            d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 19, W)]),
            (IOERR_S, 1)
        );
        assert_eq!(d.guest(DATA, 32), [0xee; 32]);
        // Into a device-readable buffer.
        assert_eq!(
            d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, R)]),
            (IOERR_S, 1)
        );
        assert_eq!(d.guest(DATA, 32), [0xee; 32]);
    }

    #[test]
    fn serial_is_nul_padded_or_keeps_the_tail() {
        assert_eq!(&serial(0x803, 0x1234), b"803-1234\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(&serial(u64::MAX, 0xabc), b"ffffffffffffffff-abc");
        assert_eq!(&serial(u64::MAX, u64::MAX), b"fff-ffffffffffffffff");
    }

    #[test]
    fn write_zeroes_and_discard() {
        let mut d = Driver::new();
        let zero = |d: &mut Driver, sector: u64, n: u32, flags: u32| {
            d.fill(DATA, &segment(sector, n, flags));
            d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, R)])
        };
        assert_eq!(zero(&mut d, 4, 8, 0), (OK_S, 1));
        assert_eq!(
            zero(&mut d, 20, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            (OK_S, 1)
        );
        let img = d.img.bytes();
        assert_eq!(img.len() as u64, SECTORS * 512, "size kept");
        for (i, &b) in img.iter().enumerate() {
            let s = i as u64 / 512;
            let zeroed = (4..12).contains(&s) || (20..23).contains(&s);
            assert_eq!(b, if zeroed { 0 } else { pattern(i as u64) }, "byte {i}");
        }
        // Up to the last sector, and not one beyond.
        assert_eq!(zero(&mut d, SECTORS - 1, 1, 0), (OK_S, 1));
        assert_eq!(zero(&mut d, SECTORS - 1, 2, 0), (IOERR_S, 1));
        assert_eq!(zero(&mut d, u64::MAX / 256, 1, 0), (IOERR_S, 1));
        assert_eq!(
            zero(&mut d, 0, MAX_WRITE_ZEROES_SECTORS + 1, 0),
            (IOERR_S, 1)
        );
        assert_eq!(zero(&mut d, 0, 1, 1 << 5), (UNSUPP_S, 1));
        // Two segments where one is allowed; a partial segment.
        d.fill(DATA, &[segment(0, 1, 0), segment(2, 1, 0)].concat());
        let r = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 32, R)]);
        assert_eq!(r, (IOERR_S, 1));
        assert_eq!(
            d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 15, R)]),
            (IOERR_S, 1)
        );
        assert_eq!(d.img.bytes()[..512], img[..512]);

        // Discard: several segments, split across buffers; the range must be valid.
        let segs = [segment(40, 8, 0), segment(60, 4, 0)].concat();
        d.fill(DATA, &segs[..10]);
        d.fill(DATA2, &segs[10..]);
        let r = d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 10, R), (DATA2, 22, R)]);
        assert_eq!(r, (OK_S, 1));
        assert_eq!(d.img.bytes().len() as u64, SECTORS * 512);
        d.fill(DATA, &segment(SECTORS, 1, 0));
        assert_eq!(
            d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]),
            (IOERR_S, 1)
        );
        // "MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard commands if
        // the unmap flag is set."
        d.fill(DATA, &segment(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
        assert_eq!(
            d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]),
            (UNSUPP_S, 1)
        );
        let many: Vec<u8> = (0..=MAX_DISCARD_SEG as u64)
            .flat_map(|s| segment(s, 1, 0))
            .collect();
        d.fill(DATA, &many);
        let r = d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, many.len() as u32, R)]);
        assert_eq!(r, (IOERR_S, 1));
        d.assert_works();
    }

    #[test]
    fn discard_unsupported_unless_negotiated() {
        let f =
            !(VIRTIO_F_RING_EVENT_IDX | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES));
        let mut d = Driver::with(false, 16, f);
        d.fill(DATA, &segment(0, 1, 0));
        assert_eq!(
            d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]),
            (UNSUPP_S, 1)
        );
        let r = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, R)]);
        assert_eq!(r, (UNSUPP_S, 1));
        assert_eq!(
            d.img.bytes()[..512],
            (0..512).map(pattern).collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn read_only_disk() {
        let mut d = Driver::with(true, 16, !0);
        let f = d.blk.features();
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            f & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );
        let before = d.img.bytes();
        d.fill(DATA, &[0x55; 512]);
        assert_eq!(
            d.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]),
            (IOERR_S, 1)
        );
        d.fill(DATA, &segment(0, 1, 0));
        assert_eq!(
            d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]),
            (UNSUPP_S, 1)
        );
        let r = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, R)]);
        assert_eq!(r, (UNSUPP_S, 1));
        assert_eq!(d.img.bytes(), before);
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK_S, 1));
        assert_eq!(
            d.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, W)]),
            (OK_S, 513)
        );
        assert_eq!(d.guest(DATA, 512), before[512..1024]);
        // The config space carries no discard limits.
        let mut b = [0xffu8; 24];
        d.blk.read_config(36, &mut b);
        assert_eq!(b, [0; 24]);
    }

    #[test]
    fn features_and_config_space() {
        let d = Driver::new();
        let f = d.blk.features();
        for b in [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & bit(b), 0, "feature {b}");
        }
        assert_ne!(f & VIRTIO_F_RING_EVENT_IDX, 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(d.blk.device_type(), TYPE_BLOCK);
        assert_eq!(d.blk.queue_max_sizes(), &[256]);

        let read = |off: u64, len: usize| {
            let mut v = vec![0xaau8; len];
            d.blk.read_config(off, &mut v);
            v
        };
        let u32_at = |off: u64| u32::from_le_bytes(read(off, 4).try_into().unwrap());
        assert_eq!(read(0, 8), SECTORS.to_le_bytes());
        assert_eq!(read(0, 1), [SECTORS as u8]);
        assert_eq!(read(1, 2), [0, 0]);
        assert_eq!(u32_at(8), SIZE_MAX);
        assert_eq!(u32_at(12), 254);
        assert_eq!(u32_at(20), 512);
        assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
        assert_eq!(u32_at(40), MAX_DISCARD_SEG);
        assert_eq!(u32_at(44), DISCARD_ALIGNMENT);
        assert_eq!(u32_at(48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(u32_at(52), MAX_WRITE_ZEROES_SEG);
        assert_eq!(read(56, 4), [1, 0, 0, 0]);
        // Across the end, and far outside: zeroes.
        assert_eq!(read(58, 4), [0; 4]);
        assert_eq!(read(0x1000, 4), [0; 4]);
        assert_eq!(read(u64::MAX, 4), [0; 4]);
        assert_eq!(read(u64::MAX - 1, 4), [0; 4]);
        // Writes are ignored.
        let mut d = d;
        d.blk.write_config(0, &[9; 8]);
        d.blk.write_config(u64::MAX, &[9; 8]);
        assert_eq!(read_u64(&d.blk, 0), SECTORS);
    }

    fn read_u64(blk: &Block, off: u64) -> u64 {
        let mut b = [0u8; 8];
        blk.read_config(off, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn new_checks_the_image() {
        let missing = DiskConfig {
            path: "/nonexistent/molt.img".into(),
            read_only: false,
        };
        let e = Block::new(&missing).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/molt.img"), "{e}");
        let tiny = Image::new(100);
        let e = Block::new(&DiskConfig {
            path: tiny.0.clone(),
            read_only: true,
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("100 bytes"), "{e}");
        // A partial last sector is left out.
        let odd = Image::new(3 * 512 + 100);
        let blk = Block::new(&DiskConfig {
            path: odd.0.clone(),
            read_only: false,
        })
        .unwrap();
        assert_eq!(read_u64(&blk, 0), 3);
    }

    #[test]
    fn descriptor_loop() {
        let mut d = Driver::new();
        d.header(VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 2 -> 1 -> ...: never ends, so there is no status byte.
        d.ring
            .set_desc(&d.mem, 0, (HDR, 16, VRING_DESC_F_NEXT as u16), 1);
        d.ring
            .set_desc(&d.mem, 1, (DATA, 512, W | VRING_DESC_F_NEXT as u16), 2);
        d.ring
            .set_desc(&d.mem, 2, (STATUS, 1, W | VRING_DESC_F_NEXT as u16), 1);
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(d.run(0), 0);
        assert_eq!(d.guest(STATUS, 1), [0xff]);
        // A self-loop on the head.
        d.ring
            .set_desc(&d.mem, 0, (HDR, 16, VRING_DESC_F_NEXT as u16), 0);
        assert_eq!(d.run(0), 0);
        d.next_desc = 3;
        d.assert_works();
    }

    #[test]
    fn buffers_outside_guest_ram() {
        let mut d = Driver::new();
        for (addr, len) in [
            (MEM_END - 256, 512),  // ends past RAM
            (MEM_END, 512),        // starts past RAM
            (u64::MAX - 255, 512), // addr + len overflows
            (u64::MAX, 1024),
        ] {
            for (t, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
                let r = d.request(t, 0, &[(addr, len, flags)]);
                assert_eq!(r, (IOERR_S, 1), "{t} at {addr:#x}");
            }
        }
        // The header outside RAM.
        let r = d.raw(&[(u64::MAX - 8, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(r, (IOERR_S, 1));
        // The status byte outside RAM: nothing to write it to.
        d.header(VIRTIO_BLK_T_IN, 0);
        d.fill(DATA, &[0xcc; 512]);
        assert_eq!(d.raw(&[(HDR, 16, R), (DATA, 512, W), (MEM_END, 1, W)]).1, 0);
        assert_eq!(
            d.raw(&[(HDR, 16, R), (DATA, 512, W), (u64::MAX, 1, W)]).1,
            0
        );
        assert_eq!(
            d.raw(&[(HDR, 16, R), (DATA, 512, W), (u64::MAX - 2, 8, W)])
                .1,
            0
        );
        assert_eq!(d.guest(DATA, 512), [0xcc; 512], "not read without a status");
        assert_eq!(
            d.img.bytes()[..512],
            (0..512).map(pattern).collect::<Vec<_>>()[..]
        );
        d.assert_works();
    }

    #[test]
    fn zero_length_descriptors() {
        let mut d = Driver::new();
        d.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            d.raw(&[(HDR, 0, R), (DATA, 512, W), (STATUS, 1, W)]),
            (IOERR_S, 1)
        );
        assert_eq!(
            d.raw(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)]),
            (0xff, 0)
        );
        // An empty data buffer among others is harmless; only empty data is not.
        let r = d.request(
            VIRTIO_BLK_T_IN,
            0,
            &[(DATA, 0, W), (DATA, 512, W), (0, 0, W)],
        );
        assert_eq!(r, (OK_S, 513));
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 0, W)]), (IOERR_S, 1));
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, &[]), (IOERR_S, 1));
        assert_eq!(
            d.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 0, R)]),
            (IOERR_S, 1)
        );
        d.assert_works();
    }

    /// Writes an indirect table of `n` descriptors: header, data, status.
    fn indirect(d: &mut Driver, n: u16, data_len: u32) -> u16 {
        let descs: Vec<Desc> = (0..n)
            .map(|i| match i {
                0 => (HDR, 16, R),
                i if i == n - 1 => (STATUS, 1, W),
                _ => (DATA, data_len, W),
            })
            .collect();
        put_table(&d.mem, INDIRECT, &descs);
        d.chain(&[(INDIRECT, 16 * u32::from(n), VRING_DESC_F_INDIRECT as u16)])
    }

    #[test]
    fn chain_longer_than_the_queue() {
        let mut d = Driver::new();
        d.header(VIRTIO_BLK_T_IN, 0);
        // Through an indirect table: exactly the queue size is fine, one more is not.
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = indirect(&mut d, 16, 512);
        assert_eq!(d.run(head), 14 * 512 + 1);
        assert_eq!(d.guest(STATUS, 1), [OK_S]);
        let head = indirect(&mut d, 17, 512);
        assert_eq!(d.run(head), 1);
        assert_eq!(d.guest(STATUS, 1), [IOERR_S]);
        // A huge table ends the same way, without keeping it all.
        let head = indirect(&mut d, 4096, 512);
        assert_eq!(d.run(head), 1);
        assert_eq!(d.guest(STATUS, 1), [IOERR_S]);
        d.assert_works();
    }

    #[test]
    fn request_larger_than_the_cap() {
        // 64 segments of 1 MiB, all the same guest buffer: within the queue and
        // seg_max, but 64 MiB of data.
        let mut d = Driver::with(false, 256, !VIRTIO_F_RING_EVENT_IDX);
        d.header(VIRTIO_BLK_T_IN, 0);
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = indirect(&mut d, 66, 1 << 20);
        assert_eq!(d.run(head), 1);
        assert_eq!(d.guest(STATUS, 1), [IOERR_S]);
        d.assert_works();
    }

    #[test]
    fn wrong_buffer_direction() {
        let mut d = Driver::new();
        d.fill(DATA, &[0x11; 512]);
        // Reading into a device-readable buffer, whole or in part.
        assert_eq!(
            d.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, R)]),
            (IOERR_S, 1)
        );
        let r = d.request(VIRTIO_BLK_T_IN, 0, &[(DATA2, 512, W), (DATA, 512, R)]);
        assert_eq!(r, (IOERR_S, 1));
        assert_eq!(d.guest(DATA, 512), [0x11; 512]);
        // Writing from a device-writable buffer.
        assert_eq!(
            d.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, W)]),
            (IOERR_S, 1)
        );
        // A device-writable header; a device-readable status.
        d.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            d.raw(&[(HDR, 16, W), (DATA, 512, R), (STATUS, 1, W)]),
            (IOERR_S, 1)
        );
        assert_eq!(
            d.raw(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)]),
            (0xff, 0)
        );
        assert_eq!(
            d.img.bytes()[..512],
            (0..512).map(pattern).collect::<Vec<_>>()[..]
        );
        d.assert_works();
    }

    #[test]
    fn short_header_and_missing_status() {
        let mut d = Driver::new();
        d.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            d.raw(&[(HDR, 15, R), (DATA, 512, W), (STATUS, 1, W)]),
            (IOERR_S, 1)
        );
        // No status descriptor: the last one is data the device may not write...
        d.header(VIRTIO_BLK_T_OUT, 0);
        d.fill(DATA, &[0x22; 512]);
        assert_eq!(d.raw(&[(HDR, 16, R), (DATA, 512, R)]).1, 0);
        // ...or the header itself, alone.
        assert_eq!(d.raw(&[(HDR, 16, R)]).1, 0);
        assert_eq!(
            d.img.bytes()[..512],
            (0..512).map(pattern).collect::<Vec<_>>()[..]
        );
        // Only a status byte: no header.
        assert_eq!(d.raw(&[(STATUS, 1, W)]), (IOERR_S, 1));
        // The status is the last byte of a longer last descriptor.
        d.header(VIRTIO_BLK_T_FLUSH, 0);
        d.fill(STATUS, &[0xff; 4]);
        let head = d.chain(&[(HDR, 16, R), (STATUS, 4, W)]);
        assert_eq!(d.run(head), 1);
        assert_eq!(d.guest(STATUS, 4), [0xff, 0xff, 0xff, OK_S]);
        d.assert_works();
    }

    #[test]
    fn sectors_outside_the_disk() {
        let mut d = Driver::new();
        for (t, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
            for sector in [
                SECTORS,
                SECTORS - 1,
                u64::MAX / 512,
                u64::MAX / 256,
                u64::MAX,
            ] {
                let r = d.request(t, sector, &[(DATA, 1024, flags)]);
                assert_eq!(r, (IOERR_S, 1), "type {t} sector {sector}");
            }
            // Not a whole number of sectors.
            assert_eq!(d.request(t, 0, &[(DATA, 1000, flags)]), (IOERR_S, 1));
            assert_eq!(
                d.request(t, 0, &[(DATA, 500, flags), (DATA, 524, flags)]),
                (OK_S, if flags == W { 1025 } else { 1 })
            );
        }
        d.assert_works();
    }

    #[test]
    fn unknown_request_types() {
        let mut d = Driver::new();
        for t in [
            2,
            3,
            5,
            10,
            VIRTIO_BLK_T_SECURE_ERASE,
            VIRTIO_BLK_T_ZONE_REPORT,
            0x1234,
            u32::MAX,
        ] {
            assert_eq!(
                d.request(t, 0, &[(DATA, 512, W)]),
                (UNSUPP_S, 1),
                "type {t}"
            );
        }
        d.assert_works();
    }

    #[test]
    fn avail_index_far_ahead() {
        let mut d = Driver::new();
        let idx = d.ring.avail_idx(&d.mem);
        d.ring.set_avail_idx(&d.mem, idx.wrapping_add(1000));
        assert_eq!(d.blk.queue_notify(0), Served::All);
        assert_eq!(d.used_idx(), 0);
        assert_eq!(d.irqs.count(0), 0);
        // The driver repairs the index: the ring works again.
        d.ring.set_avail_idx(&d.mem, idx);
        d.assert_works();
    }

    #[test]
    fn descriptor_index_beyond_the_queue() {
        let mut d = Driver::new();
        // As a head: nothing can be returned for it, and it is skipped.
        d.publish(16);
        d.publish(0xffff);
        assert_eq!(d.blk.queue_notify(0), Served::All);
        assert_eq!(d.used_idx(), 0);
        // As a `next`: the chain has no end, so no status.
        d.header(VIRTIO_BLK_T_IN, 0);
        d.ring
            .set_desc(&d.mem, 0, (HDR, 16, VRING_DESC_F_NEXT as u16), 16);
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let before = d.used_idx();
        d.publish(0);
        assert_eq!(d.blk.queue_notify(0), Served::All);
        assert_eq!(d.used_idx(), before + 1);
        assert_eq!(d.guest(STATUS, 1), [0xff]);
        d.next_desc = 1;
        d.assert_works();
    }

    #[test]
    fn notify_on_other_queue_or_inactive_is_ignored() {
        let mut d = Driver::new();
        d.header(VIRTIO_BLK_T_FLUSH, 0);
        let head = d.chain(&[(HDR, 16, R), (STATUS, 1, W)]);
        d.publish(head);
        assert_eq!(d.blk.queue_notify(1), Served::All);
        assert_eq!(d.blk.queue_notify(usize::MAX), Served::All);
        assert_eq!(d.used_idx(), 0);
        assert_eq!(d.blk.queue_notify(0), Served::All);
        assert_eq!(d.used_idx(), 1);
        d.blk.reset();
        assert_eq!(d.blk.queue_notify(0), Served::All);
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let mut d = Driver::with(false, 16, !0);
        // The driver wants an interrupt only once the used index passes 2.
        d.ring.set_used_event(&d.mem, 2);
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK_S, 1));
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK_S, 1));
        assert_eq!(d.irqs.count(0), 0);
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK_S, 1));
        assert_eq!(d.irqs.count(0), 1);
        // The device asks to be notified at the next available entry.
        assert_eq!(d.ring.avail_event(&d.mem), 3);
    }

    /// Publishes `n` reads of `len` bytes, request i from sector `i * len / 512`
    /// modulo the disk into its own buffer at `buf(i)`, each through its own indirect
    /// table: a ring has too few descriptors for three per request.
    fn queue_reads(d: &mut Driver, n: u16, len: u32, buf: impl Fn(u16) -> u64) {
        for i in 0..n {
            let (hdr, status) = (STORM_HDR + 16 * u64::from(i), STORM_STATUS + u64::from(i));
            let sector = (u64::from(i) * u64::from(len) / 512) % SECTORS;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            d.fill(hdr, &h);
            d.fill(status, &[0xff]);
            let table = INDIRECT + 48 * u64::from(i);
            put_table(
                &d.mem,
                table,
                &[(hdr, 16, R), (buf(i), len, W), (status, 1, W)],
            );
            let head = d.chain(&[(table, 48, VRING_DESC_F_INDIRECT as u16)]);
            d.publish(head);
        }
    }

    const STORM_HDR: u64 = 0x3_0000;
    const STORM_STATUS: u64 = 0x3_8000;
    const STORM_DATA: u64 = 0x4_0000;

    /// Serves the queue one event at a time until it reports nothing left; the
    /// used index after each event.
    fn events(d: &mut Driver) -> Vec<u16> {
        let mut after = Vec::new();
        loop {
            let served = d.blk.queue_notify(0);
            after.push(d.used_idx());
            if served == Served::All {
                return after;
            }
            assert!(after.len() < 1000, "never done");
        }
    }

    /// Request i completed, in order, with the sector it asked for.
    fn assert_reads_done(d: &Driver, n: u16) {
        assert_eq!(d.used_idx(), n);
        for i in 0..n {
            let id = u32::from(i % d.ring.size);
            assert_eq!(d.ring.used(&d.mem, i), (id, 513), "used entry {i}");
            assert_eq!(d.guest(STORM_STATUS + u64::from(i), 1), [OK_S]);
            let sector = u64::from(i) % SECTORS;
            let want: Vec<u8> = (sector * 512..sector * 512 + 512).map(pattern).collect();
            assert_eq!(d.guest(STORM_DATA + 512 * u64::from(i), 512), want);
        }
    }

    #[test]
    fn a_storm_is_served_one_budget_per_event() {
        // 200 small reads queued at once: each event serves at most 64 of them and
        // says so; the rest follow, in order, on the next events.
        let mut d = Driver::with(false, 256, !0);
        queue_reads(&mut d, 200, 512, |i| STORM_DATA + 512 * u64::from(i));
        assert_eq!(events(&mut d), [64, 128, 192, 200]);
        assert_reads_done(&d, 200);
        // Kicks armed again past the last request.
        assert_eq!(d.ring.avail_event(&d.mem), 200);
        d.assert_works();
    }

    #[test]
    fn large_requests_are_bounded_by_bytes() {
        // 64 KiB reads: 32 of them fill the 2 MiB budget, whatever the chain count.
        assert_eq!(Budget::BYTES, 2 << 20);
        let mut d = Driver::with(false, 256, !VIRTIO_F_RING_EVENT_IDX);
        queue_reads(&mut d, 40, 64 << 10, |_| 0x18_0000);
        assert_eq!(events(&mut d), [32, 40]);
        assert_eq!(d.irqs.count(0), 2, "one interrupt per event");
        let whole: Vec<u8> = (0..SECTORS * 512).map(pattern).collect();
        assert_eq!(d.guest(0x18_0000, whole.len()), whole);
        // A request larger than the whole budget is still served, alone.
        queue_reads(&mut d, 2, 512, |i| STORM_DATA + 512 * u64::from(i));
        let next = VRING_DESC_F_NEXT as u16;
        put_desc(&d.mem, INDIRECT, 1, (REGION, 2 << 20, W | next), 2);
        assert_eq!(events(&mut d), [41, 42]);
        assert_eq!(d.guest(STORM_STATUS, 2), [IOERR_S, OK_S]);
    }

    #[test]
    fn a_save_mid_storm_loses_nothing() {
        // One event's worth served, then the queue is saved and resumed by a new
        // device on the same image, as a live update does: the new device serves
        // exactly the rest, none twice.
        let mut d = Driver::with(false, 256, !0);
        queue_reads(&mut d, 200, 512, |i| STORM_DATA + 512 * u64::from(i));
        assert_eq!(d.blk.queue_notify(0), Served::More);
        assert_eq!(d.used_idx(), 64);
        let saved = d.blk.state();
        assert_eq!(saved[0].next_avail, 64);
        let mut blk = Block::new(&DiskConfig {
            path: d.img.0.clone(),
            read_only: false,
        })
        .unwrap();
        blk.ack_features(!0);
        let irq = Box::new(d.irqs.clone());
        blk.restore(d.mem.clone(), &saved, irq).unwrap();
        assert_eq!(blk.state(), saved);
        d.blk = blk;
        assert_eq!(events(&mut d), [128, 192, 200]);
        assert_reads_done(&d, 200);
    }

    #[test]
    fn reset_and_activate_again() {
        let mut d = Driver::new();
        d.assert_works();
        d.blk.reset();
        // Reset forgets the features; the queue starts over at index 0.
        d.mem.write_slice(&[0u8; 0x3000], GuestAddress(0)).unwrap();
        d.blk.ack_features(!VIRTIO_F_RING_EVENT_IDX);
        d.blk.activate(
            d.mem.clone(),
            vec![d.ring.queue(QUEUE_SIZE)],
            Box::new(d.irqs.clone()),
        );
        d.next_desc = 0;
        d.assert_works();
        // Activating without a queue leaves the device inert rather than panicking.
        d.blk.reset();
        d.blk
            .activate(d.mem.clone(), Vec::new(), Box::new(d.irqs.clone()));
        assert_eq!(d.blk.queue_notify(0), Served::All);
    }
}
