//! The cost model: an event-driven predictor of the pipelined decode step.
//!
//! It replays, in plain arithmetic, exactly what the engine (and
//! [`crate::simulate::run_pipeline`] through the [`crate::Backend`] trait) does:
//!
//! * pooled layers `p_0 .. p_{P-1}` (execution order) cycle through the
//!   `W = plan.staging_slots()` staging slots; counting pooled layers across
//!   steps with a global index `g = step * P + k`, slot `g % W` holds `p_k`;
//! * before the first step of a plan, the copies of `p_0 .. p_{W-1}` are issued;
//! * the compute of `p_k` waits for its prefetch (that wait is the *stall*);
//! * right after `p_k`'s compute, its new-token write-back is queued on the D2H
//!   queue; when both are done the prefetch of `p_{k+W}` (wrapping into the next
//!   step) is queued on the H2D queue into the slot `p_k` just left;
//! * each queue runs its copies one at a time in issue order; a copy takes
//!   `latency + bytes / bandwidth` and starts when its queue and its link are
//!   free (a half-duplex link is one resource shared by both queues, claimed
//!   in issue order);
//! * when `P <= W` every pooled layer keeps its slot, so after the first load
//!   no prefetch is needed; write-backs still happen.
//!
//! * a *host-attended* pooled layer (see [`super::host_cost`]) is not in that
//!   cycle: it takes no slot and is never prefetched; its compute is followed on
//!   the compute stream by its host round trip ([`HostModel::layer_seconds`]),
//!   and its new tokens' write-back is queued on the D2H queue like a copied
//!   layer's. Only the *copied* pooled layers `p_k` above cycle through slots.
//!
//! Step time is the compute stream's progress over one step: the sum of the
//! layers' compute plus the stalls plus the host round trips.

use super::host_cost::HostModel;
use crate::error::{PieError, Result};
use crate::layout::{align_up, SLOT_ALIGN};
use crate::plan::Plan;
use crate::policy::Objective;

/// A stall below this share of the step's compute counts as "no stall": it is
/// below what per-step telemetry can tell from noise (0.5%).
pub const STALL_TOLERANCE: f64 = 0.005;

/// Steps the predictor runs at least before it looks for a steady state.
pub const MIN_PREDICT_STEPS: usize = 3;

/// Steps after which the predictor stops looking for a steady state and
/// averages the last [`AVERAGE_STEPS`] steps (a periodic regime).
pub const MAX_PREDICT_STEPS: usize = 64;

/// Steps averaged when no single-step steady state was found.
pub const AVERAGE_STEPS: usize = 16;

/// The host-device interconnect as the cost model sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkModel {
    /// Host-to-device bandwidth, bytes per second.
    pub h2d_bandwidth: f64,
    /// Fixed cost of one host-to-device copy, seconds.
    pub h2d_latency: f64,
    /// Device-to-host bandwidth, bytes per second.
    pub d2h_bandwidth: f64,
    /// Fixed cost of one device-to-host copy, seconds.
    pub d2h_latency: f64,
    /// Whether both directions share one link (half duplex, or a single copy
    /// engine): copies of both queues then run one at a time in issue order.
    pub shared: bool,
}

impl LinkModel {
    /// A full-duplex link with the same bandwidth (bytes/s) and latency (s) each way.
    pub fn symmetric(bandwidth: f64, latency: f64) -> Self {
        LinkModel {
            h2d_bandwidth: bandwidth,
            h2d_latency: latency,
            d2h_bandwidth: bandwidth,
            d2h_latency: latency,
            shared: false,
        }
    }

    /// Seconds one layer's host-to-device copy of `bytes` takes: its K and V
    /// halves are [`COPIES_PER_LAYER`] copies, each paying the latency.
    pub fn h2d_seconds(&self, bytes: u64) -> f64 {
        layer_copy_seconds(bytes, self.h2d_bandwidth, self.h2d_latency)
    }

    /// Seconds one layer's device-to-host copy of `bytes` takes (K and V).
    pub fn d2h_seconds(&self, bytes: u64) -> f64 {
        layer_copy_seconds(bytes, self.d2h_bandwidth, self.d2h_latency)
    }

