//! The per-step plan: which layers are pooled, which of those are attended on
//! the host where their KV lives, and how many staging slots (the prefetch
//! depth) the others cycle through. Plans change only at step boundaries.

use crate::error::{PieError, Result};

/// Which layers live in host memory, which of them are attended there, and
/// how many device staging slots the copied ones share.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Plan {
    /// Pooled layer indices, strictly increasing (execution order).
    pub pooled: Vec<usize>,
    /// Pooled layers whose attention runs on the host over the KV where it
    /// lives (only the query goes down and the partial result comes back):
    /// a subset of `pooled`, strictly increasing. They are never prefetched
    /// and borrow no staging slot; the other pooled layers are *copied*.
    pub host_attended: Vec<usize>,
    /// Prefetch depth `W`: the number of staging slots pooled layers borrow on the
    /// device. While pooled layer `k` computes, the copies of pooled layers
    /// `k+1 .. k+W-1` may be in flight; the copy of `k+W` starts when `k` is done.
    /// Ignored (may be 0) when nothing is pooled.
    pub prefetch_depth: usize,
}

impl Plan {
    /// Everything resident.
    pub fn all_resident() -> Self {
        Plan::default()
    }

    /// The plan pooling `pooled` through `prefetch_depth` staging slots, all
    /// of them copied (none attended on the host). Not validated.
    pub fn copying(pooled: Vec<usize>, prefetch_depth: usize) -> Self {
        Plan {
            pooled,
            host_attended: Vec::new(),
            prefetch_depth,
        }
    }

    /// Pooled layers that are copied to a staging slot for their attention
    /// (pooled and not host-attended), in execution order.
    pub fn copied(&self) -> Vec<usize> {
        self.pooled
            .iter()
            .copied()
            .filter(|&l| !self.is_host_attended(l))
            .collect()
    }

    /// Number of staging slots this plan uses: `prefetch_depth` clamped to the
    /// number of copied layers (more slots than copied layers would hold nothing).
    pub fn staging_slots(&self) -> usize {
        let copied = self.pooled.len() - self.host_attended.len();
        if copied == 0 {
            0
        } else {
            self.prefetch_depth.clamp(1, copied)
        }
    }

    /// Whether layer `layer` is pooled.
    pub fn is_pooled(&self, layer: usize) -> bool {
        self.pooled.binary_search(&layer).is_ok()
    }

    /// Whether pooled layer `layer` is attended on the host.
    pub fn is_host_attended(&self, layer: usize) -> bool {
        self.host_attended.binary_search(&layer).is_ok()
    }

