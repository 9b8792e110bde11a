//! ACPI power management registers (ACPI 6.5 section 4.8): the fixed-hardware
//! PM1a event block (status and enable) and PM1a control register that the FADT
//! built by `boot::acpi` names, and the one-byte port at
//! `layout::ACPI_SLEEP_PORT`, the FADT reset register.
//!
//! The guest enters a sleep state by writing SLP_TYP with SLP_EN set: the
//! `\_S5_` type powers off, the `\_S3_` type suspends to RAM. A suspend is
//! latched here and signalled on an eventfd; the event loop then stops the
//! vCPUs. The latch is part of the saved state, so a suspend the loop had not
//! acted on yet when an update saved the machine is acted on by the next
//! process. On wake-up, WAK_STS is set, as hardware does.
//!
//! Guests booted by releases before S3 support had a hardware-reduced FADT
//! whose sleep control and status registers were `layout::ACPI_SLEEP_PORT`
//! (ACPI 6.5 section 4.8.3.7): its writes are decoded the same way.

use std::os::fd::{AsRawFd, RawFd};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{
    ACPI_PM1_CNT_LEN, ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_PORT, ACPI_RESET_VALUE, ACPI_S3_TYPE,
    ACPI_S5_TYPE,
};

/// Hardware-reduced sleep control register (ACPI 6.5 section 4.8.3.7).
const HW_REDUCED_SLP_EN: u8 = 1 << 5;
const HW_REDUCED_SLP_TYP_SHIFT: u8 = 2;
/// SLP_TYP is three bits wide in both sleep control registers.
const SLP_TYP_MASK: u16 = 0x7;

/// PM1 status (ACPI 6.5 table 4.16): the guest clears bits by writing ones.
/// Of the status bits only WAK_STS is ever set here: molt raises no event.
const WAK_STS: u16 = 1 << 15;
/// PM1 enable (table 4.17): TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN,
/// PCIEXP_WAKE_DIS. They read back as written and enable nothing.
const ENABLE_BITS: u16 = 0x0001 | 0x0020 | 0x0100 | 0x0200 | 0x0400 | 0x4000;
/// PM1 control (table 4.18). The machine is always in ACPI mode (the FADT has
/// no SMI_CMD), so SCI_EN reads as set; SLP_EN is write-only.
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_EN: u16 = 1 << 13;

/// Offsets of the three 16-bit registers from `ACPI_PM1_EVT_PORT`.
const STATUS: u16 = 0;
const ENABLE: u16 = 2;
const CONTROL: u16 = ACPI_PM1_CNT_PORT - ACPI_PM1_EVT_PORT;
/// The registers are contiguous: event block, then control.
const BLOCK_END: u16 = ACPI_PM1_CNT_PORT + ACPI_PM1_CNT_LEN as u16;

/// What a guest write to a power register asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    PowerOff,
    /// Suspend to RAM (S3): already latched by `Power`.
    Suspend,
    Reset,
    None,
}

/// The request a sleep command with sleep type `slp_typ` makes.
fn sleep(slp_typ: u16) -> PowerRequest {
    match u8::try_from(slp_typ) {
        Ok(ACPI_S5_TYPE) => PowerRequest::PowerOff,
        Ok(ACPI_S3_TYPE) => PowerRequest::Suspend,
        // Sleep states molt does not offer (the DSDT names no other).
        _ => PowerRequest::None,
    }
}

/// Whether `port` is one of the PM1 registers'.
pub fn claims(port: u16) -> bool {
    (ACPI_PM1_EVT_PORT..BLOCK_END).contains(&port)
}

/// The PM1 registers as saved. Frozen once released.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerStateV1 {
    pub status: u16,
    pub enable: u16,
    /// SLP_TYP as last written (the other bits are fixed or write-only).
    pub control: u16,
    /// The guest asked to suspend and the event loop has not acted on it yet.
    pub sleep_pending: bool,
}

/// The version this release saves and restores.
pub type PowerState = PowerStateV1;

/// The PM1 registers and the suspend latch.
pub struct Power {
    regs: PowerState,
    /// Written when the guest asks to suspend; the event loop watches it.
    sleep_evt: EventFd,
}

impl Power {
    /// Power-on registers; `sleep_evt` is signalled on a suspend request.
    pub fn new(sleep_evt: EventFd) -> Self {
        Power {
            regs: PowerState::default(),
            sleep_evt,
        }
    }

    /// Takes a saved state: the registers, masked to what they can hold, and a
    /// pending suspend, signalled again.
    pub fn restore(&mut self, saved: &PowerState) {
        self.regs = PowerState {
            status: saved.status & WAK_STS,
            enable: saved.enable & ENABLE_BITS,
            control: saved.control & (SLP_TYP_MASK << SLP_TYP_SHIFT),
            sleep_pending: false,
        };
        if saved.sleep_pending {
            self.request_sleep();
        }
    }

    pub fn state(&self) -> PowerState {
        self.regs.clone()
    }

