//! The simulation backend: a [`Backend`] in virtual time. No data moves.
//!
//! Every stream has a virtual clock. A copy starts when both its stream and its
//! link are free (`max(stream clock, link free time)`) and takes
//! `latency + bytes / bandwidth` ([`copy_seconds`]); host-to-device and
//! device-to-host copies use separate links when the interconnect is full
//! duplex and the GPU has two or more copy engines, and one shared link
//! (claimed in issue order) otherwise. Device-to-device and host-to-host
//! copies use [`SimConfig::local_bandwidth`] and no link. [`SimBackend::compute`]
//! advances a stream's clock by a layer's compute time. `record` stamps an
//! event with its stream's clock; `wait` moves a stream's clock up to the
//! event's stamp. Everything is deterministic.
//!
//! [`Pipeline`] (and [`run_pipeline`]) drives the engine's swap pipeline
//! through the [`Backend`] trait on this backend, step by step, exactly as
//! [`crate::policy::cost_model`] describes it, and reports each step as the
//! telemetry's [`StepSample`]; [`simulate`] answers what-if questions with it
//! (a model on a machine, under the adaptive policy).

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::backend::{check_copy_bounds, Backend, Buffer, CopyShape, Mem, Stream};
use crate::error::{PieError, Result};
use crate::plan::Plan;
use crate::policy::cost_model::{copy_seconds, device_bytes, predict_step, slot_bytes};
use crate::policy::{
    best_static_plan, transparent_fraction, AdaptiveConfig, AdaptivePolicy, KvShape, LinkModel,
    Objective, PolicyInputs,
};
use crate::profiles::{machine, model, MachineProfile, ModelShape};
use crate::telemetry::StepSample;

/// The simulated machine's copy paths.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimConfig {
    /// Host-to-device bandwidth, bytes per second.
    pub h2d_bandwidth: f64,
    /// Fixed cost of one host-to-device copy, seconds.
    pub h2d_latency: f64,
    /// Device-to-host bandwidth, bytes per second.
    pub d2h_bandwidth: f64,
    /// Fixed cost of one device-to-host copy, seconds.
    pub d2h_latency: f64,
    /// Whether both directions can run at full rate at once.
    pub full_duplex: bool,
    /// Number of copy engines; with fewer than two, copies of both directions
    /// run one at a time even on a full-duplex link.
    pub copy_engines: usize,
    /// Bandwidth of device-to-device and host-to-host copies, bytes per second.
    pub local_bandwidth: f64,
}

impl Default for SimConfig {
    /// A PCIe Gen4 x16 box: 25 GB/s and 10 us each way, full duplex, two copy engines.
    fn default() -> Self {
        SimConfig {
            h2d_bandwidth: 25e9,
            h2d_latency: 10e-6,
            d2h_bandwidth: 25e9,
            d2h_latency: 10e-6,
            full_duplex: true,
            copy_engines: 2,
            local_bandwidth: 1e12,
        }
    }
}

impl SimConfig {
    /// A simulated machine whose copies behave as `link` says.
    pub fn from_link(link: LinkModel) -> Self {
        SimConfig {
            h2d_bandwidth: link.h2d_bandwidth,
            h2d_latency: link.h2d_latency,
            d2h_bandwidth: link.d2h_bandwidth,
            d2h_latency: link.d2h_latency,
            full_duplex: !link.shared,
            ..SimConfig::default()
        }
    }

    /// The link as the cost model sees it.
    pub fn link_model(&self) -> LinkModel {
        LinkModel {
            h2d_bandwidth: self.h2d_bandwidth,
            h2d_latency: self.h2d_latency,
            d2h_bandwidth: self.d2h_bandwidth,
            d2h_latency: self.d2h_latency,
            shared: !self.full_duplex || self.copy_engines < 2,
        }
    }

    /// Checks bandwidths and latencies are usable and there is a copy engine.
    pub fn validate(&self) -> Result<()> {
        self.link_model().validate()?;
        if self.copy_engines == 0 {
            return Err(PieError::config(
                "a simulated GPU needs at least one copy engine",
            ));
        }
        if !(self.local_bandwidth.is_finite() && self.local_bandwidth > 0.0) {
            return Err(PieError::config(
                "local copy bandwidth must be positive and finite",
            ));
        }
        Ok(())
    }
}

