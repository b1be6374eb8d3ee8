//! Pie's adaptive expansion: measure while running, re-plan, switch carefully.
//!
//! The policy keeps smoothed estimates of every layer's compute time and of
//! the link's bandwidth in each direction (from the bytes and busy seconds of
//! each step's copies), and at every step boundary asks the search
//! ([`best_static_plan_within`]) for the best plan under those estimates.
//!
//! * **Mandatory changes apply at once**: the first plan, a plan that no longer
//!   fits the budget (the KV grew: expansion), and any change of the KV's
//!   capacity, of the number of layers or of the budget (growth and shrink:
//!   expansion and contraction).
//! * **Other changes need evidence**: the candidate must beat the current plan
//!   by more than [`AdaptiveConfig::switch_gain`] on [`AdaptiveConfig::confirmations`]
//!   consecutive decisions. Under [`Objective::Speed`] the gain is the predicted
//!   step time (or, at equal speed, the bytes moved: pooling less when the budget
//!   allows). Under [`Objective::Memory`] the candidate's predicted step must be
//!   within [`AdaptiveConfig::memory_slowdown`] x compute and it must free at
//!   least one more layer's slot than the current plan (the unit of pooling; a
//!   share of the device bytes, as before, stopped growth a layer or two short
//!   on deep models); when the current plan exceeds the slowdown (KV growth, a
//!   slower link), any candidate within it, or one faster by the switch gain.
//! * **Estimates**: exponential smoothing with weight
//!   [`AdaptiveConfig::smoothing`]; a sample that departs from the estimate by
//!   more than [`AdaptiveConfig::jump_threshold`] is ignored once (an outlier)
//!   and adopted outright when the next one departs too (a real change: compute
//!   got faster or slower, the link slowed), so the policy settles within a few
//!   steps of a change.
//! * **Growth**: under [`Objective::Memory`] plans are predicted for the KV
//!   [`MEMORY_LOOKAHEAD_STEPS`] decode steps ahead, and a plan the growing KV
//!   has pushed past the slowdown is re-planned (the search is redone even
//!   when no estimate moved).
//! * **Shared links** ([`LinkModel::shared`]: one copy at a time in both
//!   directions): a copy's measured span includes its wait for the other
//!   direction's copies ahead of it on the link, so the policy counts each
//!   copy's hold of the link instead (see `shared_link_busy`), and a sample
//!   from the first step seen under a new plan does not update the link
//!   estimates at all: that step's write-backs queue behind the switch's own
//!   copies (layers moving between device and host), which no span shows.
//!   Taken as they are, such samples made the device-to-host estimate fall by
//!   orders of magnitude and the policy flap between plans, a switch every
//!   other step. On a full-duplex link each queue runs its copies in order
//!   and its spans are its own.
//!
//! Through [`Policy`], the engine's context gives the KV's shape and the budget
//! each time. The first plan is the search's under the priors, or, when
//! [`AdaptiveConfig::initial_prefetch_depth`] is set, the fewest pooled layers
//! (spread across the depth) that fit the budget with that many staging slots
//! (the search's, if not even every layer pooled fits with them); from there
//! the policy changes pooled layers and depth as its measurements warrant.
//!
//! **Host attention.** With [`AdaptiveConfig::host`] set, the search also
//! places each pooled layer (copied or attended on the host) under the model's
//! [`HostAttention`](super::HostAttention) choice. A host-attended layer's
//! measured time includes its host round trip; the policy subtracts the round
//! trip it predicts before smoothing, so its compute estimate stays the
//! device's and does not change with the placement.

use super::cost_model::{
    device_bytes, predict_unchecked, slot_bytes, LinkModel, PolicyInputs, Prediction,
};
use super::host_cost::HostModel;
use super::search::{best_static_plan_within, Choice, SearchSpace, TIE_TOLERANCE};
use super::{KvShape, Objective, Policy, PolicyContext, DEFAULT_MEMORY_SLOWDOWN};
use crate::error::{PieError, Result};
use crate::plan::Plan;
use crate::telemetry::StepSample;

