//! Decode attention on the host, over KV that lives in host memory.
//!
//! A pooled layer's KV need not cross the link: the layer's query can come to
//! the host instead, the host computes attention over the tokens it holds and
//! returns, per query row, the output and the log-sum-exp (LSE) of its
//! logits. A device-side partial over other tokens (the newest ones) is then
//! merged exactly with [`merge_into`] (or `pie_rs.host_attention.merge` in
//! Python): softmax over a union of key sets is a weighted mean of the
//! per-set results, weighted by `exp(lse)`.
//!
//! Shapes follow HF attention:
//! - query `[batch, q_heads, q_len, k_dim]` (f32, f16 or bf16),
//! - key `[batch, kv_heads, tokens, k_dim]`, value `[batch, kv_heads, tokens, v_dim]`
//!   (bf16, f16 or f32; the engine's layer layout, K block then V block, is
//!   [`layer_kv`]), `q_heads` a multiple of `kv_heads` (GQA: query head `h`
//!   reads KV head `h / (q_heads / kv_heads)`),
//! - out `[batch, q_heads, q_len, v_dim]` and lse `[batch, q_heads, q_len]`, f32.
//!
//! Query row `i` of sequence `b` sits at position `p = query_positions[b] + i`
//! (default: `lengths[b] - q_len`, the queries are the last tokens). Key `j`
//! is visible to it when `j < lengths[b]`, `j <= p` if causal,
//! `j > p - window` with a sliding window, and the mask allows it. A row that
//! sees no key gets output 0 and lse `-inf` (SDPA would give NaN), which is
//! what the merge needs for an empty side.
//!
//! How it runs: work is split by (sequence, KV head) and, when that gives too
//! few pieces for the threads, by token range too; each piece reads its KV
//! once for the whole query group (the GQA heads and the q_len rows), in
//! tiles converted to f32, with an online softmax (running max and sum, so no
//! logit is exponentiated before the max is subtracted). Token-range pieces
//! are merged with the same LSE merge. Dot products, exponentials and the
//! weighted sums of V are SIMD through `pulp` (AVX2/FMA, AVX-512, NEON chosen
//! at run time); threads are a `rayon` pool owned by [`HostAttention`].

mod bandwidth;
mod kernel;
mod merge;
#[cfg(test)]
mod tests;

pub use bandwidth::Triad;
pub use merge::merge_into;

use crate::attention::kernel::{Block, Ctx};
pub use half::{bf16, f16};
use pie_core::error::{PieError, Result};
use pie_core::LayerSpec;
use rayon::prelude::*;

/// Tokens of one tile: K and V of a tile are converted to f32 together (32 x
/// 128 x 4 B = 16 KiB each, so both stay in L1).
const TILE: usize = 32;
/// The smallest token range one piece of work takes by default.
const DEFAULT_MIN_CHUNK: usize = 512;

/// An element type of queries or KV: f32, f16 or bf16.
pub trait Element: Copy + Send + Sync + 'static + private::Sealed {
    /// The dtype's name, as in torch (`"float32"`, `"float16"`, `"bfloat16"`).
    const NAME: &'static str;
    /// Widens `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [f32]);
    /// Narrows an f32 (rounding to nearest); used by tests and benches to build inputs.
    fn from_f32(x: f32) -> Self;
    /// Widens one element.
    fn to_f32(self) -> f32;
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

