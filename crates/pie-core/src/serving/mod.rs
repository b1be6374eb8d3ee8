//! Serving in virtual time (`pie-rs simulate --serving`): a continuous-batching
//! scheduler like vLLM's and transformers', in front of the real engine on the
//! simulated machine, for four ways of holding the KV.
//!
//! # The model
//! * **Requests** ([`workload`]): seeded, chat-like lengths, Poisson arrivals.
//! * **Scheduler** ([`scheduler`]), every iteration: each running request
//!   reserves room for its next token in 16-token blocks, preempting the most
//!   recently admitted requests when the blocks run out; then, if nothing was
//!   preempted, swapped-out requests come back and waiting ones are admitted
//!   first come first served while their blocks fit (with vLLM's 1% watermark),
//!   up to 256 running sequences and 8192 batched tokens. Admitted requests are
//!   prefilled in the same batch as the decodes and emit their first token at
//!   its end. A request recomputed after preemption prefills its prompt and
//!   what it had generated.
//! * **The engine**: one [`crate::Engine`] on the [`crate::sim::SimBackend`]
//!   per run, whose L layers each hold the whole batch's KV end to end (the
//!   block pool of that layer, a paged cache seen as one sequence): its capacity
//!   is the pool's, its valid length the tokens written since the last
//!   compaction. Every iteration is one engine step: per layer `layer_begin`,
//!   `layer_ready` (a pooled layer's prefetch is waited for), the layer's
//!   compute on the compute stream, `layer_written_batch` with the tokens the
//!   batch wrote (a pooled layer writes them back), `layer_done`. So the
//!   schedule, the swapper, the policy thread and the plan transitions are the
//!   shipped ones, and a prefetch moves the layer's valid KV. Freed blocks are
//!   reused by the allocator, so the valid length is compacted (a crop, which
//!   drains the copy queues) only when more than 1/8 of it is freed space.
//! * **Compute** ([`crate::profiles::MachineProfile::layer_step_seconds`]): a
//!   roofline per layer: weights plus the KV the batch reads and writes over
//!   HBM, or the batch's tokens through the tensor cores, whichever is longer.
//!   The LM head, sampling and the scheduler's own time are not modelled.
//!
//! # The four methods
//! * [`Method::NoPooling`]: the pool is what the budget holds on the device;
//!   preemption recomputes (vLLM's default).
//! * [`Method::Swap`]: the same pool; preemption swaps the request's KV to host
//!   memory over the link and back before it resumes (vLLM's swap mode,
//!   transformers' offloading manager). The compute stream waits for the copies.
//! * [`Method::StaticOffload`]: like FlexGen, a fixed share of the KV lives in
//!   host memory, chosen offline: the number of pooled layers (spread, one
//!   staging slot, FlexGen's one-layer look-ahead) that maximises the cost
//!   model's decode throughput for a full pool of requests of the workload's
//!   mean length. The pool is what that plan fits in the budget; it never changes.
//! * [`Method::Pie`]: adaptive expansion. The pool starts at what the device
//!   holds; when the scheduler is short of blocks it grows the pool to the
//!   largest size between 1/8 and 1/4 more at which the cost model (the
//!   profile's link and roofline, which the sim backend realises exactly)
//!   predicts that the fastest plan fitting the budget, with the pool full,
//!   decodes within [`PIE_STEP_TOLERANCE`] of all-resident; no growth when not
//!   even 1/8 more hides (then `pie` is `no_pooling`). A growth is one engine
//!   transition to that pool and plan ([`crate::Engine::resize_with_plan`]);
//!   the engine's adaptive policy then places the pooled layers and chooses
//!   the prefetch depth from what it measures. Preemption recomputes.
//!
//! **Host attention** ([`ServingRequest::host_attention`], `pie` only): the
//! adaptive policy may attend pooled layers on the host (the machine's CPU
//! figures, [`crate::policy::HostModel`]); a host-attended layer takes the
//! engine's own path (`layer_ready_at` answers it is on the host, its new
//! tokens go to its host arena) and the driver charges it its round trip over
//! the KV the running requests hold, as the batch simulator does
//! ([`crate::simulate`]). The pool grows exactly as copy-only `pie`'s does
//! (the cost model's copy plans decide): host attention only places layers
//! within it, where the policy predicts it faster than copying. An earlier
//! rule that also grew the pool when host attention predicted 10% more decode
//! throughput gained up to 18% on one profile but lost 7% on another (rtx4090
//! at 1 GiB, seed 3): that prediction leaves out prefills and preemptions.