    /// Checks bandwidths are positive and finite and latencies non-negative.
    pub fn validate(&self) -> Result<()> {
        let bw_ok = |b: f64| b.is_finite() && b > 0.0;
        let lat_ok = |l: f64| l.is_finite() && l >= 0.0;
        if !bw_ok(self.h2d_bandwidth) || !bw_ok(self.d2h_bandwidth) {
            return Err(PieError::config(format!(
                "link bandwidths must be positive and finite (got h2d {} B/s, d2h {} B/s)",
                self.h2d_bandwidth, self.d2h_bandwidth
            )));
        }
        if !lat_ok(self.h2d_latency) || !lat_ok(self.d2h_latency) {
            return Err(PieError::config(format!(
                "link latencies must be non-negative seconds (got h2d {}, d2h {})",
                self.h2d_latency, self.d2h_latency
            )));
        }
        Ok(())
    }
}

/// Copies the engine issues to move one layer one way: its K block and its V
/// block (each one 2-D copy over the batch and heads).
pub const COPIES_PER_LAYER: u64 = 2;

fn layer_copy_seconds(bytes: u64, bandwidth: f64, latency: f64) -> f64 {
    COPIES_PER_LAYER as f64 * latency + bytes as f64 / bandwidth
}

/// Duration of one copy: `latency + bytes / bandwidth`. The simulator times
/// each copy with it; the predictor times a layer as [`COPIES_PER_LAYER`] of them.
pub fn copy_seconds(bytes: u64, bandwidth: f64, latency: f64) -> f64 {
    latency + bytes as f64 / bandwidth
}

/// Everything the cost model needs to predict a step.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInputs {
    /// Per-layer compute seconds (measured and smoothed, or from a roofline).
    /// Its length is the number of layers `L`.
    pub compute_seconds: Vec<f64>,
    /// Per-layer KV bytes at the current capacity: the size of the layer's
    /// device slot (a staging slot must be as large as the largest pooled layer).
    pub layer_bytes: Vec<u64>,
    /// Per-layer valid bytes: what one prefetch of the layer moves.
    pub valid_bytes: Vec<u64>,
    /// Per-layer new-token bytes a pooled layer writes back each step.
    pub writeback_bytes: Vec<u64>,
    /// The interconnect.
    pub link: LinkModel,
    /// Device bytes the engine-managed KV may use (resident slots plus staging
    /// slots); `None` for no limit.
    pub budget_bytes: Option<u64>,
    /// What to optimise.
    pub objective: Objective,
    /// The host attention path; `None` when pooled layers can only be copied.
    pub host: Option<HostModel>,
}

impl PolicyInputs {
    /// Inputs with `layers` identical layers.
    pub fn uniform(
        layers: usize,
        compute_seconds: f64,
        layer_bytes: u64,
        writeback_bytes: u64,
        link: LinkModel,
        budget_bytes: Option<u64>,
        objective: Objective,
    ) -> Self {
        PolicyInputs {
            compute_seconds: vec![compute_seconds; layers],
            layer_bytes: vec![layer_bytes; layers],
            valid_bytes: vec![layer_bytes; layers],
            writeback_bytes: vec![writeback_bytes; layers],
            link,
            budget_bytes,
            objective,
            host: None,
        }
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.compute_seconds.len()
    }

    /// Checks the per-layer vectors agree in length and hold sane values.
    pub fn validate(&self) -> Result<()> {
        let l = self.compute_seconds.len();
        if l == 0 {
            return Err(PieError::config("the model must have at least one layer"));
        }
        if self.layer_bytes.len() != l
            || self.valid_bytes.len() != l
            || self.writeback_bytes.len() != l
        {
            return Err(PieError::config(format!(
                "per-layer inputs disagree in length: {} compute times, {} layer sizes, {} valid sizes, {} write-back sizes",
                l,
                self.layer_bytes.len(),
                self.valid_bytes.len(),
                self.writeback_bytes.len()
            )));
        }
        if let Some(bad) = self
            .compute_seconds
            .iter()
            .find(|c| !(c.is_finite() && **c >= 0.0))
        {
            return Err(PieError::config(format!(
                "layer compute times must be finite and non-negative (got {bad})"
            )));
        }
        if let Some(i) = (0..l).find(|&i| self.valid_bytes[i] > self.layer_bytes[i]) {
            return Err(PieError::config(format!(
                "layer {i} has {} valid bytes but only {} bytes of capacity",
                self.valid_bytes[i], self.layer_bytes[i]
            )));
        }
        if let Some(h) = &self.host {
            h.validate()?;
        }
        self.link.validate()
    }

