//! The engine's two background threads: they sleep when idle, wake on the
//! next push with no timeout to fall back on (`pie_core::wake`), stop promptly
//! on close, and a hung copy engine still surfaces within `wait_timeout`.

use pie_core::{Engine, EngineOptions, LayerSpec, Plan, StaticPolicy};
use pie_host::check::{run_step, Reference};
use pie_host::{FaultConfig, HostBackend};
use std::time::{Duration, Instant};

fn specs() -> Vec<LayerSpec> {
    vec![
        LayerSpec {
            batch: 2,
            kv_heads: 2,
            k_dim: 4,
            v_dim: 4,
            elem_size: 2
        };
        6
    ]
}

fn engine(backend: HostBackend, wait_timeout: Duration) -> Engine<HostBackend> {
    Engine::new(
        backend,
        specs(),
        EngineOptions {
            capacity: 64,
            wait_timeout,
            ..Default::default()
        },
        Box::new(StaticPolicy::pinned(Plan::spread(6, 4, 2))),
    )
    .unwrap()
}

#[test]
fn sleeping_threads_wake_on_the_next_push_and_close_promptly() {
    // A lost wake-up would stall a step until this timeout and fail it.
    let mut engine = engine(HostBackend::new().unwrap(), Duration::from_secs(5));
    let mut reference = Reference::new(&specs());
    for salt in 0..40 {
        if salt % 4 == 0 {
            // Long enough for both threads to spin out and park.
            std::thread::sleep(Duration::from_millis(3));
        }
        assert!(run_step(&mut engine, &mut reference, 1, salt)
            .unwrap()
            .is_none());
    }
    engine.flush_telemetry().unwrap();
    std::thread::sleep(Duration::from_millis(3));
    let start = Instant::now();
    engine.close();
    let took = start.elapsed();
    eprintln!("close of an idle engine took {took:?}");
    assert!(engine.failure().is_none());
    // Both threads are parked: close must wake them, not wait out a timeout.
    assert!(took < Duration::from_millis(500), "close took {took:?}");
}

#[test]
fn hung_copy_surfaces_within_the_wait_timeout() {
    let timeout = Duration::from_millis(300);
    let mut backend = HostBackend::with_faults(FaultConfig {
        hang_copy_at: Some(5),
        ..Default::default()
    })
    .unwrap();
    backend.set_timeout(timeout);
    let mut engine = engine(backend, timeout);
    let mut reference = Reference::new(&specs());
    let start = Instant::now();
    let err = (0..20)
        .find_map(|salt| run_step(&mut engine, &mut reference, 1, salt).err())
        .expect("the hung copy must surface as an error");
    let took = start.elapsed();
    eprintln!("the hang surfaced after {took:?}: {err}");
    // Which error wins is a race inside the host backend's fault injection
    // (the hung queue's thread exits): the injected fault, the queue's wait
    // timing out, or "the copy thread stopped". All name a copy.
    assert!(err.to_string().contains("copy"), "{err}");
    assert!(
        took < timeout + Duration::from_secs(1),
        "surfaced after {took:?}"
    );
    let start = Instant::now();
    engine.close();
    // close waits at most one timeout for the stuck queue, then leaks its arenas.
    let took = start.elapsed();
    eprintln!("close after the hang took {took:?}");
    assert!(
        took < timeout + Duration::from_secs(1),
        "close took {took:?}"
    );
}