/// Under [`Objective::Memory`], decode steps ahead the policy plans for: it
/// predicts plans with every layer's KV grown by this many steps' new tokens
/// (at most to the layer's capacity), so a plan chosen near the allowed
/// slowdown stays within it while the context grows, instead of drifting
/// past it a few steps later and forcing another switch.
pub const MEMORY_LOOKAHEAD_STEPS: usize = 32;

/// Tuning of the [`AdaptivePolicy`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveConfig {
    /// What to optimise.
    pub objective: Objective,
    /// Link estimates before any copy was measured; latencies stay at these values.
    pub link_prior: LinkModel,
    /// Per-layer compute seconds assumed before the first sample.
    pub compute_prior_seconds: f64,
    /// The staging slots of the first plan (see the module docs); later plans
    /// may change them. `None`: the search chooses them under the priors.
    pub initial_prefetch_depth: Option<usize>,
    /// Weight of a new sample in the smoothed estimates (0..=1).
    pub smoothing: f64,
    /// Relative departure from an estimate that marks a sample as a possible change.
    pub jump_threshold: f64,
    /// Relative predicted gain a non-mandatory switch must exceed.
    pub switch_gain: f64,
    /// Consecutive decisions that must see that gain before switching.
    pub confirmations: usize,
    /// The host attention path and placement choice; `None`: pooled layers are copied.
    pub host: Option<HostModel>,
    /// Under [`Objective::Memory`], how much slower than all-resident (pure
    /// compute) the predicted step may be (see
    /// [`super::PolicyConfig::memory_slowdown`]); at least 1.
    pub memory_slowdown: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            objective: Objective::Speed,
            // PCIe Gen4 x16 (about 25 GB/s each way, ../shared/notes/rust-stack.md):
            // a conservative prior that measurements replace after the first copies.
            link_prior: LinkModel::symmetric(25e9, 10e-6),
            compute_prior_seconds: 1e-3,
            initial_prefetch_depth: None,
            smoothing: 0.3,
            jump_threshold: 0.2,
            switch_gain: 0.03,
            confirmations: 2,
            host: None,
            memory_slowdown: DEFAULT_MEMORY_SLOWDOWN,
        }
    }
}

/// A smoothed scalar with change detection.
#[derive(Clone, Copy, Debug)]
struct Estimate {
    value: Option<f64>,
    departures: usize,
}

impl Estimate {
    const fn new() -> Self {
        Estimate {
            value: None,
            departures: 0,
        }
    }

    fn update(&mut self, sample: f64, cfg: &AdaptiveConfig) {
        if !(sample.is_finite() && sample > 0.0) {
            return;
        }
        match self.value {
            None => self.value = Some(sample),
            Some(v) => {
                if (sample / v - 1.0).abs() > cfg.jump_threshold {
                    self.departures += 1;
                    if self.departures >= 2 {
                        self.value = Some(sample);
                        self.departures = 0;
                    }
                } else {
                    self.departures = 0;
                    self.value = Some(v + cfg.smoothing * (sample - v));
                }
            }
        }
    }
}

/// The adaptive policy (see the module docs).
#[derive(Clone, Debug)]
pub struct AdaptivePolicy {
    config: AdaptiveConfig,
    kv: Option<KvShape>,
    /// Device budget for engine-managed KV (`None`: no limit).
    budget_bytes: Option<u64>,
    /// Set when the capacity, layer count or budget changed since the last decision.
    reshaped: bool,
    compute: Vec<f64>,
    compute_measured: bool,
    compute_departures: usize,
    h2d_bandwidth: Estimate,
    d2h_bandwidth: Estimate,
    current: Plan,
    issued: bool,
    streak: usize,
    cache: Option<(PolicyInputs, Choice)>,
    decisions: u64,
    /// The plan of the last sample measured (to tell a transition's first step).
    last_sampled: Option<Plan>,
}