/// Memory of the simulated backend: a unique fake address and a length.
#[derive(Debug)]
pub struct SimBuffer {
    addr: u64,
    len: usize,
}

impl Buffer for SimBuffer {
    fn len(&self) -> usize {
        self.len
    }

    fn addr(&self) -> u64 {
        self.addr
    }
}

/// An event of the simulated backend: the virtual time of its last record.
#[derive(Debug, Default)]
pub struct SimEvent {
    time: Mutex<Option<f64>>,
}

impl SimEvent {
    /// The virtual time of the last record, if any.
    pub fn time(&self) -> Option<f64> {
        *self.time.lock()
    }
}

/// Cumulative copy counters of a [`SimBackend`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SimStats {
    /// Host-to-device bytes copied.
    pub h2d_bytes: u64,
    /// Seconds host-to-device copies took (sum of durations, waits excluded).
    pub h2d_seconds: f64,
    /// Host-to-device copies issued.
    pub h2d_copies: u64,
    /// Device-to-host bytes copied.
    pub d2h_bytes: u64,
    /// Seconds device-to-host copies took.
    pub d2h_seconds: f64,
    /// Device-to-host copies issued.
    pub d2h_copies: u64,
}

#[derive(Debug)]
struct SimState {
    config: SimConfig,
    clocks: HashMap<Stream, f64>,
    /// Free time of the H2D link (index 0) and the D2H link (index 1; unused when shared).
    link_free: [f64; 2],
    next_addr: u64,
    stats: SimStats,
}

/// A [`Backend`] in virtual time (see the module docs).
#[derive(Debug)]
pub struct SimBackend {
    state: Mutex<SimState>,
}

/// Fake addresses start here and advance by each allocation, 4 KiB aligned.
const ADDR_BASE: u64 = 0x1000_0000;

impl SimBackend {
    /// A simulated machine; errors when `config` is unusable.
    pub fn new(config: SimConfig) -> Result<Self> {
        config.validate()?;
        Ok(SimBackend {
            state: Mutex::new(SimState {
                config,
                clocks: HashMap::new(),
                link_free: [0.0; 2],
                next_addr: ADDR_BASE,
                stats: SimStats::default(),
            }),
        })
    }

    /// The current configuration.
    pub fn config(&self) -> SimConfig {
        self.state.lock().config
    }

    /// Changes the machine from now on (e.g. the link slows down mid-run);
    /// copies already issued keep their times.
    pub fn set_config(&self, config: SimConfig) -> Result<()> {
        config.validate()?;
        self.state.lock().config = config;
        Ok(())
    }

    /// Advances `stream`'s clock by `seconds` of work (a layer's compute).
    pub fn compute(&self, stream: Stream, seconds: f64) -> Result<()> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(PieError::config(format!(
                "simulated compute must take a finite, non-negative time (got {seconds})"
            )));
        }
        *self.state.lock().clocks.entry(stream).or_insert(0.0) += seconds;
        Ok(())
    }

    /// The virtual clock of `stream` (0 before its first command).
    pub fn stream_clock(&self, stream: Stream) -> f64 {
        self.state
            .lock()
            .clocks
            .get(&stream)
            .copied()
            .unwrap_or(0.0)
    }

    /// Cumulative copy counters.
    pub fn stats(&self) -> SimStats {
        self.state.lock().stats
    }

    fn alloc(&self, bytes: usize) -> SimBuffer {
        let mut st = self.state.lock();
        let addr = st.next_addr;
        st.next_addr += (bytes.max(1) as u64).div_ceil(4096) * 4096;
        SimBuffer { addr, len: bytes }
    }
}

impl Backend for SimBackend {
    type DeviceBuffer = SimBuffer;
    type HostBuffer = SimBuffer;
    type Event = SimEvent;

