//! The prefetch schedule, the heart of the paper: given the plan and the
//! layer events of a step, which swap operations come next and which staging
//! slot each pooled layer uses. Pure: layer events in, [`SwapOp`]s out; no
//! backend, no threads, no clock. The engine drives it on every backend
//! (`pie-rs simulate` included, through the sim backend), so there is one copy.
//!
//! # The algorithm
//! Pooled layers `order[0..P]` (execution order) cycle through `W` staging
//! slots. Prefetches are numbered `seq = 0, 1, 2, ...` within an *epoch* (the
//! time since the schedule was last primed); prefetch `seq` brings layer
//! `order[(seq + origin) % P]` into slot `seq % W`, so the order wraps from the
//! last pooled layer of one step into the first of the next. Priming pushes
//! the first `W` prefetches; when pooled layer `seq` is done, its slot is
//! released and prefetch `seq + W` is pushed into it. A layer whose slot still
//! holds it from `W` prefetches ago (only when `W % P == 0`) is a *hit*: no copy.
//!
//! An epoch starts at construction, after [`Schedule::invalidate`] (the caller
//! changed data under the engine: crop, reorder, reset, an aborted step) and
//! when a layer arrives out of order ([`Ready::OutOfOrder`]): the caller drains
//! the copy queues, then [`Schedule::restart_at`] primes from that layer.

use crate::plan::Plan;
use std::sync::Arc;

/// One operation in the swap FIFO, in the order the swapper must issue it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapOp {
    /// Copy pooled `layer`'s valid tokens from its host buffer into staging
    /// `slot`, once the slot's previous occupant is done with it.
    Prefetch {
        /// Layer to fetch.
        layer: usize,
        /// Staging slot index.
        slot: usize,
        /// Step whose timing set records the copy.
        step: u64,
        /// Whether the slot already holds this layer (nothing to copy).
        hit: bool,
    },
    /// Copy tokens `[start, start + n)` of pooled `layer` from its staging slot
    /// back to its host buffer, after the compute that wrote them.
    WriteBack {
        /// Layer written.
        layer: usize,
        /// Staging slot index holding it.
        slot: usize,
        /// First new token.
        start: usize,
        /// Number of new tokens.
        n: usize,
        /// Step whose timing set records the copy.
        step: u64,
    },
    /// Copy the row runs `runs` of pooled `layer` from its staging slot back
    /// to its host buffer, after the compute that wrote them: the scattered
    /// writes of a paged cache, up to [`RowRuns::MAX`] runs per operation.
    WriteBackRuns {
        /// Layer written.
        layer: usize,
        /// Staging slot index holding it.
        slot: usize,
        /// The runs of rows written.
        runs: RowRuns,
        /// Step whose timing set records the copy.
        step: u64,
    },
    /// Pooled `layer` finished computing: staging `slot` is free once its
    /// write-back (queued before) has read it.
    Release {
        /// Layer done.
        layer: usize,
        /// Staging slot it used.
        slot: usize,
    },
}

/// Up to [`RowRuns::MAX`] runs of rows `(start, n)`, carried by value in one
/// [`SwapOp::WriteBackRuns`] so a step's scattered writes take a few FIFO
/// slots rather than one per run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowRuns {
    runs: [(usize, usize); RowRuns::MAX],
    len: u8,
}

impl RowRuns {
    /// Most runs one operation carries.
    pub const MAX: usize = 8;

    /// The runs, in the order given.
    pub fn as_slice(&self) -> &[(usize, usize)] {
        &self.runs[..self.len as usize]
    }

    /// Rows the runs cover.
    pub fn rows(&self) -> usize {
        self.as_slice().iter().map(|&(_, n)| n).sum()
    }

