//! The per-layer hook path on the caller's thread: begin / ready / written /
//! done for one layer, on the host backend. Target: under 2 microseconds per
//! layer. `cargo bench -p pie-host --bench hook_path`

use criterion::{criterion_group, criterion_main, Criterion};
use pie_core::{Engine, EngineOptions, LayerSpec, Plan, StaticPolicy, Stream};
use pie_host::HostBackend;
use std::hint::black_box;

const LAYERS: usize = 32;

fn engine(plan: Plan) -> Engine<HostBackend> {
    let spec = LayerSpec {
        batch: 1,
        kv_heads: 2,
        k_dim: 16,
        v_dim: 16,
        elem_size: 2,
    };
    Engine::new(
        HostBackend::new().unwrap(),
        vec![spec; LAYERS],
        EngineOptions {
            capacity: 1 << 16,
            ..Default::default()
        },
        Box::new(StaticPolicy::pinned(plan)),
    )
    .unwrap()
}

/// One step through every layer, one new token each; returns per-layer time.
fn step(e: &mut Engine<HostBackend>) {
    let s = Stream::Foreign(0);
    for l in 0..LAYERS {
        e.layer_begin(l, s).unwrap();
        black_box(e.layer_ready(l, s).unwrap());
        e.layer_written(l, 1, s).unwrap();
        e.layer_done(l, s).unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("hook_path_per_layer");
    g.throughput(criterion::Throughput::Elements(LAYERS as u64));
    for (name, plan) in [
        ("all_resident", Plan::all_resident()),
        ("quarter_pooled_w2", Plan::spread(LAYERS, LAYERS / 4, 2)),
    ] {
        let mut e = engine(plan);
        let mut steps = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                step(&mut e);
                steps += 1;
                if steps.is_multiple_of(4096) {
                    // Keep the KV short so copies stay small: crop back.
                    e.quiesce().unwrap();
                    for l in 0..LAYERS {
                        e.set_seq_len(l, 0).unwrap();
                    }
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
