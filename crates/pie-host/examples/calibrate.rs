//! Calibrates the sim against the host backend: runs the real engine on the
//! host backend (copy engines are threads doing memcpy, "compute" is a spin of
//! a fixed time per layer on the caller's thread) for several plans, and prints
//! the measured step time beside the cost model's prediction for the same plan,
//! with the link measured from the engine's own telemetry.
//!
//! `cargo run -p pie-host --release --example calibrate [-- --profile-json PATH]`
//!
//! With `--profile-json PATH` it also writes the host backend's measured link
//! as a machine profile override (`h2d_gbps`, `d2h_gbps`, `copy_latency_us`)
//! for the serving simulation (`benches/serving_calibration.py`), and this
//! machine's CPU as host attention sees it: `cpu_memory_gbps` (a STREAM triad
//! on the attention kernel's thread pool) and `cpu_cores` (its threads), the
//! figures `pie-rs simulate --cpu-memory-gbps/--cpu-cores` take.

use pie_core::policy::{predict_step, LinkModel, Objective, PolicyInputs};
use pie_core::{Engine, EngineOptions, LayerSpec, Plan, StaticPolicy, Stream};
use pie_host::attention::HostAttention as HostKernel;
use pie_host::HostBackend;
use std::time::{Duration, Instant};

const LAYERS: usize = 8;
const TOKENS: usize = 2048;
const STEPS: usize = 24;

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Runs `STEPS` decode steps and returns (median step seconds, H2D bytes/s, D2H bytes/s).
fn run(spec: LayerSpec, plan: &Plan, compute: Duration) -> pie_core::Result<(f64, f64, f64)> {
    let mut e = Engine::new(
        HostBackend::new()?,
        vec![spec; LAYERS],
        EngineOptions {
            capacity: TOKENS + STEPS + 8,
            ..Default::default()
        },
        Box::new(StaticPolicy::pinned(plan.clone())),
    )?;
    let s = Stream::Foreign(0);
    // Prefill: every layer holds TOKENS tokens.
    for l in 0..LAYERS {
        e.layer_begin(l, s)?;
        e.layer_ready(l, s)?;
        e.layer_written(l, TOKENS, s)?;
        e.layer_done(l, s)?;
    }
    e.quiesce()?;
    let mut times = Vec::new();
    let (mut h2d, mut h2d_s, mut d2h, mut d2h_s) = (0u64, 0.0, 0u64, 0.0);
    for _ in 0..STEPS {
        let t = Instant::now();
        for l in 0..LAYERS {
            e.layer_begin(l, s)?;
            e.layer_ready(l, s)?;
            spin(compute);
            e.layer_written(l, 1, s)?;
            e.layer_done(l, s)?;
        }
        times.push(t.elapsed().as_secs_f64());
        e.flush_telemetry()?;
        if let Some(sample) = e.last_sample() {
            h2d += sample.h2d_bytes;
            h2d_s += sample.h2d_seconds;
            d2h += sample.d2h_bytes;
            d2h_s += sample.d2h_seconds;
        }
    }
    times.sort_by(f64::total_cmp);
    let bw = |b: u64, s: f64| if s > 0.0 { b as f64 / s } else { f64::NAN };
    Ok((times[times.len() / 2], bw(h2d, h2d_s), bw(d2h, d2h_s)))
}

fn main() -> pie_core::Result<()> {
    let spec = LayerSpec {
        batch: 1,
        kv_heads: 8,
        k_dim: 128,
        v_dim: 128,
        elem_size: 2,
    };
    let compute = Duration::from_micros(1500);
    // Measure the link once with everything pooled and one staging slot.
    let probe = Plan::spread(LAYERS, LAYERS, 1);
    let (_, h2d_bw, d2h_bw) = run(spec, &probe, compute)?;
    let link = LinkModel {
        h2d_bandwidth: h2d_bw,
        h2d_latency: 5e-6,
        d2h_bandwidth: if d2h_bw.is_finite() { d2h_bw } else { h2d_bw },
        d2h_latency: 5e-6,
        shared: false,
    };
    println!(
        "host backend link (from the engine's telemetry): H2D {:.1} GB/s, D2H {:.1} GB/s; layer KV {:.1} MiB, compute {:?}/layer",
        h2d_bw / 1e9,
        d2h_bw / 1e9,
        spec.bytes(TOKENS) as f64 / (1 << 20) as f64,
        compute
    );
    // The CPU as host attention sees it: the triad over 3 x 32M f64 (768 MiB,
    // far beyond any cache) on the kernel's own threads, best of 3 passes.
    let kernel = HostKernel::new(0)?;
    let triad = kernel.stream_triad(32 << 20, 3)?;
    println!(
        "host CPU: {} attention threads, STREAM triad {:.1} GB/s",
        kernel.threads(),
        triad.bytes_per_second / 1e9
    );
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--profile-json") {
        let path = args
            .get(i + 1)
            .ok_or_else(|| pie_core::PieError::config("--profile-json needs a file name"))?;
        let json = format!(
            "{{\"h2d_gbps\": {:.4}, \"d2h_gbps\": {:.4}, \"copy_latency_us\": {:.1}, \"cpu_memory_gbps\": {:.4}, \"cpu_cores\": {}, \"source\": \"pie-host calibrate\"}}\n",
            link.h2d_bandwidth / 1e9,
            link.d2h_bandwidth / 1e9,
            link.h2d_latency * 1e6,
            triad.bytes_per_second / 1e9,
            kernel.threads()
        );
        std::fs::write(path, json)
            .map_err(|e| pie_core::PieError::backend("write the profile", e))?;
        println!("wrote the host link profile to {path}");
    }
    println!("| pooled | W | measured ms/step | predicted ms/step | error |");
    println!("|---|---|---|---|---|");
    for (count, w) in [(0, 1), (2, 1), (4, 1), (4, 2), (6, 2), (8, 1), (8, 2)] {
        let plan = Plan::spread(LAYERS, count, w);
        let (measured, _, _) = run(spec, &plan, compute)?;
        let inputs = PolicyInputs {
            compute_seconds: vec![compute.as_secs_f64(); LAYERS],
            layer_bytes: vec![spec.bytes(TOKENS + STEPS + 8) as u64; LAYERS],
            valid_bytes: vec![spec.bytes(TOKENS + STEPS / 2) as u64; LAYERS],
            writeback_bytes: vec![spec.bytes(1) as u64; LAYERS],
            link,
            budget_bytes: None,
            objective: Objective::Speed,
            host: None,
        };
        let predicted = predict_step(&inputs, &plan)?.step_seconds;
        println!(
            "| {count} | {w} | {:.2} | {:.2} | {:+.1}% |",
            measured * 1e3,
            predicted * 1e3,
            (predicted / measured - 1.0) * 100.0
        );
    }
    Ok(())
}
