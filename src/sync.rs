//! Small helpers for the standard library's locks.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, ignoring poisoning. Every mutex this crate takes guards state that a panic
/// cannot leave half-updated in a way that matters (each critical section is a push, a swap, or
/// a few field writes), so a lock poisoned by a panic elsewhere is still safe to use.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