    fn name(&self) -> &'static str {
        "sim"
    }

    fn alloc_device(&self, bytes: usize) -> Result<SimBuffer> {
        Ok(self.alloc(bytes))
    }

    fn alloc_host(&self, bytes: usize) -> Result<SimBuffer> {
        Ok(self.alloc(bytes))
    }

    fn new_event(&self) -> Result<SimEvent> {
        Ok(SimEvent::default())
    }

    fn copy(
        &self,
        stream: Stream,
        src: Mem<'_, Self>,
        dst: Mem<'_, Self>,
        shape: CopyShape,
    ) -> Result<()> {
        check_copy_bounds(&src, &dst, &shape)?;
        let bytes = shape.bytes() as u64;
        let mut st = self.state.lock();
        let cfg = st.config;
        let link = cfg.link_model();
        // (duration, link index if the copy crosses the interconnect, is h2d)
        let (dur, link_index, h2d) = match (src.is_device(), dst.is_device()) {
            (false, true) => (
                copy_seconds(bytes, cfg.h2d_bandwidth, cfg.h2d_latency),
                Some(0),
                Some(true),
            ),
            (true, false) => (
                copy_seconds(bytes, cfg.d2h_bandwidth, cfg.d2h_latency),
                Some(if link.shared { 0 } else { 1 }),
                Some(false),
            ),
            _ => (copy_seconds(bytes, cfg.local_bandwidth, 0.0), None, None),
        };
        let clock = st.clocks.get(&stream).copied().unwrap_or(0.0);
        let start = match link_index {
            Some(i) => clock.max(st.link_free[i]),
            None => clock,
        };
        let end = start + dur;
        st.clocks.insert(stream, end);
        if let Some(i) = link_index {
            st.link_free[i] = end;
        }
        match h2d {
            Some(true) => {
                st.stats.h2d_bytes += bytes;
                st.stats.h2d_seconds += dur;
                st.stats.h2d_copies += 1;
            }
            Some(false) => {
                st.stats.d2h_bytes += bytes;
                st.stats.d2h_seconds += dur;
                st.stats.d2h_copies += 1;
            }
            None => {}
        }
        Ok(())
    }

    fn record(&self, event: &SimEvent, stream: Stream) -> Result<()> {
        let t = self.stream_clock(stream);
        *event.time.lock() = Some(t);
        Ok(())
    }

    fn wait(&self, stream: Stream, event: &SimEvent) -> Result<()> {
        if let Some(t) = event.time() {
            let mut st = self.state.lock();
            let c = st.clocks.entry(stream).or_insert(0.0);
            *c = c.max(t);
        }
        Ok(())
    }

    fn query(&self, _event: &SimEvent) -> Result<bool> {
        Ok(true)
    }

    fn synchronize(&self, _event: &SimEvent) -> Result<()> {
        Ok(())
    }

    fn elapsed(&self, start: &SimEvent, end: &SimEvent) -> Result<f64> {
        match (start.time(), end.time()) {
            (Some(a), Some(b)) => Ok(b - a),
            _ => Err(PieError::state("elapsed() needs two recorded events")),
        }
    }

    fn synchronize_queues(&self) -> Result<()> {
        Ok(())
    }

    /// The host's virtual time: the latest clock among foreign (compute)
    /// streams, 0 before any. The host is taken to keep pace with the
    /// computation it drives; the backend's copy queues run ahead of it
    /// asynchronously and do not move it.
    fn now(&self) -> f64 {
        let st = self.state.lock();
        st.clocks
            .iter()
            .filter(|(s, _)| matches!(s, Stream::Foreign(_)))
            .map(|(_, &t)| t)
            .fold(0.0, f64::max)
    }
}

/// What one step of the pipeline computes and moves.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineSpec {
    /// Per-layer compute seconds.
    pub compute_seconds: Vec<f64>,
    /// Per-layer bytes at the current capacity (slot sizes).
    pub layer_bytes: Vec<u64>,
    /// Per-layer valid bytes (what a prefetch moves).
    pub valid_bytes: Vec<u64>,
    /// Per-layer new-token bytes a pooled layer writes back each step.
    pub writeback_bytes: Vec<u64>,
}

impl PipelineSpec {
    /// The pipeline that cost-model `inputs` describe.
    pub fn from_inputs(inputs: &PolicyInputs) -> Self {
        PipelineSpec {
            compute_seconds: inputs.compute_seconds.clone(),
            layer_bytes: inputs.layer_bytes.clone(),
            valid_bytes: inputs.valid_bytes.clone(),
            writeback_bytes: inputs.writeback_bytes.clone(),
        }
    }

