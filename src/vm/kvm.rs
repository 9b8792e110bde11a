//! VM-wide KVM setup: the in-kernel irqchip and PIT, the TSS and identity-map
//! pages, guest RAM memslots, and interrupt eventfds. Each ioctl has its own error.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irqchip, kvm_pit_config,
    kvm_pit_state2, kvm_pre_fault_memory, kvm_userspace_memory_region, KvmIrqRouting, KVMIO,
    KVM_CAP_PRE_FAULT_MEMORY, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

use serde::{Deserialize, Serialize};

use super::memory::GuestRam;
use super::pod::Pod;
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::pci::msi::{MsiMessage, MsiRouter};
use crate::pci::MemoryMapper;
use crate::ratelimit::guest_log;

#[derive(Debug)]
pub enum Error {
    OpenKvm(kvm_ioctls::Error),
    CreateVm(kvm_ioctls::Error),
    SetTssAddress(kvm_ioctls::Error),
    SetIdentityMap(kvm_ioctls::Error),
    CreateIrqChip(kvm_ioctls::Error),
    CreatePit2(kvm_ioctls::Error),
    SetMemoryRegion(u32, kvm_ioctls::Error),
    EventFd(std::io::Error),
    RegisterIrqfd(u32, kvm_ioctls::Error),
    UnregisterIrqfd(u32, kvm_ioctls::Error),
    RegisterIoeventfd(u64, kvm_ioctls::Error),
    State(&'static str, kvm_ioctls::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OpenKvm(e) => write!(f, "cannot open /dev/kvm: {e}"),
            Error::CreateVm(e) => write!(f, "KVM_CREATE_VM failed: {e}"),
            Error::SetTssAddress(e) => write!(f, "KVM_SET_TSS_ADDR failed: {e}"),
            Error::SetIdentityMap(e) => write!(f, "KVM_SET_IDENTITY_MAP_ADDR failed: {e}"),
            Error::CreateIrqChip(e) => write!(f, "KVM_CREATE_IRQCHIP failed: {e}"),
            Error::CreatePit2(e) => write!(f, "KVM_CREATE_PIT2 failed: {e}"),
            Error::SetMemoryRegion(slot, e) => {
                write!(f, "KVM_SET_USER_MEMORY_REGION slot {slot} failed: {e}")
            }
            Error::EventFd(e) => write!(f, "eventfd failed: {e}"),
            Error::RegisterIrqfd(gsi, e) => write!(f, "KVM_IRQFD for GSI {gsi} failed: {e}"),
            Error::UnregisterIrqfd(gsi, e) => {
                write!(f, "KVM_IRQFD deassign for GSI {gsi} failed: {e}")
            }
            Error::RegisterIoeventfd(a, e) => write!(f, "KVM_IOEVENTFD at {a:#x} failed: {e}"),
            Error::State(what, e) => write!(f, "KVM_{what} failed: {e}"),
        }
    }
}

/// Opens /dev/kvm and creates a VM with the platform every guest sees, its
/// memslots over `ram` set first. First, because a memslot change waits out
/// the VM's SRCU readers (KVM_SET_USER_MEMORY_REGION's synchronize_srcu): on
/// a VM with no other SRCU writes behind it that takes ~0.15 ms here, while
/// right after the irqchip and PIT (which register their devices on the same
/// SRCU, one grace period each) it took 4 to 12 ms, for 16 MiB as for 4 GiB.
/// The irqchip and PIT only need to precede the vCPUs.
pub fn create_vm(ram: &GuestRam) -> Result<(Kvm, VmFd), Error> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let vm = create_vm_of(&kvm, ram)?;
    Ok((kvm, vm))
}

