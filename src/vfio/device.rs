//! A passed-through PCI function as the guest sees it (PCI Local Bus 3.0,
//! 6.1). Config space reads and writes go to the device, except the registers
//! molt virtualizes: the BARs (placed by molt's allocator; memory decoding
//! maps them), the command register (memory and bus-master enables reach the
//! device, INTx stays disabled there), the header type's multi-function bit,
//! the expansion ROM (hidden), the interrupt pin (none: no INTx) and line, and
//! the MSI and MSI-X capabilities (their vectors are KVM routes; VFIO programs
//! the device's own). Those registers live in a `ConfigSpace`: its bytes and
//! `Msix::state` are the device's state a live update will carry.
//!
//! Every guest access is bounded: config space to its 256 bytes, a BAR access
//! to the BAR, the MSI-X table and PBA to the vectors offered.

use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::Arc;

use heapless::Vec as BoundedVec;
use serde::{Deserialize, Serialize};
use vfio_bindings::bindings::vfio::{VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX};

use super::bars::{Bar, SLOTS_PER_BAR};
use super::handles::DeviceHandles;
use super::irqs::{bits, Lines};
use super::probe::{BarPlace, MsixInfo};
use super::{Bdf, Why};
use crate::pci::config::{
    ConfigSpace, Header, BAR0, COMMAND, COMMAND_INTX_DISABLE, COMMAND_MASTER, COMMAND_MEMORY,
    CONFIG_SIZE, NUM_BARS,
};
use crate::pci::msi::{Msi, MsiRouter, Vectors};
use crate::pci::msix::{Msix, MsixState};
use crate::pci::{MemoryMapper, PciFunction};
use crate::ratelimit::guest_log;

/// Memslots one device may use.
pub const MEMSLOTS: u32 = (NUM_BARS * SLOTS_PER_BAR) as u32;

const COMMAND_IO: u16 = 1;
const HEADER_TYPE: usize = 0x0e;
const ROM_BAR: usize = 0x30;
const INTERRUPT_LINE: usize = 0x3c;
const BARS: Range<usize> = BAR0..BAR0 + 4 * NUM_BARS;

/// What molt gives a passed-through function, all fixed at creation.
pub struct Resources {
    /// Guest address of each BAR the function has (by index; others unused).
    pub bars: [u64; NUM_BARS],
    /// The GSIs of MSI's vectors, then MSI-X's.
    pub gsis: Vec<u32>,
    pub router: Arc<dyn MsiRouter>,
    pub mapper: Arc<dyn MemoryMapper>,
    /// The first of the `MEMSLOTS` memslots it may use.
    pub first_slot: u32,
    /// Handed over by a live update: the device runs on as the guest left
    /// it, and nothing is written to it until its state is restored.
    pub adopted: bool,
}

/// Version 1 of a passed-through function's saved state: the registers molt
/// virtualizes (the rest is the device's own, which keeps running) and what
/// VFIO was told about its interrupts. Frozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioStateV1 {
    /// The virtualized config space, all 256 bytes (MSI's registers in it).
    pub config: BoundedVec<u8, CONFIG_SIZE>,
    pub msix: Option<MsixState>,
    /// (vectors enabled, live mask) VFIO has for MSI and for MSI-X.
    pub msi_armed: Option<(u8, u32)>,
    pub msix_armed: Option<(u8, u32)>,
}

/// The version this release saves and restores.
pub type VfioState = VfioStateV1;

pub struct VfioPci {
    handles: DeviceHandles,
    /// The virtualized registers; `emulated` says which bytes they cover.
    config: ConfigSpace,
    emulated: [bool; CONFIG_SIZE],
    bars: [Option<Bar>; NUM_BARS],
    msi: Option<(Msi, Lines)>,
    msix: Option<(MsixInfo, Msix, Lines)>,
    mapper: Arc<dyn MemoryMapper>,
    /// The GSI of each vector, MSI's then MSI-X's (as the irqfds).
    gsis: Vec<u32>,
}

