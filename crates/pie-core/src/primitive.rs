//! Atomics, cells and thread parking, swapped for loom's model-checked ones
//! under `--cfg loom` (as crossbeam does), so the lock-free pieces (the ring in
//! [`crate::fifo`], the wake-up handshake in [`crate::wake`]) are checked by
//! `tests/loom.rs`.

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(loom)]
pub(crate) use loom::{
    hint::spin_loop,
    thread::{park, Builder as ThreadBuilder, JoinHandle, Thread},
};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::{
    hint::spin_loop,
    thread::{park, Builder as ThreadBuilder, JoinHandle, Thread},
};

/// `std`'s `UnsafeCell` with loom's closure-based access API, so the ring's
/// code is identical in both builds.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(value))
    }

    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