impl AdaptivePolicy {
    /// A policy with `config`; it plans once it has seen a [`PolicyContext`].
    pub fn new(config: AdaptiveConfig) -> Self {
        AdaptivePolicy {
            config,
            kv: None,
            budget_bytes: None,
            reshaped: true,
            compute: Vec::new(),
            compute_measured: false,
            compute_departures: 0,
            h2d_bandwidth: Estimate::new(),
            d2h_bandwidth: Estimate::new(),
            current: Plan::all_resident(),
            issued: false,
            streak: 0,
            cache: None,
            decisions: 0,
            last_sampled: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
    }

    /// Number of decisions taken so far.
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// The current estimates as cost-model inputs (errors before the policy
    /// saw a [`PolicyContext`]).
    pub fn estimates(&self) -> Result<PolicyInputs> {
        let kv = self.kv.as_ref().ok_or_else(|| {
            PieError::state(
                "the adaptive policy needs the KV shape (a policy context) before it can plan",
            )
        })?;
        let l = kv.num_layers();
        let compute = if self.compute.len() == l {
            self.compute.clone()
        } else {
            vec![self.config.compute_prior_seconds; l]
        };
        let link = self.link_estimate();
        let inputs = PolicyInputs {
            compute_seconds: compute,
            layer_bytes: kv.layer_bytes.clone(),
            valid_bytes: kv.valid_bytes.clone(),
            writeback_bytes: kv.writeback_bytes.clone(),
            link,
            budget_bytes: self.budget_bytes,
            objective: self.config.objective,
            host: self.config.host,
        };
        inputs.validate()?;
        Ok(inputs)
    }

    /// The link as currently estimated (the prior until copies were measured).
    fn link_estimate(&self) -> LinkModel {
        let prior = self.config.link_prior;
        LinkModel {
            h2d_bandwidth: self.h2d_bandwidth.value.unwrap_or(prior.h2d_bandwidth),
            d2h_bandwidth: self.d2h_bandwidth.value.unwrap_or(prior.d2h_bandwidth),
            ..prior
        }
    }

    /// The predicted steady state of the current plan under the current estimates.
    pub fn predicted(&self) -> Result<Prediction> {
        let inputs = self.estimates()?;
        self.current.validate(inputs.num_layers())?;
        Ok(predict_unchecked(&inputs, &self.current))
    }

    fn update_compute(&mut self, sample: &[f64]) {
        if sample.iter().any(|c| !(c.is_finite() && *c >= 0.0)) {
            return;
        }
        if !self.compute_measured || self.compute.len() != sample.len() {
            self.compute = sample.to_vec();
            self.compute_measured = true;
            self.compute_departures = 0;
            return;
        }
        let est: f64 = self.compute.iter().sum();
        let got: f64 = sample.iter().sum();
        if est > 0.0 && (got / est - 1.0).abs() > self.config.jump_threshold {
            self.compute_departures += 1;
            if self.compute_departures >= 2 {
                self.compute = sample.to_vec();
                self.compute_departures = 0;
            }
            return;
        }
        self.compute_departures = 0;
        let a = self.config.smoothing;
        for (e, &s) in self.compute.iter_mut().zip(sample) {
            *e += a * (s - *e);
        }
    }

    /// The best plan under `inputs`, reusing the last search when no estimate
    /// moved by more than 0.5% since, unless the memory objective's plan has
    /// drifted past the allowed slowdown (the KV grows a token a step).
    fn search(&mut self, inputs: &PolicyInputs) -> Result<Choice> {
        if let Some((old, choice)) = &self.cache {
            if similar(old, inputs) {
                let prediction = predict_unchecked(inputs, &choice.plan);
                let s = self.config.memory_slowdown;
                let drifted = inputs.objective == Objective::Memory
                    && choice.prediction.within(s)
                    && !prediction.within(s);
                if !drifted {
                    return Ok(Choice {
                        plan: choice.plan.clone(),
                        prediction,
                    });
                }
            }
        }
        let choice =
            best_static_plan_within(inputs, SearchSpace::Auto, self.config.memory_slowdown)?;
        self.cache = Some((inputs.clone(), choice.clone()));
        Ok(choice)
    }

    /// Whether `cand` beats `cur` by the configured margin; `unit` is the
    /// device bytes of the smallest layer's slot.
    fn gains(&self, cur: &Prediction, cand: &Prediction, unit: u64) -> bool {
        let g = self.config.switch_gain;
        let faster = cand.step_seconds < cur.step_seconds * (1.0 - g);
        match self.config.objective {
            Objective::Speed => {
                faster
                    || (cand.step_seconds <= cur.step_seconds * (1.0 + TIE_TOLERANCE)
                        && (cand.h2d_bytes as f64) < cur.h2d_bytes as f64 * (1.0 - g))
            }
            Objective::Memory => {
                let s = self.config.memory_slowdown;
                if !cur.within(s) {
                    cand.within(s) || faster
                } else {
                    cand.within(s) && cand.device_bytes.saturating_add(unit) <= cur.device_bytes
                }
            }
        }
    }

    fn switch(&mut self, plan: Plan) -> Option<Plan> {
        self.streak = 0;
        let changed = !self.issued || plan != self.current;
        self.issued = true;
        if changed {
            self.current = plan.clone();
            Some(plan)
        } else {
            None
        }
    }
}

/// Whether two inputs are within 0.5% of each other in every estimate and equal in shape.
fn similar(a: &PolicyInputs, b: &PolicyInputs) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 0.005 * x.abs().max(y.abs());
    a.layer_bytes == b.layer_bytes
        && a.budget_bytes == b.budget_bytes
        && a.objective == b.objective
        && a.writeback_bytes == b.writeback_bytes
        && a.link.shared == b.link.shared
        && a.host == b.host
        && close(a.link.h2d_bandwidth, b.link.h2d_bandwidth)
        && close(a.link.d2h_bandwidth, b.link.d2h_bandwidth)
        && close(a.link.h2d_latency, b.link.h2d_latency)
        && close(a.link.d2h_latency, b.link.d2h_latency)
        && a.compute_seconds.len() == b.compute_seconds.len()
        && a.compute_seconds
            .iter()
            .zip(&b.compute_seconds)
            .all(|(&x, &y)| close(x, y))
        && a.valid_bytes
            .iter()
            .zip(&b.valid_bytes)
            .all(|(&x, &y)| close(x as f64, y as f64))
}

