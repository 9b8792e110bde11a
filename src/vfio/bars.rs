//! A passed-through function's BARs in the guest. The parts VFIO lets molt
//! mmap become KVM memslots at the BAR's guest address while the guest has
//! memory decoding on: the guest then reaches the device without exits. The
//! rest traps to molt, which reads and writes the device descriptor at the
//! region's offset: regions that cannot be mmap'ed, pieces past the memslots a
//! BAR may use, and the pages of the MSI-X table and PBA, which molt emulates.

use std::os::fd::RawFd;

use super::probe::BarInfo;
use super::Why;
use crate::pci::MemoryMapper;
use crate::ratelimit::guest_log;

/// Memslots one BAR may use; further mappable pieces trap.
pub const SLOTS_PER_BAR: usize = 4;
const PAGE: u64 = 4096;

/// A shared mapping of part of the device descriptor, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain device memory owned by this value alone; the
// pointer is only handed to KVM (`MemoryMapper`), never dereferenced here.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly a mapping this value made and owns.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A mapped piece: its offset in the BAR, length and host address.
struct Piece {
    offset: u64,
    len: u64,
    host: *mut u8,
}

// SAFETY: as for `Mapping`: the address is only passed to KVM.
unsafe impl Send for Piece {}

pub struct Bar {
    pub info: BarInfo,
    pieces: Vec<Piece>,
    _maps: Vec<Mapping>,
    first_slot: u32,
    /// The guest address the pieces are mapped at.
    at: Option<u64>,
}

impl Bar {
    /// BAR `index`, with its mmap-able areas mapped from the device descriptor
    /// `fd` except `holes` (offset, length: what molt emulates), using memslots
    /// from `first_slot` on.
    pub fn new(
        index: usize,
        info: BarInfo,
        fd: RawFd,
        holes: &[(u64, u64)],
        first_slot: u32,
    ) -> Result<Self, Why> {
        let mut maps = Vec::new();
        let mut pieces = Vec::new();
        for (start, len) in pieces_of(&info.mmap_areas(), &[], info.size()) {
            let off = info.region.offset + start;
            // SAFETY: a new shared mapping of the device's region, at an
            // address the kernel picks; nothing else is affected.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    off as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(Why::Mmap(index, std::io::Error::last_os_error()));
            }
            let map = Mapping {
                ptr: ptr.cast(),
                len: len as usize,
            };
            for (p, plen) in pieces_of(&[(start, len)], holes, info.size()) {
                pieces.push(Piece {
                    offset: p,
                    len: plen,
                    // In bounds: the piece lies inside this mapping.
                    host: map.ptr.wrapping_add((p - start) as usize),
                });
            }
            maps.push(map);
        }
        if pieces.len() > SLOTS_PER_BAR {
            log::info!(
                "BAR {index}: {} mappable pieces, {SLOTS_PER_BAR} mapped, the rest trapped",
                pieces.len()
            );
            pieces.truncate(SLOTS_PER_BAR);
        }
        Ok(Bar {
            info,
            pieces,
            _maps: maps,
            first_slot,
            at: None,
        })
    }

    /// Bytes of the BAR the guest reaches without exits.
    pub fn mapped_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }

    /// Maps the pieces at guest address `base`, or unmaps them (None); a
    /// move unmaps first. A mapping KVM refuses (the guest put the BAR over
    /// RAM or another BAR) leaves the BAR unmapped: its accesses trap.
    pub fn place(&mut self, mapper: &dyn MemoryMapper, base: Option<u64>) {
        if self.at == base || self.pieces.is_empty() {
            return;
        }
        if self.at.take().is_some() {
            self.unmap(mapper);
        }
        let Some(base) = base else {
            return;
        };
        for (slot, p) in (self.first_slot..).zip(&self.pieces) {
            // SAFETY: the piece points into a mapping this Bar owns; it stays
            // mapped until `unmap` empties the slot (on a move, on decoding
            // off, and before the Bar is dropped).
            let r = unsafe { mapper.set_slot(slot, base + p.offset, p.host, p.len) };
            if let Err(e) = r {
                guest_log!(
                    Warn,
                    "BAR at {base:#x}: cannot map {:#x} bytes at {:#x}: {e}; its accesses trap",
                    p.len,
                    base + p.offset
                );
                self.unmap(mapper);
                return;
            }
        }
        self.at = Some(base);
    }

    fn unmap(&self, mapper: &dyn MemoryMapper) {
        for slot in (self.first_slot..).take(self.pieces.len()) {
            // SAFETY: emptying a slot maps nothing.
            if let Err(e) = unsafe { mapper.set_slot(slot, 0, std::ptr::null_mut(), 0) } {
                log::warn!("cannot remove BAR memslot {slot}: {e}");
            }
        }
    }
}

/// The page-aligned parts of `areas` (offset, length; rounded inwards to
/// pages and to `size`) outside `holes` (rounded outwards to pages).
pub fn pieces_of(areas: &[(u64, u64)], holes: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(offset, len) in areas {
        let start = offset.next_multiple_of(PAGE);
        let end = offset.saturating_add(len).min(size) / PAGE * PAGE;
        if start >= end {
            continue;
        }
        let mut cuts: Vec<(u64, u64)> = holes
            .iter()
            .map(|&(o, l)| (o / PAGE * PAGE, o.saturating_add(l).next_multiple_of(PAGE)))
            .collect();
        cuts.sort_unstable();
        let mut at = start;
        for (cs, ce) in cuts.into_iter().chain([(end, end)]) {
            let stop = cs.clamp(at, end);
            if stop > at {
                out.push((at, stop - at));
            }
            at = at.max(ce);
            if at >= end {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_skip_the_msix_pages() {
        // A 64 KiB BAR with the table at 0x2000 (0x100 bytes) and PBA at 0x3800.
        let holes = [(0x2000, 0x100), (0x3800, 8)];
        assert_eq!(
            pieces_of(&[(0, 0x10000)], &holes, 0x10000),
            vec![(0, 0x2000), (0x4000, 0xc000)]
        );
        // No holes: the whole area; a hole at the end; a hole covering all.
        assert_eq!(pieces_of(&[(0, 0x4000)], &[], 0x4000), vec![(0, 0x4000)]);
        assert_eq!(
            pieces_of(&[(0, 0x4000)], &[(0x3ff0, 16)], 0x4000),
            vec![(0, 0x3000)]
        );
        assert!(pieces_of(&[(0, 0x1000)], &[(0, 0x1000)], 0x1000).is_empty());
        // Sparse areas, unaligned edges rounded in, nothing past the BAR.
        assert_eq!(
            pieces_of(&[(0x800, 0x2000), (0x8000, 0x10000)], &[], 0xc000),
            vec![(0x1000, 0x1000), (0x8000, 0x4000)]
        );
        // Too small to map, or empty once rounded.
        assert!(pieces_of(&[(0, 0x100)], &[], 0x100).is_empty());
        assert!(pieces_of(&[(0x800, 0x100)], &[], 0x1000).is_empty());
    }
}
