//! The search for the best static plan.

use pie_core::policy::cost_model::{device_bytes, LinkModel, PolicyInputs, STALL_TOLERANCE};
use pie_core::policy::search::max_depth;
use pie_core::policy::{
    best_static_plan, best_static_plan_in, best_static_plan_within, predict_step,
    transparent_fraction, HostAttention, HostModel, Objective, SearchSpace,
    DEFAULT_MEMORY_SLOWDOWN,
};
use pie_core::{ErrorKind, Plan};
use proptest::prelude::*;

const LAYER: u64 = 4 << 20;

fn inputs(
    layers: usize,
    compute: f64,
    bw: f64,
    budget_layers: Option<f64>,
    objective: Objective,
) -> PolicyInputs {
    PolicyInputs::uniform(
        layers,
        compute,
        LAYER,
        8192,
        LinkModel::symmetric(bw, 10e-6),
        budget_layers.map(|b| (b * LAYER as f64) as u64),
        objective,
    )
}

#[test]
fn everything_resident_when_it_fits() {
    let i = inputs(12, 1e-3, 1e9, Some(12.0), Objective::Speed);
    let c = best_static_plan(&i).unwrap();
    assert_eq!(c.plan, Plan::all_resident());
    assert_eq!(c.prediction.stall_seconds, 0.0);
}

#[test]
fn speed_pools_only_what_the_budget_forces_when_it_hides() {
    // 12 layers of 1 ms, 4 MiB per layer at 10 GB/s (0.43 ms a copy): a budget
    // of 10 layers forces a deficit of 2, so 3 pooled layers through 1 slot,
    // spread so every copy hides.
    let i = inputs(12, 1e-3, 10e9, Some(10.0), Objective::Speed);
    let c = best_static_plan(&i).unwrap();
    assert_eq!(c.plan.pooled.len(), 3, "{c:?}");
    assert_eq!(c.plan.staging_slots(), 1);
    assert!(c.prediction.stall_seconds < 1e-12);
    assert!(c.prediction.device_bytes <= i.budget_bytes.unwrap());
}

#[test]
fn budget_below_one_slot_is_a_budget_error() {
    let i = inputs(4, 1e-3, 10e9, Some(0.5), Objective::Speed);
    assert_eq!(best_static_plan(&i).unwrap_err().kind(), ErrorKind::Budget);
}

#[test]
fn memory_pools_as_much_as_hides() {
    // 16 layers of 1 ms; copies of 0.43 ms: about two copies per three layers
    // of compute hide, so the transparent share is large but below 1.
    let i = inputs(16, 1e-3, 10e9, None, Objective::Memory);
    let c = best_static_plan(&i).unwrap();
    assert!(c.prediction.is_transparent(), "{c:?}");
    assert!(c.prediction.offloaded_share > 0.5, "{c:?}");
    let t = transparent_fraction(&i).unwrap();
    assert!((t - c.prediction.offloaded_share).abs() < 1e-12);
    // A link 100x slower hides nothing.
    let slow = inputs(16, 1e-3, 1e8, None, Objective::Memory);
    assert_eq!(transparent_fraction(&slow).unwrap(), 0.0);
}

#[test]
fn memory_uses_the_allowed_slowdown() {
    // 16 layers of 1 ms, 4 MiB copies at 3.41 GB/s (1.25 ms each): the link
    // is the limit, at 12 copies a step with no stall, 13 within 2% and 14
    // within 10%.
    let i = inputs(16, 1e-3, 3.41e9, None, Objective::Memory);
    let at = |s: f64| best_static_plan_within(&i, SearchSpace::Auto, s).unwrap();
    let strict = at(1.0 + STALL_TOLERANCE);
    let default = best_static_plan(&i).unwrap();
    assert_eq!(default, at(DEFAULT_MEMORY_SLOWDOWN));
    let loose = at(1.10);
    for (c, s) in [
        (&strict, 1.0 + STALL_TOLERANCE),
        (&default, DEFAULT_MEMORY_SLOWDOWN),
        (&loose, 1.10),
    ] {
        assert!(c.prediction.within(s), "{s}: {c:?}");
    }
    assert!(strict.prediction.is_transparent());
    assert!(
        default.prediction.device_bytes < strict.prediction.device_bytes,
        "{default:?} vs {strict:?}"
    );
    assert!(
        loose.prediction.device_bytes < default.prediction.device_bytes,
        "{loose:?} vs {default:?}"
    );
    // The transparent share is the zero-stall search's, whatever the allowance.
    let t = transparent_fraction(&i).unwrap();
    assert!((t - strict.prediction.offloaded_share).abs() < 1e-12);
    let e = best_static_plan_within(&i, SearchSpace::Auto, 0.9).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
}

