//! What-if questions in virtual time: the real engine (schedule, swapper,
//! policy thread) driven on the [`SimBackend`], a layer's compute advancing the
//! compute stream's clock.
//!
//! * [`Pipeline`]: one decode step at a time under plans chosen by the caller
//!   (tests of policies and of the cost model);
//! * [`simulate`]: a model on a machine under the adaptive policy, as
//!   `pie-rs simulate` reports it.
//!
//! A layer described only by byte counts becomes a [`LayerSpec`] whose token
//! is its write-back size, so a decode step writes back exactly those bytes and
//! a prefetch moves the valid bytes. Runs are deterministic: the caller waits for
//! the policy thread after each step, so a plan it publishes applies at the next.
//!
//! **Host-attended layers** take the engine's own path: `layer_ready_at`
//! answers [`LayerKv::Host`] (no prefetch, no staging slot), the driver
//! advances the compute stream by the layer's compute plus its host round trip
//! ([`HostModel::layer_seconds`] over the layer's valid bytes), and
//! `layer_written` appends the new tokens to the layer's host arena (the
//! engine queues no write-back for such a layer: on a real device the caller's
//! own device-to-host copy of a few KiB, which the simulator leaves off the
//! link, as its order against the swapper's copies would make runs
//! nondeterministic; the cost model does queue it). So the engine's lengths,
//! and the policy's view of the KV, count those tokens as they do a copied
//! layer's, and a layer that goes back to copying has them in host memory.

use crate::backend::Stream;
use crate::engine::{Engine, EngineOptions, LayerKv};
use crate::error::{PieError, Result};
use crate::layout::LayerSpec;
use crate::plan::Plan;
use crate::policy::cost_model::{device_bytes, predict_step, slot_bytes};
use crate::policy::{
    best_static_plan_within, exchange_bytes, transparent_fraction, AdaptiveConfig, AdaptivePolicy,
    HostAttention, HostModel, KvShape, MemorySlowdown, Objective, Placed, Policy, PolicyInputs,
    SearchSpace, StaticPolicy, DEFAULT_MEMORY_SLOWDOWN,
};
use crate::profiles::{machine, model, MachineProfile, ModelShape};
use crate::sim::{SimBackend, SimConfig};
use crate::telemetry::StepSample;

/// The stream the simulated model computes on.
const COMPUTE: Stream = Stream::Foreign(0);

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

/// A layer of `layer_bytes` holding `valid_bytes`, whose decode token is
/// `writeback_bytes`, as the engine sees it: `(spec, capacity, valid tokens)`.
fn byte_layer(
    layer_bytes: u64,
    valid_bytes: u64,
    writeback_bytes: u64,
) -> (LayerSpec, usize, usize) {
    // Without a write-back, tokens are 1/4096 of the layer (at least 2 bytes).
    let token = if writeback_bytes >= 2 {
        writeback_bytes
    } else {
        (layer_bytes / 4096).max(2)
    } as usize;
    let spec = LayerSpec {
        batch: 1,
        kv_heads: 1,
        k_dim: token / 2,
        v_dim: token - token / 2,
        elem_size: 1,
    };
    let capacity = (layer_bytes as usize).div_ceil(token).max(1);
    let valid = (valid_bytes as usize / token).min(capacity);
    (spec, capacity, valid)
}

/// The engine on a simulated machine, set up for layers given in bytes.
struct SimEngine {
    engine: Engine<SimBackend>,
    backend: SimBackend,
    /// The layers as the engine sees them.
    specs: Vec<LayerSpec>,
    /// Tokens each decode step appends per layer (0 without write-backs).
    step_tokens: Vec<usize>,
    /// Engine steps run (the prefill included).
    steps: u64,
    /// The host attention path, for plans with host-attended layers.
    host: Option<HostModel>,
    /// Host round-trip seconds the last step spent, and its host-attended layers.
    last_host: (f64, usize),
}

