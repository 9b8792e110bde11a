//! VM-wide KVM setup: the in-kernel irqchip and PIT, the TSS and identity-map
//! pages, guest RAM memslots, and interrupt eventfds. Each ioctl has its own error.

use std::fmt;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestRam;
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

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
        }
    }
}

/// Opens /dev/kvm and creates a VM with the platform every guest sees.
pub fn create_vm(ram: &GuestRam) -> Result<(Kvm, VmFd), Error> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let vm = kvm.create_vm().map_err(Error::CreateVm)?;
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
    for (slot, region) in ram.memory.iter().enumerate() {
        let slot = slot as u32;
        let host = ram
            .memory
            .get_host_address(GuestAddress(region.start_addr().0))
            .expect("a mapped region has a host address");
        let mem_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping behind `host` is owned by `ram`, which the machine keeps
        // alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(mem_region) }
            .map_err(|e| Error::SetMemoryRegion(slot, e))?;
    }
    Ok((kvm, vm))
}

/// Creates an eventfd that raises `gsi` on the in-kernel irqchip when written.
pub fn irq_eventfd(vm: &VmFd, gsi: u32) -> Result<EventFd, Error> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| Error::RegisterIrqfd(gsi, e))?;
    Ok(evt)
}
