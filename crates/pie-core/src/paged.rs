//! Sizing a paged KV cache (continuous batching) under a device budget.
//!
//! A paged cache keeps each layer as one flat area of token rows cut into
//! blocks; how many blocks it has is free, and fixed when the cache is made.
//! With some layers pooled, a budget holds the resident layers' areas plus the
//! staging slots the pooled ones borrow, so the same budget buys more rows the
//! more layers are pooled. This module answers, once, how many rows a budget
//! buys under a plan, or which plan a wanted number of rows needs; the Python
//! side asks it and computes no bytes itself.

use crate::error::{PieError, Result};
use crate::layout::LayerSpec;
use crate::plan::Plan;
use crate::slots::ArenaLayout;

/// What to size for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PagedTarget {
    /// This plan (pinned by the caller): as many rows as the budget holds.
    Plan(Plan),
    /// `count` layers pooled, spread across the depth, sharing `staging`
    /// slots: as many rows as the budget holds.
    Pooled {
        /// Layers in host memory.
        count: usize,
        /// Device staging slots they share (none when they are host-attended).
        staging: usize,
        /// Every pooled layer attended on the host: never copied, so no
        /// staging slot takes the budget and it buys rows instead (when some
        /// layer stays resident; with every layer pooled the device holds no
        /// rows, and the cache is sized as with copies).
        host_attended: bool,
    },
    /// At least `rows` rows per layer: the plan pooling the fewest layers (up
    /// to `staging` slots) that holds them.
    Rows {
        /// Rows wanted per layer.
        rows: usize,
        /// Most staging slots to use.
        staging: usize,
    },
}

/// A paged cache's size under a budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagedFit {
    /// Rows per layer (a multiple of the quantum).
    pub rows: usize,
    /// The plan those rows fit under.
    pub plan: Plan,
    /// Device bytes the engine's arena takes.
    pub device_bytes: usize,
    /// Host bytes the pooled layers take.
    pub host_bytes: usize,
}

