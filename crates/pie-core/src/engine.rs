//! The engine: the per-layer API the Python side (or a Rust program) calls
//! around each decoder layer, plus the transitions (plan switch, growth,
//! quiesce) that keep the page table true.
//!
//! Per step, for each engine-managed layer `i` in order:
//! [`Engine::layer_begin`] (forward pre-hook), [`Engine::layer_ready`] (right
//! before attention writes and reads the KV: the compute stream waits for a
//! pooled layer's prefetch), [`Engine::layer_written`] (new tokens written into
//! the slot; a pooled layer queues a write-back of just those tokens), and
//! [`Engine::layer_done`] (the staging slot goes back to the FIFO and the next
//! prefetch in execution order is queued into it). The last layer's
//! `layer_done` ends the step; pending plans apply at the next step's start.

use crate::backend::{Backend, CopyShape, Mem, Stream};
use crate::error::{PieError, Result};
use crate::fifo::{ring, Producer};
use crate::fit::{budget_plan, check_budget, check_shapes, grown_capacity};
use crate::layout::LayerSpec;
use crate::layout::{align_up, SLOT_ALIGN};
use crate::page_table::{PageTable, Residence};
use crate::plan::Plan;
use crate::policy_driver::{PolicyContext, PolicyDriver};
use crate::primitive::{AtomicBool, AtomicU64, Ordering};
use crate::reorder::Move;
use crate::slots::ArenaLayout;
use crate::swapper::{self, SwapOp};
use crate::telemetry::{Counters, StepRecord, StepSample, TimingSet, TIMING_EVERY, TIMING_SETS};
use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Both arenas and the layout that carves them.
pub struct Arenas<B: Backend> {
    /// Where every slot sits.
    pub layout: ArenaLayout,
    /// The device arena (resident slots, then staging slots). Shared so that
    /// zero-copy views (DLPack) keep the memory alive while they exist.
    pub device: Arc<B::DeviceBuffer>,
    /// The host arena (every layer's backing buffer), shared likewise.
    pub host: Arc<B::HostBuffer>,
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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            capacity: 256,
            device_budget: None,
            wait_timeout: Duration::from_secs(30),
        }
    }
}

/// State shared by the caller, the swapper thread and the policy thread.
pub(crate) struct Shared<B: Backend> {
    pub(crate) backend: B,
    pub(crate) specs: Vec<LayerSpec>,
    pub(crate) page_table: PageTable,
    pub(crate) arenas: ArcSwapOption<Arenas<B>>,
    /// Per layer: its prefetch landed (H2D).
    pub(crate) ready: Vec<B::Event>,
    /// Per layer: its new tokens are written (compute stream).
    pub(crate) written: Vec<B::Event>,
    /// Per layer: its last write-back landed in host memory (D2H).
    pub(crate) written_back: Vec<B::Event>,
    /// Per layer: its compute finished (compute stream).
    pub(crate) done: Vec<B::Event>,
    /// Per staging slot: free again (D2H, after the occupant's write-back).
    pub(crate) slot_freed: Vec<B::Event>,
    pub(crate) timing: Vec<TimingSet<B>>,
    pub(crate) counters: Counters,
    pub(crate) ops_done: AtomicU64,
    pub(crate) prefetches_issued: AtomicU64,
    pub(crate) swapper_sleeping: AtomicBool,
    pub(crate) policy_sleeping: AtomicBool,
    pub(crate) shutdown: AtomicBool,
    pub(crate) poisoned: AtomicBool,
    failure: Mutex<Option<String>>,
    /// A plan published by the policy thread, applied at the next step boundary.
    pub(crate) pending_plan: ArcSwapOption<Plan>,
    /// The plan in force (read by the policy thread).
    pub(crate) current_plan: ArcSwap<Plan>,
    /// Step the caller is in (read by the policy thread to detect lapped timing sets).
    pub(crate) current_step: AtomicU64,
    pub(crate) device_budget: Option<usize>,
    pub(crate) capacity: AtomicU64,
    /// Step records the policy thread has finished with.
    pub(crate) records_done: AtomicU64,
    /// The latest sample the policy thread computed.
    pub(crate) last_sample: Mutex<Option<StepSample>>,
}

