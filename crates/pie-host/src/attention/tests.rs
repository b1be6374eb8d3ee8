//! The kernel against a naive f64 reference written from the module's
//! stated semantics, over random shapes and options (proptest).
//!
//! Tolerances: the reference computes in f64 from the very values the kernel
//! reads (queries and KV already rounded to their dtype), so what is measured
//! is the kernel's own f32 arithmetic, the same for every dtype: outputs
//! within `1e-4 + 1e-4 |x|`, lse within `1e-4 + 1e-5 |x|`.

use super::*;
use proptest::prelude::*;

/// splitmix64: a tiny deterministic generator for test data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-a, a).
    fn sym(&mut self, a: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    kv_heads: usize,
    group: usize,
    q_len: usize,
    tokens: usize,
    k_dim: usize,
    v_dim: usize,
    lengths: Option<Vec<usize>>,
    positions: Option<Vec<usize>>,
    causal: bool,
    window: Option<usize>,
    softcap: Option<f32>,
    scale: Option<f32>,
    /// 0 none, 1 bool, 2 additive.
    mask: u8,
    /// Broadcast the mask over heads and query rows.
    mask_broadcast: bool,
    threads: usize,
    min_chunk: usize,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..4, 1usize..4, 1usize..5, 1usize..5, 0usize..80),
        (1usize..40, 1usize..40, any::<bool>(), any::<bool>()),
        (
            proptest::option::of(1usize..24),
            proptest::option::of(1.0f32..30.0),
            proptest::option::of(0.05f32..1.0),
        ),
        (
            0u8..3,
            any::<bool>(),
            1usize..4,
            prop_oneof![Just(1usize), Just(7), Just(512)],
        ),
        any::<u64>(),
    )
        .prop_map(
            |(
                (batch, kv_heads, group, q_len, tokens),
                (k_dim, v_dim, causal, explicit),
                (window, softcap, scale),
                (mask, mask_broadcast, threads, min_chunk),
                seed,
            )| {
                let mut rng = Rng(seed);
                let lengths: Vec<usize> = (0..batch).map(|_| rng.below(tokens + 1)).collect();
                // Positions past the keys are the split-attention case: the
                // host holds older tokens than the queries.
                let positions = if explicit || lengths.iter().any(|&n| n < q_len) {
                    Some((0..batch).map(|_| rng.below(tokens + 4)).collect())
                } else {
                    None
                };
                Case {
                    batch,
                    kv_heads,
                    group,
                    q_len,
                    tokens,
                    k_dim,
                    v_dim,
                    lengths: Some(lengths),
                    positions,
                    causal,
                    window,
                    softcap,
                    scale,
                    mask,
                    mask_broadcast,
                    threads,
                    min_chunk,
                    seed,
                }
            },
        )
}

struct Data {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask_bool: Vec<u8>,
    mask_add: Vec<f32>,
    mask_shape: [usize; 4],
}

impl Case {
    fn q_heads(&self) -> usize {
        self.kv_heads * self.group
    }
    fn data(&self) -> Data {
        let mut rng = Rng(self.seed ^ 0xDEAD_BEEF);
        let n = |len: usize, rng: &mut Rng| (0..len).map(|_| rng.sym(2.0)).collect::<Vec<_>>();
        let q = n(
            self.batch * self.q_heads() * self.q_len * self.k_dim,
            &mut rng,
        );
        let k = n(
            self.batch * self.kv_heads * self.tokens * self.k_dim,
            &mut rng,
        );
        let v = n(
            self.batch * self.kv_heads * self.tokens * self.v_dim,
            &mut rng,
        );
        let mask_shape = if self.mask_broadcast {
            [self.batch, 1, 1, self.tokens]
        } else {
            [self.batch, self.q_heads(), self.q_len, self.tokens]
        };
        let mlen: usize = mask_shape.iter().product();
        let mask_bool = (0..mlen).map(|_| (rng.below(4) != 0) as u8).collect();
        let mask_add = (0..mlen)
            .map(|_| match rng.below(4) {
                0 => f32::NEG_INFINITY,
                1 => 0.0,
                _ => rng.sym(3.0),
            })
            .collect();
        Data {
            q,
            k,
            v,
            mask_bool,
            mask_add,
            mask_shape,
        }
    }
}