    /// The non-empty runs of `ranges`, in order, packed [`RowRuns::MAX`] at a time.
    pub fn pack(ranges: &[(usize, usize)]) -> impl Iterator<Item = RowRuns> + '_ {
        let mut it = ranges.iter().copied().filter(|&(_, n)| n > 0).peekable();
        std::iter::from_fn(move || {
            it.peek()?;
            let mut out = RowRuns {
                runs: [(0, 0); RowRuns::MAX],
                len: 0,
            };
            for slot in out.runs.iter_mut() {
                let Some(run) = it.next() else { break };
                *slot = run;
                out.len += 1;
            }
            Some(out)
        })
    }
}

/// What the caller must do before a layer's attention reads its KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// The layer is resident: nothing to wait for.
    Resident,
    /// The layer is pooled and its prefetch is queued: wait until the swapper
    /// has issued `prefetch` prefetches in total (counting from the engine's
    /// start), then make the compute stream wait for the copy; its KV is in
    /// staging `slot`.
    Staged {
        /// Staging slot holding the layer this step.
        slot: usize,
        /// Total prefetches that must have been issued (this one included).
        prefetch: u64,
    },
    /// The layer is pooled and attended on the host: its KV stays in host
    /// memory, nothing is copied and nothing is staged on the device.
    HostAttended,
    /// The layer came out of execution order (a layer skipped or repeated):
    /// drain the copy queues, then call [`Schedule::restart_at`].
    OutOfOrder,
}

/// The prefetch schedule of one plan. See the module docs.
#[derive(Clone, Debug)]
pub struct Schedule {
    plan: Arc<Plan>,
    /// Pooled layers in execution order.
    order: Vec<usize>,
    /// Per layer: its index in `order`, if pooled.
    pos_of: Vec<Option<usize>>,
    /// Staging slots.
    w: u64,
    /// Steps ended since this epoch was primed.
    epoch_step: u64,
    /// `seq(epoch_step, k) = epoch_step * P + k - origin`.
    origin: u64,
    /// Prefetches pushed in this epoch (the next seq to push).
    pushed: u64,
    /// Prefetches pushed before this epoch, over the schedule's whole life.
    pushed_before: u64,
    /// Engine step at which this epoch was primed.
    epoch_start_step: u64,
    primed: bool,
}

impl Schedule {
    /// The schedule of `plan` over `layers` engine-managed layers, not primed.
    pub fn new(plan: Arc<Plan>, layers: usize) -> Self {
        let mut s = Schedule {
            plan: Arc::new(Plan::all_resident()),
            order: Vec::new(),
            pos_of: vec![None; layers],
            w: 0,
            epoch_step: 0,
            origin: 0,
            pushed: 0,
            pushed_before: 0,
            epoch_start_step: 0,
            primed: false,
        };
        s.set_plan(plan);
        s
    }

    /// Switches to `plan` (at a step boundary, after the copy queues drained);
    /// the next [`Schedule::begin`] primes it. Prefetch counts carry on.
    pub fn set_plan(&mut self, plan: Arc<Plan>) {
        self.pos_of.iter_mut().for_each(|p| *p = None);
        // Host-attended layers are never copied: only the copied layers take
        // turns in the staging slots.
        self.order = plan.copied();
        for (k, &l) in self.order.iter().enumerate() {
            self.pos_of[l] = Some(k);
        }
        self.w = plan.staging_slots() as u64;
        self.plan = plan;
        self.invalidate();
    }

    /// The plan this schedule runs.
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// Copied pooled layers (those that take turns in the staging slots) in
    /// execution order.
    pub fn pooled(&self) -> &[usize] {
        &self.order
    }

    /// Whether `layer` is a copied pooled layer under this plan.
    pub fn is_pooled(&self, layer: usize) -> bool {
        self.pos_of.get(layer).is_some_and(Option::is_some)
    }

    /// Whether pooled layers take turns in the staging slots (more pooled
    /// layers than slots), so every step moves each pooled layer's KV.
    pub fn swaps_every_step(&self) -> bool {
        self.w > 0 && self.w < self.order.len() as u64
    }

    /// Whether the first `W` prefetches of an epoch are queued.
    pub fn is_primed(&self) -> bool {
        self.primed
    }

