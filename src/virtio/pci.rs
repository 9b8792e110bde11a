//! The virtio-pci modern transport (virtio v1.2, 4.1): a PCI function whose BAR 0
//! holds the common configuration, ISR, device configuration and notification
//! regions plus the MSI-X table, described by vendor capabilities.
//!
//! Queue notifications normally never reach this code: each queue's notify
//! address is a KVM ioeventfd watched by the event loop. A write that does reach
//! it (the ioeventfd missed, e.g. after the guest moved the BAR) kicks the same
//! eventfd, so there is one notification path.

use std::fmt;
use std::sync::{Arc, Mutex};

use heapless::Vec as BoundedVec;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    restore_queues, ring_extents, DeviceState, Interrupt, QueueError, QueueSet, QueueStateV1,
    Served, VirtioDevice, MAX_QUEUES, TYPE_BLOCK, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::pci::config::{self, ConfigSpace, Header};
use crate::pci::msi::{MsiRouter, Vectors};
use crate::pci::msix::{self, Msix, MsixState};
use crate::pci::PciFunction;
use crate::ratelimit::guest_log;
use crate::sync::lock;

/// BAR 0 layout.
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notify addresses (notify_off_multiplier).
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
pub const BAR_SIZE: u64 = 0x8000;

/// virtio_pci_cap cfg_type values (4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_VENDOR: u8 = 0x09;

/// Device status bits (2.1).
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;

/// "No vector" for msix_config and queue_msix_vector.
const NO_VECTOR: u16 = 0xffff;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Interrupt state shared by the transport and the handle the device holds.
struct Irq {
    msix: Msix,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    isr: u8,
}

struct PciInterrupt(Arc<Mutex<Irq>>);

impl Interrupt for PciInterrupt {
    fn queue(&self, index: usize) {
        let mut irq = lock(&self.0);
        irq.isr |= ISR_QUEUE;
        if let Some(&v) = irq.queue_vectors.get(index) {
            irq.msix.trigger(v);
        }
    }
}

impl Irq {
    /// A configuration change, here only DEVICE_NEEDS_RESET (2.1.2).
    fn config_changed(&mut self) {
        self.isr |= ISR_CONFIG;
        let v = self.config_vector;
        self.msix.trigger(v);
    }
}

/// The resources a virtio-pci function was given, all fixed at creation.
pub struct Resources {
    pub bar_addr: u64,
    pub gsis: Vec<u32>,
    pub irqfds: Vec<EventFd>,
    pub router: Arc<dyn MsiRouter>,
}

/// Vectors a device needs: one per queue plus one for configuration changes.
pub fn vectors_needed(device: &dyn VirtioDevice) -> u32 {
    device.queue_max_sizes().len() as u32 + 1
}

