//! Placeholder until the real device lands (being written in parallel).
use crate::args::DiskConfig;
#[derive(Debug)]
pub struct Error;
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("block devices are not built yet")
    }
}
pub struct Block;
impl Block {
    pub fn new(_: &DiskConfig) -> Result<Self, Error> {
        Err(Error)
    }
}
impl super::VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[]
    }
    fn features(&self) -> u64 {
        0
    }
    fn ack_features(&mut self, _: u64) {}
    fn read_config(&self, _: u64, _: &mut [u8]) {}
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: vm_memory::GuestMemoryMmap,
        _: Vec<virtio_queue::Queue>,
        _: Box<dyn super::Interrupt>,
    ) {
    }
    fn queue_notify(&mut self, _: usize) {}
    fn reset(&mut self) {}
}
