//! `pie-rs simulate`: what-if questions answered on the simulated machine.

use pie_core::policy::Objective;
use pie_core::profiles::{machines, models};
use pie_core::simulate::{simulate, SimulateRequest};
use pie_core::ErrorKind;

#[test]
fn every_profile_pair_simulates() {
    for m in machines() {
        for md in models() {
            let r = simulate(&SimulateRequest {
                machine: Some(m.name.into()),
                model: Some(md.name.into()),
                batch: Some(4),
                context: Some(2048),
                steps: Some(12),
                ..SimulateRequest::default()
            })
            .unwrap();
            assert_eq!(r.steps.len(), 12);
            assert!(r.device_kv_mib <= r.gpu_budget_mib + 1e-9, "{r:?}");
            assert!(r.predicted_step_ms >= r.all_gpu_step_ms - 1e-9);
            assert!(
                r.best_static_step_ms <= r.predicted_step_ms * 1.05 + 1e-9,
                "{r:?}"
            );
            assert!((0.0..=1.0).contains(&r.transparent_fraction));
            assert_eq!(r.layers, md.layers);
        }
    }
}

#[test]
fn explicit_numbers_override_profiles() {
    let r = simulate(&SimulateRequest {
        gpu_budget_mib: Some(80.0),
        ..custom()
    })
    .unwrap();
    assert_eq!(r.layers, 10);
    assert!((r.all_gpu_step_ms - 10.0).abs() < 1e-9);
    assert!((r.total_kv_mib - 100.0).abs() < 1e-9);
    assert!((r.h2d_gbps - 10.0).abs() < 1e-12);
    // 10 MiB at 10 GB/s is about 1.05 ms a copy; 3 pooled layers through 1 slot
    // free 20 MiB and hide under their 2-3 layer windows.
    assert_eq!(r.pooled_layers.len(), 3, "{r:?}");
    assert!(r.stall_ms_per_step.abs() < 1e-9, "{r:?}");
    assert!((r.device_kv_mib - 80.0).abs() < 1e-6);
    assert!((r.simulated_step_ms - r.predicted_step_ms).abs() < 1e-6);

    let mem = simulate(&SimulateRequest {
        objective: Objective::Memory,
        gpu_budget_mib: Some(100.0),
        ..custom()
    })
    .unwrap();
    assert!(mem.offloaded_share > 0.0);
    assert!(
        (mem.offloaded_share - mem.transparent_fraction).abs() < 1e-9,
        "{mem:?}"
    );
}

/// Ten uniform layers given by explicit numbers.
fn custom() -> SimulateRequest {
    SimulateRequest {
        layers: Some(10),
        layer_compute_ms: Some(1.0),
        layer_kv_mib: Some(10.0),
        h2d_gbps: Some(10.0),
        d2h_gbps: Some(10.0),
        steps: Some(20),
        ..SimulateRequest::default()
    }
}

#[test]
fn bad_requests_say_what_to_change() {
    let e = simulate(&SimulateRequest {
        machine: Some("tpu".into()),
        ..SimulateRequest::default()
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("gh200"));
    let e = simulate(&SimulateRequest {
        h2d_gbps: Some(-1.0),
        ..SimulateRequest::default()
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let e = simulate(&SimulateRequest {
        gpu_budget_mib: Some(1.0),
        ..SimulateRequest::default()
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Budget);
}
