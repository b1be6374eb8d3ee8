//! The byte layout of one layer's KV: K `[batch, kv_heads, capacity, k_dim]`
//! followed by V `[batch, kv_heads, capacity, v_dim]`, both contiguous, exactly
//! as HF attention expects. The same layout is used in device slots, staging
//! slots and host buffers, so copies are the same shapes on both sides.

use crate::backend::CopyShape;
use crate::error::{PieError, Result};

/// The shape of one decoder layer's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerSpec {
    /// Batch size (beams included).
    pub batch: usize,
    /// Number of key/value heads.
    pub kv_heads: usize,
    /// Head dimension of keys.
    pub k_dim: usize,
    /// Head dimension of values.
    pub v_dim: usize,
    /// Bytes per element (2 for bf16/fp16, 4 for fp32).
    pub elem_size: usize,
}

impl LayerSpec {
    /// Checks every dimension is positive and the element size is sane.
    pub fn validate(&self) -> Result<()> {
        if self.checked_bytes(1).is_none() {
            return Err(PieError::config(format!(
                "layer shape {self:?} overflows the address space; check batch, heads and head dims"
            )));
        }
        if self.batch == 0 || self.kv_heads == 0 || self.k_dim == 0 || self.v_dim == 0 {
            return Err(PieError::config(format!(
                "layer shape {self:?} has a zero dimension; batch, kv_heads and head dims must be positive"
            )));
        }
        if !matches!(self.elem_size, 1 | 2 | 4 | 8) {
            return Err(PieError::config(format!(
                "element size {} is not supported; use a 1, 2, 4 or 8 byte dtype",
                self.elem_size
            )));
        }
        Ok(())
    }

    /// Rows of each of K and V (`batch * kv_heads`).
    pub fn rows(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// Bytes of one token of K in one row.
    pub fn k_token_bytes(&self) -> usize {
        self.k_dim * self.elem_size
    }

    /// Bytes of one token of V in one row.
    pub fn v_token_bytes(&self) -> usize {
        self.v_dim * self.elem_size
    }

    /// Bytes of the K block at `capacity` tokens.
    pub fn k_bytes(&self, capacity: usize) -> usize {
        self.rows() * capacity * self.k_token_bytes()
    }

    /// Bytes of the whole layer (K then V) at `capacity` tokens.
    pub fn bytes(&self, capacity: usize) -> usize {
        self.rows() * capacity * (self.k_token_bytes() + self.v_token_bytes())
    }

    /// Bytes of the whole layer at `capacity` tokens, or `None` if that
    /// overflows the address space (an absurd capacity or batch).
    pub fn checked_bytes(&self, capacity: usize) -> Option<usize> {
        let token = self
            .k_dim
            .checked_mul(self.elem_size)?
            .checked_add(self.v_dim.checked_mul(self.elem_size)?)?;
        let bytes = self
            .batch
            .checked_mul(self.kv_heads)?
            .checked_mul(capacity)?
            .checked_mul(token)?;
        // Leave room for slot alignment and arena sums.
        (bytes <= isize::MAX as usize / 4).then_some(bytes)
    }

    /// Byte offset of the V block from the start of the layer's slot at
    /// `capacity` tokens (K starts at 0).
    pub fn v_offset(&self, capacity: usize) -> usize {
        self.k_bytes(capacity)
    }

    /// Bytes the layer's slot takes in an arena at `capacity` tokens: K and V
    /// rounded up to [`SLOT_ALIGN`].
    pub fn slot_bytes(&self, capacity: usize) -> usize {
        align_up(self.bytes(capacity), SLOT_ALIGN)
    }

    /// Where K and V lie inside the layer's slot at `capacity` tokens, checked:
    /// a [`PieError::Config`] for an invalid shape or a size that overflows.
    pub fn geometry(&self, capacity: usize) -> Result<SlotGeometry> {
        self.validate()?;
        let bytes = self.checked_bytes(capacity).ok_or_else(|| {
            PieError::config(format!(
                "a capacity of {capacity} tokens makes layer {self:?} overflow the address space; lower the capacity or batch"
            ))
        })?;
        let (b, h, c) = (self.batch, self.kv_heads, capacity);
        let strides = |dim: usize| [h * c * dim, c * dim, dim, 1];
        Ok(SlotGeometry {
            capacity,
            k_offset: 0,
            v_offset: self.v_offset(capacity),
            k_shape: [b, h, c, self.k_dim],
            v_shape: [b, h, c, self.v_dim],
            k_strides: strides(self.k_dim),
            v_strides: strides(self.v_dim),
            bytes,
            slot_bytes: align_up(bytes, SLOT_ALIGN),
        })
    }

    /// Bytes of `tokens` valid tokens (what a copy of the valid part moves).
    pub fn valid_bytes(&self, tokens: usize) -> usize {
        self.bytes(tokens)
    }

    /// The copies (offset into the layer block, shape) that move tokens
    /// `[start, start + n)` of K and of V between two buffers of the same
    /// `capacity`. Dense ranges collapse into single large copies.
    pub fn token_range_copies(
        &self,
        capacity: usize,
        start: usize,
        n: usize,
    ) -> [(usize, CopyShape); 2] {
        let k_tok = self.k_token_bytes();
        let v_tok = self.v_token_bytes();
        let k_pitch = capacity * k_tok;
        let v_pitch = capacity * v_tok;
        let v_base = self.k_bytes(capacity);
        [
            (
                start * k_tok,
                CopyShape {
                    width: n * k_tok,
                    height: self.rows(),
                    src_pitch: k_pitch,
                    dst_pitch: k_pitch,
                }
                .normalized(),
            ),
            (
                v_base + start * v_tok,
                CopyShape {
                    width: n * v_tok,
                    height: self.rows(),
                    src_pitch: v_pitch,
                    dst_pitch: v_pitch,
                }
                .normalized(),
            ),
        ]
    }

    /// The copies that move the first `tokens` tokens from a buffer of
    /// capacity `src_cap` into one of capacity `dst_cap` (growth and shrink):
    /// `(src offset, dst offset, shape)`.
    pub fn relayout_copies(
        &self,
        src_cap: usize,
        dst_cap: usize,
        tokens: usize,
    ) -> [(usize, usize, CopyShape); 2] {
        let k_tok = self.k_token_bytes();
        let v_tok = self.v_token_bytes();
        [
            (
                0,
                0,
                CopyShape {
                    width: tokens * k_tok,
                    height: self.rows(),
                    src_pitch: src_cap * k_tok,
                    dst_pitch: dst_cap * k_tok,
                }
                .normalized(),
            ),
            (
                self.k_bytes(src_cap),
                self.k_bytes(dst_cap),
                CopyShape {
                    width: tokens * v_tok,
                    height: self.rows(),
                    src_pitch: src_cap * v_tok,
                    dst_pitch: dst_cap * v_tok,
                }
                .normalized(),
            ),
        ]
    }
}

/// Where one layer's K and V lie inside its slot at a given capacity: all a
/// caller needs to view them as tensors over an arena (see [`LayerSpec::geometry`]).
/// K `[batch, kv_heads, capacity, k_dim]` comes first, V `[batch, kv_heads,
/// capacity, v_dim]` right after it, both contiguous and row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotGeometry {
    /// Tokens each sequence of the slot holds.
    pub capacity: usize,
    /// Byte offset of K from the slot's start (0).
    pub k_offset: usize,
    /// Byte offset of V from the slot's start (the bytes of K).
    pub v_offset: usize,
    /// Shape of K: `[batch, kv_heads, capacity, k_dim]`.
    pub k_shape: [usize; 4],
    /// Shape of V: `[batch, kv_heads, capacity, v_dim]`.
    pub v_shape: [usize; 4],
    /// Strides of K in elements, one per dimension of `k_shape`.
    pub k_strides: [usize; 4],
    /// Strides of V in elements, one per dimension of `v_shape`.
    pub v_strides: [usize; 4],
    /// Bytes of K and V together.
    pub bytes: usize,
    /// Bytes the slot takes in an arena: `bytes` rounded up to [`SLOT_ALIGN`]
    /// (slots of an arena lie this far apart).
    pub slot_bytes: usize,
}

