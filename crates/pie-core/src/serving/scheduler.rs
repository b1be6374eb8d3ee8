//! The continuous-batching scheduler and the run of one method: blocks,
//! admission, preemption, and one engine step per iteration (see the parent
//! module's docs for the model).

use std::collections::VecDeque;

use super::{
    quantile, Method, MethodReport, Request, ServingSetup, BLOCK_TOKENS, MIB, PIE_STEP_TOLERANCE,
};
use crate::backend::{Backend, CopyShape, Mem, Stream};
use crate::engine::{Engine, EngineOptions, LayerKv};
use crate::error::{PieError, Result};
use crate::plan::Plan;
use crate::policy::{
    best_static_plan, predict_step, AdaptiveConfig, AdaptivePolicy, HostAttention, Objective,
    Placed, Policy, PolicyInputs, StaticPolicy,
};
use crate::sim::SimBackend;
use crate::slots::ArenaLayout;
use crate::telemetry::Counters;

/// The stream the model computes on.
const COMPUTE: Stream = Stream::Foreign(0);
/// The stream preemption swaps run on (they share the link with prefetches).
const SWAP: Stream = Stream::Foreign(1);

/// Pie grows its pool by this factor at a time.
const EXPANSION: f64 = 1.25;

/// Pie grows by at least 1/this of its pool (smaller steps are not worth a
/// plan transition).
const MIN_EXPANSION_DIVISOR: usize = 8;

/// Sequences whose queries the adaptive policy's host model assumes per step
/// (the query and result bytes scale with them; the driver charges the real
/// count): half the scheduler's default limit of 256.
const HOST_MODEL_SEQS: usize = 128;

/// Steps pie waits before asking again after the cost model refused to grow.
const EXPANSION_RETRY_STEPS: u64 = 64;

/// The largest pool (tokens, a multiple of [`BLOCK_TOKENS`]) `plan` fits in
/// the budget; 0 when not even one block fits.
pub fn pool_tokens_for(setup: &ServingSetup, plan: &Plan) -> usize {
    let specs = setup.specs();
    let l = specs.len();
    let slots = (l - plan.pooled.len() + plan.staging_slots()).max(1) as u64;
    let guess = setup.budget_bytes / (slots * setup.token_bytes().max(1));
    let mut k = (guess as usize / BLOCK_TOKENS) * BLOCK_TOKENS;
    while k > 0 && ArenaLayout::device_bytes_for(&specs, k, plan) as u64 > setup.budget_bytes {
        k -= BLOCK_TOKENS;
    }
    k
}

/// The pool the budget holds with every layer resident, tokens.
pub fn device_pool_tokens(setup: &ServingSetup) -> usize {
    pool_tokens_for(setup, &Plan::all_resident())
}

/// One layer's compute for a batch (the roofline of
/// [`crate::profiles::MachineProfile::layer_step_seconds`]): `decode_kv` are
/// the context lengths of the decoding sequences (the new token included),
/// `prefills` the lengths of the prefills.
pub fn layer_seconds(setup: &ServingSetup, decode_kv: &[usize], prefills: &[usize]) -> f64 {
    let m = &setup.model;
    let tb = setup.token_bytes();
    let tokens = decode_kv.len() + prefills.iter().sum::<usize>();
    let read: usize = decode_kv.iter().sum::<usize>() + prefills.iter().sum::<usize>();
    let kv_bytes = tb * (read + tokens) as u64;
    if let Some(c) = &setup.compute {
        return c.fixed + c.per_token * tokens as f64 + c.per_context_token * read as f64;
    }
    let qk = (4 * m.heads * m.head_dim) as f64;
    let attention = qk
        * (decode_kv.iter().sum::<usize>() as f64
            + prefills.iter().map(|&p| (p * p) as f64 / 2.0).sum::<f64>());
    setup
        .machine
        .layer_step_seconds(m, tokens as u64, kv_bytes, attention)
}