impl VfioPci {
    pub fn new(handles: DeviceHandles, res: Resources) -> Result<Self, Why> {
        let l = &handles.layout;
        let c = &l.config;
        let u16_at = |o: usize| u16::from_le_bytes([c[o], c[o + 1]]);
        let mut config = ConfigSpace::new(&Header {
            vendor: u16_at(0),
            device: u16_at(2),
            revision: c[8],
            class: u32::from_le_bytes([c[9], c[10], c[11], 0]),
            subsystem_vendor: u16_at(0x2c),
            subsystem_id: u16_at(0x2e),
        });
        let mut emulated = [false; CONFIG_SIZE];
        for r in [
            COMMAND..COMMAND + 2,
            HEADER_TYPE..HEADER_TYPE + 1,
            BARS,
            ROM_BAR..ROM_BAR + 4,
            INTERRUPT_LINE..INTERRUPT_LINE + 2,
        ] {
            emulated[r].fill(true);
        }
        // One function per slot: the guest must not probe functions 1-7.
        config.set_bytes(HEADER_TYPE, &[c[HEADER_TYPE] & 0x7f]);
        let mut bars: [Option<Bar>; NUM_BARS] = Default::default();
        for (i, info) in l.bars.iter().enumerate() {
            let Some(info) = info else {
                continue;
            };
            config.set_memory_bar(i, res.bars[i], info.size(), info.flags);
            let holes: Vec<(u64, u64)> = l
                .msix
                .iter()
                .flat_map(|m| [m.table, m.pba])
                .filter(|p| p.bar == i)
                .map(|p| (p.offset, p.len))
                .collect();
            let slot = res.first_slot + (i * SLOTS_PER_BAR) as u32;
            let bar = Bar::new(i, info.clone(), handles.device.fd(), &holes, slot)?;
            log::info!(
                "VFIO device {}: BAR {i}, {:#x} bytes at {:#x}: {:#x} bytes mapped into \
                 the guest, the rest trapped",
                handles.bdf,
                info.size(),
                res.bars[i],
                bar.mapped_bytes()
            );
            bars[i] = Some(bar);
        }
        let n_msi = l.msi_vectors();
        let gsis = res.gsis.clone();
        let vectors = |range: Range<usize>| -> Result<Vectors, Why> {
            let fds = handles.irqfds[range.clone()]
                .iter()
                .map(|e| e.try_clone())
                .collect::<Result<Vec<_>, _>>()
                .map_err(Why::Eventfd)?;
            Ok(Vectors::new(
                res.gsis[range].to_vec(),
                fds,
                res.router.clone(),
            ))
        };
        let msi = match l.msi {
            Some((cap, control)) => {
                let msi = Msi::new(cap, control, vectors(0..n_msi)?);
                let (body, writable) = msi.body();
                config.set_bytes(cap + 2, &body);
                config.set_writable(cap + 2, &writable);
                emulated[cap + 2..cap + msi.len()].fill(true);
                Some((msi, Lines::new(VFIO_PCI_MSI_IRQ_INDEX, 0, n_msi)))
            }
            None => None,
        };
        let msix = match l.msix.clone() {
            Some(info) => {
                let n = info.vectors;
                let msix = Msix::new(vectors(n_msi..n_msi + n)?);
                // Table size: the vectors offered; table and PBA: as on the device.
                let mut body = (n as u16 - 1).to_le_bytes().to_vec();
                body.extend_from_slice(&c[info.cap + 4..info.cap + 12]);
                config.set_bytes(info.cap + 2, &body);
                config.set_writable(info.cap + 2, &Msix::capability_writable());
                emulated[info.cap + 2..info.cap + 12].fill(true);
                let lines = Lines::new(VFIO_PCI_MSIX_IRQ_INDEX, n_msi, n);
                Some((info, msix, lines))
            }
            None => None,
        };
        let d = VfioPci {
            handles,
            config,
            emulated,
            bars,
            msi,
            msix,
            mapper: res.mapper,
            gsis,
        };
        if !res.adopted {
            d.write_command();
        }
        Ok(d)
    }

    /// Each vector's irqfd with its GSI: KVM binds them (at boot; after a
    /// live update, once the machine is restored).
    pub fn irqfds(&self) -> impl Iterator<Item = (&vmm_sys_util::eventfd::EventFd, u32)> {
        self.handles.irqfds.iter().zip(self.gsis.iter().copied())
    }

    /// The device's descriptor and its eventfds (irqfds, parked), to hand over.
    pub fn fds(&self) -> (RawFd, Vec<RawFd>, Vec<RawFd>) {
        self.handles.fds()
    }

    /// The virtualized registers and interrupt programming, for a live update.
    pub fn state(&self) -> VfioState {
        let armed = |l: &Lines| l.armed().map(|(n, live)| (n as u8, live));
        VfioState {
            config: self.config.bytes().iter().copied().collect(),
            msix: self.msix.as_ref().map(|(_, m, _)| m.state()),
            msi_armed: self.msi.as_ref().and_then(|(_, l)| armed(l)),
            msix_armed: self.msix.as_ref().and_then(|(_, _, l)| armed(l)),
        }
    }

