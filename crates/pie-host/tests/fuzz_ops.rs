//! Fuzzing the engine's API with random operation sequences that mix valid
//! calls with invalid ones: out-of-range layers, `layer_ready`/`layer_done`
//! outside a step, steps abandoned half-way, `set_seq_len` growing a layer,
//! resizes below the valid length, plans with bad indices or depth 0, budgets
//! too small, absurd capacities.
//!
//! For every operation: no panic escapes (each call runs under
//! `catch_unwind`), an invalid call returns a [`PieError`] of the expected
//! kind with a message, and after every error a valid step still reads back
//! exactly the KV a plain in-memory reference holds (`check::run_step` checks
//! every valid byte of every layer).
//!
//! The default case count is modest (fast in `cargo test`); the nightly-style
//! run is `PROPTEST_CASES=20000 cargo test -p pie-host --release --test fuzz_ops`.

use pie_core::slots::ArenaLayout;
use pie_core::{Engine, EngineOptions, ErrorKind, LayerSpec, PieError, Plan, StaticPolicy, Stream};
use pie_host::check::{crop, plan_of, reorder, run_step, Reference};
use pie_host::HostBackend;
use proptest::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

const S: Stream = Stream::Foreign(0);

/// An invalid plan, by how it is wrong.
#[derive(Clone, Debug)]
enum BadPlan {
    /// A pooled index at or past the number of layers.
    OutOfRange(usize),
    /// The same layer twice.
    Duplicate(usize),
    /// Indices not increasing.
    Unsorted,
    /// Layers pooled with no staging slot.
    DepthZero,
}

#[derive(Clone, Debug)]
enum Op {
    // Valid operations, mirrored in the reference.
    Step(usize),
    Plan(Vec<bool>, usize),
    Grow(usize),
    Reorder(Vec<usize>),
    Crop(usize),
    // Misuse the engine must survive.
    /// Begins layers `0..k` (with `layer_ready`, optionally `layer_done`) and
    /// abandons the step, as an exception between layers does.
    Abandon(usize, bool),
    /// `which` engine call with a layer index `num_layers + extra`.
    LayerOutOfRange(u8, usize),
    /// `layer_ready` while no step is open (after a completed step).
    ReadyOutsideStep(usize),
    /// `layer_done` on a layer that did not begin.
    DoneWithoutBegin(usize),
    /// `set_seq_len` above the layer's length.
    GrowSeqLen(usize, usize),
    /// `resize` below the longest layer (or to 0).
    ResizeBelow(usize),
    BadPlan(BadPlan),
    /// `ensure_capacity`/`resize` to an absurd number of tokens.
    Huge(usize, bool),
}

/// Capacities no machine can hold; the first three overflow `usize` byte counts.
const HUGE: [usize; 6] = [
    usize::MAX,
    usize::MAX / 2,
    usize::MAX / 3 + 7,
    1 << 48,
    1 << 40,
    1 << 36,
];

fn op(layers: usize, batch: usize) -> impl Strategy<Value = Op> {
    let bad_plan = prop_oneof![
        (0usize..4).prop_map(BadPlan::OutOfRange),
        (0usize..layers).prop_map(BadPlan::Duplicate),
        Just(BadPlan::Unsorted),
        Just(BadPlan::DepthZero),
    ];
    prop_oneof![
        8 => (1usize..4).prop_map(Op::Step),
        2 => (proptest::collection::vec(any::<bool>(), layers), 1usize..4)
            .prop_map(|(m, d)| Op::Plan(m, d)),
        1 => (1usize..24).prop_map(Op::Grow),
        1 => proptest::collection::vec(0..batch, batch).prop_map(Op::Reorder),
        1 => (0usize..12).prop_map(Op::Crop),
        3 => (0usize..layers, any::<bool>()).prop_map(|(k, d)| Op::Abandon(k, d)),
        2 => (0u8..7, 0usize..1000).prop_map(|(w, x)| Op::LayerOutOfRange(w, x)),
        1 => (0usize..layers).prop_map(Op::ReadyOutsideStep),
        1 => (0usize..layers).prop_map(Op::DoneWithoutBegin),
        1 => (0usize..layers, 0usize..5).prop_map(|(l, x)| Op::GrowSeqLen(l, x)),
        1 => (0usize..3).prop_map(Op::ResizeBelow),
        2 => bad_plan.prop_map(Op::BadPlan),
        1 => (0usize..HUGE.len(), any::<bool>()).prop_map(|(i, r)| Op::Huge(HUGE[i], r)),
    ]
}

/// Runs `f`, turning a panic into a test failure that names the operation.
fn no_panic<T>(what: &dyn std::fmt::Debug, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        TestCaseError::fail(format!("{what:?} panicked: {msg}"))
    })
}