/// Rounds `n` up to a multiple of `align` (a power of two).
pub fn align_up(n: usize, align: usize) -> usize {
    debug_assert!(align.is_power_of_two());
    (n + align - 1) & !(align - 1)
}

/// Alignment of every slot in an arena: enough for any dtype and for DMA.
pub const SLOT_ALIGN: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LayerSpec {
        LayerSpec {
            batch: 2,
            kv_heads: 3,
            k_dim: 4,
            v_dim: 5,
            elem_size: 2,
        }
    }

    #[test]
    fn sizes_add_up() {
        let s = spec();
        assert_eq!(s.bytes(10), 2 * 3 * 10 * (4 + 5) * 2);
        assert_eq!(s.k_bytes(10), 2 * 3 * 10 * 4 * 2);
    }

    #[test]
    fn full_range_collapses_to_one_copy() {
        let s = spec();
        let [(ko, k), (vo, v)] = s.token_range_copies(10, 0, 10);
        assert_eq!((ko, k.height, k.width), (0, 1, s.k_bytes(10)));
        assert_eq!(vo, s.k_bytes(10));
        assert_eq!(v.bytes(), 2 * 3 * 10 * 5 * 2);
    }

    #[test]
    fn geometry_places_v_after_k_and_aligns_the_slot() {
        let s = spec();
        let g = s.geometry(10).unwrap();
        assert_eq!((g.k_offset, g.v_offset), (0, s.k_bytes(10)));
        assert_eq!(g.k_shape, [2, 3, 10, 4]);
        assert_eq!(g.v_strides, [3 * 10 * 5, 10 * 5, 5, 1]);
        assert_eq!(g.bytes, s.bytes(10));
        assert_eq!(g.slot_bytes, s.slot_bytes(10));
        assert_eq!(g.slot_bytes % SLOT_ALIGN, 0);
        assert!(g.slot_bytes >= g.bytes && g.slot_bytes < g.bytes + SLOT_ALIGN);
        // The last element of V is the last byte of the layer.
        let last: usize = (0..4).map(|d| (g.v_shape[d] - 1) * g.v_strides[d]).sum();
        assert_eq!(g.v_offset + (last + 1) * s.elem_size, g.bytes);
    }

    #[test]
    fn geometry_rejects_bad_shapes_and_overflow() {
        let zero = LayerSpec { batch: 0, ..spec() };
        assert_eq!(
            zero.geometry(4).unwrap_err().kind(),
            crate::ErrorKind::Config
        );
        assert_eq!(
            spec().geometry(usize::MAX).unwrap_err().kind(),
            crate::ErrorKind::Config
        );
    }

    #[test]
    fn delta_is_strided() {
        let s = spec();
        let [(ko, k), _] = s.token_range_copies(10, 7, 1);
        assert_eq!(ko, 7 * 8);
        assert_eq!((k.width, k.height, k.src_pitch), (8, 6, 80));
    }
}
