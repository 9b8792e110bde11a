//! The ACPI hardware-reduced sleep control and reset register (ACPI 6.5 section
//! 4.8.3.7), one byte port at `layout::ACPI_SLEEP_PORT`: the FADT and DSDT that
//! `boot::acpi` builds tell the guest what to write here.

use crate::layout;

/// Hardware-reduced sleep control register bits (ACPI 6.5 section 4.8.3.7).
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// What a guest write of `value` to the ACPI sleep/reset port asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    PowerOff,
    Reset,
    None,
}

/// Decodes a byte written to the port: the FADT reset value or an S5 sleep
/// command; Linux writes nothing else there but WAK_STS clears.
pub fn decode_sleep_port_write(value: u8) -> PowerRequest {
    if value == layout::ACPI_RESET_VALUE {
        PowerRequest::Reset
    } else if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == layout::ACPI_S5_TYPE
    {
        PowerRequest::PowerOff
    } else {
        // Includes WAK_STS clears and sleep states molt does not implement.
        PowerRequest::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_port_writes_decode() {
        use PowerRequest::*;
        let s5 = (layout::ACPI_S5_TYPE << 2) | 0x20;
        assert_eq!(s5, 0x34);
        assert_eq!(decode_sleep_port_write(s5), PowerOff);
        assert_eq!(decode_sleep_port_write(layout::ACPI_RESET_VALUE), Reset);
        // Linux clears WAK_STS through the shared status register first.
        assert_eq!(decode_sleep_port_write(0x80), None);
        assert_eq!(decode_sleep_port_write(s5 & !0x20), None, "no SLP_EN");
        assert_eq!(decode_sleep_port_write((3 << 2) | 0x20), None, "S3");
        assert_eq!(decode_sleep_port_write(0), None);
        assert_eq!(decode_sleep_port_write(s5 | 0x80), PowerOff);
    }
}