/// On a shared link (one copy at a time, both directions), the seconds each
/// direction's copies of `sample` held the link. A copy's measured span
/// starts when its queue reached it, so it includes the wait for the other
/// direction's copy ahead of it on the link: taken in order of completion,
/// each copy held the link from the later of its start and the previous
/// copy's end. A copy may also have waited for one the sample does not show
/// (the next step's first prefetch, issued before this step's last
/// write-back), so each direction counts its copies at their median hold
/// (a model's layers move equal bytes). `None` when the sample has no
/// per-copy spans.
fn shared_link_busy(sample: &StepSample) -> Option<(f64, f64)> {
    let mut spans: Vec<(f64, f64, bool)> = Vec::new();
    for (list, h2d) in [(&sample.h2d_spans, true), (&sample.d2h_spans, false)] {
        spans.extend(list.iter().flatten().map(|&(a, b)| (a, b, h2d)));
    }
    if spans.is_empty() {
        return None;
    }
    spans.sort_by(|x, y| x.1.total_cmp(&y.1));
    let (mut h2d, mut d2h) = (Vec::new(), Vec::new());
    let mut link_free = f64::NEG_INFINITY;
    for (start, end, is_h2d) in spans {
        let held = (end - start.max(link_free)).max(0.0);
        link_free = link_free.max(end);
        if is_h2d { &mut h2d } else { &mut d2h }.push(held);
    }
    let busy = |mut held: Vec<f64>, measured: f64| {
        if held.is_empty() {
            return measured;
        }
        held.sort_by(f64::total_cmp);
        let n = held.len();
        let median = if n % 2 == 1 {
            held[n / 2]
        } else {
            (held[n / 2 - 1] + held[n / 2]) / 2.0
        };
        median * n as f64
    };
    Some((busy(h2d, sample.h2d_seconds), busy(d2h, sample.d2h_seconds)))
}