impl SimEngine {
    /// Builds the engine with room for `decode_steps` decode tokens, prefills
    /// every layer to its valid length (less `start_below` tokens), then lets
    /// the prefill's copies finish.
    fn new(
        backend: &SimBackend,
        inputs: &PipelineSpec,
        decode_steps: usize,
        start_below: usize,
        budget: Option<usize>,
        policy: Box<dyn Policy>,
        host: Option<HostModel>,
    ) -> Result<Self> {
        let layers: Vec<_> = (0..inputs.num_layers())
            .map(|i| {
                byte_layer(
                    inputs.layer_bytes[i],
                    inputs.valid_bytes[i],
                    inputs.writeback_bytes[i],
                )
            })
            .collect();
        let step_tokens: Vec<usize> = inputs
            .writeback_bytes
            .iter()
            .map(|&w| usize::from(w >= 2))
            .collect();
        let prefill: Vec<usize> = layers
            .iter()
            .zip(&step_tokens)
            .map(|((_, _, valid), &t)| valid.saturating_sub(start_below * t).max(1))
            .collect();
        let capacity = layers
            .iter()
            .zip(&prefill)
            .zip(&step_tokens)
            .map(|(((_, cap, _), p), t)| (*cap).max(p + decode_steps * t))
            .max()
            .unwrap_or(1);
        let engine = Engine::new(
            backend.clone(),
            layers.iter().map(|(s, _, _)| *s).collect(),
            EngineOptions {
                capacity,
                device_budget: budget,
                timing_every: 1,
                ..EngineOptions::default()
            },
            policy,
        )?;
        let mut sim = SimEngine {
            engine,
            backend: backend.clone(),
            specs: layers.iter().map(|(s, _, _)| *s).collect(),
            step_tokens,
            steps: 0,
            host,
            last_host: (0.0, 0),
        };
        sim.step(&inputs.compute_seconds, Some(&prefill))?;
        sim.engine.quiesce()?;
        sim.engine.resume()?;
        Ok(sim)
    }

    /// One step: every layer computes for its time and appends `tokens`
    /// (default: one decode token where layers write back). Returns the
    /// compute stream's seconds for the step and the engine step's number.
    fn step(&mut self, compute: &[f64], tokens: Option<&[usize]>) -> Result<(f64, u64)> {
        let tokens: Vec<usize> = tokens.map_or_else(|| self.step_tokens.clone(), <[usize]>::to_vec);
        let need = (0..compute.len())
            .map(|l| self.engine.seq_len(l).map(|n| n + tokens[l]))
            .collect::<Result<Vec<_>>>()?;
        if let Some(&most) = need.iter().max() {
            self.engine.ensure_capacity(most)?;
        }
        let t0 = self.backend.stream_clock(COMPUTE);
        self.last_host = (0.0, 0);
        for (l, &c) in compute.iter().enumerate() {
            self.engine.layer_begin(l, COMPUTE)?;
            match self.engine.layer_ready_at(l, COMPUTE)? {
                LayerKv::Device(_) => self.backend.compute(COMPUTE, c)?,
                LayerKv::Host(_) => self.host_layer(l, c)?,
            }
            self.engine.layer_written(l, tokens[l], COMPUTE)?;
            self.engine.layer_done(l, COMPUTE)?;
        }
        self.engine.flush_telemetry()?;
        let step = self.steps;
        self.steps += 1;
        Ok((self.backend.stream_clock(COMPUTE) - t0, step))
    }

    /// A host-attended layer (see the module docs): its compute and the host
    /// round trip over its valid KV, on the compute stream.
    fn host_layer(&mut self, layer: usize, compute: f64) -> Result<()> {
        let host = self.host.ok_or_else(|| {
            PieError::config(format!(
                "layer {layer} is attended on the host but the simulation has no host model; \
                 give the CPU's memory bandwidth and cores"
            ))
        })?;
        let valid = self.specs[layer].valid_bytes(self.engine.seq_len(layer)?);
        let round_trip = host.layer_seconds(&self.backend.config().link_model(), valid as u64);
        self.backend.compute(COMPUTE, compute + round_trip)?;
        self.last_host.0 += round_trip;
        self.last_host.1 += 1;
        Ok(())
    }

    /// What the policy thread measured for engine step `step`.
    fn sample(&self, step: u64) -> Result<StepSample> {
        match self.engine.last_sample() {
            Some(s) if s.step == step => Ok(s),
            _ => Err(PieError::internal(format!(
                "the policy thread did not measure simulated step {step}"
            ))),
        }
    }
}

/// The engine's swap pipeline on a simulated machine, one decode step at a
/// time, under plans the caller chooses (applied at step boundaries).
pub struct Pipeline {
    backend: SimBackend,
    sim: Option<SimEngine>,
    built_for: Option<PipelineSpec>,
    plan: Option<Plan>,
    host: Option<HostModel>,
}

impl Pipeline {
    /// Decode steps a pipeline can run before its layers grow past their size.
    const HEADROOM: usize = 256;

    /// A fresh pipeline on a new simulated machine.
    pub fn new(config: SimConfig) -> Result<Self> {
        Ok(Pipeline {
            backend: SimBackend::new(config)?,
            sim: None,
            built_for: None,
            plan: None,
            host: None,
        })
    }

