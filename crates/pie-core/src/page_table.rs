//! The page table: for every layer, where its K and V live, how many tokens
//! are valid, and which copy it is waiting for. Every state change goes through
//! here; invariants are checked in debug builds.

use crate::primitive::{AtomicBool, AtomicUsize, Ordering};
use crate::slots::ArenaLayout;

/// Where a layer's KV lives during a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residence {
    /// Owns a device slot at this byte offset; its host buffer is stale between transitions.
    Resident {
        /// Byte offset of the layer's slot in the device arena.
        device_offset: usize,
    },
    /// Lives in its host buffer and borrows a staging slot while it runs.
    Pooled,
}

/// One layer's row of the page table. Lengths are atomics because the swapper
/// thread reads them when it issues a prefetch.
#[derive(Debug)]
pub struct LayerEntry {
    residence: parking_lot::Mutex<Residence>,
    seq_len: AtomicUsize,
    /// Whether the latest prefetch of this layer found it already in its slot (no copy).
    prefetch_hit: AtomicBool,
}

/// The page table of one engine.
#[derive(Debug)]
pub struct PageTable {
    layers: Vec<LayerEntry>,
}

impl PageTable {
    /// A table of `n` empty layers, all resident at offset 0 until a layout is applied.
    pub fn new(n: usize) -> Self {
        PageTable {
            layers: (0..n)
                .map(|_| LayerEntry {
                    residence: parking_lot::Mutex::new(Residence::Pooled),
                    seq_len: AtomicUsize::new(0),
                    prefetch_hit: AtomicBool::new(false),
                })
                .collect(),
        }
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the table has no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Applies a layout: each layer becomes resident at its slot or pooled.
    pub fn apply_layout(&self, layout: &ArenaLayout) {
        for (entry, slot) in self.layers.iter().zip(&layout.device_slot) {
            *entry.residence.lock() = match slot {
                Some(off) => Residence::Resident {
                    device_offset: *off,
                },
                None => Residence::Pooled,
            };
            entry.prefetch_hit.store(false, Ordering::Relaxed);
        }
        self.check_invariants(layout);
    }

    /// Where `layer` lives.
    pub fn residence(&self, layer: usize) -> Residence {
        *self.layers[layer].residence.lock()
    }

    /// Valid tokens of `layer`.
    pub fn seq_len(&self, layer: usize) -> usize {
        self.layers[layer].seq_len.load(Ordering::Acquire)
    }

    /// Sets the valid tokens of `layer` (append, crop or reset).
    pub fn set_seq_len(&self, layer: usize, tokens: usize) {
        self.layers[layer].seq_len.store(tokens, Ordering::Release);
    }

    /// Records whether the latest prefetch of `layer` was a hit (no copy issued).
    pub fn set_prefetch_hit(&self, layer: usize, hit: bool) {
        self.layers[layer]
            .prefetch_hit
            .store(hit, Ordering::Release);
    }

    /// Whether the latest prefetch of `layer` was a hit.
    pub fn prefetch_hit(&self, layer: usize) -> bool {
        self.layers[layer].prefetch_hit.load(Ordering::Acquire)
    }

    /// Debug-build check that the table agrees with `layout` and lengths fit.
    pub fn check_invariants(&self, layout: &ArenaLayout) {
        if cfg!(debug_assertions) {
            for (i, e) in self.layers.iter().enumerate() {
                let r = *e.residence.lock();
                match (r, layout.device_slot[i]) {
                    (Residence::Resident { device_offset }, Some(o)) => {
                        debug_assert_eq!(
                            device_offset, o,
                            "layer {i} slot disagrees with the layout"
                        )
                    }
                    (Residence::Pooled, None) => {}
                    _ => {
                        debug_assert!(false, "layer {i} residence {r:?} disagrees with the layout")
                    }
                }
                debug_assert!(
                    e.seq_len.load(Ordering::Relaxed) <= layout.capacity,
                    "layer {i} holds more tokens than its capacity"
                );
            }
        }
    }
}