/// `create_vm` with /dev/kvm already open.
pub fn create_vm_of(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, Error> {
    let vm = kvm.create_vm().map_err(Error::CreateVm)?;
    set_memslots(&vm, ram)?;
    // Both must precede vCPU creation (Documentation/virt/kvm/api.rst).
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(Error::SetIdentityMap)?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(Error::SetTssAddress)?;
    vm.create_irq_chip().map_err(Error::CreateIrqChip)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(Error::CreatePit2)?;
    Ok(vm)
}

/// Gives `vm` guest RAM: one memslot per region of `ram`.
fn set_memslots(vm: &VmFd, ram: &GuestRam) -> Result<(), Error> {
    for (slot, (gpa, size, host)) in (0..).zip(ram.host_regions()) {
        let mem_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: the mapping behind `host` is owned by `ram`, which the machine keeps
        // alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(mem_region) }
            .map_err(|e| Error::SetMemoryRegion(slot, e))?;
    }
    Ok(())
}

// Linux 6.10's vCPU ioctl; kvm-bindings has its argument, kvm-ioctls no wrapper.
ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, kvm_pre_fault_memory);

/// How much of guest RAM `prefault` put in the VM's page tables.
#[derive(Debug, PartialEq, Eq)]
pub enum Prefault {
    /// This KVM cannot (Linux before 6.10, or no two-dimensional paging,
    /// as under a paravirtual KVM that shadows the guest's page tables).
    Unsupported,
    /// `mapped` of the `populated` bytes holding data; fewer if the time
    /// ran out or KVM refused (`stopped`, why).
    Done {
        mapped: u64,
        populated: u64,
        took: Duration,
        stopped: Option<String>,
    },
}

impl fmt::Display for Prefault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        match self {
            Prefault::Unsupported => write!(
                f,
                "KVM here cannot pre-fault guest RAM (no KVM_CAP_PRE_FAULT_MEMORY): the guest \
                 fills the new VM's page tables as it runs"
            ),
            Prefault::Done {
                mapped,
                populated,
                took,
                stopped,
            } => {
                write!(
                    f,
                    "pre-faulted {} of the {} MiB of guest RAM holding data in {} ms",
                    mapped.div_ceil(MIB),
                    populated.div_ceil(MIB),
                    took.as_millis()
                )?;
                match stopped {
                    Some(why) => write!(f, ", then stopped: {why}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Fills `vm`'s page tables (EPT/NPT) for the RAM that holds data, through
/// `vcpu`, one that is not running: the guest, moved onto this VM, then
/// touches what it already uses without a fault. A transfer does this
/// before the pause, while the old process still runs the guest. Pages
/// never written stay holes (touching them would allocate them). Stops at
/// `budget`; a page KVM refuses ends it too. Nothing here can fail the
/// update: the guest only faults in what was not done.
pub fn prefault(vm: &VmFd, vcpu: RawFd, ram: &GuestRam, budget: Duration) -> Prefault {
    // One ioctl maps at most this much, so that the budget is checked.
    const CHUNK: u64 = 64 << 20;
    if vm.check_extension_raw(KVM_CAP_PRE_FAULT_MEMORY.into()) <= 0 {
        return Prefault::Unsupported;
    }
    let start = Instant::now();
    let (mut mapped, mut stopped) = (0, None);
    let ranges = ram.populated().unwrap_or_else(|e| {
        stopped = Some(format!("cannot find the RAM holding data: {e}"));
        Vec::new()
    });
    let populated = ranges.iter().map(|&(_, len)| len).sum();
    'ranges: for (offset, len) in ranges {
        let Some(mut gpa) = ram.guest_addr(offset).map(|a| a.0) else {
            continue;
        };
        let end = gpa + len;
        while gpa < end {
            if start.elapsed() >= budget {
                stopped = Some(format!("{} ms spent", budget.as_millis()));
                break 'ranges;
            }
            let size = (end - gpa).min(CHUNK);
            let mut range = kvm_pre_fault_memory {
                gpa,
                size,
                ..Default::default()
            };
            // SAFETY: KVM reads and updates only `range`, which outlives the call.
            let r = unsafe { ioctl_with_mut_ref(&vcpu, KVM_PRE_FAULT_MEMORY(), &mut range) };
            // KVM moves `gpa` and `size` past what it mapped, even when it
            // stops early.
            let done = size.saturating_sub(range.size).min(size);
            mapped += done;
            gpa += done;
            if r < 0 {
                let e = std::io::Error::last_os_error();
                let again = matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN));
                if !again {
                    stopped = Some(format!("KVM_PRE_FAULT_MEMORY at {gpa:#x}: {e}"));
                    break 'ranges;
                }
            }
        }
    }
    Prefault::Done {
        mapped,
        populated,
        took: start.elapsed(),
        stopped,
    }
}

/// Creates an eventfd that raises `gsi` on the in-kernel irqchip when written.
pub fn irq_eventfd(vm: &VmFd, gsi: u32) -> Result<EventFd, Error> {
    let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)?;
    bind_irqfd(vm, &evt, gsi)?;
    Ok(evt)
}

