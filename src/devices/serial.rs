//! The 16550A UART at COM1, built on vm-superio's register model. Output goes to
//! stdout, a file or nowhere; input is queued from the event loop.

use std::fs::File;
use std::io::Write;

use heapless::Vec as BoundedVec;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Raises the UART's interrupt line through a KVM irqfd.
pub struct IrqLine(Option<EventFd>);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        match &self.0 {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }
}

/// Where the guest's console output goes.
pub enum Output {
    /// A descriptor: molt's stdout or a file opened for `--serial file:`.
    Fd(File),
    Sink,
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::Fd(f) => f.write(buf),
            Output::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a saved UART could not be taken back.
#[derive(Debug)]
pub enum Error {
    /// vm-superio refused the registers, or could not raise the pending interrupt.
    Refused(vm_superio::serial::Error<std::io::Error>),
    /// The interrupt line's eventfd could not be duplicated for the new UART.
    CloneIrq(std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Refused(e) => write!(f, "UART state refused: {e}"),
            Error::CloneIrq(e) => write!(f, "UART interrupt eventfd: cannot duplicate: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Refused(e) => Some(e),
            Error::CloneIrq(e) => Some(e),
        }
    }
}

/// The UART's registers and receive FIFO, version 1 of its saved form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialStateV1 {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet (the 16550's 64-byte FIFO).
    pub in_buffer: BoundedVec<u8, 64>,
}

pub struct Serial(vm_superio::Serial<IrqLine, NoEvents, Output>);

impl Serial {
    pub fn new(irq: Option<EventFd>, out: Output) -> Self {
        Serial(vm_superio::Serial::new(IrqLine(irq), out))
    }

    /// Rebuilds the UART from saved registers; a pending interrupt is raised again.
    pub fn from_state(s: &SerialStateV1, irq: Option<EventFd>, out: Output) -> Result<Self, Error> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.to_vec(),
        };
        vm_superio::Serial::from_state(&state, IrqLine(irq), NoEvents, out)
            .map(Serial)
            .map_err(Error::Refused)
    }

    /// Takes saved registers into this UART, keeping its interrupt line and output.
    pub fn restore(&mut self, s: &SerialStateV1) -> Result<(), Error> {
        let irq = match &self.0.interrupt_evt().0 {
            Some(e) => Some(e.try_clone().map_err(Error::CloneIrq)?),
            None => None,
        };
        let placeholder = vm_superio::Serial::new(IrqLine(None), Output::Sink);
        let out = std::mem::replace(&mut self.0, placeholder).into_writer();
        *self = Serial::from_state(s, irq, out)?;
        Ok(())
    }

    /// The descriptor console output goes to, if any (handed over on transfer).
    pub fn output_fd(&self) -> Option<std::os::fd::RawFd> {
        match self.0.writer() {
            Output::Fd(f) => Some(std::os::fd::AsRawFd::as_raw_fd(f)),
            Output::Sink => None,
        }
    }

    pub fn state(&self) -> SerialStateV1 {
        let s = self.0.state();
        SerialStateV1 {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.iter().copied().take(64).collect(),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.0.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // A lost console byte (a closed stdout, a full disk) must not stop the guest;
        // the UART still reports the transmitter empty, as vm-superio documents.
        if let Err(e) = self.0.write(offset, value) {
            log::debug!("serial output lost: {e:?}");
        }
    }

    /// Queues as much of `input` as the receive FIFO takes; returns how much.
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        if self.0.fifo_capacity() == 0 {
            return 0;
        }
        self.0.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: u8 = 0;
    const LSR: u8 = 5;
    const LSR_DATA_READY: u8 = 1;

    #[test]
    fn input_is_queued_and_read_back() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(Some(evt.try_clone().unwrap()), Output::Sink);
        s.write(1, 1); // IER: received-data interrupt on
        assert_eq!(s.enqueue(b"hi"), 2);
        assert!(evt.read().unwrap() >= 1, "the irq line was raised");
        assert_eq!(s.read(LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(s.read(DATA), b'h');
        assert_eq!(s.read(DATA), b'i');
        assert_eq!(s.read(LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn a_full_fifo_takes_nothing() {
        let mut s = Serial::new(None, Output::Sink);
        let big = [b'x'; 200];
        let first = s.enqueue(&big);
        assert!(first > 0 && first < 200);
        assert_eq!(s.enqueue(b"more"), 0);
    }

    #[test]
    fn state_round_trip_keeps_registers_and_fifo() {
        let mut s = Serial::new(None, Output::Sink);
        s.write(3, 0x83); // LCR with DLAB
        s.write(0, 0x0c); // divisor low
        s.write(3, 0x03);
        s.write(7, 0x5a);
        s.enqueue(b"abc");
        let st = s.state();
        let mut r = Serial::from_state(&st, None, Output::Sink).unwrap();
        assert_eq!(r.state(), st);
        assert_eq!(r.read(7), 0x5a);
        assert_eq!(r.read(DATA), b'a');
    }

    #[test]
    fn output_reaches_the_file() {
        let path = std::env::temp_dir().join(format!("molt-serial-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let mut s = Serial::new(None, Output::Fd(f));
        for b in b"ok\n" {
            s.write(DATA, *b);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"ok\n");
        std::fs::remove_file(&path).unwrap();
    }
}