    /// The pipeline with a host attention path, so plans may attend pooled
    /// layers on the host (timed as the module docs say).
    pub fn with_host(config: SimConfig, host: HostModel) -> Result<Self> {
        host.validate()?;
        let mut pipe = Self::new(config)?;
        pipe.host = Some(host);
        Ok(pipe)
    }

    /// Host round-trip seconds of the last step and how many layers took one.
    pub fn last_host(&self) -> (f64, usize) {
        self.sim.as_ref().map_or((0.0, 0), |s| s.last_host)
    }

    /// The simulated backend (to change its link mid-run or read its clocks).
    pub fn backend(&self) -> &SimBackend {
        &self.backend
    }

    /// The plan of the last step, if any.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// Runs one decode step of `plan` (switching to it first if it differs from
    /// the previous step's) and returns what telemetry measured.
    pub fn run_step(&mut self, spec: &PipelineSpec, plan: &Plan) -> Result<StepSample> {
        spec.validate()?;
        plan.validate(spec.num_layers())?;
        let same_shape = self.built_for.as_ref().is_some_and(|b| {
            b.layer_bytes == spec.layer_bytes
                && b.valid_bytes == spec.valid_bytes
                && b.writeback_bytes == spec.writeback_bytes
        });
        if !same_shape {
            self.sim = None;
            let sim = SimEngine::new(
                &self.backend,
                spec,
                Self::HEADROOM,
                0,
                None,
                Box::new(StaticPolicy::pinned(plan.clone())),
                self.host,
            )?;
            self.sim = Some(sim);
            self.built_for = Some(spec.clone());
        }
        let Some(sim) = self.sim.as_mut() else {
            return Err(PieError::internal("the simulated engine was not built"));
        };
        if *sim.engine.plan() != *plan {
            sim.engine.set_plan(plan.clone())?;
        }
        let (_, step) = sim.step(&spec.compute_seconds, None)?;
        self.plan = Some(plan.clone());
        sim.sample(step)
    }
}

/// Runs `steps` decode steps of `plan` on a fresh simulated machine and
/// returns each step's telemetry.
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
    /// Where pooled layers' attention may run (the CLI's default is `auto`).
    pub host_attention: HostAttention,
    /// Override: the host CPU's memory bandwidth, GB/s.
    pub cpu_memory_gbps: Option<f64>,
    /// Override: host CPU cores for attention.
    pub cpu_cores: Option<usize>,
    /// The memory objective's allowance: a step at most this factor x
    /// all-resident (default [`crate::policy::DEFAULT_MEMORY_SLOWDOWN`]).
    pub memory_slowdown: Option<f64>,
}

/// One simulated step.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatedStep {
    /// Step index.
    pub step: usize,
    /// Number of pooled layers during the step.
    pub pooled_count: usize,
    /// Number of those attended on the host.
    pub host_count: usize,
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
    /// Where pooled layers' attention may run.
    pub host_attention: HostAttention,
    /// KV bytes per second host attention reads, GB/s (min of the CPU's
    /// memory bandwidth and cores x per-core rate).
    pub cpu_attention_gbps: f64,
    /// Pooled layers of the adaptive policy's final plan.
    pub pooled_layers: Vec<usize>,
    /// Those of them attended on the host.
    pub host_attended_layers: Vec<usize>,
    /// Predicted host round trips per step of that plan, ms.
    pub host_ms_per_step: f64,
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
    /// Those of them attended on the host.
    pub best_static_host_attended_layers: Vec<usize>,
    /// Predicted step time of the best copy-only static plan, ms (the baseline
    /// host attention is judged against).
    pub copy_only_step_ms: f64,
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
    let cpu_gbps =
        positive("cpu_memory_gbps", req.cpu_memory_gbps)?.unwrap_or(machine.cpu_memory_gbps);
    let cpu_cores = match req.cpu_cores {
        Some(0) => return Err(PieError::config("cpu_cores must be at least 1")),
        Some(n) => n,
        None => machine.cpu_cores,
    };
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
    let (query_bytes, result_bytes) =
        exchange_bytes(batch, shape.heads, shape.head_dim, shape.elem_size);
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
        host: Some(HostModel::from_cpu(
            cpu_gbps * 1e9,
            cpu_cores,
            machine.cpu_attention_gbps_per_core * 1e9,
            query_bytes,
            result_bytes,
            req.host_attention,
        )),
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

