//! The engine's API: what the Python side (or a Rust program) calls around
//! each decoder layer, plus the operations that change data under it (crop,
//! reorder, growth, plan switch, reset) and keep the page table true.
//!
//! Per step, for each engine-managed layer `i` in order:
//! [`Engine::layer_begin`] (the layer starts), [`Engine::layer_ready`] (right
//! before attention writes and reads the KV: the compute stream waits for a
//! pooled layer's prefetch), [`Engine::layer_written`] (new tokens written into
//! the slot; a pooled layer queues a write-back of just those tokens), and
//! [`Engine::layer_done`] (the staging slot goes back to the FIFO and the next
//! prefetch in execution order is queued into it). The last layer's
//! `layer_done` ends the step; pending plans apply at the next step's start.
//!
//! Which swap operation comes when is decided by the pure [`Schedule`]; the
//! engine only submits what it says and keeps the threads in step. Where a
//! layer's bytes are is the arena layout's answer ([`crate::slots::ArenaLayout::residence`]),
//! its valid length the page table's.

mod paged;
mod transition;

use crate::backend::{Backend, CopyShape, Mem, Stream};
use crate::error::{PieError, Result};
use crate::fit::{budget_plan, check_budget, check_shapes, grown_capacity};
use crate::layout::LayerSpec;
use crate::plan::Plan;
use crate::policy::{Policy, PolicyContext};
use crate::primitive::{JoinHandle, Ordering, ThreadBuilder};
use crate::reorder::Move;
use crate::schedule::{Ready, Schedule, SwapOp};
pub use crate::shared::Arenas;
use crate::shared::Shared;
use crate::slots::Residence;
use crate::telemetry::{Counters, StepRecord, StepSample, TIMING_SETS};
use crate::wake::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a layer's KV is for this step's attention ([`Engine::layer_ready_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKv {
    /// At this byte offset in the device arena (a resident slot or a staging
    /// slot the layer's prefetch landed in).
    Device(usize),
    /// At this byte offset in the host arena: the layer is host-attended
    /// under the plan in force, and its KV never moves to the device.
    Host(usize),
}

/// Options of an engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Tokens each layer can hold before it must grow.
    pub capacity: usize,
    /// Device bytes the engine's arena may use; `None` for no limit.
    pub device_budget: Option<usize>,
    /// How long the caller may wait for the swapper before reporting a hang.
    pub wait_timeout: Duration,
    /// Every how many steps one is timed for the policy (at least 1). Timing
    /// costs event records on the caller's thread; the simulator times every step.
    pub timing_every: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            capacity: 256,
            device_budget: None,
            wait_timeout: Duration::from_secs(30),
            timing_every: crate::telemetry::TIMING_EVERY,
        }
    }
}

/// The caller's end of the swap FIFO: pushes what the schedule emits (a push
/// wakes the swapper if it sleeps, [`crate::wake`]).
struct Submitter<B: Backend> {
    shared: Arc<Shared<B>>,
    fifo: Sender<SwapOp>,
    swapper: Option<JoinHandle<()>>,
    /// Operations pushed over the engine's life.
    pushed: u64,
    wait_timeout: Duration,
}

impl<B: Backend> Submitter<B> {
    fn push(&mut self, op: SwapOp) -> Result<()> {
        let mut op = op;
        let deadline = Instant::now() + self.wait_timeout;
        loop {
            match self.fifo.push(op) {
                Ok(()) => break,
                Err(back) => {
                    op = back;
                    self.shared.health.check()?;
                    if Instant::now() > deadline {
                        return Err(hang(
                            &self.shared,
                            self.wait_timeout,
                            "the swap FIFO stayed full",
                        ));
                    }
                    std::thread::yield_now();
                }
            }
        }
        self.pushed += 1;
        Ok(())
    }

    /// Pushes every op `f` emits, stopping at the first failure.
    fn emit_all(&mut self, f: impl FnOnce(&mut dyn FnMut(SwapOp))) -> Result<()> {
        let mut result = Ok(());
        f(&mut |op| {
            if result.is_ok() {
                result = self.push(op);
            }
        });
        result
    }
}

/// Stops the engine after a wait ran out, and says so.
fn hang<B: Backend>(shared: &Shared<B>, timeout: Duration, what: &str) -> PieError {
    shared.health.poison(PieError::backend("swapper", what));
    PieError::backend(
        "swapper",
        format!("{what} for {timeout:?}: the copy engine is stuck; the pool was stopped"),
    )
}

/// The pie-rs engine over backend `B`.
pub struct Engine<B: Backend> {
    shared: Arc<Shared<B>>,
    submit: Submitter<B>,
    telemetry: Sender<StepRecord>,
    schedule: Schedule,
    /// Step records pushed to the policy thread.
    records_pushed: u64,
    /// Engine-wide step number of the current (or next) step.
    step: u64,
    in_step: bool,
    step_complete: bool,
    /// The most tokens any layer received in the current step.
    step_tokens: usize,
    /// Last layer that began in this step.
    cursor: Option<usize>,
    generation: u64,
    policy: Option<JoinHandle<()>>,
    wait_timeout: Duration,
}

impl<B: Backend> Engine<B> {
    /// Creates an engine for `specs` (one per engine-managed layer), laying out
    /// arenas for the plan `policy` starts from under the budget; `policy` then
    /// runs on the engine's policy thread (see [`crate::policy`] for the contract).
    pub fn new(
        backend: B,
        specs: Vec<LayerSpec>,
        options: EngineOptions,
        mut policy: Box<dyn Policy>,
    ) -> Result<Self> {
        check_shapes(&specs, options.capacity)?;
        let n = specs.len();
        // Nothing is held yet: plan for layers filled to capacity, the most a
        // prefetch will have to hide before the cache grows.
        let ctx = PolicyContext {
            specs: &specs,
            capacity: options.capacity,
            seq_lens: &vec![options.capacity; n],
            device_budget: options.device_budget,
        };
        let plan = policy.initial_plan(&ctx)?;
        plan.validate(n)?;
        check_budget(&specs, options.capacity, &plan, options.device_budget)?;
        let shared = Arc::new(Shared::new(
            backend,
            specs,
            plan.clone(),
            options.capacity,
            options.device_budget,
            options.timing_every,
        )?);
        let (fifo, fifo_rx) = wake::channel(4 * n + 64);
        let (telemetry, telemetry_rx) = wake::channel(4 * TIMING_SETS);
        let sw = shared.clone();
        let swapper = ThreadBuilder::new()
            .name("pie-swapper".into())
            .spawn(move || crate::swapper::run(&sw, fifo_rx))
            .map_err(|e| PieError::backend("spawn swapper thread", e))?;
        let pol = shared.clone();
        let policy = ThreadBuilder::new()
            .name("pie-policy".into())
            .spawn(move || crate::policy_thread::run(&pol, telemetry_rx, policy))
            .map_err(|e| PieError::backend("spawn policy thread", e))?;
        let fifo = fifo.bind(swapper.thread().clone());
        let telemetry = telemetry.bind(policy.thread().clone());
        let plan = Arc::new(plan);
        let mut engine = Engine {
            schedule: Schedule::new(plan.clone(), n),
            submit: Submitter {
                shared: shared.clone(),
                fifo,
                swapper: Some(swapper),
                pushed: 0,
                wait_timeout: options.wait_timeout,
            },
            shared,
            telemetry,
            records_pushed: 0,
            step: 0,
            in_step: false,
            step_complete: false,
            step_tokens: 0,
            cursor: None,
            generation: 0,
            policy: Some(policy),
            wait_timeout: options.wait_timeout,
        };
        engine.transition(&plan, options.capacity)?;
        Ok(engine)
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.shared.backend
    }

    /// Number of engine-managed layers.
    pub fn num_layers(&self) -> usize {
        self.shared.specs.len()
    }

    /// Layer shapes.
    pub fn specs(&self) -> &[LayerSpec] {
        &self.shared.specs
    }

    /// Tokens each layer can hold.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Whether the next step begins with an arena rebuild (a pending plan):
    /// callers holding zero-copy views should drop them first, so the old
    /// arena is freed before the new one is allocated.
    pub fn will_rebuild(&self) -> bool {
        self.shared
            .plans
            .pending
            .load()
            .as_ref()
            .is_some_and(|p| **p != **self.schedule.plan())
    }

    /// Bumped whenever the arenas are reallocated or slots move: device and host
    /// addresses taken before are invalid.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The plan in force.
    pub fn plan(&self) -> Arc<Plan> {
        self.schedule.plan().clone()
    }

    /// The current arenas (device and host buffers and their layout).
    pub fn arenas(&self) -> Arc<Arenas<B>> {
        self.shared
            .arenas
            .load_full()
            .expect("arenas exist from construction until close")
    }

    /// Running totals.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Valid tokens of `layer`.
    pub fn seq_len(&self, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        Ok(self.shared.page_table.seq_len(layer))
    }

    /// Where `layer` lives.
    pub fn residence(&self, layer: usize) -> Result<Residence> {
        self.check_layer(layer)?;
        Ok(self.arenas().layout.residence(layer))
    }

    fn check(&self) -> Result<()> {
        self.shared.health.check()
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.num_layers() {
            Err(PieError::config(format!(
                "layer {layer} is out of range; the engine manages {} layers",
                self.num_layers()
            )))
        } else {
            Ok(())
        }
    }

    fn hang(&self, what: &str) -> PieError {
        hang(&self.shared, self.wait_timeout, what)
    }

    /// Waits until the swapper has processed every pushed op, then until every
    /// copy completed. Afterwards host buffers of pooled layers are authoritative.
    pub fn quiesce(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.wait_timeout;
        while self.shared.swapper.ops_done.load(Ordering::Acquire) < self.submit.pushed {
            self.check()?;
            if Instant::now() > deadline {
                return Err(self.hang("the swapper did not drain its queue"));
            }
            // No wake-up needed: every push woke the swapper, and it sleeps
            // only on an empty FIFO (`wake`).
            std::thread::yield_now();
        }
        self.shared.backend.synchronize_queues()?;
        self.check()
    }

    /// Ends a quiesce: staging contents are treated as stale and pooled layers
    /// are fetched again before they run.
    pub fn resume(&mut self) -> Result<()> {
        self.check()?;
        self.schedule.invalidate();
        if self.in_step {
            // The step goes on after the caller mutated data: restart the
            // schedule at the next pooled layer of this step.
            self.restart_mid_step()?;
        }
        Ok(())
    }

    /// Primes a new schedule epoch from the current layer of a step in progress
    /// (after the copy queues drained and the data or the arenas changed).
    fn restart_mid_step(&mut self) -> Result<()> {
        let from = self.cursor.unwrap_or(0);
        let (schedule, step) = (&mut self.schedule, self.step);
        self.submit
            .emit_all(|emit| schedule.restart_from(from, step, &mut |op| emit(op)))
    }

    /// `layer` starts: layer 0 begins a step (applying a pending plan); every
    /// layer records its start for telemetry.
    pub fn layer_begin(&mut self, layer: usize, stream: Stream) -> Result<()> {
        self.check()?;
        self.check_layer(layer)?;
        if layer == 0 {
            if self.in_step {
                // The previous step never finished (an exception or interrupt
                // between layers): drop its prefetches and start clean.
                self.abort_step()?;
            }
            self.begin_step()?;
        } else if !self.in_step {
            // A forward that does not start at layer 0 (or after an abort): run
            // it as a step of its own, fetching from this layer on.
            self.begin_step()?;
            self.step_complete = false;
        }
        self.cursor = Some(layer);
        let (schedule, step) = (&mut self.schedule, self.step);
        self.submit
            .emit_all(|emit| schedule.begin(layer, step, &mut |op| emit(op)))?;
        match self.shared.timing_set(self.step) {
            Some(set) => self.shared.backend.record(&set.begin[layer], stream),
            None => Ok(()),
        }
    }

    fn begin_step(&mut self) -> Result<()> {
        self.in_step = true;
        self.step_tokens = 0;
        self.step_complete = true;
        self.cursor = None;
        self.shared.caller.step.store(self.step, Ordering::Release);
        // The swapper records prefetches that wrap into the next step during
        // this one: that step's byte counters start now, not when it begins.
        if let Some(set) = self.shared.timing_set(self.step + 1) {
            set.reset_counters();
        }
        if let Some(plan) = self.shared.plans.pending.swap(None) {
            if *plan != **self.schedule.plan() {
                let cap = self.capacity();
                self.transition(&plan, cap)?;
                Counters::add(&self.shared.counters.plan_changes, 1);
            }
        }
        Ok(())
    }

    fn abort_step(&mut self) -> Result<()> {
        self.quiesce()?;
        self.schedule.invalidate();
        self.schedule.end_step();
        self.in_step = false;
        self.step += 1;
        Ok(())
    }

    /// Called right before `layer`'s attention writes and reads its KV: makes
    /// `stream` wait (device-side) for a pooled layer's prefetch. Returns the
    /// byte offset of the layer's KV in the device arena, valid for this step.
    /// A host-attended layer has none: use [`Engine::layer_ready_at`].
    pub fn layer_ready(&mut self, layer: usize, stream: Stream) -> Result<usize> {
        match self.layer_ready_at(layer, stream)? {
            LayerKv::Device(offset) => Ok(offset),
            LayerKv::Host(_) => Err(PieError::state(format!(
                "layer {layer} is attended on the host under this plan: its KV stays in host memory and has no device offset (use layer_ready_at)"
            ))),
        }
    }

    /// [`Engine::layer_ready`] for any layer: where `layer`'s KV is for this
    /// step's attention. A host-attended layer ([`Plan::host_attended`]) is
    /// never copied: its answer is its offset in the host arena, where the
    /// caller appends the step's new tokens itself (on the host backend a
    /// memcpy; on a device, a device-to-host copy that completes before the
    /// caller calls [`Engine::layer_written`]) and attends over the valid ones
    /// in place. Nothing is queued for it, so nothing else writes there during
    /// the step: transitions quiesce, and only copied layers have swap ops.
    pub fn layer_ready_at(&mut self, layer: usize, stream: Stream) -> Result<LayerKv> {
        self.check()?;
        self.check_layer(layer)?;
        let (slot, target) = match self.schedule.ready(layer) {
            Ready::Resident => {
                return match self.arenas().layout.residence(layer) {
                    Residence::Resident { device_offset } => Ok(LayerKv::Device(device_offset)),
                    Residence::Pooled { .. } => Err(PieError::internal(format!(
                        "layer {layer} is pooled in the arena layout but resident in the plan"
                    ))),
                };
            }
            _ if !self.in_step => {
                return Err(PieError::state(format!(
                    "layer_ready({layer}) outside a step; call layer_begin first"
                )));
            }
            Ready::HostAttended => {
                return match self.arenas().layout.residence(layer) {
                    Residence::Pooled { host_offset } => {
                        Counters::add(&self.shared.counters.host_attended_layer_steps, 1);
                        Ok(LayerKv::Host(host_offset))
                    }
                    Residence::Resident { .. } => Err(PieError::internal(format!(
                        "layer {layer} is host-attended in the plan but resident in the arena layout"
                    ))),
                };
            }
            Ready::Staged { slot, prefetch } => (slot, prefetch),
            Ready::OutOfOrder => {
                // A layer skipped or repeated: drain, then restart the schedule here.
                self.quiesce()?;
                self.step_complete = false;
                let (schedule, step) = (&mut self.schedule, self.step);
                self.submit
                    .emit_all(|emit| schedule.restart_at(layer, step, &mut |op| emit(op)))?;
                match self.schedule.ready(layer) {
                    Ready::Staged { slot, prefetch } => (slot, prefetch),
                    other => {
                        return Err(PieError::internal(format!(
                            "the schedule restarted at pooled layer {layer} but answers {other:?}"
                        )))
                    }
                }
            }
        };
        // The prefetch was pushed, and a push leaves the swapper awake until
        // it has popped it (`wake`): waiting needs no wake-up, only a bound in
        // case the copy engine hangs.
        let deadline = Instant::now() + self.wait_timeout;
        let mut spins = 0u32;
        while self
            .shared
            .swapper
            .prefetches_issued
            .load(Ordering::Acquire)
            < target
        {
            self.check()?;
            spins += 1;
            if spins > 256 {
                if Instant::now() > deadline {
                    return Err(self.hang("a prefetch was never issued"));
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        self.check()?;
        if !self.shared.page_table.prefetch_hit(layer) {
            if let Some(set) = self.shared.timing_set(self.step) {
                self.shared.backend.record(&set.wait_start[layer], stream)?;
            }
            self.shared
                .backend
                .wait(stream, &self.shared.events.ready[layer])?;
        }
        Ok(LayerKv::Device(self.arenas().layout.staging[slot]))
    }

    /// Records that `n_new` tokens were written right after the valid ones of
    /// `layer` (on `stream`); a pooled layer queues a write-back of just those
    /// tokens. Returns the new length.
    pub fn layer_written(&mut self, layer: usize, n_new: usize, stream: Stream) -> Result<usize> {
        self.check()?;
        self.check_layer(layer)?;
        let start = self.shared.page_table.seq_len(layer);
        let cap = self.capacity();
        if start + n_new > cap {
            return Err(PieError::config(format!(
                "layer {layer} would hold {} tokens but its capacity is {cap}; call ensure_capacity first",
                start + n_new
            )));
        }
        let write_back = self
            .schedule
            .written(layer, start, n_new, self.step)
            .map_err(|()| PieError::state(format!("layer_written({layer}) before layer_ready")))?;
        self.shared.page_table.set_seq_len(layer, start + n_new);
        self.step_tokens = self.step_tokens.max(n_new);
        if let Some(op) = write_back {
            self.shared
                .backend
                .record(&self.shared.events.written[layer], stream)?;
            self.submit.push(op)?;
        }
        Ok(start + n_new)
    }

    /// [`Engine::layer_written`] for a batch of sequences laid end to end in the
    /// layer (a paged cache seen as one sequence): `n_new` tokens in all, at
    /// most `per_sequence` of them for any one sequence. The policy thread
    /// tells decode steps from prefills by the latter, so a step in which every
    /// sequence gained one token is measured as a decode step.
    pub fn layer_written_batch(
        &mut self,
        layer: usize,
        n_new: usize,
        per_sequence: usize,
        stream: Stream,
    ) -> Result<usize> {
        let before = self.step_tokens;
        let len = self.layer_written(layer, n_new, stream)?;
        self.step_tokens = before.max(per_sequence.min(n_new));
        Ok(len)
    }

    /// `layer`'s compute is done: a pooled layer's staging slot goes back to
    /// the FIFO and the next prefetch is queued into it. The last layer ends the step.
    pub fn layer_done(&mut self, layer: usize, stream: Stream) -> Result<()> {
        self.check()?;
        self.check_layer(layer)?;
        if !self.in_step {
            return Err(PieError::state(format!(
                "layer_done({layer}) outside a step; call layer_begin first"
            )));
        }
        if self.schedule.slot_of(layer).is_some() {
            self.shared
                .backend
                .record(&self.shared.events.done[layer], stream)?;
            let schedule = &mut self.schedule;
            self.submit
                .emit_all(|emit| schedule.done(layer, &mut |op| emit(op)))?;
        }
        if layer + 1 == self.num_layers() {
            self.end_step(stream)?;
        }
        Ok(())
    }

    fn end_step(&mut self, stream: Stream) -> Result<()> {
        if let Some(set) = self.shared.timing_set(self.step) {
            self.shared
                .backend
                .record(&set.begin[self.num_layers()], stream)?;
            let record = StepRecord {
                step: self.step,
                plan: self.schedule.plan().clone(),
                ops_pushed: self.submit.pushed,
                complete: self.step_complete,
                new_tokens: self.step_tokens,
            };
            // A full ring means the policy thread lags: drop the sample, never
            // block. A push wakes the policy thread.
            if self.telemetry.push(record).is_ok() {
                self.records_pushed += 1;
            }
        }
        Counters::add(&self.shared.counters.steps, 1);
        self.in_step = false;
        self.cursor = None;
        self.schedule.end_step();
        self.step += 1;
        Ok(())
    }

    /// Crops `layer` to `tokens` tokens (never grows it).
    pub fn set_seq_len(&mut self, layer: usize, tokens: usize) -> Result<()> {
        self.check()?;
        self.check_layer(layer)?;
        let cur = self.shared.page_table.seq_len(layer);
        if tokens > cur {
            return Err(PieError::config(format!(
                "cannot set layer {layer} to {tokens} tokens: it holds {cur}; only cropping is allowed"
            )));
        }
        self.quiesce()?;
        self.shared.page_table.set_seq_len(layer, tokens);
        self.resume()
    }

    /// Reorders the batch of every layer as beam search does: afterwards
    /// sequence `b` holds what sequence `idx[b]` held. Moves, in place where
    /// each layer's KV is now (its device slot, or its host buffer if pooled),
    /// only the valid tokens of the sequences that change, as planned by
    /// [`crate::reorder::moves`]. The copies run on `stream` (the compute
    /// stream, so they follow the compute that wrote the KV; on the host
    /// backend the caller's thread), and the call returns once they are done.
    pub fn reorder(&mut self, idx: &[usize], stream: Stream) -> Result<()> {
        self.check()?;
        for (l, spec) in self.shared.specs.iter().enumerate() {
            if idx.len() != spec.batch || idx.iter().any(|&i| i >= spec.batch) {
                return Err(PieError::config(format!(
                    "reorder indices {idx:?} do not fit layer {l}'s batch of {}; give one index in 0..{} per sequence",
                    spec.batch, spec.batch
                )));
            }
        }
        let (moves, slots) = crate::reorder::moves(idx);
        if moves.is_empty() {
            return Ok(());
        }
        self.quiesce()?;
        let arenas = self.arenas();
        let cap = arenas.layout.capacity;
        let b = &self.shared.backend;
        let specs = &self.shared.specs;
        let lens: Vec<usize> = (0..specs.len())
            .map(|l| self.shared.page_table.seq_len(l))
            .collect();
        // A scratch slot holds one sequence's valid K then V, densely.
        let slot_bytes = specs
            .iter()
            .zip(&lens)
            .map(|(s, &n)| s.kv_heads * n * (s.k_token_bytes() + s.v_token_bytes()))
            .max()
            .unwrap_or(0);
        let scratch = if slots > 0 && slot_bytes > 0 {
            Some(b.alloc_host(slots * slot_bytes)?)
        } else {
            None
        };
        for (l, spec) in specs.iter().enumerate() {
            let n = lens[l];
            if n == 0 {
                continue;
            }
            let (on_device, off) = match (arenas.layout.device_slot[l], arenas.layout.host_slot[l])
            {
                (Some(d), _) => (true, d),
                (None, Some(h)) => (false, h),
                (None, None) => unreachable!("every layer is resident or pooled"),
            };
            let layer = |o: usize| {
                if on_device {
                    Mem::Device(&*arenas.device, off + o)
                } else {
                    Mem::Host(&*arenas.host, off + o)
                }
            };
            let heads = spec.kv_heads;
            // (block offset in the layer, bytes per token, offset in a scratch slot)
            let blocks = [
                (0, spec.k_token_bytes(), 0),
                (
                    spec.v_offset(cap),
                    spec.v_token_bytes(),
                    heads * n * spec.k_token_bytes(),
                ),
            ];
            for (block, tok, in_slot) in blocks {
                let (width, pitch) = (n * tok, cap * tok);
                let seq = |s: usize| layer(block + s * heads * pitch);
                let shape = |src_pitch, dst_pitch| {
                    CopyShape {
                        width,
                        height: heads,
                        src_pitch,
                        dst_pitch,
                    }
                    .normalized()
                };
                for &m in &moves {
                    let at = |k: usize| -> Result<Mem<'_, B>> {
                        let s = scratch.as_ref().ok_or_else(|| {
                            PieError::internal("the reorder scratch buffer is missing")
                        })?;
                        Ok(Mem::Host(s, k * slot_bytes + in_slot))
                    };
                    let (src, dst, shape) = match m {
                        Move::Save { src, slot } => (seq(src), at(slot)?, shape(pitch, width)),
                        Move::Copy { src, dst } => (seq(src), seq(dst), shape(pitch, pitch)),
                        Move::Restore { slot, dst } => (at(slot)?, seq(dst), shape(width, pitch)),
                    };
                    b.copy(stream, src, dst, shape)?;
                }
            }
        }
        let done = b.new_event()?;
        b.record(&done, stream)?;
        b.synchronize(&done)?;
        drop(scratch);
        drop(arenas);
        self.resume()
    }

    /// Grows every layer to hold at least `tokens` tokens. The engine decides
    /// the new capacity, the one rule of growth ([`crate::fit::grown_capacity`]):
    /// at least double the current one and at least `tokens`, rounded up to a
    /// multiple of [`crate::fit::CAPACITY_QUANTUM`], so token-by-token growth
    /// is amortized; read [`Engine::capacity`] for what it chose. Where that
    /// would overflow, exactly `tokens`. Returns whether arenas were rebuilt.
    pub fn ensure_capacity(&mut self, tokens: usize) -> Result<bool> {
        self.check()?;
        let cap = self.capacity();
        if tokens <= cap {
            return Ok(false);
        }
        let new_cap = grown_capacity(cap, tokens);
        // Doubling may overflow where `tokens` itself does not: fall back to it.
        let new_cap = if crate::slots::check_capacity(&self.shared.specs, new_cap).is_ok() {
            new_cap
        } else {
            tokens
        };
        self.resize(new_cap)?;
        Ok(true)
    }

    /// Rebuilds the arenas at `capacity` tokens (growth or shrink), keeping
    /// every valid token. The plan is re-derived if it no longer fits the budget.
    pub fn resize(&mut self, capacity: usize) -> Result<()> {
        self.check()?;
        self.check_new_capacity(capacity)?;
        let mut plan = (**self.schedule.plan()).clone();
        if check_budget(
            &self.shared.specs,
            capacity,
            &plan,
            self.shared.device_budget,
        )
        .is_err()
        {
            // Mandatory expansion: the current plan no longer fits.
            plan = budget_plan(
                &self.shared.specs,
                capacity,
                self.shared.device_budget,
                plan.prefetch_depth
                    .max(crate::policy::DEFAULT_PREFETCH_DEPTH),
            )?;
        }
        self.rebuild(capacity, plan)
    }

    /// Rebuilds the arenas at `capacity` tokens under `plan` in one transition
    /// (a pool that grows and pools more layers at once, as serving expansion
    /// does), keeping every valid token. Errors when `plan` does not fit the
    /// budget at `capacity`.
    pub fn resize_with_plan(&mut self, capacity: usize, plan: Plan) -> Result<()> {
        self.check()?;
        plan.validate(self.num_layers())?;
        self.check_new_capacity(capacity)?;
        self.rebuild(capacity, plan)
    }

    /// Refuses a capacity below the longest layer or beyond the address space.
    fn check_new_capacity(&self, capacity: usize) -> Result<()> {
        let longest = (0..self.num_layers())
            .map(|l| self.shared.page_table.seq_len(l))
            .max()
            .unwrap_or(0);
        if capacity < longest.max(1) {
            return Err(PieError::config(format!(
                "capacity {capacity} is smaller than the {longest} tokens held; crop first"
            )));
        }
        crate::slots::check_capacity(&self.shared.specs, capacity)
    }

    /// Moves to `plan` at `capacity` now, mid-step if need be (the rest of the
    /// step is fetched again).
    fn rebuild(&mut self, capacity: usize, plan: Plan) -> Result<()> {
        let was_in_step = self.in_step;
        self.transition(&Arc::new(plan), capacity)?;
        if was_in_step {
            self.step_complete = false;
            self.restart_mid_step()?;
        }
        Ok(())
    }

    /// Pins a plan; it takes effect at the next step boundary.
    pub fn set_plan(&mut self, plan: Plan) -> Result<()> {
        self.check()?;
        plan.validate(self.num_layers())?;
        check_budget(
            &self.shared.specs,
            self.capacity(),
            &plan,
            self.shared.device_budget,
        )?;
        self.shared.plans.pending.store(Some(Arc::new(plan)));
        Ok(())
    }

    /// Predicted bytes one steady-state decode step prefetches under the
    /// current plan at the current lengths (0 when pooled layers stay in their slots).
    pub fn predicted_h2d_bytes_per_step(&self) -> u64 {
        if !self.schedule.swaps_every_step() {
            return 0;
        }
        self.schedule
            .pooled()
            .iter()
            .map(|&l| self.shared.specs[l].valid_bytes(self.shared.page_table.seq_len(l)) as u64)
            .sum()
    }

    /// Empties every layer (a new sequence), keeping the arenas and what the
    /// policy learned.
    pub fn reset(&mut self) -> Result<()> {
        self.check()?;
        self.quiesce()?;
        for l in 0..self.num_layers() {
            self.shared.page_table.set_seq_len(l, 0);
        }
        self.in_step = false;
        self.cursor = None;
        self.schedule.invalidate();
        Ok(())
    }

    /// A function that makes a stream wait (device-side) for every copy queued
    /// so far on both copy queues: what a DLPack export owes its consumer.
    pub fn stream_sync(&self) -> Arc<dyn Fn(Stream) -> Result<()> + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move |stream| {
            shared.health.check()?;
            let b = &shared.backend;
            for q in [Stream::H2D, Stream::D2H] {
                let ev = b.new_event()?;
                b.record(&ev, q)?;
                b.wait(stream, &ev)?;
            }
            Ok(())
        })
    }

    /// Device bytes the engine's arena holds now.
    pub fn device_bytes(&self) -> usize {
        self.shared
            .arenas
            .load()
            .as_ref()
            .map_or(0, |a| a.layout.device_bytes)
    }

    /// Host bytes the engine's arena holds now.
    pub fn host_bytes(&self) -> usize {
        self.shared
            .arenas
            .load()
            .as_ref()
            .map_or(0, |a| a.layout.host_bytes)
    }

    /// The device budget, if any.
    pub fn device_budget(&self) -> Option<usize> {
        self.shared.device_budget
    }

    /// Total stall, in seconds: measured on the sampled steps (every
    /// [`EngineOptions::timing_every`]-th) and scaled to all steps.
    pub fn stall_seconds(&self) -> f64 {
        let c = &self.shared.counters;
        let timed = Counters::get(&c.timed_steps);
        if timed == 0 {
            return 0.0;
        }
        let measured = Counters::get(&c.stall_ns) as f64 * 1e-9;
        measured * Counters::get(&c.steps) as f64 / timed as f64
    }

    /// Blocks until the policy thread has measured every completed step (tests,
    /// benchmarks and the simulator use it to read settled stats).
    pub fn flush_telemetry(&self) -> Result<()> {
        let deadline = Instant::now() + self.wait_timeout;
        while self.shared.policy.records_done.load(Ordering::Acquire) < self.records_pushed {
            self.check()?;
            if Instant::now() > deadline {
                return Err(PieError::backend(
                    "telemetry",
                    "the policy thread stopped draining its ring",
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// The error that stopped the engine, if any.
    pub fn failure(&self) -> Option<String> {
        self.shared.health.failure()
    }

    /// Stops the threads (joining them) and frees the arenas. Idempotent.
    pub fn close(&mut self) {
        if self.submit.swapper.is_none() && self.policy.is_none() {
            return;
        }
        let _ = self.quiesce();
        // The swapper drains what is left (skipping it once poisoned) before it
        // sees the shutdown flag on an empty FIFO; the notifies wake both
        // threads if they sleep (`wake`).
        self.shared.health.shutdown.store(true, Ordering::Release);
        self.submit.fifo.notify();
        self.telemetry.notify();
        for t in [self.submit.swapper.take(), self.policy.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
        let arenas = self.shared.arenas.swap(None);
        if !self.shared.backend.wait_idle() {
            // A copy may still be running against these buffers (a stuck copy
            // engine): leaking them is the only memory-safe choice.
            std::mem::forget(arenas);
        }
    }

    /// The latest sample the policy thread computed, if any.
    pub fn last_sample(&self) -> Option<StepSample> {
        self.shared.policy.last_sample.lock().clone()
    }
}

impl<B: Backend> Drop for Engine<B> {
    fn drop(&mut self) {
        self.close();
    }
}
