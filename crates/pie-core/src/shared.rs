//! State shared by the caller's thread, the swapper thread and the policy
//! thread. Every group of fields names the one thread that writes it; the
//! others only read. Cross-thread flags and counters come through
//! [`crate::primitive`], so loom can model them.

use crate::backend::Backend;
use crate::error::{PieError, Result};
use crate::layout::LayerSpec;
use crate::page_table::PageTable;
use crate::plan::Plan;
use crate::primitive::{AtomicBool, AtomicU64, Ordering};
use crate::slots::ArenaLayout;
use crate::telemetry::{Counters, StepSample, TimingSet, TIMING_SETS};
use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use std::sync::Arc;

/// Both arenas and the layout that carves them.
pub struct Arenas<B: Backend> {
    /// Where every slot sits.
    pub layout: ArenaLayout,
    /// The device arena (resident slots, then staging slots). Shared so that
    /// zero-copy views (DLPack) keep the memory alive while they exist.
    pub device: Arc<B::DeviceBuffer>,
    /// The host arena (the pooled layers' backing buffers), shared likewise.
    pub host: Arc<B::HostBuffer>,
}

/// Per-layer and per-slot events that order the copies against compute.
/// Recorded by the thread named on each field; waited on by the others.
pub(crate) struct LayerEvents<B: Backend> {
    /// Per layer: its prefetch landed (swapper, on H2D).
    pub(crate) ready: Vec<B::Event>,
    /// Per layer: its new tokens are written (caller, on the compute stream).
    pub(crate) written: Vec<B::Event>,
    /// Per layer: its last write-back landed in host memory (swapper, on D2H).
    pub(crate) written_back: Vec<B::Event>,
    /// Per layer: its compute finished (caller, on the compute stream).
    pub(crate) done: Vec<B::Event>,
    /// Per staging slot: free again (swapper, on D2H, after the occupant's write-back).
    pub(crate) slot_freed: Vec<B::Event>,
}

impl<B: Backend> LayerEvents<B> {
    fn new(backend: &B, layers: usize) -> Result<Self> {
        let evs = || {
            (0..layers)
                .map(|_| backend.new_event())
                .collect::<Result<Vec<_>>>()
        };
        Ok(LayerEvents {
            ready: evs()?,
            written: evs()?,
            written_back: evs()?,
            done: evs()?,
            slot_freed: evs()?,
        })
    }
}

/// What the swapper has done; written by the swapper only.
#[derive(Default)]
pub(crate) struct SwapperProgress {
    /// Swap operations processed (issued, or skipped once poisoned).
    pub(crate) ops_done: AtomicU64,
    /// Prefetch operations processed, over the engine's life.
    pub(crate) prefetches_issued: AtomicU64,
}

/// Whether the engine is running; written by whichever thread fails (poison)
/// or by the caller (shutdown).
#[derive(Default)]
pub(crate) struct Health {
    /// Set once by `close`, then both threads are notified; each stops when
    /// it finds its ring empty.
    pub(crate) shutdown: AtomicBool,
    poisoned: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Health {
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub(crate) fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Stops the engine after `e`; the first failure is the one reported.
    pub(crate) fn poison(&self, e: PieError) {
        let mut f = self.failure.lock();
        if f.is_none() {
            *f = Some(e.to_string());
        }
        self.poisoned.store(true, Ordering::Release);
    }

    /// The failure that stopped the engine, if any.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }

    /// `Ok` while the engine runs; otherwise the error to give the caller.
    pub(crate) fn check(&self) -> Result<()> {
        if self.is_poisoned() {
            let why = self.failure().unwrap_or_default();
            Err(PieError::state(format!(
                "the pool stopped after a failure ({why}); its KV may be incomplete: detach and attach again"
            )))
        } else if self.is_shutdown() {
            Err(PieError::state(
                "the engine is closed; attach again to use pie-rs",
            ))
        } else {
            Ok(())
        }
    }
}

/// Plans passed between the caller and the policy thread.
pub(crate) struct PlanExchange {
    /// A plan published by the policy thread, taken by the caller at the next
    /// step boundary.
    pub(crate) pending: ArcSwapOption<Plan>,
    /// The plan in force (written by the caller at transitions).
    pub(crate) current: ArcSwap<Plan>,
}

/// What the caller tells the policy thread about where it is; written by the caller.
pub(crate) struct CallerView {
    /// Step the caller is in (to detect lapped timing sets).
    pub(crate) step: AtomicU64,
    /// Tokens each layer can hold now.
    pub(crate) capacity: AtomicU64,
}

/// What the policy thread reports back; written by the policy thread.
#[derive(Default)]
pub(crate) struct PolicyProgress {
    /// Step records the policy thread has finished with.
    pub(crate) records_done: AtomicU64,
    /// The latest sample it computed.
    pub(crate) last_sample: Mutex<Option<StepSample>>,
}

/// State shared by the caller, the swapper thread and the policy thread.
pub(crate) struct Shared<B: Backend> {
    pub(crate) backend: B,
    pub(crate) specs: Vec<LayerSpec>,
    pub(crate) device_budget: Option<usize>,
    /// Every how many steps one is timed (at least 1).
    pub(crate) timing_every: u64,
    /// Valid lengths (caller writes) and prefetch hits (swapper writes).
    pub(crate) page_table: PageTable,
    /// The arenas; replaced by the caller at transitions, read by the swapper.
    pub(crate) arenas: ArcSwapOption<Arenas<B>>,
    pub(crate) events: LayerEvents<B>,
    /// Timing events of the sampled steps (caller and swapper record, policy reads).
    pub(crate) timing: Vec<TimingSet<B>>,
    /// Running totals (any thread adds).
    pub(crate) counters: Counters,
    pub(crate) swapper: SwapperProgress,
    pub(crate) health: Health,
    pub(crate) plans: PlanExchange,
    pub(crate) caller: CallerView,
    pub(crate) policy: PolicyProgress,
}

impl<B: Backend> Shared<B> {
    /// State for `specs` on `backend`, starting under `plan`.
    pub(crate) fn new(
        backend: B,
        specs: Vec<LayerSpec>,
        plan: Plan,
        capacity: usize,
        device_budget: Option<usize>,
        timing_every: u64,
    ) -> Result<Self> {
        let n = specs.len();
        let timing = (0..TIMING_SETS)
            .map(|_| TimingSet::new(&backend, n))
            .collect::<Result<Vec<_>>>()?;
        Ok(Shared {
            events: LayerEvents::new(&backend, n)?,
            timing,
            page_table: PageTable::new(n),
            arenas: ArcSwapOption::empty(),
            counters: Counters::default(),
            swapper: SwapperProgress::default(),
            health: Health::default(),
            plans: PlanExchange {
                pending: ArcSwapOption::empty(),
                current: ArcSwap::from_pointee(plan),
            },
            caller: CallerView {
                step: AtomicU64::new(0),
                capacity: AtomicU64::new(capacity as u64),
            },
            policy: PolicyProgress::default(),
            device_budget,
            timing_every: timing_every.max(1),
            specs,
            backend,
        })
    }

    /// The timing set of `step`, if the step is one of the sampled ones.
    pub(crate) fn timing_set(&self, step: u64) -> Option<&TimingSet<B>> {
        if !step.is_multiple_of(self.timing_every) {
            return None;
        }
        Some(&self.timing[((step / self.timing_every) % TIMING_SETS as u64) as usize])
    }

    /// Tokens each layer can hold now.
    pub(crate) fn capacity(&self) -> usize {
        self.caller.capacity.load(Ordering::Relaxed) as usize
    }
}
