//! A [`fifo`](crate::fifo) ring whose consumer thread sleeps when the ring is
//! empty and is woken by the next push: the swap FIFO (caller -> swapper) and
//! the telemetry ring (caller -> policy thread). Model-checked with loom in
//! `tests/loom.rs`.
//!
//! # The handshake
//!
//! Beside the ring sits one atomic word, `state`, holding one of
//! * `EMPTY`: nothing announced since the consumer last took a notification;
//! * `NOTIFIED`: the producer published something since then;
//! * `PARKED`: the consumer found the ring empty and sleeps (or is about to).
//!
//! The producer, after each push (and after setting the shutdown flag), does
//! one `swap(NOTIFIED, Release)` and unparks the consumer only if it read
//! `PARKED`. The consumer, having polled an empty ring (and no shutdown):
//! 1. tries `EMPTY -> PARKED` with a compare-exchange; on success it parks
//!    until `state` is no longer `PARKED` (a spurious or stale unpark parks
//!    again);
//! 2. takes the notification with `swap(EMPTY, Acquire)`, and polls again.
//!
//! Only the producer writes `NOTIFIED`; only the consumer writes `EMPTY` and
//! `PARKED`; every write is a read-modify-write. The cost: one atomic swap per
//! push on the caller's hot path (it never reads the consumer's state first),
//! and a syscall only when the consumer is really parked. The consumer may
//! spin a while before it sleeps ([`Receiver::spin_first`]).
//!
//! # Why a wake-up cannot be lost
//!
//! All read-modify-writes of one location fall in a single total order (its
//! modification order), each reading the value the previous one wrote; no
//! `SeqCst` reasoning about two locations is needed (the store-buffer
//! pattern, a flag stored then the ring read on one side and the ring stored
//! then the flag read on the other, needs it and is what this replaces).
//! Take a push `P` and the swap `S` after it, and suppose the consumer parks
//! for good after its successful compare-exchange `C`.
//! * `S` after `C`: the writes between `C` and `S` are all producer swaps (a
//!   parked consumer writes nothing), so the first of them reads `PARKED` and
//!   unparks the consumer, which then sees `state != PARKED`. Contradiction.
//! * `S` before `C`: `C` read `EMPTY` although `S` wrote `NOTIFIED`, so a
//!   consumer swap `W` to `EMPTY` lies between them. `W` reads `S`'s value or
//!   that of a later read-modify-write, which continues `S`'s release
//!   sequence, so `W` (Acquire) synchronizes with `S` (Release): `P` happens
//!   before the poll the consumer makes after `W`, before `C`. That poll finds
//!   `P`'s item.
//!
//! So the consumer never sleeps for good while an item pushed before a notify
//! is unseen; the shutdown flag, stored before its notify, is seen alike. On
//! seeing the flag the consumer polls once more: the flag's Acquire makes
//! visible what was pushed before it, which the earlier poll may have missed
//! (loom found that one).
//! An unpark that arrives before the consumer calls `park` is kept as the
//! thread's token (std and loom alike), so `park` returns at once.
//!
//! Skipping the swap when the state already reads `NOTIFIED` would bring the
//! race back: a plain load publishes nothing, so the consumer's `W` could
//! synchronize with an older swap only and miss the newer item.

use crate::fifo::{ring, Consumer, Producer};
use crate::primitive::{park, spin_loop, Arc, AtomicBool, AtomicUsize, Ordering, Thread};

const EMPTY: usize = 0;
const NOTIFIED: usize = 1;
const PARKED: usize = 2;

/// Creates a ring holding up to `capacity` items, with its wake-up state. Bind
/// the sending half to the thread that will call [`Receiver::recv`].
pub fn channel<T>(capacity: usize) -> (Unbound<T>, Receiver<T>) {
    let (producer, consumer) = ring(capacity);
    let state = Arc::new(AtomicUsize::new(EMPTY));
    (
        Unbound {
            ring: producer,
            state: state.clone(),
        },
        Receiver {
            ring: consumer,
            state,
            spins: 0,
        },
    )
}

/// The sending half before its consumer thread exists.
pub struct Unbound<T> {
    ring: Producer<T>,
    state: Arc<AtomicUsize>,
}

impl<T> Unbound<T> {
    /// The sending half, waking `consumer`: the only thread that may call
    /// [`Receiver::recv`] on the other half.
    pub fn bind(self, consumer: Thread) -> Sender<T> {
        Sender {
            ring: self.ring,
            state: self.state,
            consumer,
        }
    }
}

/// The sending half: pushes and wakes the consumer. Not `Clone`: one producer.
pub struct Sender<T> {
    ring: Producer<T>,
    state: Arc<AtomicUsize>,
    consumer: Thread,
}

impl<T> Sender<T> {
    /// Appends `value` and wakes the consumer; gives `value` back if the ring
    /// is full (the consumer is then awake: it sleeps only on an empty ring).
    pub fn push(&self, value: T) -> Result<(), T> {
        self.ring.push(value)?;
        self.notify();
        Ok(())
    }

    /// Makes the consumer poll again: after a push, or after setting the flag
    /// that [`Receiver::recv`] watches.
    pub fn notify(&self) {
        if self.state.swap(NOTIFIED, Ordering::Release) == PARKED {
            self.consumer.unpark();
        }
    }
}

/// The receiving half. Not `Clone`: one consumer, the thread the sender was
/// bound to.
pub struct Receiver<T> {
    ring: Consumer<T>,
    state: Arc<AtomicUsize>,
    spins: u32,
}

impl<T> Receiver<T> {
    /// Polls an empty ring `spins` more times before sleeping (a latency
    /// trade: the swapper's next op usually follows within microseconds).
    pub fn spin_first(mut self, spins: u32) -> Self {
        self.spins = spins;
        self
    }

    /// The oldest item, waiting for one if the ring is empty; `None` once
    /// `shutdown` is set and the ring is empty (the producer must
    /// [`Sender::notify`] after setting it).
    pub fn recv(&self, shutdown: &AtomicBool) -> Option<T> {
        let mut idle = 0u32;
        loop {
            if let Some(value) = self.ring.pop() {
                return Some(value);
            }
            if shutdown.load(Ordering::Acquire) {
                // The poll above may predate items pushed before the flag was
                // set; the flag's Acquire makes them visible now.
                return self.ring.pop();
            }
            if idle < self.spins {
                idle += 1;
                spin_loop();
            } else {
                self.sleep();
            }
        }
    }

    /// Sleeps until notified; returns at once if notified since the last call.
    fn sleep(&self) {
        if self
            .state
            .compare_exchange(EMPTY, PARKED, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            while self.state.load(Ordering::Relaxed) == PARKED {
                park();
            }
        }
        // Synchronizes with the producer's latest swap: what it published
        // before notifying is visible to the next poll.
        self.state.swap(EMPTY, Ordering::Acquire);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wakes_a_parked_consumer_and_stops_on_shutdown() {
        let shutdown = std::sync::Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel::<u32>(4);
        let flag = shutdown.clone();
        let consumer = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(v) = rx.recv(&flag) {
                got.push(v);
            }
            got
        });
        let tx = tx.bind(consumer.thread().clone());
        for i in 0..100 {
            while tx.push(i).is_err() {
                std::thread::yield_now();
            }
            if i % 10 == 0 {
                // Long enough for the consumer to park: the push must wake it.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        shutdown.store(true, Ordering::Release);
        tx.notify();
        assert_eq!(consumer.join().unwrap(), (0..100).collect::<Vec<_>>());
    }
}