    /// The descriptor the event loop waits on for suspend requests.
    pub fn sleep_fd(&self) -> RawFd {
        self.sleep_evt.as_raw_fd()
    }

    /// Latches a suspend request and wakes the event loop.
    pub fn request_sleep(&mut self) {
        self.regs.sleep_pending = true;
        // A full counter (2^64 - 2 unread requests) cannot happen: the loop
        // drains it on every request.
        let _ = self.sleep_evt.write(1);
    }

    /// Whether a suspend request was pending; clears it and drains the eventfd.
    pub fn take_sleep_request(&mut self) -> bool {
        // Nothing to read (EAGAIN) just means the loop was woken for an
        // earlier request it already took.
        let _ = self.sleep_evt.read();
        std::mem::take(&mut self.regs.sleep_pending)
    }

    /// The machine woke from a sleep state: WAK_STS goes up, as in hardware.
    pub fn woke(&mut self) {
        self.regs.status |= WAK_STS;
    }

    /// A guest read of `data.len()` bytes at `port`; bytes past the block read
    /// as all-ones, like unclaimed ports.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = port
                .checked_add(i as u16)
                .and_then(|p| self.byte(p))
                .unwrap_or(0xff);
        }
    }

    fn byte(&self, port: u16) -> Option<u8> {
        if !claims(port) {
            return None;
        }
        let offset = port - ACPI_PM1_EVT_PORT;
        let reg = offset & !1;
        let value = match reg {
            STATUS => self.regs.status,
            ENABLE => self.regs.enable,
            _ => self.regs.control | SCI_EN,
        };
        Some(value.to_le_bytes()[usize::from(offset & 1)])
    }

    /// A guest write of `data` at `port`, byte, word or dword wide; returns
    /// what it asks for (a suspend is latched already).
    pub fn write(&mut self, port: u16, data: &[u8]) -> PowerRequest {
        let mut request = PowerRequest::None;
        for reg in [STATUS, ENABLE, CONTROL] {
            // The bytes of `data` that fall on this register, as a value and a mask.
            let (mut value, mut mask) = (0u16, 0u16);
            for (i, &b) in data.iter().enumerate() {
                let Some(p) = port.checked_add(i as u16) else {
                    break;
                };
                let at = ACPI_PM1_EVT_PORT + reg;
                if p == at || p == at + 1 {
                    let shift = 8 * (p - at);
                    value |= u16::from(b) << shift;
                    mask |= 0xff << shift;
                }
            }
            if mask == 0 {
                continue;
            }
            let value = value & mask;
            match reg {
                STATUS => self.regs.status &= !value,
                ENABLE => self.regs.enable = (self.regs.enable & !mask) | (value & ENABLE_BITS),
                _ => {
                    let typ = SLP_TYP_MASK << SLP_TYP_SHIFT;
                    self.regs.control = (self.regs.control & !mask) | (value & typ);
                    if value & SLP_EN != 0 {
                        request = sleep((self.regs.control >> SLP_TYP_SHIFT) & SLP_TYP_MASK);
                    }
                }
            }
        }
        if request == PowerRequest::Suspend {
            self.request_sleep();
        }
        request
    }
}