/// Makes a write to `evt` raise `gsi` (KVM_IRQFD).
pub fn bind_irqfd(vm: &VmFd, evt: &EventFd, gsi: u32) -> Result<(), Error> {
    vm.register_irqfd(evt, gsi)
        .map_err(|e| Error::RegisterIrqfd(gsi, e))
}

/// Stops writes to `evt` raising `gsi` (KVM_IRQFD with DEASSIGN); what
/// arrives on `evt` afterwards stays there for whoever binds it next.
pub fn unbind_irqfd(vm: &VmFd, evt: &EventFd, gsi: u32) -> Result<(), Error> {
    vm.unregister_irqfd(evt, gsi)
        .map_err(|e| Error::UnregisterIrqfd(gsi, e))
}

/// Device memory in guest-physical space: the memslots of passed-through BARs.
pub struct DeviceMemory(pub Arc<VmFd>);

impl MemoryMapper for DeviceMemory {
    unsafe fn set_slot(&self, slot: u32, gpa: u64, host: *mut u8, len: u64) -> std::io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the caller keeps `host..host + len` mapped until it empties
        // the slot (`MemoryMapper::set_slot`'s contract).
        unsafe { self.0.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Registers `evt` to be signalled, in the kernel, on any guest write to `addr`.
pub fn ioeventfd(vm: &VmFd, evt: &EventFd, addr: u64) -> Result<(), Error> {
    vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
        .map_err(|e| Error::RegisterIoeventfd(addr, e))
}

/// KVM's GSI routing table: the irqchip pins KVM sets up by default, plus one MSI
/// route per device vector. KVM_SET_GSI_ROUTING replaces the whole table, so the
/// irqchip part is rebuilt with it every time.
pub struct GsiRoutes {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl GsiRoutes {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRoutes {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    fn table(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
            e
        };
        let mut entries = Vec::with_capacity(40 + msi.len());
        // The same routes KVM_CREATE_IRQCHIP installs: ISA IRQs on both PICs and
        // the IOAPIC, the rest on the IOAPIC only.
        for gsi in 0..16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(gsi, pic, gsi % 8));
        }
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for (&gsi, m) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.addr as u32;
            e.u.msi.address_hi = (m.addr >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        entries
    }
}

/// Pins of KVM's in-kernel IOAPIC.
const IOAPIC_PINS: u32 = 24;

impl MsiRouter for GsiRoutes {
    fn route(&self, routes: &[(u32, MsiMessage)]) {
        let mut msi = crate::sync::lock(&self.msi);
        let mut changed = false;
        for &(gsi, msg) in routes {
            changed |= msi.insert(gsi, msg) != Some(msg);
        }
        if !changed {
            return;
        }
        let entries = Self::table(&msi);
        let result = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| format!("{e:?}"))
            .and_then(|r| self.vm.set_gsi_routing(&r).map_err(|e| e.to_string()));
        if let Err(e) = result {
            // The vectors stay silent; the guest driver times out and says so.
            let gsis: Vec<u32> = routes.iter().map(|r| r.0).collect();
            guest_log!(Error, "KVM_SET_GSI_ROUTING for GSIs {gsis:?} failed: {e}");
        }
    }
}

/// The VM-wide interrupt controllers and clocks, saved for CPR.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStateV1 {
    pub pic_master: Pod<kvm_irqchip>,
    pub pic_slave: Pod<kvm_irqchip>,
    pub ioapic: Pod<kvm_irqchip>,
    pub pit: Pod<kvm_pit_state2>,
    pub clock: Pod<kvm_clock_data>,
}