impl Element for f32 {
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f16 {
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn load(src: &[f16], dst: &mut [f32]) {
        // F16C where the CPU has it (detected at run time by `half`).
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bfloat16";
    #[inline(always)]
    fn load(src: &[bf16], dst: &mut [f32]) {
        // bf16 is the top half of an f32: a shift, which the compiler
        // vectorises inside the SIMD-dispatched kernel.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// A read-only strided 4-D view over a slice: element `[a, b, c, d]` is
/// `data[a*s0 + b*s1 + c*s2 + d*s3]`. The innermost dimension must be dense
/// (`s3 == 1`) wherever it has more than one element; a stride of 0 broadcasts.
/// Construction checks every element lies inside `data`, so reads never fail.
#[derive(Clone, Copy, Debug)]
pub struct View4<'a, T> {
    data: &'a [T],
    shape: [usize; 4],
    strides: [usize; 4],
}

impl<'a, T> View4<'a, T> {
    /// A view with explicit strides (in elements). Errors if an element would
    /// lie outside `data` or the innermost dimension is not dense.
    pub fn new(data: &'a [T], shape: [usize; 4], strides: [usize; 4]) -> Result<Self> {
        if shape[3] > 1 && strides[3] != 1 {
            return Err(PieError::config(format!(
                "the innermost dimension must be contiguous (stride 1), got strides {strides:?}; \
                 make the tensor contiguous along its last dimension"
            )));
        }
        if shape.contains(&0) {
            return Ok(View4 {
                data,
                shape,
                strides,
            });
        }
        let mut last = 0usize;
        for (d, s) in shape.iter().zip(&strides) {
            last = (d - 1)
                .checked_mul(*s)
                .and_then(|x| last.checked_add(x))
                .ok_or_else(|| {
                    PieError::config(format!(
                        "shape {shape:?} with strides {strides:?} overflows the address space"
                    ))
                })?;
        }
        if last >= data.len() {
            return Err(PieError::config(format!(
                "shape {shape:?} with strides {strides:?} reaches element {last}, \
                 past the {} elements given",
                data.len()
            )));
        }
        Ok(View4 {
            data,
            shape,
            strides,
        })
    }

    /// A dense row-major view of `shape` over the start of `data`.
    pub fn contiguous(data: &'a [T], shape: [usize; 4]) -> Result<Self> {
        let strides = [
            shape[1] * shape[2] * shape[3],
            shape[2] * shape[3],
            shape[3],
            1,
        ];
        Self::new(data, shape, strides)
    }

    /// The shape.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The strides, in elements.
    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }

    /// The sub-view of `len` positions from `start` along dimension `dim`
    /// (for example tokens `[start, start + len)` of a KV view).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        if dim >= 4 || start.checked_add(len).is_none_or(|e| e > self.shape[dim]) {
            return Err(PieError::config(format!(
                "cannot take {len} positions from {start} of dimension {dim} of shape {:?}",
                self.shape
            )));
        }
        let mut shape = self.shape;
        shape[dim] = len;
        let data = if len == 0 || shape.contains(&0) {
            &self.data[..0]
        } else {
            &self.data[start * self.strides[dim]..]
        };
        Self::new(data, shape, self.strides)
    }

    /// The innermost row at `[a, b, c, ..]`; indices must be in range.
    #[inline(always)]
    fn row(&self, a: usize, b: usize, c: usize) -> &'a [T] {
        debug_assert!(a < self.shape[0] && b < self.shape[1] && c < self.shape[2]);
        let o = a * self.strides[0] + b * self.strides[1] + c * self.strides[2];
        &self.data[o..o + self.shape[3]]
    }
}

/// The K and V views of one layer in the engine's layout
/// ([`pie_core::layout`]): K `[batch, kv_heads, capacity, k_dim]` then V
/// `[batch, kv_heads, capacity, v_dim]`, contiguous, starting at `layer[0]`.
pub fn layer_kv<'a, T: Element>(
    layer: &'a [T],
    spec: &LayerSpec,
    capacity: usize,
) -> Result<(View4<'a, T>, View4<'a, T>)> {
    spec.validate()?;
    if spec.elem_size != std::mem::size_of::<T>() {
        return Err(PieError::config(format!(
            "the layer holds {}-byte elements but {} was asked for; pass the cache's dtype",
            spec.elem_size,
            T::NAME
        )));
    }
    let bytes = spec.checked_bytes(capacity).ok_or_else(|| {
        PieError::config(format!("capacity {capacity} overflows the layer {spec:?}"))
    })?;
    let elems = bytes / spec.elem_size;
    if layer.len() < elems {
        return Err(PieError::config(format!(
            "the layer needs {elems} elements at capacity {capacity}, {} given",
            layer.len()
        )));
    }
    let k_elems = spec.k_bytes(capacity) / spec.elem_size;
    let (k, v) = layer[..elems].split_at(k_elems);
    Ok((
        View4::contiguous(k, [spec.batch, spec.kv_heads, capacity, spec.k_dim])?,
        View4::contiguous(v, [spec.batch, spec.kv_heads, capacity, spec.v_dim])?,
    ))
}

/// Which keys a mask lets each query row see, per `[batch, q_head, q_row, key]`;
/// each of the first three dimensions may be 1 (broadcast), the last must
/// cover every valid key (`>= max(lengths)`).
#[derive(Clone, Copy, Debug, Default)]
pub enum Mask<'a> {
    /// No mask beyond lengths, causality and the window.
    #[default]
    None,
    /// Non-zero: the key may be attended (torch's boolean masks, as bytes).
    Bool(View4<'a, u8>),
    /// Added to the scaled logits (0 or `-inf`, or any float).
    Additive(View4<'a, f32>),
}

/// What one call computes beyond the shapes.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionOptions<'a> {
    /// Multiplies the logits; default `1 / sqrt(k_dim)`.
    pub scale: Option<f32>,
    /// Key `j` is visible to a query at position `p` only if `j <= p`.
    pub causal: bool,
    /// Sliding window: key `j` is visible only if `p - j < window`.
    pub window: Option<usize>,
    /// Logit soft-capping (Gemma-2): `cap * tanh(logit / cap)` after scaling.
    pub softcap: Option<f32>,
    /// Valid tokens per sequence (`[batch]`); default all tokens of the view.
    pub lengths: Option<&'a [usize]>,
    /// Position of query row 0 per sequence (`[batch]`); default `lengths[b] - q_len`.
    pub query_positions: Option<&'a [usize]>,
    /// A padding or custom mask.
    pub mask: Mask<'a>,
}

