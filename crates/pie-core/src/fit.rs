//! Sizing: how capacities are rounded and grown, and which plan fits a device
//! budget. Pure functions of the layer shapes, the capacity and the plan: no
//! backend, no engine, no threads. The engine, the policies, the bindings and
//! through them the Python side all ask here, so a budget means one thing.
//!
//! A plan's device bytes are its resident slots plus its staging slots, each
//! slot rounded up to [`SLOT_ALIGN`](crate::layout::SLOT_ALIGN) (see
//! [`ArenaLayout`]); the host arena is not counted against the budget.

use crate::error::{PieError, Result};
use crate::layout::LayerSpec;
use crate::plan::Plan;
use crate::slots::{check_capacity, ArenaLayout};

/// Capacities callers size a cache with are rounded up to a multiple of this
/// many tokens (see [`round_capacity`]).
pub const CAPACITY_QUANTUM: usize = 16;

/// `tokens` rounded up to a multiple of [`CAPACITY_QUANTUM`], at least one
/// quantum. Saturates instead of overflowing (an absurd capacity is refused
/// later, by [`check_capacity`]).
pub fn round_capacity(tokens: usize) -> usize {
    tokens
        .max(1)
        .div_ceil(CAPACITY_QUANTUM)
        .saturating_mul(CAPACITY_QUANTUM)
}

/// The capacity growth moves to when `tokens` do not fit `current`: at least
/// double the current capacity (so token-by-token growth costs amortized
/// constant time), at least `tokens`, rounded with [`round_capacity`].
pub fn grown_capacity(current: usize, tokens: usize) -> usize {
    round_capacity(tokens.max(current.saturating_mul(2)))
}

/// Checks layer shapes and a capacity the way an engine does before it lays
/// out its arenas: at least one layer, every shape valid, a capacity of at
/// least one token that keeps every size inside the address space.
pub fn check_shapes(specs: &[LayerSpec], capacity: usize) -> Result<()> {
    if specs.is_empty() {
        return Err(PieError::config(
            "no cache layers to manage; the model must have at least one full-attention layer",
        ));
    }
    for s in specs {
        s.validate()?;
    }
    if capacity == 0 {
        return Err(PieError::config("capacity must be at least 1 token"));
    }
    check_capacity(specs, capacity)
}

/// Device bytes `plan` needs for `specs` at `capacity` tokens, with every
/// input checked (shapes, capacity, plan).
pub fn device_bytes(specs: &[LayerSpec], capacity: usize, plan: &Plan) -> Result<usize> {
    check_shapes(specs, capacity)?;
    plan.validate(specs.len())?;
    Ok(ArenaLayout::device_bytes_for(specs, capacity, plan))
}

/// Checks that `plan` at `capacity` fits `budget`, saying by how much it does not.
pub fn check_budget(
    specs: &[LayerSpec],
    capacity: usize,
    plan: &Plan,
    budget: Option<usize>,
) -> Result<()> {
    if let Some(budget) = budget {
        let need = ArenaLayout::device_bytes_for(specs, capacity, plan);
        if need > budget {
            return Err(PieError::budget(format!(
                "the plan needs {need} device bytes for {} layers at {capacity} tokens ({} pooled, {} staging slots) but the budget is {budget}; raise gpu_budget or pool more layers",
                specs.len(),
                plan.pooled.len(),
                plan.staging_slots()
            )));
        }
    }
    Ok(())
}

/// The plan pooling the fewest layers, spread across the depth, that fits
/// `budget` at `capacity` with up to `prefetch_depth` staging slots (fewer
/// slots if that is what it takes to fit). Expects checked shapes (see
/// [`fit_plan`] for the checked form).
pub fn budget_plan(
    specs: &[LayerSpec],
    capacity: usize,
    budget: Option<usize>,
    prefetch_depth: usize,
) -> Result<Plan> {
    let n = specs.len();
    let Some(budget) = budget else {
        return Ok(Plan::all_resident());
    };
    for count in 0..=n {
        for depth in (1..=prefetch_depth.max(1)).rev() {
            let plan = Plan::spread(n, count, depth);
            if ArenaLayout::device_bytes_for(specs, capacity, &plan) <= budget {
                return Ok(plan);
            }
        }
    }
    Err(PieError::budget(format!(
        "a device budget of {budget} bytes cannot hold even one staging slot for {n} layers at {capacity} tokens (needs {} bytes with every layer pooled); raise gpu_budget, or lower the batch size or max_length",
        min_device_bytes(specs, capacity)
    )))
}

/// The fewest device bytes any plan needs for `specs` at `capacity`: every
/// layer pooled through one staging slot.
pub fn min_device_bytes(specs: &[LayerSpec], capacity: usize) -> usize {
    ArenaLayout::device_bytes_for(specs, capacity, &Plan::spread(specs.len(), specs.len(), 1))
}