/// Naive attention in f64, straight from the stated semantics.
fn reference(c: &Case, d: &Data, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let qh_n = c.q_heads();
    let lengths = c.lengths.clone().unwrap_or(vec![c.tokens; c.batch]);
    let scale = c.scale.unwrap_or(1.0 / (c.k_dim as f32).sqrt()) as f64;
    let mut out = vec![0.0; c.batch * qh_n * c.q_len * c.v_dim];
    let mut lse = vec![f64::NEG_INFINITY; c.batch * qh_n * c.q_len];
    for b in 0..c.batch {
        for qh in 0..qh_n {
            let kh = qh / c.group;
            for i in 0..c.q_len {
                let pos = match &c.positions {
                    Some(p) => p[b] + i,
                    None => lengths[b] - c.q_len + i,
                };
                let row = (b * qh_n + qh) * c.q_len + i;
                let mut logits = Vec::new();
                for j in 0..lengths[b] {
                    if c.causal && j > pos {
                        continue;
                    }
                    if let Some(w) = c.window {
                        if j + w <= pos {
                            continue;
                        }
                    }
                    let ms = d.mask_shape;
                    let midx = ((b * ms[1] + if ms[1] == 1 { 0 } else { qh }) * ms[2]
                        + if ms[2] == 1 { 0 } else { i })
                        * ms[3]
                        + j;
                    if c.mask == 1 && d.mask_bool[midx] == 0 {
                        continue;
                    }
                    let mut x = 0.0;
                    for e in 0..c.k_dim {
                        x += q[row * c.k_dim + e]
                            * k[((b * c.kv_heads + kh) * c.tokens + j) * c.k_dim + e];
                    }
                    x *= scale;
                    if let Some(cap) = c.softcap {
                        x = cap as f64 * (x / cap as f64).tanh();
                    }
                    if c.mask == 2 {
                        x += d.mask_add[midx] as f64;
                    }
                    if x == f64::NEG_INFINITY {
                        continue;
                    }
                    logits.push((j, x));
                }
                if logits.is_empty() {
                    continue;
                }
                let m = logits.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = logits.iter().map(|x| (x.1 - m).exp()).sum();
                for &(j, x) in &logits {
                    let p = (x - m).exp() / sum;
                    for e in 0..c.v_dim {
                        out[row * c.v_dim + e] +=
                            p * v[((b * c.kv_heads + kh) * c.tokens + j) * c.v_dim + e];
                    }
                }
                lse[row] = m + sum.ln();
            }
        }
    }
    (out, lse)
}

/// The kernel's `(out, lse)`, and the query, key and value it read, widened to f64.
type Ran = (Result<(Vec<f32>, Vec<f32>)>, Vec<f64>, Vec<f64>, Vec<f64>);

fn run<Q: Element, K: Element>(c: &Case, d: &Data) -> Ran {
    let qh = c.q_heads();
    let q: Vec<Q> = d.q.iter().map(|&x| Q::from_f32(x)).collect();
    let k: Vec<K> = d.k.iter().map(|&x| K::from_f32(x)).collect();
    let v: Vec<K> = d.v.iter().map(|&x| K::from_f32(x)).collect();
    let qv = View4::contiguous(&q, [c.batch, qh, c.q_len, c.k_dim]).unwrap();
    let kv = View4::contiguous(&k, [c.batch, c.kv_heads, c.tokens, c.k_dim]).unwrap();
    let vv = View4::contiguous(&v, [c.batch, c.kv_heads, c.tokens, c.v_dim]).unwrap();
    let mask = match c.mask {
        1 => Mask::Bool(View4::contiguous(&d.mask_bool, d.mask_shape).unwrap()),
        2 => Mask::Additive(View4::contiguous(&d.mask_add, d.mask_shape).unwrap()),
        _ => Mask::None,
    };
    let opts = AttentionOptions {
        scale: c.scale,
        causal: c.causal,
        window: c.window,
        softcap: c.softcap,
        lengths: c.lengths.as_deref(),
        query_positions: c.positions.as_deref(),
        mask,
    };
    let attn = HostAttention::new(c.threads)
        .unwrap()
        .with_min_chunk(c.min_chunk);
    let mut out = vec![f32::NAN; c.batch * qh * c.q_len * c.v_dim];
    let mut lse = vec![f32::NAN; c.batch * qh * c.q_len];
    let r = attn
        .forward(qv, kv, vv, &opts, &mut out, &mut lse)
        .map(|()| (out, lse));
    let qf: Vec<f64> = q.iter().map(|x| x.to_f32() as f64).collect();
    let kf: Vec<f64> = k.iter().map(|x| x.to_f32() as f64).collect();
    let vf: Vec<f64> = v.iter().map(|x| x.to_f32() as f64).collect();
    (r, qf, kf, vf)
}

