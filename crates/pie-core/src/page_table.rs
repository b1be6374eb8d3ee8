//! The page table: for every layer, how many tokens are valid and whether its
//! latest prefetch found it already staged. Where its bytes are is the arena
//! layout's answer ([`ArenaLayout::residence`]), and which staging slot a
//! pooled layer borrows this step the schedule's
//! ([`crate::schedule::Schedule::slot_of`]); nothing here repeats them. Every
//! field is an atomic through the `primitive` module, so loom can model it.

use crate::primitive::{AtomicBool, AtomicUsize, Ordering};
use crate::slots::ArenaLayout;

/// One layer's row of the page table. Lengths are atomics because the swapper
/// thread reads them when it issues a prefetch.
#[derive(Debug)]
pub struct LayerEntry {
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
    /// A table of `n` empty layers.
    pub fn new(n: usize) -> Self {
        PageTable {
            layers: (0..n)
                .map(|_| LayerEntry {
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

    /// A new layout is in force: no layer is staged from an earlier prefetch.
    pub fn apply_layout(&self, layout: &ArenaLayout) {
        for entry in &self.layers {
            entry.prefetch_hit.store(false, Ordering::Relaxed);
        }
        self.check_invariants(layout);
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

    /// Debug-build check that every length fits `layout`'s capacity.
    pub fn check_invariants(&self, layout: &ArenaLayout) {
        if cfg!(debug_assertions) {
            for (i, e) in self.layers.iter().enumerate() {
                debug_assert!(
                    e.seq_len.load(Ordering::Relaxed) <= layout.capacity,
                    "layer {i} holds more tokens than its capacity"
                );
            }
        }
    }
}
