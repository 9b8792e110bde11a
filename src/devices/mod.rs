//! Emulated devices. They never touch KVM or CPR directly.

pub mod serial;
