//! The real engine (swapper thread, FIFO, events) driven on the sim backend in
//! virtual time: its steady-state step time and stall equal the cost model's
//! prediction for the same plan, both when the copies hide under compute
//! (zero stall) and when they do not (stall of exactly the predicted amount).

use pie_core::policy::{predict_step, LinkModel, Objective, PolicyInputs};
use pie_core::sim::{SimBackend, SimConfig};
use pie_core::{Engine, EngineOptions, LayerSpec, Plan, StaticPolicy, Stream};

const LAYERS: usize = 8;
const TOKENS: usize = 1024;

fn spec() -> LayerSpec {
    LayerSpec {
        batch: 4,
        kv_heads: 8,
        k_dim: 128,
        v_dim: 128,
        elem_size: 2,
    }
}

/// Steady-state step seconds of the engine under `plan`, in virtual time.
fn engine_step(plan: &Plan, compute: f64, bandwidth: f64) -> f64 {
    let sim = SimBackend::new(SimConfig {
        h2d_bandwidth: bandwidth,
        d2h_bandwidth: bandwidth,
        h2d_latency: 0.0,
        d2h_latency: 0.0,
        ..SimConfig::default()
    })
    .unwrap();
    let mut e = Engine::new(
        sim,
        vec![spec(); LAYERS],
        EngineOptions {
            capacity: TOKENS + 64,
            ..Default::default()
        },
        Box::new(StaticPolicy::pinned(plan.clone())),
    )
    .unwrap();
    let s = Stream::Foreign(0);
    let step = |e: &mut Engine<SimBackend>, n: usize| {
        let t0 = e.backend().stream_clock(s);
        for l in 0..LAYERS {
            e.layer_begin(l, s).unwrap();
            e.layer_ready(l, s).unwrap();
            e.backend().compute(s, compute).unwrap();
            e.layer_written(l, n, s).unwrap();
            e.layer_done(l, s).unwrap();
        }
        e.backend().stream_clock(s) - t0
    };
    step(&mut e, TOKENS);
    let mut last = 0.0;
    for _ in 0..6 {
        last = step(&mut e, 1);
    }
    last
}

fn predicted(plan: &Plan, compute: f64, bandwidth: f64) -> (f64, f64) {
    let s = spec();
    let inputs = PolicyInputs {
        compute_seconds: vec![compute; LAYERS],
        layer_bytes: vec![s.bytes(TOKENS + 64) as u64; LAYERS],
        // At steady state the prefetch moves ~TOKENS + 5 tokens; one token per
        // layer is 16 KiB here, so the tolerance below covers it.
        valid_bytes: vec![s.bytes(TOKENS + 5) as u64; LAYERS],
        writeback_bytes: vec![s.bytes(1) as u64; LAYERS],
        link: LinkModel::symmetric(bandwidth, 0.0),
        budget_bytes: None,
        objective: Objective::Speed,
        host: None,
    };
    let p = predict_step(&inputs, plan).unwrap();
    (p.step_seconds, p.stall_seconds)
}

#[test]
fn copies_that_fit_under_compute_do_not_stall() {
    // 16 MiB per layer at 50 GB/s is 0.34 ms, under two layers of 0.5 ms.
    let plan = Plan::spread(LAYERS, 4, 2);
    let got = engine_step(&plan, 0.5e-3, 50e9);
    let (want, stall) = predicted(&plan, 0.5e-3, 50e9);
    assert_eq!(stall, 0.0);
    assert!(
        (got - LAYERS as f64 * 0.5e-3).abs() < 1e-9,
        "engine step {got}"
    );
    assert!((got - want).abs() < 1e-9, "engine {got} vs model {want}");
}

#[test]
fn copies_that_do_not_fit_stall_by_the_predicted_amount() {
    // Every layer pooled through one slot at 10 GB/s: 1.7 ms copies under 0.2 ms compute.
    let plan = Plan::spread(LAYERS, LAYERS, 1);
    let got = engine_step(&plan, 0.2e-3, 10e9);
    let (want, stall) = predicted(&plan, 0.2e-3, 10e9);
    assert!(stall > 0.0);
    let rel = (got - want).abs() / want;
    assert!(rel < 0.01, "engine {got} vs model {want} (stall {stall})");
    assert!(got > LAYERS as f64 * 0.2e-3 + 0.9 * stall);
}
