//! A plan that never changes: the one the user pinned, or the fewest pooled
//! layers (spread across the depth) that fit the budget at the start.
//!
//! Under [`HostAttention::Always`] the budget fit counts no staging slots (a
//! host-attended layer needs none), so it pools fewer layers than a copy fit.
//! Under `Auto` it keeps the copy placement: it never measures, and without
//! measurements the cost model cannot tell which placement is faster.

use super::{HostAttention, Policy, PolicyContext};
use crate::error::{PieError, Result};
use crate::fit::budget_plan;
use crate::plan::Plan;
use crate::slots::ArenaLayout;
use crate::telemetry::StepSample;

/// Gives its plan at the start and never changes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticPolicy {
    pinned: Option<Plan>,
    prefetch_depth: usize,
    host_attention: HostAttention,
}

impl StaticPolicy {
    /// Holds `plan` as given (the engine checks it against the layers and the budget).
    pub fn pinned(plan: Plan) -> Self {
        StaticPolicy {
            prefetch_depth: plan.prefetch_depth,
            pinned: Some(plan),
            host_attention: HostAttention::Auto,
        }
    }

    /// Pools the fewest layers (spread across the depth) that make the budget
    /// hold at the engine's starting capacity, with up to `prefetch_depth`
    /// staging slots (fewer if that is what it takes to fit).
    pub fn budget_fit(prefetch_depth: usize) -> Self {
        Self::budget_fit_placed(prefetch_depth, HostAttention::Never)
    }

    /// [`StaticPolicy::budget_fit`] under a placement choice (see the module
    /// docs): with `Always`, the fewest pooled layers that fit with every one
    /// of them attended on the host.
    pub fn budget_fit_placed(prefetch_depth: usize, host_attention: HostAttention) -> Self {
        StaticPolicy {
            pinned: None,
            prefetch_depth,
            host_attention,
        }
    }
}

/// The fewest pooled layers, spread across the depth and all attended on the
/// host, whose resident layers fit `budget` (no staging slot is needed).
fn host_budget_plan(ctx: &PolicyContext<'_>, prefetch_depth: usize) -> Result<Plan> {
    let n = ctx.specs.len();
    let Some(budget) = ctx.device_budget else {
        return Ok(Plan::all_resident());
    };
    (0..=n)
        .map(|count| {
            let mut plan = Plan::spread(n, count, prefetch_depth.max(1));
            plan.host_attended = plan.pooled.clone();
            plan
        })
        .find(|plan| ArenaLayout::device_bytes_for(ctx.specs, ctx.capacity, plan) <= budget)
        .ok_or_else(|| {
            PieError::internal("a plan attending every layer on the host takes no device bytes")
        })
}

impl Policy for StaticPolicy {
    fn initial_plan(&mut self, ctx: &PolicyContext<'_>) -> Result<Plan> {
        match &self.pinned {
            Some(plan) => Ok(plan.clone()),
            None if self.host_attention == HostAttention::Always => {
                host_budget_plan(ctx, self.prefetch_depth)
            }
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
        // Host attention only: no staging slot, so one pooled layer fits
        // three slots' worth of budget where a copy fit needed two.
        let mut p = StaticPolicy::budget_fit_placed(2, HostAttention::Always);
        let plan = p.initial_plan(&ctx).unwrap();
        assert_eq!(
            (plan.pooled.clone(), plan.host_attended.clone()),
            (vec![3], vec![3])
        );
        assert_eq!(plan.staging_slots(), 0);
        let mut p = StaticPolicy::budget_fit_placed(2, HostAttention::Auto);
        assert_eq!(p.initial_plan(&ctx).unwrap(), Plan::spread(4, 2, 1));
    }
}