/// Cost-model inputs for a decode step of `seqs` sequences holding `tokens`
/// tokens of KV in all, every layer's pool sized `tokens` (full), with pooled
/// layers copied: the pool's size is chosen as copy-only pooling would choose
/// it, whatever the placement (see [`Run::try_expand`]).
fn full_pool_inputs(setup: &ServingSetup, tokens: usize, seqs: usize) -> PolicyInputs {
    let l = setup.model.layers;
    let seqs = seqs.max(1);
    let per = tokens / seqs;
    let mut decode = vec![per + 1; seqs];
    decode[0] += tokens - per * seqs;
    let tb = setup.token_bytes();
    PolicyInputs {
        compute_seconds: vec![layer_seconds(setup, &decode, &[]); l],
        layer_bytes: vec![tb * tokens as u64; l],
        valid_bytes: vec![tb * tokens as u64; l],
        writeback_bytes: vec![tb * seqs as u64; l],
        link: setup.sim.link_model(),
        budget_bytes: Some(setup.budget_bytes),
        objective: Objective::Speed,
        host: None,
    }
}

/// FlexGen's offline choice: the number of pooled layers (spread, one
/// staging slot) that maximises the cost model's decode throughput with the
/// pool full of requests of the workload's mean length. Returns the plan and
/// its pool.
pub fn static_offload_plan(setup: &ServingSetup, requests: &[Request]) -> Result<(Plan, usize)> {
    let l = setup.model.layers;
    let mean_kv = requests
        .iter()
        .map(|r| r.prompt as f64 + r.output as f64 / 2.0)
        .sum::<f64>()
        / requests.len().max(1) as f64;
    let mut best: Option<(f64, Plan, usize)> = None;
    for p in 0..=l {
        let plan = if p == 0 {
            Plan::all_resident()
        } else {
            Plan::spread(l, p, 1)
        };
        let k = pool_tokens_for(setup, &plan);
        if k == 0 {
            continue;
        }
        let seqs = ((k as f64 / mean_kv.max(1.0)) as usize).clamp(1, setup.limits.max_running);
        let inputs = full_pool_inputs(setup, k, seqs);
        let step = predict_step(&inputs, &plan)?.step_seconds;
        let rate = seqs as f64 / step;
        if best
            .as_ref()
            .is_none_or(|(b, _, _)| rate > *b * (1.0 + 1e-9))
        {
            best = Some((rate, plan, k));
        }
    }
    best.map(|(_, p, k)| (p, k)).ok_or_else(|| {
        PieError::budget("the budget holds no KV block under any static plan; raise it")
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Future,
    Waiting,
    Running,
    Swapped,
    Finished,
}

/// One request's progress.
#[derive(Clone, Debug)]
struct Live {
    req: Request,
    state: State,
    /// Tokens of KV it holds (on the device, or on the host when swapped).
    kv: usize,
    /// Tokens generated so far.
    generated: usize,
    /// Blocks it holds on the device.
    blocks: usize,
    first_token: Option<f64>,
    finished: Option<f64>,
}

fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// One method's run: the scheduler's state and the engine under it.
struct Run<'a> {
    setup: &'a ServingSetup,
    method: Method,
    engine: Engine<SimBackend>,
    backend: SimBackend,
    /// The pool, blocks.
    pool_blocks: usize,
    used_blocks: usize,
    /// The most blocks ever in use: with a pool sized once, the layers'
    /// high-water mark (see [`Run::engine_step`]).
    peak_blocks: usize,
    /// Tokens the engine's layers hold (written since the last compaction).
    engine_tokens: usize,
    lives: Vec<Live>,
    next_arrival: usize,
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    swapped: VecDeque<usize>,
    report: MethodReport,
    running_sum: f64,
    swap_space: u64,
    denied_at: Option<(usize, u64)>,
    largest_pool: usize,
}

impl<'a> Run<'a> {
    fn new(setup: &'a ServingSetup, requests: &[Request], method: Method) -> Result<Self> {
        let backend = SimBackend::new(setup.sim)?;
        let (policy, pool): (Box<dyn Policy>, usize) = match method {
            Method::NoPooling | Method::Swap => (
                Box::new(StaticPolicy::pinned(Plan::all_resident())),
                device_pool_tokens(setup),
            ),
            Method::StaticOffload => {
                let (plan, k) = static_offload_plan(setup, requests)?;
                (Box::new(StaticPolicy::pinned(plan)), k)
            }
            Method::Pie if setup.pie_pool.is_some() => {
                let fixed = setup.pie_pool.as_ref().expect("checked by the guard");
                (
                    Box::new(StaticPolicy::pinned(fixed.plan())),
                    fixed.blocks * BLOCK_TOKENS,
                )
            }
            Method::Pie => {
                let c0 = layer_seconds(setup, &[1], &[]);
                let choice = setup.host.choice;
                let adaptive = AdaptivePolicy::new(AdaptiveConfig {
                    objective: Objective::Speed,
                    link_prior: setup.sim.link_model(),
                    compute_prior_seconds: c0,
                    host: (choice != HostAttention::Never).then(|| setup.host_for(HOST_MODEL_SEQS)),
                    ..AdaptiveConfig::default()
                });
                (
                    Box::new(Placed::new(Box::new(adaptive), choice)),
                    device_pool_tokens(setup),
                )
            }
        };
        if pool < BLOCK_TOKENS {
            return Err(PieError::budget(format!(
                "a device budget of {:.1} MiB holds no block of {BLOCK_TOKENS} tokens; raise it",
                setup.budget_bytes as f64 / MIB
            )));
        }
        let engine = Engine::new(
            backend.clone(),
            setup.specs(),
            EngineOptions {
                capacity: pool,
                device_budget: Some(setup.budget_bytes as usize),
                ..EngineOptions::default()
            },
            policy,
        )?;
        let mut lives: Vec<Live> = requests
            .iter()
            .map(|&req| Live {
                req,
                state: State::Future,
                kv: 0,
                generated: 0,
                blocks: 0,
                first_token: None,
                finished: None,
            })
            .collect();
        lives.sort_by(|a, b| a.req.arrival.total_cmp(&b.req.arrival));
        Ok(Run {
            setup,
            method,
            engine,
            backend,
            pool_blocks: pool / BLOCK_TOKENS,
            used_blocks: 0,
            peak_blocks: 0,
            engine_tokens: 0,
            lives,
            next_arrival: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            swapped: VecDeque::new(),
            report: MethodReport::default(),
            running_sum: 0.0,
            swap_space: 0,
            denied_at: None,
            largest_pool: pool,
        })
    }

    fn now(&self) -> f64 {
        self.backend.stream_clock(COMPUTE)
    }

    fn free_blocks(&self) -> usize {
        self.pool_blocks - self.used_blocks
    }

    fn held_tokens(&self) -> usize {
        self.running.iter().map(|&i| self.lives[i].kv).sum()
    }

    fn arrivals(&mut self) {
        let now = self.now();
        while self.next_arrival < self.lives.len()
            && self.lives[self.next_arrival].req.arrival <= now
        {
            self.lives[self.next_arrival].state = State::Waiting;
            self.waiting.push_back(self.next_arrival);
            self.next_arrival += 1;
        }
    }

    /// Makes the compute stream wait for `tokens` of KV crossing the link
    /// (every layer's share), after the compute issued so far.
    fn swap_copy(&mut self, tokens: usize, to_host: bool) -> Result<()> {
        let bytes = self.setup.token_bytes() as usize * tokens;
        if bytes == 0 {
            return Ok(());
        }
        let b = &self.backend;
        let after = b.new_event()?;
        b.record(&after, COMPUTE)?;
        b.wait(SWAP, &after)?;
        let host = b.alloc_host(bytes)?;
        let dev = b.alloc_device(bytes)?;
        for _ in 0..self.setup.model.layers {
            let (src, dst) = if to_host {
                (Mem::Device(&dev, 0), Mem::Host(&host, 0))
            } else {
                (Mem::Host(&host, 0), Mem::Device(&dev, 0))
            };
            b.copy(SWAP, src, dst, CopyShape::contiguous(bytes))?;
        }
        let done = b.new_event()?;
        b.record(&done, SWAP)?;
        b.wait(COMPUTE, &done)?;
        self.report.swapped_mib += (bytes * self.setup.model.layers) as f64 / MIB;
        Ok(())
    }

    /// Preempts running request `i`: its blocks go back; under `swap` its KV
    /// goes to host memory, otherwise it will be recomputed.
    fn preempt(&mut self, i: usize) -> Result<()> {
        self.running.retain(|&j| j != i);
        self.used_blocks -= self.lives[i].blocks;
        self.lives[i].blocks = 0;
        self.report.preemptions += 1;
        if self.method == Method::Swap {
            let kv = self.lives[i].kv;
            self.swap_copy(kv, true)?;
            self.swap_space += self.setup.token_bytes() * (kv * self.setup.model.layers) as u64;
            self.report.host_kv_mib = self.report.host_kv_mib.max(self.swap_space as f64 / MIB);
            self.lives[i].state = State::Swapped;
            self.swapped.push_back(i);
        } else {
            self.lives[i].kv = 0;
            self.lives[i].state = State::Waiting;
            self.waiting.push_front(i);
        }
        Ok(())
    }

    /// Pie's adaptive expansion: grows the pool by [`EXPANSION`] when the cost
    /// model predicts the grown pool, full, decodes within
    /// [`PIE_STEP_TOLERANCE`] of all-resident under the budget. Returns whether it grew.
    fn try_expand(&mut self) -> Result<bool> {
        if self.method != Method::Pie || self.setup.pie_pool.is_some() {
            return Ok(false);
        }
        let steps = self.report.steps;
        if let Some((k, at)) = self.denied_at {
            if k == self.pool_blocks && steps < at + EXPANSION_RETRY_STEPS {
                return Ok(false);
            }
        }
        // Sequences a full pool would hold, at the running requests' mean length.
        let (sum, n) = if self.running.is_empty() {
            let head = self.waiting.front().map_or(1, |&i| {
                let r = &self.lives[i];
                r.req.prompt + r.generated
            });
            (head, 1)
        } else {
            (self.held_tokens() + self.running.len(), self.running.len())
        };
        let seqs_for =
            |tokens: usize| ((tokens * n) / sum.max(1)).clamp(1, self.setup.limits.max_running);
        // The pool grows exactly as under copy-only pooling: host attention only
        // places pooled layers within it (the engine's adaptive policy). A rule
        // that grew further when host attention predicted more throughput lost
        // up to 7% (parent module docs): its prediction leaves out prefills and preemptions.
        let plan_for = |blocks: usize| {
            let tokens = blocks * BLOCK_TOKENS;
            let inputs = full_pool_inputs(self.setup, tokens, seqs_for(tokens));
            match best_static_plan(&inputs) {
                Ok(c)
                    if c.prediction.step_seconds <= PIE_STEP_TOLERANCE * inputs.compute_total() =>
                {
                    Some(c.plan)
                }
                _ => None,
            }
        };
        // The largest transparent pool up to EXPANSION times this one (the
        // predicted step grows with the pool), by bisection on blocks.
        let least = self.pool_blocks + (self.pool_blocks / MIN_EXPANSION_DIVISOR).max(1);
        let most = ((self.pool_blocks as f64 * EXPANSION).ceil() as usize).max(least);
        let Some(mut plan) = plan_for(least) else {
            self.denied_at = Some((self.pool_blocks, steps));
            return Ok(false);
        };
        let (mut lo, mut hi) = (least, most + 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match plan_for(mid) {
                Some(p) => {
                    lo = mid;
                    plan = p;
                }
                None => hi = mid,
            }
        }
        let grown = lo;
        let tokens = grown * BLOCK_TOKENS;
        // One transition to the grown pool under the plan the cost model chose
        // for it (the adaptive policy takes over from there).
        let t0 = self.now();
        self.engine.resize_with_plan(tokens, plan)?;
        self.report.reconfiguration_ms += (self.now() - t0) * 1e3;
        self.report.reconfigurations += 1;
        self.pool_blocks = grown;
        self.largest_pool = self.largest_pool.max(tokens);
        self.denied_at = None;
        Ok(true)
    }

    /// Room for every running request's next token, preempting the most
    /// recently admitted when blocks run out. Returns whether anything was preempted.
    fn reserve_decodes(&mut self) -> Result<bool> {
        let mut preempted = false;
        let mut k = 0;
        while k < self.running.len() {
            let i = self.running[k];
            let need = blocks_for(self.lives[i].kv + 1) - self.lives[i].blocks;
            let mut own = false;
            while self.free_blocks() < need {
                if self.try_expand()? {
                    continue;
                }
                let victim = *self.running.last().expect("the request itself runs");
                self.preempt(victim)?;
                preempted = true;
                if victim == i {
                    own = true;
                    break;
                }
            }
            if own {
                continue;
            }
            self.used_blocks += need;
            self.lives[i].blocks += need;
            k += 1;
        }
        Ok(preempted)
    }

    /// Admission by free blocks: swapped requests first, then waiting ones,
    /// first come first served. Returns (prefilled requests, swapped-in requests).
    fn admit(&mut self) -> Result<(Vec<usize>, Vec<usize>)> {
        let limits = self.setup.limits;
        let mut swapped_in = Vec::new();
        while let Some(&i) = self.swapped.front() {
            let need = blocks_for(self.lives[i].kv + 1);
            if self.running.len() >= limits.max_running || need > self.free_blocks() {
                break;
            }
            self.swapped.pop_front();
            let kv = self.lives[i].kv;
            self.swap_copy(kv, false)?;
            self.swap_space -= self.setup.token_bytes() * (kv * self.setup.model.layers) as u64;
            self.used_blocks += need;
            self.lives[i].blocks = need;
            self.lives[i].state = State::Running;
            self.running.push(i);
            swapped_in.push(i);
        }
        let mut prefills = Vec::new();
        if !self.swapped.is_empty() {
            return Ok((prefills, swapped_in));
        }
        let mut batched = self.running.len();
        while let Some(&i) = self.waiting.front() {
            let r = &self.lives[i];
            let len = r.req.prompt + r.generated;
            let need = blocks_for(len);
            if self.running.len() >= limits.max_running
                || (batched + len > limits.max_batched_tokens && batched > 0)
            {
                break;
            }
            let reserve = if self.running.is_empty() {
                0
            } else {
                (limits.watermark * self.pool_blocks as f64).ceil() as usize
            };
            if need + reserve > self.free_blocks() {
                if self.try_expand()? {
                    continue;
                }
                break;
            }
            self.waiting.pop_front();
            self.used_blocks += need;
            let live = &mut self.lives[i];
            live.blocks = need;
            live.state = State::Running;
            if live.generated > 0 {
                self.report.recomputed_tokens += len as u64;
            }
            self.running.push(i);
            prefills.push(i);
            batched += len;
        }
        Ok((prefills, swapped_in))
    }

    /// One engine step: every layer computes `compute` seconds and writes
    /// `n_new` tokens (at most `per_sequence` for one sequence).
    fn engine_step(
        &mut self,
        held: usize,
        compute: f64,
        n_new: usize,
        per_sequence: usize,
    ) -> Result<()> {
        let cap = self.engine.capacity();
        self.peak_blocks = self.peak_blocks.max(self.used_blocks);
        // pie-rs's continuous batching (a pool sized once): requests' blocks
        // lie anywhere in the pool, so a layer's valid length is the highest
        // row ever written (the engine's paged high-water mark), which never
        // comes down; it is taken as the most blocks ever in use. The step's
        // rows are written at that mark.
        let paged_rows = self.setup.pie_pool.as_ref().map(|_| {
            let extent = (self.peak_blocks * BLOCK_TOKENS).max(held + n_new).min(cap);
            [(extent - n_new.min(extent), n_new)]
        });
        if paged_rows.is_none()
            && (self.engine_tokens + n_new > cap
                || (self.engine_tokens - held) * 8 > self.engine_tokens)
        {
            // Compaction: freed space is reused by the allocator, so the layers'
            // valid prefix keeps it until more than 1/8 of it is free.
            for l in 0..self.setup.model.layers {
                self.engine.set_seq_len(l, held)?;
            }
            self.engine_tokens = held;
        }
        let tb = self.setup.token_bytes();
        for l in 0..self.setup.model.layers {
            self.engine.layer_begin(l, COMPUTE)?;
            match self.engine.layer_ready_at(l, COMPUTE)? {
                LayerKv::Device(_) => self.backend.compute(COMPUTE, compute)?,
                LayerKv::Host(_) => {
                    // The round trip over the KV the running requests hold (the
                    // batch's new tokens are attended on the device), for every
                    // row of the batch.
                    let round_trip = self
                        .setup
                        .host_for(n_new)
                        .layer_seconds(&self.setup.sim.link_model(), tb * held as u64);
                    self.backend.compute(COMPUTE, compute + round_trip)?;
                    self.report.host_ms += round_trip * 1e3;
                }
            }
            // A host-attended layer's new tokens go to its host arena (the
            // engine queues no write-back for it; see crate::simulate's docs).
            if let Some(rows) = &paged_rows {
                self.engine.layer_written_ranges(l, rows, COMPUTE)?;
            } else {
                self.engine
                    .layer_written_batch(l, n_new, per_sequence, COMPUTE)?;
            }
            self.engine.layer_done(l, COMPUTE)?;
        }
        self.engine.flush_telemetry()?;
        self.engine_tokens = match &paged_rows {
            Some(rows) => self.engine_tokens.max(rows[0].0 + n_new),
            None => self.engine_tokens + n_new,
        };
        Ok(())
    }

    /// Runs every request to the end; `None` as soon as the run would take
    /// longer than `max_makespan` seconds of virtual time.
    fn run(mut self, max_makespan: f64) -> Result<Option<MethodReport>> {
        let total = self.lives.len();
        let start = self.lives.first().map_or(0.0, |l| l.req.arrival);
        let mut finished = 0;
        while finished < total {
            if self.now() - start > max_makespan {
                return Ok(None);
            }
            self.arrivals();
            let t0 = self.now();
            let reconfiguring = self.report.reconfiguration_ms;
            let preempted = self.reserve_decodes()?;
            let decoding: Vec<usize> = self.running.clone();
            let (prefills, swapped_in) = if preempted {
                (Vec::new(), Vec::new())
            } else {
                self.admit()?
            };
            let decoding: Vec<usize> = decoding
                .into_iter()
                .filter(|i| self.lives[*i].state == State::Running)
                .chain(swapped_in.iter().copied())
                .collect();
            if decoding.is_empty() && prefills.is_empty() {
                if self.next_arrival < total {
                    let gap = self.lives[self.next_arrival].req.arrival - self.now();
                    self.backend.compute(COMPUTE, gap.max(0.0))?;
                    continue;
                }
                return Err(PieError::internal(format!(
                    "the serving scheduler stalled with {} waiting and {} swapped requests and nothing running",
                    self.waiting.len(),
                    self.swapped.len()
                )));
            }
            // Tokens held before this step's writes (swapped-in KV is written now).
            let held: usize = decoding
                .iter()
                .filter(|i| !swapped_in.contains(i))
                .map(|&i| self.lives[i].kv)
                .sum();
            let decode_kv: Vec<usize> = decoding.iter().map(|&i| self.lives[i].kv + 1).collect();
            let prefill_len: Vec<usize> = prefills
                .iter()
                .map(|&i| self.lives[i].req.prompt + self.lives[i].generated)
                .collect();
            let swapped_tokens: usize = swapped_in.iter().map(|&i| self.lives[i].kv).sum();
            let compute = layer_seconds(self.setup, &decode_kv, &prefill_len);
            let n_new = decode_kv.len() + prefill_len.iter().sum::<usize>() + swapped_tokens;
            let per_sequence = prefill_len
                .iter()
                .copied()
                .chain(swapped_in.iter().map(|&i| self.lives[i].kv + 1))
                .max()
                .unwrap_or(1)
                .max(1);
            let plan_changes = Counters::get(&self.engine.counters().plan_changes);
            self.engine_step(held, compute, n_new, per_sequence)?;
            let now = self.now();
            self.report.reconfigurations +=
                Counters::get(&self.engine.counters().plan_changes) - plan_changes;
            // Beyond compute: prefetch stalls, swaps, compactions, plan
            // switches (pool resizes are counted apart).
            let resizing = (self.report.reconfiguration_ms - reconfiguring) * 1e-3;
            self.report.stall_ms +=
                ((now - t0) - resizing - compute * self.setup.model.layers as f64).max(0.0) * 1e3;
            self.report.steps += 1;
            let batch = decoding.len() + prefills.len();
            self.report.peak_running = self.report.peak_running.max(batch);
            self.running_sum += batch as f64;
            self.report.emitted_tokens += batch as u64;
            // Tokens: every decoding request appended its last token's KV and
            // emitted one; every prefill wrote its tokens and emitted one.
            for &i in &decoding {
                self.lives[i].kv += 1;
                self.lives[i].generated += 1;
            }
            for (&i, &len) in prefills.iter().zip(&prefill_len) {
                let live = &mut self.lives[i];
                live.kv = len;
                live.generated += 1;
                live.first_token.get_or_insert(now);
            }
            let mut k = 0;
            while k < self.running.len() {
                let i = self.running[k];
                let live = &mut self.lives[i];
                if live.generated >= live.req.output {
                    live.state = State::Finished;
                    live.finished = Some(now);
                    self.used_blocks -= live.blocks;
                    live.blocks = 0;
                    self.running.remove(k);
                    finished += 1;
                } else {
                    k += 1;
                }
            }
            self.report.host_kv_mib = self
                .report
                .host_kv_mib
                .max((self.engine.host_bytes() as u64 + self.swap_space) as f64 / MIB);
        }
        self.finish().map(Some)
    }

    fn finish(mut self) -> Result<MethodReport> {
        let mut ttft = Vec::with_capacity(self.lives.len());
        let mut tpot = Vec::with_capacity(self.lives.len());
        let mut e2e = Vec::with_capacity(self.lives.len());
        let (mut first, mut last) = (f64::INFINITY, 0.0f64);
        for live in &self.lives {
            let (Some(t1), Some(tn)) = (live.first_token, live.finished) else {
                return Err(PieError::internal(format!(
                    "request {} never finished",
                    live.req.id
                )));
            };
            if live.generated != live.req.output || live.state != State::Finished {
                return Err(PieError::internal(format!(
                    "request {} generated {} tokens of {}",
                    live.req.id, live.generated, live.req.output
                )));
            }
            first = first.min(live.req.arrival);
            last = last.max(tn);
            ttft.push((t1 - live.req.arrival) * 1e3);
            e2e.push((tn - live.req.arrival) * 1e3);
            if live.req.output > 1 {
                tpot.push((tn - t1) * 1e3 / (live.req.output - 1) as f64);
            }
            self.report.output_tokens += live.req.output as u64;
            self.report.prompt_tokens += live.req.prompt as u64;
        }
        let r = &mut self.report;
        r.finished = self.lives.len();
        r.makespan_s = last - first;
        r.throughput_tok_s = if r.makespan_s > 0.0 {
            r.output_tokens as f64 / r.makespan_s
        } else {
            0.0
        };
        r.ttft_ms_p50 = quantile(&ttft, 0.5);
        r.ttft_ms_p99 = quantile(&ttft, 0.99);
        r.tpot_ms_p50 = quantile(&tpot, 0.5);
        r.tpot_ms_p99 = quantile(&tpot, 0.99);
        r.e2e_ms_p50 = quantile(&e2e, 0.5);
        r.mean_running = if r.steps > 0 {
            self.running_sum / r.steps as f64
        } else {
            0.0
        };
        r.device_kv_mib = Counters::get(&self.engine.counters().peak_device_bytes) as f64 / MIB;
        r.pool_tokens = self.largest_pool;
        let plan = self.engine.plan();
        r.pooled_layers = plan.pooled.len();
        r.prefetch_depth = plan.staging_slots();
        r.host_attended_layers = plan.host_attended.len();
        Ok(self.report.clone())
    }
}

/// Runs `requests` through the scheduler with `method` on `setup`'s machine.
pub fn run_method(
    setup: &ServingSetup,
    requests: &[Request],
    method: Method,
) -> Result<MethodReport> {
    Run::new(setup, requests, method)?
        .run(f64::INFINITY)?
        .ok_or_else(|| PieError::internal("a run without a time limit was cut short"))
}

/// [`run_method`], given up (`None`) once the run passes `max_makespan`
/// seconds of virtual time from the first arrival: a throughput search need
/// not finish runs that cannot reach its target.
pub fn run_method_within(
    setup: &ServingSetup,
    requests: &[Request],
    method: Method,
    max_makespan: f64,
) -> Result<Option<MethodReport>> {
    Run::new(setup, requests, method)?.run(max_makespan)
}
