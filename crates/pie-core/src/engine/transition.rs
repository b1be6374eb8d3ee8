//! Arena transitions: moving every layer to where a new plan or capacity wants
//! it. Resident layers are spilled to a temporary host buffer, the host arena
//! for the new pooled set is built, the old device arena is let go before the
//! new one is allocated (so the budget holds throughout), then filled. A failed
//! allocation leaves the old arenas and data in place.

use super::Engine;
use crate::backend::{Backend, Mem, Stream};
use crate::error::{PieError, Result};
use crate::layout::{align_up, SLOT_ALIGN};
use crate::plan::Plan;
use crate::primitive::Ordering;
use crate::shared::Arenas;
use crate::slots::ArenaLayout;
use crate::telemetry::Counters;
use std::sync::Arc;

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

impl<B: Backend> Engine<B> {
    /// Moves every layer to where `plan` wants it at `capacity` tokens: spills
    /// resident layers to host memory, rebuilds the arenas (device arena freed
    /// before the new one is allocated, so the budget holds throughout), and
    /// fills the new resident slots. Costs a full sync; plans change rarely.
    pub(super) fn transition(&mut self, plan: &Arc<Plan>, capacity: usize) -> Result<()> {
        crate::fit::check_budget(
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
                        self.schedule.invalidate();
                        self.shared.arenas.store(Some(Arc::new(Arenas {
                            layout,
                            device: Arc::new(d),
                            host,
                        })));
                        Err(e)
                    }
                    Err(again) => {
                        self.shared.health.poison(PieError::state(format!(
                            "rebuilding the arenas failed ({e}) and the old ones could not be restored ({again})"
                        )));
                        Err(e)
                    }
                };
            }
        };
        if let Err(e) = self.fill(&sources, Target::Device(&*device), &new_layout) {
            self.shared.health.poison(PieError::state(format!(
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
            .caller
            .capacity
            .store(capacity as u64, Ordering::Relaxed);
        self.shared.arenas.store(Some(Arc::new(Arenas {
            layout: new_layout,
            device,
            host,
        })));
        self.shared.plans.current.store(plan.clone());
        self.schedule.set_plan(plan.clone());
        self.generation += 1;
        Ok(())
    }
}
