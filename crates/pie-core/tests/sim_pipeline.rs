//! The engine's swap pipeline (the shipped schedule, swapper and telemetry)
//! on the simulation backend, against the cost model's predictor. The engine
//! appends one token per decode step and rounds layers to whole tokens, so
//! its figures match the predictor's within a fraction of a percent, not to the bit.

/// Relative agreement expected between the engine on the sim and the predictor.
const REL: f64 = 0.01;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= REL * b.abs().max(a.abs()) + 1e-9
}

use pie_core::policy::cost_model::{timeline, LinkModel, PolicyInputs};
use pie_core::policy::{predict_step, HostAttention, HostModel, Objective};
use pie_core::sim::SimConfig;
use pie_core::simulate::{run_pipeline, Pipeline, PipelineSpec};
use pie_core::Plan;
use proptest::prelude::*;

fn uniform(layers: usize, compute: f64, bytes: u64, wb: u64, link: LinkModel) -> PolicyInputs {
    PolicyInputs::uniform(layers, compute, bytes, wb, link, None, Objective::Speed)
}

#[test]
fn copies_that_fit_under_compute_never_stall() {
    // 8 layers of 1 ms, every other layer pooled through 2 slots, 10 GB/s:
    // a 5 MB copy takes 0.51 ms and has at least 1 ms of compute to hide under.
    let link = LinkModel::symmetric(10e9, 10e-6);
    let inputs = uniform(8, 1e-3, 5_000_000, 4096, link);
    let plan = Plan::spread(8, 4, 2);
    let samples = run_pipeline(
        &SimConfig::from_link(link),
        &PipelineSpec::from_inputs(&inputs),
        &plan,
        6,
    )
    .unwrap();
    for s in &samples[1..] {
        assert_eq!(s.stall_total(), 0.0, "{s:?}");
        assert!((s.step_seconds - 8e-3).abs() < 1e-12);
        assert!(close(s.h2d_bytes as f64, 4.0 * 5_000_000.0), "{s:?}");
        // K and V: two copies per prefetched layer.
        assert_eq!(s.h2d_copies, 8);
        assert_eq!(s.d2h_bytes, 4 * 4096);
    }
    let p = predict_step(&inputs, &plan).unwrap();
    assert_eq!(p.stall_seconds, 0.0);
}

#[test]
fn copies_longer_than_compute_stall_by_the_predicted_amount() {
    // Same shape at 1 GB/s: a copy takes 5.01 ms, far beyond its window.
    let link = LinkModel::symmetric(1e9, 10e-6);
    let inputs = uniform(8, 1e-3, 5_000_000, 4096, link);
    let plan = Plan::spread(8, 4, 2);
    let samples = run_pipeline(
        &SimConfig::from_link(link),
        &PipelineSpec::from_inputs(&inputs),
        &plan,
        8,
    )
    .unwrap();
    let p = predict_step(&inputs, &plan).unwrap();
    let last = samples.last().unwrap();
    assert!(p.stall_seconds > 10e-3, "{p:?}");
    assert!(
        close(last.stall_total(), p.stall_seconds),
        "{last:?} vs {p:?}"
    );
    assert!(
        close(last.step_seconds, p.step_seconds),
        "{last:?} vs {p:?}"
    );
    // Link-bound: the H2D queue is the bottleneck. Each prefetch waits for its
    // slot (freed when the layer W=2 pooled layers earlier finishes, plus its
    // write-back), so the step is the four copies plus the gaps the ring forces.
    let copies = 4.0 * link.h2d_seconds(5_000_000);
    assert!(last.step_seconds >= copies * (1.0 - REL));
}

#[test]
fn a_plan_switch_reissues_the_first_prefetches() {
    use pie_core::simulate::Pipeline;
    let link = LinkModel::symmetric(10e9, 0.0);
    let inputs = uniform(8, 1e-3, 5_000_000, 0, link);
    let spec = PipelineSpec::from_inputs(&inputs);
    let mut pipe = Pipeline::new(SimConfig::from_link(link)).unwrap();
    let a = Plan::spread(8, 2, 1);
    let b = Plan::spread(8, 4, 2);
    for _ in 0..3 {
        pipe.run_step(&spec, &a).unwrap();
    }
    let switched = pipe.run_step(&spec, &b).unwrap();
    let steady = pipe.run_step(&spec, &b).unwrap();
    // Every pooled layer of b is fetched in both steps (K and V: two copies each)...
    assert_eq!(switched.h2d_copies, 8);
    assert_eq!(steady.h2d_copies, 8);
    // ...and the first W prefetches, issued when the step starts after the
    // switch, still hide under the compute of the layers before them.
    assert_eq!(switched.stall_total(), 0.0, "{switched:?}");
    assert!(close(switched.step_seconds, steady.step_seconds));
    assert_eq!(pipe.plan(), Some(&b));
    let back = pipe.run_step(&spec, &a).unwrap();
    assert_eq!(back.h2d_copies, 4);
}

