//! Exact-size serialization of KVM's plain-old-data structs for `CprState`.
//!
//! kvm-bindings' own serde support pads a short buffer and truncates a long one
//! silently; a saved state must instead be refused when a struct's bytes are not
//! exactly its size. `Pod<T>` encodes the raw bytes and checks the length.

use std::fmt;

use serde::de::{Error as _, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// # Safety
/// Implementors are `repr(C)` structs of integers and arrays of integers, with
/// no padding-dependent invariants: every byte pattern is a valid value.
pub unsafe trait PlainData: Copy + Default {}

// SAFETY: each is a bindgen-generated repr(C) struct of integers (unions of
// integer arrays for the irqchip), valid for any byte pattern.
unsafe impl PlainData for kvm_bindings::kvm_regs {}
// SAFETY: as above.
unsafe impl PlainData for kvm_bindings::kvm_sregs {}
// SAFETY: as above.
unsafe impl PlainData for kvm_bindings::kvm_xcrs {}
// SAFETY: as above.
unsafe impl PlainData for kvm_bindings::kvm_lapic_state {}
// SAFETY: as above.
unsafe impl PlainData for kvm_bindings::kvm_mp_state {}
// SAFETY: as above.
unsafe impl PlainData for kvm_bindings::kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl PlainData for kvm_bindings::kvm_debugregs {}
// SAFETY: as above.
unsafe impl PlainData for kvm_bindings::kvm_irqchip {}
// SAFETY: as above.
unsafe impl PlainData for kvm_bindings::kvm_pit_state2 {}
// SAFETY: as above.
unsafe impl PlainData for kvm_bindings::kvm_clock_data {}

/// A KVM struct that serializes as exactly `size_of::<T>()` bytes.
#[derive(Clone, Copy, Default)]
pub struct Pod<T: PlainData>(pub T);

impl<T: PlainData> Pod<T> {
    fn bytes(&self) -> &[u8] {
        // SAFETY: T is plain data (PlainData), so viewing it as bytes is sound.
        unsafe {
            std::slice::from_raw_parts((&self.0 as *const T).cast(), std::mem::size_of::<T>())
        }
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != std::mem::size_of::<T>() {
            return None;
        }
        let mut v = T::default();
        // SAFETY: lengths match and any byte pattern is a valid T (PlainData).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast(), b.len()) };
        Some(Pod(v))
    }
}

impl<T: PlainData> fmt::Debug for Pod<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Pod<{}>({} bytes)",
            std::any::type_name::<T>(),
            self.bytes().len()
        )
    }
}

impl<T: PlainData> PartialEq for Pod<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl<T: PlainData> Serialize for Pod<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.bytes())
    }
}

impl<'de, T: PlainData> Deserialize<'de> for Pod<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: PlainData> Visitor<'_> for V<T> {
            type Value = Pod<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{} bytes", std::mem::size_of::<T>())
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Pod<T>, E> {
                Pod::from_bytes(b).ok_or_else(|| E::invalid_length(b.len(), &self))
            }
        }
        d.deserialize_bytes(V(std::marker::PhantomData))
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    #[test]
    fn round_trip_and_exact_length() {
        let regs = kvm_regs {
            rip: 0x1234,
            rflags: 2,
            ..Default::default()
        };
        let bytes = postcard::to_allocvec(&Pod(regs)).unwrap();
        let back: Pod<kvm_regs> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.0.rip, 0x1234);
        // One byte short: the length prefix no longer matches the struct.
        let mut short = postcard::to_allocvec(&[0u8; 143][..]).unwrap();
        assert!(postcard::from_bytes::<Pod<kvm_regs>>(&short).is_err());
        short.clear();
    }
}
