//! `pie_rs._core.simulate_serving`: continuous batching in virtual time (the
//! logic lives in `pie_core::serving`).

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use pie_core::profiles::ModelShape;
use pie_core::serving::{
    simulate_serving as run, ComputeModel, EqualPerformance, FixedPool, Method, MethodReport,
    Request, SchedulerLimits, ServingReport, ServingRequest,
};
use pie_core::PieError;

use crate::errors::to_py;

/// Keys a request dict may hold; anything else is a `ConfigError`.
const KEYS: &[&str] = &[
    "machine",
    "model",
    "rates",
    "requests",
    "gpu_budget_mib",
    "seed",
    "methods",
    "equal_performance",
    "h2d_gbps",
    "d2h_gbps",
    "copy_latency_us",
    "copy_compute_ns_per_byte",
    "workload",
    "model_shape",
    "compute",
    "max_running",
    "max_batched_tokens",
    "host_attention",
    "pie_pool",
];

/// Keys of a `pie_pool` dict.
const POOL_KEYS: &[&str] = &["blocks", "pooled_layers", "prefetch_depth"];

/// Keys of a `model_shape` dict.
const SHAPE_KEYS: &[&str] = &[
    "layers",
    "hidden",
    "intermediate",
    "heads",
    "kv_heads",
    "head_dim",
    "elem_size",
];

fn config(msg: String) -> PyErr {
    to_py(PieError::config(msg))
}

/// The value under `key`, `None` when absent or Python `None`.
fn opt<'py, T>(request: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<T>>
where
    T: for<'a> FromPyObject<'a, 'py>,
{
    crate::request::optional("simulate_serving", request, key)
}

fn method(name: &str) -> PyResult<Method> {
    Method::ALL
        .into_iter()
        .find(|m| m.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
            config(format!(
                "unknown method {name:?}; choose from {}",
                names.join(", ")
            ))
        })
}

fn workload(items: &Bound<'_, PyList>) -> PyResult<Vec<Request>> {
    items
        .iter()
        .enumerate()
        .map(|(id, item)| {
            let d = item.cast::<PyDict>().map_err(|_| {
                config(format!(
                    "workload[{id}] must be a dict with arrival, prompt and output"
                ))
            })?;
            let need = |k: &str| -> PyResult<Bound<'_, PyAny>> {
                d.get_item(k)?
                    .ok_or_else(|| config(format!("workload[{id}] has no {k:?}")))
            };
            let bad = |k: &str| config(format!("workload[{id}].{k} has the wrong type"));
            Ok(Request {
                id,
                arrival: need("arrival")?.extract().map_err(|_| bad("arrival"))?,
                prompt: need("prompt")?.extract().map_err(|_| bad("prompt"))?,
                output: need("output")?.extract().map_err(|_| bad("output"))?,
            })
        })
        .collect()
}

fn sub_dict<'py>(request: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
    match request.get_item(key)? {
        Some(v) if !v.is_none() => {
            Ok(Some(v.cast_into::<PyDict>().map_err(|_| {
                config(format!("simulate_serving: {key} must be a dict"))
            })?))
        }
        _ => Ok(None),
    }
}

fn need<'py, T>(d: &Bound<'py, PyDict>, parent: &str, key: &str) -> PyResult<T>
where
    T: for<'a> FromPyObject<'a, 'py>,
{
    opt(d, key)?.ok_or_else(|| config(format!("simulate_serving: {parent} needs {key:?}")))
}