    /// Sum of the layers' compute seconds: the all-GPU step time.
    pub fn compute_total(&self) -> f64 {
        self.compute_seconds.iter().sum()
    }

    /// Device bytes of the whole KV if every layer were resident.
    pub fn total_kv_bytes(&self) -> u64 {
        self.layer_bytes.iter().map(|&b| slot_bytes(b)).sum()
    }
}

/// Bytes a device slot for a layer of `bytes` occupies (slots are aligned to
/// [`SLOT_ALIGN`]).
pub fn slot_bytes(bytes: u64) -> u64 {
    align_up(bytes as usize, SLOT_ALIGN) as u64
}

/// Device bytes a plan needs: every resident layer's slot plus
/// `plan.staging_slots()` staging slots, each as large as the largest pooled layer.
pub fn device_bytes(layer_bytes: &[u64], plan: &Plan) -> u64 {
    let mut resident = 0u64;
    let mut largest_pooled = 0u64;
    let mut k = 0;
    for (i, &b) in layer_bytes.iter().enumerate() {
        if k < plan.pooled.len() && plan.pooled[k] == i {
            largest_pooled = largest_pooled.max(slot_bytes(b));
            k += 1;
        } else {
            resident += slot_bytes(b);
        }
    }
    resident + plan.staging_slots() as u64 * largest_pooled
}

/// The timing of one simulated step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepTiming {
    /// Seconds the compute stream advanced during the step (compute + stall).
    pub step_seconds: f64,
    /// Seconds the compute stream waited for prefetches during the step.
    pub stall_seconds: f64,
    /// Bytes of prefetches issued during the step (the first step also counts
    /// the start-up prefetches).
    pub h2d_bytes: u64,
    /// Bytes of write-backs issued during the step.
    pub d2h_bytes: u64,
    /// Seconds the compute stream spent on host-attended layers' round trips.
    pub host_seconds: f64,
}

/// The predicted steady state of a plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// Seconds per step.
    pub step_seconds: f64,
    /// Seconds per step the compute stream waits for prefetches.
    pub stall_seconds: f64,
    /// Seconds per step of compute (the all-GPU step time).
    pub compute_seconds: f64,
    /// Seconds per step the compute stream waits for host attention.
    pub host_seconds: f64,
    /// Bytes moved host-to-device per step.
    pub h2d_bytes: u64,
    /// Bytes moved device-to-host per step.
    pub d2h_bytes: u64,
    /// Device bytes the plan needs.
    pub device_bytes: u64,
    /// Share of the KV's device footprint the plan frees: `1 - device_bytes /
    /// total_kv_bytes` (staging slots count against it, so pooling `P` layers
    /// through `W` slots frees about `(P - W) / L`).
    pub offloaded_share: f64,
}

impl Prediction {
    /// Whether the time beyond compute (stall and host attention) is below
    /// [`STALL_TOLERANCE`] of the compute time.
    pub fn is_transparent(&self) -> bool {
        self.stall_seconds + self.host_seconds <= STALL_TOLERANCE * self.compute_seconds
    }

    /// Whether the step is within `slowdown` x the compute time (the
    /// all-resident step): what the memory objective allows. With `slowdown`
    /// = `1 + STALL_TOLERANCE` this is [`Prediction::is_transparent`].
    pub fn within(&self, slowdown: f64) -> bool {
        self.stall_seconds + self.host_seconds <= (slowdown - 1.0) * self.compute_seconds
    }
}

/// Which physical resource a copy direction uses.
#[derive(Clone, Copy)]
enum Dir {
    H2d,
    D2h,
}

/// The replayed pipeline state.
struct Replay<'a> {
    inputs: &'a PolicyInputs,
    /// The copied pooled layers (the `p_k` of the module docs).
    pooled: Vec<usize>,
    /// Per layer, its host round trip when it is host-attended.
    host: Vec<Option<f64>>,
    slots: usize,
    swapping: bool,
    step: usize,
    compute_clock: f64,
    h2d_clock: f64,
    d2h_clock: f64,
    /// Free time of the H2D link and of the D2H link (the same entry when shared).
    link_free: [f64; 2],
    /// Completion time of the prefetch that last went into each staging slot.
    ready: Vec<f64>,
    /// Bytes of the start-up prefetches, counted in the first step.
    startup_h2d: u64,
}

