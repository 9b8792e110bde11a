//! Port-I/O and MMIO dispatch: which device answers which address. Unclaimed
//! ports and addresses read as all-ones and ignore writes, as on a real bus.

use std::sync::Mutex;

use crate::devices::power::{self, decode_sleep_port_write, Power, PowerRequest};
use crate::devices::serial::Serial;
use crate::layout::{ACPI_SLEEP_PORT, I8042_PORT, SERIAL_PORT, SERIAL_PORT_LEN};
use crate::pci::PciBus;
use crate::sync::lock;

/// Why the guest stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    PowerOff,
    Reset,
    Failed(String),
}

/// i8042 command "pulse output line 0": resets the CPU.
const I8042_RESET_CMD: u8 = 0xfe;

pub struct Bus {
    pub serial: Mutex<Serial>,
    pub power: Mutex<Power>,
    pub pci: PciBus,
}

impl Bus {
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.pci.pio_read(port, data) {
            return;
        }
        if power::claims(port) {
            lock(&self.power).read(port, data);
            return;
        }
        match port {
            p if serial_offset(p).is_some() && data.len() == 1 => {
                let offset = serial_offset(p).unwrap_or(0);
                data[0] = lock(&self.serial).read(offset);
            }
            // Keyboard controller status: output and input buffers empty, so a
            // guest polling it before a reset does not spin.
            I8042_PORT if data.len() == 1 => data[0] = 0,
            _ => data.fill(0xff),
        }
    }

    /// Handles a guest port write; returns why the guest ends, if it asked to.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestExit> {
        if self.pci.pio_write(port, data) {
            return None;
        }
        if power::claims(port) {
            let request = lock(&self.power).write(port, data);
            return exit(request);
        }
        let [value] = *data else {
            return None;
        };
        if let Some(offset) = serial_offset(port) {
            lock(&self.serial).write(offset, value);
            return None;
        }
        match port {
            ACPI_SLEEP_PORT => {
                let request = decode_sleep_port_write(value);
                if request == PowerRequest::Suspend {
                    lock(&self.power).request_sleep();
                }
                exit(request)
            }
            I8042_PORT if value == I8042_RESET_CMD => Some(GuestExit::Reset),
            _ => None,
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.pci.mmio_write(addr, data);
    }
}

/// How a power request ends the guest, if it does: a suspend does not (the
/// event loop stops the vCPUs, `Power` has signalled it).
fn exit(request: PowerRequest) -> Option<GuestExit> {
    match request {
        PowerRequest::PowerOff => Some(GuestExit::PowerOff),
        PowerRequest::Reset => Some(GuestExit::Reset),
        PowerRequest::Suspend | PowerRequest::None => None,
    }
}

fn serial_offset(port: u16) -> Option<u8> {
    port.checked_sub(SERIAL_PORT)
        .filter(|&o| o < SERIAL_PORT_LEN)
        .map(|o| o as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::Output;
    use crate::layout::ACPI_PM1_CNT_PORT;

    fn bus() -> Bus {
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Bus {
            serial: Mutex::new(Serial::new(None, Output::Sink)),
            power: Mutex::new(Power::new(evt)),
            pci: PciBus::new(),
        }
    }

    #[test]
    fn power_ports_end_the_guest() {
        let b = bus();
        assert_eq!(
            b.pio_write(ACPI_SLEEP_PORT, &[0x34]),
            Some(GuestExit::PowerOff)
        );
        assert_eq!(
            b.pio_write(ACPI_SLEEP_PORT, &[0x01]),
            Some(GuestExit::Reset)
        );
        assert_eq!(b.pio_write(I8042_PORT, &[0xfe]), Some(GuestExit::Reset));
        assert_eq!(b.pio_write(ACPI_SLEEP_PORT, &[0x00]), None);
        // A wide access to a byte port is ignored, not misread.
        assert_eq!(b.pio_write(ACPI_SLEEP_PORT, &[0x34, 0]), None);
        // PM1a control, 16 bits: S5 | SLP_EN powers off.
        assert_eq!(
            b.pio_write(ACPI_PM1_CNT_PORT, &0x3400u16.to_le_bytes()),
            Some(GuestExit::PowerOff)
        );
    }

    #[test]
    fn a_suspend_leaves_the_guest_running_and_is_latched() {
        let b = bus();
        // S3 | SLP_EN, through PM1a control and through the legacy port.
        assert_eq!(
            b.pio_write(ACPI_PM1_CNT_PORT, &0x2c00u16.to_le_bytes()),
            None
        );
        assert!(lock(&b.power).take_sleep_request());
        assert_eq!(b.pio_write(ACPI_SLEEP_PORT, &[0x2c]), None);
        assert!(lock(&b.power).take_sleep_request());
        // The PM1 registers answer reads; SCI_EN is set.
        let mut d = [0u8; 2];
        b.pio_read(ACPI_PM1_CNT_PORT, &mut d);
        assert_eq!(u16::from_le_bytes(d) & 1, 1);
    }

    #[test]
    fn unclaimed_ports_float_high() {
        let b = bus();
        let mut d = [0u8; 4];
        b.pio_read(0x80, &mut d);
        assert_eq!(d, [0xff; 4]);
        b.mmio_read(0xd000_0000, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn serial_ports_reach_the_uart() {
        let b = bus();
        b.pio_write(SERIAL_PORT + 7, &[0x5a]); // scratch register
        let mut d = [0u8];
        b.pio_read(SERIAL_PORT + 7, &mut d);
        assert_eq!(d[0], 0x5a);
    }
}