/// The engine for a resolved request under `policy`: it starts `steps` tokens
/// short, so the run ends at the requested context within the slots the
/// profile sizes.
fn request_engine(
    backend: &SimBackend,
    r: &Resolved,
    spec: &PipelineSpec,
    policy: Box<dyn Policy>,
) -> Result<SimEngine> {
    let budget = r.inputs.budget_bytes.map(|b| b as usize);
    SimEngine::new(
        backend,
        spec,
        r.steps,
        r.steps,
        budget,
        policy,
        r.inputs.host,
    )
}

/// Answers a what-if question: runs the engine with the adaptive policy on
/// the simulated machine for the requested steps (the policy starts from the
/// machine's nominal link and measures from there) and compares with the best
/// static plan.
pub fn simulate(req: &SimulateRequest) -> Result<SimulateReport> {
    let r = resolve(req)?;
    let inputs = &r.inputs;
    let slowdown = match req.memory_slowdown {
        Some(f) => MemorySlowdown::new(f)?.get(),
        None => DEFAULT_MEMORY_SLOWDOWN,
    };
    let spec = PipelineSpec::from_inputs(inputs);
    let adaptive = AdaptivePolicy::new(AdaptiveConfig {
        objective: req.objective,
        memory_slowdown: slowdown,
        link_prior: inputs.link,
        compute_prior_seconds: inputs.compute_seconds[0],
        host: inputs.host,
        ..AdaptiveConfig::default()
    });
    let policy = Box::new(Placed::new(Box::new(adaptive), req.host_attention));
    let backend = SimBackend::new(r.sim)?;
    let mut sim = request_engine(&backend, &r, &spec, policy)?;
    let mut steps = Vec::with_capacity(r.steps);
    let mut previous = sim.engine.plan();
    for step in 0..r.steps {
        let (seconds, engine_step) = sim.step(&spec.compute_seconds, None)?;
        let plan = sim.engine.plan();
        let stall = sim.sample(engine_step)?.stall_total();
        steps.push(SimulatedStep {
            step,
            pooled_count: plan.pooled.len(),
            host_count: plan.host_attended.len(),
            prefetch_depth: plan.staging_slots(),
            step_ms: seconds * 1e3,
            stall_ms: stall * 1e3,
            switched: *plan != *previous,
        });
        previous = plan;
    }
    let plan = (*sim.engine.plan()).clone();
    let device_kv = sim.engine.device_bytes();
    drop(sim);
    let pred = predict_step(inputs, &plan)?;
    let best = best_static_plan_within(inputs, SearchSpace::Auto, slowdown)?;
    let copy_only = best_static_plan_within(
        &PolicyInputs {
            host: None,
            ..inputs.clone()
        },
        SearchSpace::Auto,
        slowdown,
    )?;
    let total = inputs.total_kv_bytes();
    debug_assert!(device_kv as u64 >= device_bytes(&inputs.layer_bytes, &plan) / 2);
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
        device_kv_mib: device_kv as f64 / MIB,
        host_attention: req.host_attention,
        cpu_attention_gbps: inputs.host.map_or(0.0, |h| h.attention_bandwidth / 1e9),
        host_ms_per_step: pred.host_seconds * 1e3,
        host_attended_layers: plan.host_attended,
        pooled_layers: plan.pooled,
        predicted_step_ms: pred.step_seconds * 1e3,
        simulated_step_ms: steps.last().map(|s| s.step_ms).unwrap_or(0.0),
        all_gpu_step_ms: inputs.compute_total() * 1e3,
        stall_ms_per_step: pred.stall_seconds * 1e3,
        offloaded_share: pred.offloaded_share,
        transparent_fraction: transparent_fraction(inputs)?,
        best_static_prefetch_depth: best.plan.staging_slots(),
        best_static_host_attended_layers: best.plan.host_attended,
        best_static_pooled_layers: best.plan.pooled,
        copy_only_step_ms: copy_only.prediction.step_seconds * 1e3,
        best_static_step_ms: best.prediction.step_seconds * 1e3,
        steps,
    })
}

// ---------------------------------------------------------------------------
// Static plans through the same path, and the best whole-layer plan within a
// slowdown (the bound the memory objective is measured against).

/// Steps at the end of a static run that count as its steady state: the
/// slowest of them is the plan's step time (a periodic regime is judged by
/// its worst step).
pub const STEADY_STEPS: usize = 4;

/// Staging slots the simulated bound search tries at most.
pub const BOUND_MAX_SLOTS: usize = 8;

