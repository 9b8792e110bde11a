//! Port-I/O and MMIO dispatch: which device answers which address. Unclaimed
//! ports and addresses read as all-ones and ignore writes, as on a real bus.

use std::sync::Mutex;

use crate::devices::power::{decode_sleep_port_write, PowerRequest};
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
    pub pci: PciBus,
}

impl Bus {
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.pci.pio_read(port, data) {
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
        let [value] = *data else {
            return None;
        };
        if let Some(offset) = serial_offset(port) {
            lock(&self.serial).write(offset, value);
            return None;
        }
        match port {
            ACPI_SLEEP_PORT => match decode_sleep_port_write(value) {
                PowerRequest::PowerOff => Some(GuestExit::PowerOff),
                PowerRequest::Reset => Some(GuestExit::Reset),
                PowerRequest::None => None,
            },
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

fn serial_offset(port: u16) -> Option<u8> {
    port.checked_sub(SERIAL_PORT)
        .filter(|&o| o < SERIAL_PORT_LEN)
        .map(|o| o as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::Output;

    fn bus() -> Bus {
        Bus {
            serial: Mutex::new(Serial::new(None, Output::Sink)),
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