fn check_case<Q: Element, K: Element>(c: &Case) -> std::result::Result<(), TestCaseError> {
    let d = c.data();
    let (r, qf, kf, vf) = run::<Q, K>(c, &d);
    let (out, lse) = r.map_err(|e| TestCaseError::fail(format!("kernel refused: {e}")))?;
    let (want_out, want_lse) = reference(c, &d, &qf, &kf, &vf);
    for (i, (&g, &w)) in out.iter().zip(&want_out).enumerate() {
        prop_assert!(
            (g as f64 - w).abs() <= 1e-4 + 1e-4 * w.abs(),
            "out[{i}] = {g}, reference {w}"
        );
    }
    for (i, (&g, &w)) in lse.iter().zip(&want_lse).enumerate() {
        if w == f64::NEG_INFINITY {
            prop_assert_eq!(g, f32::NEG_INFINITY, "lse[{}]", i);
        } else {
            prop_assert!(
                (g as f64 - w).abs() <= 1e-4 + 1e-5 * w.abs(),
                "lse[{i}] = {g}, reference {w}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 2 } else { 48 }, ..ProptestConfig::default() })]

    #[test]
    fn f32_kv_matches_f64_reference(c in case()) {
        check_case::<f32, f32>(&c)?;
    }

    #[test]
    fn bf16_kv_matches_f64_reference(c in case()) {
        check_case::<f32, bf16>(&c)?;
    }

    #[test]
    fn f16_kv_matches_f64_reference(c in case()) {
        check_case::<f32, f16>(&c)?;
    }

    #[test]
    fn half_queries_match_f64_reference(c in case(), bf in any::<bool>()) {
        if bf { check_case::<bf16, bf16>(&c)?; } else { check_case::<f16, f16>(&c)?; }
    }

    /// Attention over all tokens equals the LSE merge of attention over
    /// `[0, s)` and over `[s, n)` (each side with its positions shifted), to
    /// f32 tolerance, including an empty side (s = 0 or s = n).
    #[test]
    fn merge_of_a_split_equals_the_whole(
        seed in any::<u64>(),
        n in 0usize..90,
        split in 0.0f64..=1.0,
        window in proptest::option::of(1usize..40),
        group in 1usize..4,
    ) {
        let (b, kvh, dk, dv) = (2, 2, 24, 20);
        let mut rng = Rng(seed);
        let s = ((n as f64) * split).round() as usize;
        let qh = kvh * group;
        let q: Vec<f32> = (0..b * qh * dk).map(|_| rng.sym(2.0)).collect();
        let k: Vec<bf16> = (0..b * kvh * n * dk).map(|_| bf16::from_f32(rng.sym(2.0))).collect();
        let v: Vec<bf16> = (0..b * kvh * n * dv).map(|_| bf16::from_f32(rng.sym(2.0))).collect();
        let qv = View4::contiguous(&q, [b, qh, 1, dk]).unwrap();
        let kv = View4::contiguous(&k, [b, kvh, n, dk]).unwrap();
        let vv = View4::contiguous(&v, [b, kvh, n, dv]).unwrap();
        let attn = HostAttention::new(2).unwrap();
        // The query is the token after the last key (decode).
        let run = |start: usize, len: usize| {
            let pos = vec![n - start; b];
            let opts = AttentionOptions { causal: true, window, query_positions: Some(&pos), ..Default::default() };
            let mut out = vec![0.0; b * qh * dv];
            let mut lse = vec![0.0; b * qh];
            attn.forward(qv, kv.narrow(2, start, len).unwrap(), vv.narrow(2, start, len).unwrap(), &opts, &mut out, &mut lse).unwrap();
            (out, lse)
        };
        let (whole, whole_lse) = run(0, n);
        let (mut a, mut a_lse) = run(0, s);
        let (bo, b_lse) = run(s, n - s);
        merge_into(&mut a, &mut a_lse, &bo, &b_lse).unwrap();
        for (x, y) in a.iter().zip(&whole) {
            prop_assert!((x - y).abs() <= 2e-6 + 2e-6 * y.abs(), "{x} vs {y}");
        }
        for (x, y) in a_lse.iter().zip(&whole_lse) {
            if *y == f32::NEG_INFINITY {
                prop_assert_eq!(*x, f32::NEG_INFINITY);
            } else {
                prop_assert!((x - y).abs() <= 2e-6 + 2e-6 * y.abs(), "{x} vs {y}");
            }
        }
    }
}

#[test]
fn one_token_gives_its_value_and_logit() {
    let q = [1.0f32, 2.0, 3.0, 4.0];
    let k: Vec<bf16> = [0.5f32, -1.0, 0.25, 2.0]
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let v: Vec<bf16> = [3.0f32, -7.5, 0.125]
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let attn = HostAttention::new(1).unwrap();
    let mut out = [0.0f32; 3];
    let mut lse = [0.0f32; 1];
    attn.forward(
        View4::contiguous(&q, [1, 1, 1, 4]).unwrap(),
        View4::contiguous(&k, [1, 1, 1, 4]).unwrap(),
        View4::contiguous(&v, [1, 1, 1, 3]).unwrap(),
        &AttentionOptions::default(),
        &mut out,
        &mut lse,
    )
    .unwrap();
    assert_eq!(out, [3.0, -7.5, 0.125]);
    let logit = (0.5 - 2.0 + 0.75 + 8.0) / 2.0;
    assert!((lse[0] - logit).abs() < 1e-6, "{} vs {logit}", lse[0]);
}

#[test]
fn no_visible_key_gives_zero_and_neg_inf() {
    let attn = HostAttention::new(2).unwrap();
    let q = vec![1.0f32; 2 * 4 * 8];
    let k = vec![f16::from_f32(0.5); 2 * 2 * 5 * 8];
    let qv = View4::contiguous(&q, [2, 4, 1, 8]).unwrap();
    let kv = View4::contiguous(&k, [2, 2, 5, 8]).unwrap();
    for (lengths, tokens) in [(vec![0, 0], 5), (vec![0, 0], 0)] {
        let kv = kv.narrow(2, 0, tokens).unwrap();
        let opts = AttentionOptions {
            lengths: Some(&lengths),
            causal: true,
            ..Default::default()
        };
        let mut out = vec![f32::NAN; 2 * 4 * 8];
        let mut lse = vec![f32::NAN; 2 * 4];
        attn.forward(qv, kv, kv, &opts, &mut out, &mut lse).unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
        assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
    }
    // All keys masked out.
    let mask = vec![0u8; 2 * 5];
    let opts = AttentionOptions {
        mask: Mask::Bool(View4::contiguous(&mask, [2, 1, 1, 5]).unwrap()),
        ..Default::default()
    };
    let mut out = vec![f32::NAN; 2 * 4 * 8];
    let mut lse = vec![f32::NAN; 2 * 4];
    attn.forward(qv, kv, kv, &opts, &mut out, &mut lse).unwrap();
    assert!(out.iter().all(|&x| x == 0.0) && lse.iter().all(|&x| x == f32::NEG_INFINITY));
}

#[test]
fn token_split_between_threads_matches_one_piece() {
    let (b, kvh, g, n, d) = (1, 2, 4, 3000, 64);
    let mut rng = Rng(7);
    let q: Vec<f32> = (0..b * kvh * g * d).map(|_| rng.sym(1.0)).collect();
    let k: Vec<bf16> = (0..b * kvh * n * d)
        .map(|_| bf16::from_f32(rng.sym(3.0)))
        .collect();
    let qv = View4::contiguous(&q, [b, kvh * g, 1, d]).unwrap();
    let kv = View4::contiguous(&k, [b, kvh, n, d]).unwrap();
    let go = |attn: HostAttention| {
        let mut out = vec![0.0; b * kvh * g * d];
        let mut lse = vec![0.0; b * kvh * g];
        attn.forward(qv, kv, kv, &AttentionOptions::default(), &mut out, &mut lse)
            .unwrap();
        (out, lse)
    };
    let one = go(HostAttention::new(1).unwrap().with_min_chunk(usize::MAX));
    let many = go(HostAttention::new(3).unwrap().with_min_chunk(100));
    for (x, y) in one.0.iter().zip(&many.0).chain(one.1.iter().zip(&many.1)) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn bad_input_is_an_error_and_leaves_outputs_alone() {
    let attn = HostAttention::new(1).unwrap();
    let q = vec![0.0f32; 2 * 6 * 2 * 8];
    let k = vec![bf16::from_f32(1.0); 2 * 2 * 4 * 8];
    let k3 = vec![bf16::from_f32(1.0); 2 * 4 * 4 * 8];
    let qv = View4::contiguous(&q, [2, 6, 2, 8]).unwrap();
    let kv = View4::contiguous(&k, [2, 2, 4, 8]).unwrap();
    let lens_long = [5usize, 1];
    let lens_short = [1usize];
    let pos_short = [1usize];
    let small_mask = vec![1u8; 2 * 3];
    let mask3 = View4::contiguous(&small_mask, [2, 1, 1, 3]).unwrap();
    let out_len = 2 * 6 * 2 * 8;
    let lse_len = 2 * 6 * 2;
    let ok = AttentionOptions::default();
    type Bad<'a> = (
        &'a str,
        View4<'a, f32>,
        View4<'a, bf16>,
        AttentionOptions<'a>,
        usize,
    );
    let cases: Vec<Bad<'_>> = vec![
        ("out size", qv, kv, ok, out_len - 1),
        (
            "q_heads not a multiple",
            qv,
            View4::contiguous(&k3, [2, 4, 4, 8]).unwrap(),
            ok,
            out_len,
        ),
        (
            "head dim",
            View4::contiguous(&q[..2 * 6 * 2 * 4], [2, 6, 2, 4]).unwrap(),
            kv,
            ok,
            out_len / 2,
        ),
        (
            "batch",
            View4::contiguous(&q[..6 * 2 * 8], [1, 6, 2, 8]).unwrap(),
            kv,
            ok,
            out_len / 2,
        ),
        (
            "length past the KV",
            qv,
            kv,
            AttentionOptions {
                lengths: Some(&lens_long),
                ..ok
            },
            out_len,
        ),
        (
            "lengths count",
            qv,
            kv,
            AttentionOptions {
                lengths: Some(&lens_short),
                ..ok
            },
            out_len,
        ),
        (
            "positions count",
            qv,
            kv,
            AttentionOptions {
                query_positions: Some(&pos_short),
                ..ok
            },
            out_len,
        ),
        (
            "zero window",
            qv,
            kv,
            AttentionOptions {
                window: Some(0),
                ..ok
            },
            out_len,
        ),
        (
            "nan scale",
            qv,
            kv,
            AttentionOptions {
                scale: Some(f32::NAN),
                ..ok
            },
            out_len,
        ),
        (
            "negative softcap",
            qv,
            kv,
            AttentionOptions {
                softcap: Some(-1.0),
                ..ok
            },
            out_len,
        ),
        (
            "mask too short",
            qv,
            kv,
            AttentionOptions {
                mask: Mask::Bool(mask3),
                ..ok
            },
            out_len,
        ),
        (
            "causal with fewer keys than queries",
            qv,
            kv,
            AttentionOptions {
                lengths: Some(&[1, 4]),
                causal: true,
                ..ok
            },
            out_len,
        ),
    ];
    for (what, qv, kv, opts, out_len) in cases {
        let mut out = vec![42.0; out_len];
        let mut lse = vec![42.0; lse_len];
        let e = attn.forward(qv, kv, kv, &opts, &mut out, &mut lse);
        assert!(
            matches!(e, Err(PieError::Config(_))),
            "{what}: expected a config error, got {e:?}"
        );
        assert!(out.iter().chain(&lse).all(|&x| x == 42.0), "{what}");
    }
    // Views that would read past their data.
    assert!(View4::contiguous(&q[..10], [2, 6, 2, 8]).is_err());
    assert!(View4::new(&q, [2, 6, 2, 8], [96, 16, 8, 2]).is_err());
    assert!(View4::new(&q, [2, 6, 2, 8], [usize::MAX, 16, 8, 1]).is_err());
    assert!(kv.narrow(2, 3, 2).is_err());
    assert!(kv.narrow(4, 0, 1).is_err());
}

#[test]
fn layer_kv_reads_the_engine_layout() {
    let spec = LayerSpec {
        batch: 2,
        kv_heads: 3,
        k_dim: 4,
        v_dim: 5,
        elem_size: 2,
    };
    let cap = 6;
    let n = spec.bytes(cap) / 2;
    let layer: Vec<f16> = (0..n).map(|i| f16::from_f32(i as f32)).collect();
    let (k, v) = layer_kv(&layer, &spec, cap).unwrap();
    assert_eq!(k.shape(), [2, 3, 6, 4]);
    assert_eq!(v.shape(), [2, 3, 6, 5]);
    // K[1, 2, 3, :] and V[0, 1, 5, :] by the layout's own byte geometry:
    // row (b * kv_heads + h), token t.
    let row = |b: usize, h: usize| b * spec.kv_heads + h;
    let k_off = row(1, 2) * cap * 4 + 3 * 4;
    assert_eq!(k.row(1, 2, 3)[0].to_f32(), k_off as f32);
    let v_base = spec.k_bytes(cap) / 2;
    let v_off = v_base + row(0, 1) * cap * 5 + 5 * 5;
    assert_eq!(v.row(0, 1, 5)[4].to_f32(), (v_off + 4) as f32);
    assert!(layer_kv(&layer[..n - 1], &spec, cap).is_err());
    let as_f32: Vec<f32> = vec![0.0; n];
    assert!(layer_kv(&as_f32, &spec, cap).is_err());
}

#[test]
fn merge_checks_sizes_and_keeps_empty_sides() {
    let mut out = vec![1.0, 2.0, 3.0, 4.0];
    let mut lse = vec![f32::NEG_INFINITY, 0.5];
    merge_into(
        &mut out,
        &mut lse,
        &[5.0, 6.0, 7.0, 8.0],
        &[0.0, f32::NEG_INFINITY],
    )
    .unwrap();
    assert_eq!(out, [5.0, 6.0, 3.0, 4.0]);
    assert_eq!(lse, [0.0, 0.5]);
    let mut both = vec![0.0; 2];
    let mut both_lse = vec![f32::NEG_INFINITY];
    merge_into(&mut both, &mut both_lse, &[0.0, 0.0], &[f32::NEG_INFINITY]).unwrap();
    assert_eq!(both_lse[0], f32::NEG_INFINITY);
    // Equal halves: the mean, and ln 2 more.
    let mut a = vec![1.0];
    let mut la = vec![0.25];
    merge_into(&mut a, &mut la, &[3.0], &[0.25]).unwrap();
    assert_eq!(a[0], 2.0);
    assert!((la[0] - (0.25 + std::f32::consts::LN_2)).abs() < 1e-7);
    assert!(merge_into(&mut out, &mut lse, &[0.0; 3], &[0.0; 2]).is_err());
    assert!(merge_into(&mut out, &mut lse, &[0.0; 4], &[0.0; 1]).is_err());
    assert!(merge_into(&mut out[..3], &mut lse, &[0.0; 3], &[0.0; 2]).is_err());
}

#[test]
fn triad_measures_something_plausible() {
    let attn = HostAttention::new(2).unwrap();
    let t = attn.stream_triad(1 << 16, 3).unwrap();
    assert_eq!(t.bytes, 24 << 16);
    assert!(
        t.bytes_per_second > 1e8 && t.bytes_per_second.is_finite(),
        "{t:?}"
    );
    assert!(attn.stream_triad(0, 1).is_err());
}