    /// Checks indices are in range, sorted, unique, and the depth is usable.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if let Some(&bad) = self.pooled.iter().find(|&&l| l >= num_layers) {
            return Err(PieError::config(format!(
                "pooled layer {bad} does not exist; the model has {num_layers} cache layers (0..{})",
                num_layers.saturating_sub(1)
            )));
        }
        if self.pooled.windows(2).any(|w| w[0] >= w[1]) {
            return Err(PieError::config(
                "pooled layers must be listed once each, in increasing order",
            ));
        }
        if self.host_attended.windows(2).any(|w| w[0] >= w[1]) {
            return Err(PieError::config(
                "host-attended layers must be listed once each, in increasing order",
            ));
        }
        if let Some(&bad) = self.host_attended.iter().find(|&&l| !self.is_pooled(l)) {
            return Err(PieError::config(format!(
                "layer {bad} is host-attended but not pooled; only pooled layers can be attended on the host"
            )));
        }
        if self.staging_slots() > 0 && self.prefetch_depth == 0 {
            return Err(PieError::config(
                "prefetch_depth must be at least 1 when layers are copied from the pool",
            ));
        }
        Ok(())
    }

    /// The plan pooling `layers` (a set: any order, each layer once) with
    /// `prefetch_depth` staging slots, checked against `num_layers` layers.
    /// The one place a user's list of layers becomes a [`Plan`].
    pub fn from_layers(
        mut layers: Vec<usize>,
        prefetch_depth: usize,
        num_layers: usize,
    ) -> Result<Self> {
        layers.sort_unstable();
        if let Some(w) = layers.windows(2).find(|w| w[0] == w[1]) {
            return Err(PieError::config(format!(
                "pooled layer {} is listed twice; list each pooled layer once",
                w[0]
            )));
        }
        let plan = Plan::copying(layers, prefetch_depth);
        plan.validate(num_layers)?;
        Ok(plan)
    }

    /// [`Plan::from_layers`] with `host_attended` (a set: any order, each once,
    /// each pooled) attended on the host and the rest copied.
    pub fn from_placed_layers(
        layers: Vec<usize>,
        mut host_attended: Vec<usize>,
        prefetch_depth: usize,
        num_layers: usize,
    ) -> Result<Self> {
        let mut plan = Plan::from_layers(layers, prefetch_depth, num_layers)?;
        host_attended.sort_unstable();
        plan.host_attended = host_attended;
        plan.validate(num_layers)?;
        Ok(plan)
    }

    /// A plan pooling `count` of `num_layers` layers, spread evenly across the
    /// depth so each prefetch has as many layers of compute as possible to hide
    /// under, with `prefetch_depth` staging slots.
    pub fn spread(num_layers: usize, count: usize, prefetch_depth: usize) -> Self {
        Plan::copying(spread_positions(num_layers, count), prefetch_depth)
    }
}

/// `count` distinct positions in `0..n`, as evenly spaced as possible, with the
/// last layer always included when anything is pooled (its prefetch for the
/// next step hides under the whole head of the next step).
pub fn spread_positions(n: usize, count: usize) -> Vec<usize> {
    let count = count.min(n);
    if count == 0 {
        return Vec::new();
    }
    // Position k of count sits at the end of the k-th of `count` equal segments.
    (0..count)
        .map(|k| ((k + 1) * n).div_ceil(count) - 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_sorted_unique_and_in_range() {
        for n in 1..40 {
            for c in 0..=n {
                let p = spread_positions(n, c);
                assert_eq!(p.len(), c);
                assert!(p.windows(2).all(|w| w[0] < w[1]));
                assert!(p.iter().all(|&x| x < n));
                if c > 0 {
                    assert_eq!(*p.last().unwrap(), n - 1);
                }
            }
        }
    }

    #[test]
    fn spread_half_alternates() {
        assert_eq!(spread_positions(8, 4), vec![1, 3, 5, 7]);
    }

    #[test]
    fn validate_rejects_bad_plans() {
        assert!(Plan::copying(vec![3], 1).validate(3).is_err());
        assert!(Plan::copying(vec![1, 1], 1).validate(3).is_err());
        for host_attended in [vec![2], vec![1, 0], vec![0, 0]] {
            let bad = Plan {
                pooled: vec![0, 1],
                host_attended,
                prefetch_depth: 1,
            };
            assert!(bad.validate(3).is_err(), "{bad:?}");
        }
        assert!(Plan::copying(vec![1], 0).validate(3).is_err());
        assert!(Plan::copying(vec![0, 2], 5).validate(3).is_ok());
    }

    #[test]
    fn placed_layers_are_sorted_and_checked() {
        let plan = Plan::from_placed_layers(vec![3, 0, 2], vec![3, 0], 1, 4).unwrap();
        assert_eq!(
            (plan.pooled, plan.host_attended),
            (vec![0, 2, 3], vec![0, 3])
        );
        let e = Plan::from_placed_layers(vec![0, 2], vec![2, 2], 1, 4).unwrap_err();
        assert!(e.to_string().contains("listed once each"), "{e}");
        let e = Plan::from_placed_layers(vec![0, 2], vec![1], 1, 4).unwrap_err();
        assert!(
            e.to_string()
                .contains("layer 1 is host-attended but not pooled"),
            "{e}"
        );
    }
}