//! Everything is deterministic for a seed: the driver waits for the policy
//! thread after every step.

pub mod scheduler;
pub mod workload;

use crate::error::{PieError, Result};
use crate::layout::LayerSpec;
use crate::policy::{exchange_bytes, HostAttention, HostModel};
use crate::profiles::{machine, model, MachineProfile, ModelShape};
use crate::sim::SimConfig;

pub use scheduler::{run_method, run_method_within};
pub use workload::{chat_requests, Request};

/// Tokens per KV block (vLLM's and transformers' default).
pub const BLOCK_TOKENS: usize = 16;

/// Pie grows its pool only while the predicted decode step stays within this
/// factor of the all-resident step.
pub const PIE_STEP_TOLERANCE: f64 = 1.02;

/// Throughput within this share of the reference counts as equal (the
/// "equal performance, less memory" figure).
pub const EQUAL_THROUGHPUT: f64 = 0.99;

/// Share of the device memory left after the weights that the KV gets by
/// default (vLLM's `gpu_memory_utilization` is 0.9 of the whole device).
pub const DEFAULT_MEMORY_SHARE: f64 = 0.9;

const MIB: f64 = 1024.0 * 1024.0;

/// A way of holding the KV (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// Device only; preemption recomputes.
    NoPooling,
    /// Device only; preemption swaps whole requests to host memory.
    Swap,
    /// A fixed share of every step's KV on the host, chosen offline (FlexGen).
    StaticOffload,
    /// Pooled layers, adaptive expansion and the adaptive policy.
    Pie,
}

impl Method {
    /// Every method, in report order.
    pub const ALL: [Method; 4] = [
        Method::NoPooling,
        Method::Swap,
        Method::StaticOffload,
        Method::Pie,
    ];

    /// The method's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::NoPooling => "no_pooling",
            Method::Swap => "swap",
            Method::StaticOffload => "static_offload",
            Method::Pie => "pie",
        }
    }
}

/// Limits of the continuous-batching scheduler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulerLimits {
    /// Most sequences running at once (vLLM's `max_num_seqs`).
    pub max_running: usize,
    /// Most tokens in one batch (vLLM's `max_num_batched_tokens`); a single
    /// prefill longer than this still runs, alone.
    pub max_batched_tokens: usize,
    /// Free blocks admission keeps in reserve, as a share of the pool (vLLM: 0.01).
    pub watermark: f64,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        SchedulerLimits {
            max_running: 256,
            max_batched_tokens: 8192,
            watermark: 0.01,
        }
    }
}