/// The byte-level steps the [`Policy`] methods are made of; the what-if
/// simulator, which has bytes rather than layer shapes, drives them directly.
impl AdaptivePolicy {
    /// Feeds one step's measurements into the estimates.
    pub(crate) fn measure(&mut self, sample: &StepSample) {
        let new_plan = self.last_sampled.as_ref() != Some(&sample.plan);
        if new_plan {
            self.last_sampled = Some(sample.plan.clone());
        }
        let transition = new_plan && self.config.link_prior.shared;
        let mut compute = sample.compute_seconds();
        if let (Some(host), Some(kv)) = (self.config.host, self.kv.as_ref()) {
            // A host-attended layer's time includes its round trip (module docs).
            let link = self.link_estimate();
            for &l in &sample.plan.host_attended {
                if let (Some(c), Some(&valid)) = (compute.get_mut(l), kv.valid_bytes.get(l)) {
                    *c = (*c - host.layer_seconds(&link, valid)).max(0.0);
                }
            }
        }
        let expected = self.kv.as_ref().map(KvShape::num_layers);
        if expected.is_none_or(|l| l == compute.len()) && !compute.is_empty() {
            self.update_compute(&compute);
        }
        if transition {
            // The switch's own copies shared the link (module docs).
            return;
        }
        let cfg = self.config;
        let bw = |bytes: u64, seconds: f64, copies: u64, latency: f64| {
            let busy = seconds - copies as f64 * latency;
            (bytes > 0 && copies > 0 && busy > 0.0).then(|| bytes as f64 / busy)
        };
        let (h2d_seconds, d2h_seconds) = if cfg.link_prior.shared {
            shared_link_busy(sample).unwrap_or((sample.h2d_seconds, sample.d2h_seconds))
        } else {
            (sample.h2d_seconds, sample.d2h_seconds)
        };
        if let Some(b) = bw(
            sample.h2d_bytes,
            h2d_seconds,
            sample.h2d_copies,
            cfg.link_prior.h2d_latency,
        ) {
            self.h2d_bandwidth.update(b, &cfg);
        }
        if let Some(b) = bw(
            sample.d2h_bytes,
            d2h_seconds,
            sample.d2h_copies,
            cfg.link_prior.d2h_latency,
        ) {
            self.d2h_bandwidth.update(b, &cfg);
        }
    }

    /// Tells the policy the KV's current shape.
    pub(crate) fn set_kv(&mut self, kv: &KvShape) {
        let reshaped = self
            .kv
            .as_ref()
            .is_none_or(|old| old.layer_bytes != kv.layer_bytes);
        self.reshaped |= reshaped;
        self.kv = Some(kv.clone());
    }

    /// Tells the policy the device budget (`None`: no limit).
    pub(crate) fn set_budget(&mut self, budget_bytes: Option<u64>) {
        if self.budget_bytes != budget_bytes {
            self.budget_bytes = budget_bytes;
            self.reshaped = true;
        }
    }