    /// The KV shape a policy is told about.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layer_bytes: self.layer_bytes.clone(),
            valid_bytes: self.valid_bytes.clone(),
            writeback_bytes: self.writeback_bytes.clone(),
        }
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.compute_seconds.len()
    }

    fn validate(&self) -> Result<()> {
        let l = self.num_layers();
        if l == 0
            || self.layer_bytes.len() != l
            || self.valid_bytes.len() != l
            || self.writeback_bytes.len() != l
        {
            return Err(PieError::config(
                "a pipeline needs at least one layer and one compute time, size, valid size and write-back size per layer",
            ));
        }
        if (0..l).any(|i| {
            self.valid_bytes[i] > self.layer_bytes[i]
                || self.writeback_bytes[i] > self.layer_bytes[i]
        }) {
            return Err(PieError::config(
                "valid and write-back bytes cannot exceed a layer's capacity bytes",
            ));
        }
        Ok(())
    }
}

/// The engine's swap pipeline driven through the [`Backend`] trait on a
/// [`SimBackend`], one step at a time, with plan changes at step boundaries.
#[derive(Debug)]
pub struct Pipeline {
    backend: SimBackend,
    compute: Stream,
    plan: Option<Plan>,
    step_in_plan: usize,
    steps: u64,
    ready: Vec<SimEvent>,
    done: SimEvent,
    written: SimEvent,
    boundary: SimEvent,
    device: Option<SimBuffer>,
    host: Option<SimBuffer>,
    slot_size: usize,
    host_offsets: Vec<usize>,
    layout: Vec<u64>,
}

impl Pipeline {
    /// A fresh pipeline on a new simulated machine; the model computes on `Foreign(0)`.
    pub fn new(config: SimConfig) -> Result<Self> {
        Ok(Pipeline {
            backend: SimBackend::new(config)?,
            compute: Stream::Foreign(0),
            plan: None,
            step_in_plan: 0,
            steps: 0,
            ready: Vec::new(),
            done: SimEvent::default(),
            written: SimEvent::default(),
            boundary: SimEvent::default(),
            device: None,
            host: None,
            slot_size: 0,
            host_offsets: Vec::new(),
            layout: Vec::new(),
        })
    }

    /// The simulated backend (to change its link mid-run or read its clocks).
    pub fn backend(&self) -> &SimBackend {
        &self.backend
    }

    /// The plan of the last step, if any.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// (Re)allocates the fake arenas when the layout or the staging slots changed.
    fn ensure_memory(&mut self, spec: &PipelineSpec, plan: &Plan) -> Result<()> {
        let slot = plan
            .pooled
            .iter()
            .map(|&i| slot_bytes(spec.layer_bytes[i]))
            .max()
            .unwrap_or(0) as usize;
        let dev_bytes = slot * plan.staging_slots();
        if self.layout != spec.layer_bytes {
            let mut offsets = Vec::with_capacity(spec.num_layers());
            let mut at = 0usize;
            for &b in &spec.layer_bytes {
                offsets.push(at);
                at += slot_bytes(b) as usize;
            }
            self.host = Some(self.backend.alloc_host(at)?);
            self.host_offsets = offsets;
            self.layout = spec.layer_bytes.clone();
        }
        if self.device.as_ref().is_none_or(|d| d.len() != dev_bytes) || self.slot_size != slot {
            self.device = Some(self.backend.alloc_device(dev_bytes)?);
            self.slot_size = slot;
        }
        Ok(())
    }

    fn prefetch(&self, spec: &PipelineSpec, layer: usize, slot: usize) -> Result<()> {
        let (Some(host), Some(dev)) = (&self.host, &self.device) else {
            return Err(PieError::state("pipeline memory is not allocated"));
        };
        let b = &self.backend;
        b.copy(
            Stream::H2D,
            Mem::Host(host, self.host_offsets[layer]),
            Mem::Device(dev, slot * self.slot_size),
            CopyShape::contiguous(spec.valid_bytes[layer] as usize),
        )?;
        b.record(&self.ready[slot], Stream::H2D)
    }

