//! How close the memory objective pools to what the link can hide, across the
//! profile grid (machines x models x batch {1, 8, 32} x context {1k, 4k, 16k}).
//!
//! The physical transparent share, in layers, is `h2d bandwidth x step compute
//! / KV per layer` (at most every layer). A combination passes when the plan
//! the adaptive policy settles on (`pie-rs simulate --objective memory`) frees
//! at least 0.9 of it with the step within 1.02x all-resident. With whole
//! layers as the unit, `P` pooled layers through `W >= 1` staging slots free
//! `P - W` layers, so at most `floor(share) - 1`: the bound printed last.
//!
//! `cargo run -p pie-core --release --example memory_objective_grid`

use pie_core::policy::Objective;
use pie_core::profiles::{machines, models};
use pie_core::simulate::{simulate, SimulateRequest};

fn main() {
    let mut rows = Vec::new();
    for m in machines() {
        for md in models() {
            for batch in [1usize, 8, 32] {
                for context in [1024usize, 4096, 16384] {
                    let r = simulate(&SimulateRequest {
                        machine: Some(m.name.into()),
                        model: Some(md.name.into()),
                        batch: Some(batch),
                        context: Some(context),
                        objective: Objective::Memory,
                        steps: Some(40),
                        ..SimulateRequest::default()
                    })
                    .expect("every profile pair simulates");
                    let l = r.layers as f64;
                    let layer_bytes = r.total_kv_mib / l * 1024.0 * 1024.0;
                    let share = (r.h2d_gbps * 1e9 * r.all_gpu_step_ms * 1e-3 / layer_bytes).min(l);
                    let freed = r.offloaded_share * l;
                    let ratio = if share > 0.0 { freed / share } else { 1.0 };
                    let slowdown = r.simulated_step_ms / r.all_gpu_step_ms;
                    rows.push((share, ratio, slowdown, format!(
                        "{} {} batch {batch} context {context}: share {share:.1} layers, freed {freed:.1} ({} pooled, {} slots), {ratio:.2} of it, step x{slowdown:.3}",
                        m.name, md.name, r.pooled_layers.len(), r.prefetch_depth
                    )));
                }
            }
        }
    }
    rows.sort_by(|a, b| a.1.total_cmp(&b.1));
    let pass = |r: &(f64, f64, f64, String)| r.1 >= 0.9 && r.2 <= 1.02;
    for r in rows.iter().filter(|r| !pass(r) && r.0 >= 10.0) {
        println!("short: {}", r.3);
    }
    let passing = rows.iter().filter(|r| pass(r)).count();
    let reachable = rows
        .iter()
        .filter(|r| r.0.floor() - 1.0 >= 0.9 * r.0)
        .count();
    let small = rows.iter().filter(|r| r.0 < 10.0).count();
    println!(
        "{} combinations: {passing} pass; {small} have a share under 10 layers; whole-layer pooling can pass at most {reachable}",
        rows.len()
    );
}
