//! A plan that never changes: the one the user pinned, or the fewest pooled
//! layers (spread across the depth) that fit the budget at the start.

use super::{Policy, PolicyContext};
use crate::error::Result;
use crate::fit::budget_plan;
use crate::plan::Plan;
use crate::telemetry::StepSample;

/// Gives its plan at the start and never changes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticPolicy {
    pinned: Option<Plan>,
    prefetch_depth: usize,
}

impl StaticPolicy {
    /// Holds `plan` as given (the engine checks it against the layers and the budget).
    pub fn pinned(plan: Plan) -> Self {
        StaticPolicy {
            prefetch_depth: plan.prefetch_depth,
            pinned: Some(plan),
        }
    }

    /// Pools the fewest layers (spread across the depth) that make the budget
    /// hold at the engine's starting capacity, with up to `prefetch_depth`
    /// staging slots (fewer if that is what it takes to fit).
    pub fn budget_fit(prefetch_depth: usize) -> Self {
        StaticPolicy {
            pinned: None,
            prefetch_depth,
        }
    }
}

impl Policy for StaticPolicy {
    fn initial_plan(&mut self, ctx: &PolicyContext<'_>) -> Result<Plan> {
        match &self.pinned {
            Some(plan) => Ok(plan.clone()),
            None => budget_plan(
                ctx.specs,
                ctx.capacity,
                ctx.device_budget,
                self.prefetch_depth,
            ),
        }
    }

    fn observe(&mut self, _sample: &StepSample, _ctx: &PolicyContext<'_>) -> Result<Option<Plan>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::LayerSpec;
    use crate::slots::ArenaLayout;

    #[test]
    fn budget_fit_pools_the_fewest_layers_and_never_changes() {
        let specs = vec![
            LayerSpec {
                batch: 1,
                kv_heads: 1,
                k_dim: 256,
                v_dim: 256,
                elem_size: 2,
            };
            4
        ];
        let layer = ArenaLayout::device_bytes_for(&specs[..1], 16, &Plan::all_resident());
        let ctx = PolicyContext {
            specs: &specs,
            capacity: 16,
            seq_lens: &[0; 4],
            device_budget: Some(3 * layer),
        };
        let mut p = StaticPolicy::budget_fit(2);
        let plan = p.initial_plan(&ctx).unwrap();
        assert_eq!(plan, Plan::spread(4, 2, 1));
        let sample = StepSample::default();
        assert_eq!(p.observe(&sample, &ctx).unwrap(), None);
        let mut p = StaticPolicy::pinned(plan.clone());
        assert_eq!(p.initial_plan(&ctx).unwrap(), plan);
        assert_eq!(p.observe(&sample, &ctx).unwrap(), None);
    }
}