    /// Total prefetches pushed so far over the schedule's life.
    pub fn prefetches_pushed(&self) -> u64 {
        self.pushed_before + self.pushed
    }

    /// Forgets what is in the staging slots: the next [`Schedule::begin`]
    /// primes again (the caller has drained the copy queues).
    pub fn invalidate(&mut self) {
        self.pushed_before += self.pushed;
        self.pushed = 0;
        self.primed = false;
    }

    fn p(&self) -> u64 {
        self.order.len() as u64
    }

    fn layer_of(&self, seq: u64) -> usize {
        self.order[((seq + self.origin) % self.p()) as usize]
    }

    /// The epoch seq of pooled index `k` in the current step, if it was reached.
    fn seq_of(&self, k: usize) -> Option<u64> {
        (self.epoch_step * self.p() + k as u64).checked_sub(self.origin)
    }

    /// The seq of pooled `layer` in the current step, if its prefetch is queued.
    fn queued_seq(&self, layer: usize) -> Option<u64> {
        let k = self.pos_of.get(layer).copied().flatten()?;
        self.seq_of(k).filter(|&s| s < self.pushed)
    }

    /// The staging slot pooled `layer` occupies in the current step, if its
    /// prefetch is queued: the one place that maps a layer to its slot.
    pub fn slot_of(&self, layer: usize) -> Option<usize> {
        self.queued_seq(layer).map(|s| (s % self.w) as usize)
    }

    fn push_prefetch(&mut self, seq: u64, emit: &mut impl FnMut(SwapOp)) {
        let layer = self.layer_of(seq);
        let hit = seq >= self.w && self.layer_of(seq - self.w) == layer;
        let step = self.epoch_start_step + (seq + self.origin) / self.p();
        self.pushed = seq + 1;
        emit(SwapOp::Prefetch {
            layer,
            slot: (seq % self.w) as usize,
            step,
            hit,
        });
    }

    /// Starts an epoch whose first prefetch is pooled index `k0` of engine
    /// step `step`, and queues the first `W` prefetches.
    fn prime(&mut self, k0: usize, step: u64, emit: &mut impl FnMut(SwapOp)) {
        self.invalidate();
        self.epoch_step = 0;
        self.origin = k0 as u64;
        self.epoch_start_step = step;
        self.primed = true;
        if self.order.is_empty() {
            return;
        }
        for seq in 0..self.w {
            self.push_prefetch(seq, emit);
        }
    }

    /// The first pooled index at or after `layer` in execution order.
    fn next_pooled_index(&self, layer: usize) -> usize {
        self.order
            .iter()
            .position(|&l| l >= layer)
            .unwrap_or(self.order.len())
    }

    /// `layer` begins in engine step `step`: primes the schedule from this
    /// layer on if it is not primed.
    pub fn begin(&mut self, layer: usize, step: u64, emit: &mut impl FnMut(SwapOp)) {
        if !self.primed {
            let k0 = self.next_pooled_index(layer);
            self.prime(k0, step, emit);
        }
    }

    /// Right before `layer`'s attention: where its KV is and what to wait for.
    pub fn ready(&self, layer: usize) -> Ready {
        if self.plan.is_host_attended(layer) {
            return Ready::HostAttended;
        }
        if !self.is_pooled(layer) {
            return Ready::Resident;
        }
        match self.queued_seq(layer) {
            Some(seq) if self.primed => Ready::Staged {
                slot: (seq % self.w) as usize,
                prefetch: self.pushed_before + seq + 1,
            },
            _ => Ready::OutOfOrder,
        }
    }

    /// After a [`Ready::OutOfOrder`] and a drain of the copy queues: a new
    /// epoch starting at pooled `layer` in engine step `step`.
    pub fn restart_at(&mut self, layer: usize, step: u64, emit: &mut impl FnMut(SwapOp)) {
        if let Some(k) = self.pos_of.get(layer).copied().flatten() {
            self.epoch_step = 0;
            self.prime(k, step, emit);
        }
    }