/// A serving question: a model on a machine under a device budget, fed
/// chat-like requests at one or more rates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServingRequest {
    /// Machine profile (default `h100-pcie-gen5`).
    pub machine: Option<String>,
    /// Model shape (default `llama-3-8b`).
    pub model: Option<String>,
    /// Arrival rates, requests per second (`f64::INFINITY`: all at once);
    /// default one offline batch.
    pub rates: Vec<f64>,
    /// Requests per run (default 300).
    pub requests: Option<usize>,
    /// Device budget for the KV, MiB (default: 0.9 of the device memory left
    /// after the weights).
    pub gpu_budget_mib: Option<f64>,
    /// Workload seed (default 0).
    pub seed: Option<u64>,
    /// Methods to run (default all four).
    pub methods: Option<Vec<Method>>,
    /// Whether to search the smallest budget at which `pie` matches
    /// `no_pooling` at the full budget (default true; at the highest rate).
    pub equal_performance: Option<bool>,
    /// Override: host-to-device bandwidth, GB/s.
    pub h2d_gbps: Option<f64>,
    /// Override: device-to-host bandwidth, GB/s.
    pub d2h_gbps: Option<f64>,
    /// Override: fixed cost of one copy, microseconds (both directions).
    pub copy_latency_us: Option<f64>,
    /// Override: compute time a copy takes from the processor, nanoseconds
    /// per byte ([`SimConfig::copy_compute_cost`]; 0 on the profiles' GPUs).
    pub copy_compute_ns_per_byte: Option<f64>,
    /// Override: the scheduler's limits.
    pub limits: Option<SchedulerLimits>,
    /// Override: the model's shape (a model not in the profiles).
    pub model_shape: Option<ModelShape>,
    /// Override: a measured compute model instead of the roofline (a
    /// calibration against a real run).
    pub compute: Option<ComputeModel>,
    /// Explicit requests instead of generated ones (tests, replays of a
    /// measured run); `rates` and `requests` are then ignored.
    pub workload: Option<Vec<Request>>,
    /// Where `pie`'s pooled layers' attention may run (the CLI's default is `auto`).
    pub host_attention: HostAttention,
    /// Override: `pie` as pie-rs's continuous batching runs it (a pool sized
    /// once, a fixed plan) instead of the adaptive expansion; replays of a
    /// measured run use it.
    pub pie_pool: Option<FixedPool>,
}

/// A pool sized once with a fixed plan, as `pie_rs`'s continuous batching
/// sizes its cache at start (`paged_fit`): no expansion, no plan changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FixedPool {
    /// Blocks of [`BLOCK_TOKENS`] tokens the pool holds.
    pub blocks: usize,
    /// The pooled (copied) layers.
    pub pooled_layers: Vec<usize>,
    /// Staging slots the pooled layers are prefetched through.
    pub prefetch_depth: usize,
}

impl FixedPool {
    /// The plan it pins.
    pub fn plan(&self) -> crate::plan::Plan {
        crate::plan::Plan::copying(self.pooled_layers.clone(), self.prefetch_depth)
    }

    fn validate(&self, layers: usize) -> Result<()> {
        if self.blocks == 0 {
            return Err(PieError::config(
                "pie_pool needs at least one block (blocks > 0)",
            ));
        }
        self.plan().validate(layers)
    }
}

/// What a run of one method gave.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodReport {
    /// Output tokens per second of virtual time, first arrival to last finish.
    pub throughput_tok_s: f64,
    /// Time to first token, median, ms.
    pub ttft_ms_p50: f64,
    /// Time to first token, 99th percentile, ms.
    pub ttft_ms_p99: f64,
    /// Time per output token after the first (per request mean), median, ms.
    pub tpot_ms_p50: f64,
    /// Time per output token, 99th percentile, ms.
    pub tpot_ms_p99: f64,
    /// End-to-end latency, median, ms.
    pub e2e_ms_p50: f64,
    /// Most requests running at once.
    pub peak_running: usize,
    /// Mean requests running per step.
    pub mean_running: f64,
    /// Preemptions (recomputations or swap-outs).
    pub preemptions: u64,
    /// Peak device bytes of the KV (the engine's arena), MiB.
    pub device_kv_mib: f64,
    /// Peak host bytes of the KV (pooled layers, swap space), MiB.
    pub host_kv_mib: f64,
    /// The largest pool the scheduler had, tokens.
    pub pool_tokens: usize,
    /// Pooled layers at the end of the run.
    pub pooled_layers: usize,
    /// Staging slots at the end of the run.
    pub prefetch_depth: usize,
    /// Pooled layers attended on the host at the end of the run.
    pub host_attended_layers: usize,
    /// Virtual time host-attended layers spent on their round trips, ms in all.
    pub host_ms: f64,
    /// Engine steps (scheduler iterations).
    pub steps: u64,
    /// Requests finished.
    pub finished: usize,
    /// Output tokens of the finished requests (each request's own count).
    pub output_tokens: u64,
    /// Tokens the steps emitted (one per decoding and per prefilled request
    /// per step): equal to `output_tokens` when no token is counted twice.
    pub emitted_tokens: u64,
    /// Prompt tokens of the requests.
    pub prompt_tokens: u64,
    /// Tokens prefilled again after a recompute preemption.
    pub recomputed_tokens: u64,
    /// Bytes swapped out and in by preemptions, MiB.
    pub swapped_mib: f64,
    /// Pool resizes and plan changes of the engine.
    pub reconfigurations: u64,
    /// Virtual time spent in pool resizes, ms.
    pub reconfiguration_ms: f64,
    /// Virtual time of steps beyond their compute (stalls on prefetches,
    /// swaps, compactions), ms in all.
    pub stall_ms: f64,
    /// Virtual time from the first arrival to the last finish, seconds.
    pub makespan_s: f64,
}

