//! The memory objective on profile combinations of the grid
//! (`examples/memory_objective_grid.rs`), against the best whole-layer static
//! plan the engine runs within the allowed slowdown on the simulated machine
//! ([`best_simulated_static_plan`]): it frees at least that plan's layers less
//! one, and its steady step stays within the allowance.

use pie_core::policy::{Objective, DEFAULT_MEMORY_SLOWDOWN};
use pie_core::simulate::{
    best_simulated_static_plan, simulate, simulate_static, SimulateReport, SimulateRequest,
    STEADY_STEPS,
};
use pie_core::Plan;

fn request(machine: &str, model: &str, batch: usize, context: usize) -> SimulateRequest {
    SimulateRequest {
        machine: Some(machine.into()),
        model: Some(model.into()),
        batch: Some(batch),
        context: Some(context),
        objective: Objective::Memory,
        steps: Some(40),
        ..SimulateRequest::default()
    }
}

/// The slowest of the run's last steps over the all-resident step.
fn steady_slowdown(r: &SimulateReport) -> f64 {
    let tail = &r.steps[r.steps.len() - STEADY_STEPS..];
    tail.iter().map(|s| s.step_ms).fold(0.0, f64::max) / r.all_gpu_step_ms
}

fn check_reaches_the_bound(req: &SimulateRequest) -> (SimulateReport, f64) {
    let name = format!(
        "{} {} batch {} context {}",
        req.machine.as_deref().unwrap_or_default(),
        req.model.as_deref().unwrap_or_default(),
        req.batch.unwrap_or_default(),
        req.context.unwrap_or_default()
    );
    let r = simulate(req).unwrap();
    let bound = best_simulated_static_plan(req, DEFAULT_MEMORY_SLOWDOWN).unwrap();
    let l = r.layers as f64;
    let (freed, best) = (r.offloaded_share * l, bound.offloaded_share * l);
    let slowdown = steady_slowdown(&r);
    assert!(
        bound.step_seconds <= DEFAULT_MEMORY_SLOWDOWN * bound.compute_seconds,
        "{name}: {bound:?}"
    );
    assert!(
        freed >= best - 1.0 - 1e-9,
        "{name}: the memory objective frees {freed:.1} layers ({} pooled, {} slots), the best static plan {best:.1} ({:?})",
        r.pooled_layers.len(),
        r.prefetch_depth,
        bound.plan
    );
    assert!(
        slowdown <= DEFAULT_MEMORY_SLOWDOWN,
        "{name}: step x{slowdown:.4} all-resident"
    );
    (r, best)
}

/// Combinations where the objective used to settle above 1.02x (the plan
/// chosen early drifted past it as the KV grew, or the search's zero-stall
/// plan stalled in the engine) and one of tiny layers, where per-copy
/// latency dominates.
#[test]
fn memory_objective_reaches_the_best_static_plan_within_the_slowdown() {
    for (m, md, batch, context) in [
        ("h200-pcie-gen5", "llama-3-8b", 1, 1024),
        ("a100-pcie-gen4", "llama-3-70b", 8, 1024),
        ("gh200", "qwen2.5-0.5b", 1, 1024),
    ] {
        check_reaches_the_bound(&request(m, md, batch, context));
    }
}

/// RTX 4090 (a shared link), Llama-3-70B, batch 32, 1k context: the policy
/// used to flap between plans every other step (x6.7 all-resident), each
/// switch relaying the KV, because write-backs measured behind prefetches
/// on the shared link made the device-to-host estimate collapse.
#[test]
fn shared_link_memory_objective_settles_within_the_slowdown() {
    let (r, _) = check_reaches_the_bound(&request("rtx4090-pcie-gen4", "llama-3-70b", 32, 1024));
    let switches = r.steps.iter().filter(|s| s.switched).count();
    assert!(switches <= 2, "{switches} plan switches: {:?}", r.steps);
    assert!(
        r.steps[10..].iter().all(|s| !s.switched),
        "still switching after 10 steps: {:?}",
        r.steps
    );
}

/// The bound search's answer is what its static run measures: one more
/// pooled layer through the same slots is past the slowdown.
#[test]
fn the_best_static_plan_is_tight() {
    let req = request("h200-pcie-gen5", "qwen2-7b", 1, 4096);
    let bound = best_simulated_static_plan(&req, DEFAULT_MEMORY_SLOWDOWN).unwrap();
    let (p, w) = (bound.plan.pooled.len(), bound.plan.staging_slots());
    assert!(p > w, "{bound:?}");
    let layers = 28;
    let steps = simulate_static(&req, &Plan::spread(layers, p + 1, w)).unwrap();
    let worst = steps[steps.len() - STEADY_STEPS..]
        .iter()
        .copied()
        .fold(0.0, f64::max);
    assert!(
        worst > DEFAULT_MEMORY_SLOWDOWN * bound.compute_seconds,
        "{} pooled through {w} slots stays within: {worst} vs {}",
        p + 1,
        bound.compute_seconds
    );
    assert!(best_simulated_static_plan(&req, 0.5).is_err());
}

/// `SimulateRequest::memory_slowdown` is the policy's allowance: a looser one
/// pools at least as many layers, each run stays within its own allowance,
/// and a factor below 1 is refused with what to change.
#[test]
fn a_requested_slowdown_is_the_simulated_policys_allowance() {
    let base = request("h200-pcie-gen5", "qwen2-7b", 1, 4096);
    let tight = simulate(&base).unwrap();
    let loose = simulate(&SimulateRequest {
        memory_slowdown: Some(1.10),
        ..base.clone()
    })
    .unwrap();
    assert!(steady_slowdown(&tight) <= DEFAULT_MEMORY_SLOWDOWN + 1e-9);
    assert!(steady_slowdown(&loose) <= 1.10 + 1e-9);
    assert!(
        loose.offloaded_share > tight.offloaded_share,
        "1.10 frees {} of the KV, 1.02 frees {}",
        loose.offloaded_share,
        tight.offloaded_share
    );
    let e = simulate(&SimulateRequest {
        memory_slowdown: Some(0.5),
        ..base
    })
    .expect_err("refused");
    assert!(e.to_string().contains("at least 1"), "{e}");
}
