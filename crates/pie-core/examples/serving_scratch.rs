use pie_core::serving::*;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let machine = args.get(1).cloned().unwrap_or("h100-pcie-gen5".into());
    let budget: f64 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(8192.0);
    let rate: f64 = args
        .get(3)
        .map(|s| s.parse().unwrap())
        .unwrap_or(f64::INFINITY);
    let model = args.get(4).cloned().unwrap_or("llama-3-8b".into());
    let t = std::time::Instant::now();
    let r = simulate_serving(&ServingRequest {
        machine: Some(machine),
        model: Some(model),
        gpu_budget_mib: Some(budget),
        rates: vec![rate],
        equal_performance: Some(args.get(5).is_some()),
        ..Default::default()
    })
    .unwrap();
    println!(
        "wall {:?} pool {} mean prompt {:.0} out {:.0}",
        t.elapsed(),
        r.device_pool_tokens,
        r.mean_prompt,
        r.mean_output
    );
    for run in &r.runs {
        for (m, x) in &run.methods {
            println!("{:15} tput {:8.0} ttft {:8.1}/{:8.1} tpot {:6.2}/{:6.2} peak {:3} mean {:5.1} pre {:4} dev {:7.0} host {:7.0} pool {:7} pooled {:2} W {} steps {} reconf {} {:.0}ms stall {:.0}ms", m.name(), x.throughput_tok_s, x.ttft_ms_p50, x.ttft_ms_p99, x.tpot_ms_p50, x.tpot_ms_p99, x.peak_running, x.mean_running, x.preemptions, x.device_kv_mib, x.host_kv_mib, x.pool_tokens, x.pooled_layers, x.prefetch_depth, x.steps, x.reconfigurations, x.reconfiguration_ms, x.stall_ms);
        }
    }
    println!("{:?}", r.equal_performance);
}