/// The host attention kernel with its thread pool.
pub struct HostAttention {
    pool: rayon::ThreadPool,
    arch: pulp::Arch,
    min_chunk: usize,
}

impl std::fmt::Debug for HostAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAttention")
            .field("threads", &self.threads())
            .field("min_chunk", &self.min_chunk)
            .finish()
    }
}

impl HostAttention {
    /// A kernel running on `threads` threads (0: one per available core).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("pie-attn-{i}"))
            .build()
            .map_err(|e| PieError::backend("host attention thread pool", e))?;
        Ok(HostAttention {
            pool,
            arch: pulp::Arch::new(),
            min_chunk: DEFAULT_MIN_CHUNK,
        })
    }

    /// Sets the smallest token range one piece of work takes (default 512):
    /// below it, a sequence's tokens are not split between threads.
    pub fn with_min_chunk(mut self, tokens: usize) -> Self {
        self.min_chunk = tokens.max(1);
        self
    }

    /// Threads of the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub(crate) fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }

    /// Attention of `query` over `key`/`value` into `out`
    /// (`[batch, q_heads, q_len, v_dim]`, dense) and `lse` (`[batch, q_heads, q_len]`).
    /// See the module documentation for the semantics. Bad shapes or options
    /// are a `Config` error and leave `out` and `lse` untouched.
    pub fn forward<Q: Element, K: Element>(
        &self,
        query: View4<'_, Q>,
        key: View4<'_, K>,
        value: View4<'_, K>,
        opts: &AttentionOptions<'_>,
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        let ctx = Ctx::new(query, key, value, opts, out.len(), lse.len())?;
        let rows = ctx.group * ctx.q_len;
        if rows == 0 || ctx.batch == 0 || ctx.kv_heads == 0 {
            return Ok(());
        }
        let max_len = ctx.lengths.iter().copied().max().unwrap_or(0);
        let blocks = ctx.batch * ctx.kv_heads;
        let want = (4 * self.threads()).div_ceil(blocks);
        let n_chunks = want.min(max_len.div_ceil(self.min_chunk)).max(1);
        let chunk = max_len.div_ceil(n_chunks).max(1);
        let arch = self.arch;
        let dv = ctx.v_dim;
        let run = || {
            out.par_chunks_mut(rows * dv)
                .zip(lse.par_chunks_mut(rows))
                .enumerate()
                .for_each(|(idx, (o, l))| {
                    let (b, kh) = (idx / ctx.kv_heads, idx % ctx.kv_heads);
                    if n_chunks == 1 {
                        arch.dispatch(Block::new(&ctx, b, kh, 0, max_len, o, l));
                        return;
                    }
                    let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..n_chunks)
                        .into_par_iter()
                        .map(|c| {
                            let mut po = vec![0.0; rows * dv];
                            let mut pl = vec![0.0; rows];
                            let t0 = c * chunk;
                            let t1 = (t0 + chunk).min(max_len);
                            arch.dispatch(Block::new(&ctx, b, kh, t0, t1, &mut po, &mut pl));
                            (po, pl)
                        })
                        .collect();
                    let mut parts = parts.into_iter();
                    if let Some((po, pl)) = parts.next() {
                        o.copy_from_slice(&po);
                        l.copy_from_slice(&pl);
                    }
                    for (po, pl) in parts {
                        merge::merge_rows(o, l, &po, &pl, dv);
                    }
                });
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.pool.install(run)))
            .map_err(|_| PieError::internal("the host attention kernel panicked"))
    }
}

/// Which element types a dtype name is; used by the bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// `float32`
    F32,
    /// `float16`
    F16,
    /// `bfloat16`
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Parses `"float32"`, `"float16"`, `"bfloat16"` (with or without `torch.`).
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim_start_matches("torch.") {
            "float32" | "float" => Ok(DType::F32),
            "float16" | "half" => Ok(DType::F16),
            "bfloat16" => Ok(DType::BF16),
            other => Err(PieError::config(format!(
                "dtype {other:?} is not supported by host attention; use float32, float16 or bfloat16"
            ))),
        }
    }
}
