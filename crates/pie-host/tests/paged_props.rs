//! Property tests of scattered writes (a paged cache, as continuous batching
//! keeps it): every step writes random row ranges of every layer, in random
//! order, through `Engine::layer_written_ranges` on the host backend, under
//! random plans. Every layer read checks every row ever written against a
//! reference, so a lost or misplaced write-back or a prefetch that moved too
//! little shows up; and the bytes written back per step are exactly those of
//! the rows written to pooled layers: nothing that did not change is copied.

use pie_core::telemetry::Counters;
use pie_core::{Buffer, Engine, EngineOptions, LayerSpec, Plan, StaticPolicy, Stream};
use pie_host::check::{pattern, plan_of, token_id};
use pie_host::HostBackend;
use proptest::prelude::*;

const ROWS: usize = 64;

#[derive(Clone, Debug)]
enum Op {
    /// Row ranges written this step (the same for every layer, as a batch is).
    Step(Vec<(usize, usize)>),
    Plan(Vec<bool>, usize),
}

fn op(layers: usize) -> impl Strategy<Value = Op> {
    let range = (0..ROWS).prop_flat_map(|s| (Just(s), 0..=(ROWS - s).min(9)));
    prop_oneof![
        6 => proptest::collection::vec(range, 0..20).prop_map(Op::Step),
        1 => (proptest::collection::vec(any::<bool>(), layers), 1usize..4).prop_map(|(m, d)| Op::Plan(m, d)),
    ]
}

/// Row `r` of a layer's slot, K then V, as plain memory (host backend only).
fn row_bytes(base: usize, spec: &LayerSpec, cap: usize, kv: usize, r: usize) -> *mut u8 {
    let (off, tok) = if kv == 0 {
        (0, spec.k_token_bytes())
    } else {
        (spec.k_bytes(cap), spec.v_token_bytes())
    };
    (base + off + r * tok) as *mut u8
}

fn run(specs: Vec<LayerSpec>, initial: Plan, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut engine = Engine::new(
        HostBackend::new().unwrap(),
        specs.clone(),
        EngineOptions {
            capacity: ROWS,
            ..Default::default()
        },
        Box::new(StaticPolicy::pinned(initial)),
    )
    .unwrap();
    let stream = Stream::Foreign(0);
    // Per layer, per row: the identity of the token last written there.
    let mut reference: Vec<Vec<Option<u64>>> = vec![vec![None; ROWS]; specs.len()];
    let mut salt = 0u64;
    let mut ops = ops;
    ops.push(Op::Step(vec![(0, 1)])); // one last step reads everything back
    for op in ops {
        let ranges = match op {
            Op::Plan(mask, depth) => {
                engine.set_plan(plan_of(&mask, depth)).unwrap();
                continue;
            }
            Op::Step(ranges) => ranges,
        };
        salt += 1;
        engine.quiesce().unwrap();
        let mut d2h_before = 0;
        let mut expected_d2h = 0u64;
        let mut plan = engine.plan();
        for (l, spec) in specs.iter().enumerate() {
            engine.layer_begin(l, stream).unwrap();
            if l == 0 {
                // A pending plan applies as the step begins (its transition
                // spills resident layers: those bytes are not write-backs).
                plan = engine.plan();
                d2h_before = Counters::get(&engine.counters().d2h_bytes);
            }
            let off = engine.layer_ready(l, stream).unwrap();
            let arenas = engine.arenas();
            let base = arenas.device.addr() as usize + off;
            let cap = arenas.layout.capacity;
            for (r, id) in reference[l].iter().enumerate() {
                let Some(id) = *id else { continue };
                for kv in 0..2 {
                    let width = if kv == 0 {
                        spec.k_token_bytes()
                    } else {
                        spec.v_token_bytes()
                    };
                    let p = row_bytes(base, spec, cap, kv, r);
                    for i in 0..width {
                        // SAFETY: on the host backend the slot belongs to the
                        // caller between layer_ready and layer_done; `p + i`
                        // lies inside the layer's slot (row < capacity).
                        let got = unsafe { *p.add(i) };
                        prop_assert_eq!(
                            got,
                            pattern(id, kv, i),
                            "layer {} row {} kv {} byte {} under {:?}",
                            l,
                            r,
                            kv,
                            i,
                            plan
                        );
                    }
                }
            }
            for &(start, n) in &ranges {
                for (r, slot) in reference[l].iter_mut().enumerate().skip(start).take(n) {
                    let id = token_id(l, 0, r, salt);
                    for kv in 0..2 {
                        let width = if kv == 0 {
                            spec.k_token_bytes()
                        } else {
                            spec.v_token_bytes()
                        };
                        let p = row_bytes(base, spec, cap, kv, r);
                        for i in 0..width {
                            // SAFETY: as above.
                            unsafe { *p.add(i) = pattern(id, kv, i) };
                        }
                    }
                    *slot = Some(id);
                }
                if plan.is_pooled(l) {
                    expected_d2h += spec.valid_bytes(n) as u64;
                }
            }
            drop(arenas);
            let len = engine.layer_written_ranges(l, &ranges, stream).unwrap();
            let hwm = reference[l]
                .iter()
                .rposition(Option::is_some)
                .map_or(0, |r| r + 1);
            prop_assert_eq!(len, hwm);
            engine.layer_done(l, stream).unwrap();
        }
        engine.quiesce().unwrap();
        let moved = Counters::get(&engine.counters().d2h_bytes) - d2h_before;
        prop_assert_eq!(
            moved,
            expected_d2h,
            "write-back moved other bytes than the rows written"
        );
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
    fn scattered_writes_never_lose_or_corrupt_rows(
        mask in proptest::collection::vec(any::<bool>(), 4),
        depth in 1usize..4,
        ops in proptest::collection::vec(op(4), 1..14),
    ) {
        let spec = LayerSpec { batch: 1, kv_heads: 1, k_dim: 3, v_dim: 3, elem_size: 2 };
        run(vec![spec; 4], plan_of(&mask, depth), ops)?;
    }
}

#[test]
fn out_of_range_rows_are_refused() {
    let spec = LayerSpec {
        batch: 1,
        kv_heads: 1,
        k_dim: 2,
        v_dim: 2,
        elem_size: 2,
    };
    let mut engine = Engine::new(
        HostBackend::new().unwrap(),
        vec![spec; 2],
        EngineOptions {
            capacity: 8,
            ..Default::default()
        },
        Box::new(StaticPolicy::pinned(Plan::copying(vec![1], 1))),
    )
    .unwrap();
    let s = Stream::Foreign(0);
    engine.layer_begin(0, s).unwrap();
    engine.layer_ready(0, s).unwrap();
    let err = engine.layer_written_ranges(0, &[(6, 3)], s).unwrap_err();
    assert!(err.to_string().contains("beyond its capacity"), "{err}");
    // A pooled layer written outside a step (no prefetch queued) is a state error.
    let mut engine = Engine::new(
        HostBackend::new().unwrap(),
        vec![spec; 2],
        EngineOptions {
            capacity: 8,
            ..Default::default()
        },
        Box::new(StaticPolicy::pinned(Plan::copying(vec![0], 1))),
    )
    .unwrap();
    let err = engine.layer_written_ranges(0, &[(0, 1)], s).unwrap_err();
    assert!(err.to_string().contains("before layer_ready"), "{err}");
}