/// Checks `r` is an error of one of `kinds` with a non-empty message.
fn expect_err<T: std::fmt::Debug>(
    what: &dyn std::fmt::Debug,
    r: Result<T, PieError>,
    kinds: &[ErrorKind],
) -> Result<Option<PieError>, TestCaseError> {
    match r {
        Ok(v) => Err(TestCaseError::fail(format!(
            "{what:?} should have failed with one of {kinds:?}, returned {v:?}"
        ))),
        Err(e) => {
            prop_assert!(
                kinds.contains(&e.kind()),
                "{:?} failed with {:?} ({}), expected one of {:?}",
                what,
                e.kind(),
                e,
                kinds
            );
            prop_assert!(
                e.to_string().len() > 10,
                "terse message {:?}",
                e.to_string()
            );
            Ok(Some(e))
        }
    }
}

/// Accepts success or an error of one of `kinds`.
fn ok_or<T>(
    what: &dyn std::fmt::Debug,
    r: Result<T, PieError>,
    kinds: &[ErrorKind],
) -> Result<Option<PieError>, TestCaseError> {
    match r {
        Ok(_) => Ok(None),
        Err(e) => expect_err::<()>(what, Err(e), kinds),
    }
}

struct Harness {
    engine: Engine<HostBackend>,
    reference: Reference,
    salt: u64,
    budget: Option<usize>,
}

impl Harness {
    fn step(&mut self, n: usize, after: &dyn std::fmt::Debug) -> Result<(), TestCaseError> {
        self.salt += 1;
        let (engine, reference, salt) = (&mut self.engine, &mut self.reference, self.salt);
        let r = no_panic(after, || run_step(engine, reference, n, salt))?;
        match r {
            Ok(bad) => prop_assert!(
                bad.is_none(),
                "KV mismatch {:?} in the step after {:?} (plan {:?})",
                bad,
                after,
                self.engine.plan()
            ),
            Err(e) => {
                return Err(TestCaseError::fail(format!(
                    "a valid step after {after:?} failed: {e} (failure: {:?})",
                    self.engine.failure()
                )))
            }
        }
        if let Some(b) = self.budget {
            prop_assert!(self.engine.device_bytes() <= b, "device bytes above budget");
        }
        Ok(())
    }

    fn longest(&self) -> usize {
        (0..self.engine.num_layers())
            .map(|l| self.reference.len(l))
            .max()
            .unwrap_or(0)
    }

    /// Applies `op`; returns whether it failed (then a valid step must follow).
    fn apply(&mut self, op: &Op) -> Result<bool, TestCaseError> {
        use ErrorKind::*;
        let n = self.engine.num_layers();
        let budget_kinds: &[ErrorKind] = if self.budget.is_some() {
            &[Budget]
        } else {
            &[]
        };
        if let Op::Step(k) = op {
            self.step(*k, op)?;
            return Ok(false);
        }
        let longest = self.longest();
        let e = &mut self.engine;
        let failed = match op {
            Op::Step(_) => unreachable!("steps are run by the caller"),
            Op::Plan(mask, depth) => {
                let plan = plan_of(mask, *depth);
                ok_or(op, no_panic(op, || e.set_plan(plan))?, budget_kinds)?.map(drop)
            }
            Op::Grow(extra) => {
                let cap = e.capacity() + extra;
                ok_or(op, no_panic(op, || e.resize(cap))?, budget_kinds)?.map(drop)
            }
            Op::Reorder(idx) => {
                let r = no_panic(op, || reorder(e, &mut self.reference, idx))?;
                prop_assert!(r.is_ok(), "{:?} failed: {:?}", op, r.err());
                None
            }
            Op::Crop(t) => {
                let r = no_panic(op, || crop(e, &mut self.reference, *t))?;
                prop_assert!(r.is_ok(), "{:?} failed: {:?}", op, r.err());
                None
            }
            Op::Abandon(k, done) => {
                let r = no_panic(op, || -> Result<(), PieError> {
                    for l in 0..(*k).min(n - 1) + 1 {
                        e.layer_begin(l, S)?;
                        e.layer_ready(l, S)?;
                        if *done && l + 1 < n {
                            e.layer_done(l, S)?;
                        }
                    }
                    Ok(())
                })?;
                prop_assert!(r.is_ok(), "{:?} failed: {:?}", op, r.err());
                // An abandoned step is not an error, but the next step must be right.
                Some(())
            }
            Op::LayerOutOfRange(which, extra) => {
                let l = n + extra;
                let r: Result<(), PieError> = no_panic(op, || match which {
                    0 => e.layer_begin(l, S),
                    1 => e.layer_ready(l, S).map(drop),
                    2 => e.layer_written(l, 1, S).map(drop),
                    3 => e.layer_done(l, S),
                    4 => e.seq_len(l).map(drop),
                    5 => e.set_seq_len(l, 0),
                    _ => e.residence(l).map(drop),
                })?;
                expect_err(op, r, &[Config])?.map(drop)
            }
            Op::ReadyOutsideStep(l) => {
                // A resident layer's slot is where it always is; a pooled one
                // has no staging slot outside a step.
                let r = no_panic(op, || e.layer_ready(*l, S))?;
                ok_or(op, r, &[State])?.map(drop)
            }
            Op::DoneWithoutBegin(l) => {
                let r = no_panic(op, || e.layer_done(*l, S))?;
                ok_or(op, r, &[State])?.map(drop)
            }
            Op::GrowSeqLen(l, extra) => {
                let to = self.reference.len(*l) + extra + 1;
                let r = no_panic(op, || e.set_seq_len(*l, to))?;
                expect_err(op, r, &[Config])?.map(drop)
            }
            Op::ResizeBelow(by) => {
                let to = longest.saturating_sub(by + 1);
                let r = no_panic(op, || e.resize(to))?;
                expect_err(op, r, &[Config])?.map(drop)
            }
            Op::BadPlan(bad) => {
                let plan = match bad {
                    BadPlan::OutOfRange(x) => Plan::copying(vec![0, n + x], 1),
                    BadPlan::Duplicate(l) => Plan::copying(vec![*l, *l], 1),
                    BadPlan::Unsorted => Plan::copying(vec![n - 1, 0], 1),
                    BadPlan::DepthZero => Plan::copying(vec![0], 0),
                };
                let r = no_panic(op, || e.set_plan(plan))?;
                expect_err(op, r, &[Config])?.map(drop)
            }
            Op::Huge(tokens, via_resize) => {
                let r = no_panic(op, || {
                    if *via_resize {
                        e.resize(*tokens)
                    } else {
                        e.ensure_capacity(*tokens).map(drop)
                    }
                })?;
                expect_err(op, r, &[Config, Budget, Backend])?.map(drop)
            }
        };
        Ok(failed.is_some())
    }
}

