//! Model-checks the lock-free ring with loom:
//! `RUSTFLAGS="--cfg loom" cargo test -p pie-core --test loom --release`.
#![cfg(loom)]

use pie_core::fifo::ring;

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
