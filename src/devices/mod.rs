//! Emulated devices. They never touch KVM or CPR directly.

pub mod power;
pub mod serial;