fn specs_of(
    layers: usize,
    batch: usize,
    heads: usize,
    k_dim: usize,
    v_dim: usize,
) -> Vec<LayerSpec> {
    (0..layers)
        .map(|i| LayerSpec {
            batch,
            kv_heads: heads,
            k_dim: k_dim + i % 2,
            v_dim,
            elem_size: 2,
        })
        .collect()
}

fn new_harness(
    specs: &[LayerSpec],
    initial: Plan,
    budget: Option<usize>,
    capacity: usize,
) -> Result<Harness, TestCaseError> {
    let engine = no_panic(&"Engine::new", || {
        Engine::new(
            HostBackend::new().unwrap(),
            specs.to_vec(),
            EngineOptions {
                capacity,
                device_budget: budget,
                ..Default::default()
            },
            Box::new(StaticPolicy::pinned(initial)),
        )
    })?
    .map_err(|e| TestCaseError::fail(format!("engine construction failed: {e}")))?;
    Ok(Harness {
        engine,
        reference: Reference::new(specs),
        salt: 0,
        budget,
    })
}

fn run(
    specs: Vec<LayerSpec>,
    initial: Plan,
    budget: bool,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let n = specs.len();
    // A budget that always holds every layer pooled through one staging slot
    // (capacities stay below 4096 here) but not everything resident.
    let budget = budget.then(|| {
        ArenaLayout::device_bytes_for(&specs, 4096, &Plan::spread(n, n, 1))
            .max(ArenaLayout::device_bytes_for(&specs, 4, &initial))
    });
    let mut h = new_harness(&specs, initial.clone(), budget, 4)?;
    for op in &ops {
        if h.apply(op)? {
            h.step(1, op)?;
        }
        prop_assert!(
            h.engine.failure().is_none(),
            "{:?} stopped the engine: {:?}",
            op,
            h.engine.failure()
        );
        for l in 0..n {
            prop_assert_eq!(h.engine.seq_len(l).unwrap(), h.reference.len(l));
        }
    }
    h.step(1, &"the end")?;
    no_panic(&"close", || h.engine.close())?;
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn invalid_operations_are_errors_and_never_corrupt_kv(
        layers in 1usize..7,
        batch in 1usize..4,
        heads in 1usize..3,
        k_dim in 1usize..5,
        v_dim in 1usize..5,
        seed_mask in proptest::collection::vec(any::<bool>(), 7),
        depth in 1usize..4,
        budget in any::<bool>(),
        ops in proptest::collection::vec(op(6, 3), 1..32),
    ) {
        let specs = specs_of(layers, batch, heads, k_dim, v_dim);
        let ops: Vec<Op> = ops
            .into_iter()
            .map(|o| match o {
                Op::Plan(m, d) => Op::Plan(m[..layers].to_vec(), d),
                Op::Reorder(idx) => Op::Reorder(
                    idx.into_iter().map(|i| i % batch).chain(std::iter::repeat(0)).take(batch).collect(),
                ),
                Op::Abandon(k, d) => Op::Abandon(k % layers, d),
                Op::ReadyOutsideStep(l) => Op::ReadyOutsideStep(l % layers),
                Op::DoneWithoutBegin(l) => Op::DoneWithoutBegin(l % layers),
                Op::GrowSeqLen(l, x) => Op::GrowSeqLen(l % layers, x),
                Op::BadPlan(BadPlan::Duplicate(l)) => Op::BadPlan(BadPlan::Duplicate(l % layers)),
                // [n-1, 0] is not unsorted with one layer: use a duplicate instead.
                Op::BadPlan(BadPlan::Unsorted) if layers == 1 => Op::BadPlan(BadPlan::Duplicate(0)),
                other => other,
            })
            .collect();
        run(specs, plan_of(&seed_mask[..layers], depth), budget, ops)?;
    }

    #[test]
    fn bad_construction_is_an_error(
        layers in 1usize..6,
        batch in 0usize..3,
        heads in 0usize..3,
        elem in 0usize..10,
        capacity in 0usize..40,
        budget_frac in 0usize..300,
        pooled in proptest::collection::vec(0usize..8, 0..4),
        depth in 0usize..3,
    ) {
        let specs: Vec<LayerSpec> = (0..layers)
            .map(|_| LayerSpec { batch, kv_heads: heads, k_dim: 4, v_dim: 4, elem_size: elem })
            .collect();
        let spec_ok = batch > 0 && heads > 0 && matches!(elem, 1 | 2 | 4 | 8);
        let one = if spec_ok { specs[0].bytes(capacity.max(1)) } else { 1024 };
        // From nothing to ~3 layers' worth.
        let budget = one * budget_frac / 100;
        let plan = Plan::copying(pooled.clone(), depth);
        let r = no_panic(&"Engine::new", || {
            Engine::new(
                HostBackend::new().unwrap(),
                specs.clone(),
                EngineOptions { capacity, device_budget: Some(budget), ..Default::default() },
                Box::new(StaticPolicy::pinned(plan.clone())),
            )
        })?;
        let plan_ok = plan.validate(layers).is_ok();
        match r {
            Ok(mut engine) => {
                prop_assert!(spec_ok && capacity > 0 && plan_ok);
                prop_assert!(engine.device_bytes() <= budget);
                let mut reference = Reference::new(&specs);
                for salt in 0..3 {
                    // The budget may refuse growth; it must never be exceeded or corrupt KV.
                    match no_panic(&"step", || run_step(&mut engine, &mut reference, 1, salt))? {
                        Ok(bad) => prop_assert!(bad.is_none(), "{:?}", bad),
                        Err(e) => {
                            prop_assert_eq!(e.kind(), ErrorKind::Budget, "{}", e);
                            break;
                        }
                    }
                    prop_assert!(engine.device_bytes() <= budget);
                }
            }
            Err(e) => {
                let expected = if !spec_ok || capacity == 0 || !plan_ok {
                    ErrorKind::Config
                } else {
                    ErrorKind::Budget
                };
                prop_assert_eq!(e.kind(), expected, "{}", e);
                if expected == ErrorKind::Budget {
                    prop_assert!(e.to_string().contains("raise gpu_budget"), "{}", e);
                }
            }
        }
    }
}

