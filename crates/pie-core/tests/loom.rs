//! Model-checks the lock-free ring and its wake-up handshake with loom:
//! `RUSTFLAGS="--cfg loom" cargo test -p pie-core --test loom --release`.
//! A lost wake-up shows as a deadlock (the consumer parked for good, the
//! producer joining it), which loom reports as a failure.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use pie_core::fifo::ring;
use pie_core::wake::channel;

#[test]
fn spsc_ring_hands_over_every_item_in_order() {
    loom::model(|| {
        let (p, c) = ring::<usize>(2);
        let producer = loom::thread::spawn(move || {
            for i in 0..3 {
                let mut v = i;
                loop {
                    match p.push(v) {
                        Ok(()) => break,
                        Err(back) => {
                            v = back;
                            loom::thread::yield_now();
                        }
                    }
                }
            }
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            match c.pop() {
                Some(v) => got.push(v),
                None => loom::thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, vec![0, 1, 2]);
    });
}

#[test]
fn spsc_ring_drops_what_was_not_read() {
    loom::model(|| {
        let item = loom::sync::Arc::new(());
        let (p, c) = ring(2);
        let it = item.clone();
        let producer = loom::thread::spawn(move || {
            let _ = p.push(it);
        });
        let consumer = loom::thread::spawn(move || {
            let _ = c.pop();
        });
        producer.join().unwrap();
        consumer.join().unwrap();
        assert_eq!(loom::sync::Arc::strong_count(&item), 1);
    });
}

/// Runs `f` under loom with a preemption bound (overridable with
/// `LOOM_MAX_PREEMPTIONS`) that keeps each model to seconds.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

/// The producer pushes `items` into a ring of `capacity` (retrying while it
/// is full) while the consumer, spinning `spins` times before it sleeps,
/// drains and sleeps; every item arrives, in order, and the consumer never
/// stays asleep with an item waiting (else: deadlock at the join).
fn pushes_wake_the_consumer(capacity: usize, items: usize, spins: u32) {
    model(move || {
        let shutdown = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel::<usize>(capacity);
        let rx = rx.spin_first(spins);
        let flag = shutdown.clone();
        let consumer = loom::thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < items {
                got.push(rx.recv(&flag).expect("no shutdown in this model"));
            }
            got
        });
        let tx = tx.bind(consumer.thread().clone());
        for i in 0..items {
            let mut v = i;
            while let Err(back) = tx.push(v) {
                v = back;
                loom::thread::yield_now();
            }
        }
        assert_eq!(consumer.join().unwrap(), (0..items).collect::<Vec<_>>());
    });
}

#[test]
fn wake_every_push_reaches_a_sleeping_consumer() {
    pushes_wake_the_consumer(3, 3, 0);
}

#[test]
fn wake_full_ring_and_spinning_consumer() {
    pushes_wake_the_consumer(1, 2, 1);
}

/// Shutdown (flag, then notify) wakes a consumer that drains and sleeps: it
/// returns after taking everything pushed before.
#[test]
fn wake_shutdown_wakes_a_parked_consumer() {
    for items in 0..2 {
        model(move || {
            let shutdown = Arc::new(AtomicBool::new(false));
            let (tx, rx) = channel::<usize>(2);
            let flag = shutdown.clone();
            let consumer = loom::thread::spawn(move || {
                let mut got = 0;
                while rx.recv(&flag).is_some() {
                    got += 1;
                }
                got
            });
            let tx = tx.bind(consumer.thread().clone());
            for i in 0..items {
                tx.push(i).unwrap();
            }
            shutdown.store(true, Ordering::Release);
            tx.notify();
            assert_eq!(consumer.join().unwrap(), items);
        });
    }
}
