//! The per-piece kernel: one (sequence, KV head, token range), all the query
//! rows that share that KV head, an online softmax over tiles of tokens.
//! Validation happens once in [`Ctx::new`]; after it, every index the kernel
//! forms is in range.

use super::{AttentionOptions, Element, Mask, View4, TILE};
use pie_core::error::{PieError, Result};
use pulp::{Simd, WithSimd};

/// A validated call: shapes, resolved lengths and positions, options.
pub(crate) struct Ctx<'a, Q, K> {
    pub(crate) batch: usize,
    pub(crate) kv_heads: usize,
    /// Query heads per KV head.
    pub(crate) group: usize,
    pub(crate) q_len: usize,
    pub(crate) k_dim: usize,
    pub(crate) v_dim: usize,
    query: View4<'a, Q>,
    key: View4<'a, K>,
    value: View4<'a, K>,
    pub(crate) lengths: Vec<usize>,
    positions: Vec<usize>,
    scale: f32,
    causal: bool,
    window: Option<usize>,
    softcap: Option<f32>,
    mask: Mask<'a>,
}

fn cfg(msg: String) -> PieError {
    PieError::config(msg)
}

impl<'a, Q: Element, K: Element> Ctx<'a, Q, K> {
    pub(crate) fn new(
        query: View4<'a, Q>,
        key: View4<'a, K>,
        value: View4<'a, K>,
        opts: &AttentionOptions<'a>,
        out_len: usize,
        lse_len: usize,
    ) -> Result<Self> {
        let [batch, q_heads, q_len, k_dim] = query.shape();
        let [kb, kv_heads, tokens, kd] = key.shape();
        let [vb, vh, vt, v_dim] = value.shape();
        if kb != batch || vb != batch {
            return Err(cfg(format!(
                "batch sizes differ: query {batch}, key {kb}, value {vb}"
            )));
        }
        if vh != kv_heads || vt != tokens {
            return Err(cfg(format!(
                "key {:?} and value {:?} differ in heads or tokens",
                key.shape(),
                value.shape()
            )));
        }
        if kd != k_dim {
            return Err(cfg(format!(
                "query head dim {k_dim} differs from key head dim {kd}"
            )));
        }
        if k_dim == 0 || v_dim == 0 {
            return Err(cfg("head dims must be positive".into()));
        }
        if kv_heads == 0 && q_heads != 0 {
            return Err(cfg("the KV has no heads but the query has some".into()));
        }
        if kv_heads != 0 && q_heads % kv_heads != 0 {
            return Err(cfg(format!(
                "{q_heads} query heads are not a multiple of {kv_heads} KV heads (GQA needs q_heads = k * kv_heads)"
            )));
        }
        let group = q_heads.checked_div(kv_heads).unwrap_or(0);
        let rows = batch * q_heads * q_len;
        let want_out = rows
            .checked_mul(v_dim)
            .ok_or_else(|| cfg("output too large".into()))?;
        if out_len != want_out || lse_len != rows {
            return Err(cfg(format!(
                "out must hold {want_out} floats ([batch, q_heads, q_len, v_dim] = [{batch}, {q_heads}, {q_len}, {v_dim}]) \
                 and lse {rows}; got {out_len} and {lse_len}"
            )));
        }
        let lengths = match opts.lengths {
            None => vec![tokens; batch],
            Some(l) => {
                if l.len() != batch {
                    return Err(cfg(format!(
                        "lengths has {} entries for a batch of {batch}",
                        l.len()
                    )));
                }
                if let Some(bad) = l.iter().find(|&&n| n > tokens) {
                    return Err(cfg(format!(
                        "a length of {bad} exceeds the {tokens} tokens of the KV"
                    )));
                }
                l.to_vec()
            }
        };
        if opts.window == Some(0) {
            return Err(cfg("a sliding window must be at least 1 token".into()));
        }
        let positional = opts.causal || opts.window.is_some();
        let positions = match opts.query_positions {
            Some(p) => {
                if p.len() != batch {
                    return Err(cfg(format!(
                        "query_positions has {} entries for a batch of {batch}",
                        p.len()
                    )));
                }
                if p.iter().any(|&x| x.checked_add(q_len).is_none()) {
                    return Err(cfg("a query position overflows".into()));
                }
                p.to_vec()
            }
            None => {
                if positional && lengths.iter().any(|&n| n < q_len && n > 0) {
                    return Err(cfg(format!(
                        "with causal or windowed attention and fewer valid keys than the {q_len} queries, \
                         the queries' positions are ambiguous; pass query_positions"
                    )));
                }
                lengths.iter().map(|&n| n.saturating_sub(q_len)).collect()
            }
        };
        let scale = opts.scale.unwrap_or(1.0 / (k_dim as f32).sqrt());
        if !scale.is_finite() {
            return Err(cfg(format!("scale {scale} is not finite")));
        }
        if let Some(c) = opts.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(cfg(format!("softcap {c} must be positive and finite")));
            }
        }
        let max_len = lengths.iter().copied().max().unwrap_or(0);
        let check_mask = |shape: [usize; 4]| -> Result<()> {
            let ok = (shape[0] == 1 || shape[0] == batch)
                && (shape[1] == 1 || shape[1] == q_heads)
                && (shape[2] == 1 || shape[2] == q_len)
                && shape[3] >= max_len;
            if ok {
                Ok(())
            } else {
                Err(cfg(format!(
                    "mask shape {shape:?} does not fit [batch or 1, q_heads or 1, q_len or 1, >= {max_len} keys] \
                     for batch {batch}, {q_heads} heads, {q_len} queries"
                )))
            }
        };
        match &opts.mask {
            Mask::None => {}
            Mask::Bool(m) => check_mask(m.shape())?,
            Mask::Additive(m) => check_mask(m.shape())?,
        }
        Ok(Ctx {
            batch,
            kv_heads,
            group,
            q_len,
            k_dim,
            v_dim,
            query,
            key,
            value,
            lengths,
            positions,
            scale,
            causal: opts.causal,
            window: opts.window,
            softcap: opts.softcap,
            mask: opts.mask,
        })
    }
}