/// One rate's results.
#[derive(Clone, Debug, PartialEq)]
pub struct RateRun {
    /// Arrival rate, requests per second (infinite: all at once).
    pub rate: f64,
    /// Results per method, in [`Method::ALL`] order.
    pub methods: Vec<(Method, MethodReport)>,
}

/// The "equal performance, less memory" figure.
#[derive(Clone, Debug, PartialEq)]
pub struct EqualPerformance {
    /// The rate it was measured at.
    pub rate: f64,
    /// `no_pooling`'s budget (the full one), MiB.
    pub no_pooling_budget_mib: f64,
    /// `no_pooling`'s throughput at that budget.
    pub no_pooling_throughput_tok_s: f64,
    /// The smallest budget at which `pie` reaches [`EQUAL_THROUGHPUT`] of it, MiB.
    pub pie_budget_mib: f64,
    /// `pie`'s throughput at that budget.
    pub pie_throughput_tok_s: f64,
    /// `no_pooling_budget_mib / pie_budget_mib`.
    pub memory_ratio: f64,
    /// The smallest budget at which `no_pooling` itself reaches the same
    /// throughput, MiB (the full budget may be more than it needs).
    pub no_pooling_min_budget_mib: f64,
    /// `no_pooling_min_budget_mib / pie_budget_mib`: device memory saved at
    /// equal throughput against the least `no_pooling` needs.
    pub memory_ratio_vs_min: f64,
    /// Runs the two bisections took.
    pub runs: usize,
}

/// The answer to a [`ServingRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct ServingReport {
    /// Machine profile.
    pub machine: String,
    /// Model shape.
    pub model: String,
    /// Device budget for the KV, MiB.
    pub gpu_budget_mib: f64,
    /// Host-to-device bandwidth, GB/s.
    pub h2d_gbps: f64,
    /// Device-to-host bandwidth, GB/s.
    pub d2h_gbps: f64,
    /// Requests per run.
    pub requests: usize,
    /// Mean prompt tokens.
    pub mean_prompt: f64,
    /// Mean output tokens.
    pub mean_output: f64,
    /// Tokens the device budget holds with every layer resident.
    pub device_pool_tokens: usize,
    /// Workload seed.
    pub seed: u64,
    /// One run per rate.
    pub runs: Vec<RateRun>,
    /// The equal-performance figure, when asked for and both methods ran.
    pub equal_performance: Option<EqualPerformance>,
}

/// Per-layer compute of one batched step, fitted to measurements: `fixed +
/// per_token x tokens in the batch + per_context_token x tokens of KV the
/// batch's attention reads`, seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ComputeModel {
    /// Seconds per layer per step, whatever the batch.
    pub fixed: f64,
    /// Seconds per layer per token in the batch.
    pub per_token: f64,
    /// Seconds per layer per token of KV read.
    pub per_context_token: f64,
}