impl<'a> Replay<'a> {
    fn new(inputs: &'a PolicyInputs, plan: &'a Plan) -> Self {
        let slots = plan.staging_slots();
        let pooled = plan.copied();
        let host = (0..inputs.num_layers())
            .map(|i| {
                let model = inputs.host.filter(|_| plan.is_host_attended(i))?;
                Some(model.layer_seconds(&inputs.link, inputs.valid_bytes[i]))
            })
            .collect();
        let mut r = Replay {
            inputs,
            swapping: pooled.len() > slots,
            pooled,
            host,
            slots,
            step: 0,
            compute_clock: 0.0,
            h2d_clock: 0.0,
            d2h_clock: 0.0,
            link_free: [0.0; 2],
            ready: vec![0.0; slots],
            startup_h2d: 0,
        };
        for k in 0..slots {
            let bytes = inputs.valid_bytes[r.pooled[k]];
            r.ready[k] = r.copy(Dir::H2d, bytes);
            r.startup_h2d += bytes;
        }
        r
    }

    fn link_index(&self, dir: Dir) -> usize {
        match dir {
            Dir::H2d => 0,
            Dir::D2h if self.inputs.link.shared => 0,
            Dir::D2h => 1,
        }
    }

    /// Issues one copy on its queue and returns its completion time.
    fn copy(&mut self, dir: Dir, bytes: u64) -> f64 {
        let link = self.inputs.link;
        let li = self.link_index(dir);
        let (clock, dur) = match dir {
            Dir::H2d => (&mut self.h2d_clock, link.h2d_seconds(bytes)),
            Dir::D2h => (&mut self.d2h_clock, link.d2h_seconds(bytes)),
        };
        let start = clock.max(self.link_free[li]);
        let end = start + dur;
        *clock = end;
        self.link_free[li] = end;
        end
    }

    fn run_step(&mut self) -> StepTiming {
        let inputs = self.inputs;
        let p = self.pooled.len();
        let start_clock = self.compute_clock;
        let mut stall = 0.0;
        let mut h2d_bytes = std::mem::take(&mut self.startup_h2d);
        let mut d2h_bytes = 0;
        let mut host_seconds = 0.0;
        let mut k = 0;
        for (i, &c) in inputs.compute_seconds.iter().enumerate() {
            if let Some(h) = self.host[i] {
                self.compute_clock += c + h;
                host_seconds += h;
                let wb = inputs.writeback_bytes[i];
                if wb > 0 {
                    self.d2h_clock = self.d2h_clock.max(self.compute_clock);
                    self.copy(Dir::D2h, wb);
                    d2h_bytes += wb;
                }
            } else if k < p && self.pooled[k] == i {
                let g = self.step * p + k;
                let slot = g % self.slots;
                let before = self.compute_clock;
                self.compute_clock = self.compute_clock.max(self.ready[slot]);
                stall += self.compute_clock - before;
                self.compute_clock += c;
                let done = self.compute_clock;
                let wb = inputs.writeback_bytes[i];
                let mut slot_free = done;
                if wb > 0 {
                    self.d2h_clock = self.d2h_clock.max(done);
                    slot_free = self.copy(Dir::D2h, wb);
                    d2h_bytes += wb;
                }
                if self.swapping {
                    self.h2d_clock = self.h2d_clock.max(done);
                    self.h2d_clock = self.h2d_clock.max(slot_free);
                    let next = self.pooled[(g + self.slots) % p];
                    let bytes = inputs.valid_bytes[next];
                    self.ready[slot] = self.copy(Dir::H2d, bytes);
                    h2d_bytes += bytes;
                }
                k += 1;
            } else {
                self.compute_clock += c;
            }
        }
        self.step += 1;
        StepTiming {
            step_seconds: self.compute_clock - start_clock,
            stall_seconds: stall,
            h2d_bytes,
            d2h_bytes,
            host_seconds,
        }
    }
}

fn check_plan(inputs: &PolicyInputs, plan: &Plan) -> Result<()> {
    inputs.validate()?;
    plan.validate(inputs.num_layers())?;
    if inputs.host.is_none() && !plan.host_attended.is_empty() {
        return Err(PieError::config(format!(
            "the plan attends layers {:?} on the host but the inputs have no host model; \
             give the CPU's memory bandwidth and cores, or copy those layers",
            plan.host_attended
        )));
    }
    Ok(())
}

