//! The policy thread: turns each finished step's timing events into a
//! [`StepSample`], keeps the running totals, and asks a [`PolicyDriver`] whether
//! the plan should change. A new plan is published for the caller to apply at
//! the next step boundary; the caller never waits for this thread.

use crate::engine::Shared;
use crate::error::{PieError, Result};
use crate::fifo::Consumer;
use crate::fit::{budget_plan, check_budget};
use crate::layout::LayerSpec;
use crate::plan::Plan;
use crate::policy::{
    AdaptiveConfig, AdaptivePolicy, KvShape, Objective, Policy, StepSample as PolicySample,
};
use crate::primitive::Ordering;
use crate::telemetry::span as event_span;
use crate::telemetry::{Counters, StepRecord, StepSample, TIMING_EVERY, TIMING_SETS};
use crate::Backend;
use std::sync::Arc;
use std::time::Duration;

/// What a policy sees besides the samples.
pub struct PolicyContext<'a> {
    /// Layer shapes.
    pub specs: &'a [LayerSpec],
    /// Tokens each layer can hold.
    pub capacity: usize,
    /// Valid tokens per layer.
    pub seq_lens: &'a [usize],
    /// Device bytes the engine may use.
    pub device_budget: Option<usize>,
}

/// Decides the plan: once at construction, then after each measured step.
pub trait PolicyDriver: Send {
    /// The plan to start with, before anything is measured.
    fn initial_plan(&mut self, ctx: &PolicyContext<'_>) -> Result<Plan>;
    /// Sees one step's measurements; returns a new plan to apply at the next
    /// step boundary, or `None` to keep the current one.
    fn observe(&mut self, sample: &StepSample, ctx: &PolicyContext<'_>) -> Option<Plan>;
}

/// A fixed plan: the user pinned it, or comparisons need one.
pub struct StaticDriver {
    plan: Option<Plan>,
    depth: usize,
}

impl StaticDriver {
    /// Uses `plan` as given.
    pub fn pinned(plan: Plan) -> Self {
        StaticDriver {
            depth: plan.prefetch_depth,
            plan: Some(plan),
        }
    }

    /// Pools the fewest layers (spread across the depth) that make the budget
    /// hold, with `prefetch_depth` staging slots, and never changes it.
    pub fn budget_fit(prefetch_depth: usize) -> Self {
        StaticDriver {
            plan: None,
            depth: prefetch_depth,
        }
    }
}

impl PolicyDriver for StaticDriver {
    fn initial_plan(&mut self, ctx: &PolicyContext<'_>) -> Result<Plan> {
        match &self.plan {
            Some(p) => Ok(p.clone()),
            None => budget_plan(ctx.specs, ctx.capacity, ctx.device_budget, self.depth),
        }
    }

    fn observe(&mut self, _sample: &StepSample, _ctx: &PolicyContext<'_>) -> Option<Plan> {
        None
    }
}

/// Body of the policy thread.
pub(crate) fn run<B: Backend>(
    shared: &Shared<B>,
    ring: Consumer<StepRecord>,
    mut driver: Box<dyn PolicyDriver>,
) {
    loop {
        let Some(record) = ring.pop() else {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            shared.policy_sleeping.store(true, Ordering::SeqCst);
            if ring.is_empty() && !shared.shutdown.load(Ordering::SeqCst) {
                std::thread::park_timeout(Duration::from_millis(20));
            }
            shared.policy_sleeping.store(false, Ordering::SeqCst);
            continue;
        };
        if let Some(sample) = measure(shared, &record) {
            Counters::add(
                &shared.counters.stall_ns,
                (sample.stall_seconds() * 1e9) as u64,
            );
            Counters::add(&shared.counters.step_ns, (sample.step_seconds * 1e9) as u64);
            Counters::add(&shared.counters.timed_steps, 1);
            let seq_lens: Vec<usize> = (0..shared.specs.len())
                .map(|l| shared.page_table.seq_len(l))
                .collect();
            let ctx = PolicyContext {
                specs: &shared.specs,
                capacity: shared.capacity.load(Ordering::Relaxed) as usize,
                seq_lens: &seq_lens,
                device_budget: shared.device_budget,
            };
            // Prefill steps say little about decode steps: the policy plans
            // for decode, so it only sees those.
            let decision = if record.new_tokens <= 1 {
                driver.observe(&sample, &ctx)
            } else {
                None
            };
            if let Some(plan) = decision {
                let valid = plan.validate(ctx.specs.len()).is_ok()
                    && check_budget(ctx.specs, ctx.capacity, &plan, ctx.device_budget).is_ok();
                if valid && plan != **shared.current_plan.load() {
                    shared.pending_plan.store(Some(Arc::new(plan)));
                }
            }
            *shared.last_sample.lock() = Some(sample);
        }
        shared.records_done.fetch_add(1, Ordering::Release);
    }
}

/// Reads one step's events into a sample; `None` if the step was incomplete,
/// its events were lapped, or the engine is stopping.
fn measure<B: Backend>(shared: &Shared<B>, record: &StepRecord) -> Option<StepSample> {
    while shared.ops_done.load(Ordering::Acquire) < record.ops_pushed {
        if shared.shutdown.load(Ordering::Acquire) || shared.is_poisoned() {
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
    for &l in &record.plan.pooled {
        let h = set.h2d_bytes[l].load(Ordering::Relaxed);
        if h > 0 {
            sample.layer_stall[l] = event_span(b, &set.wait_start[l], &set.h2d_end[l]);
            sample.h2d_seconds += event_span(b, &set.h2d_start[l], &set.h2d_end[l]);
            sample.h2d_bytes += h;
        }
        let d = set.d2h_bytes[l].load(Ordering::Relaxed);
        if d > 0 {
            sample.d2h_seconds += event_span(b, &set.d2h_start[l], &set.d2h_end[l]);
            sample.d2h_bytes += d;
        }
    }
    // Events of this set are reused TIMING_SETS steps later (copy-side ones a
    // step earlier still): if the caller got that far, the readings may mix steps.
    let now = shared.current_step.load(Ordering::Acquire);
    if now + 2 > record.step + TIMING_SETS as u64 * TIMING_EVERY {
        return None;
    }
    Some(sample)
}

/// The latest sample the policy thread computed.
pub(crate) fn last_sample<B: Backend>(shared: &Shared<B>) -> Option<StepSample> {
    shared.last_sample.lock().clone()
}

/// Adapts the adaptive policy ([`crate::policy::AdaptivePolicy`]) to the engine.
pub struct AdaptiveDriver {
    policy: AdaptivePolicy,
}

fn kv_shape(ctx: &PolicyContext<'_>) -> KvShape {
    KvShape {
        layer_bytes: ctx
            .specs
            .iter()
            .map(|s| s.bytes(ctx.capacity) as u64)
            .collect(),
        valid_bytes: ctx
            .specs
            .iter()
            .zip(ctx.seq_lens)
            .map(|(s, &n)| s.valid_bytes(n) as u64)
            .collect(),
        // Decode writes one token per step per sequence.
        writeback_bytes: ctx.specs.iter().map(|s| s.valid_bytes(1) as u64).collect(),
    }
}

fn policy_sample(s: &StepSample) -> PolicySample {
    let prefetched = s.plan.pooled.len() as u64;
    PolicySample {
        compute_seconds: s
            .layer_compute
            .iter()
            .zip(&s.layer_stall)
            .map(|(c, st)| (c - st).max(0.0))
            .collect(),
        stall_seconds: s.layer_stall.clone(),
        h2d_bytes: s.h2d_bytes,
        h2d_seconds: s.h2d_seconds,
        // K and V are one copy each per layer.
        h2d_copies: if s.h2d_bytes > 0 { 2 * prefetched } else { 0 },
        d2h_bytes: s.d2h_bytes,
        d2h_seconds: s.d2h_seconds,
        d2h_copies: if s.d2h_bytes > 0 { 2 * prefetched } else { 0 },
        step_seconds: s.step_seconds,
    }
}

impl PolicyDriver for AdaptiveDriver {
    fn initial_plan(&mut self, ctx: &PolicyContext<'_>) -> Result<Plan> {
        self.policy.set_budget(ctx.device_budget.map(|b| b as u64));
        self.policy.set_kv(&kv_shape(ctx));
        Ok(self
            .policy
            .decide()?
            .unwrap_or_else(|| self.policy.current().clone()))
    }

    fn observe(&mut self, sample: &StepSample, ctx: &PolicyContext<'_>) -> Option<Plan> {
        self.policy.set_kv(&kv_shape(ctx));
        self.policy.observe(&policy_sample(sample));
        self.policy.decide().ok().flatten()
    }
}

/// The adaptive policy for `objective` ("speed" or "memory"), starting from
/// `prefetch_depth` if given (the policy may change it).
pub fn adaptive_driver(
    objective: &str,
    prefetch_depth: Option<usize>,
) -> Result<Box<dyn PolicyDriver>> {
    let objective = match objective {
        "speed" => Objective::Speed,
        "memory" => Objective::Memory,
        other => {
            return Err(PieError::config(format!(
                "objective {other:?} is not known; use \"speed\" or \"memory\""
            )))
        }
    };
    let _ = prefetch_depth;
    Ok(Box::new(AdaptiveDriver {
        policy: AdaptivePolicy::new(AdaptiveConfig {
            objective,
            ..AdaptiveConfig::default()
        }),
    }))
}
