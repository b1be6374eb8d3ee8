//! Property tests: random sequences of steps, plan changes, growth, reorders,
//! crops and resets on the host backend, checked against a plain in-memory
//! reference. Every layer read checks every valid byte, so a prefetch that had
//! not completed, a staging slot overwritten while still read, or a lost
//! write-back all show up as mismatches.

use pie_core::{Engine, EngineOptions, LayerSpec, Plan, StaticPolicy};
use pie_host::check::{crop, placed_plan_of, reorder, run_step, Reference};
use pie_host::HostBackend;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Step(usize),
    /// Pooled layers, host-attended ones among them, prefetch depth.
    Plan(Vec<bool>, Vec<bool>, usize),
    Grow(usize),
    Reorder(Vec<usize>),
    Crop(usize),
    Reset,
}

fn op(layers: usize, batch: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..4).prop_map(Op::Step),
        2 => (proptest::collection::vec(any::<bool>(), layers), proptest::collection::vec(any::<bool>(), layers), 1usize..4)
            .prop_map(|(m, h, d)| Op::Plan(m, h, d)),
        1 => (1usize..24).prop_map(Op::Grow),
        1 => proptest::collection::vec(0..batch, batch).prop_map(Op::Reorder),
        1 => (0usize..12).prop_map(Op::Crop),
        1 => Just(Op::Reset),
    ]
}

/// `layers` one-sequence, one-head layers of 4 f32 per token in K and in V.
fn tiny_specs(layers: usize) -> Vec<LayerSpec> {
    vec![
        LayerSpec {
            batch: 1,
            kv_heads: 1,
            k_dim: 4,
            v_dim: 4,
            elem_size: 4,
        };
        layers
    ]
}

/// A host-backend engine of `specs` at `capacity` tokens holding `plan`.
fn pinned_engine(specs: &[LayerSpec], capacity: usize, plan: Plan) -> Engine<HostBackend> {
    Engine::new(
        HostBackend::new().unwrap(),
        specs.to_vec(),
        EngineOptions {
            capacity,
            ..Default::default()
        },
        Box::new(StaticPolicy::pinned(plan)),
    )
    .unwrap()
}

fn run(specs: Vec<LayerSpec>, initial: Plan, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut engine = pinned_engine(&specs, 4, initial);
    let mut reference = Reference::new(&specs);
    let mut salt = 0u64;
    for op in ops {
        match op {
            Op::Step(n) => {
                salt += 1;
                let bad = run_step(&mut engine, &mut reference, n, salt).unwrap();
                prop_assert!(
                    bad.is_none(),
                    "KV mismatch {:?} after {:?}",
                    bad,
                    engine.plan()
                );
            }
            Op::Plan(mask, host, depth) => engine
                .set_plan(placed_plan_of(&mask, &host, depth))
                .unwrap(),
            Op::Grow(extra) => {
                let cap = engine.capacity();
                engine.resize(cap + extra).unwrap();
            }
            Op::Reorder(idx) => reorder(&mut engine, &mut reference, &idx).unwrap(),
            Op::Crop(n) => crop(&mut engine, &mut reference, n).unwrap(),
            Op::Reset => crop(&mut engine, &mut reference, 0).unwrap(),
        }
    }
    // One last step reads everything back.
    let bad = run_step(&mut engine, &mut reference, 1, salt + 1).unwrap();
    prop_assert!(bad.is_none(), "KV mismatch {:?} at the end", bad);
    for l in 0..specs.len() {
        prop_assert_eq!(engine.seq_len(l).unwrap(), reference.len(l));
    }
    prop_assert!(engine.failure().is_none());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_never_lose_or_corrupt_kv(
        layers in 1usize..7,
        batch in 1usize..4,
        heads in 1usize..3,
        k_dim in 1usize..5,
        v_dim in 1usize..5,
        seed_mask in proptest::collection::vec(any::<bool>(), 7),
        seed_host in proptest::collection::vec(any::<bool>(), 7),
        depth in 1usize..4,
        ops in proptest::collection::vec(op(6, 3), 1..24),
    ) {
        let specs: Vec<LayerSpec> = (0..layers)
            .map(|i| LayerSpec { batch, kv_heads: heads, k_dim: k_dim + i % 2, v_dim, elem_size: 2 })
            .collect();
        let ops: Vec<Op> = ops
            .into_iter()
            .map(|o| match o {
                Op::Plan(m, h, d) => Op::Plan(m[..layers].to_vec(), h[..layers].to_vec(), d),
                Op::Reorder(idx) => Op::Reorder(idx.into_iter().map(|i| i % batch).chain(std::iter::repeat(0)).take(batch).collect()),
                other => other,
            })
            .collect();
        run(specs, placed_plan_of(&seed_mask[..layers], &seed_host[..layers], depth), ops)?;
    }
}

