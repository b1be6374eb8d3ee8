//! A reference model of the KV a layered compute loop writes, and a driver
//! that runs such a loop through an [`Engine`] on the host backend, checking
//! every byte the "attention" reads. Used by the property tests, the example
//! and the benchmarks; it is also how a Rust program embeds the engine.

use crate::HostBackend;
use pie_core::backend::{Buffer, Stream};
use pie_core::engine::{Engine, LayerKv};
use pie_core::error::Result;
use pie_core::layout::LayerSpec;
use pie_core::plan::Plan;

/// A token's identity: which layer, row, position and write produced it.
pub fn token_id(l: usize, r: usize, t: usize, salt: u64) -> u64 {
    let x = (l as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((r as u64).wrapping_mul(0x85EB_CA6B))
        .wrapping_add((t as u64).wrapping_mul(0xC2B2_AE35))
        .wrapping_add(salt.wrapping_mul(0x27D4_EB2F_1656_67C5));
    x ^ (x >> 31)
}

/// The byte a token with identity `id` holds at byte `i` of its K (`kv = 0`) or V row.
pub fn pattern(id: u64, kv: usize, i: usize) -> u8 {
    let x = id
        .wrapping_add((kv as u64) << 40)
        .wrapping_add((i as u64).wrapping_mul(0x9E37_79B9));
    (x ^ (x >> 13) ^ (x >> 29)) as u8
}

/// What each layer should hold: per layer, per row, the identity of each
/// token, so reorders and crops can be mirrored.
#[derive(Clone, Debug, Default)]
pub struct Reference {
    /// `tokens[layer][row]` = identities of the valid tokens, in order.
    pub tokens: Vec<Vec<Vec<u64>>>,
}

impl Reference {
    /// An empty reference for `specs`.
    pub fn new(specs: &[LayerSpec]) -> Self {
        Reference {
            tokens: specs.iter().map(|s| vec![Vec::new(); s.rows()]).collect(),
        }
    }

    /// Valid tokens of `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.tokens[layer].first().map_or(0, Vec::len)
    }

    /// Whether `layer` holds nothing.
    pub fn is_empty(&self, layer: usize) -> bool {
        self.len(layer) == 0
    }
}

/// Reads or writes a layer's slot as plain memory. Valid only on the host
/// backend, whose "device" memory is ordinary memory.
struct SlotAccess {
    base: *mut u8,
    spec: LayerSpec,
    capacity: usize,
}

impl SlotAccess {
    fn index(&self, kv: usize, r: usize, t: usize, i: usize) -> usize {
        let tok = if kv == 0 {
            self.spec.k_token_bytes()
        } else {
            self.spec.v_token_bytes()
        };
        let base = if kv == 0 {
            0
        } else {
            self.spec.k_bytes(self.capacity)
        };
        base + (r * self.capacity + t) * tok + i
    }

    /// # Safety
    /// `base` must point at a live slot of `spec.bytes(capacity)` bytes that no
    /// copy queue writes to meanwhile (the engine guarantees that after
    /// `layer_ready` on the host backend, whose compute stream is the caller).
    unsafe fn get(&self, kv: usize, r: usize, t: usize, i: usize) -> u8 {
        // SAFETY: in bounds by construction; exclusivity per the fn contract.
        unsafe { *self.base.add(self.index(kv, r, t, i)) }
    }

    /// # Safety
    /// As for [`SlotAccess::get`].
    unsafe fn set(&self, kv: usize, r: usize, t: usize, i: usize, v: u8) {
        // SAFETY: in bounds by construction; exclusivity per the fn contract.
        unsafe { *self.base.add(self.index(kv, r, t, i)) = v }
    }
}

/// The outcome of checking one layer read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Layer whose KV differed.
    pub layer: usize,
    /// Row, token and byte of the first difference.
    pub at: (usize, usize, usize, usize),
}