    /// Runs one step of `plan` (switching to it first if it differs from the
    /// previous step's: its first `W` prefetches are issued at the boundary,
    /// after the compute and the write-backs issued so far) and returns what
    /// telemetry would report.
    pub fn run_step(&mut self, spec: &PipelineSpec, plan: &Plan) -> Result<StepSample> {
        spec.validate()?;
        let l = spec.num_layers();
        plan.validate(l)?;
        self.ensure_memory(spec, plan)?;
        let b = &self.backend;
        let stats_before = b.stats();
        let w = plan.staging_slots();
        let p = plan.pooled.len();
        if self.plan.as_ref() != Some(plan) {
            b.record(&self.boundary, self.compute)?;
            b.wait(Stream::H2D, &self.boundary)?;
            b.record(&self.written, Stream::D2H)?;
            b.wait(Stream::H2D, &self.written)?;
            self.ready = (0..w).map(|_| SimEvent::default()).collect();
            for k in 0..w {
                self.prefetch(spec, plan.pooled[k], k)?;
            }
            self.plan = Some(plan.clone());
            self.step_in_plan = 0;
        }
        let swapping = p > w;
        let start = b.stream_clock(self.compute);
        let mut stall = vec![0.0; l];
        let mut layer_start = vec![0.0; l];
        let mut k = 0;
        for (i, &c) in spec.compute_seconds.iter().enumerate() {
            layer_start[i] = b.stream_clock(self.compute) - start;
            if k < p && plan.pooled[k] == i {
                let g = self.step_in_plan * p + k;
                let slot = g % w;
                let before = b.stream_clock(self.compute);
                b.wait(self.compute, &self.ready[slot])?;
                stall[i] = b.stream_clock(self.compute) - before;
                b.compute(self.compute, c)?;
                b.record(&self.done, self.compute)?;
                let wb = spec.writeback_bytes[i];
                let (Some(host), Some(dev)) = (&self.host, &self.device) else {
                    return Err(PieError::state("pipeline memory is not allocated"));
                };
                if wb > 0 {
                    b.wait(Stream::D2H, &self.done)?;
                    b.copy(
                        Stream::D2H,
                        Mem::Device(dev, slot * self.slot_size),
                        Mem::Host(host, self.host_offsets[i]),
                        CopyShape::contiguous(wb as usize),
                    )?;
                    b.record(&self.written, Stream::D2H)?;
                }
                if swapping {
                    b.wait(Stream::H2D, &self.done)?;
                    if wb > 0 {
                        b.wait(Stream::H2D, &self.written)?;
                    }
                    self.prefetch(spec, plan.pooled[(g + w) % p], slot)?;
                }
                k += 1;
            } else {
                b.compute(self.compute, c)?;
            }
        }
        self.step_in_plan += 1;
        self.steps += 1;
        let end = b.stream_clock(self.compute);
        let after = b.stats();
        Ok(StepSample {
            step: self.steps - 1,
            layer_compute: spec
                .compute_seconds
                .iter()
                .zip(&stall)
                .map(|(c, s)| c + s)
                .collect(),
            layer_stall: stall,
            h2d_bytes: after.h2d_bytes - stats_before.h2d_bytes,
            h2d_seconds: after.h2d_seconds - stats_before.h2d_seconds,
            h2d_copies: after.h2d_copies - stats_before.h2d_copies,
            d2h_bytes: after.d2h_bytes - stats_before.d2h_bytes,
            d2h_seconds: after.d2h_seconds - stats_before.d2h_seconds,
            d2h_copies: after.d2h_copies - stats_before.d2h_copies,
            step_seconds: end - start,
            plan: plan.clone(),
            layer_start,
            ..StepSample::default()
        })
    }
}

/// Runs `steps` steps of `plan` on a fresh simulated machine and returns each
/// step's telemetry.
pub fn run_pipeline(
    config: &SimConfig,
    spec: &PipelineSpec,
    plan: &Plan,
    steps: usize,
) -> Result<Vec<StepSample>> {
    let mut pipe = Pipeline::new(*config)?;
    (0..steps).map(|_| pipe.run_step(spec, plan)).collect()
}

// ---------------------------------------------------------------------------
// What-if simulation (`pie-rs simulate`).