impl<B: Backend> Shared<B> {
    /// The timing set of `step`, if the step is one of the sampled ones.
    pub(crate) fn timing_set(&self, step: u64) -> Option<&TimingSet<B>> {
        if !step.is_multiple_of(TIMING_EVERY) {
            return None;
        }
        Some(&self.timing[((step / TIMING_EVERY) % TIMING_SETS as u64) as usize])
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub(crate) fn poison(&self, e: PieError) {
        let mut f = self.failure.lock();
        if f.is_none() {
            *f = Some(e.to_string());
        }
        self.poisoned.store(true, Ordering::Release);
    }

    fn check(&self) -> Result<()> {
        if self.is_poisoned() {
            let why = self.failure.lock().clone().unwrap_or_default();
            Err(PieError::state(format!(
                "the pool stopped after a failure ({why}); its KV may be incomplete: detach and attach again"
            )))
        } else if self.shutdown.load(Ordering::Acquire) {
            Err(PieError::state(
                "the engine is closed; attach again to use pie-rs",
            ))
        } else {
            Ok(())
        }
    }
}

/// Caller-side bookkeeping of the swap pipeline under the current plan.
struct Pipeline {
    plan: Arc<Plan>,
    /// Pooled layers in execution order.
    order: Vec<usize>,
    /// Per layer: its index in `order`.
    pos_of: Vec<Option<usize>>,
    /// Staging slots.
    w: u64,
    /// Steps begun since this pipeline was primed.
    epoch_step: u64,
    /// `seq(step, k) = step * P + k - origin`.
    origin: u64,
    /// Prefetches pushed in this epoch (the next seq to push).
    pushed: u64,
    /// `prefetches_issued` when the epoch started.
    issued_base: u64,
    primed: bool,
}

impl Pipeline {
    fn new(plan: Arc<Plan>, layers: usize) -> Self {
        let mut pos_of = vec![None; layers];
        for (k, &l) in plan.pooled.iter().enumerate() {
            pos_of[l] = Some(k);
        }
        Pipeline {
            order: plan.pooled.clone(),
            pos_of,
            w: plan.staging_slots() as u64,
            plan,
            epoch_step: 0,
            origin: 0,
            pushed: 0,
            issued_base: 0,
            primed: false,
        }
    }

    fn p(&self) -> u64 {
        self.order.len() as u64
    }

    fn layer_of(&self, seq: u64) -> usize {
        self.order[((seq + self.origin) % self.p()) as usize]
    }

    fn seq_of(&self, k: usize) -> Option<u64> {
        (self.epoch_step * self.p() + k as u64).checked_sub(self.origin)
    }

    /// The step (engine-wide) a pipeline seq belongs to.
    fn step_of(&self, seq: u64, step_at_epoch_start: u64) -> u64 {
        step_at_epoch_start + (seq + self.origin) / self.p()
    }
}

/// Where each layer's valid tokens are on the host during a transition.
struct Sources<'a, B: Backend> {
    spill: Option<&'a B::HostBuffer>,
    spill_at: &'a [Option<usize>],
    old_host: Option<(&'a B::HostBuffer, &'a [Option<usize>])>,
    /// Capacity of the layout the sources are in.
    capacity: usize,
}

impl<'a, B: Backend> Sources<'a, B> {
    fn of(&self, l: usize) -> Option<(&'a B::HostBuffer, usize)> {
        match (self.spill_at[l], self.spill, self.old_host) {
            (Some(at), Some(s), _) => Some((s, at)),
            (None, _, Some((h, slots))) => slots[l].map(|at| (h, at)),
            _ => None,
        }
    }
}

impl<B: Backend> Clone for Sources<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Sources<'_, B> {}