/// Why a saved virtio-pci function does not fit this one.
#[derive(Debug)]
pub enum Error {
    /// The queue registers, or the device's live queues.
    Queues(QueueError),
    /// Not one MSI-X vector number per queue.
    QueueVectors {
        saved: usize,
        queues: usize,
    },
    /// The features the device accepted (FEATURES_OK) include some it does
    /// not offer.
    Features {
        saved: u64,
        offered: u64,
    },
    /// A queue or the configuration names a vector past the MSI-X table.
    Vector {
        vector: u16,
        vectors: u16,
    },
    Config(config::Error),
    Msix(msix::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Queues(e) => e.fmt(f),
            Error::QueueVectors { saved, queues } => write!(
                f,
                "{saved} queue vectors saved, the device has {queues} queues"
            ),
            Error::Features { saved, offered } => write!(
                f,
                "state's features {saved:#x} exceed the device's {offered:#x}"
            ),
            Error::Vector { vector, vectors } => write!(
                f,
                "state names MSI-X vector {vector}, the device has {vectors}"
            ),
            Error::Config(e) => e.fmt(f),
            Error::Msix(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

/// Version 1 of a virtio-pci function's saved state: its PCI config space, the
/// transport registers, MSI-X, and the device's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportStateV1 {
    pub config: BoundedVec<u8, 256>,
    pub status: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    /// The queue registers as the driver programmed them.
    pub queues: BoundedVec<QueueStateV1, MAX_QUEUES>,
    pub active: bool,
    /// The device's own state (`VirtioDevice::state`): its live queues,
    /// indices advanced, while active.
    pub device_queues: DeviceState,
    pub msix: MsixState,
    pub queue_vectors: BoundedVec<u16, MAX_QUEUES>,
    pub config_vector: u16,
    pub isr: u8,
}

/// The version this release saves and restores.
pub type TransportState = TransportStateV1;

pub struct VirtioPci {
    config: ConfigSpace,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    irq: Arc<Mutex<Irq>>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    queue_select: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    active: bool,
}

impl VirtioPci {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        res: Resources,
    ) -> std::io::Result<Self> {
        let kind = device.device_type();
        let class = match kind {
            TYPE_NET => 0x02_00_00,
            TYPE_BLOCK => 0x01_80_00,
            _ => 0xff_00_00,
        };
        let mut config = ConfigSpace::new(&Header {
            vendor: 0x1af4,
            device: 0x1040 + kind,
            revision: 1,
            class,
            subsystem_vendor: 0x1af4,
            subsystem_id: 0x40,
        });
        config.set_bar(0, res.bar_addr as u32, BAR_SIZE as u32);
        let nq = device.queue_max_sizes().len() as u64;
        let cap = |cfg_type: u8, offset: u64, len: u64, extra: &[u8]| {
            let mut body = vec![16 + extra.len() as u8, cfg_type, 0, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(len as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        for body in [
            cap(CAP_COMMON, COMMON_OFFSET, COMMON_LEN, &[]),
            cap(CAP_ISR, ISR_OFFSET, 1, &[]),
            cap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_LEN, &[]),
            cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                nq * NOTIFY_MULTIPLIER,
                &(NOTIFY_MULTIPLIER as u32).to_le_bytes(),
            ),
        ] {
            config.add_capability(CAP_VENDOR, &body, &[]);
        }
        let msix = Msix::new(Vectors::new(res.gsis, res.irqfds, res.router));
        let msix_cap = config.add_capability(
            msix::CAP_ID,
            &msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32),
            &Msix::capability_writable(),
        );
        let notify = (0..nq)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<std::io::Result<Vec<_>>>()?;
        let queues = fresh_queues(device.as_ref());
        Ok(VirtioPci {
            config,
            msix_cap,
            irq: Arc::new(Mutex::new(Irq {
                msix,
                queue_vectors: vec![NO_VECTOR; nq as usize],
                config_vector: NO_VECTOR,
                isr: 0,
            })),
            device,
            mem,
            queues,
            notify,
            queue_select: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            active: false,
        })
    }

    /// The eventfd signalled when queue `q` is notified, and its guest address.
    pub fn notifiers(&self) -> Vec<(&EventFd, u64)> {
        let base = self.config.bar(0).map_or(0, |b| b.0);
        self.notify
            .iter()
            .enumerate()
            .map(|(q, e)| (e, base + NOTIFY_OFFSET + q as u64 * NOTIFY_MULTIPLIER))
            .collect()
    }

    /// The event loop saw queue `q`'s notifier fire. Work left over by the
    /// device's budget re-arms the notifier (the loop polls it level-triggered),
    /// so the queue is served again on the next turn, after the events already
    /// waiting.
    pub fn queue_notify(&mut self, q: usize) {
        let Some(evt) = self.notify.get(q) else {
            return;
        };
        let _ = evt.read();
        if self.active && self.device.queue_notify(q) == Served::More {
            let _ = evt.write(1);
        }
    }

    /// Before a save: serves each queue once more (one budget) and flushes the
    /// device. Nothing is in flight either way: a chain is either complete in the
    /// used ring or untouched in the avail ring, where the next process finds it
    /// (`kick_all`) or, if the update fails, this one (its notifier is re-armed).
    /// Not serving the whole backlog keeps a guest with a full queue from
    /// lengthening the pause.
    pub fn quiesce(&mut self) -> std::io::Result<()> {
        for q in 0..self.queues.len() {
            self.queue_notify(q);
        }
        self.device.flush()
    }

    /// After a restore or at start: serves any queue whose kick was lost with the
    /// old process (a kick is an edge; the work it announced is still there).
    pub fn kick_all(&mut self) {
        for q in 0..self.queues.len() {
            self.queue_notify(q);
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn state(&self) -> TransportState {
        let irq = lock(&self.irq);
        TransportState {
            config: self.config.bytes().iter().copied().collect(),
            status: self.status,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(QueueStateV1::from).collect(),
            active: self.active,
            device_queues: self.device.state(),
            msix: irq.msix.state(),
            queue_vectors: irq.queue_vectors.iter().copied().collect(),
            config_vector: irq.config_vector,
            isr: irq.isr,
        }
    }

    /// Rebuilds the transport and device from `s`, checking every value against
    /// what this device is; a running device restores its own live queues
    /// (`VirtioDevice::restore`) and each queue's interrupt is raised once (a
    /// spurious interrupt is harmless, a lost one stalls the driver). The
    /// transport's own values are all checked before any is taken; after an
    /// error from the config space, MSI-X or the device, the function is
    /// part-restored and its machine is not run (`vm::Prepared::restore`).
    pub fn restore(&mut self, s: &TransportState) -> Result<(), Error> {
        let nq = self.queues.len();
        let offered = self.offered_features();
        let vectors = lock(&self.irq).msix.vectors();
        let queues = restore_queues(
            QueueSet::Registers,
            &s.queues,
            self.device.queue_max_sizes(),
        )
        .map_err(Error::Queues)?;
        if s.queue_vectors.len() != nq {
            return Err(Error::QueueVectors {
                saved: s.queue_vectors.len(),
                queues: nq,
            });
        }
        // Before FEATURES_OK the register holds whatever the driver wrote: only
        // accepted features must be offered ones.
        if s.status & STATUS_FEATURES_OK != 0 && s.driver_features & !offered != 0 {
            return Err(Error::Features {
                saved: s.driver_features,
                offered,
            });
        }
        let vector_ok = |v: u16| v < vectors || v == NO_VECTOR;
        if let Some(&vector) = s
            .queue_vectors
            .iter()
            .chain([&s.config_vector])
            .find(|&&v| !vector_ok(v))
        {
            return Err(Error::Vector { vector, vectors });
        }
        self.config
            .restore_bytes(&s.config)
            .map_err(Error::Config)?;
        {
            let mut irq = lock(&self.irq);
            irq.msix.restore(&s.msix).map_err(Error::Msix)?;
            irq.queue_vectors.copy_from_slice(&s.queue_vectors);
            irq.config_vector = s.config_vector;
            irq.isr = s.isr;
        }
        self.queues = queues;
        self.status = s.status;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        if s.status & STATUS_FEATURES_OK != 0 {
            self.device.ack_features(s.driver_features);
        }
        if s.active {
            let irq = Box::new(PciInterrupt(self.irq.clone()));
            self.device
                .restore(self.mem.clone(), &s.device_queues, irq)
                .map_err(Error::Queues)?;
            self.active = true;
            let irq = PciInterrupt(self.irq.clone());
            for q in 0..nq {
                irq.queue(q);
            }
        }
        Ok(())
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = fresh_queues(self.device.as_ref());
        let mut irq = lock(&self.irq);
        irq.msix.reset();
        irq.queue_vectors.fill(NO_VECTOR);
        irq.config_vector = NO_VECTOR;
        irq.isr = 0;
        drop(irq);
        // The MSI-X enable/mask bits live in config space too.
        let ctl = self.msix_cap + 2;
        let bytes = self.config.read_u16(ctl) & 0x07ff;
        self.config.set_bytes(ctl, &bytes.to_le_bytes());
        self.queue_select = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.active = false;
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let f = self.driver_features;
            if f & !self.offered_features() != 0 || f & VIRTIO_F_VERSION_1 == 0 {
                // Left clear: the driver reads the status back and gives up.
                value &= !STATUS_FEATURES_OK;
            } else {
                self.device.ack_features(f);
            }
        }
        if value & STATUS_DRIVER_OK != 0 && !self.active && value & STATUS_FEATURES_OK != 0 {
            let bad = self
                .queues
                .iter()
                .position(|q| q.ready() && !rings_in_ram(q, &self.mem));
            if let Some(q) = bad {
                guest_log!(Warn, "virtio: queue {q} is enabled with rings outside RAM");
                value |= STATUS_NEEDS_RESET;
                lock(&self.irq).config_changed();
            } else {
                let irq = Box::new(PciInterrupt(self.irq.clone()));
                // The device gets its own copies; the registers keep reading back.
                let queues = self
                    .queues
                    .iter()
                    .map(|q| Queue::try_from(q.state()))
                    .collect::<Result<Vec<_>, _>>();
                match queues {
                    Ok(queues) => {
                        self.device.activate(self.mem.clone(), queues, irq);
                        self.active = true;
                    }
                    Err(e) => {
                        guest_log!(Warn, "virtio: queue state rejected: {e}");
                        value |= STATUS_NEEDS_RESET;
                        lock(&self.irq).config_changed();
                    }
                }
            }
        }
        self.status = value;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&mut self, offset: u64, len: usize) -> u64 {
        let q = usize::from(self.queue_select);
        let irq = lock(&self.irq);
        let queue = self.queues.get(q);
        let qval = |f: fn(&Queue) -> u64| queue.map_or(0, f);
        match (offset, len) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.offered_features() & 0xffff_ffff,
                1 => self.offered_features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(irq.config_vector),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => 0,
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => qval(|q| u64::from(q.size())),
            (0x1a, 2) => irq.queue_vectors.get(q).map_or(0, |&v| u64::from(v)),
            (0x1c, 2) => qval(|q| u64::from(q.ready())),
            (0x1e, 2) => q as u64,
            (0x20, 4) => qval(|q| q.desc_table() & 0xffff_ffff),
            (0x24, 4) => qval(|q| q.desc_table() >> 32),
            (0x28, 4) => qval(|q| q.avail_ring() & 0xffff_ffff),
            (0x2c, 4) => qval(|q| q.avail_ring() >> 32),
            (0x30, 4) => qval(|q| q.used_ring() & 0xffff_ffff),
            (0x34, 4) => qval(|q| q.used_ring() >> 32),
            _ => 0,
        }
    }

    fn common_write(&mut self, offset: u64, len: usize, v: u64) {
        // Queue layout is frozen once the device runs (4.1.4.3.2).
        let frozen = self.active;
        let sel = self.queue_select;
        let v32 = v as u32;
        match (offset, len) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            (0x10, 2) => {
                let mut irq = lock(&self.irq);
                irq.config_vector = valid_vector(v as u16, irq.msix.vectors());
            }
            (0x14, 1) => self.set_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if !frozen => {
                if let Some(q) = self.selected_queue() {
                    if let Err(e) = q.try_set_size(v as u16) {
                        guest_log!(Warn, "virtio: queue {sel} size {v}: {e}");
                    }
                }
            }
            (0x1a, 2) => {
                let q = usize::from(self.queue_select);
                let mut irq = lock(&self.irq);
                let n = irq.msix.vectors();
                if let Some(slot) = irq.queue_vectors.get_mut(q) {
                    *slot = valid_vector(v as u16, n);
                }
            }
            (0x1c, 2) if !frozen && v == 1 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(true);
                }
            }
            (0x20..=0x34, 4) if !frozen => {
                // Each address is two registers: replace the half written.
                let shift = if offset.is_multiple_of(8) { 0 } else { 32 };
                let merge = |old: u64| {
                    GuestAddress((old & !(0xffff_ffff << shift)) | (u64::from(v32) << shift))
                };
                if let Some(q) = self.selected_queue() {
                    let set = match offset & !7 {
                        0x20 => q.try_set_desc_table_address(merge(q.desc_table())),
                        0x28 => q.try_set_avail_ring_address(merge(q.avail_ring())),
                        _ => q.try_set_used_ring_address(merge(q.used_ring())),
                    };
                    if let Err(e) = set {
                        guest_log!(
                            Warn,
                            "virtio: queue {sel} register {offset:#x} = {v32:#x}: {e}"
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

/// Whether `q`'s rings lie in guest RAM. `QueueT::is_valid` checks the same but
/// logs an error each time, as often as the guest retries.
fn rings_in_ram(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    ring_extents(q.size(), q.desc_table(), q.avail_ring(), q.used_ring())
        .into_iter()
        .all(|(_, addr, len)| mem.check_range(GuestAddress(addr), len as usize))
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
        .collect()
}

/// A vector number the guest may use, or NO_VECTOR (read back as refusal).
fn valid_vector(v: u16, vectors: u16) -> u16 {
    if v < vectors {
        v
    } else {
        NO_VECTOR
    }
}

fn to_u64(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl PciFunction for VirtioPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let ctl = self.msix_cap + 2;
        if offset < ctl + 2 && offset + data.len() > ctl {
            lock(&self.irq).msix.set_control(self.config.read_u16(ctl));
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => {
                let v = self.common_read(o - COMMON_OFFSET, data.len());
                let n = data.len().min(8);
                data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
            ISR_OFFSET if data.len() == 1 => {
                // Reading the ISR acknowledges it (4.1.4.5).
                let mut irq = lock(&self.irq);
                data[0] = irq.isr;
                irq.isr = 0;
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.irq).msix.table_read(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.irq).msix.pba_read(o - MSIX_PBA_OFFSET, data);
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => {
                self.common_write(o - COMMON_OFFSET, data.len(), to_u64(data));
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                let q = ((o - NOTIFY_OFFSET) / NOTIFY_MULTIPLIER) as usize;
                if let Some(evt) = self.notify.get(q) {
                    let _ = evt.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.irq)
                    .msix
                    .table_write(o - MSIX_TABLE_OFFSET, data);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msi::NoRoutes;
    use crate::ratelimit::{capture, BUDGET};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Calls {
        acked: AtomicUsize,
        activated: AtomicUsize,
        notified: AtomicUsize,
        resets: AtomicUsize,
        /// Notifications still to answer with `Served::More`.
        more: AtomicUsize,
    }

    /// Counts its calls; keeps its live queues, and serving a queue consumes
    /// one chain of it (without looking at guest memory).
    struct Dummy(Arc<Calls>, Option<Box<dyn Interrupt>>, Vec<Queue>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u16 {
            TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << 9
        }
        fn ack_features(&mut self, _: u64) {
            self.0.acked.fetch_add(1, Ordering::SeqCst);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: GuestMemoryMmap, q: Vec<Queue>, irq: Box<dyn Interrupt>) {
            assert_eq!(q.len(), 2);
            self.1 = Some(irq);
            self.2 = q;
            self.0.activated.fetch_add(1, Ordering::SeqCst);
        }
        fn queue_notify(&mut self, q: usize) -> Served {
            self.0.notified.fetch_add(1, Ordering::SeqCst);
            if let Some(live) = self.2.get_mut(q) {
                live.set_next_avail(live.next_avail().wrapping_add(1));
                live.set_next_used(live.next_used().wrapping_add(1));
            }
            if let Some(irq) = &self.1 {
                irq.queue(q);
            }
            let more = self
                .0
                .more
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if more.is_ok() {
                Served::More
            } else {
                Served::All
            }
        }
        fn reset(&mut self) {
            self.1 = None;
            self.2.clear();
            self.0.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn state(&self) -> DeviceState {
            self.2.iter().map(QueueStateV1::from).collect()
        }
        fn backend_fd(&self) -> std::os::fd::RawFd {
            -1
        }
    }

    fn device() -> (VirtioPci, Arc<Calls>, Vec<EventFd>) {
        let calls = Arc::new(Calls::default());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irqfds: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let res = Resources {
            bar_addr: 0xc000_0000,
            gsis: vec![24, 25, 26],
            irqfds: irqfds.iter().map(|e| e.try_clone().unwrap()).collect(),
            router: Arc::new(NoRoutes),
        };
        let dev =
            VirtioPci::new(Box::new(Dummy(calls.clone(), None, Vec::new())), mem, res).unwrap();
        (dev, calls, irqfds)
    }

    fn write(d: &mut VirtioPci, offset: u64, value: u64, len: usize) {
        d.bar_write(0, offset, &value.to_le_bytes()[..len]);
    }

    fn read(d: &mut VirtioPci, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Queue q at a valid layout in the first 64 KiB of RAM.
    fn setup_queue(d: &mut VirtioPci, q: u64) {
        write(d, 0x16, q, 2);
        write(d, 0x20, 0x1000 + q * 0x1000, 4);
        write(d, 0x28, 0x8000 + q * 0x1000, 4);
        write(d, 0x30, 0x10000 + q * 0x1000, 4);
        write(d, 0x1a, q, 2);
        write(d, 0x1c, 1, 2);
    }

    fn negotiate(d: &mut VirtioPci, features: u64) -> u8 {
        write(d, 0x14, 1 | 2, 1);
        write(d, 0x08, 0, 4);
        write(d, 0x0c, features & 0xffff_ffff, 4);
        write(d, 0x08, 1, 4);
        write(d, 0x0c, features >> 32, 4);
        write(d, 0x14, 1 | 2 | 8, 1);
        read(d, 0x14, 1) as u8
    }

    #[test]
    fn identity_and_capabilities() {
        let (d, _, _) = device();
        let c = d.config();
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.bar(0), Some((0xc000_0000, BAR_SIZE)));
        assert_eq!(d.notifiers()[1].1, 0xc000_0000 + NOTIFY_OFFSET + 4);
    }

    #[test]
    fn features_outside_the_offer_are_refused() {
        let (mut d, calls, _) = device();
        write(&mut d, 0x00, 1, 4);
        assert_eq!(read(&mut d, 0x04, 4), 1, "VERSION_1 offered");
        assert_eq!(read(&mut d, 0x12, 2), 2, "two queues");
        let status = negotiate(&mut d, VIRTIO_F_VERSION_1 | (1 << 10));
        assert_eq!(status & STATUS_FEATURES_OK, 0);
        assert_eq!(calls.acked.load(Ordering::SeqCst), 0);
        // The refused value stays in the register, and an update carries it
        // (tests/fuzz/pci/crash-*: the restore refused it).
        let (mut fresh, _, _) = device();
        fresh.restore(&d.state()).unwrap();
        assert_eq!(fresh.state(), d.state());
        // Without VERSION_1 a modern device refuses too.
        write(&mut d, 0x14, 0, 1);
        assert_eq!(negotiate(&mut d, 1 << 9) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn activation_notification_and_reset() {
        let (mut d, calls, irqfds) = device();
        assert_ne!(
            negotiate(&mut d, VIRTIO_F_VERSION_1 | (1 << 9)) & STATUS_FEATURES_OK,
            0
        );
        setup_queue(&mut d, 0);
        setup_queue(&mut d, 1);
        write(&mut d, 0x14, 1 | 2 | 4 | 8, 1);
        assert_eq!(calls.activated.load(Ordering::SeqCst), 1);
        // Enable MSI-X and unmask vector 1, then a notify on queue 1 interrupts it.
        let ctl = d.msix_cap + 2;
        d.config_write(ctl, &0x8000u16.to_le_bytes());
        for (off, v) in [(16u64, 0xfee0_0000u32), (20, 0), (24, 0x41), (28, 0)] {
            write(&mut d, MSIX_TABLE_OFFSET + off, u64::from(v), 4);
        }
        write(&mut d, NOTIFY_OFFSET + 4, 1, 2);
        assert_eq!(
            d.notify[1].read().unwrap(),
            1,
            "a notify write kicks the eventfd"
        );
        d.notify[1].write(1).unwrap();
        d.queue_notify(1);
        assert_eq!(calls.notified.load(Ordering::SeqCst), 1);
        assert_eq!(irqfds[1].read().unwrap(), 1);
        // Queue layout is frozen while running.
        write(&mut d, 0x16, 0, 2);
        write(&mut d, 0x20, 0x5000, 4);
        assert_eq!(read(&mut d, 0x20, 4), 0x1000);
        // Reset clears the device and the transport.
        write(&mut d, 0x14, 0, 1);
        assert_eq!(calls.resets.load(Ordering::SeqCst), 1);
        assert_eq!(read(&mut d, 0x14, 1), 0);
        assert_eq!(read(&mut d, 0x1c, 2), 0, "queue disabled");
        assert_eq!(read(&mut d, 0x1a, 2), u64::from(NO_VECTOR));
        assert_eq!(d.config.read_u16(ctl) & 0x8000, 0, "MSI-X disabled");
        d.queue_notify(1);
        assert_eq!(
            calls.notified.load(Ordering::SeqCst),
            1,
            "inactive: ignored"
        );
    }

    #[test]
    fn work_left_over_rearms_the_notifier() {
        let (mut d, calls, _irqfds) = device();
        negotiate(&mut d, VIRTIO_F_VERSION_1 | (1 << 9));
        setup_queue(&mut d, 0);
        setup_queue(&mut d, 1);
        write(&mut d, 0x14, 1 | 2 | 4 | 8, 1);
        // The device's budget runs out twice: the notifier stays readable, so the
        // event loop comes back; then it is consumed.
        calls.more.store(2, Ordering::SeqCst);
        d.notify[0].write(1).unwrap();
        for turn in 1..=3 {
            assert_eq!(d.notify[0].read().unwrap(), 1, "turn {turn}");
            d.notify[0].write(1).unwrap();
            d.queue_notify(0);
        }
        assert_eq!(calls.notified.load(Ordering::SeqCst), 3);
        assert!(d.notify[0].read().is_err(), "nothing left: not re-armed");
        // A save serves each queue once and re-arms what is left for this process,
        // should the update fail.
        calls.more.store(1, Ordering::SeqCst);
        d.quiesce().unwrap();
        assert_eq!(calls.notified.load(Ordering::SeqCst), 5);
        assert_eq!(d.notify[0].read().unwrap(), 1);
        assert!(d.notify[1].read().is_err());
    }

    #[test]
    fn a_flood_of_bad_queue_writes_logs_a_bounded_number_of_lines() {
        let (mut d, calls, _) = device();
        negotiate(&mut d, VIRTIO_F_VERSION_1);
        setup_queue(&mut d, 0);
        let lines = capture::lines_logged(|| {
            for _ in 0..10_000 {
                write(&mut d, 0x18, 3, 2); // not a power of two
                write(&mut d, 0x20, 0x1008, 4); // misaligned
                write(&mut d, 0x28, 0x8001, 4);
                write(&mut d, 0x34, 0x8000_0001, 4); // beyond RAM
                write(&mut d, 0x14, 1 | 2 | 4 | 8, 1);
            }
        })
        .len();
        // Four call sites, each a budget per window: one window, or two if
        // the loop straddled a boundary.
        let most = 4 * 2 * (BUDGET as usize + 1);
        assert!(lines <= most, "{lines} lines for 50,000 bad writes");
        assert_eq!(calls.activated.load(Ordering::SeqCst), 0);
        // Refused writes leave the registers as they were.
        assert_eq!(read(&mut d, 0x18, 2), 16);
        assert_eq!(read(&mut d, 0x20, 4), 0x1000);
        assert_eq!(read(&mut d, 0x28, 4), 0x8000);
    }

    #[test]
    fn bad_vectors_and_layouts_are_refused() {
        let (mut d, calls, _) = device();
        write(&mut d, 0x16, 0, 2);
        write(&mut d, 0x1a, 7, 2);
        assert_eq!(read(&mut d, 0x1a, 2), u64::from(NO_VECTOR));
        write(&mut d, 0x10, 3, 2);
        assert_eq!(read(&mut d, 0x10, 2), u64::from(NO_VECTOR));
        // A queue selector past the end reads as size 0 and takes no writes.
        write(&mut d, 0x16, 9, 2);
        assert_eq!(read(&mut d, 0x18, 2), 0);
        write(&mut d, 0x1c, 1, 2);
        // A ring outside guest RAM: DEVICE_NEEDS_RESET, not activation.
        negotiate(&mut d, VIRTIO_F_VERSION_1);
        write(&mut d, 0x16, 0, 2);
        write(&mut d, 0x20, 0x7fff_0000, 4);
        write(&mut d, 0x1c, 1, 2);
        write(&mut d, 0x14, 1 | 2 | 4 | 8, 1);
        assert_eq!(calls.activated.load(Ordering::SeqCst), 0);
        assert_ne!(read(&mut d, 0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
        // Odd-sized and out-of-range accesses are harmless.
        write(&mut d, 0x13, 0xff, 1);
        assert_eq!(read(&mut d, BAR_SIZE + 8, 4), 0);
        assert_eq!(read(&mut d, DEVICE_OFFSET + 3, 1), 3);
    }

    /// A running function: features, both queues, MSI-X on with vector 1 live
    /// for queue 1 (queue 0 has none) and vector 2 for configuration changes,
    /// memory decoding on.
    fn running() -> (VirtioPci, Arc<Calls>, Vec<EventFd>) {
        let (mut d, calls, irqfds) = device();
        d.config_write(crate::pci::config::COMMAND, &[0x06, 0]);
        negotiate(&mut d, VIRTIO_F_VERSION_1 | (1 << 9));
        setup_queue(&mut d, 0);
        write(&mut d, 0x1a, u64::from(NO_VECTOR), 2);
        setup_queue(&mut d, 1);
        write(&mut d, 0x10, 2, 2);
        write(&mut d, 0x14, 1 | 2 | 4 | 8, 1);
        d.config_write(d.msix_cap + 2, &0x8000u16.to_le_bytes());
        for (off, v) in [(16u64, 0xfee0_0000u32), (20, 0), (24, 0x41), (28, 0)] {
            write(&mut d, MSIX_TABLE_OFFSET + off, u64::from(v), 4);
        }
        (d, calls, irqfds)
    }

    #[test]
    fn a_running_function_round_trips_into_a_fresh_one() {
        let (mut d, _, irqfds) = running();
        // The device consumed a chain on queue 1: its live queue is ahead of
        // the registers, which keep what the driver wrote.
        d.notify[1].write(1).unwrap();
        d.queue_notify(1);
        assert_eq!(irqfds[1].read().unwrap(), 1);
        let saved = d.state();
        assert!(saved.active);
        assert_eq!(saved.device_queues[1].next_avail, 1);
        assert_eq!(saved.queues[1].next_avail, 0);

        let (mut fresh, calls, irqfds) = device();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.state(), saved);
        assert_eq!(calls.acked.load(Ordering::SeqCst), 1);
        assert_eq!(calls.activated.load(Ordering::SeqCst), 1);
        // Each queue's interrupt is raised once: queue 1's vector fires, queue
        // 0 has none.
        assert_eq!(irqfds[1].read().unwrap(), 1);
        assert!(irqfds[0].read().is_err());
        assert_eq!(read(&mut fresh, 0x14, 1), 0x0f);
        assert_eq!(read(&mut fresh, 0x16, 2), 1, "queue_select");
        assert_eq!(read(&mut fresh, 0x1a, 2), 1);
        assert_eq!(read(&mut fresh, 0x20, 4), 0x2000);
        assert!(fresh.config().memory_enabled());
        // It carries on from the saved indices.
        fresh.notify[1].write(1).unwrap();
        fresh.queue_notify(1);
        assert_eq!(calls.notified.load(Ordering::SeqCst), 1);
        assert_eq!(irqfds[1].read().unwrap(), 1);
        assert_eq!(fresh.state().device_queues[1].next_avail, 2);
    }

    #[test]
    fn a_function_saved_before_activation_stays_inactive() {
        let (mut d, _, _) = device();
        negotiate(&mut d, VIRTIO_F_VERSION_1);
        setup_queue(&mut d, 0);
        let saved = d.state();
        assert!(!saved.active && saved.device_queues.is_empty());
        let (mut fresh, calls, _) = device();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.state(), saved);
        assert_eq!(calls.activated.load(Ordering::SeqCst), 0);
        fresh.queue_notify(0);
        assert_eq!(calls.notified.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_restore_names_what_differs_from_the_device() {
        let (d, _, _) = device();
        let saved = d.state();
        let (mut d, _, _) = device();
        let refused = |d: &mut VirtioPci, s: &TransportState| d.restore(s).unwrap_err().to_string();
        let mut s = saved.clone();
        s.queues[1].max_size = 32;
        assert_eq!(
            refused(&mut d, &s),
            "queue 1: max_size 32, the device's is 16"
        );
        let mut s = saved.clone();
        s.queues.pop();
        assert_eq!(refused(&mut d, &s), "1 queues saved, the device has 2");
        let mut s = saved.clone();
        s.driver_features = 1 << 10;
        s.status = STATUS_FEATURES_OK;
        assert_eq!(
            refused(&mut d, &s),
            "state's features 0x400 exceed the device's 0x100000200"
        );
        let mut s = saved.clone();
        s.config_vector = 3;
        assert_eq!(
            refused(&mut d, &s),
            "state names MSI-X vector 3, the device has 3"
        );
        let mut s = saved.clone();
        s.msix.entries.pop();
        assert_eq!(
            refused(&mut d, &s),
            "MSI-X state has 2 vectors, the device 3"
        );
        let mut s = saved.clone();
        s.config[0] ^= 1;
        assert_eq!(
            refused(&mut d, &s),
            "saved PCI config space belongs to another device"
        );
        let mut s = saved;
        s.active = true;
        s.device_queues = s.queues.clone();
        s.device_queues[0].max_size = 8;
        assert_eq!(
            refused(&mut d, &s),
            "live queue 0: max_size 8, the device's is 16"
        );
        s.device_queues.pop();
        assert_eq!(refused(&mut d, &s), "1 live queues saved, the device has 2");
    }
}