/// A what-if question: a model and workload on a machine, under a budget.
/// Explicit numbers override what the profiles would give.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimulateRequest {
    /// Machine profile name (default `h100-pcie-gen5`); see [`crate::profiles::machines`].
    pub machine: Option<String>,
    /// Model shape name (default `llama-3-8b`); see [`crate::profiles::models`].
    pub model: Option<String>,
    /// Sequences per batch (default 8).
    pub batch: Option<usize>,
    /// Tokens of context per sequence (default 8192).
    pub context: Option<usize>,
    /// Override: number of layers.
    pub layers: Option<usize>,
    /// Override: per-layer compute, milliseconds.
    pub layer_compute_ms: Option<f64>,
    /// Override: per-layer KV, MiB.
    pub layer_kv_mib: Option<f64>,
    /// Override: host-to-device bandwidth, GB/s (1e9 bytes per second).
    pub h2d_gbps: Option<f64>,
    /// Override: device-to-host bandwidth, GB/s.
    pub d2h_gbps: Option<f64>,
    /// Device budget for the KV, MiB (default: half the KV under the speed
    /// objective, the whole KV under the memory objective).
    pub gpu_budget_mib: Option<f64>,
    /// What to optimise.
    pub objective: Objective,
    /// Steps to simulate (default 30).
    pub steps: Option<usize>,
}

/// One simulated step.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatedStep {
    /// Step index.
    pub step: usize,
    /// Number of pooled layers during the step.
    pub pooled_count: usize,
    /// Staging slots during the step.
    pub prefetch_depth: usize,
    /// Simulated step time, ms.
    pub step_ms: f64,
    /// Simulated stall, ms.
    pub stall_ms: f64,
    /// Whether the policy switched plans before this step.
    pub switched: bool,
}

/// The answer to a [`SimulateRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct SimulateReport {
    /// Machine profile used.
    pub machine: String,
    /// Model shape used.
    pub model: String,
    /// Objective.
    pub objective: Objective,
    /// Number of layers.
    pub layers: usize,
    /// Batch size.
    pub batch: usize,
    /// Context tokens.
    pub context: usize,
    /// Mean per-layer compute, ms.
    pub layer_compute_ms: f64,
    /// Per-layer KV (largest layer), MiB.
    pub layer_kv_mib: f64,
    /// Whole KV, MiB.
    pub total_kv_mib: f64,
    /// Device budget, MiB.
    pub gpu_budget_mib: f64,
    /// Host-to-device bandwidth, GB/s.
    pub h2d_gbps: f64,
    /// Device-to-host bandwidth, GB/s.
    pub d2h_gbps: f64,
    /// Pooled layers of the adaptive policy's final plan.
    pub pooled_layers: Vec<usize>,
    /// Its prefetch depth (staging slots).
    pub prefetch_depth: usize,
    /// Device bytes of the KV under that plan, MiB.
    pub device_kv_mib: f64,
    /// Predicted steady-state step time of that plan, ms.
    pub predicted_step_ms: f64,
    /// Step time of the last simulated step, ms.
    pub simulated_step_ms: f64,
    /// Step time with everything resident (pure compute), ms.
    pub all_gpu_step_ms: f64,
    /// Predicted stall per step, ms.
    pub stall_ms_per_step: f64,
    /// Share of the KV's device footprint the plan frees.
    pub offloaded_share: f64,
    /// Largest share of the KV's device footprint that can be pooled with no stall.
    pub transparent_fraction: f64,
    /// Pooled layers of the best static plan (exhaustive/restricted search).
    pub best_static_pooled_layers: Vec<usize>,
    /// Prefetch depth of the best static plan.
    pub best_static_prefetch_depth: usize,
    /// Predicted step time of the best static plan, ms.
    pub best_static_step_ms: f64,
    /// Every simulated step.
    pub steps: Vec<SimulatedStep>,
}

const MIB: f64 = 1024.0 * 1024.0;

/// The workload a request describes, resolved against the profiles.
struct Resolved {
    machine: MachineProfile,
    model_name: String,
    batch: usize,
    context: usize,
    inputs: PolicyInputs,
    sim: SimConfig,
    steps: usize,
}

fn positive(name: &str, v: Option<f64>) -> Result<Option<f64>> {
    match v {
        Some(x) if !(x.is_finite() && x > 0.0) => Err(PieError::config(format!(
            "{name} must be a positive number (got {x})"
        ))),
        other => Ok(other),
    }
}

