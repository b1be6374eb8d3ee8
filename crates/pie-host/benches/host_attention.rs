//! The host decode-attention kernel's KV read rate (bytes of K and V read per
//! second) against this machine's memory bandwidth, measured by a STREAM
//! triad in the same run. Target (issue 17): at least 0.7 of the triad.
//! Shapes: one Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128,
//! bf16 KV), decode (q_len 1), single- and multi-threaded.
//!
//! `cargo bench -p pie-host --bench host_attention` prints the ratio table
//! first (best of several calls each), then criterion's figures;
//! `PIE_ATTN_QUICK=1` keeps only the smaller shapes, `PIE_ATTN_THREADS=n` one thread count.

use criterion::{criterion_group, Criterion, Throughput};
use pie_host::attention::{bf16, AttentionOptions, HostAttention, View4};
use std::time::Instant;

const Q_HEADS: usize = 32;
const KV_HEADS: usize = 8;
const DIM: usize = 128;
const TRIAD_ELEMS: usize = 1 << 24; // 3 x 128 MiB, far past the caches

fn shapes() -> Vec<(usize, usize)> {
    let all = vec![(1, 4096), (1, 32768), (4, 8192), (8, 4096), (8, 32768)];
    if std::env::var_os("PIE_ATTN_QUICK").is_some() {
        all.into_iter().filter(|&(b, n)| b * n <= 32768).collect()
    } else {
        all
    }
}

struct Layer {
    batch: usize,
    tokens: usize,
    q: Vec<f32>,
    kv: Vec<bf16>,
}

impl Layer {
    fn new(batch: usize, tokens: usize) -> Self {
        let kv_len = batch * KV_HEADS * tokens * DIM;
        let kv = (0..2 * kv_len)
            .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 500.0 - 1.0))
            .collect();
        let q = (0..batch * Q_HEADS * DIM)
            .map(|i| ((i * 31) % 100) as f32 / 50.0 - 1.0)
            .collect();
        Layer {
            batch,
            tokens,
            q,
            kv,
        }
    }

    /// Bytes of K and V the kernel reads per call.
    fn kv_bytes(&self) -> usize {
        self.kv.len() * 2
    }

    fn run(&self, attn: &HostAttention, out: &mut [f32], lse: &mut [f32]) {
        let half = self.kv.len() / 2;
        let shape = [self.batch, KV_HEADS, self.tokens, DIM];
        let q = View4::contiguous(&self.q, [self.batch, Q_HEADS, 1, DIM]).unwrap();
        let k = View4::contiguous(&self.kv[..half], shape).unwrap();
        let v = View4::contiguous(&self.kv[half..], shape).unwrap();
        attn.forward(q, k, v, &AttentionOptions::default(), out, lse)
            .unwrap();
    }

    fn outputs(&self) -> (Vec<f32>, Vec<f32>) {
        (
            vec![0.0; self.batch * Q_HEADS * DIM],
            vec![0.0; self.batch * Q_HEADS],
        )
    }
}

fn thread_counts() -> Vec<usize> {
    if let Some(t) = std::env::var("PIE_ATTN_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        return vec![t];
    }
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    if all > 1 {
        vec![1, all]
    } else {
        vec![1]
    }
}

/// CPU seconds this process has used (all threads), from /proc (Linux; 10 ms ticks).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The ratio table: best of several calls for the kernel and the triad. The
/// last column is the KV read rate per CPU-second the kernel was given (so
/// what one busy core sustains): on a shared machine it shows what the wall
/// clock hides.
fn table() {
    println!(
        "{:>7} {:>5} {:>7} {:>7} {:>11} {:>10} {:>6} {:>13}",
        "threads",
        "batch",
        "tokens",
        "KV MiB",
        "kernel GB/s",
        "triad GB/s",
        "ratio",
        "GB/s per CPU-s"
    );
    for threads in thread_counts() {
        let attn = HostAttention::new(threads).unwrap();
        let triad = attn.stream_triad(TRIAD_ELEMS, 5).unwrap().bytes_per_second;
        for (batch, tokens) in shapes() {
            let layer = Layer::new(batch, tokens);
            let (mut out, mut lse) = layer.outputs();
            layer.run(&attn, &mut out, &mut lse);
            let mut best = f64::INFINITY;
            let reps = (4e9 / layer.kv_bytes() as f64).clamp(5.0, 200.0) as usize;
            let cpu0 = cpu_seconds();
            for _ in 0..reps {
                let t = Instant::now();
                layer.run(&attn, &mut out, &mut lse);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let per_cpu = match (cpu0, cpu_seconds()) {
                (Some(a), Some(b)) if b > a => {
                    format!("{:.2}", (reps * layer.kv_bytes()) as f64 / (b - a) / 1e9)
                }
                _ => "-".into(),
            };
            let rate = layer.kv_bytes() as f64 / best;
            println!(
                "{threads:>7} {batch:>5} {tokens:>7} {:>7.0} {:>11.2} {:>10.2} {:>6.2} {per_cpu:>13}",
                layer.kv_bytes() as f64 / (1 << 20) as f64,
                rate / 1e9,
                triad / 1e9,
                rate / triad
            );
        }
    }
}

fn bench(c: &mut Criterion) {
    for threads in thread_counts() {
        let attn = HostAttention::new(threads).unwrap();
        let mut g = c.benchmark_group(format!("host_attention/{threads}t"));
        g.sample_size(10);
        for (batch, tokens) in shapes() {
            let layer = Layer::new(batch, tokens);
            let (mut out, mut lse) = layer.outputs();
            g.throughput(Throughput::Bytes(layer.kv_bytes() as u64));
            g.bench_function(format!("bf16_b{batch}_n{tokens}"), |b| {
                b.iter(|| layer.run(&attn, &mut out, &mut lse))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);

fn main() {
    table();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
