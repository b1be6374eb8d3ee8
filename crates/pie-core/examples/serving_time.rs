use pie_core::serving::*;
fn main() {
    let req = ServingRequest {
        machine: Some("gh200".into()),
        model: Some("llama-3-70b".into()),
        gpu_budget_mib: Some(16384.0),
        ..Default::default()
    };
    let (setup, w, _) = resolve(&req).unwrap();
    for m in Method::ALL {
        let t = std::time::Instant::now();
        let r = run_method(&setup, &w[0].1, m).unwrap();
        println!(
            "{:15} wall {:?} steps {} per step {:?}",
            m.name(),
            t.elapsed(),
            r.steps,
            t.elapsed() / r.steps as u32
        );
    }
}