/// Refuses a key of the `parent` dict that is not one of `known`.
fn known_keys(d: &Bound<'_, PyDict>, parent: &str, known: &[&str]) -> PyResult<()> {
    for key in d.keys() {
        let name: String = key.extract()?;
        if !known.contains(&name.as_str()) {
            return Err(config(format!(
                "simulate_serving: {parent} has no {name:?}; it takes {}",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

fn model_shape(d: &Bound<'_, PyDict>) -> PyResult<ModelShape> {
    known_keys(d, "model_shape", SHAPE_KEYS)?;
    let n = |k: &str| need::<usize>(d, "model_shape", k);
    Ok(ModelShape {
        name: "custom",
        layers: n("layers")?,
        hidden: n("hidden")?,
        intermediate: n("intermediate")?,
        heads: n("heads")?,
        kv_heads: n("kv_heads")?,
        head_dim: n("head_dim")?,
        elem_size: n("elem_size")?,
    })
}

fn fixed_pool(d: &Bound<'_, PyDict>) -> PyResult<FixedPool> {
    known_keys(d, "pie_pool", POOL_KEYS)?;
    Ok(FixedPool {
        blocks: need(d, "pie_pool", "blocks")?,
        pooled_layers: need(d, "pie_pool", "pooled_layers")?,
        prefetch_depth: need(d, "pie_pool", "prefetch_depth")?,
    })
}

fn request_from_dict(request: &Bound<'_, PyDict>) -> PyResult<ServingRequest> {
    for key in request.keys() {
        let name: String = key.extract()?;
        if !KEYS.contains(&name.as_str()) {
            return Err(config(format!(
                "simulate_serving: unknown option {name:?}; known options are {}",
                KEYS.join(", ")
            )));
        }
    }
    let methods = match opt::<Vec<String>>(request, "methods")? {
        Some(names) => Some(
            names
                .iter()
                .map(|n| method(n))
                .collect::<PyResult<Vec<_>>>()?,
        ),
        None => None,
    };
    let workload =
        match request.get_item("workload")? {
            Some(w) if !w.is_none() => Some(workload(w.cast::<PyList>().map_err(|_| {
                config("simulate_serving: workload must be a list of dicts".into())
            })?)?),
            _ => None,
        };
    Ok(ServingRequest {
        machine: opt(request, "machine")?,
        model: opt(request, "model")?,
        rates: opt(request, "rates")?.unwrap_or_default(),
        requests: opt(request, "requests")?,
        gpu_budget_mib: opt(request, "gpu_budget_mib")?,
        seed: opt(request, "seed")?,
        methods,
        equal_performance: opt(request, "equal_performance")?,
        h2d_gbps: opt(request, "h2d_gbps")?,
        d2h_gbps: opt(request, "d2h_gbps")?,
        copy_latency_us: opt(request, "copy_latency_us")?,
        copy_compute_ns_per_byte: opt(request, "copy_compute_ns_per_byte")?,
        limits: {
            let (running, batched) = (
                opt::<usize>(request, "max_running")?,
                opt::<usize>(request, "max_batched_tokens")?,
            );
            if running.is_none() && batched.is_none() {
                None
            } else {
                let d = SchedulerLimits::default();
                Some(SchedulerLimits {
                    max_running: running.unwrap_or(d.max_running),
                    max_batched_tokens: batched.unwrap_or(d.max_batched_tokens),
                    ..d
                })
            }
        },
        model_shape: match sub_dict(request, "model_shape")? {
            Some(d) => Some(model_shape(&d)?),
            None => None,
        },
        compute: match sub_dict(request, "compute")? {
            Some(d) => Some(ComputeModel {
                fixed: need(&d, "compute", "fixed")?,
                per_token: need(&d, "compute", "per_token")?,
                per_context_token: need(&d, "compute", "per_context_token")?,
            }),
            None => None,
        },
        workload,
        host_attention: crate::simulate::host_attention(request, "simulate_serving")?,
        pie_pool: match sub_dict(request, "pie_pool")? {
            Some(d) => Some(fixed_pool(&d)?),
            None => None,
        },
    })
}

/// A rate as reported: requests per second, `"inf"` for all at once, `None`
/// for a given workload.
fn rate_item(py: Python<'_>, rate: f64) -> PyResult<Py<PyAny>> {
    Ok(if rate.is_nan() {
        py.None()
    } else if rate.is_infinite() {
        "inf".into_pyobject(py)?.into_any().unbind()
    } else {
        rate.into_pyobject(py)?.into_any().unbind()
    })
}

fn method_dict<'py>(py: Python<'py>, r: &MethodReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("throughput_tok_s", r.throughput_tok_s)?;
    d.set_item("ttft_ms_p50", r.ttft_ms_p50)?;
    d.set_item("ttft_ms_p99", r.ttft_ms_p99)?;
    d.set_item("tpot_ms_p50", r.tpot_ms_p50)?;
    d.set_item("tpot_ms_p99", r.tpot_ms_p99)?;
    d.set_item("e2e_ms_p50", r.e2e_ms_p50)?;
    d.set_item("peak_running", r.peak_running)?;
    d.set_item("mean_running", r.mean_running)?;
    d.set_item("preemptions", r.preemptions)?;
    d.set_item("device_kv_mib", r.device_kv_mib)?;
    d.set_item("host_kv_mib", r.host_kv_mib)?;
    d.set_item("pool_tokens", r.pool_tokens)?;
    d.set_item("pooled_layers", r.pooled_layers)?;
    d.set_item("prefetch_depth", r.prefetch_depth)?;
    d.set_item("host_attended_layers", r.host_attended_layers)?;
    d.set_item("host_ms", r.host_ms)?;
    d.set_item("steps", r.steps)?;
    d.set_item("finished", r.finished)?;
    d.set_item("output_tokens", r.output_tokens)?;
    d.set_item("emitted_tokens", r.emitted_tokens)?;
    d.set_item("prompt_tokens", r.prompt_tokens)?;
    d.set_item("recomputed_tokens", r.recomputed_tokens)?;
    d.set_item("swapped_mib", r.swapped_mib)?;
    d.set_item("reconfigurations", r.reconfigurations)?;
    d.set_item("reconfiguration_ms", r.reconfiguration_ms)?;
    d.set_item("stall_ms", r.stall_ms)?;
    d.set_item("makespan_s", r.makespan_s)?;
    Ok(d)
}

fn equal_dict<'py>(py: Python<'py>, e: &EqualPerformance) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("rate", rate_item(py, e.rate)?)?;
    d.set_item("no_pooling_budget_mib", e.no_pooling_budget_mib)?;
    d.set_item("no_pooling_throughput_tok_s", e.no_pooling_throughput_tok_s)?;
    d.set_item("pie_budget_mib", e.pie_budget_mib)?;
    d.set_item("pie_throughput_tok_s", e.pie_throughput_tok_s)?;
    d.set_item("memory_ratio", e.memory_ratio)?;
    d.set_item("no_pooling_min_budget_mib", e.no_pooling_min_budget_mib)?;
    d.set_item("memory_ratio_vs_min", e.memory_ratio_vs_min)?;
    d.set_item("runs", e.runs)?;
    Ok(d)
}

fn report_dict<'py>(py: Python<'py>, r: &ServingReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("machine", &r.machine)?;
    d.set_item("model", &r.model)?;
    d.set_item("gpu_budget_mib", r.gpu_budget_mib)?;
    d.set_item("h2d_gbps", r.h2d_gbps)?;
    d.set_item("d2h_gbps", r.d2h_gbps)?;
    d.set_item("requests", r.requests)?;
    d.set_item("mean_prompt", r.mean_prompt)?;
    d.set_item("mean_output", r.mean_output)?;
    d.set_item("device_pool_tokens", r.device_pool_tokens)?;
    d.set_item("seed", r.seed)?;
    let runs = PyList::empty(py);
    for run in &r.runs {
        let rd = PyDict::new(py);
        rd.set_item("rate", rate_item(py, run.rate)?)?;
        let methods = PyDict::new(py);
        for (m, x) in &run.methods {
            methods.set_item(m.name(), method_dict(py, x)?)?;
        }
        rd.set_item("methods", methods)?;
        runs.append(rd)?;
    }
    if let [only] = &r.runs[..] {
        d.set_item("rate", rate_item(py, only.rate)?)?;
        d.set_item("methods", runs.get_item(0)?.get_item("methods")?)?;
    }
    d.set_item("runs", runs)?;
    match &r.equal_performance {
        Some(e) => d.set_item("equal_performance", equal_dict(py, e)?)?,
        None => d.set_item("equal_performance", py.None())?,
    }
    Ok(d)
}

/// Runs a serving simulation. `request` holds any of the keys in `KEYS` (see
/// `pie_core::serving::ServingRequest`); the result is a dict of the report.
#[pyfunction]
fn simulate_serving(py: Python<'_>, request: &Bound<'_, PyDict>) -> PyResult<Py<PyDict>> {
    let req = request_from_dict(request)?;
    let report = py.detach(|| run(&req)).map_err(to_py)?;
    Ok(report_dict(py, &report)?.unbind())
}

/// Adds `simulate_serving` to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(simulate_serving, m)?)
}