fn resolve(req: &SimulateRequest) -> Result<Resolved> {
    let machine = machine(req.machine.as_deref().unwrap_or("h100-pcie-gen5"))?;
    let shape: ModelShape = model(req.model.as_deref().unwrap_or("llama-3-8b"))?;
    let batch = req.batch.unwrap_or(8);
    let context = req.context.unwrap_or(8192);
    if batch == 0 || context == 0 {
        return Err(PieError::config("batch and context must be at least 1"));
    }
    let layer_compute_ms = positive("layer_compute_ms", req.layer_compute_ms)?;
    let layer_kv_mib = positive("layer_kv_mib", req.layer_kv_mib)?;
    let h2d = positive("h2d_gbps", req.h2d_gbps)?.unwrap_or(machine.h2d_gbps);
    let d2h = positive("d2h_gbps", req.d2h_gbps)?.unwrap_or(machine.d2h_gbps);
    let budget_mib = positive("gpu_budget_mib", req.gpu_budget_mib)?;
    let layers = req.layers.unwrap_or(shape.layers);
    if layers == 0 || layers > 4096 {
        return Err(PieError::config(format!(
            "layers must be between 1 and 4096 (got {layers})"
        )));
    }
    let steps = req.steps.unwrap_or(30);
    if steps == 0 || steps > 100_000 {
        return Err(PieError::config(format!(
            "steps must be between 1 and 100000 (got {steps})"
        )));
    }
    let (layer_bytes, valid_bytes, writeback) = match layer_kv_mib {
        Some(mib) => {
            let bytes = (mib * MIB).round() as u64;
            (bytes, bytes, bytes / context as u64)
        }
        None => {
            let w = crate::profiles::Workload { batch, context };
            (
                shape.layer_kv_bytes(&w),
                shape.valid_kv_bytes(&w),
                shape.writeback_bytes(&w),
            )
        }
    };
    let compute = match layer_compute_ms {
        Some(ms) => ms * 1e-3,
        None => machine.layer_compute_seconds(&shape, valid_bytes),
    };
    let total = slot_bytes(layer_bytes) * layers as u64;
    let budget = match (budget_mib, req.objective) {
        (Some(mib), _) => (mib * MIB).round() as u64,
        (None, Objective::Speed) => total / 2,
        (None, Objective::Memory) => total,
    };
    let sim = SimConfig {
        h2d_bandwidth: h2d * 1e9,
        d2h_bandwidth: d2h * 1e9,
        ..machine.sim_config()
    };
    let inputs = PolicyInputs {
        compute_seconds: vec![compute; layers],
        layer_bytes: vec![layer_bytes; layers],
        valid_bytes: vec![valid_bytes; layers],
        writeback_bytes: vec![writeback; layers],
        link: sim.link_model(),
        budget_bytes: Some(budget),
        objective: req.objective,
    };
    inputs.validate()?;
    let custom = req.layers.is_some() || layer_kv_mib.is_some() || layer_compute_ms.is_some();
    let model_name = if custom {
        format!("{} (overridden)", shape.name)
    } else {
        shape.name.to_string()
    };
    Ok(Resolved {
        machine,
        model_name,
        batch,
        context,
        inputs,
        sim,
        steps,
    })
}

