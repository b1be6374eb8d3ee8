//! Which layers to pool and how deep to prefetch: the cost model, the search
//! over static plans, and the policies the engine consults at step boundaries.
//!
//! * [`cost_model`]: an event-driven predictor of a plan's steady-state step;
//! * [`search`]: the best static plan for given inputs (exhaustive over layer
//!   sets for small models, a justified restricted search for large ones);
//! * [`adaptive`]: Pie's adaptive expansion: smooths telemetry, re-plans,
//!   applies mandatory changes at once and others with hysteresis;
//! * [`static_policy`]: a pinned plan.
//!
//! The engine's contract with a [`Policy`]: after every step it calls
//! [`Policy::observe`] with that step's [`StepSample`]; whenever the KV's
//! shape (capacity, valid length) or the budget changes it calls
//! [`Policy::set_kv`] / [`Policy::set_budget`]; at each step boundary it calls
//! [`Policy::decide`] and applies the returned plan, if any, before the next step.

pub mod adaptive;
pub mod cost_model;
pub mod search;
pub mod static_policy;

pub use adaptive::{AdaptiveConfig, AdaptivePolicy};
pub use cost_model::{predict_step, LinkModel, PolicyInputs, Prediction};
pub use search::{
    best_static_plan, best_static_plan_in, transparent_fraction, Choice, SearchSpace,
};
pub use static_policy::StaticPolicy;

use crate::error::{PieError, Result};
use crate::plan::Plan;

/// What a policy optimises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Objective {
    /// Fastest step within the budget: keep as much KV resident as the budget
    /// allows, pool only what it forces, and hide those copies as well as possible.
    #[default]
    Speed,
    /// Least device memory with no measurable stall: pool as much as the link can
    /// hide under compute (falls back to the fastest plan when the budget forces a stall).
    Memory,
}

impl Objective {
    /// The objective's lowercase name ("speed" or "memory").
    pub fn name(self) -> &'static str {
        match self {
            Objective::Speed => "speed",
            Objective::Memory => "memory",
        }
    }
}

impl std::str::FromStr for Objective {
    type Err = PieError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "speed" => Ok(Objective::Speed),
            "memory" => Ok(Objective::Memory),
            other => Err(PieError::config(format!(
                "unknown objective {other:?}; use \"speed\" or \"memory\""
            ))),
        }
    }
}

/// What the engine measured during one step (produced by telemetry).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepSample {
    /// Per-layer compute seconds, stalls excluded (one entry per layer).
    pub compute_seconds: Vec<f64>,
    /// Per-layer seconds the compute stream waited for the layer's KV.
    pub stall_seconds: Vec<f64>,
    /// Host-to-device bytes copied during the step.
    pub h2d_bytes: u64,
    /// Seconds the H2D queue spent copying (sum of copy durations, waits excluded).
    pub h2d_seconds: f64,
    /// Number of host-to-device copies in `h2d_bytes`.
    pub h2d_copies: u64,
    /// Device-to-host bytes copied during the step.
    pub d2h_bytes: u64,
    /// Seconds the D2H queue spent copying.
    pub d2h_seconds: f64,
    /// Number of device-to-host copies in `d2h_bytes`.
    pub d2h_copies: u64,
    /// Wall (or virtual) seconds of the whole step.
    pub step_seconds: f64,
}

impl StepSample {
    /// Total stall seconds of the step.
    pub fn stall_total(&self) -> f64 {
        self.stall_seconds.iter().sum()
    }

    /// Total compute seconds of the step.
    pub fn compute_total(&self) -> f64 {
        self.compute_seconds.iter().sum()
    }
}

/// The KV's shape as the engine holds it now.
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

/// A source of plans, consulted by the engine at step boundaries.
pub trait Policy: Send {
    /// Feeds the telemetry of the step that just ended.
    fn observe(&mut self, sample: &StepSample);

    /// Tells the policy the KV's current shape (after growth, shrink or each
    /// step's new token).
    fn set_kv(&mut self, kv: &KvShape);

    /// Tells the policy the device budget for engine-managed KV (`None`: no limit).
    fn set_budget(&mut self, budget_bytes: Option<u64>);

    /// At a step boundary: the plan to switch to, or `None` to keep the current
    /// one. Errors when no plan can honour the budget.
    fn decide(&mut self) -> Result<Option<Plan>>;

    /// The plan most recently returned by [`Policy::decide`].
    fn current(&self) -> &Plan;
}