/// Decodes a byte written to `layout::ACPI_SLEEP_PORT`: the FADT reset value,
/// or a hardware-reduced sleep command from a guest booted by an earlier
/// release. Such guests write nothing else there but WAK_STS clears.
pub fn decode_sleep_port_write(value: u8) -> PowerRequest {
    if value == ACPI_RESET_VALUE {
        PowerRequest::Reset
    } else if value & HW_REDUCED_SLP_EN != 0 {
        sleep(u16::from(value >> HW_REDUCED_SLP_TYP_SHIFT) & SLP_TYP_MASK)
    } else {
        // Includes WAK_STS clears.
        PowerRequest::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PowerRequest::*;

    fn power() -> Power {
        Power::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    /// A 16-bit PM1 control value: SLP_TYP `typ`, SLP_EN if `enable`.
    fn control(typ: u8, enable: bool) -> [u8; 2] {
        let v = (u16::from(typ) << 10) | if enable { 0x2000 } else { 0 };
        v.to_le_bytes()
    }

    fn read16(p: &Power, port: u16) -> u16 {
        let mut d = [0u8; 2];
        p.read(port, &mut d);
        u16::from_le_bytes(d)
    }

    #[test]
    fn sleep_port_writes_decode() {
        let s5 = (ACPI_S5_TYPE << 2) | 0x20;
        assert_eq!(s5, 0x34);
        assert_eq!(decode_sleep_port_write(s5), PowerOff);
        assert_eq!(decode_sleep_port_write(ACPI_RESET_VALUE), Reset);
        // Linux clears WAK_STS through the shared status register first.
        assert_eq!(decode_sleep_port_write(0x80), None);
        assert_eq!(decode_sleep_port_write(s5 & !0x20), None, "no SLP_EN");
        let s3 = (ACPI_S3_TYPE << 2) | 0x20;
        assert_eq!(decode_sleep_port_write(s3), Suspend, "S3");
        assert_eq!(decode_sleep_port_write((1 << 2) | 0x20), None, "S1");
        assert_eq!(decode_sleep_port_write(0), None);
        assert_eq!(decode_sleep_port_write(s5 | 0x80), PowerOff);
    }

    #[test]
    fn pm1_control_decodes_s5_s3_and_nothing_else() {
        let mut p = power();
        // Linux writes SLP_TYP first, then SLP_TYP with SLP_EN.
        assert_eq!(p.write(ACPI_PM1_CNT_PORT, &control(5, false)), None);
        assert_eq!(p.write(ACPI_PM1_CNT_PORT, &control(5, true)), PowerOff);
        assert_eq!(p.write(ACPI_PM1_CNT_PORT, &control(3, true)), Suspend);
        for typ in [0, 1, 2, 4, 6, 7] {
            assert_eq!(
                p.write(ACPI_PM1_CNT_PORT, &control(typ, true)),
                None,
                "{typ}"
            );
        }
        // The high byte alone carries SLP_TYP and SLP_EN.
        assert_eq!(
            p.write(ACPI_PM1_CNT_PORT + 1, &[control(3, true)[1]]),
            Suspend
        );
        // A dword at the event block reaches no control bit.
        assert_eq!(p.write(ACPI_PM1_EVT_PORT, &[0xff; 4]), None);
        // SLP_EN is write-only; SLP_TYP reads back; SCI_EN is always set.
        assert_eq!(read16(&p, ACPI_PM1_CNT_PORT), (3 << 10) | 1);
    }

    #[test]
    fn a_suspend_is_latched_signalled_and_taken_once() {
        let mut p = power();
        assert!(!p.take_sleep_request());
        assert_eq!(p.write(ACPI_PM1_CNT_PORT, &control(3, true)), Suspend);
        assert_eq!(p.sleep_evt.read().unwrap(), 1, "the loop is woken");
        assert!(p.state().sleep_pending);
        assert!(p.take_sleep_request());
        assert!(!p.take_sleep_request());
        // The legacy port's suspend goes through the same latch.
        p.request_sleep();
        assert!(p.take_sleep_request());
    }

    #[test]
    fn status_is_write_one_to_clear_and_wake_sets_wak_sts() {
        let mut p = power();
        assert_eq!(read16(&p, ACPI_PM1_EVT_PORT), 0);
        p.woke();
        assert_eq!(read16(&p, ACPI_PM1_EVT_PORT), 0x8000);
        // Writing zeros or other bits leaves it; writing it clears it.
        p.write(ACPI_PM1_EVT_PORT, &[0xff, 0x7f]);
        assert_eq!(read16(&p, ACPI_PM1_EVT_PORT), 0x8000);
        p.write(ACPI_PM1_EVT_PORT + 1, &[0x80]);
        assert_eq!(read16(&p, ACPI_PM1_EVT_PORT), 0);
    }

    #[test]
    fn enable_bits_stick_others_read_zero() {
        let mut p = power();
        // GBL_EN must stick, or ACPICA reports the global lock missing.
        p.write(ACPI_PM1_EVT_PORT + 2, &0xffffu16.to_le_bytes());
        assert_eq!(read16(&p, ACPI_PM1_EVT_PORT + 2), ENABLE_BITS);
        p.write(ACPI_PM1_EVT_PORT + 2, &[0x00]);
        assert_eq!(read16(&p, ACPI_PM1_EVT_PORT + 2), ENABLE_BITS & 0xff00);
        // A dword read covers status and enable; bytes past the block float.
        let mut d = [0u8; 4];
        p.read(ACPI_PM1_CNT_PORT, &mut d);
        assert_eq!(d, [1, 0, 0xff, 0xff]);
        assert!(claims(ACPI_PM1_EVT_PORT) && claims(ACPI_PM1_CNT_PORT + 1));
        assert!(!claims(ACPI_PM1_EVT_PORT - 1) && !claims(ACPI_PM1_CNT_PORT + 2));
    }

    #[test]
    fn state_round_trips_masked_and_a_pending_suspend_is_signalled_again() {
        let mut p = power();
        p.write(ACPI_PM1_EVT_PORT + 2, &[0x21, 0x01]);
        p.write(ACPI_PM1_CNT_PORT, &control(3, true));
        p.woke();
        let saved = p.state();
        assert!(saved.sleep_pending);
        let mut q = power();
        q.restore(&saved);
        assert_eq!(q.state(), saved);
        assert_eq!(q.sleep_evt.read().unwrap(), 1, "signalled again");
        // Bits the registers cannot hold are dropped.
        let mut r = power();
        r.restore(&PowerState {
            status: 0xffff,
            enable: 0xffff,
            control: 0xffff,
            sleep_pending: false,
        });
        assert_eq!(
            r.state(),
            PowerState {
                status: WAK_STS,
                enable: ENABLE_BITS,
                control: 7 << 10,
                sleep_pending: false,
            }
        );
        assert!(r.sleep_evt.read().is_err(), "nothing to signal");
    }
}