/// The arena a transition fills.
#[derive(Clone, Copy)]
enum Target<'a, B: Backend> {
    Device(&'a B::DeviceBuffer),
    Host(&'a B::HostBuffer),
}

/// The pie-rs engine over backend `B`.
pub struct Engine<B: Backend> {
    shared: Arc<Shared<B>>,
    fifo: Producer<SwapOp>,
    telemetry: Producer<StepRecord>,
    pipeline: Pipeline,
    ops_pushed: u64,
    /// Step records pushed to the policy thread.
    records_pushed: u64,
    /// Engine-wide step number of the current (or next) step.
    step: u64,
    /// Engine-wide step at which the current epoch started.
    epoch_start_step: u64,
    in_step: bool,
    step_complete: bool,
    /// The most tokens any layer received in the current step.
    step_tokens: usize,
    /// Last layer that began in this step.
    cursor: Option<usize>,
    generation: u64,
    swapper: Option<JoinHandle<()>>,
    policy: Option<JoinHandle<()>>,
    wait_timeout: Duration,
}

impl<B: Backend> Engine<B> {
    /// Creates an engine for `specs` (one per engine-managed layer), laying out
    /// arenas for the plan `driver` chooses under the budget.
    pub fn new(
        backend: B,
        specs: Vec<LayerSpec>,
        options: EngineOptions,
        mut driver: Box<dyn PolicyDriver>,
    ) -> Result<Self> {
        check_shapes(&specs, options.capacity)?;
        let n = specs.len();
        let ctx = PolicyContext {
            specs: &specs,
            capacity: options.capacity,
            seq_lens: &vec![0; n],
            device_budget: options.device_budget,
        };
        let plan = driver.initial_plan(&ctx)?;
        plan.validate(n)?;
        check_budget(&specs, options.capacity, &plan, options.device_budget)?;
        let evs = |k: usize| {
            (0..k)
                .map(|_| backend.new_event())
                .collect::<Result<Vec<_>>>()
        };
        let timing = (0..TIMING_SETS)
            .map(|_| TimingSet::new(&backend, n))
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            ready: evs(n)?,
            written: evs(n)?,
            written_back: evs(n)?,
            done: evs(n)?,
            slot_freed: evs(n)?,
            timing,
            page_table: PageTable::new(n),
            arenas: ArcSwapOption::empty(),
            counters: Counters::default(),
            ops_done: AtomicU64::new(0),
            prefetches_issued: AtomicU64::new(0),
            swapper_sleeping: AtomicBool::new(false),
            policy_sleeping: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            failure: Mutex::new(None),
            pending_plan: ArcSwapOption::empty(),
            current_plan: ArcSwap::from_pointee(plan.clone()),
            current_step: AtomicU64::new(0),
            device_budget: options.device_budget,
            capacity: AtomicU64::new(options.capacity as u64),
            records_done: AtomicU64::new(0),
            last_sample: Mutex::new(None),
            specs,
            backend,
        });
        let (fifo, fifo_rx) = ring(4 * n + 64);
        let (telemetry, telemetry_rx) = ring(4 * TIMING_SETS);
        let sw = shared.clone();
        let swapper = std::thread::Builder::new()
            .name("pie-swapper".into())
            .spawn(move || swapper::run(&sw, fifo_rx))
            .map_err(|e| PieError::backend("spawn swapper thread", e))?;
        let pol = shared.clone();
        let policy = std::thread::Builder::new()
            .name("pie-policy".into())
            .spawn(move || crate::policy_driver::run(&pol, telemetry_rx, driver))
            .map_err(|e| PieError::backend("spawn policy thread", e))?;
        let plan = Arc::new(plan);
        let mut engine = Engine {
            pipeline: Pipeline::new(plan.clone(), n),
            shared,
            fifo,
            telemetry,
            ops_pushed: 0,
            records_pushed: 0,
            step: 0,
            epoch_start_step: 0,
            in_step: false,
            step_complete: false,
            step_tokens: 0,
            cursor: None,
            generation: 0,
            swapper: Some(swapper),
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
        self.shared.capacity.load(Ordering::Relaxed) as usize
    }

    /// Whether the next step begins with an arena rebuild (a pending plan):
    /// callers holding zero-copy views should drop them first, so the old
    /// arena is freed before the new one is allocated.
    pub fn will_rebuild(&self) -> bool {
        self.shared
            .pending_plan
            .load()
            .as_ref()
            .is_some_and(|p| **p != *self.pipeline.plan)
    }

    /// Bumped whenever the arenas are reallocated or slots move: device and host
    /// addresses taken before are invalid.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The plan in force.
    pub fn plan(&self) -> Arc<Plan> {
        self.pipeline.plan.clone()
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
        Ok(self.shared.page_table.residence(layer))
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

    fn push_op(&mut self, op: SwapOp) -> Result<()> {
        let mut op = op;
        let deadline = Instant::now() + self.wait_timeout;
        loop {
            match self.fifo.push(op) {
                Ok(()) => break,
                Err(back) => {
                    op = back;
                    self.shared.check()?;
                    if Instant::now() > deadline {
                        return Err(self.hang("the swap FIFO stayed full"));
                    }
                    std::thread::yield_now();
                }
            }
        }
        self.ops_pushed += 1;
        if self.shared.swapper_sleeping.load(Ordering::SeqCst) {
            if let Some(t) = &self.swapper {
                t.thread().unpark();
            }
        }
        Ok(())
    }

    fn hang(&self, what: &str) -> PieError {
        let e = PieError::backend(
            "swapper",
            format!(
                "{what} for {:?}: the copy engine is stuck; the pool was stopped",
                self.wait_timeout
            ),
        );
        self.shared.poison(PieError::backend("swapper", what));
        e
    }

    /// Pushes the prefetch with pipeline sequence number `seq`.
    fn push_prefetch(&mut self, seq: u64) -> Result<()> {
        let p = &self.pipeline;
        let layer = p.layer_of(seq);
        let slot = (seq % p.w) as usize;
        let hit = seq >= p.w && p.layer_of(seq - p.w) == layer;
        let step = p.step_of(seq, self.epoch_start_step);
        self.pipeline.pushed = seq + 1;
        self.push_op(SwapOp::Prefetch {
            layer,
            slot,
            step,
            hit,
        })
    }

    /// Starts a new pipeline epoch so that pooled index `k0` of the current
    /// step is the first prefetch, and primes `W` prefetches.
    fn prime(&mut self, k0: usize) -> Result<()> {
        let issued = self.shared.prefetches_issued.load(Ordering::Acquire);
        let p = &mut self.pipeline;
        p.epoch_step = 0;
        p.origin = k0 as u64;
        p.pushed = 0;
        p.issued_base = issued;
        p.primed = true;
        self.epoch_start_step = self.step;
        if p.order.is_empty() {
            return Ok(());
        }
        for seq in 0..p.w {
            self.push_prefetch(seq)?;
        }
        Ok(())
    }

    /// Waits until the swapper has processed every pushed op, then until every
    /// copy completed. Afterwards host buffers of pooled layers are authoritative.
    pub fn quiesce(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.wait_timeout;
        while self.shared.ops_done.load(Ordering::Acquire) < self.ops_pushed {
            self.shared.check()?;
            if Instant::now() > deadline {
                return Err(self.hang("the swapper did not drain its queue"));
            }
            if let Some(t) = &self.swapper {
                t.thread().unpark();
            }
            std::thread::yield_now();
        }
        self.shared.backend.synchronize_queues()?;
        self.shared.check()
    }

    /// Ends a quiesce: staging contents are treated as stale and pooled layers
    /// are fetched again before they run.
    pub fn resume(&mut self) -> Result<()> {
        self.shared.check()?;
        self.pipeline.primed = false;
        if self.in_step {
            // The step goes on after the caller mutated data: restart the
            // pipeline at the next pooled layer of this step.
            let k0 = self.next_pooled_index();
            self.prime(k0)?;
        }
        Ok(())
    }

    fn next_pooled_index(&self) -> usize {
        let from = self.cursor.map_or(0, |c| c);
        self.pipeline
            .order
            .iter()
            .position(|&l| l >= from)
            .unwrap_or(self.pipeline.order.len())
    }

    /// Forward pre-hook of `layer`: layer 0 begins a step (applying a pending
    /// plan); every layer records its start for telemetry.
    pub fn layer_begin(&mut self, layer: usize, stream: Stream) -> Result<()> {
        self.shared.check()?;
        self.check_layer(layer)?;
        if layer == 0 {
            if self.in_step {
                // The previous step never finished (an exception or interrupt
                // between layers): drop its pipeline and start clean.
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
        if !self.pipeline.primed {
            let k0 = self.next_pooled_index();
            self.prime(k0)?;
        }
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
        self.shared.current_step.store(self.step, Ordering::Release);
        if let Some(set) = self.shared.timing_set(self.step) {
            set.reset_counters();
        }
        if let Some(plan) = self.shared.pending_plan.swap(None) {
            if *plan != *self.pipeline.plan {
                let cap = self.capacity();
                self.transition(&plan, cap)?;
                Counters::add(&self.shared.counters.plan_changes, 1);
            }
        }
        Ok(())
    }

    fn abort_step(&mut self) -> Result<()> {
        self.quiesce()?;
        self.pipeline.primed = false;
        self.in_step = false;
        self.pipeline.epoch_step += 1;
        self.step += 1;
        Ok(())
    }

    /// Called right before `layer`'s attention writes and reads its KV: makes
    /// `stream` wait (device-side) for a pooled layer's prefetch. Returns the
    /// byte offset of the layer's KV in the device arena, valid for this step.
    pub fn layer_ready(&mut self, layer: usize, stream: Stream) -> Result<usize> {
        self.shared.check()?;
        self.check_layer(layer)?;
        match self.shared.page_table.residence(layer) {
            Residence::Resident { device_offset } => Ok(device_offset),
            Residence::Pooled => {
                if !self.in_step {
                    return Err(PieError::state(format!(
                        "layer_ready({layer}) outside a step; call layer_begin first"
                    )));
                }
                let k = self.pipeline.pos_of[layer].expect("pooled layers have a position");
                let seq = match self.pipeline.seq_of(k) {
                    Some(s) if s < self.pipeline.pushed => s,
                    _ => {
                        // Out of execution order (a layer skipped or repeated):
                        // restart the pipeline at this layer.
                        self.quiesce()?;
                        self.step_complete = false;
                        self.prime(k)?;
                        0
                    }
                };
                let target = self.pipeline.issued_base + seq + 1;
                let deadline = Instant::now() + self.wait_timeout;
                let mut spins = 0u32;
                while self.shared.prefetches_issued.load(Ordering::Acquire) < target {
                    self.shared.check()?;
                    spins += 1;
                    if spins > 256 {
                        if Instant::now() > deadline {
                            return Err(self.hang("a prefetch was never issued"));
                        }
                        if let Some(t) = &self.swapper {
                            t.thread().unpark();
                        }
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                self.shared.check()?;
                if !self.shared.page_table.prefetch_hit(layer) {
                    if let Some(set) = self.shared.timing_set(self.step) {
                        self.shared.backend.record(&set.wait_start[layer], stream)?;
                    }
                    self.shared
                        .backend
                        .wait(stream, &self.shared.ready[layer])?;
                }
                let slot = (seq % self.pipeline.w) as usize;
                Ok(self.arenas().layout.staging[slot])
            }
        }
    }

    /// Records that `n_new` tokens were written right after the valid ones of
    /// `layer` (on `stream`); a pooled layer queues a write-back of just those
    /// tokens. Returns the new length.
    pub fn layer_written(&mut self, layer: usize, n_new: usize, stream: Stream) -> Result<usize> {
        self.shared.check()?;
        self.check_layer(layer)?;
        let start = self.shared.page_table.seq_len(layer);
        let cap = self.capacity();
        if start + n_new > cap {
            return Err(PieError::config(format!(
                "layer {layer} would hold {} tokens but its capacity is {cap}; call ensure_capacity first",
                start + n_new
            )));
        }
        self.shared.page_table.set_seq_len(layer, start + n_new);
        self.step_tokens = self.step_tokens.max(n_new);
        if self.shared.page_table.residence(layer) == Residence::Pooled && n_new > 0 {
            let k = self.pipeline.pos_of[layer].expect("pooled layers have a position");
            let seq = self.pipeline.seq_of(k).ok_or_else(|| {
                PieError::state(format!("layer_written({layer}) before layer_ready"))
            })?;
            self.shared
                .backend
                .record(&self.shared.written[layer], stream)?;
            let slot = (seq % self.pipeline.w) as usize;
            self.push_op(SwapOp::WriteBack {
                layer,
                slot,
                start,
                n: n_new,
                step: self.step,
            })?;
        }
        Ok(start + n_new)
    }

    /// Forward post-hook of `layer`: a pooled layer's staging slot goes back to
    /// the FIFO and the next prefetch is queued into it. The last layer ends the step.
    pub fn layer_done(&mut self, layer: usize, stream: Stream) -> Result<()> {
        self.shared.check()?;
        self.check_layer(layer)?;
        if !self.in_step {
            return Err(PieError::state(format!(
                "layer_done({layer}) outside a step; call layer_begin first"
            )));
        }
        if self.shared.page_table.residence(layer) == Residence::Pooled {
            let k = self.pipeline.pos_of[layer].expect("pooled layers have a position");
            if let Some(seq) = self
                .pipeline
                .seq_of(k)
                .filter(|s| *s < self.pipeline.pushed)
            {
                let slot = (seq % self.pipeline.w) as usize;
                self.shared
                    .backend
                    .record(&self.shared.done[layer], stream)?;
                self.push_op(SwapOp::Release { layer, slot })?;
                let next = seq + self.pipeline.w;
                if next == self.pipeline.pushed {
                    self.push_prefetch(next)?;
                }
            }
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
                plan: self.pipeline.plan.clone(),
                ops_pushed: self.ops_pushed,
                complete: self.step_complete,
                new_tokens: self.step_tokens,
            };
            // A full ring means the policy thread lags: drop the sample, never block.
            if self.telemetry.push(record).is_ok() {
                self.records_pushed += 1;
            }
            if self.shared.policy_sleeping.load(Ordering::SeqCst) {
                if let Some(t) = &self.policy {
                    t.thread().unpark();
                }
            }
        }
        Counters::add(&self.shared.counters.steps, 1);
        self.in_step = false;
        self.cursor = None;
        self.pipeline.epoch_step += 1;
        self.step += 1;
        Ok(())
    }

    /// Crops `layer` to `tokens` tokens (never grows it).
    pub fn set_seq_len(&mut self, layer: usize, tokens: usize) -> Result<()> {
        self.shared.check()?;
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
        self.shared.check()?;
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
                        let s = scratch
                            .as_ref()
                            .ok_or_else(|| PieError::state("reorder scratch missing"))?;
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
        self.shared.check()?;
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
        self.shared.check()?;
        let longest = (0..self.num_layers())
            .map(|l| self.shared.page_table.seq_len(l))
            .max()
            .unwrap_or(0);
        if capacity < longest.max(1) {
            return Err(PieError::config(format!(
                "capacity {capacity} is smaller than the {longest} tokens held; crop first"
            )));
        }
        crate::slots::check_capacity(&self.shared.specs, capacity)?;
        let mut plan = (*self.pipeline.plan).clone();
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
                plan.prefetch_depth.max(2),
            )?;
        }
        let was_in_step = self.in_step;
        self.transition(&Arc::new(plan), capacity)?;
        if was_in_step {
            let k0 = self.next_pooled_index();
            self.step_complete = false;
            self.prime(k0)?;
        }
        Ok(())
    }

    /// Pins a plan; it takes effect at the next step boundary.
    pub fn set_plan(&mut self, plan: Plan) -> Result<()> {
        self.shared.check()?;
        plan.validate(self.num_layers())?;
        check_budget(
            &self.shared.specs,
            self.capacity(),
            &plan,
            self.shared.device_budget,
        )?;
        self.shared.pending_plan.store(Some(Arc::new(plan)));
        Ok(())
    }

    /// Predicted bytes one steady-state decode step prefetches under the
    /// current plan at the current lengths (0 when pooled layers stay in their slots).
    pub fn predicted_h2d_bytes_per_step(&self) -> u64 {
        let p = &self.pipeline;
        if p.order.is_empty() || p.w >= p.p() {
            return 0;
        }
        p.order
            .iter()
            .map(|&l| self.shared.specs[l].valid_bytes(self.shared.page_table.seq_len(l)) as u64)
            .sum()
    }

    /// Moves every layer to where `plan` wants it at `capacity` tokens: spills
    /// resident layers to host memory, rebuilds the arenas (device arena freed
    /// before the new one is allocated, so the budget holds throughout), and
    /// fills the new resident slots. Costs a full sync; plans change rarely.
    fn transition(&mut self, plan: &Arc<Plan>, capacity: usize) -> Result<()> {
        check_budget(
            &self.shared.specs,
            capacity,
            plan,
            self.shared.device_budget,
        )?;
        self.quiesce()?;
        self.transition_inner(plan, capacity)
    }

    /// Copies the valid tokens of every layer that has a place in `to` from
    /// wherever `from` says they are, relaying out to `to`'s capacity.
    fn fill(&self, from: &Sources<'_, B>, to: Target<'_, B>, layout: &ArenaLayout) -> Result<()> {
        let b = &self.shared.backend;
        for (l, spec) in self.shared.specs.iter().enumerate() {
            let (dst, stream) = match to {
                Target::Device(d) => match layout.device_slot[l] {
                    Some(off) => (Mem::<B>::Device(d, off), Stream::H2D),
                    None => continue,
                },
                Target::Host(h) => match layout.host_slot[l] {
                    Some(off) => (Mem::Host(h, off), Stream::D2H),
                    None => continue,
                },
            };
            let Some((src, at)) = from.of(l) else {
                continue;
            };
            let tokens = self.shared.page_table.seq_len(l);
            for (so, d_o, shape) in spec.relayout_copies(from.capacity, layout.capacity, tokens) {
                if shape.bytes() == 0 {
                    continue;
                }
                let d = match dst {
                    Mem::Device(buf, off) => Mem::Device(buf, off + d_o),
                    Mem::Host(buf, off) => Mem::Host(buf, off + d_o),
                };
                b.copy(stream, Mem::Host(src, at + so), d, shape)?;
                if stream == Stream::H2D {
                    Counters::add(&self.shared.counters.h2d_bytes, shape.bytes() as u64);
                }
            }
        }
        b.synchronize_queues()
    }

    /// Moves every layer to where `plan` wants it at `capacity` tokens. Resident
    /// layers are spilled to a temporary host buffer, the host arena for the new
    /// pooled set is built, then the old device arena is let go before the new one
    /// is allocated (so the budget holds throughout) and filled. If an allocation
    /// fails, the engine keeps its old arenas and data and returns the error.
    fn transition_inner(&mut self, plan: &Arc<Plan>, capacity: usize) -> Result<()> {
        let b = &self.shared.backend;
        let specs = &self.shared.specs;
        let new_layout = ArenaLayout::new(specs, capacity, plan)?;
        let old = self.shared.arenas.load_full();
        // 1. Spill resident layers (nothing changes yet if this fails).
        let mut spill_at = vec![None; specs.len()];
        let mut spill = None;
        if let Some(old) = &old {
            let mut off = 0usize;
            for (l, spec) in specs.iter().enumerate() {
                if old.layout.device_slot[l].is_some() && self.shared.page_table.seq_len(l) > 0 {
                    spill_at[l] = Some(off);
                    off += align_up(spec.bytes(old.layout.capacity), SLOT_ALIGN);
                }
            }
            if off > 0 {
                let buf = b.alloc_host(off)?;
                for (l, spec) in specs.iter().enumerate() {
                    if let (Some(dev), Some(at)) = (old.layout.device_slot[l], spill_at[l]) {
                        let tokens = self.shared.page_table.seq_len(l);
                        for (o, shape) in spec.token_range_copies(old.layout.capacity, 0, tokens) {
                            if shape.bytes() > 0 {
                                b.copy(
                                    Stream::D2H,
                                    Mem::Device(&*old.device, dev + o),
                                    Mem::Host(&buf, at + o),
                                    shape,
                                )?;
                                Counters::add(
                                    &self.shared.counters.d2h_bytes,
                                    shape.bytes() as u64,
                                );
                            }
                        }
                    }
                }
                b.synchronize_queues()?;
                spill = Some(buf);
            }
        }
        let old_host = old.as_ref().map(|o| o.host.clone());
        let old_layout = old.as_ref().map(|o| o.layout.clone());
        let sources = Sources {
            spill: spill.as_ref(),
            spill_at: &spill_at,
            old_host: old_host
                .as_deref()
                .zip(old_layout.as_ref().map(|l| &l.host_slot[..])),
            capacity: old_layout.as_ref().map_or(capacity, |l| l.capacity),
        };
        // 2. Host arena for the new pooled set (still nothing changed on failure).
        let reuse_host = old.as_ref().is_some_and(|o| {
            o.layout.capacity == capacity && o.layout.host_slot == new_layout.host_slot
        });
        let host = match &old {
            Some(o) if reuse_host => o.host.clone(),
            _ => {
                let host = b.alloc_host(new_layout.host_bytes.max(1))?;
                self.fill(&sources, Target::Host(&host), &new_layout)?;
                Arc::new(host)
            }
        };
        // 3. Device arena: let go of the old one (zero-copy views held elsewhere
        //    keep it alive until dropped), allocate and fill the new one.
        self.shared.arenas.store(None);
        drop(old);
        let device = match b.alloc_device(new_layout.device_bytes.max(1)) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                // Put the old arenas back (a fresh device arena of the old size,
                // refilled from the spill) so nothing is lost.
                let (Some(layout), Some(host)) = (old_layout.clone(), old_host.clone()) else {
                    return Err(e);
                };
                let restored = b.alloc_device(layout.device_bytes.max(1)).and_then(|d| {
                    let keep = Sources {
                        old_host: None,
                        capacity: layout.capacity,
                        ..sources
                    };
                    self.fill(&keep, Target::Device(&d), &layout).map(|()| d)
                });
                return match restored {
                    Ok(d) => {
                        self.generation += 1;
                        self.pipeline.primed = false;
                        self.shared.arenas.store(Some(Arc::new(Arenas {
                            layout,
                            device: Arc::new(d),
                            host,
                        })));
                        Err(e)
                    }
                    Err(again) => {
                        self.shared.poison(PieError::state(format!(
                            "rebuilding the arenas failed ({e}) and the old ones could not be restored ({again})"
                        )));
                        Err(e)
                    }
                };
            }
        };
        if let Err(e) = self.fill(&sources, Target::Device(&*device), &new_layout) {
            self.shared.poison(PieError::state(format!(
                "filling the new device arena failed: {e}"
            )));
            return Err(e);
        }
        drop(spill);
        drop(old_host);
        self.shared.page_table.apply_layout(&new_layout);
        self.shared
            .counters
            .peak_device_bytes
            .fetch_max(new_layout.device_bytes as u64, Ordering::Relaxed);
        self.shared
            .capacity
            .store(capacity as u64, Ordering::Relaxed);
        self.shared.arenas.store(Some(Arc::new(Arenas {
            layout: new_layout,
            device,
            host,
        })));
        self.shared.current_plan.store(plan.clone());
        self.pipeline = Pipeline::new(plan.clone(), specs.len());
        self.generation += 1;
        Ok(())
    }

    /// Empties every layer (a new sequence), keeping the arenas and what the
    /// policy learned.
    pub fn reset(&mut self) -> Result<()> {
        self.shared.check()?;
        self.quiesce()?;
        for l in 0..self.num_layers() {
            self.shared.page_table.set_seq_len(l, 0);
        }
        self.in_step = false;
        self.cursor = None;
        self.pipeline.primed = false;
        Ok(())
    }

    /// A function that makes a stream wait (device-side) for every copy queued
    /// so far on both copy queues: what a DLPack export owes its consumer.
    pub fn stream_sync(&self) -> Arc<dyn Fn(Stream) -> Result<()> + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move |stream| {
            shared.check()?;
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
    /// [`TIMING_EVERY`]-th) and scaled to all steps.
    pub fn stall_seconds(&self) -> f64 {
        let c = &self.shared.counters;
        let timed = Counters::get(&c.timed_steps);
        if timed == 0 {
            return 0.0;
        }
        let measured = Counters::get(&c.stall_ns) as f64 * 1e-9;
        measured * Counters::get(&c.steps) as f64 / timed as f64
    }

    /// Blocks until the policy thread has measured every completed step (tests
    /// and benchmarks use it to read settled stats).
    pub fn flush_telemetry(&self) -> Result<()> {
        let deadline = Instant::now() + self.wait_timeout;
        while self.shared.records_done.load(Ordering::Acquire) < self.records_pushed {
            self.shared.check()?;
            if Instant::now() > deadline {
                return Err(PieError::backend(
                    "telemetry",
                    "the policy thread stopped draining its ring",
                ));
            }
            if let Some(t) = &self.policy {
                t.thread().unpark();
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// The error that stopped the engine, if any.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().clone()
    }

    /// Stops the threads (joining them) and frees the arenas. Idempotent.
    pub fn close(&mut self) {
        if self.swapper.is_none() && self.policy.is_none() {
            return;
        }
        let _ = self.quiesce();
        // The swapper drains what is left (skipping it once poisoned) before it
        // sees the shutdown flag on an empty FIFO.
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for t in [self.swapper.take(), self.policy.take()]
            .into_iter()
            .flatten()
        {
            t.thread().unpark();
            let _ = t.join();
        }
        let arenas = self.shared.arenas.swap(None);
        if !self.shared.backend.wait_idle() {
            // A copy may still be running against these buffers (a stuck copy
            // engine): leaking them is the only memory-safe choice.
            std::mem::forget(arenas);
        }
    }

    /// Test hook: the sample the policy thread would compute for `step`, if its
    /// timing set has not been reused.
    pub fn last_sample(&self) -> Option<StepSample> {
        crate::policy_driver::last_sample(&self.shared)
    }
}

impl<B: Backend> Drop for Engine<B> {
    fn drop(&mut self) {
        self.close();
    }
}
