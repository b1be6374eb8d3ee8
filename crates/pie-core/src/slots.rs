//! Slot bookkeeping for the two arenas.
//!
//! The device arena is one allocation carved into a slot per resident layer
//! followed by `W` staging slots that pooled layers borrow; the host arena is
//! one allocation holding every layer's backing buffer. A layout is computed
//! from the layer shapes, the capacity and the plan; the engine rebuilds the
//! arenas only when the layout changes (plan switch, capacity growth), moving
//! every valid byte across, so growth never loses data.

use crate::error::{PieError, Result};
use crate::layout::{align_up, LayerSpec, SLOT_ALIGN};
use crate::plan::Plan;

/// Where a layer's KV lives under a layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residence {
    /// Owns a device slot at this byte offset of the device arena.
    Resident {
        /// Byte offset of the layer's slot in the device arena.
        device_offset: usize,
    },
    /// Lives in the host arena at this byte offset and borrows a staging slot
    /// while it runs (which one: [`crate::schedule::Schedule::slot_of`]).
    Pooled {
        /// Byte offset of the layer's buffer in the host arena.
        host_offset: usize,
    },
}

/// Where every slot sits in both arenas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArenaLayout {
    /// Tokens each layer's buffers hold.
    pub capacity: usize,
    /// Per layer: byte offset of its device slot, if resident.
    pub device_slot: Vec<Option<usize>>,
    /// Byte offsets of the staging slots in the device arena.
    pub staging: Vec<usize>,
    /// Bytes of each staging slot (the largest pooled layer).
    pub staging_bytes: usize,
    /// Total bytes of the device arena.
    pub device_bytes: usize,
    /// Per layer: byte offset of its buffer in the host arena, if pooled
    /// (resident layers have no host copy: pinned memory is spent only on
    /// what is pooled).
    pub host_slot: Vec<Option<usize>>,
    /// Total bytes of the host arena.
    pub host_bytes: usize,
}

impl ArenaLayout {
    /// Lays out both arenas for `plan` at `capacity` tokens.
    pub fn new(specs: &[LayerSpec], capacity: usize, plan: &Plan) -> Result<Self> {
        plan.validate(specs.len())?;
        check_capacity(specs, capacity)?;
        let mut off = 0usize;
        let mut device_slot = vec![None; specs.len()];
        for (i, spec) in specs.iter().enumerate() {
            if !plan.is_pooled(i) {
                device_slot[i] = Some(off);
                off = checked_add(off, align_up(spec.bytes(capacity), SLOT_ALIGN))?;
            }
        }
        let staging_bytes = plan
            .pooled
            .iter()
            .map(|&l| align_up(specs[l].bytes(capacity), SLOT_ALIGN))
            .max()
            .unwrap_or(0);
        let mut staging = Vec::with_capacity(plan.staging_slots());
        for _ in 0..plan.staging_slots() {
            staging.push(off);
            off = checked_add(off, staging_bytes)?;
        }
        let mut host_off = 0usize;
        let mut host_slot = vec![None; specs.len()];
        for &l in &plan.pooled {
            host_slot[l] = Some(host_off);
            host_off = checked_add(host_off, align_up(specs[l].bytes(capacity), SLOT_ALIGN))?;
        }
        Ok(ArenaLayout {
            capacity,
            device_slot,
            staging,
            staging_bytes,
            device_bytes: off,
            host_slot,
            host_bytes: host_off,
        })
    }

    /// Where `layer` lives under this layout: the one answer to that question.
    pub fn residence(&self, layer: usize) -> Residence {
        match (self.device_slot[layer], self.host_slot[layer]) {
            (Some(device_offset), _) => Residence::Resident { device_offset },
            (None, Some(host_offset)) => Residence::Pooled { host_offset },
            (None, None) => unreachable!("a layout places every layer in one arena or the other"),
        }
    }

    /// Device bytes `plan` needs at `capacity`, without building the layout.
    pub fn device_bytes_for(specs: &[LayerSpec], capacity: usize, plan: &Plan) -> usize {
        let resident: usize = (0..specs.len())
            .filter(|i| !plan.is_pooled(*i))
            .map(|i| align_up(specs[i].bytes(capacity), SLOT_ALIGN))
            .sum();
        let staging = plan
            .pooled
            .iter()
            .map(|&l| align_up(specs[l].bytes(capacity), SLOT_ALIGN))
            .max()
            .unwrap_or(0);
        resident + staging * plan.staging_slots()
    }
}

/// Checks that every layer at `capacity` tokens, and all of them together,
/// fit the address space, so no size computation downstream can overflow.
pub fn check_capacity(specs: &[LayerSpec], capacity: usize) -> Result<()> {
    let mut total = 0usize;
    for s in specs {
        let bytes = s.checked_bytes(capacity).ok_or_else(|| {
            PieError::config(format!(
                "a capacity of {capacity} tokens makes a layer's KV overflow the address space; lower the capacity or batch"
            ))
        })?;
        total = checked_add(total, align_up(bytes, SLOT_ALIGN))?;
    }
    if total > isize::MAX as usize / 2 {
        return Err(PieError::config(format!(
            "{total} bytes of KV at {capacity} tokens cannot be addressed; lower the capacity or batch"
        )));
    }
    Ok(())
}

fn checked_add(a: usize, b: usize) -> Result<usize> {
    a.checked_add(b).ok_or_else(|| {
        PieError::config(
            "the KV cache size overflows the address space; lower the capacity or batch",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(n: usize) -> Vec<LayerSpec> {
        (0..n)
            .map(|i| LayerSpec {
                batch: 1,
                kv_heads: 2,
                k_dim: 8 + i,
                v_dim: 8,
                elem_size: 2,
            })
            .collect()
    }

    #[test]
    fn slots_do_not_overlap_and_fit() {
        let s = specs(6);
        let plan = Plan::copying(vec![1, 3, 5], 2);
        let l = ArenaLayout::new(&s, 37, &plan).unwrap();
        let mut ranges: Vec<(usize, usize)> = l
            .device_slot
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.map(|o| (o, s[i].bytes(37))))
            .chain(l.staging.iter().map(|&o| (o, l.staging_bytes)))
            .collect();
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
        assert!(ranges.iter().all(|&(o, n)| o + n <= l.device_bytes));
        assert!(ranges.iter().all(|&(o, _)| o % SLOT_ALIGN == 0));
        assert_eq!(l.device_bytes, ArenaLayout::device_bytes_for(&s, 37, &plan));
        assert_eq!(l.staging.len(), 2);
        assert_eq!(l.staging_bytes, align_up(s[5].bytes(37), SLOT_ALIGN));
    }
}