#[test]
fn restricted_search_matches_exhaustive() {
    // Homogeneous layers (as in one model) across regimes: the restricted
    // family finds the exhaustive optimum (to the tie tolerance).
    for layers in [8usize, 11, 14] {
        for bw in [2e9, 5e9, 10e9, 40e9] {
            for budget in [0.3, 0.6, 0.85] {
                for objective in [Objective::Speed, Objective::Memory] {
                    let i = inputs(layers, 1e-3, bw, Some(budget * layers as f64), objective);
                    let full = best_static_plan_in(&i, SearchSpace::Exhaustive).unwrap();
                    let restricted = best_static_plan_in(&i, SearchSpace::Restricted).unwrap();
                    let (f, r) = (full.prediction, restricted.prediction);
                    match objective {
                        Objective::Speed => assert!(
                            r.step_seconds <= f.step_seconds * 1.002,
                            "L={layers} bw={bw} budget={budget}: {restricted:?} vs {full:?}"
                        ),
                        Objective::Memory => {
                            let s = DEFAULT_MEMORY_SLOWDOWN;
                            assert_eq!(r.within(s), f.within(s));
                            if f.within(s) {
                                assert_eq!(
                                    r.device_bytes, f.device_bytes,
                                    "L={layers} bw={bw} budget={budget}"
                                );
                            } else {
                                assert!(r.step_seconds <= f.step_seconds * 1.002);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn arb_inputs() -> impl Strategy<Value = (PolicyInputs, Vec<bool>, usize)> {
    (
        2usize..9,
        1e8f64..5e10,
        0.2f64..1.2,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(l, bw, budget_frac, memory, shared)| {
            (
                prop::collection::vec(1e-4f64..2e-3, l),
                prop::collection::vec(1u64..8_000_000, l),
                prop::collection::vec(any::<bool>(), l),
                1usize..8,
            )
                .prop_map(move |(compute, bytes, mask, w)| {
                    let total: u64 = bytes.iter().sum();
                    let inputs = PolicyInputs {
                        compute_seconds: compute,
                        valid_bytes: bytes.clone(),
                        writeback_bytes: bytes.iter().map(|b| b / 1000).collect(),
                        layer_bytes: bytes,
                        link: LinkModel {
                            h2d_bandwidth: bw,
                            h2d_latency: 5e-6,
                            d2h_bandwidth: bw,
                            d2h_latency: 5e-6,
                            shared,
                        },
                        budget_bytes: Some((total as f64 * budget_frac) as u64),
                        objective: if memory {
                            Objective::Memory
                        } else {
                            Objective::Speed
                        },
                        host: None,
                    };
                    (inputs, mask, w)
                })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// No plan that fits the budget beats the search (speed), and none frees
    /// more memory within the allowed slowdown (memory).
    #[test]
    fn no_random_plan_beats_the_search((inputs, mask, w) in arb_inputs()) {
        let Ok(best) = best_static_plan(&inputs) else {
            // Only a budget error is acceptable, and only if one slot does not fit.
            let everything: Vec<usize> = (0..inputs.num_layers()).collect();
            prop_assert_eq!(max_depth(&inputs, &everything), 0);
            return Ok(());
        };
        let budget = inputs.budget_bytes.unwrap();
        prop_assert!(best.prediction.device_bytes <= budget);
        let plan = Plan::copying((0..inputs.num_layers()).filter(|&i| mask[i]).collect(), w);
        if device_bytes(&inputs.layer_bytes, &plan) > budget {
            return Ok(());
        }
        let p = predict_step(&inputs, &plan).unwrap();
        match inputs.objective {
            Objective::Speed => prop_assert!(p.step_seconds >= best.prediction.step_seconds * (1.0 - 1e-3) - 1e-12,
                "{:?} beats {:?}", p, best),
            Objective::Memory => {
                // Within the allowed slowdown, nothing frees more; beyond it, nothing is faster.
                let s = DEFAULT_MEMORY_SLOWDOWN;
                if best.prediction.within(s) {
                    if p.within(s) {
                        prop_assert!(p.device_bytes >= best.prediction.device_bytes, "{:?} beats {:?}", p, best);
                    }
                } else {
                    prop_assert!(!p.within(s));
                    prop_assert!(p.step_seconds >= best.prediction.step_seconds * (1.0 - 1e-3) - 1e-12);
                }
            }
        }
    }
}

fn with_host(inputs: &PolicyInputs, host_bw: f64, choice: HostAttention) -> PolicyInputs {
    PolicyInputs {
        objective: Objective::Speed,
        host: Some(HostModel {
            attention_bandwidth: host_bw,
            query_bytes: 4096,
            result_bytes: 8192,
            choice,
        }),
        ..inputs.clone()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Under `Auto` the search never predicts a slower step than copy-only
    /// pooling (copying everything is always a candidate), its plans fit the
    /// budget, and `Always` attends every pooled layer on the host.
    #[test]
    fn auto_is_never_slower_than_copy_only(
        (inputs, _mask, _w) in arb_inputs(),
        host_bw in 1e8f64..1e12,
    ) {
        let copy = with_host(&inputs, host_bw, HostAttention::Never);
        let auto = with_host(&inputs, host_bw, HostAttention::Auto);
        let budget = inputs.budget_bytes.unwrap();
        if let Ok(c) = best_static_plan(&copy) {
            prop_assert!(c.plan.host_attended.is_empty());
            let a = best_static_plan(&auto).unwrap();
            prop_assert!(a.prediction.step_seconds <= c.prediction.step_seconds,
                "auto {:?} slower than copy-only {:?}", a, c);
            prop_assert!(a.prediction.device_bytes <= budget);
            a.plan.validate(inputs.num_layers()).unwrap();
        }
        if let Ok(a) = best_static_plan(&with_host(&inputs, host_bw, HostAttention::Always)) {
            prop_assert_eq!(&a.plan.host_attended, &a.plan.pooled);
            prop_assert!(a.prediction.device_bytes <= budget);
        }
    }
}

/// On an 80-layer model over a PCIe link with a CPU six times faster than the
/// link, at a budget of half the KV, the restricted search attends layers on
/// the host and predicts a step well below copy-only pooling.
#[test]
fn deep_model_on_pcie_prefers_host_attention() {
    let layers = 80;
    let layer: u64 = 256 << 20;
    let base = PolicyInputs::uniform(
        layers,
        0.4e-3,
        layer,
        32 << 10,
        LinkModel::symmetric(50e9, 10e-6),
        Some(layer * layers as u64 / 2),
        Objective::Speed,
    );
    let copy = best_static_plan(&with_host(&base, 300e9, HostAttention::Never)).unwrap();
    let auto = best_static_plan(&with_host(&base, 300e9, HostAttention::Auto)).unwrap();
    assert!(!auto.plan.host_attended.is_empty(), "{:?}", auto.plan);
    assert!(
        auto.prediction.step_seconds * 1.3 < copy.prediction.step_seconds,
        "auto {:?} copy {:?}",
        auto.prediction,
        copy.prediction
    );
}