/// The version this release saves and restores.
pub type VmState = VmStateV1;

fn get_irqchip(vm: &VmFd, chip: u32) -> Result<Pod<kvm_irqchip>, Error> {
    let mut c = kvm_irqchip {
        chip_id: chip,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(|e| Error::State("GET_IRQCHIP", e))?;
    Ok(Pod(c))
}

/// Reads the irqchip, PIT and kvmclock of a VM whose vCPUs are paused.
pub fn save_vm(vm: &VmFd) -> Result<VmState, Error> {
    Ok(VmState {
        pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: Pod(vm.get_pit2().map_err(|e| Error::State("GET_PIT2", e))?),
        clock: Pod(vm.get_clock().map_err(|e| Error::State("GET_CLOCK", e))?),
    })
}

/// Writes `state` into a fresh VM (irqchip and PIT created, no vCPU running).
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), Error> {
    for (chip, want) in [
        (KVM_IRQCHIP_PIC_MASTER, &state.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave),
        (KVM_IRQCHIP_IOAPIC, &state.ioapic),
    ] {
        let mut c = want.0;
        // The chip id is ours to trust, not the file's.
        c.chip_id = chip;
        vm.set_irqchip(&c)
            .map_err(|e| Error::State("SET_IRQCHIP", e))?;
    }
    vm.set_pit2(&state.pit.0)
        .map_err(|e| Error::State("SET_PIT2", e))?;
    // KVM_SET_CLOCK takes no output-only flags (TSC_STABLE, HOST_TSC, REALTIME
    // without a realtime value): the guest's clock resumes where it stopped.
    let mut clock = state.clock.0;
    clock.flags = 0;
    vm.set_clock(&clock)
        .map_err(|e| Error::State("SET_CLOCK", e))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn prefault_maps_exactly_the_ram_holding_data_or_says_kvm_cannot() {
        let ram = GuestRam::create(16 << 20, None).unwrap();
        // Data in one page at 1 MiB and three at 8 MiB; the rest are holes.
        ram.memory
            .write_slice(&[1; 4096], GuestAddress(1 << 20))
            .unwrap();
        ram.memory
            .write_slice(&[2; 3 * 4096], GuestAddress(8 << 20))
            .unwrap();
        let (_kvm, vm) = create_vm(&ram).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let supported = vm.check_extension_raw(KVM_CAP_PRE_FAULT_MEMORY.into()) > 0;
        let all = prefault(&vm, vcpu.as_raw_fd(), &ram, Duration::from_secs(10));
        let none = prefault(&vm, vcpu.as_raw_fd(), &ram, Duration::ZERO);
        if !supported {
            assert_eq!((all, none), (Prefault::Unsupported, Prefault::Unsupported));
            return;
        }
        let Prefault::Done {
            mapped,
            populated,
            stopped,
            ..
        } = all
        else {
            panic!("KVM_CAP_PRE_FAULT_MEMORY is offered, yet: {all}");
        };
        assert_eq!((mapped, populated, stopped), (4 * 4096, 4 * 4096, None));
        // The budget is checked before each ioctl: none left, nothing mapped.
        let Prefault::Done {
            mapped, stopped, ..
        } = none
        else {
            panic!("{none}");
        };
        assert_eq!(mapped, 0);
        assert!(stopped.is_some_and(|why| why.contains("spent")));
    }
}