/// A plan that fits a budget, and the device bytes it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fit {
    /// The plan: the fewest pooled layers, spread across the depth.
    pub plan: Plan,
    /// Device bytes the plan takes at the capacity asked about (at most the budget).
    pub device_bytes: usize,
}

/// Which plan fits `budget` (`None`: no limit) for `specs` at `capacity`
/// tokens: the one [`budget_plan`] chooses, which is also the plan a static
/// engine built with these arguments starts from. Every input is checked
/// (a [`PieError::Config`] names the bad one); a budget too small for any plan
/// is a [`PieError::Budget`] that states the minimum.
pub fn fit_plan(
    specs: &[LayerSpec],
    capacity: usize,
    budget: Option<usize>,
    prefetch_depth: usize,
) -> Result<Fit> {
    check_shapes(specs, capacity)?;
    if prefetch_depth == 0 {
        return Err(PieError::config(
            "prefetch_depth must be at least 1 (the staging slots pooled layers share)",
        ));
    }
    let plan = budget_plan(specs, capacity, budget, prefetch_depth)?;
    let device_bytes = ArenaLayout::device_bytes_for(specs, capacity, &plan);
    Ok(Fit { plan, device_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SLOT_ALIGN;
    use crate::ErrorKind;

    fn specs(n: usize) -> Vec<LayerSpec> {
        vec![
            LayerSpec {
                batch: 2,
                kv_heads: 2,
                k_dim: 8,
                v_dim: 8,
                elem_size: 2,
            };
            n
        ]
    }

    #[test]
    fn capacities_round_to_the_quantum() {
        assert_eq!(round_capacity(0), CAPACITY_QUANTUM);
        assert_eq!(round_capacity(1), CAPACITY_QUANTUM);
        assert_eq!(round_capacity(16), 16);
        assert_eq!(round_capacity(17), 32);
        assert_eq!(round_capacity(usize::MAX), usize::MAX);
    }

    #[test]
    fn growth_at_least_doubles_and_covers_the_tokens() {
        assert_eq!(grown_capacity(32, 33), 64);
        assert_eq!(grown_capacity(32, 100), 112);
        assert_eq!(grown_capacity(37, 38), 80);
        assert_eq!(grown_capacity(usize::MAX / 2 + 1, 1), usize::MAX);
    }

    #[test]
    fn no_budget_keeps_everything_resident() {
        let s = specs(4);
        let fit = fit_plan(&s, 64, None, 2).unwrap();
        assert!(fit.plan.pooled.is_empty());
        assert_eq!(fit.device_bytes, 4 * s[0].slot_bytes(64));
    }

    #[test]
    fn the_fewest_layers_are_pooled_and_the_fit_is_tight() {
        let s = specs(8);
        let slot = s[0].slot_bytes(64);
        assert_eq!(slot % SLOT_ALIGN, 0);
        // Room for 5 slots: pooling 4 layers with one staging slot (4 + 1) fits,
        // pooling 3 needs 5 resident + at least 1 staging.
        let fit = fit_plan(&s, 64, Some(5 * slot), 2).unwrap();
        assert_eq!(fit.plan.pooled.len(), 4);
        assert_eq!(fit.plan.staging_slots(), 1);
        assert_eq!(fit.device_bytes, 5 * slot);
        assert_eq!(fit.plan, Plan::spread(8, 4, 1));
        // One byte less and it takes more pooling.
        let fit = fit_plan(&s, 64, Some(5 * slot - 1), 2).unwrap();
        assert_eq!(fit.plan.pooled.len(), 5);
        assert!(check_budget(&s, 64, &fit.plan, Some(5 * slot - 1)).is_ok());
        assert_eq!(device_bytes(&s, 64, &fit.plan).unwrap(), fit.device_bytes);
    }

    #[test]
    fn a_budget_below_one_staging_slot_says_the_minimum() {
        let s = specs(3);
        let min = min_device_bytes(&s, 64);
        assert_eq!(min, s[0].slot_bytes(64));
        assert!(fit_plan(&s, 64, Some(min), 1).is_ok());
        let err = fit_plan(&s, 64, Some(min - 1), 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Budget);
        assert!(err.to_string().contains(&min.to_string()), "{err}");
    }

    #[test]
    fn bad_inputs_are_config_errors() {
        let s = specs(2);
        for err in [
            fit_plan(&[], 64, None, 1).unwrap_err(),
            fit_plan(&s, 0, None, 1).unwrap_err(),
            fit_plan(&s, 64, None, 0).unwrap_err(),
            fit_plan(&s, usize::MAX / 4, Some(1), 1).unwrap_err(),
            device_bytes(&s, 64, &Plan::spread(3, 3, 1)).unwrap_err(),
            device_bytes(&s, 64, &Plan::copying(vec![1, 0], 1)).unwrap_err(),
        ] {
            assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        }
    }
}
