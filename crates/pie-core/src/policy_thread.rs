//! The policy thread: turns each finished step's timing events into a
//! [`StepSample`], keeps the running totals, and asks the engine's [`Policy`]
//! whether the plan should change (the contract is in [`crate::policy`]). A new
//! plan is published for the caller to apply at the next step boundary; the
//! caller never waits for this thread.

use crate::fit::check_budget;
use crate::policy::cost_model::COPIES_PER_LAYER;
use crate::policy::{Policy, PolicyContext};
use crate::primitive::Ordering;
use crate::shared::Shared;
use crate::telemetry::span as event_span;
use crate::telemetry::{Counters, StepRecord, StepSample, TIMING_SETS};
use crate::wake::Receiver;
use crate::Backend;
use std::sync::Arc;
use std::time::Duration;

/// Body of the policy thread: sleeps on an empty ring until the next record
/// or the shutdown ([`crate::wake`]).
pub(crate) fn run<B: Backend>(
    shared: &Shared<B>,
    ring: Receiver<StepRecord>,
    mut policy: Box<dyn Policy>,
) {
    while let Some(record) = ring.recv(&shared.health.shutdown) {
        if let Some(sample) = measure(shared, &record) {
            Counters::add(
                &shared.counters.stall_ns,
                (sample.stall_total() * 1e9) as u64,
            );
            Counters::add(&shared.counters.step_ns, (sample.step_seconds * 1e9) as u64);
            Counters::add(&shared.counters.timed_steps, 1);
            let seq_lens: Vec<usize> = (0..shared.specs.len())
                .map(|l| shared.page_table.seq_len(l))
                .collect();
            let ctx = PolicyContext {
                specs: &shared.specs,
                capacity: shared.capacity(),
                seq_lens: &seq_lens,
                device_budget: shared.device_budget,
            };
            // Prefill steps say little about decode steps: the policy plans
            // for decode, so it only sees those. A policy that errs (no plan
            // fits) leaves the plan in force; growth re-fits it if need be.
            let decision = if record.new_tokens <= 1 {
                policy.observe(&sample, &ctx).ok().flatten()
            } else {
                None
            };
            if let Some(plan) = decision {
                let valid = plan.validate(ctx.specs.len()).is_ok()
                    && check_budget(ctx.specs, ctx.capacity, &plan, ctx.device_budget).is_ok();
                if valid && plan != **shared.plans.current.load() {
                    shared.plans.pending.store(Some(Arc::new(plan)));
                }
            }
            *shared.policy.last_sample.lock() = Some(sample);
        }
        shared.policy.records_done.fetch_add(1, Ordering::Release);
    }
}

/// Reads one step's events into a sample; `None` if the step was incomplete,
/// its events were lapped, or the engine is stopping.
fn measure<B: Backend>(shared: &Shared<B>, record: &StepRecord) -> Option<StepSample> {
    while shared.swapper.ops_done.load(Ordering::Acquire) < record.ops_pushed {
        if shared.health.shutdown.load(Ordering::Acquire) || shared.health.is_poisoned() {
            return None;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    if !record.complete {
        return None;
    }
    let b = &shared.backend;
    let set = shared.timing_set(record.step)?;
    let n = shared.specs.len();
    b.synchronize(&set.begin[n]).ok()?;
    for l in &record.plan.pooled {
        b.synchronize(&set.h2d_end[*l]).ok()?;
        b.synchronize(&set.d2h_end[*l]).ok()?;
    }
    let mut sample = StepSample {
        step: record.step,
        layer_compute: (0..n)
            .map(|l| event_span(b, &set.begin[l], &set.begin[l + 1]))
            .collect(),
        layer_stall: vec![0.0; n],
        step_seconds: event_span(b, &set.begin[0], &set.begin[n]),
        plan: (*record.plan).clone(),
        ..Default::default()
    };
    let at = |e: &B::Event| b.elapsed(&set.begin[0], e).ok();
    sample.layer_start = (0..n).map(|l| at(&set.begin[l]).unwrap_or(0.0)).collect();
    sample.h2d_spans = vec![None; n];
    sample.d2h_spans = vec![None; n];
    for &l in &record.plan.pooled {
        if set.h2d_bytes[l].load(Ordering::Relaxed) > 0 {
            sample.h2d_spans[l] = at(&set.h2d_start[l]).zip(at(&set.h2d_end[l]));
        }
        if set.d2h_bytes[l].load(Ordering::Relaxed) > 0 {
            sample.d2h_spans[l] = at(&set.d2h_start[l]).zip(at(&set.d2h_end[l]));
        }
    }
    // A layer's prefetch or write-back is one copy of K and one of V.
    for &l in &record.plan.pooled {
        let h = set.h2d_bytes[l].load(Ordering::Relaxed);
        if h > 0 {
            sample.layer_stall[l] = event_span(b, &set.wait_start[l], &set.h2d_end[l]);
            sample.h2d_seconds += event_span(b, &set.h2d_start[l], &set.h2d_end[l]);
            sample.h2d_bytes += h;
            sample.h2d_copies += COPIES_PER_LAYER;
        }
        let d = set.d2h_bytes[l].load(Ordering::Relaxed);
        if d > 0 {
            sample.d2h_seconds += event_span(b, &set.d2h_start[l], &set.d2h_end[l]);
            sample.d2h_bytes += d;
            sample.d2h_copies += COPIES_PER_LAYER;
        }
    }
    // Events of this set are reused TIMING_SETS steps later (copy-side ones a
    // step earlier still): if the caller got that far, the readings may mix steps.
    let now = shared.caller.step.load(Ordering::Acquire);
    if now + 2 > record.step + TIMING_SETS as u64 * shared.timing_every {
        return None;
    }
    Some(sample)
}
