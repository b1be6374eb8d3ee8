//! Property tests of the pure prefetch schedule: random plans and random
//! layer-event sequences (in order, skipped and repeated layers, aborted
//! steps, invalidations after crops or reorders, plan switches) never let a
//! staging slot be refilled before its occupant was released, never hand
//! attention a slot that holds another layer, and count prefetches the way
//! the swapper does.

use pie_core::schedule::{Ready, Schedule, SwapOp};
use pie_core::Plan;
use proptest::prelude::*;
use std::sync::Arc;

/// What the swapper would know from the ops alone.
#[derive(Default)]
struct Swapper {
    /// Per slot: the layer whose prefetch landed there and was not released.
    occupant: Vec<Option<usize>>,
    /// Per slot: the layer the slot last held (hits reuse it without a copy).
    last: Vec<Option<usize>>,
    prefetches: u64,
}

impl Swapper {
    fn new(slots: usize) -> Self {
        Swapper {
            occupant: vec![None; slots],
            last: vec![None; slots],
            prefetches: 0,
        }
    }

    fn apply(&mut self, op: SwapOp) -> Result<(), TestCaseError> {
        match op {
            SwapOp::Prefetch {
                layer, slot, hit, ..
            } => {
                prop_assert!(
                    self.occupant[slot].is_none(),
                    "slot {slot} refilled with layer {layer} while {:?} holds it",
                    self.occupant[slot]
                );
                if hit {
                    prop_assert_eq!(
                        self.last[slot],
                        Some(layer),
                        "a hit on a slot holding another layer"
                    );
                }
                self.occupant[slot] = Some(layer);
                self.last[slot] = Some(layer);
                self.prefetches += 1;
            }
            SwapOp::WriteBack { layer, slot, .. } | SwapOp::WriteBackRuns { layer, slot, .. } => {
                prop_assert_eq!(
                    self.occupant[slot],
                    Some(layer),
                    "write-back from a slot the layer is not in"
                );
            }
            SwapOp::Release { layer, slot } => {
                prop_assert_eq!(
                    self.occupant[slot].take(),
                    Some(layer),
                    "release of a slot the layer is not in"
                );
            }
        }
        Ok(())
    }

    /// The caller drained the queues and the staging contents are stale.
    fn drain(&mut self) {
        self.occupant.iter_mut().for_each(|o| *o = None);
        self.last.iter_mut().for_each(|o| *o = None);
    }
}

#[derive(Clone, Debug)]
enum Event {
    /// Run layers `from..layers` of a step in order, `stop` layers early if given.
    Step { from: usize, stop: usize },
    /// Jump to a layer out of order within a step.
    Jump(usize),
    /// Data changed under the engine (crop, reorder, reset).
    Invalidate,
    /// A new plan at a step boundary.
    Plan(Vec<bool>, usize),
}

fn event(layers: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0..layers, 0..3usize).prop_map(|(from, stop)| Event::Step { from: from / 3, stop }),
        1 => (0..layers).prop_map(Event::Jump),
        1 => Just(Event::Invalidate),
        1 => (proptest::collection::vec(any::<bool>(), layers), 1usize..4)
            .prop_map(|(m, d)| Event::Plan(m, d)),
    ]
}

fn plan_of(mask: &[bool], depth: usize) -> Arc<Plan> {
    Arc::new(Plan::copying(
        (0..mask.len()).filter(|&i| mask[i]).collect(),
        depth,
    ))
}

/// Drives one layer as the engine does; returns the ops emitted.
fn run_layer(
    s: &mut Schedule,
    sw: &mut Swapper,
    layer: usize,
    step: u64,
) -> Result<(), TestCaseError> {
    let mut ops = Vec::new();
    s.begin(layer, step, &mut |op| ops.push(op));
    for op in ops.drain(..) {
        sw.apply(op)?;
    }
    match s.ready(layer) {
        Ready::Resident => prop_assert!(!s.is_pooled(layer)),
        Ready::OutOfOrder => {
            sw.drain();
            s.restart_at(layer, step, &mut |op| ops.push(op));
            for op in ops.drain(..) {
                sw.apply(op)?;
            }
            let staged = matches!(s.ready(layer), Ready::Staged { .. });
            prop_assert!(staged, "a restart did not stage the layer");
        }
        Ready::Staged { .. } => {}
        Ready::HostAttended => prop_assert!(s.plan().is_host_attended(layer)),
    }
    if let Ready::Staged { slot, prefetch } = s.ready(layer) {
        // The swapper has issued the awaited prefetch, and it is this layer's.
        prop_assert!(
            sw.prefetches >= prefetch,
            "waits for a prefetch never pushed"
        );
        prop_assert_eq!(sw.occupant[slot], Some(layer));
        if let Some(op) = s
            .written(layer, 0, 1, step)
            .map_err(|()| TestCaseError::fail("write refused"))?
        {
            sw.apply(op)?;
        }
    }
    s.done(layer, &mut |op| ops.push(op));
    for op in ops.drain(..) {
        sw.apply(op)?;
    }
    Ok(())
}

fn check(
    layers: usize,
    initial: (Vec<bool>, usize),
    events: Vec<Event>,
) -> Result<(), TestCaseError> {
    let mut s = Schedule::new(plan_of(&initial.0, initial.1), layers);
    let mut sw = Swapper::new(layers);
    let mut step = 0u64;
    for e in events {
        match e {
            Event::Step { from, stop } => {
                let end = layers.saturating_sub(stop).max(from);
                for l in from..end {
                    run_layer(&mut s, &mut sw, l, step)?;
                }
                if from != 0 || end != layers {
                    // An aborted or partial step: the engine drains and starts clean.
                    sw.drain();
                    s.invalidate();
                }
                s.end_step();
                step += 1;
            }
            Event::Jump(l) => {
                run_layer(&mut s, &mut sw, l, step)?;
                sw.drain();
                s.invalidate();
                s.end_step();
                step += 1;
            }
            Event::Invalidate => {
                sw.drain();
                s.invalidate();
            }
            Event::Plan(mask, depth) => {
                sw.drain();
                s.set_plan(plan_of(&mask, depth));
            }
        }
        prop_assert_eq!(s.prefetches_pushed(), sw.prefetches);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_event_sequences_keep_slots_consistent(
        (layers, initial, events) in (1usize..9).prop_flat_map(|l| (
            Just(l),
            (proptest::collection::vec(any::<bool>(), l), 1usize..4),
            proptest::collection::vec(event(l), 1..30),
        ))
    ) {
        check(layers, initial, events)?;
    }
}