impl ComputeModel {
    fn validate(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !(ok(self.fixed) && ok(self.per_token) && ok(self.per_context_token))
            || self.fixed + self.per_token + self.per_context_token <= 0.0
        {
            return Err(PieError::config(format!(
                "a compute model needs finite, non-negative coefficients, not all zero (got {self:?})"
            )));
        }
        Ok(())
    }
}

/// A serving setup resolved against the profiles.
#[derive(Clone, Debug)]
pub struct ServingSetup {
    /// The machine.
    pub machine: MachineProfile,
    /// The model.
    pub model: ModelShape,
    /// The simulated link.
    pub sim: SimConfig,
    /// Device bytes the KV may use.
    pub budget_bytes: u64,
    /// Scheduler limits.
    pub limits: SchedulerLimits,
    /// A measured compute model replacing the roofline, if given.
    pub compute: Option<ComputeModel>,
    /// The host attention path for one sequence's query row set (scale the
    /// query and result bytes by the sequences), its choice the request's.
    pub host: HostModel,
    /// `pie`'s pool when it is sized once (see [`FixedPool`]).
    pub pie_pool: Option<FixedPool>,
}

impl ServingSetup {
    /// The engine's layers: each holds the batch's KV as one sequence of the
    /// model's tokens.
    pub fn specs(&self) -> Vec<LayerSpec> {
        let m = &self.model;
        vec![
            LayerSpec {
                batch: 1,
                kv_heads: m.kv_heads,
                k_dim: m.head_dim,
                v_dim: m.head_dim,
                elem_size: m.elem_size,
            };
            m.layers
        ]
    }

    /// Bytes of one token's KV in one layer.
    pub fn token_bytes(&self) -> u64 {
        self.model.kv_bytes_per_token()
    }

    /// The host attention path for `seqs` sequences decoding one token each.
    pub fn host_for(&self, seqs: usize) -> HostModel {
        HostModel {
            query_bytes: self.host.query_bytes * seqs as u64,
            result_bytes: self.host.result_bytes * seqs as u64,
            ..self.host
        }
    }

    /// The same setup with another budget.
    pub fn with_budget(&self, budget_bytes: u64) -> Self {
        ServingSetup {
            budget_bytes,
            ..self.clone()
        }
    }
}

fn positive(name: &str, v: Option<f64>) -> Result<Option<f64>> {
    match v {
        Some(x) if !(x.is_finite() && x > 0.0) => Err(PieError::config(format!(
            "{name} must be a positive number (got {x})"
        ))),
        other => Ok(other),
    }
}

/// The device bytes the longest request's KV needs with every layer resident.
pub fn one_request_bytes(setup: &ServingSetup, requests: &[Request]) -> u64 {
    let longest = requests
        .iter()
        .map(Request::max_kv_tokens)
        .max()
        .unwrap_or(1);
    let tokens = longest.div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS;
    crate::slots::ArenaLayout::device_bytes_for(
        &setup.specs(),
        tokens,
        &crate::plan::Plan::all_resident(),
    ) as u64
}

/// A checked [`ServingRequest`].
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Machine, model, link, budget and limits.
    pub setup: ServingSetup,
    /// Each rate with its requests (`NaN` for a given workload).
    pub workloads: Vec<(f64, Vec<Request>)>,
    /// The workload seed.
    pub seed: u64,
}

