//! The swapper thread: drains the swap FIFO in execution order and issues the
//! copies. It never blocks on the host: every ordering it needs (a staging slot
//! freed by the compute that read it, a layer's last write-back landed in host
//! memory) is a stream-side wait on an event.

use crate::backend::{Backend, Mem, Stream};
use crate::error::Result;
use crate::primitive::Ordering;
use crate::schedule::SwapOp;
use crate::shared::{Arenas, Shared};
use crate::telemetry::Counters;
use crate::wake::Receiver;

/// Empty polls of the FIFO before the swapper sleeps: within a step the next
/// op usually follows within microseconds.
const IDLE_SPINS: u32 = 64;

/// Runs the swapper loop until the engine shuts down (after draining the FIFO).
/// It sleeps only on an empty FIFO and every push wakes it ([`crate::wake`]),
/// so a pushed op is always processed without the caller waking anyone.
pub(crate) fn run<B: Backend>(shared: &Shared<B>, fifo: Receiver<SwapOp>) {
    let fifo = fifo.spin_first(IDLE_SPINS);
    while let Some(op) = fifo.recv(&shared.health.shutdown) {
        if !shared.health.is_poisoned() {
            if let Err(e) = process(shared, op) {
                shared.health.poison(e);
            }
        }
        shared.swapper.ops_done.fetch_add(1, Ordering::Release);
        if let SwapOp::Prefetch { .. } = op {
            shared
                .swapper
                .prefetches_issued
                .fetch_add(1, Ordering::Release);
        }
    }
}

fn process<B: Backend>(shared: &Shared<B>, op: SwapOp) -> Result<()> {
    let b = &shared.backend;
    let arenas = shared.arenas.load();
    let Some(arenas) = arenas.as_ref() else {
        return Ok(());
    };
    let layout = &arenas.layout;
    match op {
        SwapOp::Prefetch {
            layer,
            slot,
            step,
            hit,
        } => {
            shared.page_table.set_prefetch_hit(layer, hit);
            if hit {
                Counters::add(&shared.counters.prefetch_hits, 1);
                return Ok(());
            }
            let set = shared.timing_set(step);
            let spec = &shared.specs[layer];
            let tokens = shared.page_table.seq_len(layer);
            b.wait(Stream::H2D, &shared.events.slot_freed[slot])?;
            b.wait(Stream::H2D, &shared.events.written_back[layer])?;
            if let Some(set) = set {
                b.record(&set.h2d_start[layer], Stream::H2D)?;
            }
            let host_off = layout.host_slot[layer].ok_or_else(|| {
                crate::PieError::internal(format!(
                    "layer {layer} has no host buffer but was queued for a copy"
                ))
            })?;
            let dev_off = layout.staging[slot];
            for (off, shape) in spec.token_range_copies(layout.capacity, 0, tokens) {
                if shape.bytes() > 0 {
                    b.copy(
                        Stream::H2D,
                        Mem::Host(&*arenas.host, host_off + off),
                        Mem::Device(&*arenas.device, dev_off + off),
                        shape,
                    )?;
                }
            }
            let bytes = spec.valid_bytes(tokens) as u64;
            if let Some(set) = set {
                b.record(&set.h2d_end[layer], Stream::H2D)?;
                set.h2d_bytes[layer].store(bytes, Ordering::Relaxed);
            }
            b.record(&shared.events.ready[layer], Stream::H2D)?;
            Counters::add(&shared.counters.h2d_bytes, bytes);
            Counters::add(&shared.counters.prefetches, 1);
        }
        SwapOp::WriteBack {
            layer,
            slot,
            start,
            n,
            step,
        } => write_back(shared, arenas, layer, slot, &[(start, n)], step)?,
        SwapOp::WriteBackRuns {
            layer,
            slot,
            runs,
            step,
        } => write_back(shared, arenas, layer, slot, runs.as_slice(), step)?,
        SwapOp::Release { layer, slot } => {
            b.wait(Stream::D2H, &shared.events.done[layer])?;
            b.record(&shared.events.slot_freed[slot], Stream::D2H)?;
        }
    }
    Ok(())
}

/// Copies rows `runs` (`(start, n)` each) of pooled `layer` from staging `slot`
/// back to its host buffer, after the compute that wrote them.
fn write_back<B: Backend>(
    shared: &Shared<B>,
    arenas: &Arenas<B>,
    layer: usize,
    slot: usize,
    runs: &[(usize, usize)],
    step: u64,
) -> Result<()> {
    let b = &shared.backend;
    let layout = &arenas.layout;
    let set = shared.timing_set(step);
    let spec = &shared.specs[layer];
    b.wait(Stream::D2H, &shared.events.written[layer])?;
    if let Some(set) = set {
        b.record(&set.d2h_start[layer], Stream::D2H)?;
    }
    let host_off = layout.host_slot[layer].ok_or_else(|| {
        crate::PieError::internal(format!(
            "layer {layer} has no host buffer but was queued for a copy"
        ))
    })?;
    let dev_off = layout.staging[slot];
    let mut rows = 0;
    for &(start, n) in runs {
        rows += n;
        for (off, shape) in spec.token_range_copies(layout.capacity, start, n) {
            if shape.bytes() > 0 {
                b.copy(
                    Stream::D2H,
                    Mem::Device(&*arenas.device, dev_off + off),
                    Mem::Host(&*arenas.host, host_off + off),
                    shape,
                )?;
            }
        }
    }
    let bytes = spec.valid_bytes(rows) as u64;
    if let Some(set) = set {
        b.record(&set.d2h_end[layer], Stream::D2H)?;
        set.d2h_bytes[layer].fetch_add(bytes, Ordering::Relaxed);
    }
    b.record(&shared.events.written_back[layer], Stream::D2H)?;
    Counters::add(&shared.counters.d2h_bytes, bytes);
    Ok(())
}
