//! The search for the best static plan.
//!
//! A plan is a set of pooled layers plus a prefetch depth `W`. The search
//! enumerates layer sets, gives each the depths the budget allows, and scores
//! every candidate with [`cost_model`](super::cost_model)'s predictor.
//!
//! **Which sets.** For models of up to [`EXHAUSTIVE_MAX_LAYERS`] layers every
//! subset is tried. For deeper models the search tries, for every count `P`,
//! a family of placements: the even spread of [`spread_positions`] and its
//! rotations by up to 7 layers, a compute-weighted spread (pooled layers sit
//! at equal shares of cumulative compute, so uneven layers get equal windows),
//! and the contiguous tail. Justification: the predictor depends on a
//! placement only through the compute between a pooled layer and the one `W`
//! pooled layers later (the window its prefetch hides under) and through the
//! copies' sizes; decoder layers of one model are identical in size, so the
//! best placement is the one that equalises those windows, which is what the
//! spreads do, and rotations cover where the step boundary falls. The test
//! `restricted_search_matches_exhaustive` checks on models of up to 14 layers
//! that the restricted family finds the exhaustive optimum.
//!
//! **Which depths.** A larger `W` issues every prefetch earlier (the copy of
//! `p_{k+W}` starts after `p_k`, an earlier layer) and never later, so stall
//! does not increase with `W` (a property test checks this). Under
//! [`Objective::Speed`] each set therefore gets the largest `W` the budget
//! allows; under [`Objective::Memory`] the smallest `W` whose step stays within
//! the allowed slowdown ([`best_static_plan_within`]; [`DEFAULT_MEMORY_SLOWDOWN`]
//! x compute unless said otherwise), found by bisection.
//!
//! **Which placements.** With a host model ([`PolicyInputs::host`]), each
//! pooled layer is either copied or attended on the host. `Never` tries copies
//! only and `Always` host attention only. `Auto` tries, for a set of `P` pooled
//! layers, `P + 1` placements: for each count `m`, the `m` host-attended layers
//! evenly spread among the pooled ones ([`spread_positions`] over the set), not
//! all `2^P`. Justification: a host-attended layer adds its round trip to the
//! step wherever it sits (the same for layers of equal size), and otherwise
//! matters only as compute the copies of the other pooled layers hide under;
//! spreading the host-attended layers evenly leaves the copied ones evenly
//! spaced too, which equalises the windows their prefetches hide under, as
//! for the sets above. `m = 0` (copy only) is always a candidate, and the
//! search keeps the best copy-only plan unless a placement is faster by more
//! than [`TIE_TOLERANCE`], so `Auto` is never predicted slower than `Never`
//! (the property test `auto_is_never_slower_than_copy_only` checks it).
//! The cost is `P + 1` predictions per set instead of one, pruned as below:
//! `pie-rs simulate` on an 80-layer model (three searches) takes about 10 ms
//! in a release build.
//!
//! **Pruning.** A step cannot be shorter than its compute plus the host round
//! trips of its `m` host-attended layers, nor than the H2D queue's busy time,
//! which for `P - m` swapped layers is at least the sum of the `P - m` cheapest
//! copies; the smallest over `m` of the larger of the two grows with `P`, so
//! counts stop once it exceeds the best step found (speed) or the allowed
//! step (memory: the slowdown x compute), and a placement whose compute plus round trips exceeds the best
//! step is not predicted.

use super::cost_model::{
    device_bytes, predict_unchecked, slot_bytes, PolicyInputs, Prediction, STALL_TOLERANCE,
};
use super::{HostAttention, Objective, DEFAULT_MEMORY_SLOWDOWN};
use crate::error::{PieError, Result};
use crate::plan::{spread_positions, Plan};

/// Models with at most this many layers are searched over every layer subset.
pub const EXHAUSTIVE_MAX_LAYERS: usize = 16;

/// Step times within this relative difference count as equal; ties go to the
/// plan that moves fewer bytes, then to the one that uses less device memory.
pub const TIE_TOLERANCE: f64 = 1e-3;

/// A plan and its predicted steady state.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The plan.
    pub plan: Plan,
    /// Its predicted steady state.
    pub prediction: Prediction,
}

/// The best static plan for `inputs` under `inputs.objective`:
/// * [`Objective::Speed`]: the shortest predicted step whose device bytes fit
///   the budget (all resident when everything fits);
/// * [`Objective::Memory`]: the largest offloaded share whose step stays within
///   [`DEFAULT_MEMORY_SLOWDOWN`] x compute (see [`Prediction::within`]) and
///   that fits the budget (ties: the faster plan); when the budget forces a
///   slower step, the fastest plan. [`best_static_plan_within`] takes another
///   slowdown.
///
/// Errors with [`PieError::Budget`] when not even one staging slot fits.
pub fn best_static_plan(inputs: &PolicyInputs) -> Result<Choice> {
    best_static_plan_in(inputs, SearchSpace::Auto)
}

