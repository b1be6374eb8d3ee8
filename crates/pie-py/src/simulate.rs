//! `pie_rs._core.simulate` and `pie_rs._core.list_profiles`: what-if runs of
//! the simulation backend (the logic lives in `pie_core::simulate::simulate`).

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use pie_core::policy::{HostAttention, Objective};
use pie_core::profiles::{machines, models};
use pie_core::simulate::{SimulateReport, SimulateRequest};
use pie_core::PieError;

use crate::errors::to_py;

/// Keys a request dict may hold; anything else is a `ConfigError` (a typo must
/// not be silently ignored).
const KEYS: &[&str] = &[
    "machine",
    "model",
    "batch",
    "context",
    "layers",
    "layer_compute_ms",
    "layer_kv_mib",
    "h2d_gbps",
    "d2h_gbps",
    "gpu_budget_mib",
    "objective",
    "steps",
    "host_attention",
    "cpu_memory_gbps",
    "cpu_cores",
    "memory_slowdown",
];

/// The value under `key`, `None` when absent or Python `None`.
fn opt<'py, T>(request: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<T>>
where
    T: for<'a> FromPyObject<'a, 'py>,
{
    crate::request::optional("simulate", request, key)
}

/// The request's `host_attention` ("auto", "never" or "always"; default
/// "auto", as `pie-rs simulate` and `attach` default to); any other value is a
/// `ConfigError` naming the three.
pub(crate) fn host_attention(request: &Bound<'_, PyDict>, what: &str) -> PyResult<HostAttention> {
    match crate::request::optional::<String>(what, request, "host_attention")? {
        Some(s) => s.parse::<HostAttention>().map_err(to_py),
        None => Ok(HostAttention::Auto),
    }
}

fn request_from_dict(request: &Bound<'_, PyDict>) -> PyResult<SimulateRequest> {
    for key in request.keys() {
        let name: String = key.extract()?;
        if !KEYS.contains(&name.as_str()) {
            return Err(to_py(PieError::config(format!(
                "simulate: unknown option {name:?}; known options are {}",
                KEYS.join(", ")
            ))));
        }
    }
    let objective = match opt::<String>(request, "objective")? {
        Some(s) => s.parse::<Objective>().map_err(to_py)?,
        None => Objective::default(),
    };
    Ok(SimulateRequest {
        machine: opt(request, "machine")?,
        model: opt(request, "model")?,
        batch: opt(request, "batch")?,
        context: opt(request, "context")?,
        layers: opt(request, "layers")?,
        layer_compute_ms: opt(request, "layer_compute_ms")?,
        layer_kv_mib: opt(request, "layer_kv_mib")?,
        h2d_gbps: opt(request, "h2d_gbps")?,
        d2h_gbps: opt(request, "d2h_gbps")?,
        gpu_budget_mib: opt(request, "gpu_budget_mib")?,
        objective,
        steps: opt(request, "steps")?,
        host_attention: host_attention(request, "simulate")?,
        cpu_memory_gbps: opt(request, "cpu_memory_gbps")?,
        cpu_cores: opt(request, "cpu_cores")?,
        memory_slowdown: opt(request, "memory_slowdown")?,
    })
}

fn report_to_dict<'py>(py: Python<'py>, r: &SimulateReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("machine", &r.machine)?;
    d.set_item("model", &r.model)?;
    d.set_item("objective", r.objective.name())?;
    d.set_item("layers", r.layers)?;
    d.set_item("batch", r.batch)?;
    d.set_item("context", r.context)?;
    d.set_item("layer_compute_ms", r.layer_compute_ms)?;
    d.set_item("layer_kv_mib", r.layer_kv_mib)?;
    d.set_item("total_kv_mib", r.total_kv_mib)?;
    d.set_item("gpu_budget_mib", r.gpu_budget_mib)?;
    d.set_item("h2d_gbps", r.h2d_gbps)?;
    d.set_item("d2h_gbps", r.d2h_gbps)?;
    d.set_item("host_attention", r.host_attention.name())?;
    d.set_item("cpu_attention_gbps", r.cpu_attention_gbps)?;
    d.set_item("pooled_layers", r.pooled_layers.clone())?;
    d.set_item("host_attended_layers", r.host_attended_layers.clone())?;
    d.set_item("host_ms_per_step", r.host_ms_per_step)?;
    d.set_item("prefetch_depth", r.prefetch_depth)?;
    d.set_item("device_kv_mib", r.device_kv_mib)?;
    d.set_item("predicted_step_ms", r.predicted_step_ms)?;
    d.set_item("simulated_step_ms", r.simulated_step_ms)?;
    d.set_item("all_gpu_step_ms", r.all_gpu_step_ms)?;
    d.set_item("stall_ms_per_step", r.stall_ms_per_step)?;
    d.set_item("offloaded_share", r.offloaded_share)?;
    d.set_item("transparent_fraction", r.transparent_fraction)?;
    d.set_item(
        "best_static_pooled_layers",
        r.best_static_pooled_layers.clone(),
    )?;
    d.set_item(
        "best_static_host_attended_layers",
        r.best_static_host_attended_layers.clone(),
    )?;
    d.set_item("copy_only_step_ms", r.copy_only_step_ms)?;
    d.set_item("best_static_prefetch_depth", r.best_static_prefetch_depth)?;
    d.set_item("best_static_step_ms", r.best_static_step_ms)?;
    let steps = PyList::empty(py);
    for s in &r.steps {
        let sd = PyDict::new(py);
        sd.set_item("step", s.step)?;
        sd.set_item("pooled_count", s.pooled_count)?;
        sd.set_item("host_count", s.host_count)?;
        sd.set_item("prefetch_depth", s.prefetch_depth)?;
        sd.set_item("step_ms", s.step_ms)?;
        sd.set_item("stall_ms", s.stall_ms)?;
        sd.set_item("switched", s.switched)?;
        steps.append(sd)?;
    }
    d.set_item("steps", steps)?;
    Ok(d)
}

/// Runs a what-if simulation. `request` holds any of the keys in `KEYS`
/// (see `pie_core::simulate::SimulateRequest`); the result is a dict of the report.
#[pyfunction]
fn simulate(py: Python<'_>, request: &Bound<'_, PyDict>) -> PyResult<Py<PyDict>> {
    let req = request_from_dict(request)?;
    let report = py
        .detach(|| pie_core::simulate::simulate(&req))
        .map_err(to_py)?;
    Ok(report_to_dict(py, &report)?.unbind())
}

/// The named profiles: `{"machines": {name: description}, "models": {name: description}}`.
#[pyfunction]
fn list_profiles(py: Python<'_>) -> PyResult<Py<PyDict>> {
    let ms = PyDict::new(py);
    for m in machines() {
        ms.set_item(
            m.name,
            format!(
                "{}; host CPU {:.0} GB/s, {} cores (host attention {:.0} GB/s)",
                m.description,
                m.cpu_memory_gbps,
                m.cpu_cores,
                m.host_attention_gbps()
            ),
        )?;
    }
    let mods = PyDict::new(py);
    for m in models() {
        mods.set_item(
            m.name,
            format!(
                "{} layers, hidden {}, {} heads / {} KV heads, head dim {}",
                m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim
            ),
        )?;
    }
    let d = PyDict::new(py);
    d.set_item("machines", ms)?;
    d.set_item("models", mods)?;
    Ok(d.unbind())
}

/// Adds `simulate` and `list_profiles` to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(list_profiles, m)?)?;
    Ok(())
}
