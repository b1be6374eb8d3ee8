//! Embedding the pie-rs engine in a Rust program, without Python: a layered
//! compute loop whose KV is pooled on the host backend, with every byte read
//! back checked against a reference.
//!
//! `cargo run -p pie-host --example embed --release`

use pie_core::{Engine, EngineOptions, LayerSpec, Plan, StaticPolicy};
use pie_host::check::{run_step, Reference};
use pie_host::HostBackend;

fn main() -> pie_core::Result<()> {
    let layers = 12;
    let spec = LayerSpec {
        batch: 2,
        kv_heads: 4,
        k_dim: 64,
        v_dim: 64,
        elem_size: 2,
    };
    let specs = vec![spec; layers];
    // Pool every other layer, with two staging slots on the "device".
    let plan = Plan::spread(layers, layers / 2, 2);
    let options = EngineOptions {
        capacity: 128,
        ..Default::default()
    };
    let mut engine = Engine::new(
        HostBackend::new()?,
        specs.clone(),
        options,
        Box::new(StaticPolicy::pinned(plan)),
    )?;
    let mut reference = Reference::new(&specs);
    // A prompt of 32 tokens, then 64 decode steps of one token.
    let mut bad = run_step(&mut engine, &mut reference, 32, 0)?;
    for step in 1..=64u64 {
        bad = bad.or(run_step(&mut engine, &mut reference, 1, step)?);
    }
    engine.flush_telemetry()?;
    let c = engine.counters();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "steps {}  pooled {:?}  device KV {} B (all resident would be {} B)",
        get(&c.steps),
        engine.plan().pooled,
        engine.device_bytes(),
        spec.bytes(engine.capacity()) * layers
    );
    println!(
        "h2d {} B  d2h {} B  prefetches {}  stall {:.3} ms",
        get(&c.h2d_bytes),
        get(&c.d2h_bytes),
        get(&c.prefetches),
        engine.stall_seconds() * 1e3
    );
    match bad {
        None => {
            println!("every KV byte read back matched the reference");
            Ok(())
        }
        Some(m) => Err(pie_core::PieError::state(format!("KV mismatch: {m:?}"))),
    }
}