/// Which layer sets a search tries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SearchSpace {
    /// Every subset up to [`EXHAUSTIVE_MAX_LAYERS`] layers, the restricted family beyond.
    #[default]
    Auto,
    /// Every subset (at most [`EXHAUSTIVE_MAX_LAYERS`] layers, else an error).
    Exhaustive,
    /// The restricted family of placements (see the module docs), at any depth.
    Restricted,
}

/// [`best_static_plan`] over an explicit [`SearchSpace`].
pub fn best_static_plan_in(inputs: &PolicyInputs, space: SearchSpace) -> Result<Choice> {
    best_static_plan_within(inputs, space, DEFAULT_MEMORY_SLOWDOWN)
}

/// [`best_static_plan_in`] with the memory objective's plan allowed a step of
/// up to `slowdown` x compute (the speed objective ignores it). Errors with a
/// [`PieError::Config`] unless `slowdown` is finite and at least 1.
pub fn best_static_plan_within(
    inputs: &PolicyInputs,
    space: SearchSpace,
    slowdown: f64,
) -> Result<Choice> {
    inputs.validate()?;
    if !(slowdown.is_finite() && slowdown >= 1.0) {
        return Err(PieError::config(format!(
            "the memory objective's slowdown must be a finite factor of at least 1, not {slowdown}"
        )));
    }
    let exhaustive = match space {
        SearchSpace::Auto => inputs.num_layers() <= EXHAUSTIVE_MAX_LAYERS,
        SearchSpace::Exhaustive if inputs.num_layers() > EXHAUSTIVE_MAX_LAYERS => {
            return Err(PieError::config(format!(
                "an exhaustive search covers at most {EXHAUSTIVE_MAX_LAYERS} layers, not {}",
                inputs.num_layers()
            )))
        }
        SearchSpace::Exhaustive => true,
        SearchSpace::Restricted => false,
    };
    let choice = match inputs.objective {
        Objective::Speed => search_speed(inputs, exhaustive)?,
        Objective::Memory => match search_memory(inputs, exhaustive, slowdown) {
            Some(c) => c,
            None => search_speed(inputs, exhaustive)?,
        },
    };
    if choice_of(inputs) != HostAttention::Auto {
        return Ok(choice);
    }
    // Auto may place layers on the host only where that is predicted faster
    // than the best copy-only plan (see the module docs). Otherwise it is that
    // plan itself: a copy plan found by the placed search may tie with it in
    // step time yet differ in rounding, and "never slower than copy-only"
    // must hold exactly.
    let copy_only = PolicyInputs {
        host: None,
        ..inputs.clone()
    };
    let copy = best_static_plan_within(&copy_only, space, slowdown)?;
    let faster = !choice.plan.host_attended.is_empty()
        && choice.prediction.step_seconds < copy.prediction.step_seconds * (1.0 - TIE_TOLERANCE);
    Ok(if faster { choice } else { copy })
}

/// The placement choice the inputs allow: `Never` without a host model.
fn choice_of(inputs: &PolicyInputs) -> HostAttention {
    inputs.host.map_or(HostAttention::Never, |h| h.choice)
}

/// The host-attended subsets of pooled `set` the search tries (see the module docs).
pub fn placements(inputs: &PolicyInputs, set: &[usize]) -> Vec<Vec<usize>> {
    match choice_of(inputs) {
        HostAttention::Never => vec![Vec::new()],
        HostAttention::Always => vec![set.to_vec()],
        HostAttention::Auto => (0..=set.len())
            .map(|m| {
                spread_positions(set.len(), m)
                    .into_iter()
                    .map(|k| set[k])
                    .collect()
            })
            .collect(),
    }
}

/// The plan pooling `set` with `host` attended on the host, with the most
/// staging slots the budget allows for the copied layers; `None` when it does
/// not fit even with one (or, all host-attended, with none).
pub fn fitted_plan(inputs: &PolicyInputs, set: &[usize], host: &[usize]) -> Option<Plan> {
    let copied = set.len() - host.len();
    let mut plan = Plan {
        pooled: set.to_vec(),
        host_attended: host.to_vec(),
        prefetch_depth: 1,
    };
    let Some(budget) = inputs.budget_bytes else {
        plan.prefetch_depth = copied.max(1);
        return Some(plan);
    };
    let one = device_bytes(&inputs.layer_bytes, &plan);
    if one > budget {
        return None;
    }
    let slot = set
        .iter()
        .map(|&i| slot_bytes(inputs.layer_bytes[i]))
        .max()
        .unwrap_or(0);
    if copied > 0 && slot > 0 {
        let extra = ((budget - one) / slot) as usize;
        plan.prefetch_depth = (1 + extra).min(copied);
    } else {
        plan.prefetch_depth = copied.max(1);
    }
    Some(plan)
}