/// One piece of work: rows of query head group `kh` of sequence `b` over
/// tokens `[t0, t1)`. Writes normalised output rows and their LSE.
pub(crate) struct Block<'c, 'a, Q, K> {
    ctx: &'c Ctx<'a, Q, K>,
    b: usize,
    kh: usize,
    t0: usize,
    t1: usize,
    out: &'c mut [f32],
    lse: &'c mut [f32],
}

impl<'c, 'a, Q, K> Block<'c, 'a, Q, K> {
    pub(crate) fn new(
        ctx: &'c Ctx<'a, Q, K>,
        b: usize,
        kh: usize,
        t0: usize,
        t1: usize,
        out: &'c mut [f32],
        lse: &'c mut [f32],
    ) -> Self {
        Block {
            ctx,
            b,
            kh,
            t0,
            t1,
            out,
            lse,
        }
    }
}

impl<Q: Element, K: Element> WithSimd for Block<'_, '_, Q, K> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let Block {
            ctx,
            b,
            kh,
            t0,
            t1,
            out,
            lse,
        } = self;
        let (g_n, l_n, dk, dv) = (ctx.group, ctx.q_len, ctx.k_dim, ctx.v_dim);
        let rows = g_n * l_n;
        let len = ctx.lengths[b];
        // The visible key range of each row, cut to this piece.
        let mut lo = vec![0usize; rows];
        let mut hi = vec![0usize; rows];
        for r in 0..rows {
            let pos = ctx.positions[b] + r % l_n;
            let mut h = len;
            if ctx.causal {
                h = h.min(pos + 1);
            }
            let l0 = ctx.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            lo[r] = l0.max(t0);
            hi[r] = h.min(t1);
        }
        let u0 = (0..rows)
            .filter(|&r| lo[r] < hi[r])
            .map(|r| lo[r])
            .min()
            .unwrap_or(0);
        let u1 = (0..rows)
            .filter(|&r| lo[r] < hi[r])
            .map(|r| hi[r])
            .max()
            .unwrap_or(0);
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0.0f32; rows];
        out.fill(0.0);
        if u0 < u1 {
            let mut q = vec![0.0f32; rows * dk];
            for r in 0..rows {
                let qh = kh * g_n + r / l_n;
                let dst = &mut q[r * dk..(r + 1) * dk];
                Q::load(ctx.query.row(b, qh, r % l_n), dst);
                scale(s, dst, ctx.scale);
            }
            let mut kt = vec![0.0f32; TILE * dk];
            let mut vt = vec![0.0f32; TILE * dv];
            let mut sc_all = vec![0.0f32; rows * TILE];
            let mut start = u0;
            while start < u1 {
                let end = (start + TILE).min(u1);
                let n = end - start;
                // Widen the tile's K and V two tokens at a time, scoring each
                // pair as it comes, and ask for the same tokens of the next
                // tile: memory traffic is spread over the computation instead
                // of stalling in one burst per tile.
                let mut t = 0;
                while t < n {
                    let pair = (n - t).min(2);
                    for j in t..t + pair {
                        let tok = start + j;
                        K::load(ctx.key.row(b, kh, tok), &mut kt[j * dk..(j + 1) * dk]);
                        K::load(ctx.value.row(b, kh, tok), &mut vt[j * dv..(j + 1) * dv]);
                        if tok + TILE < u1 {
                            prefetch(ctx.key.row(b, kh, tok + TILE));
                            prefetch(ctx.value.row(b, kh, tok + TILE));
                        }
                    }
                    scores(s, &q, &kt[t * dk..(t + pair) * dk], dk, &mut sc_all[t..]);
                    t += pair;
                }
                for r in 0..rows {
                    let (rl, rh) = (lo[r].max(start), hi[r].min(end));
                    if rl >= rh {
                        continue;
                    }
                    let sc = &mut sc_all[r * TILE..r * TILE + n];
                    if let Some(c) = ctx.softcap {
                        for x in sc.iter_mut() {
                            *x = c * (*x / c).tanh();
                        }
                    }
                    for (t, x) in sc.iter_mut().enumerate() {
                        let j = start + t;
                        if j < rl || j >= rh {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                    let qh = kh * g_n + r / l_n;
                    apply_mask(&ctx.mask, b, qh, r % l_n, start, sc);
                    let tile_max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    if tile_max == f32::NEG_INFINITY {
                        continue;
                    }
                    let m_new = m[r].max(tile_max);
                    let acc = &mut out[r * dv..(r + 1) * dv];
                    if m[r] != m_new {
                        let corr = (m[r] - m_new).exp();
                        l[r] *= corr;
                        scale(s, acc, corr);
                        m[r] = m_new;
                    }
                    l[r] += exp_sub(s, sc, m_new);
                    weighted_sum(s, sc, &vt[..n * dv], dv, acc);
                }
                start = end;
            }
        }
        for r in 0..rows {
            if l[r] > 0.0 {
                let inv = 1.0 / l[r];
                scale(s, &mut out[r * dv..(r + 1) * dv], inv);
                lse[r] = m[r] + l[r].ln();
            } else {
                out[r * dv..(r + 1) * dv].fill(0.0);
                lse[r] = f32::NEG_INFINITY;
            }
        }
    }
}