    /// Takes a saved state (`state`) on a handed-over device that kept
    /// running: the virtualized registers, the MSI routes and MSI-X table,
    /// what VFIO has for each vector (nothing is sent to VFIO that it
    /// already has), the BARs' memslots if the guest had decoding on.
    /// Interrupts that arrived for masked vectors become pending. The saved
    /// bytes must be this device's (identity, capabilities).
    pub fn restore(&mut self, s: &VfioState) -> Result<(), Why> {
        let bad = |what: String| Why::State(what);
        if s.msix.is_some() != self.msix.is_some() {
            return Err(bad(format!(
                "MSI-X saved {}, the device has {}",
                if s.msix.is_some() { "on" } else { "off" },
                if self.msix.is_some() { "it" } else { "none" }
            )));
        }
        if s.msi_armed.is_some() && self.msi.is_none() {
            return Err(bad("MSI armed on a device without MSI".into()));
        }
        self.config
            .restore_bytes(&s.config)
            .map_err(|e| bad(format!("config space: {e}")))?;
        let armed = |a: Option<(u8, u32)>| a.map(|(n, live)| (usize::from(n), live));
        if let Some((_, lines)) = &mut self.msi {
            lines.restore_armed(armed(s.msi_armed)).map_err(bad)?;
        }
        if let (Some((_, msix, lines)), Some(saved)) = (&mut self.msix, &s.msix) {
            lines.restore_armed(armed(s.msix_armed)).map_err(bad)?;
            msix.restore(saved)
                .map_err(|e| bad(format!("MSI-X: {e}")))?;
        }
        self.sync_msi();
        self.sync_msix();
        self.write_command();
        let decoding = self.config.memory_enabled();
        self.place_bars(decoding);
        Ok(())
    }

    pub fn bdf(&self) -> Bdf {
        self.handles.bdf
    }

    /// The device's vendor and device ID.
    pub fn ids(&self) -> (u16, u16) {
        let c = &self.handles.layout.config;
        (
            u16::from_le_bytes([c[0], c[1]]),
            u16::from_le_bytes([c[2], c[3]]),
        )
    }

    fn config_offset(&self) -> u64 {
        self.handles.layout.config_offset
    }

    /// The device's command register: memory and bus master as the guest
    /// has them, I/O off (I/O BARs are not offered), INTx disabled.
    fn write_command(&self) {
        let at = self.config_offset() + COMMAND as u64;
        let mut hw = [0u8; 2];
        let dev = &self.handles.device;
        let r = dev.read_at(&mut hw, at).and_then(|()| {
            let guest = self.config.read_u16(COMMAND) & (COMMAND_MEMORY | COMMAND_MASTER);
            let old = u16::from_le_bytes(hw);
            let new = (old & !(COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER))
                | guest
                | COMMAND_INTX_DISABLE;
            if new == old {
                return Ok(());
            }
            dev.write_at(&new.to_le_bytes(), at)
        });
        if let Err(e) = r {
            guest_log!(Warn, "VFIO device {}: command register: {e}", self.bdf());
        }
    }

    /// The guest changed the command register or a BAR. Memory decoding off
    /// unmaps the BARs before the device stops decoding, and on maps them
    /// after it starts: a vCPU never reaches a BAR the device does not decode.
    fn decode_changed(&mut self, old_command: u16) {
        let command = self.config.read_u16(COMMAND);
        let decoding = command & COMMAND_MEMORY != 0;
        if !decoding {
            self.place_bars(false);
        }
        if (command ^ old_command) & (COMMAND_MEMORY | COMMAND_MASTER) != 0 {
            self.write_command();
        }
        if decoding {
            self.place_bars(true);
        }
    }

    fn place_bars(&mut self, decoding: bool) {
        for (i, bar) in self.bars.iter_mut().enumerate() {
            if let Some(bar) = bar {
                let base = self.config.bar(i).map(|(base, _)| base);
                bar.place(&*self.mapper, base.filter(|_| decoding));
            }
        }
    }

    /// Interrupts VFIO parked for masked MSI vectors become pending (or fire,
    /// for a vector live by now).
    fn collect_msi(&mut self) {
        if let Some((msi, lines)) = &mut self.msi {
            for v in bits(lines.collect(&self.handles.parked)) {
                msi.trigger(&mut self.config, v);
            }
        }
    }

    fn collect_msix(&mut self) {
        if let Some((_, msix, lines)) = &mut self.msix {
            for v in bits(lines.collect(&self.handles.parked)) {
                msix.trigger(v as u16);
            }
        }
    }

    /// After a guest write to the MSI capability: routes, then points VFIO at
    /// the vectors' irqfds or parked eventfds.
    fn sync_msi(&mut self) {
        let Some((msi, lines)) = &mut self.msi else {
            return;
        };
        msi.update(&mut self.config);
        let c = &self.config;
        let h = &self.handles;
        let r = lines.sync(
            &h.device,
            &h.irqfds,
            &h.parked,
            msi.enabled(c),
            msi.count(c),
            msi.live(c),
        );
        if let Err(e) = r {
            guest_log!(Error, "VFIO device {}: MSI: {e}", h.bdf);
        }
        self.collect_msi();
    }