/// Resolves and checks a request: the setup and the workload of each rate.
pub fn resolve(req: &ServingRequest) -> Result<Resolved> {
    let machine = machine(req.machine.as_deref().unwrap_or("h100-pcie-gen5"))?;
    let shape = match req.model_shape {
        Some(m) => {
            if m.layers == 0
                || m.kv_heads == 0
                || m.head_dim == 0
                || m.elem_size == 0
                || m.heads == 0
                || m.layers > 4096
            {
                return Err(PieError::config(format!(
                    "a custom model needs 1 to 4096 layers and positive heads, KV heads, head size and element size (got {m:?})"
                )));
            }
            m
        }
        None => model(req.model.as_deref().unwrap_or("llama-3-8b"))?,
    };
    if let Some(c) = &req.compute {
        c.validate()?;
    }
    if let Some(p) = &req.pie_pool {
        p.validate(shape.layers)?;
    }
    let h2d = positive("h2d_gbps", req.h2d_gbps)?.unwrap_or(machine.h2d_gbps);
    let d2h = positive("d2h_gbps", req.d2h_gbps)?.unwrap_or(machine.d2h_gbps);
    let budget_mib = positive("gpu_budget_mib", req.gpu_budget_mib)?;
    let latency_us = match req.copy_latency_us {
        Some(l) if !(l.is_finite() && l >= 0.0) => {
            return Err(PieError::config(format!(
                "copy_latency_us must be a non-negative number (got {l})"
            )))
        }
        Some(l) => l,
        None => machine.copy_latency_us,
    };
    if let Some(c) = req.copy_compute_ns_per_byte {
        if !(c.is_finite() && c >= 0.0) {
            return Err(PieError::config(format!(
                "copy_compute_ns_per_byte must be a non-negative number (got {c})"
            )));
        }
    }
    let limits = req.limits.unwrap_or_default();
    if limits.max_running == 0 || limits.max_batched_tokens == 0 {
        return Err(PieError::config(
            "the scheduler needs room for at least one sequence and one token per batch",
        ));
    }
    if !(0.0..0.5).contains(&limits.watermark) {
        return Err(PieError::config(format!(
            "the admission watermark must be in [0, 0.5) of the pool (got {})",
            limits.watermark
        )));
    }
    let seed = req.seed.unwrap_or(0);
    let workloads: Vec<(f64, Vec<Request>)> = match &req.workload {
        Some(w) => {
            if w.is_empty() {
                return Err(PieError::config("the workload has no requests"));
            }
            if let Some(r) = w.iter().find(|r| {
                r.prompt == 0 || r.output == 0 || !(r.arrival.is_finite() && r.arrival >= 0.0)
            }) {
                return Err(PieError::config(format!(
                    "request {} needs a prompt and an output of at least one token and a finite arrival time (got {r:?})",
                    r.id
                )));
            }
            vec![(f64::NAN, w.clone())]
        }
        None => {
            let n = req.requests.unwrap_or(300);
            if n == 0 || n > 100_000 {
                return Err(PieError::config(format!(
                    "requests must be between 1 and 100000 (got {n})"
                )));
            }
            let rates = if req.rates.is_empty() {
                vec![f64::INFINITY]
            } else {
                req.rates.clone()
            };
            if let Some(bad) = rates.iter().find(|r| r.is_nan() || **r <= 0.0) {
                return Err(PieError::config(format!(
                    "rates must be positive requests per second, or inf for all at once (got {bad})"
                )));
            }
            rates
                .iter()
                .map(|&r| (r, chat_requests(n, r, seed)))
                .collect()
        }
    };
    let weights = shape.weight_bytes_per_layer() as f64 * shape.layers as f64;
    let device = machine.gpu_memory_gib * 1024.0 * MIB;
    let budget = match budget_mib {
        Some(mib) => (mib * MIB).round() as u64,
        None => {
            let left = DEFAULT_MEMORY_SHARE * device - weights;
            if left <= 0.0 {
                return Err(PieError::config(format!(
                    "{}'s weights ({:.1} GiB) leave no room for the KV in {:.0}% of {}'s {:.0} GiB; give gpu_budget_mib (as if the model were split across devices)",
                    shape.name,
                    weights / (1024.0 * MIB),
                    DEFAULT_MEMORY_SHARE * 100.0,
                    machine.name,
                    machine.gpu_memory_gib
                )));
            }
            left as u64
        }
    };
    let setup = ServingSetup {
        machine,
        model: shape,
        sim: SimConfig {
            h2d_bandwidth: h2d * 1e9,
            d2h_bandwidth: d2h * 1e9,
            h2d_latency: latency_us * 1e-6,
            d2h_latency: latency_us * 1e-6,
            copy_compute_cost: req.copy_compute_ns_per_byte.unwrap_or(0.0) * 1e-9,
            ..machine.sim_config()
        },
        budget_bytes: budget,
        limits,
        compute: req.compute,
        host: {
            let (query, result) = exchange_bytes(1, shape.heads, shape.head_dim, shape.elem_size);
            HostModel::from_cpu(
                machine.cpu_memory_gbps * 1e9,
                machine.cpu_cores,
                machine.cpu_attention_gbps_per_core * 1e9,
                query,
                result,
                req.host_attention,
            )
        },
        pie_pool: req.pie_pool.clone(),
    };
    setup.sim.validate()?;
    for (_, w) in &workloads {
        let need = one_request_bytes(&setup, w);
        if need > budget {
            let longest = w.iter().map(Request::max_kv_tokens).max().unwrap_or(0);
            return Err(PieError::budget(format!(
                "a device budget of {:.1} MiB cannot hold one request's KV: the longest request holds {longest} tokens, {:.1} MiB on {} with every layer resident; raise gpu_budget_mib to at least {:.1}",
                budget as f64 / MIB,
                need as f64 / MIB,
                shape.name,
                need as f64 / MIB
            )));
        }
    }
    Ok(Resolved {
        setup,
        workloads,
        seed,
    })
}

