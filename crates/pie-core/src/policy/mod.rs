//! Which layers to pool and how deep to prefetch: the one [`Policy`] trait the
//! engine consults, its configuration, the cost model, and the search.
//!
//! * [`config`]: [`PolicyConfig`], the user's choice parsed and validated once,
//!   and [`PolicyConfig::build`], which gives the boxed policy;
//! * [`adaptive`]: Pie's adaptive expansion ([`AdaptivePolicy`]): smooths
//!   telemetry, re-plans, applies mandatory changes at once and others with hysteresis;
//! * [`static_policy`]: a plan that never changes ([`StaticPolicy`]: pinned, or
//!   the fewest pooled layers that fit the budget);
//! * [`cost_model`]: an event-driven predictor of a plan's steady-state step;
//! * [`host_cost`]: [`HostModel`], what attending a pooled layer on the host costs;
//! * [`placement`]: [`HostAttention`], where pooled layers' attention runs
//!   (copied to the device or attended on the host), enforced by [`Placed`];
//! * [`search`]: the best static plan for given inputs (exhaustive over layer
//!   sets for small models, a justified restricted search for large ones).
//!
//! # The engine's contract with a [`Policy`]
//!
//! 1. [`crate::Engine::new`] calls [`Policy::initial_plan`] once, on the
//!    caller's thread, with the engine's layer specs, its capacity, every
//!    length at 0 and the device budget. The engine checks the plan (layer
//!    indices, budget) and fails to start when it is wrong or the policy errs.
//! 2. The policy then lives on the engine's policy thread. Every
//!    [`crate::telemetry::TIMING_EVERY`]-th step is timed; for each timed
//!    *decode* step (at most one new token per layer; prefills are not shown)
//!    whose events were all recorded and not yet reused, the thread turns the
//!    events into a [`StepSample`] and calls [`Policy::observe`] with it and
//!    the context as it is then (capacity and lengths now, budget).
//! 3. A plan `observe` returns is published when it is valid, fits the budget
//!    at the current capacity and differs from the plan in force; the caller
//!    switches to it at its next step boundary and never waits for the policy.
//!    An error from `observe`, or a plan that fails those checks, is dropped:
//!    the plan in force stays.
//! 4. The policy is not called when the KV grows, shrinks or is reset, nor on
//!    [`crate::Engine::set_plan`]; it sees their effect in the next context.
//!    When growth makes the plan in force overflow the budget, the engine
//!    re-fits the plan itself at once (the fewest pooled layers that fit).

pub mod adaptive;
pub mod config;
pub mod cost_model;
pub mod host_cost;
pub mod placement;
pub mod search;
pub mod static_policy;

pub use adaptive::{AdaptiveConfig, AdaptivePolicy};
pub use config::{
    MemorySlowdown, Objective, PolicyConfig, PolicyKind, DEFAULT_MEMORY_SLOWDOWN,
    DEFAULT_PREFETCH_DEPTH,
};
pub use cost_model::{predict_step, LinkModel, PolicyInputs, Prediction};
pub use host_cost::{exchange_bytes, HostModel};
pub use placement::{HostAttention, Placed};
pub use search::{
    best_static_plan, best_static_plan_in, best_static_plan_within, transparent_fraction, Choice,
    SearchSpace,
};
pub use static_policy::StaticPolicy;

use crate::error::Result;
use crate::layout::LayerSpec;
use crate::plan::Plan;
use crate::telemetry::StepSample;

/// What the engine holds when it consults a policy.
#[derive(Clone, Copy, Debug)]
pub struct PolicyContext<'a> {
    /// Shapes of the engine-managed layers, in execution order.
    pub specs: &'a [LayerSpec],
    /// Tokens each layer can hold (the size of a device slot).
    pub capacity: usize,
    /// Valid tokens per layer.
    pub seq_lens: &'a [usize],
    /// Device bytes the engine's arena may use; `None` for no limit.
    pub device_budget: Option<usize>,
}

impl PolicyContext<'_> {
    /// The KV's shape in bytes: per layer, its slot at the capacity, its valid
    /// tokens (what a prefetch moves) and one decode step's new token (what a
    /// write-back moves).
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layer_bytes: self
                .specs
                .iter()
                .map(|s| s.bytes(self.capacity) as u64)
                .collect(),
            valid_bytes: self
                .specs
                .iter()
                .zip(self.seq_lens)
                .map(|(s, &n)| s.valid_bytes(n) as u64)
                .collect(),
            // Decode writes one token per step per sequence.
            writeback_bytes: self.specs.iter().map(|s| s.valid_bytes(1) as u64).collect(),
        }
    }
}

/// A source of plans, consulted by the engine (see the module docs for when).
pub trait Policy: Send {
    /// The plan to start with, before anything is measured. Errors when no
    /// plan can honour the budget.
    fn initial_plan(&mut self, ctx: &PolicyContext<'_>) -> Result<Plan>;

    /// Sees one measured decode step and the engine's state after it; returns
    /// the plan to switch to at the next step boundary, or `None` to keep the
    /// current one. Errors when no plan can honour the budget.
    fn observe(&mut self, sample: &StepSample, ctx: &PolicyContext<'_>) -> Result<Option<Plan>>;
}

/// The KV's shape in bytes, as the cost model sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvShape {
    /// Per-layer bytes at the current capacity (the size of a device slot).
    pub layer_bytes: Vec<u64>,
    /// Per-layer bytes of the valid tokens (what one prefetch moves).
    pub valid_bytes: Vec<u64>,
    /// Per-layer bytes of one step's new tokens (what a write-back moves).
    pub writeback_bytes: Vec<u64>,
}

impl KvShape {
    /// `layers` identical layers.
    pub fn uniform(
        layers: usize,
        layer_bytes: u64,
        valid_bytes: u64,
        writeback_bytes: u64,
    ) -> Self {
        KvShape {
            layer_bytes: vec![layer_bytes; layers],
            valid_bytes: vec![valid_bytes; layers],
            writeback_bytes: vec![writeback_bytes; layers],
        }
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layer_bytes.len()
    }
}