/// Runs one step of a layered compute loop on the host backend: every layer
/// checks the KV it reads against `reference`, then appends `new_tokens`
/// tokens (salted with `salt`). Returns the first mismatch, if any.
pub fn run_step(
    engine: &mut Engine<HostBackend>,
    reference: &mut Reference,
    new_tokens: usize,
    salt: u64,
) -> Result<Option<Mismatch>> {
    let stream = Stream::Foreign(0);
    let mut first_bad = None;
    for l in 0..engine.num_layers() {
        engine.layer_begin(l, stream)?;
        let need = reference.len(l) + new_tokens;
        engine.ensure_capacity(need)?;
        // A host-attended layer is read and appended where it lives, in the
        // host arena, as the host attention path does.
        let base = match engine.layer_ready_at(l, stream)? {
            LayerKv::Device(off) => engine.arenas().device.addr() as usize + off,
            LayerKv::Host(off) => engine.arenas().host.addr() as usize + off,
        };
        let spec = engine.specs()[l];
        let arenas = engine.arenas();
        let slot = SlotAccess {
            base: base as *mut u8,
            spec,
            capacity: arenas.layout.capacity,
        };
        if first_bad.is_none() {
            first_bad = check_slot(&slot, l, reference);
        }
        let start = reference.len(l);
        for (r, row) in reference.tokens[l].iter_mut().enumerate() {
            for t in start..start + new_tokens {
                let id = token_id(l, r, t, salt);
                for kv in 0..2 {
                    let width = if kv == 0 {
                        spec.k_token_bytes()
                    } else {
                        spec.v_token_bytes()
                    };
                    for i in 0..width {
                        // SAFETY: after layer_ready on the host backend the slot
                        // belongs to the caller until layer_done.
                        unsafe { slot.set(kv, r, t, i, pattern(id, kv, i)) };
                    }
                }
                row.push(id);
            }
        }
        drop(arenas);
        engine.layer_written(l, new_tokens, stream)?;
        engine.layer_done(l, stream)?;
    }
    Ok(first_bad)
}

fn check_slot(slot: &SlotAccess, l: usize, reference: &Reference) -> Option<Mismatch> {
    for (r, row) in reference.tokens[l].iter().enumerate() {
        for (t, &id) in row.iter().enumerate() {
            for kv in 0..2 {
                let width = if kv == 0 {
                    slot.spec.k_token_bytes()
                } else {
                    slot.spec.v_token_bytes()
                };
                for i in 0..width {
                    // SAFETY: see `run_step`: the slot belongs to the caller now.
                    let got = unsafe { slot.get(kv, r, t, i) };
                    if got != pattern(id, kv, i) {
                        return Some(Mismatch {
                            layer: l,
                            at: (r, t, kv, i),
                        });
                    }
                }
            }
        }
    }
    None
}

/// Crops every layer to `tokens` tokens, in the engine and the reference.
pub fn crop(
    engine: &mut Engine<HostBackend>,
    reference: &mut Reference,
    tokens: usize,
) -> Result<()> {
    for l in 0..engine.num_layers() {
        let keep = tokens.min(reference.len(l));
        engine.set_seq_len(l, keep)?;
        for row in &mut reference.tokens[l] {
            row.truncate(keep);
        }
    }
    Ok(())
}

/// Reorders the batch of every layer as beam search does (`new[b] = old[idx[b]]`),
/// in the engine (through [`Engine::reorder`]) and in the reference.
pub fn reorder(
    engine: &mut Engine<HostBackend>,
    reference: &mut Reference,
    idx: &[usize],
) -> Result<()> {
    engine.reorder(idx, Stream::Foreign(0))?;
    for (l, spec) in engine.specs().iter().enumerate() {
        let heads = spec.kv_heads;
        let rows = reference.tokens[l].clone();
        for (b, &src) in idx.iter().enumerate() {
            for h in 0..heads {
                reference.tokens[l][b * heads + h] = rows[src * heads + h].clone();
            }
        }
    }
    Ok(())
}

/// The plan pooling the layers whose `mask` entry is true, with `depth`
/// staging slots, of which those whose `host` entry is also true are attended
/// on the host (a `host` shorter than `mask` leaves the rest copied).
pub fn placed_plan_of(mask: &[bool], host: &[bool], depth: usize) -> Plan {
    let mut plan = plan_of(mask, depth);
    plan.host_attended = plan
        .pooled
        .iter()
        .copied()
        .filter(|&l| host.get(l).copied().unwrap_or(false))
        .collect();
    plan
}

/// The plan pooling the layers whose `mask` entry is true, with `depth` staging slots.
pub fn plan_of(mask: &[bool], depth: usize) -> Plan {
    Plan::copying(
        mask.iter()
            .enumerate()
            .filter(|(_, p)| **p)
            .map(|(i, _)| i)
            .collect(),
        depth,
    )
}