/// Replays `steps` steps of `plan` from a cold start (the first `W` prefetches
/// issued at time 0) and returns each step's timing. Step 0 includes the
/// start-up; the steady state follows after a few steps.
pub fn timeline(inputs: &PolicyInputs, plan: &Plan, steps: usize) -> Result<Vec<StepTiming>> {
    check_plan(inputs, plan)?;
    let mut replay = Replay::new(inputs, plan);
    Ok((0..steps).map(|_| replay.run_step()).collect())
}

/// Predicts the steady state of `plan`: replays steps until two consecutive
/// steps agree (at least [`MIN_PREDICT_STEPS`]) and returns the last; if none
/// settles within [`MAX_PREDICT_STEPS`], the mean of the last
/// [`AVERAGE_STEPS`] steps.
pub fn predict_step(inputs: &PolicyInputs, plan: &Plan) -> Result<Prediction> {
    check_plan(inputs, plan)?;
    Ok(predict_unchecked(inputs, plan))
}

/// [`predict_step`] without validation (the search validates once).
pub(crate) fn predict_unchecked(inputs: &PolicyInputs, plan: &Plan) -> Prediction {
    let mut replay = Replay::new(inputs, plan);
    let mut history: Vec<StepTiming> = Vec::with_capacity(8);
    let steady = loop {
        let t = replay.run_step();
        history.push(t);
        let n = history.len();
        if n >= MIN_PREDICT_STEPS {
            let prev = history[n - 2];
            let close = (t.step_seconds - prev.step_seconds).abs()
                <= 1e-12 * t.step_seconds.max(1e-300)
                && (t.stall_seconds - prev.stall_seconds).abs()
                    <= 1e-12 * t.step_seconds.max(1e-300);
            if close {
                break t;
            }
        }
        if n >= MAX_PREDICT_STEPS {
            let tail = &history[n - AVERAGE_STEPS..];
            let m = tail.len() as f64;
            break StepTiming {
                step_seconds: tail.iter().map(|s| s.step_seconds).sum::<f64>() / m,
                stall_seconds: tail.iter().map(|s| s.stall_seconds).sum::<f64>() / m,
                h2d_bytes: t.h2d_bytes,
                d2h_bytes: t.d2h_bytes,
                host_seconds: t.host_seconds,
            };
        }
    };
    let device = device_bytes(&inputs.layer_bytes, plan);
    let total = inputs.total_kv_bytes();
    Prediction {
        step_seconds: steady.step_seconds,
        stall_seconds: steady.stall_seconds,
        compute_seconds: inputs.compute_total(),
        host_seconds: steady.host_seconds,
        h2d_bytes: steady.h2d_bytes,
        d2h_bytes: steady.d2h_bytes,
        device_bytes: device,
        offloaded_share: if total == 0 {
            0.0
        } else {
            1.0 - device as f64 / total as f64
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(l: usize, c: f64, bytes: u64, bw: f64) -> PolicyInputs {
        PolicyInputs::uniform(
            l,
            c,
            bytes,
            0,
            LinkModel::symmetric(bw, 0.0),
            None,
            Objective::Speed,
        )
    }

    #[test]
    fn all_resident_is_pure_compute() {
        let i = inputs(4, 1e-3, 1000, 1e9);
        let p = predict_step(&i, &Plan::all_resident()).unwrap();
        assert!((p.step_seconds - 4e-3).abs() < 1e-15);
        assert_eq!(p.stall_seconds, 0.0);
        assert_eq!(p.device_bytes, 4 * 1024);
    }

    #[test]
    fn two_pooled_layers_one_slot_stall_by_copy_minus_window() {
        // 4 layers of 1 ms; layers 1 and 3 pooled through 1 slot. Each prefetch
        // is issued when the other pooled layer finishes and hides under the one
        // resident layer between them (1 ms). A 5 ms copy stalls 4 ms twice a step.
        let i = inputs(4, 1e-3, 5_000_000, 1e9);
        let plan = Plan::copying(vec![1, 3], 1);
        let p = predict_step(&i, &plan).unwrap();
        assert!((p.stall_seconds - 8e-3).abs() < 1e-12, "{p:?}");
        assert!((p.step_seconds - 12e-3).abs() < 1e-12);
        assert_eq!(p.h2d_bytes, 10_000_000);
        // A 1 ms copy hides completely.
        let i = inputs(4, 1e-3, 1_000_000, 1e9);
        let p = predict_step(&i, &plan).unwrap();
        assert!(p.stall_seconds.abs() < 1e-15, "{p:?}");
        // One pooled layer in one slot stays there: nothing moves.
        let p = predict_step(&i, &Plan::copying(vec![3], 1)).unwrap();
        assert_eq!(p.h2d_bytes, 0);
    }

    #[test]
    fn pooled_layers_within_slots_move_nothing_in_steady_state() {
        let i = inputs(4, 1e-3, 5_000_000, 1e9);
        let plan = Plan::copying(vec![1, 3], 2);
        let t = timeline(&i, &plan, 3).unwrap();
        assert!(t[0].stall_seconds > 0.0);
        assert_eq!(t[2].h2d_bytes, 0);
        assert_eq!(t[2].stall_seconds, 0.0);
    }

    fn with_host(mut i: PolicyInputs, attention_bandwidth: f64) -> PolicyInputs {
        i.host = Some(HostModel {
            attention_bandwidth,
            query_bytes: 0,
            result_bytes: 0,
            choice: crate::policy::HostAttention::Auto,
        });
        i
    }

    #[test]
    fn host_attended_layer_adds_its_round_trip_and_takes_no_slot() {
        // 4 layers of 1 ms; layers 1 and 3 pooled, 3 attended on the host:
        // 5 MB at 5 GB/s is 1 ms on the host. Layer 1 alone keeps its one slot,
        // so nothing is prefetched in steady state: 4 ms + 1 ms.
        let i = with_host(inputs(4, 1e-3, 5_000_000, 1e9), 5e9);
        let mut plan = Plan::copying(vec![1, 3], 1);
        plan.host_attended = vec![3];
        let p = predict_step(&i, &plan).unwrap();
        assert!((p.step_seconds - 5e-3).abs() < 1e-12, "{p:?}");
        assert!((p.host_seconds - 1e-3).abs() < 1e-12);
        assert_eq!((p.h2d_bytes, p.stall_seconds), (0, 0.0));
        // Two resident slots and one staging slot (layer 3 needs none).
        assert_eq!(p.device_bytes, 3 * slot_bytes(5_000_000));
        // Everything on the host: no staging slot at all.
        let all = Plan {
            pooled: vec![0, 1, 2, 3],
            host_attended: vec![0, 1, 2, 3],
            prefetch_depth: 1,
        };
        let p = predict_step(&i, &all).unwrap();
        assert!((p.step_seconds - 8e-3).abs() < 1e-12, "{p:?}");
        assert_eq!(p.device_bytes, 0);
        assert!(!p.is_transparent());
    }

    #[test]
    fn host_round_trip_hides_copies_like_compute() {
        // Layers 1, 2, 3 pooled, 2 on the host (1 ms), 1 and 3 copied (5 ms
        // each) through one slot. The copy of 3 starts when 1 is done and
        // hides under layer 2's compute and round trip (2 ms): 3 ms stall; the
        // copy of 1 hides under layer 0 (1 ms): 4 ms stall. 4 + 1 + 3 + 4 = 12 ms.
        let i = with_host(inputs(4, 1e-3, 5_000_000, 1e9), 5e9);
        let plan = Plan {
            pooled: vec![1, 2, 3],
            host_attended: vec![2],
            prefetch_depth: 1,
        };
        let p = predict_step(&i, &plan).unwrap();
        assert!((p.step_seconds - 12e-3).abs() < 1e-12, "{p:?}");
        assert!((p.stall_seconds - 7e-3).abs() < 1e-12, "{p:?}");
        assert_eq!(p.h2d_bytes, 10_000_000);
        // Without a host model, a host-attended plan is refused.
        let e = predict_step(&inputs(4, 1e-3, 5_000_000, 1e9), &plan).unwrap_err();
        assert!(e.to_string().contains("no host model"), "{e}");
    }

    #[test]
    fn host_attended_layers_write_back_their_new_tokens() {
        let mut i = with_host(inputs(2, 1e-3, 1_000_000, 1e9), 1e12);
        i.writeback_bytes = vec![1000; 2];
        let plan = Plan {
            pooled: vec![0, 1],
            host_attended: vec![0, 1],
            prefetch_depth: 1,
        };
        let t = timeline(&i, &plan, 2).unwrap();
        assert_eq!((t[1].d2h_bytes, t[1].h2d_bytes), (2000, 0));
    }
}