    /// At a step boundary: the plan to switch to, or `None` to keep the
    /// current one. Errors when no plan can honour the budget.
    pub(crate) fn decide(&mut self) -> Result<Option<Plan>> {
        let mut inputs = self.estimates()?;
        if !self.compute_measured {
            // Until compute is measured, pool only what the budget forces: a
            // prior that overstates compute would otherwise pool layers whose
            // copies cannot hide, which "memory" promises never to do.
            inputs.objective = Objective::Speed;
        }
        if inputs.objective == Objective::Memory {
            // Plan for the KV a few steps ahead (module docs).
            let ahead = MEMORY_LOOKAHEAD_STEPS as u64;
            for ((v, &w), &cap) in inputs
                .valid_bytes
                .iter_mut()
                .zip(&inputs.writeback_bytes)
                .zip(&inputs.layer_bytes)
            {
                *v = v.saturating_add(w.saturating_mul(ahead)).min(cap);
            }
        }
        self.decisions += 1;
        let l = inputs.num_layers();
        let over_budget = self.current.validate(l).is_err()
            || inputs
                .budget_bytes
                .is_some_and(|b| device_bytes(&inputs.layer_bytes, &self.current) > b);
        let mandatory = !self.issued || self.reshaped || over_budget;
        self.reshaped = false;
        let best = self.search(&inputs)?;
        if mandatory {
            return Ok(self.switch(best.plan));
        }
        if best.plan == self.current {
            self.streak = 0;
            return Ok(None);
        }
        let cur = predict_unchecked(&inputs, &self.current);
        let unit = inputs
            .layer_bytes
            .iter()
            .map(|&b| slot_bytes(b))
            .min()
            .unwrap_or(0)
            .max(1);
        if self.gains(&cur, &best.prediction, unit) {
            self.streak += 1;
            if self.streak >= self.config.confirmations {
                return Ok(self.switch(best.plan));
            }
        } else {
            self.streak = 0;
        }
        Ok(None)
    }

    /// With [`AdaptiveConfig::initial_prefetch_depth`]: the fewest pooled
    /// layers, spread across the depth, that fit the budget with that many
    /// staging slots; `None` when not even all of them fit (or no depth is set).
    fn start_plan(&self) -> Option<Plan> {
        let depth = self.config.initial_prefetch_depth?;
        let kv = self.kv.as_ref()?;
        let n = kv.num_layers();
        (0..=n)
            .map(|count| match count {
                0 => Plan::all_resident(),
                _ => Plan::spread(n, count, depth),
            })
            .find(|p| {
                self.budget_bytes
                    .is_none_or(|b| device_bytes(&kv.layer_bytes, p) <= b)
            })
    }

    fn see(&mut self, ctx: &PolicyContext<'_>) {
        self.set_budget(ctx.device_budget.map(|b| b as u64));
        self.set_kv(&ctx.kv_shape());
    }
}

impl Policy for AdaptivePolicy {
    fn initial_plan(&mut self, ctx: &PolicyContext<'_>) -> Result<Plan> {
        self.see(ctx);
        if let Some(plan) = self.start_plan() {
            // Later changes need evidence, as any non-mandatory one.
            self.reshaped = false;
            self.switch(plan.clone());
            return Ok(plan);
        }
        Ok(self.decide()?.unwrap_or_else(|| self.current.clone()))
    }