/// Hints the CPU to bring `row` towards the caches (a no-op off x86-64).
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = row.as_ptr().cast::<i8>();
        let bytes = std::mem::size_of_val(row);
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch is a hint: it never faults and its result is
            // never read; the address is inside `row` in any case.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Applies the mask row of `(b, qh, i)` to scores of keys `start..`.
#[inline(always)]
fn apply_mask(mask: &Mask<'_>, b: usize, qh: usize, i: usize, start: usize, sc: &mut [f32]) {
    fn idx(shape: [usize; 4], b: usize, qh: usize, i: usize) -> (usize, usize, usize) {
        let pick = |n: usize, x: usize| if n == 1 { 0 } else { x };
        (pick(shape[0], b), pick(shape[1], qh), pick(shape[2], i))
    }
    match mask {
        Mask::None => {}
        Mask::Bool(m) => {
            let (a, h, q) = idx(m.shape(), b, qh, i);
            let row = &m.row(a, h, q)[start..start + sc.len()];
            for (x, &keep) in sc.iter_mut().zip(row) {
                if keep == 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        Mask::Additive(m) => {
            let (a, h, q) = idx(m.shape(), b, qh, i);
            let row = &m.row(a, h, q)[start..start + sc.len()];
            for (x, &add) in sc.iter_mut().zip(row) {
                *x += add;
            }
        }
    }
}

/// `x *= a`.
#[inline(always)]
fn scale<S: Simd>(s: S, x: &mut [f32], a: f32) {
    let (head, tail) = S::as_mut_simd_f32s(x);
    let av = s.splat_f32s(a);
    for v in head {
        *v = s.mul_f32s(*v, av);
    }
    for v in tail {
        *v *= a;
    }
}

/// `out[r * TILE + t] = q_r . k_t` for every row `q_r` of `q` and each of the
/// rows `k_t` of `k` (all `dk` long). Four query rows and two tokens at a
/// time: each K vector is loaded once for four rows, and eight independent
/// FMA chains hide the FMA latency.
#[inline(always)]
fn scores<S: Simd>(s: S, q: &[f32], k: &[f32], dk: usize, out: &mut [f32]) {
    let rows = q.len() / dk;
    let n = k.len() / dk;
    let zero = s.splat_f32s(0.0);
    let mut r = 0;
    while r + 4 <= rows {
        let qs: [_; 4] =
            std::array::from_fn(|i| S::as_simd_f32s(&q[(r + i) * dk..(r + i + 1) * dk]));
        let tail =
            |kt: &[f32], i: usize| -> f32 { qs[i].1.iter().zip(kt).map(|(a, b)| a * b).sum() };
        let mut t = 0;
        while t + 2 <= n {
            let (ka, kat) = S::as_simd_f32s(&k[t * dk..(t + 1) * dk]);
            let (kb, kbt) = S::as_simd_f32s(&k[(t + 1) * dk..(t + 2) * dk]);
            let mut a = [zero; 4];
            let mut b = [zero; 4];
            for (((((x, y), q0), q1), q2), q3) in ka
                .iter()
                .zip(kb)
                .zip(qs[0].0)
                .zip(qs[1].0)
                .zip(qs[2].0)
                .zip(qs[3].0)
            {
                a[0] = s.mul_add_f32s(*q0, *x, a[0]);
                b[0] = s.mul_add_f32s(*q0, *y, b[0]);
                a[1] = s.mul_add_f32s(*q1, *x, a[1]);
                b[1] = s.mul_add_f32s(*q1, *y, b[1]);
                a[2] = s.mul_add_f32s(*q2, *x, a[2]);
                b[2] = s.mul_add_f32s(*q2, *y, b[2]);
                a[3] = s.mul_add_f32s(*q3, *x, a[3]);
                b[3] = s.mul_add_f32s(*q3, *y, b[3]);
            }
            for i in 0..4 {
                out[(r + i) * TILE + t] = s.reduce_sum_f32s(a[i]) + tail(kat, i);
                out[(r + i) * TILE + t + 1] = s.reduce_sum_f32s(b[i]) + tail(kbt, i);
            }
            t += 2;
        }
        if t < n {
            let (ka, kat) = S::as_simd_f32s(&k[t * dk..(t + 1) * dk]);
            let mut a = [zero; 4];
            for ((((x, q0), q1), q2), q3) in ka
                .iter()
                .zip(qs[0].0)
                .zip(qs[1].0)
                .zip(qs[2].0)
                .zip(qs[3].0)
            {
                a[0] = s.mul_add_f32s(*q0, *x, a[0]);
                a[1] = s.mul_add_f32s(*q1, *x, a[1]);
                a[2] = s.mul_add_f32s(*q2, *x, a[2]);
                a[3] = s.mul_add_f32s(*q3, *x, a[3]);
            }
            for i in 0..4 {
                out[(r + i) * TILE + t] = s.reduce_sum_f32s(a[i]) + tail(kat, i);
            }
        }
        r += 4;
    }
    for r in r..rows {
        let (qh, qt) = S::as_simd_f32s(&q[r * dk..(r + 1) * dk]);
        for t in 0..n {
            let (kh, kt) = S::as_simd_f32s(&k[t * dk..(t + 1) * dk]);
            // Four independent chains hide the FMA latency.
            let mut acc = [zero; 4];
            let mut qc = qh.chunks_exact(4);
            let mut kc = kh.chunks_exact(4);
            for (a, b) in (&mut qc).zip(&mut kc) {
                for i in 0..4 {
                    acc[i] = s.mul_add_f32s(a[i], b[i], acc[i]);
                }
            }
            for (a, b) in qc.remainder().iter().zip(kc.remainder()) {
                acc[0] = s.mul_add_f32s(*a, *b, acc[0]);
            }
            let v = s.add_f32s(s.add_f32s(acc[0], acc[1]), s.add_f32s(acc[2], acc[3]));
            let tail: f32 = qt.iter().zip(kt).map(|(a, b)| a * b).sum();
            out[r * TILE + t] = s.reduce_sum_f32s(v) + tail;
        }
    }
}

/// `acc += sum_t p[t] * v[t]` over the rows of `v` (each `dv` long), four
/// tokens at a time so each accumulator is loaded and stored once per four.
#[inline(always)]
fn weighted_sum<S: Simd>(s: S, p: &[f32], v: &[f32], dv: usize, acc: &mut [f32]) {
    let n = p.len();
    let mut t = 0;
    while t + 4 <= n {
        let w = [p[t], p[t + 1], p[t + 2], p[t + 3]];
        if w != [0.0; 4] {
            let rows: [_; 4] =
                std::array::from_fn(|i| S::as_simd_f32s(&v[(t + i) * dv..(t + i + 1) * dv]));
            let wv: [_; 4] = std::array::from_fn(|i| s.splat_f32s(w[i]));
            let (ah, at) = S::as_mut_simd_f32s(acc);
            for ((((a, x0), x1), x2), x3) in ah
                .iter_mut()
                .zip(rows[0].0)
                .zip(rows[1].0)
                .zip(rows[2].0)
                .zip(rows[3].0)
            {
                let x = s.mul_add_f32s(wv[0], *x0, *a);
                let y = s.mul_f32s(wv[1], *x1);
                let x = s.mul_add_f32s(wv[2], *x2, x);
                let y = s.mul_add_f32s(wv[3], *x3, y);
                *a = s.add_f32s(x, y);
            }
            for (c, a) in at.iter_mut().enumerate() {
                *a += w[0] * rows[0].1[c]
                    + w[1] * rows[1].1[c]
                    + w[2] * rows[2].1[c]
                    + w[3] * rows[3].1[c];
            }
        }
        t += 4;
    }
    while t < n {
        let w = p[t];
        if w != 0.0 {
            let (ah, at) = S::as_mut_simd_f32s(acc);
            let (vh, vt) = S::as_simd_f32s(&v[t * dv..(t + 1) * dv]);
            let wv = s.splat_f32s(w);
            for (a, x) in ah.iter_mut().zip(vh) {
                *a = s.mul_add_f32s(wv, *x, *a);
            }
            for (a, x) in at.iter_mut().zip(vt) {
                *a += w * x;
            }
        }
        t += 1;
    }
}

/// `x[t] = exp(x[t] - m)` in place; returns the sum. `x - m <= 0` here (m is
/// the running max), and anything below `-87.3` (weights under 1e-38 of the
/// max's) becomes exactly 0, so masked keys (`-inf`) contribute nothing.
#[inline(always)]
fn exp_sub<S: Simd>(s: S, x: &mut [f32], m: f32) -> f32 {
    let (head, tail) = S::as_mut_simd_f32s(x);
    let mv = s.splat_f32s(m);
    let mut sum = s.splat_f32s(0.0);
    for v in head {
        let e = exp_nonpos(s, s.sub_f32s(*v, mv));
        *v = e;
        sum = s.add_f32s(sum, e);
    }
    let mut total = s.reduce_sum_f32s(sum);
    for v in tail {
        let e = (*v - m).exp();
        *v = e;
        total += e;
    }
    total
}

/// `exp(x)` for `x <= 0` (NaN stays NaN), within about 2 ulp: Cody-Waite
/// reduction `x = n ln2 + r`, `|r| <= ln2/2`, a degree-6 polynomial for `e^r`
/// (the Cephes `expf` coefficients) and `2^n` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpos<S: Simd>(s: S, x: S::f32s) -> S::f32s {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let underflow = s.less_than_f32s(x, s.splat_f32s(-87.3));
    let t = s.mul_add_f32s(
        x,
        s.splat_f32s(std::f32::consts::LOG2_E),
        s.splat_f32s(MAGIC),
    );
    let n = s.sub_f32s(t, s.splat_f32s(MAGIC));
    let r = s.mul_add_f32s(n, s.splat_f32s(-0.693_359_4), x);
    let r = s.mul_add_f32s(n, s.splat_f32s(2.121_944_4e-4), r);
    let mut p = s.splat_f32s(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = s.mul_add_f32s(p, r, s.splat_f32s(c));
    }
    let r2 = s.mul_f32s(r, r);
    let e = s.add_f32s(s.mul_add_f32s(p, r2, r), s.splat_f32s(1.0));
    // The low bits of t hold n + 0x400000 (mod 2^32 as integers); 2^n has
    // exponent bits (n + 127) << 23.
    let ni = s.sub_u32s(
        s.transmute_u32s_f32s(t),
        s.splat_u32s(MAGIC.to_bits() - 127),
    );
    let pow2 = s.transmute_f32s_u32s(s.mul_u32s(ni, s.splat_u32s(1 << 23)));
    s.select_f32s(underflow, s.splat_f32s(0.0), s.mul_f32s(e, pow2))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct ExpCheck;
    impl WithSimd for ExpCheck {
        type Output = f64;
        fn with_simd<S: Simd>(self, s: S) -> f64 {
            let mut worst = 0.0f64;
            let mut x = 0.0f32;
            while x > -90.0 {
                let mut v = vec![x; S::F32_LANES * 2];
                let got = exp_sub(s, &mut v, 0.0) / v.len() as f32;
                let want = (x as f64).exp();
                let err = if x < -87.3 {
                    got as f64
                } else {
                    ((got as f64 - want) / want).abs()
                };
                worst = worst.max(err);
                x -= 0.0137;
            }
            worst
        }
    }

    #[test]
    fn vector_exp_is_accurate_and_flushes_the_tail() {
        let worst = pulp::Arch::new().dispatch(ExpCheck);
        assert!(worst < 1e-6, "worst relative error {worst}");
        struct Inf;
        impl WithSimd for Inf {
            type Output = Vec<f32>;
            fn with_simd<S: Simd>(self, s: S) -> Vec<f32> {
                let mut v = vec![f32::NEG_INFINITY; S::F32_LANES];
                v[0] = 0.0;
                exp_sub(s, &mut v, 0.0);
                v
            }
        }
        let v = pulp::Arch::new().dispatch(Inf);
        assert_eq!(v[0], 1.0);
        assert!(v[1..].iter().all(|&x| x == 0.0));
    }
}