#[test]
fn interrupted_step_keeps_the_pool_usable() {
    let specs = vec![
        LayerSpec {
            batch: 2,
            kv_heads: 2,
            k_dim: 4,
            v_dim: 4,
            elem_size: 2
        };
        6
    ];
    let mut engine = pinned_engine(&specs, 8, Plan::spread(6, 4, 2));
    let mut reference = Reference::new(&specs);
    assert!(run_step(&mut engine, &mut reference, 3, 1)
        .unwrap()
        .is_none());
    // A step that stops after layer 2 (an exception in the model): its layers
    // 0..=2 hold the new token, the others do not, as with DynamicCache.
    let s = pie_core::Stream::Foreign(0);
    for l in 0..3 {
        engine.layer_begin(l, s).unwrap();
        engine.layer_ready(l, s).unwrap();
    }
    // Roll back to the consistent state: nothing was written in that step.
    assert!(run_step(&mut engine, &mut reference, 1, 2)
        .unwrap()
        .is_none());
    assert!(run_step(&mut engine, &mut reference, 1, 3)
        .unwrap()
        .is_none());
}

#[test]
fn budget_is_never_exceeded_and_too_small_a_budget_is_refused() {
    let specs = vec![
        LayerSpec {
            batch: 1,
            kv_heads: 2,
            k_dim: 8,
            v_dim: 8,
            elem_size: 2
        };
        8
    ];
    let one = specs[0].bytes(64);
    let budget = 4 * one + 100;
    let mut engine = Engine::new(
        HostBackend::new().unwrap(),
        specs.clone(),
        EngineOptions {
            capacity: 64,
            device_budget: Some(budget),
            ..Default::default()
        },
        Box::new(StaticPolicy::budget_fit(2)),
    )
    .unwrap();
    assert!(engine.device_bytes() <= budget);
    assert!(!engine.plan().pooled.is_empty());
    let mut reference = Reference::new(&specs);
    for salt in 0..20 {
        assert!(run_step(&mut engine, &mut reference, 4, salt)
            .unwrap()
            .is_none());
        assert!(engine.device_bytes() <= budget);
    }
    let peak = engine
        .counters()
        .peak_device_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(peak as usize <= budget, "peak {peak} above budget {budget}");
    let err = Engine::new(
        HostBackend::new().unwrap(),
        specs,
        EngineOptions {
            capacity: 64,
            device_budget: Some(one / 2),
            ..Default::default()
        },
        Box::new(StaticPolicy::budget_fit(2)),
    )
    .err()
    .expect("half a layer cannot hold a staging slot");
    assert_eq!(err.kind(), pie_core::ErrorKind::Budget);
    assert!(err.to_string().contains("raise gpu_budget"));
}

#[test]
fn prefetch_bytes_match_the_plan() {
    let specs = tiny_specs(6);
    let mut engine = pinned_engine(&specs, 64, Plan::spread(6, 3, 1));
    let mut reference = Reference::new(&specs);
    // Prefill: the step's own prefetches find empty layers and move nothing.
    run_step(&mut engine, &mut reference, 5, 0).unwrap();
    engine.quiesce().unwrap();
    let predicted = engine.predicted_h2d_bytes_per_step();
    assert_eq!(predicted, 3 * specs[0].bytes(5) as u64);
    run_step(&mut engine, &mut reference, 1, 1).unwrap();
    engine.quiesce().unwrap();
    let moved = engine
        .counters()
        .h2d_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    // Each prefetch moves a layer's tokens before that step's own write: the
    // decode step moved exactly the prediction (5 tokens per pooled layer),
    // plus the W = 1 prefetch already issued for the next step (6 tokens).
    assert_eq!(moved, predicted + specs[0].bytes(6) as u64);
}

#[test]
fn host_attended_layers_are_never_copied_and_are_counted() {
    let specs = tiny_specs(4);
    // Every pooled layer attended on the host: no staging slot, no copy.
    let plan = placed_plan_of(&[false, true, false, true], &[false, true, false, true], 1);
    assert_eq!(plan.staging_slots(), 0);
    let mut engine = pinned_engine(&specs, 16, plan);
    let mut reference = Reference::new(&specs);
    for salt in 0..5 {
        assert!(run_step(&mut engine, &mut reference, 2, salt)
            .unwrap()
            .is_none());
    }
    engine.quiesce().unwrap();
    let c = engine.counters();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(&c.h2d_bytes), 0, "a host-attended layer was prefetched");
    assert_eq!(
        get(&c.d2h_bytes),
        0,
        "a host-attended layer was written back"
    );
    assert_eq!(get(&c.host_attended_layer_steps), 2 * 5);
    assert_eq!(engine.predicted_h2d_bytes_per_step(), 0);
    // The plain layer_ready refuses a host-attended layer: it has no device offset.
    let s = pie_core::Stream::Foreign(0);
    engine.layer_begin(0, s).unwrap();
    engine.layer_ready(0, s).unwrap();
    engine.layer_written(0, 0, s).unwrap();
    engine.layer_done(0, s).unwrap();
    engine.layer_begin(1, s).unwrap();
    let err = engine.layer_ready(1, s).unwrap_err();
    assert!(err.to_string().contains("attended on the host"), "{err}");
    // Switching the same pooled layers to copied keeps every token.
    let mut engine = engine;
    engine
        .set_plan(placed_plan_of(&[false, true, false, true], &[], 1))
        .unwrap();
    assert!(run_step(&mut engine, &mut reference, 1, 9)
        .unwrap()
        .is_none());
    assert!(run_step(&mut engine, &mut reference, 1, 10)
        .unwrap()
        .is_none());
}