/// The largest share of the KV's device footprint that can be pooled with no
/// stall on this link and compute, ignoring the budget (see
/// [`Prediction::offloaded_share`]). 0 when nothing can be hidden.
pub fn transparent_fraction(inputs: &PolicyInputs) -> Result<f64> {
    inputs.validate()?;
    let unlimited = PolicyInputs {
        budget_bytes: None,
        objective: Objective::Memory,
        ..inputs.clone()
    };
    let exhaustive = inputs.num_layers() <= EXHAUSTIVE_MAX_LAYERS;
    Ok(search_memory(&unlimited, exhaustive, 1.0 + STALL_TOLERANCE)
        .map(|c| c.prediction.offloaded_share.max(0.0))
        .unwrap_or(0.0))
}

/// The largest prefetch depth the budget allows for pooling `set`, clamped to
/// `set.len()`; 0 when not even one staging slot fits.
pub fn max_depth(inputs: &PolicyInputs, set: &[usize]) -> usize {
    fitted_plan(inputs, set, &[]).map_or(0, |p| p.prefetch_depth.min(set.len()))
}

/// Prefix sums of the cheapest of `durations`: entry `k` is the sum of the `k`
/// smallest, `k = 0..=len`.
fn cheapest_prefix(mut d: Vec<f64>) -> Vec<f64> {
    d.sort_by(f64::total_cmp);
    let mut prefix = Vec::with_capacity(d.len() + 1);
    prefix.push(0.0);
    for x in d {
        prefix.push(prefix.last().copied().unwrap_or(0.0) + x);
    }
    prefix
}

/// Host round trip of each layer were it host-attended (empty without a host model).
fn host_seconds(inputs: &PolicyInputs) -> Vec<f64> {
    inputs.host.map_or_else(Vec::new, |h| {
        inputs
            .valid_bytes
            .iter()
            .map(|&b| h.layer_seconds(&inputs.link, b))
            .collect()
    })
}

/// Lower bounds on the step time of any plan pooling `P` layers, `P = 0..=L`
/// (see the module docs): for each `P`, the smallest over the allowed host
/// counts `m` of `max(compute + m cheapest round trips, P - m cheapest copies)`.
fn step_lower_bounds(inputs: &PolicyInputs) -> Vec<f64> {
    let compute = inputs.compute_total();
    let copies = cheapest_prefix(
        inputs
            .valid_bytes
            .iter()
            .map(|&b| inputs.link.h2d_seconds(b))
            .collect(),
    );
    let host = cheapest_prefix(host_seconds(inputs));
    let choice = choice_of(inputs);
    (0..copies.len())
        .map(|p| {
            let ms: Vec<usize> = match choice {
                HostAttention::Never => vec![0],
                HostAttention::Always => vec![p],
                HostAttention::Auto => (0..=p).collect(),
            };
            ms.into_iter()
                .map(|m| (compute + host[m]).max(copies[p - m]))
                .fold(f64::INFINITY, f64::min)
        })
        .collect()
}

/// Calls `f` with every candidate layer set of size `p`.
fn for_each_set(inputs: &PolicyInputs, p: usize, exhaustive: bool, mut f: impl FnMut(&[usize])) {
    let l = inputs.num_layers();
    if exhaustive {
        // Gosper's hack: every l-bit mask with p bits set, in increasing order.
        let mut set = Vec::with_capacity(p);
        let mut mask: u32 = (1u32 << p) - 1;
        let limit: u32 = 1u32 << l;
        while mask < limit {
            set.clear();
            set.extend((0..l).filter(|&i| mask & (1 << i) != 0));
            f(&set);
            if mask == 0 {
                break;
            }
            let c = mask & mask.wrapping_neg();
            let r = mask + c;
            mask = (((r ^ mask) >> 2) / c) | r;
        }
    } else {
        for set in restricted_sets(&inputs.compute_seconds, p) {
            f(&set);
        }
    }
}