    /// Mid-step, after the caller drained the queues and changed data: a new
    /// epoch from the first pooled layer at or after `layer`.
    pub fn restart_from(&mut self, layer: usize, step: u64, emit: &mut impl FnMut(SwapOp)) {
        let k0 = self.next_pooled_index(layer);
        self.prime(k0, step, emit);
    }

    /// `n` new tokens were written after the first `start` of `layer` in engine
    /// step `step`: a pooled layer writes them back from its slot. `None` when
    /// nothing moves; `Err(())` when a pooled layer writes without its prefetch
    /// queued (the caller skipped [`Schedule::ready`]).
    #[allow(clippy::result_unit_err)]
    pub fn written(
        &self,
        layer: usize,
        start: usize,
        n: usize,
        step: u64,
    ) -> Result<Option<SwapOp>, ()> {
        if n == 0 || !self.is_pooled(layer) {
            return Ok(None);
        }
        let slot = self.slot_of(layer).ok_or(())?;
        Ok(Some(SwapOp::WriteBack {
            layer,
            slot,
            start,
            n,
            step,
        }))
    }

    /// Tokens `ranges` (each `(start, n)`) of `layer` were written in engine
    /// step `step`, in any order and at scattered places (a paged cache writes
    /// each request's new tokens into its own blocks): a pooled layer writes
    /// back each non-empty range from its slot, in the order given, and
    /// nothing else ([`RowRuns::MAX`] ranges per operation). `Err(())` when a
    /// pooled layer writes without its prefetch queued (the caller skipped
    /// [`Schedule::ready`]).
    #[allow(clippy::result_unit_err)]
    pub fn written_ranges(
        &self,
        layer: usize,
        ranges: &[(usize, usize)],
        step: u64,
        emit: &mut impl FnMut(SwapOp),
    ) -> Result<(), ()> {
        if !self.is_pooled(layer) || ranges.iter().all(|&(_, n)| n == 0) {
            return Ok(());
        }
        let slot = self.slot_of(layer).ok_or(())?;
        for runs in RowRuns::pack(ranges) {
            emit(SwapOp::WriteBackRuns {
                layer,
                slot,
                runs,
                step,
            });
        }
        Ok(())
    }

    /// `layer`'s compute is done: a pooled layer releases its slot, and the
    /// prefetch `W` places later in execution order is queued into it.
    pub fn done(&mut self, layer: usize, emit: &mut impl FnMut(SwapOp)) {
        let Some(seq) = self.queued_seq(layer) else {
            return;
        };
        emit(SwapOp::Release {
            layer,
            slot: (seq % self.w) as usize,
        });
        let next = seq + self.w;
        if next == self.pushed {
            self.push_prefetch(next, emit);
        }
    }