fn arb_case() -> impl Strategy<Value = (PolicyInputs, Plan, usize)> {
    (
        1usize..12,
        any::<bool>(),
        0.0f64..20e-6,
        1e8f64..1e11,
        1e8f64..1e11,
    )
        .prop_flat_map(|(l, shared, lat, bw_h, bw_d)| {
            (
                prop::collection::vec(1e-5f64..2e-3, l),
                prop::collection::vec(100_000u64..4_000_000, l),
                // Write-backs (a decode token) are small against the layer, as
                // in a real cache, so growth over a few steps stays within REL.
                prop::collection::vec(0u64..20, l),
                prop::collection::vec(any::<bool>(), l),
                1usize..6,
                1usize..8,
            )
                .prop_map(move |(compute, bytes, wb, mask, w, steps)| {
                    let link = LinkModel {
                        h2d_bandwidth: bw_h,
                        h2d_latency: lat,
                        d2h_bandwidth: bw_d,
                        d2h_latency: lat / 2.0,
                        shared,
                    };
                    let valid: Vec<u64> = bytes.iter().map(|b| b - b / 3).collect();
                    let wb: Vec<u64> = wb.iter().zip(&bytes).map(|(w, b)| (*w).min(*b)).collect();
                    let inputs = PolicyInputs {
                        compute_seconds: compute,
                        layer_bytes: bytes,
                        valid_bytes: valid,
                        writeback_bytes: wb,
                        link,
                        budget_bytes: None,
                        objective: Objective::Speed,
                        host: None,
                    };
                    let pooled: Vec<usize> = (0..l).filter(|&i| mask[i]).collect();
                    (inputs, Plan::copying(pooled, w), steps)
                })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The predictor's replay and the Backend-driven pipeline agree step by step.
    #[test]
    fn predictor_agrees_with_the_simulated_pipeline((inputs, plan, steps) in arb_case()) {
        let spec = PipelineSpec::from_inputs(&inputs);
        let sim = run_pipeline(&SimConfig::from_link(inputs.link), &spec, &plan, steps).unwrap();
        let predicted = timeline(&inputs, &plan, steps).unwrap();
        for (i, (s, p)) in sim.iter().zip(&predicted).enumerate() {
            prop_assert!(close(s.step_seconds, p.step_seconds), "{:?} vs {:?}", s, p);
            prop_assert!(
                (s.stall_total() - p.stall_seconds).abs() <= REL * p.step_seconds + 1e-9,
                "{:?} vs {:?}", s, p
            );
            // The engine counts a prefetch in the step it serves, the predictor
            // in the step that issues it: they agree once the ring wraps.
            if i > 0 {
                prop_assert!(close(s.h2d_bytes as f64, p.h2d_bytes as f64), "{:?} vs {:?}", s, p);
            }
        }
        let steady = predict_step(&inputs, &plan).unwrap();
        prop_assert!(steady.step_seconds >= inputs.compute_total() - 1e-12);
        prop_assert!((steady.step_seconds - steady.compute_seconds - steady.stall_seconds).abs() < 1e-9);
    }

    /// More staging slots never add stall (the search relies on this).
    #[test]
    fn stall_does_not_grow_with_prefetch_depth((inputs, plan, _steps) in arb_case()) {
        let mut last = f64::INFINITY;
        for w in 1..=plan.pooled.len().max(1) {
            let p = predict_step(&inputs, &Plan { prefetch_depth: w, ..plan.clone() }).unwrap();
            prop_assert!(p.stall_seconds <= last + 1e-9, "depth {}: {} > {}", w, p.stall_seconds, last);
            last = p.stall_seconds;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// With some pooled layers attended on the host, the predictor and the
    /// simulated pipeline (whose driver charges the round trip) still agree
    /// step by step. Host-attended layers write back nothing here: the
    /// simulator leaves their few bytes off the link (see `simulate`'s docs).
    #[test]
    fn predictor_agrees_with_host_attention(
        (mut inputs, plan, steps) in arb_case(),
        host_mask in any::<u16>(),
        host_bw in 1e9f64..1e12,
        query in 0u64..100_000,
    ) {
        let host = HostModel {
            attention_bandwidth: host_bw,
            query_bytes: query,
            result_bytes: 2 * query,
            choice: HostAttention::Auto,
        };
        inputs.host = Some(host);
        let host_attended: Vec<usize> = plan
            .pooled
            .iter()
            .copied()
            .filter(|&l| host_mask & (1 << l) != 0)
            .collect();
        for &l in &host_attended {
            inputs.writeback_bytes[l] = 0;
        }
        let plan = Plan { host_attended, ..plan };
        let spec = PipelineSpec::from_inputs(&inputs);
        let mut pipe = Pipeline::with_host(SimConfig::from_link(inputs.link), host).unwrap();
        let predicted = timeline(&inputs, &plan, steps).unwrap();
        for p in &predicted {
            let s = pipe.run_step(&spec, &plan).unwrap();
            prop_assert!(close(s.step_seconds, p.step_seconds), "{:?} vs {:?}", s, p);
            let (host_seconds, layers) = pipe.last_host();
            prop_assert_eq!(layers, plan.host_attended.len());
            prop_assert!((host_seconds - p.host_seconds).abs() <= 1e-9 + REL * p.step_seconds);
        }
    }
}