    fn sync_msix(&mut self) {
        let Some((info, msix, lines)) = &mut self.msix else {
            return;
        };
        let h = &self.handles;
        let r = lines.sync(
            &h.device,
            &h.irqfds,
            &h.parked,
            msix.enabled(),
            info.vectors,
            msix.live(),
        );
        if let Err(e) = r {
            guest_log!(Error, "VFIO device {}: MSI-X: {e}", h.bdf);
        }
        self.collect_msix();
    }

    /// The MSI-X table or PBA offset an access at `offset` of `bar` falls in.
    fn msix_part(&self, bar: usize, offset: u64) -> Option<(bool, u64)> {
        let (info, ..) = self.msix.as_ref()?;
        let inside = |p: BarPlace| {
            (p.bar == bar && offset >= p.offset && offset - p.offset < p.len)
                .then(|| offset - p.offset)
        };
        inside(info.table)
            .map(|o| (true, o))
            .or_else(|| inside(info.pba).map(|o| (false, o)))
    }

    /// The device offset of `len` bytes at `offset` of `bar`, if inside it.
    fn region_at(&self, bar: usize, offset: u64, len: usize) -> std::io::Result<u64> {
        let b = self.bars.get(bar).and_then(Option::as_ref);
        b.filter(|b| {
            offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= b.info.size())
        })
        .map(|b| b.info.region.offset + offset)
        .ok_or_else(|| std::io::Error::other("outside the BAR"))
    }
}

/// The end of a config access of `len` bytes at `offset`, cut at the end of
/// config space; None if it starts past it.
fn config_end(offset: usize, len: usize) -> Option<usize> {
    (offset < CONFIG_SIZE).then(|| offset.saturating_add(len).min(CONFIG_SIZE))
}