    fn observe(&mut self, sample: &StepSample, ctx: &PolicyContext<'_>) -> Result<Option<Plan>> {
        self.see(ctx);
        self.measure(sample);
        self.decide()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(compute: f64, layers: usize) -> StepSample {
        StepSample {
            layer_compute: vec![compute; layers],
            layer_stall: vec![0.0; layers],
            step_seconds: compute * layers as f64,
            ..StepSample::default()
        }
    }

    #[test]
    fn estimate_ignores_one_outlier_and_adopts_a_change() {
        let cfg = AdaptiveConfig::default();
        let mut e = Estimate::new();
        e.update(10.0, &cfg);
        e.update(20.0, &cfg);
        assert_eq!(e.value, Some(10.0));
        e.update(10.0, &cfg);
        assert_eq!(e.value, Some(10.0));
        e.update(20.0, &cfg);
        e.update(20.0, &cfg);
        assert_eq!(e.value, Some(20.0));
    }

    #[test]
    fn shared_link_busy_counts_each_copys_hold_of_the_link() {
        // Three prefetches of about 4 ms and three write-backs of 0.1 ms on a
        // shared link. Each write-back was queued while a prefetch held the
        // link (its span starts early), each later prefetch waited for a
        // write-back, and the last write-back waited 2.4 ms for a copy the
        // sample does not show (the next step's first prefetch).
        let ms = |a: f64, b: f64| Some((a * 1e-3, b * 1e-3));
        let s = StepSample {
            h2d_spans: vec![ms(0.0, 4.0), ms(4.0, 8.0), ms(8.1, 12.0)],
            d2h_spans: vec![ms(1.0, 4.1), ms(5.0, 8.1), ms(12.5, 15.0)],
            h2d_seconds: 11.9e-3,
            d2h_seconds: 8.6e-3,
            ..StepSample::default()
        };
        let (h2d, d2h) = shared_link_busy(&s).unwrap();
        // Holds: prefetches 4.0, 3.9, 3.9 ms; write-backs 0.1, 0.1, 2.5 ms;
        // each direction counts its copies at the median.
        assert!((h2d - 3.0 * 3.9e-3).abs() < 1e-12, "{h2d}");
        assert!((d2h - 3.0 * 0.1e-3).abs() < 1e-12, "{d2h}");
        assert_eq!(shared_link_busy(&StepSample::default()), None);
    }

    #[test]
    fn the_first_sample_under_a_plan_leaves_a_shared_links_estimates_alone() {
        let mut shared = AdaptiveConfig::default();
        shared.link_prior.shared = true;
        let mut p = AdaptivePolicy::new(shared);
        p.set_kv(&KvShape::uniform(4, 1 << 20, 1 << 20, 1024));
        let plan = Plan::copying(vec![1, 3], 1);
        let step = |bandwidth: f64| StepSample {
            plan: plan.clone(),
            h2d_bytes: 2 << 20,
            h2d_copies: 4,
            h2d_seconds: 4.0 * 10e-6 + (2 << 20) as f64 / bandwidth,
            ..sample(1e-3, 4)
        };
        // A switch's copies slowed the first step's prefetches tenfold.
        p.measure(&step(1e9));
        assert_eq!(p.h2d_bandwidth.value, None);
        p.measure(&step(1e10));
        let b = p.h2d_bandwidth.value.unwrap();
        assert!((b / 1e10 - 1.0).abs() < 1e-9, "{b}");
        // On a full-duplex link the first sample counts.
        let mut p = AdaptivePolicy::new(AdaptiveConfig::default());
        p.set_kv(&KvShape::uniform(4, 1 << 20, 1 << 20, 1024));
        p.measure(&step(1e10));
        assert!(p.h2d_bandwidth.value.is_some());
    }

    #[test]
    fn first_decision_respects_budget_and_errors_without_room() {
        let mut p = AdaptivePolicy::new(AdaptiveConfig::default());
        p.set_budget(Some(6 * 1024));
        assert!(p.decide().is_err(), "no KV shape yet");
        p.set_kv(&KvShape::uniform(8, 1024, 1024, 16));
        p.measure(&sample(1e-3, 8));
        let plan = p.decide().unwrap().expect("a first plan");
        assert!(device_bytes(&[1024; 8], &plan) <= 6 * 1024);
        assert!(!plan.pooled.is_empty());
        p.set_budget(Some(100));
        assert!(p.decide().is_err());
    }

    #[test]
    fn starts_from_the_given_prefetch_depth() {
        use crate::layout::LayerSpec;
        use crate::slots::ArenaLayout;
        let specs = vec![
            LayerSpec {
                batch: 1,
                kv_heads: 1,
                k_dim: 256,
                v_dim: 256,
                elem_size: 2,
            };
            8
        ];
        let layer = ArenaLayout::device_bytes_for(&specs[..1], 64, &Plan::all_resident());
        let ctx = PolicyContext {
            specs: &specs,
            capacity: 64,
            seq_lens: &[32; 8],
            device_budget: Some(6 * layer),
        };
        let start = |depth: Option<usize>| {
            let mut p = AdaptivePolicy::new(AdaptiveConfig {
                initial_prefetch_depth: depth,
                ..AdaptiveConfig::default()
            });
            let plan = p.initial_plan(&ctx).unwrap();
            assert_eq!(p.current, plan);
            plan
        };
        // The fewest pooled layers that fit 6 slots with the given depth.
        assert_eq!(start(Some(1)), Plan::spread(8, 3, 1));
        assert_eq!(start(Some(2)), Plan::spread(8, 4, 2));
        // Eight slots never fit in six: the search's own first plan.
        assert_eq!(start(Some(8)), start(None));
    }
}