/// Answers a what-if question: runs the adaptive policy on the simulated
/// machine for the requested steps (the policy starts from the machine's
/// nominal link and measures from there) and compares with the best static plan.
pub fn simulate(req: &SimulateRequest) -> Result<SimulateReport> {
    let r = resolve(req)?;
    let inputs = &r.inputs;
    let spec = PipelineSpec::from_inputs(inputs);
    let mut policy = AdaptivePolicy::new(AdaptiveConfig {
        objective: req.objective,
        link_prior: inputs.link,
        compute_prior_seconds: inputs.compute_seconds[0],
        ..AdaptiveConfig::default()
    });
    policy.set_budget(inputs.budget_bytes);
    policy.set_kv(&spec.kv_shape());
    let mut pipe = Pipeline::new(r.sim)?;
    let mut steps = Vec::with_capacity(r.steps);
    let mut plan = Plan::all_resident();
    for step in 0..r.steps {
        let switched = match policy.decide()? {
            Some(p) => {
                plan = p;
                true
            }
            None => false,
        };
        let sample = pipe.run_step(&spec, &plan)?;
        policy.measure(&sample);
        steps.push(SimulatedStep {
            step,
            pooled_count: plan.pooled.len(),
            prefetch_depth: plan.staging_slots(),
            step_ms: sample.step_seconds * 1e3,
            stall_ms: sample.stall_total() * 1e3,
            switched,
        });
    }
    let pred = predict_step(inputs, &plan)?;
    let best = best_static_plan(inputs)?;
    let total = inputs.total_kv_bytes();
    Ok(SimulateReport {
        machine: r.machine.name.to_string(),
        model: r.model_name,
        objective: req.objective,
        layers: inputs.num_layers(),
        batch: r.batch,
        context: r.context,
        layer_compute_ms: inputs.compute_total() / inputs.num_layers() as f64 * 1e3,
        layer_kv_mib: inputs.layer_bytes.iter().copied().max().unwrap_or(0) as f64 / MIB,
        total_kv_mib: total as f64 / MIB,
        gpu_budget_mib: inputs.budget_bytes.unwrap_or(total) as f64 / MIB,
        h2d_gbps: r.sim.h2d_bandwidth / 1e9,
        d2h_gbps: r.sim.d2h_bandwidth / 1e9,
        prefetch_depth: plan.staging_slots(),
        device_kv_mib: device_bytes(&inputs.layer_bytes, &plan) as f64 / MIB,
        pooled_layers: plan.pooled,
        predicted_step_ms: pred.step_seconds * 1e3,
        simulated_step_ms: steps.last().map(|s| s.step_ms).unwrap_or(0.0),
        all_gpu_step_ms: inputs.compute_total() * 1e3,
        stall_ms_per_step: pred.stall_seconds * 1e3,
        offloaded_share: pred.offloaded_share,
        transparent_fraction: transparent_fraction(inputs)?,
        best_static_prefetch_depth: best.plan.staging_slots(),
        best_static_pooled_layers: best.plan.pooled,
        best_static_step_ms: best.prediction.step_seconds * 1e3,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_time_is_latency_plus_bytes_over_bandwidth() {
        let b = SimBackend::new(SimConfig {
            h2d_bandwidth: 1e9,
            h2d_latency: 1e-5,
            ..SimConfig::default()
        })
        .unwrap();
        let host = b.alloc_host(1_000_000).unwrap();
        let dev = b.alloc_device(1_000_000).unwrap();
        assert_ne!(host.addr(), dev.addr());
        let e = b.new_event().unwrap();
        b.copy(
            Stream::H2D,
            Mem::Host(&host, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(1_000_000),
        )
        .unwrap();
        b.record(&e, Stream::H2D).unwrap();
        assert!((e.time().unwrap() - (1e-5 + 1e-3)).abs() < 1e-15);
        b.wait(Stream::Foreign(0), &e).unwrap();
        assert_eq!(b.now(), e.time().unwrap());
        assert!(b
            .copy(
                Stream::H2D,
                Mem::Host(&host, 1),
                Mem::Device(&dev, 0),
                CopyShape::contiguous(1_000_000)
            )
            .is_err());
    }

    #[test]
    fn half_duplex_serialises_directions() {
        let cfg = SimConfig {
            h2d_bandwidth: 1e9,
            h2d_latency: 0.0,
            d2h_bandwidth: 1e9,
            d2h_latency: 0.0,
            full_duplex: false,
            ..SimConfig::default()
        };
        let b = SimBackend::new(cfg).unwrap();
        let host = b.alloc_host(1000).unwrap();
        let dev = b.alloc_device(1000).unwrap();
        b.copy(
            Stream::H2D,
            Mem::Host(&host, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(1000),
        )
        .unwrap();
        b.copy(
            Stream::D2H,
            Mem::Device(&dev, 0),
            Mem::Host(&host, 0),
            CopyShape::contiguous(1000),
        )
        .unwrap();
        assert!((b.stream_clock(Stream::D2H) - 2e-6).abs() < 1e-18);
        let full = SimBackend::new(SimConfig {
            full_duplex: true,
            ..cfg
        })
        .unwrap();
        full.copy(
            Stream::H2D,
            Mem::Host(&host, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(1000),
        )
        .unwrap();
        full.copy(
            Stream::D2H,
            Mem::Device(&dev, 0),
            Mem::Host(&host, 0),
            CopyShape::contiguous(1000),
        )
        .unwrap();
        assert!((full.stream_clock(Stream::D2H) - 1e-6).abs() < 1e-18);
    }
}