/// Regression test for two engine bugs this fuzzer found (both fixed):
///
/// 1. `ensure_capacity(usize::MAX)` (or `resize`) panics with "attempt to
///    multiply with overflow" in `LayerSpec::bytes` (debug builds; release
///    builds wrap to a wrong size): byte counts need checked arithmetic that
///    returns a `Config` error.
/// 2. A growth whose allocation fails (`ensure_capacity(1 << 40)`: "host
///    allocation failed: out of memory allocating ... bytes") stops the pool
///    and loses every token: `transition_inner` takes the old arenas out
///    (`arenas.swap(None)`) before allocating the new ones. Allocating first
///    (host arena, then the device arena, falling back to the old layout on
///    failure) keeps the KV and lets the caller go on at the old capacity.
#[test]
fn huge_capacity_keeps_the_cache() {
    for &tokens in &HUGE {
        for via_resize in [false, true] {
            let specs = specs_of(4, 2, 2, 4, 4);
            let mut h = new_harness(&specs, Plan::spread(4, 2, 1), None, 8).unwrap();
            let op = Op::Huge(tokens, via_resize);
            h.step(3, &"prefill").unwrap();
            assert!(h.apply(&op).unwrap(), "{op:?} must fail");
            assert!(
                h.engine.failure().is_none(),
                "{op:?} stopped the engine: {:?}",
                h.engine.failure()
            );
            h.step(1, &op).unwrap();
        }
    }
}
