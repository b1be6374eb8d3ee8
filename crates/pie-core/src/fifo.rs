//! A bounded single-producer single-consumer ring: the swap FIFO (caller thread
//! -> swapper thread) and the telemetry ring (caller thread -> policy thread).
//!
//! Lamport's ring: the producer owns `tail`, the consumer owns `head`; each
//! publishes its index with `Release` and reads the other's with `Acquire`, so a
//! slot's contents are visible before the index that hands it over. Neither side
//! ever blocks: a full ring refuses the push and an empty ring returns `None`.
//! Model-checked with loom in `tests/loom.rs`.

#![allow(unsafe_code)]

use crate::primitive::{Arc, AtomicUsize, Ordering, UnsafeCell};
use std::mem::MaybeUninit;

struct Ring<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    /// Next slot the consumer reads (monotonic; index = head % len).
    head: AtomicUsize,
    /// Next slot the producer writes (monotonic).
    tail: AtomicUsize,
}

// SAFETY: a slot is written only by the one producer while it is outside
// `head..tail` and read only by the one consumer while it is inside; the
// Release/Acquire pair on `tail`/`head` orders those accesses, so sharing the
// ring between the two threads is sound whenever `T` itself may move between threads.
unsafe impl<T: Send> Sync for Ring<T> {}
// SAFETY: as above; the ring owns its `T`s.
unsafe impl<T: Send> Send for Ring<T> {}

/// The sending half of a ring. Not `Clone`: one producer only.
pub struct Producer<T> {
    ring: Arc<Ring<T>>,
}

/// The receiving half of a ring. Not `Clone`: one consumer only.
pub struct Consumer<T> {
    ring: Arc<Ring<T>>,
}

/// Creates a ring holding up to `capacity` items.
pub fn ring<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let capacity = capacity.max(1);
    let slots = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect::<Vec<_>>()
        .into_boxed_slice();
    let ring = Arc::new(Ring {
        slots,
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
    });
    (Producer { ring: ring.clone() }, Consumer { ring })
}

impl<T> Producer<T> {
    /// Appends `value`; gives it back if the ring is full.
    pub fn push(&self, value: T) -> Result<(), T> {
        let ring = &*self.ring;
        let tail = ring.tail.load(Ordering::Relaxed);
        let head = ring.head.load(Ordering::Acquire);
        if tail - head == ring.slots.len() {
            return Err(value);
        }
        let idx = tail % ring.slots.len();
        debug_assert!(idx < ring.slots.len());
        ring.slots[idx].with_mut(|p| {
            // SAFETY: slot `tail` is outside `head..tail`, so the consumer does not
            // touch it until the Release store below publishes it.
            unsafe { (*p).write(value) };
        });
        ring.tail.store(tail + 1, Ordering::Release);
        Ok(())
    }

    /// Number of items currently queued (a snapshot).
    pub fn len(&self) -> usize {
        self.ring.tail.load(Ordering::Relaxed) - self.ring.head.load(Ordering::Acquire)
    }

    /// Whether nothing is queued (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Consumer<T> {
    /// Removes the oldest item, if any.
    pub fn pop(&self) -> Option<T> {
        let ring = &*self.ring;
        let head = ring.head.load(Ordering::Relaxed);
        let tail = ring.tail.load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        let idx = head % ring.slots.len();
        debug_assert!(idx < ring.slots.len());
        let value = ring.slots[idx].with_mut(|p| {
            // SAFETY: slot `head` is inside `head..tail`: the producer wrote it and
            // published it with Release, which our Acquire load of `tail` observed.
            unsafe { (*p).assume_init_read() }
        });
        ring.head.store(head + 1, Ordering::Release);
        Some(value)
    }

    /// Whether nothing is queued (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.ring.head.load(Ordering::Relaxed) == self.ring.tail.load(Ordering::Acquire)
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        for i in head..tail {
            let idx = i % self.slots.len();
            self.slots[idx].with_mut(|p| {
                // SAFETY: items in `head..tail` were written and never read; both
                // halves are gone (we are in the last Arc's drop), so nothing races.
                unsafe { (*p).assume_init_drop() };
            });
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fifo_order_and_capacity() {
        let (p, c) = ring(3);
        assert!(c.pop().is_none());
        for i in 0..3 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(9), Err(9));
        assert_eq!(c.pop(), Some(0));
        p.push(3).unwrap();
        assert_eq!(
            (1..=3).map(|_| c.pop().unwrap()).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(c.is_empty());
    }

    #[test]
    fn drops_unread_items() {
        let item = std::sync::Arc::new(());
        {
            let (p, _c) = ring(4);
            p.push(item.clone()).unwrap();
            p.push(item.clone()).unwrap();
            assert_eq!(std::sync::Arc::strong_count(&item), 3);
        }
        assert_eq!(std::sync::Arc::strong_count(&item), 1);
    }

    #[test]
    fn threads_see_every_item_in_order() {
        let (p, c) = ring(8);
        let n = 100_000u64;
        let t = std::thread::spawn(move || {
            let mut expect = 0;
            while expect < n {
                if let Some(v) = c.pop() {
                    assert_eq!(v, expect);
                    expect += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
        });
        for i in 0..n {
            let mut v = i;
            while let Err(back) = p.push(v) {
                v = back;
                std::thread::yield_now();
            }
        }
        t.join().unwrap();
    }
}
