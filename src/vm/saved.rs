//! The machine's saved state and shape: every version that was ever written,
//! frozen once released, and the shape check a restore begins with.

use heapless::Vec as BoundedVec;
use serde::{Deserialize, Serialize};

use super::kvm::VmState;
use super::vcpu_state::VcpuState;
use super::MAX_DEVICES;
use crate::args::RunConfig;
use crate::devices::power::PowerStateV1;
use crate::devices::serial::SerialStateV1;
use crate::layout::{MAX_DISKS, MAX_NICS, MAX_VCPUS, MAX_VFIO_DEVICES};
use crate::pci::Allocator;
use crate::vfio::device::VfioStateV1;
use crate::virtio::pci::TransportState;

/// What the machine is made of; a state only restores into the same shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeV1 {
    pub vcpus: u8,
    pub mem_size: u64,
    /// Read-only flag of each disk, in argv order.
    pub disks: BoundedVec<bool, MAX_DISKS>,
    /// MAC of each NIC, in argv order.
    pub nets: BoundedVec<[u8; 6], MAX_NICS>,
}

/// The version this release saves and restores.
pub type Shape = ShapeV1;

impl Shape {
    /// Human-readable differences from the `saved` shape, empty if none.
    pub fn differences(&self, saved: &Shape) -> Vec<String> {
        let mut d = Vec::new();
        if self.vcpus != saved.vcpus {
            d.push(format!("vCPUs: saved {}, now {}", saved.vcpus, self.vcpus));
        }
        if self.mem_size != saved.mem_size {
            d.push(format!(
                "memory: saved {}, now {}",
                saved.mem_size, self.mem_size
            ));
        }
        if self.disks != saved.disks {
            d.push(format!(
                "disks (read-only flags): saved {:?}, now {:?}",
                saved.disks, self.disks
            ));
        }
        if self.nets != saved.nets {
            let macs = |n: &[[u8; 6]]| n.iter().map(mac_str).collect::<Vec<_>>();
            d.push(format!(
                "NICs (MACs): saved {:?}, now {:?}",
                macs(&saved.nets),
                macs(&self.nets)
            ));
        }
        d
    }
}

impl Shape {
    /// Differences visible from argv alone, checked before anything is built
    /// (MACs without `mac=` need the tap and are checked at restore).
    pub fn argv_differences(cfg: &RunConfig, saved: &Shape) -> Vec<String> {
        let mut now = saved.clone();
        now.vcpus = cfg.vcpus;
        now.mem_size = cfg.mem_size;
        now.disks = cfg.disks.iter().map(|d| d.read_only).collect();
        if cfg.nets.len() != saved.nets.len() {
            now.nets = cfg.nets.iter().map(|n| n.mac.unwrap_or_default()).collect();
        }
        now.differences(saved)
    }
}

pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Version 1 of the machine's saved state: devices, VM and vCPUs. Frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineStateV1 {
    pub shape: Shape,
    /// Boxed: a vCPU's state is ~25 KiB, too much to keep 32 of on the stack.
    pub vcpus: BoundedVec<Box<VcpuState>, MAX_VCPUS>,
    pub vm: VmState,
    pub serial: SerialStateV1,
    /// The allocator after placing every device: a restore that places them
    /// differently is refused rather than resumed with moved resources.
    pub allocator: Allocator,
    pub virtio: BoundedVec<TransportState, MAX_DEVICES>,
}

/// Version 2: version 1 plus the ACPI power registers. Frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineStateV2 {
    pub shape: Shape,
    pub vcpus: BoundedVec<Box<VcpuState>, MAX_VCPUS>,
    pub vm: VmState,
    pub serial: SerialStateV1,
    pub allocator: Allocator,
    pub virtio: BoundedVec<TransportState, MAX_DEVICES>,
    pub power: PowerStateV1,
}

impl From<MachineStateV1> for MachineStateV2 {
    /// Machines of version 1 had no PM1 registers: theirs start at power-on values.
    fn from(v1: MachineStateV1) -> Self {
        MachineStateV2 {
            shape: v1.shape,
            vcpus: v1.vcpus,
            vm: v1.vm,
            serial: v1.serial,
            allocator: v1.allocator,
            virtio: v1.virtio,
            power: PowerStateV1::default(),
        }
    }
}

/// Version 3: version 2 plus each passed-through function's state, argv
/// order (carried by exec and transfer, whose new process adopts the
/// running device). Frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineStateV3 {
    pub shape: Shape,
    pub vcpus: BoundedVec<Box<VcpuState>, MAX_VCPUS>,
    pub vm: VmState,
    pub serial: SerialStateV1,
    pub allocator: Allocator,
    pub virtio: BoundedVec<TransportState, MAX_DEVICES>,
    pub power: PowerStateV1,
    pub vfio: BoundedVec<VfioStateV1, MAX_VFIO_DEVICES>,
}

impl From<MachineStateV2> for MachineStateV3 {
    /// Machines of version 2 could not carry a passed-through device.
    fn from(v2: MachineStateV2) -> Self {
        MachineStateV3 {
            shape: v2.shape,
            vcpus: v2.vcpus,
            vm: v2.vm,
            serial: v2.serial,
            allocator: v2.allocator,
            virtio: v2.virtio,
            power: v2.power,
            vfio: BoundedVec::new(),
        }
    }
}

/// The version this release saves and restores.
pub type MachineState = MachineStateV3;