/// Sizes a paged cache of `layers` layers, each row of which is `row` (one
/// token of one layer: `LayerSpec { batch: 1, kv_heads: 1, .. }`), in whole
/// `quantum`s of rows, with at least `min_rows` rows, within `budget` device
/// bytes (`None`: no limit, which only a [`PagedTarget::Rows`] can size).
pub fn paged_fit(
    row: &LayerSpec,
    layers: usize,
    budget: Option<usize>,
    quantum: usize,
    min_rows: usize,
    target: &PagedTarget,
) -> Result<PagedFit> {
    row.validate()?;
    if layers == 0 || quantum == 0 {
        return Err(PieError::config(
            "a paged cache needs at least one layer and a positive block quantum",
        ));
    }
    let specs = vec![*row; layers];
    let min_rows = min_rows.max(1).div_ceil(quantum) * quantum;
    let fit = |rows: usize, plan: Plan| -> Result<PagedFit> {
        let layout = ArenaLayout::new(&specs, rows, &plan)?;
        Ok(PagedFit {
            rows,
            device_bytes: layout.device_bytes,
            host_bytes: layout.host_bytes,
            plan,
        })
    };
    let need = |rows: usize, plan: &Plan| ArenaLayout::device_bytes_for(&specs, rows, plan);
    let most_rows = |plan: Plan| -> Result<PagedFit> {
        plan.validate(layers)?;
        let Some(budget) = budget else {
            return Err(PieError::config(
                "without a gpu_budget the number of blocks cannot be derived from pooling; give num_blocks in the continuous batching config",
            ));
        };
        crate::slots::check_capacity(&specs, min_rows)?;
        if need(min_rows, &plan) > budget {
            return Err(too_small(budget, min_rows, need(min_rows, &plan), &plan));
        }
        // Device bytes grow with the rows: the largest multiple of the quantum
        // that fits, by bisection over quanta.
        let (mut lo, mut hi) = (min_rows / quantum, min_rows / quantum + 1);
        while crate::slots::check_capacity(&specs, hi * quantum).is_ok()
            && need(hi * quantum, &plan) <= budget
        {
            lo = hi;
            hi *= 2;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if crate::slots::check_capacity(&specs, mid * quantum).is_ok()
                && need(mid * quantum, &plan) <= budget
            {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        fit(lo * quantum, plan)
    };
    match target {
        PagedTarget::Plan(plan) => most_rows(plan.clone()),
        PagedTarget::Pooled {
            count,
            staging,
            host_attended,
        } => {
            if *count > layers {
                return Err(PieError::config(format!(
                    "cannot pool {count} layers of {layers}; pool at most {layers}"
                )));
            }
            let mut plan = Plan::spread(layers, *count, (*staging).max(1));
            // With every layer pooled and host-attended the device holds none of
            // the rows, so the budget would bound nothing: such a cache is sized
            // as the copied plan would be.
            if *host_attended && *count < layers {
                plan.host_attended = plan.pooled.clone();
            }
            most_rows(plan)
        }
        PagedTarget::Rows { rows, staging } => {
            let rows = (*rows).max(min_rows).div_ceil(quantum) * quantum;
            crate::slots::check_capacity(&specs, rows)?;
            let plan =
                crate::fit::budget_plan(&specs, rows, budget, (*staging).max(1)).map_err(|_| {
                    let all = Plan::spread(layers, layers, 1);
                    too_small(budget.unwrap_or(0), rows, need(rows, &all), &all)
                })?;
            fit(rows, plan)
        }
    }
}

fn too_small(budget: usize, rows: usize, need: usize, plan: &Plan) -> PieError {
    PieError::budget(format!(
        "a device budget of {budget} bytes cannot hold a paged cache of {rows} rows per layer with {} layers pooled and {} staging slots (needs {need} bytes); raise gpu_budget, or lower the page size or the longest request",
        plan.pooled.len(),
        plan.staging_slots()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> LayerSpec {
        LayerSpec {
            batch: 1,
            kv_heads: 1,
            k_dim: 128,
            v_dim: 128,
            elem_size: 2,
        }
    }

    #[test]
    fn pooling_buys_rows_and_the_answer_fits_exactly() {
        let budget = 8 << 20;
        let resident = paged_fit(
            &row(),
            8,
            Some(budget),
            16,
            16,
            &PagedTarget::Plan(Plan::all_resident()),
        )
        .unwrap();
        let pooled = paged_fit(
            &row(),
            8,
            Some(budget),
            16,
            16,
            &PagedTarget::Pooled {
                count: 6,
                staging: 2,
                host_attended: false,
            },
        )
        .unwrap();
        assert!(resident.device_bytes <= budget && pooled.device_bytes <= budget);
        // 8 resident areas against 2 resident + 2 staging: twice the rows.
        assert_eq!(pooled.rows, 2 * resident.rows);
        assert_eq!(pooled.plan.pooled.len(), 6);
        // One more quantum would not fit.
        let specs = vec![row(); 8];
        assert!(ArenaLayout::device_bytes_for(&specs, pooled.rows + 16, &pooled.plan) > budget);
        assert_eq!(pooled.rows % 16, 0);
    }

    #[test]
    fn host_attended_pooled_layers_take_no_staging_slot_so_buy_more_rows() {
        let budget = 8 << 20;
        let target = |host_attended| PagedTarget::Pooled {
            count: 6,
            staging: 2,
            host_attended,
        };
        let copied = paged_fit(&row(), 8, Some(budget), 16, 16, &target(false)).unwrap();
        let host = paged_fit(&row(), 8, Some(budget), 16, 16, &target(true)).unwrap();
        assert_eq!(host.plan.host_attended, host.plan.pooled);
        assert_eq!(host.plan.staging_slots(), 0);
        assert!(host.device_bytes <= budget);
        // 2 resident areas against 2 resident + 2 staging: twice the rows.
        assert_eq!(host.rows, 2 * copied.rows);
        // Every layer pooled: the budget bounds no device rows, so the copied sizing holds.
        let all = |host_attended| PagedTarget::Pooled {
            count: 8,
            staging: 2,
            host_attended,
        };
        let copied = paged_fit(&row(), 8, Some(budget), 16, 16, &all(false)).unwrap();
        let host = paged_fit(&row(), 8, Some(budget), 16, 16, &all(true)).unwrap();
        assert_eq!(host, copied);
    }

    #[test]
    fn a_row_target_pools_the_fewest_layers() {
        let budget = 8 << 20;
        let resident = paged_fit(
            &row(),
            8,
            Some(budget),
            16,
            16,
            &PagedTarget::Plan(Plan::all_resident()),
        )
        .unwrap();
        let same = paged_fit(
            &row(),
            8,
            Some(budget),
            16,
            16,
            &PagedTarget::Rows {
                rows: resident.rows,
                staging: 2,
            },
        )
        .unwrap();
        assert!(same.plan.pooled.is_empty());
        let more = paged_fit(
            &row(),
            8,
            Some(budget),
            16,
            16,
            &PagedTarget::Rows {
                rows: resident.rows * 3 / 2,
                staging: 2,
            },
        )
        .unwrap();
        assert!(!more.plan.pooled.is_empty() && more.device_bytes <= budget);
    }

    #[test]
    fn a_budget_below_the_minimum_says_what_to_change() {
        let err = paged_fit(
            &row(),
            4,
            Some(1000),
            16,
            64,
            &PagedTarget::Pooled {
                count: 4,
                staging: 1,
                host_attended: false,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("raise gpu_budget"), "{err}");
        let err = paged_fit(
            &row(),
            4,
            Some(1000),
            16,
            64,
            &PagedTarget::Rows {
                rows: 1 << 20,
                staging: 1,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("raise gpu_budget"), "{err}");
    }
}