    /// The step ended: the next one continues the epoch.
    pub fn end_step(&mut self) {
        self.epoch_step += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(pooled: &[usize], depth: usize) -> Arc<Plan> {
        Arc::new(Plan::copying(pooled.to_vec(), depth))
    }

    /// Runs `steps` in-order steps over `layers` layers, returning every op.
    fn run(s: &mut Schedule, layers: usize, steps: u64) -> Vec<SwapOp> {
        let mut ops = Vec::new();
        for step in 0..steps {
            for l in 0..layers {
                s.begin(l, step, &mut |op| ops.push(op));
                match s.ready(l) {
                    Ready::Resident | Ready::HostAttended => {}
                    Ready::Staged { slot, .. } => {
                        assert_eq!(Some(slot), s.slot_of(l));
                        ops.extend(s.written(l, 0, 1, step).unwrap());
                    }
                    Ready::OutOfOrder => panic!("in-order layer {l} out of order"),
                }
                s.done(l, &mut |op| ops.push(op));
            }
            s.end_step();
        }
        ops
    }

    #[test]
    fn host_attended_layers_are_never_copied_and_take_no_slot() {
        let plan = Arc::new(Plan {
            pooled: vec![1, 2, 3, 5],
            host_attended: vec![2, 5],
            prefetch_depth: 2,
        });
        assert_eq!(plan.copied(), vec![1, 3]);
        assert_eq!(plan.staging_slots(), 2);
        let mut s = Schedule::new(plan, 6);
        let ops = run(&mut s, 6, 3);
        assert!(!ops.is_empty());
        for op in &ops {
            let layer = match *op {
                SwapOp::Prefetch { layer, .. }
                | SwapOp::WriteBack { layer, .. }
                | SwapOp::WriteBackRuns { layer, .. }
                | SwapOp::Release { layer, .. } => layer,
            };
            assert!(layer == 1 || layer == 3, "{op:?}");
        }
        assert_eq!(s.ready(2), Ready::HostAttended);
        assert_eq!(s.slot_of(5), None);
        // Everything host-attended: no staging slot, no copies at all.
        let all_host = Arc::new(Plan {
            pooled: vec![0, 1],
            host_attended: vec![0, 1],
            prefetch_depth: 0,
        });
        assert!(all_host.validate(2).is_ok());
        assert_eq!(all_host.staging_slots(), 0);
        assert!(run(&mut Schedule::new(all_host, 2), 2, 2).is_empty());
    }

    #[test]
    fn prefetches_wrap_into_the_next_step_in_slot_order() {
        let mut s = Schedule::new(plan(&[1, 3, 5], 2), 6);
        let ops = run(&mut s, 6, 2);
        let fetched: Vec<(usize, usize, u64)> = ops
            .iter()
            .filter_map(|op| match *op {
                SwapOp::Prefetch {
                    layer, slot, step, ..
                } => Some((layer, slot, step)),
                _ => None,
            })
            .collect();
        assert_eq!(
            fetched,
            vec![
                (1, 0, 0),
                (3, 1, 0),
                (5, 0, 0),
                (1, 1, 1),
                (3, 0, 1),
                (5, 1, 1),
                (1, 0, 2),
                (3, 1, 2)
            ]
        );
    }

    #[test]
    fn a_slot_is_refilled_only_after_its_occupant_is_released() {
        let mut s = Schedule::new(plan(&[0, 2, 3, 6], 3), 7);
        let ops = run(&mut s, 7, 5);
        let mut occupant: Vec<Option<usize>> = vec![None; 3];
        for op in ops {
            match op {
                SwapOp::Prefetch { layer, slot, .. } => {
                    assert!(occupant[slot].is_none(), "slot {slot} refilled while busy");
                    occupant[slot] = Some(layer);
                }
                SwapOp::WriteBack { layer, slot, .. }
                | SwapOp::WriteBackRuns { layer, slot, .. } => {
                    assert_eq!(occupant[slot], Some(layer))
                }
                SwapOp::Release { layer, slot } => {
                    assert_eq!(occupant[slot].take(), Some(layer));
                }
            }
        }
    }

    #[test]
    fn enough_slots_make_every_later_prefetch_a_hit() {
        let mut s = Schedule::new(plan(&[1, 2], 2), 4);
        let ops = run(&mut s, 4, 3);
        let hits: Vec<bool> = ops
            .iter()
            .filter_map(|op| match *op {
                SwapOp::Prefetch { hit, .. } => Some(hit),
                _ => None,
            })
            .collect();
        assert_eq!(hits, vec![false, false, true, true, true, true, true, true]);
        assert!(!s.swaps_every_step());
    }

    #[test]
    fn an_out_of_order_layer_restarts_the_epoch_there() {
        let mut s = Schedule::new(plan(&[0, 1, 2], 1), 3);
        let mut ops = Vec::new();
        s.begin(0, 0, &mut |op| ops.push(op));
        assert_eq!(
            s.ready(0),
            Ready::Staged {
                slot: 0,
                prefetch: 1
            }
        );
        s.done(0, &mut |op| ops.push(op));
        // Layer 2 arrives before layer 1: its prefetch is not queued yet.
        assert_eq!(s.ready(2), Ready::OutOfOrder);
        ops.clear();
        s.restart_at(2, 0, &mut |op| ops.push(op));
        assert_eq!(
            ops,
            vec![SwapOp::Prefetch {
                layer: 2,
                slot: 0,
                step: 0,
                hit: false
            }]
        );
        // Two prefetches were pushed before this epoch.
        assert_eq!(
            s.ready(2),
            Ready::Staged {
                slot: 0,
                prefetch: 3
            }
        );
    }

    #[test]
    fn resident_layers_and_all_resident_plans_move_nothing() {
        let mut s = Schedule::new(plan(&[], 0), 3);
        assert!(run(&mut s, 3, 3).is_empty());
        let s = Schedule::new(plan(&[1], 1), 3);
        assert_eq!(s.ready(0), Ready::Resident);
        assert_eq!(s.written(0, 0, 4, 0), Ok(None));
    }

    #[test]
    fn a_write_before_ready_is_refused() {
        let s = Schedule::new(plan(&[0], 1), 2);
        assert_eq!(s.written(0, 0, 1, 0), Err(()));
    }

    #[test]
    fn scattered_writes_write_back_each_range_from_the_layer_slot() {
        let mut s = Schedule::new(plan(&[1, 2], 1), 3);
        let mut ops = Vec::new();
        s.begin(0, 0, &mut |op| ops.push(op));
        s.done(0, &mut |op| ops.push(op));
        s.begin(1, 0, &mut |op| ops.push(op));
        let Ready::Staged { slot, .. } = s.ready(1) else {
            panic!("layer 1 is pooled")
        };
        ops.clear();
        s.written_ranges(1, &[(40, 1), (7, 0), (3, 2)], 0, &mut |op| ops.push(op))
            .unwrap();
        let [SwapOp::WriteBackRuns {
            layer: 1,
            slot: got,
            runs,
            step: 0,
        }] = ops[..]
        else {
            panic!("one write-back of the runs, got {ops:?}")
        };
        assert_eq!(got, slot);
        assert_eq!(runs.as_slice(), &[(40, 1), (3, 2)]);
        assert_eq!(runs.rows(), 3);
        // Many runs take a few operations, in order, nothing lost.
        ops.clear();
        let many: Vec<(usize, usize)> = (0..19).map(|i| (10 * i, 1 + i % 3)).collect();
        s.written_ranges(1, &many, 0, &mut |op| ops.push(op))
            .unwrap();
        assert_eq!(ops.len(), 19usize.div_ceil(RowRuns::MAX));
        let back: Vec<(usize, usize)> = ops
            .iter()
            .flat_map(|op| match op {
                SwapOp::WriteBackRuns { runs, .. } => runs.as_slice().to_vec(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(back, many);
        // Resident layers and empty ranges move nothing.
        ops.clear();
        s.written_ranges(0, &[(0, 5)], 0, &mut |op| ops.push(op))
            .unwrap();
        s.written_ranges(1, &[(9, 0)], 0, &mut |op| ops.push(op))
            .unwrap();
        assert!(ops.is_empty());
    }

    #[test]
    fn scattered_writes_before_ready_are_refused() {
        let s = Schedule::new(plan(&[0], 1), 2);
        assert_eq!(s.written_ranges(0, &[(4, 1)], 0, &mut |_| {}), Err(()));
    }

    #[test]
    fn invalidate_counts_prefetches_across_epochs() {
        let mut s = Schedule::new(plan(&[0, 1], 1), 2);
        run(&mut s, 2, 1);
        let before = s.prefetches_pushed();
        s.invalidate();
        s.begin(0, 1, &mut |_| {});
        assert_eq!(
            s.ready(0),
            Ready::Staged {
                slot: 0,
                prefetch: before + 1
            }
        );
    }
}
