//! `pie-rs simulate`: what-if questions answered on the simulated machine.

use pie_core::policy::{HostAttention, Objective};
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

/// The benchmark in the simulator: on PCIe Gen4 and Gen5 machines,
/// whose CPUs read memory at least 4x faster than the link moves it, at a
/// budget that holds half the KV, host attention decodes at least 1.3x faster
/// than copy-only pooling, and `auto` is never slower than `never`.
#[test]
fn host_attention_beats_copy_only_pooling_on_pcie() {
    for machine in [
        "a100-pcie-gen4",
        "h100-pcie-gen5",
        "h200-pcie-gen5",
        "gh200",
    ] {
        let run = |host_attention| {
            simulate(&SimulateRequest {
                machine: Some(machine.into()),
                batch: Some(8),
                context: Some(4096),
                steps: Some(16),
                host_attention,
                ..SimulateRequest::default()
            })
            .unwrap()
        };
        let copy = run(HostAttention::Never);
        let auto = run(HostAttention::Auto);
        assert!(copy.host_attended_layers.is_empty());
        assert!(auto.device_kv_mib <= auto.gpu_budget_mib + 1e-9, "{auto:?}");
        let speedup = copy.simulated_step_ms / auto.simulated_step_ms;
        eprintln!(
            "{machine}: copy {:.2} ms, auto {:.2} ms ({} of {} pooled on the host), x{speedup:.2}; predicted copy-only {:.2}",
            copy.simulated_step_ms,
            auto.simulated_step_ms,
            auto.host_attended_layers.len(),
            auto.pooled_layers.len(),
            auto.copy_only_step_ms
        );
        assert!(speedup >= 1.0 - 1e-9, "{machine}: {auto:?}");
        assert!(auto.predicted_step_ms <= auto.copy_only_step_ms + 1e-9);
        let m = pie_core::profiles::machine(machine).unwrap();
        if m.host_attention_gbps() >= 4.0 * m.h2d_gbps {
            assert!(speedup >= 1.3, "{machine}: x{speedup:.2}");
            assert!(!auto.host_attended_layers.is_empty());
        }
        // The simulated engine realises the predicted plan.
        let rel = (auto.simulated_step_ms / auto.predicted_step_ms - 1.0).abs();
        assert!(rel < 0.02, "{machine}: {auto:?}");
    }
}

#[test]
fn always_attends_every_pooled_layer_on_the_host() {
    let r = simulate(&SimulateRequest {
        machine: Some("a100-pcie-gen4".into()),
        context: Some(4096),
        steps: Some(8),
        host_attention: HostAttention::Always,
        ..SimulateRequest::default()
    })
    .unwrap();
    assert!(!r.pooled_layers.is_empty());
    assert_eq!(r.host_attended_layers, r.pooled_layers);
    assert_eq!(r.prefetch_depth, 0);
    assert!(r.host_ms_per_step > 0.0);
    let e = simulate(&SimulateRequest {
        cpu_cores: Some(0),
        ..SimulateRequest::default()
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
}