/// The placements tried for `p` pooled layers in a deep model (see the module docs).
pub fn restricted_sets(compute_seconds: &[f64], p: usize) -> Vec<Vec<usize>> {
    let l = compute_seconds.len();
    let p = p.min(l);
    let mut sets: Vec<Vec<usize>> = Vec::new();
    if p == 0 {
        return vec![Vec::new()];
    }
    let spread = spread_positions(l, p);
    let gap = l / p;
    for r in 1..gap.min(8) {
        if spread[0] >= r {
            sets.push(spread.iter().map(|&x| x - r).collect());
        }
    }
    sets.insert(0, spread);
    sets.push(weighted_spread(compute_seconds, p));
    sets.push((l - p..l).collect());
    let mut unique: Vec<Vec<usize>> = Vec::with_capacity(sets.len());
    for s in sets {
        if !unique.contains(&s) {
            unique.push(s);
        }
    }
    unique
}

/// `p` layers at equal shares of the cumulative compute: pooled layer `k` is the
/// first layer by which `(k + 1) / p` of the step's compute is done, so each
/// pooled layer's prefetch gets about the same compute to hide under even when
/// layers differ. The last layer is always included.
pub fn weighted_spread(compute_seconds: &[f64], p: usize) -> Vec<usize> {
    let l = compute_seconds.len();
    let p = p.min(l);
    if p == 0 {
        return Vec::new();
    }
    let total: f64 = compute_seconds.iter().sum();
    if total <= 0.0 {
        return spread_positions(l, p);
    }
    let mut cum = Vec::with_capacity(l);
    let mut acc = 0.0;
    for &c in compute_seconds {
        acc += c;
        cum.push(acc);
    }
    let mut pos: Vec<usize> = (0..p)
        .map(|k| {
            let target = (k + 1) as f64 / p as f64 * total * (1.0 - 1e-12);
            cum.iter().position(|&c| c >= target).unwrap_or(l - 1)
        })
        .collect();
    // Make positions strictly increasing and in range, keeping the last at l - 1.
    for k in (0..p).rev() {
        pos[k] = pos[k].min(l - p + k);
    }
    for k in 1..p {
        pos[k] = pos[k].max(pos[k - 1] + 1);
    }
    pos
}

fn speed_better(new: &Prediction, old: &Prediction) -> bool {
    if new.step_seconds < old.step_seconds * (1.0 - TIE_TOLERANCE) {
        return true;
    }
    if new.step_seconds > old.step_seconds * (1.0 + TIE_TOLERANCE) {
        return false;
    }
    let nk = (new.h2d_bytes, new.device_bytes);
    let ok = (old.h2d_bytes, old.device_bytes);
    nk < ok || (nk == ok && new.step_seconds < old.step_seconds)
}

fn memory_better(new: &Prediction, old: &Prediction) -> bool {
    if new.device_bytes != old.device_bytes {
        return new.device_bytes < old.device_bytes;
    }
    if new.step_seconds != old.step_seconds {
        return new.step_seconds < old.step_seconds;
    }
    new.h2d_bytes < old.h2d_bytes
}

fn budget_error(inputs: &PolicyInputs) -> PieError {
    let smallest = inputs
        .layer_bytes
        .iter()
        .copied()
        .max()
        .map(slot_bytes)
        .unwrap_or(0);
    PieError::budget(format!(
        "a device budget of {} bytes cannot hold even one staging slot of {} bytes; raise the budget",
        inputs.budget_bytes.unwrap_or(u64::MAX),
        smallest
    ))
}

fn fits(inputs: &PolicyInputs, plan: &Plan) -> bool {
    inputs
        .budget_bytes
        .is_none_or(|b| device_bytes(&inputs.layer_bytes, plan) <= b)
}

fn search_speed(inputs: &PolicyInputs, exhaustive: bool) -> Result<Choice> {
    let all = Plan::all_resident();
    if fits(inputs, &all) {
        let prediction = predict_unchecked(inputs, &all);
        return Ok(Choice {
            plan: all,
            prediction,
        });
    }
    let compute = inputs.compute_total();
    let bounds = step_lower_bounds(inputs);
    let host = host_seconds(inputs);
    let mut best: Option<Choice> = None;
    for (p, &bound) in bounds.iter().enumerate().skip(1) {
        if let Some(b) = &best {
            if bound > b.prediction.step_seconds * (1.0 + TIE_TOLERANCE) {
                break;
            }
        }
        for_each_set(inputs, p, exhaustive, |set| {
            for placed in placements(inputs, set) {
                if let Some(b) = &best {
                    let floor = compute + placed.iter().map(|&i| host[i]).sum::<f64>();
                    if floor > b.prediction.step_seconds * (1.0 + TIE_TOLERANCE) {
                        continue;
                    }
                }
                let Some(plan) = fitted_plan(inputs, set, &placed) else {
                    continue;
                };
                let prediction = predict_unchecked(inputs, &plan);
                if best
                    .as_ref()
                    .is_none_or(|b| speed_better(&prediction, &b.prediction))
                {
                    best = Some(Choice { plan, prediction });
                }
            }
        });
    }
    best.ok_or_else(|| budget_error(inputs))
}

