//! Telemetry: per-layer compute, copy and stall times, bytes moved, peak device
//! bytes. The caller's thread only records events into one of a few timing sets
//! and pushes a small record into a lock-free ring; the policy thread turns the
//! events into a [`StepSample`] (it may block on them; the caller never does),
//! which is what the policy consumes ([`crate::policy::Policy::observe`]) and
//! what `Engine::last_sample` reports.

use crate::backend::Backend;
use crate::error::Result;
use crate::plan::Plan;
use crate::primitive::{AtomicU64, Ordering};
use std::sync::Arc;

/// Every how many steps one is timed, by default
/// ([`crate::EngineOptions::timing_every`]). Timing costs event records on the
/// caller's thread; the policy needs a sample now and then, not every step.
pub const TIMING_EVERY: u64 = 4;

/// How many timed steps' events exist at once; a set is reused every
/// `TIMING_SETS` timed steps, so the policy thread may lag that far behind.
pub const TIMING_SETS: usize = 8;

/// What one step measured: the one sample type, produced by the engine's
/// telemetry (and by the simulator's pipeline) and consumed by the policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepSample {
    /// Step number (0-based, counted since the engine, or the simulated pipeline, started).
    pub step: u64,
    /// Seconds from each layer's start to the next layer's start (the last
    /// layer: to the end of the step). Includes the layer's stall and
    /// everything the model runs between engine-managed layers; see
    /// [`StepSample::compute_seconds`] for the compute alone.
    pub layer_compute: Vec<f64>,
    /// Seconds the compute stream waited for each layer's KV (0 for resident layers).
    pub layer_stall: Vec<f64>,
    /// Seconds the H2D queue spent on this step's prefetches (sum of copy
    /// durations, waits excluded).
    pub h2d_seconds: f64,
    /// Bytes this step's prefetches moved.
    pub h2d_bytes: u64,
    /// Number of host-to-device copies in `h2d_bytes`.
    pub h2d_copies: u64,
    /// Seconds the D2H queue spent on this step's write-backs.
    pub d2h_seconds: f64,
    /// Bytes this step's write-backs moved.
    pub d2h_bytes: u64,
    /// Number of device-to-host copies in `d2h_bytes`.
    pub d2h_copies: u64,
    /// Seconds from the first layer's start to the end of the step.
    pub step_seconds: f64,
    /// The plan the step ran under.
    pub plan: Plan,
    /// Per layer: when it began, in seconds from the step's start.
    pub layer_start: Vec<f64>,
    /// Per layer: when its prefetch for this step ran (start, end), in seconds
    /// from the step's start (negative: during the previous step). Empty when
    /// the producer does not time copies one by one (the simulator).
    pub h2d_spans: Vec<Option<(f64, f64)>>,
    /// Per layer: when its write-back ran (start, end), from the step's start.
    /// Empty when the producer does not time copies one by one.
    pub d2h_spans: Vec<Option<(f64, f64)>>,
}

impl StepSample {
    /// Total stall of the step.
    pub fn stall_total(&self) -> f64 {
        self.layer_stall.iter().sum()
    }

    /// Per-layer compute seconds, stalls excluded: [`StepSample::layer_compute`]
    /// less [`StepSample::layer_stall`] (never negative).
    pub fn compute_seconds(&self) -> Vec<f64> {
        self.layer_compute
            .iter()
            .zip(self.layer_stall.iter().chain(std::iter::repeat(&0.0)))
            .map(|(c, s)| (c - s).max(0.0))
            .collect()
    }
}

/// Timing events of one step. Compute-side events are recorded by the caller,
/// copy-side ones by the swapper.
pub struct TimingSet<B: Backend> {
    /// Recorded on the compute stream when each layer begins; index `L` ends the step.
    pub begin: Vec<B::Event>,
    /// Recorded on the compute stream right before it waits for a pooled layer's KV.
    pub wait_start: Vec<B::Event>,
    /// Around each prefetch on the H2D queue.
    pub h2d_start: Vec<B::Event>,
    /// End of each prefetch on the H2D queue.
    pub h2d_end: Vec<B::Event>,
    /// Around each write-back on the D2H queue.
    pub d2h_start: Vec<B::Event>,
    /// End of each write-back on the D2H queue.
    pub d2h_end: Vec<B::Event>,
    /// Bytes prefetched per layer for this step (0 when not prefetched).
    pub h2d_bytes: Vec<AtomicU64>,
    /// Bytes written back per layer in this step.
    pub d2h_bytes: Vec<AtomicU64>,
}

impl<B: Backend> TimingSet<B> {
    /// Creates the events of one set for `layers` layers.
    pub fn new(backend: &B, layers: usize) -> Result<Self> {
        let evs = |n: usize| {
            (0..n)
                .map(|_| backend.new_event())
                .collect::<Result<Vec<_>>>()
        };
        Ok(TimingSet {
            begin: evs(layers + 1)?,
            wait_start: evs(layers)?,
            h2d_start: evs(layers)?,
            h2d_end: evs(layers)?,
            d2h_start: evs(layers)?,
            d2h_end: evs(layers)?,
            h2d_bytes: (0..layers).map(|_| AtomicU64::new(0)).collect(),
            d2h_bytes: (0..layers).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Clears the byte counters before the set is reused.
    pub fn reset_counters(&self) {
        for c in self.h2d_bytes.iter().chain(&self.d2h_bytes) {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// What the caller pushes at the end of a step for the policy thread.
pub struct StepRecord {
    /// Step number.
    pub step: u64,
    /// The plan the step ran under.
    pub plan: Arc<Plan>,
    /// Swap operations pushed up to the end of this step: the policy thread
    /// waits until the swapper processed them before reading the events.
    pub ops_pushed: u64,
    /// Whether the compute-side events of this step were all recorded (false
    /// for a step interrupted or restarted midway).
    pub complete: bool,
    /// The most tokens any layer received in this step: more than one means a
    /// prefill (or a chunk), whose timings do not describe decode steps.
    pub new_tokens: usize,
}

/// Running totals, readable at any time from any thread.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes copied host-to-device (prefetches and transitions).
    pub h2d_bytes: AtomicU64,
    /// Bytes copied device-to-host (write-backs and transitions).
    pub d2h_bytes: AtomicU64,
    /// Prefetches issued that moved data.
    pub prefetches: AtomicU64,
    /// Prefetches skipped because the layer was still in its staging slot.
    pub prefetch_hits: AtomicU64,
    /// Steps completed.
    pub steps: AtomicU64,
    /// Total stall, in nanoseconds, over the steps the policy thread has measured.
    pub stall_ns: AtomicU64,
    /// Steps whose timing was measured.
    pub timed_steps: AtomicU64,
    /// Compute time over the measured steps, in nanoseconds.
    pub step_ns: AtomicU64,
    /// Plan switches applied.
    pub plan_changes: AtomicU64,
    /// Largest device arena held, in bytes.
    pub peak_device_bytes: AtomicU64,
    /// Layer-steps attended on the host (one per host-attended layer per step
    /// that reached its attention), over the engine's life.
    pub host_attended_layer_steps: AtomicU64,
}

impl Counters {
    /// Adds `v` to a counter.
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Seconds between two events, or 0 when the backend cannot tell (an event not
/// recorded this step); negative spans (clock skew across queues) count as 0.
pub fn span<B: Backend>(backend: &B, a: &B::Event, b: &B::Event) -> f64 {
    backend.elapsed(a, b).map(|s| s.max(0.0)).unwrap_or(0.0)
}