impl PciFunction for VfioPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        let Some(end) = config_end(offset, data.len()) else {
            return;
        };
        if let Some((msi, _)) = &self.msi {
            let cap = msi.range();
            if offset < cap.end && end > cap.start {
                self.collect_msi();
            }
        }
        let mut hw = vec![0xff; end - offset];
        if (offset..end).any(|o| !self.emulated[o]) {
            let at = self.config_offset() + offset as u64;
            if let Err(e) = self.handles.device.read_at(&mut hw, at) {
                guest_log!(
                    Warn,
                    "VFIO device {}: config read at {offset:#x}: {e}",
                    self.bdf()
                );
                hw.fill(0xff);
            }
        }
        let virt = self.config.bytes();
        for (i, d) in data[..end - offset].iter_mut().enumerate() {
            let o = offset + i;
            *d = if self.emulated[o] { virt[o] } else { hw[i] };
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let Some(end) = config_end(offset, data.len()) else {
            return;
        };
        let data = &data[..end - offset];
        let touches = |r: &Range<usize>| offset < r.end && end > r.start;
        let msi = self.msi.as_ref().is_some_and(|(m, _)| touches(&m.range()));
        let msix_control = self.msix.as_ref().map(|(i, ..)| i.cap + 2..i.cap + 4);
        let msix = msix_control.as_ref().is_some_and(touches);
        // Interrupts parked so far count against the registers as they were.
        if msi {
            self.collect_msi();
        }
        if msix {
            self.collect_msix();
        }
        let old_command = self.config.read_u16(COMMAND);
        // Run by run: virtualized bytes through the config space's write
        // masks, the others to the device (whose kernel driver filters them).
        let mut i = 0;
        while i < data.len() {
            let emu = self.emulated[offset + i];
            let run = (i..data.len())
                .take_while(|&j| self.emulated[offset + j] == emu)
                .count();
            let (o, bytes) = (offset + i, &data[i..i + run]);
            if emu {
                self.config.write(o, bytes);
            } else if let Err(e) = self
                .handles
                .device
                .write_at(bytes, self.config_offset() + o as u64)
            {
                guest_log!(
                    Warn,
                    "VFIO device {}: config write at {o:#x}: {e}",
                    self.bdf()
                );
            }
            i += run;
        }
        if touches(&(COMMAND..COMMAND + 2)) || touches(&BARS) {
            self.decode_changed(old_command);
        }
        if msi {
            self.sync_msi();
        }
        if let (true, Some((info, m, _))) = (msix, &mut self.msix) {
            m.set_control(self.config.read_u16(info.cap + 2));
            self.sync_msix();
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_part(bar, offset) {
            Some((true, o)) => {
                if let Some((_, m, _)) = &self.msix {
                    m.table_read(o, data);
                }
            }
            Some((false, o)) => {
                self.collect_msix();
                if let Some((_, m, _)) = &self.msix {
                    m.pba_read(o, data);
                }
            }
            None => {
                let r = self
                    .region_at(bar, offset, data.len())
                    .and_then(|at| self.handles.device.read_at(data, at));
                if let Err(e) = r {
                    guest_log!(
                        Warn,
                        "VFIO device {}: BAR {bar} read at {offset:#x}: {e}",
                        self.bdf()
                    );
                    data.fill(0xff);
                }
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_part(bar, offset) {
            Some((true, o)) => {
                self.collect_msix();
                if let Some((_, m, _)) = &mut self.msix {
                    m.table_write(o, data);
                }
                self.sync_msix();
            }
            // The PBA is read-only.
            Some((false, _)) => {}
            None => {
                let r = self
                    .region_at(bar, offset, data.len())
                    .and_then(|at| self.handles.device.write_at(data, at));
                if let Err(e) = r {
                    guest_log!(
                        Warn,
                        "VFIO device {}: BAR {bar} write at {offset:#x}: {e}",
                        self.bdf()
                    );
                }
            }
        }
    }
}

impl Drop for VfioPci {
    /// The memslots go before the mappings they point into.
    fn drop(&mut self) {
        for bar in self.bars.iter_mut().flatten() {
            bar.place(&*self.mapper, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msi::tests::{msg, Recorder};
    use crate::vfio::ioctl::{Device, RegionInfo};
    use crate::vfio::probe::tests::{edu_config, mmap_region};
    use crate::vfio::probe::Layout;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    /// A regular file stands in for the device descriptor: config space at
    /// offset 0, each BAR region at `(index + 1) << 20`. Reads and writes of
    /// regions, and mmap, work on it as on a device; SET_IRQS does not (the
    /// interrupt lines are tested in `irqs.rs`).
    struct Fake {
        file: File,
        path: std::path::PathBuf,
    }

    impl Fake {
        fn new(tag: &str, config: &[u8]) -> Fake {
            let path = std::env::temp_dir().join(format!("molt-vfio-{tag}-{}", std::process::id()));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            file.set_len(8 << 20).unwrap();
            file.write_all_at(config, 0).unwrap();
            Fake { file, path }
        }

        fn u16_at(&self, at: u64) -> u16 {
            let mut b = [0u8; 2];
            self.file.read_exact_at(&mut b, at).unwrap();
            u16::from_le_bytes(b)
        }

        fn bytes(&self, at: u64, n: usize) -> Vec<u8> {
            let mut b = vec![0u8; n];
            self.file.read_exact_at(&mut b, at).unwrap();
            b
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn region(index: u64, size: u64, mmap: bool) -> RegionInfo {
        let r = mmap_region(size, (index + 1) << 20);
        if mmap {
            r
        } else {
            RegionInfo { flags: 3, ..r }
        }
    }

    /// A memslot change: slot, guest address, length, host address, and the
    /// device's command register at that moment.
    type SlotCall = (u32, u64, u64, usize, u16);

    /// Every memslot change.
    struct Slots {
        hw: File,
        calls: Mutex<Vec<SlotCall>>,
    }

    impl MemoryMapper for Slots {
        unsafe fn set_slot(
            &self,
            slot: u32,
            gpa: u64,
            host: *mut u8,
            len: u64,
        ) -> std::io::Result<()> {
            let mut b = [0u8; 2];
            self.hw.read_exact_at(&mut b, COMMAND as u64).unwrap();
            let cmd = u16::from_le_bytes(b);
            self.calls
                .lock()
                .unwrap()
                .push((slot, gpa, len, host as usize, cmd));
            Ok(())
        }
    }

    impl Slots {
        fn take(&self) -> Vec<SlotCall> {
            std::mem::take(&mut self.calls.lock().unwrap())
        }
    }

    struct Rig {
        dev: VfioPci,
        fake: Fake,
        routes: Arc<Recorder>,
        slots: Arc<Slots>,
        /// The other ends of the device's irqfds and parked eventfds.
        irqfds: Vec<EventFd>,
        parked: Vec<EventFd>,
    }

    fn rig(tag: &str, config: Vec<u8>, regions: &[RegionInfo], bars: [u64; NUM_BARS]) -> Rig {
        let fake = Fake::new(tag, &config);
        on(fake, config, regions, bars, false)
    }

    /// A function on the device `fake` (config space `config`), opened at
    /// boot or `adopted` from a live update.
    fn on(
        fake: Fake,
        config: Vec<u8>,
        regions: &[RegionInfo],
        bars: [u64; NUM_BARS],
        adopted: bool,
    ) -> Rig {
        let layout = Layout::parse(config, 0, regions).unwrap();
        let n = layout.msi_vectors() + layout.msix_vectors();
        let fds = || -> Vec<EventFd> {
            (0..n)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect()
        };
        let (irqfds, parked) = (fds(), fds());
        let dup = |v: &[EventFd]| v.iter().map(|e| e.try_clone().unwrap()).collect();
        let handles = DeviceHandles {
            bdf: "0000:00:04.0".parse().unwrap(),
            device: Device::new(fake.file.try_clone().unwrap().into()),
            layout,
            irqfds: dup(&irqfds),
            parked: dup(&parked),
        };
        let routes = Arc::new(Recorder::default());
        let slots = Arc::new(Slots {
            hw: fake.file.try_clone().unwrap(),
            calls: Mutex::new(Vec::new()),
        });
        let res = Resources {
            bars,
            gsis: (30..30 + n as u32).collect(),
            router: routes.clone(),
            mapper: slots.clone(),
            first_slot: 8,
            adopted,
        };
        let dev = VfioPci::new(handles, res).unwrap();
        Rig {
            dev,
            fake,
            routes,
            slots,
            irqfds,
            parked,
        }
    }

    const EDU_BAR: u64 = 0xc010_0000;

    fn edu(tag: &str) -> Rig {
        let (c, regions, bars) = edu_parts();
        rig(tag, c, &regions, bars)
    }

    fn edu_parts() -> (Vec<u8>, Vec<RegionInfo>, [u64; NUM_BARS]) {
        let mut c = edu_config();
        c[HEADER_TYPE] = 0x80; // multi-function on the host
        c[COMMAND] = 0x07; // as a previous user left it
        let mut regions = vec![RegionInfo::default(); NUM_BARS];
        regions[0] = region(0, 1 << 20, true);
        let mut bars = [0; NUM_BARS];
        bars[0] = EDU_BAR;
        (c, regions, bars)
    }

    fn read(d: &mut VfioPci, offset: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        d.config_read(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn write(d: &mut VfioPci, offset: usize, value: u32, len: usize) {
        d.config_write(offset, &value.to_le_bytes()[..len]);
    }

    #[test]
    fn config_space_is_the_device_s_but_for_what_molt_virtualizes() {
        let Rig { mut dev, fake, .. } = edu("config");
        assert_eq!(
            read(&mut dev, 0, 4),
            0x11e8_1234,
            "identity from the device"
        );
        assert_eq!(
            fake.u16_at(COMMAND as u64),
            COMMAND_INTX_DISABLE,
            "device quiet at start"
        );
        assert_eq!(read(&mut dev, COMMAND, 2), 0);
        assert_eq!(read(&mut dev, HEADER_TYPE, 1), 0, "one function");
        assert_eq!(read(&mut dev, BAR0, 4), EDU_BAR as u32);
        assert_eq!(read(&mut dev, 0x3d, 1), 0, "no INTx pin");
        write(&mut dev, ROM_BAR, u32::MAX, 4);
        assert_eq!(read(&mut dev, ROM_BAR, 4), 0, "no ROM");
        // BAR sizing, then back.
        write(&mut dev, BAR0, u32::MAX, 4);
        assert_eq!(read(&mut dev, BAR0, 4), 0xfff0_0000);
        write(&mut dev, BAR0, EDU_BAR as u32, 4);
        assert_eq!(dev.config().bar(0), Some((EDU_BAR, 1 << 20)));
        assert_eq!(
            fake.bytes(BAR0 as u64, 4),
            [0; 4],
            "the device's BAR is untouched"
        );
        // Other registers pass through, bounded by the end of config space.
        write(&mut dev, 0x60, 0x0403_0201, 4);
        assert_eq!(fake.bytes(0x60, 4), [1, 2, 3, 4]);
        assert_eq!(read(&mut dev, 0x61, 2), 0x0302);
        dev.config_write(254, &[9, 9, 9, 9]);
        assert_eq!(
            fake.bytes(254, 4),
            [9, 9, 0, 0],
            "nothing past config space"
        );
        let mut d = [0u8; 4];
        dev.config_read(254, &mut d);
        assert_eq!(d, [9, 9, 0xff, 0xff]);
        dev.config_read(usize::MAX, &mut d);
        assert_eq!(d, [0xff; 4]);
        dev.config_write(usize::MAX - 1, &[1, 2, 3, 4]);
        dev.config_write(4096, &[1]);
    }

    #[test]
    fn memory_decoding_maps_the_bar_once_the_device_decodes() {
        let Rig {
            mut dev,
            fake,
            slots,
            ..
        } = edu("decode");
        fake.file.write_all_at(&[0xed, 0, 0, 1], 1 << 20).unwrap();
        assert!(slots.take().is_empty(), "not decoding yet");
        write(
            &mut dev,
            COMMAND,
            u32::from(COMMAND_MEMORY | COMMAND_MASTER),
            2,
        );
        let on = COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE;
        assert_eq!(fake.u16_at(COMMAND as u64), on);
        let calls = slots.take();
        assert_eq!(calls.len(), 1);
        let (slot, gpa, len, host, cmd) = calls[0];
        assert_eq!(
            (slot, gpa, len, cmd),
            (8, EDU_BAR, 1 << 20, on),
            "after the device decodes"
        );
        // SAFETY: the Bar's mapping of the region is alive while `dev` is.
        let id = unsafe { std::ptr::read_volatile(host as *const u32) };
        assert_eq!(id, 0x0100_00ed, "the memslot maps the BAR's region");
        // The guest moves the BAR while decoding: unmapped, mapped again.
        write(&mut dev, BAR0, 0xc020_0000, 4);
        let calls: Vec<_> = slots.take().iter().map(|c| (c.0, c.1, c.2)).collect();
        assert_eq!(calls, [(8, 0, 0), (8, 0xc020_0000, 1 << 20)]);
        // Decoding off: the memslot goes while the device still decodes.
        write(&mut dev, COMMAND, u32::from(COMMAND_MASTER), 2);
        let calls = slots.take();
        assert_eq!((calls[0].2, calls[0].4), (0, on));
        assert_eq!(
            fake.u16_at(COMMAND as u64),
            COMMAND_MASTER | COMMAND_INTX_DISABLE
        );
        // Dropping the function empties nothing more: nothing is mapped.
        drop(dev);
        assert!(slots.take().is_empty());
    }

    #[test]
    fn msi_is_virtualized_and_routed() {
        let Rig {
            mut dev,
            fake,
            routes,
            irqfds,
            parked,
            ..
        } = edu("msi");
        let before = fake.bytes(0x40, 16);
        write(&mut dev, 0x44, 0xfee0_0000, 4);
        write(&mut dev, 0x48, 0, 4);
        write(&mut dev, 0x4c, 0x4041, 2);
        write(&mut dev, 0x42, 1, 2);
        assert_eq!(
            fake.bytes(0x40, 16),
            before,
            "the device's MSI registers are VFIO's"
        );
        assert_eq!(read(&mut dev, 0x42, 2), 0x81, "enabled, 64-bit");
        assert_eq!(read(&mut dev, 0x44, 4), 0xfee0_0000);
        assert_eq!(routes.calls(), [vec![(30, msg(0xfee0_0000, 0x4041))]]);
        // An interrupt VFIO parked (while the vector could not fire) is
        // collected and fires once the vector is live.
        parked[0].write(1).unwrap();
        read(&mut dev, 0x42, 2);
        assert_eq!(irqfds[0].read().unwrap(), 1);
    }

    #[test]
    fn an_adopted_function_takes_the_saved_state_without_touching_the_device() {
        let Rig {
            dev: mut old, fake, ..
        } = edu("adopt");
        let decoding = COMMAND_MEMORY | COMMAND_MASTER;
        write(&mut old, COMMAND, u32::from(decoding), 2);
        write(&mut old, 0x44, 0xfee0_1000, 4);
        write(&mut old, 0x4c, 0x4051, 2);
        write(&mut old, 0x42, 1, 2);
        let saved = old.state();
        assert_eq!(saved.config.len(), CONFIG_SIZE);
        assert!(saved.msix.is_none());
        let hw = fake.u16_at(COMMAND as u64);
        assert_eq!(hw, decoding | COMMAND_INTX_DISABLE);
        // The old process lets go of the function (its memslots go); the
        // device and its eventfds stay, handed over.
        drop(old);
        let (c, regions, bars) = edu_parts();
        let mut c = c;
        c[COMMAND..COMMAND + 2].copy_from_slice(&hw.to_le_bytes());
        let Rig {
            mut dev,
            fake,
            routes,
            slots,
            irqfds,
            ..
        } = on(fake, c, &regions, bars, true);
        assert_eq!(fake.u16_at(COMMAND as u64), hw, "adopting writes nothing");
        assert!(slots.take().is_empty(), "nothing mapped before the state");
        dev.restore(&saved).unwrap();
        assert_eq!(read(&mut dev, COMMAND, 2), u32::from(decoding));
        assert_eq!(read(&mut dev, 0x44, 4), 0xfee0_1000);
        assert_eq!(read(&mut dev, 0x42, 2), 0x81);
        assert_eq!(routes.calls(), [vec![(30, msg(0xfee0_1000, 0x4051))]]);
        assert_eq!(fake.u16_at(COMMAND as u64), hw, "the device is untouched");
        let calls: Vec<_> = slots.take().iter().map(|c| (c.0, c.1, c.2)).collect();
        assert_eq!(calls, [(8, EDU_BAR, 1 << 20)], "the BAR is mapped again");
        assert!(irqfds[0].read().is_err(), "no interrupt made up");
        assert_eq!(dev.state(), saved);
        // Another device's state is refused.
        let mut other = saved.clone();
        other.config[2] ^= 1;
        let e = dev.restore(&other).unwrap_err().to_string();
        assert!(e.starts_with("saved state: config space"), "{e}");
        let mut msix = saved;
        msix.msix = Some(MsixState::default());
        let e = dev.restore(&msix).unwrap_err().to_string();
        assert!(e.contains("MSI-X saved on"), "{e}");
    }

    #[test]
    fn msix_table_and_pba_are_emulated_the_rest_passes_through() {
        let mut c = edu_config();
        c[0x41] = 0x50;
        c[0x50] = crate::pci::msix::CAP_ID;
        c[0x52..0x54].copy_from_slice(&15u16.to_le_bytes()); // 16 vectors
        c[0x54..0x58].copy_from_slice(&0x2000u32.to_le_bytes()); // BAR 0 + 0x2000
        c[0x58..0x5c].copy_from_slice(&0x3000u32.to_le_bytes());
        let mut regions = vec![RegionInfo::default(); NUM_BARS];
        regions[0] = region(0, 0x10000, true);
        regions[2] = region(2, 0x100, false);
        let mut bars = [0; NUM_BARS];
        bars[0] = 0xc000_0000;
        bars[2] = 0xc001_0000;
        let Rig {
            mut dev,
            fake,
            routes,
            slots,
            irqfds,
            parked,
        } = rig("msix", c, &regions, bars);
        assert_eq!(read(&mut dev, 0x52, 2), 7, "8 vectors offered");
        // Decoding maps BAR 0 around the table and PBA pages; BAR 2 traps.
        write(&mut dev, COMMAND, u32::from(COMMAND_MEMORY), 2);
        let calls: Vec<_> = slots.take().iter().map(|c| (c.0, c.1, c.2)).collect();
        assert_eq!(calls, [(8, 0xc000_0000, 0x2000), (9, 0xc000_4000, 0xc000)]);
        // Table writes stay in molt.
        let table = 0x2000;
        dev.bar_write(0, table, &0xfee0_0000u32.to_le_bytes());
        dev.bar_write(0, table + 8, &0x4055u32.to_le_bytes());
        assert_eq!(fake.bytes((1 << 20) + table, 16), [0; 16]);
        let mut d = [0u8; 4];
        dev.bar_read(0, table + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4055);
        dev.bar_read(0, table + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "masked at reset");
        // Enabled with vector 0 masked: an interrupt VFIO parks shows in the PBA.
        write(&mut dev, 0x52, 0x8000, 2);
        assert!(routes.calls().is_empty());
        parked[1].write(1).unwrap(); // MSI's one vector comes first
        dev.bar_read(0, 0x3000, &mut d);
        assert_eq!(d[0], 1, "pending");
        dev.bar_write(0, table + 12, &0u32.to_le_bytes());
        assert_eq!(routes.calls(), [vec![(31, msg(0xfee0_0000, 0x4055))]]);
        assert_eq!(irqfds[1].read().unwrap(), 1, "delivered at unmask");
        dev.bar_read(0, 0x3000, &mut d);
        assert_eq!(d[0], 0);
        // The rest of BAR 0, and the trapped BAR 2, are the device's.
        dev.bar_write(0, 0x100, &[1, 2, 3, 4]);
        assert_eq!(fake.bytes((1 << 20) + 0x100, 4), [1, 2, 3, 4]);
        dev.bar_write(2, 0xfc, &[5, 6, 7, 8]);
        assert_eq!(fake.bytes((3 << 20) + 0xfc, 4), [5, 6, 7, 8]);
        dev.bar_read(2, 0xfc, &mut d);
        assert_eq!(d, [5, 6, 7, 8]);
        // Past the end of the BAR: nothing written, all-ones read.
        dev.bar_write(2, 0xfe, &[9, 9, 9, 9]);
        assert_eq!(fake.bytes((3 << 20) + 0xfc, 4), [5, 6, 7, 8]);
        dev.bar_read(2, 0xfe, &mut d);
        assert_eq!(d, [0xff; 4]);
        dev.bar_read(5, 0, &mut d);
        assert_eq!(d, [0xff; 4], "no such BAR");
        // The function goes: its memslots first.
        drop(dev);
        let calls: Vec<_> = slots.take().iter().map(|c| (c.0, c.2)).collect();
        assert_eq!(calls, [(8, 0), (9, 0)]);
    }
}