/// Answers a serving question (see the module docs).
pub fn simulate_serving(req: &ServingRequest) -> Result<ServingReport> {
    let Resolved {
        setup,
        workloads,
        seed,
    } = resolve(req)?;
    let methods = req.methods.clone().unwrap_or_else(|| Method::ALL.to_vec());
    if methods.is_empty() {
        return Err(PieError::config("choose at least one method"));
    }
    let mut runs = Vec::with_capacity(workloads.len());
    for (rate, w) in &workloads {
        // The methods' runs are independent: one thread each.
        let chosen: Vec<Method> = Method::ALL
            .into_iter()
            .filter(|m| methods.contains(m))
            .collect();
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = chosen
                .iter()
                .map(|&m| {
                    let setup = &setup;
                    s.spawn(move || run_method(setup, w, m).map(|r| (m, r)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(PieError::internal("a serving run panicked")))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        runs.push(RateRun {
            rate: *rate,
            methods: results,
        });
    }
    if req.pie_pool.is_some() && req.equal_performance == Some(true) {
        return Err(PieError::config(
            "equal_performance searches pie's budget, which a fixed pie_pool pins; drop one of them",
        ));
    }
    let equal = if req.equal_performance.unwrap_or(req.pie_pool.is_none())
        && methods.contains(&Method::NoPooling)
        && methods.contains(&Method::Pie)
    {
        // At the most loaded rate (the last of the highest).
        let (i, _) =
            workloads
                .iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |(bi, br), (i, (r, _))| {
                    if *r >= br || r.is_nan() {
                        (i, *r)
                    } else {
                        (bi, br)
                    }
                });
        let reference = runs[i]
            .methods
            .iter()
            .find(|(m, _)| *m == Method::NoPooling)
            .map(|(_, r)| r.throughput_tok_s)
            .unwrap_or(0.0);
        Some(equal_performance(
            &setup,
            &workloads[i].1,
            workloads[i].0,
            reference,
        )?)
    } else {
        None
    };
    let w0 = &workloads[0].1;
    let n = w0.len() as f64;
    let custom = req.compute.is_some()
        || req.h2d_gbps.is_some()
        || req.d2h_gbps.is_some()
        || req.copy_compute_ns_per_byte.is_some();
    Ok(ServingReport {
        machine: if custom {
            format!("{} (overridden)", setup.machine.name)
        } else {
            setup.machine.name.to_string()
        },
        model: setup.model.name.to_string(),
        gpu_budget_mib: setup.budget_bytes as f64 / MIB,
        h2d_gbps: setup.sim.h2d_bandwidth / 1e9,
        d2h_gbps: setup.sim.d2h_bandwidth / 1e9,
        requests: w0.len(),
        mean_prompt: w0.iter().map(|r| r.prompt as f64).sum::<f64>() / n,
        mean_output: w0.iter().map(|r| r.output as f64).sum::<f64>() / n,
        device_pool_tokens: scheduler::device_pool_tokens(&setup),
        seed,
        runs,
        equal_performance: equal,
    })
}

/// Bisections on the budget this many times (a precision of 1/64 of the budget).
const EQUAL_PERFORMANCE_ITERATIONS: usize = 6;

/// The smallest budget (to 1/64 of `setup`'s) at which `method` reaches
/// `target` tokens/s, by bisection between what one request needs and the
/// full budget (throughput grows with the budget), with that run's report and
/// the runs it took. A run that cannot reach the target is cut short as soon
/// as its makespan shows it.
fn smallest_budget(
    setup: &ServingSetup,
    requests: &[Request],
    method: Method,
    target: f64,
) -> Result<(u64, MethodReport, usize)> {
    let tokens: f64 = requests.iter().map(|r| r.output as f64).sum();
    let limit = if target > 0.0 {
        tokens / target
    } else {
        f64::INFINITY
    };
    let (mut lo, mut hi) = (
        one_request_bytes(setup, requests).saturating_sub(1),
        setup.budget_bytes,
    );
    let mut runs = 0;
    let mut at_hi = None;
    for _ in 0..EQUAL_PERFORMANCE_ITERATIONS {
        if hi <= lo + 1 {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        runs += 1;
        match run_method_within(&setup.with_budget(mid), requests, method, limit)? {
            Some(r) if r.throughput_tok_s >= target => {
                hi = mid;
                at_hi = Some(r);
            }
            _ => lo = mid,
        }
    }
    let report = match at_hi {
        Some(r) => r,
        None => {
            runs += 1;
            run_method(&setup.with_budget(hi), requests, method)?
        }
    };
    Ok((hi, report, runs))
}

/// The "equal performance, less memory" figure: the smallest budget at which
/// `pie` reaches [`EQUAL_THROUGHPUT`] of `reference` (`no_pooling`'s
/// throughput at the full budget), and, for a fair ratio, the smallest at
/// which `no_pooling` itself does.
pub fn equal_performance(
    setup: &ServingSetup,
    requests: &[Request],
    rate: f64,
    reference: f64,
) -> Result<EqualPerformance> {
    let target = EQUAL_THROUGHPUT * reference;
    let (pie_budget, pie, pie_runs) = smallest_budget(setup, requests, Method::Pie, target)?;
    let (base_budget, _, base_runs) = smallest_budget(setup, requests, Method::NoPooling, target)?;
    let full = setup.budget_bytes;
    Ok(EqualPerformance {
        rate,
        no_pooling_budget_mib: full as f64 / MIB,
        no_pooling_throughput_tok_s: reference,
        no_pooling_min_budget_mib: base_budget as f64 / MIB,
        pie_budget_mib: pie_budget as f64 / MIB,
        pie_throughput_tok_s: pie.throughput_tok_s,
        memory_ratio: full as f64 / pie_budget as f64,
        memory_ratio_vs_min: base_budget as f64 / pie_budget as f64,
        runs: pie_runs + base_runs,
    })
}

/// The `q`-quantile (0..=1) of `xs` by linear interpolation; 0 when empty.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    if i + 1 < v.len() {
        v[i] + f * (v[i + 1] - v[i])
    } else {
        v[i]
    }
}
