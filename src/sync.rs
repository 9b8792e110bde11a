//! The one lock helper every layer uses.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`. A lock poisoned by a thread that panicked holding it is taken over
/// as it is: the registers behind it are still the best state there is.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