/// Runs the request's workload as [`simulate`] does, but under `plan` pinned
/// from the start (a static policy), and returns every step's seconds on the
/// compute stream. Errors when the plan does not fit the request's budget.
pub fn simulate_static(req: &SimulateRequest, plan: &Plan) -> Result<Vec<f64>> {
    let r = resolve(req)?;
    let inputs = &r.inputs;
    plan.validate(inputs.num_layers())?;
    let spec = PipelineSpec::from_inputs(inputs);
    let backend = SimBackend::new(r.sim)?;
    let policy = Box::new(StaticPolicy::pinned(plan.clone()));
    let mut sim = request_engine(&backend, &r, &spec, policy)?;
    (0..r.steps)
        .map(|_| sim.step(&spec.compute_seconds, None).map(|(s, _)| s))
        .collect()
}

/// The best whole-layer static plan [`simulate_static`] runs within a slowdown.
#[derive(Clone, Debug, PartialEq)]
pub struct StaticBound {
    /// The plan (all resident when no pooled plan stays within the slowdown).
    pub plan: Plan,
    /// Its steady step: the slowest of the last [`STEADY_STEPS`] simulated steps, seconds.
    pub step_seconds: f64,
    /// The all-resident step (pure compute), seconds.
    pub compute_seconds: f64,
    /// Device bytes of the KV under the plan.
    pub device_bytes: u64,
    /// Share of the KV's device footprint the plan frees (see
    /// [`crate::policy::Prediction::offloaded_share`]).
    pub offloaded_share: f64,
    /// Static runs the search simulated.
    pub runs: usize,
}

/// The copied whole-layer static plan that frees the most device memory while
/// its steady step, run through the real engine on the simulated machine
/// ([`simulate_static`], the request's budget, objective ignored), stays within
/// `slowdown` x the all-resident step: the achievable bound for whole layers,
/// copy latency and slot turnaround included, independent of the cost model.
///
/// For each staging-slot count `W` up to [`BOUND_MAX_SLOTS`] it tries pooled
/// counts `P` from the link's limit (`slowdown x compute / one copy`, plus one)
/// down, each over the placements the search uses for deep models
/// ([`crate::policy::search::restricted_sets`]: even spreads, their rotations,
/// a compute-weighted spread, the tail), and keeps the first `P` that passes;
/// counts that cannot free more than the best found are skipped.
pub fn best_simulated_static_plan(req: &SimulateRequest, slowdown: f64) -> Result<StaticBound> {
    if !(slowdown.is_finite() && slowdown >= 1.0) {
        return Err(PieError::config(format!(
            "a slowdown must be a finite number of at least 1 (got {slowdown})"
        )));
    }
    let r = resolve(req)?;
    let inputs = &r.inputs;
    let l = inputs.num_layers();
    let compute = inputs.compute_total();
    let limit = compute * slowdown;
    let steady = |steps: &[f64]| {
        steps[steps.len().saturating_sub(STEADY_STEPS)..]
            .iter()
            .copied()
            .fold(0.0, f64::max)
    };
    let all = Plan::all_resident();
    let mut best = StaticBound {
        step_seconds: steady(&simulate_static(req, &all)?),
        device_bytes: device_bytes(&inputs.layer_bytes, &all),
        plan: all,
        compute_seconds: compute,
        offloaded_share: 0.0,
        runs: 1,
    };
    let cheapest_copy = inputs
        .valid_bytes
        .iter()
        .map(|&b| inputs.link.h2d_seconds(b))
        .fold(f64::INFINITY, f64::min);
    let p_hi = if cheapest_copy > 0.0 {
        ((limit / cheapest_copy).floor() as usize + 1).min(l)
    } else {
        l
    };
    for w in 1..=BOUND_MAX_SLOTS.min(l) {
        for p in (w + 1..=p_hi).rev() {
            // Uniform layers: P through W frees P - W slots; skip what cannot beat the best.
            let floor = device_bytes(&inputs.layer_bytes, &Plan::spread(l, p, w));
            if floor >= best.device_bytes {
                break;
            }
            let mut passed = false;
            for set in crate::policy::search::restricted_sets(&inputs.compute_seconds, p) {
                let plan = Plan::copying(set, w);
                let bytes = device_bytes(&inputs.layer_bytes, &plan);
                if inputs.budget_bytes.is_some_and(|b| bytes > b) || bytes >= best.device_bytes {
                    continue;
                }
                let step = steady(&simulate_static(req, &plan)?);
                best.runs += 1;
                if step <= limit {
                    best.plan = plan;
                    best.step_seconds = step;
                    best.device_bytes = bytes;
                    passed = true;
                    break;
                }
            }
            if passed {
                break;
            }
        }
    }
    let total = inputs.total_kv_bytes();
    best.offloaded_share = if total == 0 {
        0.0
    } else {
        1.0 - best.device_bytes as f64 / total as f64
    };
    Ok(best)
}