/// The plan with the least device memory that fits the budget and whose step
/// is within `slowdown` x compute, if any.
fn search_memory(inputs: &PolicyInputs, exhaustive: bool, slowdown: f64) -> Option<Choice> {
    let compute = inputs.compute_total();
    let bounds = step_lower_bounds(inputs);
    let always = choice_of(inputs) == HostAttention::Always;
    let mut best: Option<Choice> = None;
    let all = Plan::all_resident();
    if fits(inputs, &all) {
        let prediction = predict_unchecked(inputs, &all);
        best = Some(Choice {
            plan: all,
            prediction,
        });
    }
    for (p, &bound) in bounds.iter().enumerate().skip(1) {
        if bound > compute * slowdown {
            break;
        }
        for_each_set(inputs, p, exhaustive, |set| {
            if always {
                // Host attention only: one placement, no staging slots.
                let Some(plan) = fitted_plan(inputs, set, set) else {
                    return;
                };
                let prediction = predict_unchecked(inputs, &plan);
                if prediction.within(slowdown)
                    && best
                        .as_ref()
                        .is_none_or(|b| memory_better(&prediction, &b.prediction))
                {
                    best = Some(Choice { plan, prediction });
                }
                return;
            }
            // Otherwise copies only: a host-attended layer adds its whole round
            // trip to the step, while a copy can hide; the memory objective
            // spends its small allowance on copies.
            let w_max = max_depth(inputs, set);
            if w_max == 0 {
                return;
            }
            // The least device memory this set could reach (one staging slot).
            let floor = device_bytes(&inputs.layer_bytes, &Plan::copying(set.to_vec(), 1));
            if best
                .as_ref()
                .is_some_and(|b| floor > b.prediction.device_bytes)
            {
                return;
            }
            let eval = |w: usize| {
                let plan = Plan::copying(set.to_vec(), w);
                let pred = predict_unchecked(inputs, &plan);
                (plan, pred)
            };
            let (plan_hi, pred_hi) = eval(w_max);
            if !pred_hi.within(slowdown) {
                return;
            }
            // Bisection for the smallest depth within the slowdown (stall is monotone in W).
            let (mut lo, mut hi) = (1usize, w_max);
            let mut found = (plan_hi, pred_hi);
            while lo < hi {
                let mid = (lo + hi) / 2;
                let (plan, pred) = eval(mid);
                if pred.within(slowdown) {
                    hi = mid;
                    found = (plan, pred);
                } else {
                    lo = mid + 1;
                }
            }
            let (plan, prediction) = found;
            if best
                .as_ref()
                .is_none_or(|b| memory_better(&prediction, &b.prediction))
            {
                best = Some(Choice { plan, prediction });
            }
        });
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::LinkModel;

    #[test]
    fn gosper_enumerates_every_subset_once() {
        let inputs = PolicyInputs::uniform(
            6,
            1e-3,
            100,
            0,
            LinkModel::symmetric(1e9, 0.0),
            None,
            Objective::Speed,
        );
        let mut n = 0;
        for p in 0..=6 {
            let mut seen = Vec::new();
            for_each_set(&inputs, p, true, |s| {
                assert_eq!(s.len(), p);
                seen.push(s.to_vec());
            });
            let before = seen.len();
            seen.dedup();
            assert_eq!(before, seen.len());
            n += seen.len();
        }
        assert_eq!(n, 64);
    }

    #[test]
    fn weighted_spread_follows_compute() {
        // Heavy first half: the pooled layers crowd where compute accumulates.
        let c = [4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0];
        let w = weighted_spread(&c, 2);
        assert_eq!(w, vec![2, 7]);
        let w = weighted_spread(&c, 8);
        assert_eq!(w, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn max_depth_respects_budget() {
        let mut inputs = PolicyInputs::uniform(
            8,
            1e-3,
            1024,
            0,
            LinkModel::symmetric(1e9, 0.0),
            Some(6 * 1024),
            Objective::Speed,
        );
        assert_eq!(max_depth(&inputs, &[1, 3, 5, 7]), 2);
        assert_eq!(max_depth(&inputs, &[7]), 0);
        inputs.budget_bytes = None;
        assert_eq!(max_depth(&inputs, &[1, 3]), 2);
    }
}
