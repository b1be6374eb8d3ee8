//! `pie_rs._core`: thin Python bindings of the pie-rs engine. Conversions,
//! errors, GIL release and DLPack only; the logic lives in pie-core.

mod attention;
mod dlpack;
mod errors;
mod geometry;
mod paged;
mod request;
mod serving;
mod simulate;

use dlpack::{Region, StreamSync};
use errors::{config_error, state_error, to_py};
use pie_core::policy::HostAttention;
use pie_core::slots::Residence;
use pie_core::telemetry::Counters;
use pie_core::{
    Backend, Buffer, Engine, EngineOptions, LayerKv, LayerSpec, Plan, PolicyConfig, Stream,
};
use pie_cuda::CudaBackend;
use pie_host::{FaultConfig, HostBackend};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

enum AnyEngine {
    Host(Engine<HostBackend>),
    Cuda(Engine<CudaBackend>),
}

/// Runs `$body` with `$e` bound to the engine, whatever its backend.
macro_rules! with_engine {
    ($self:expr, $e:ident => $body:expr) => {
        match $self.inner.as_mut() {
            Some(AnyEngine::Host($e)) => $body,
            Some(AnyEngine::Cuda($e)) => $body,
            None => Err(state_error(
                "the engine is closed (the pool was detached); attach again to use pie-rs",
            )),
        }
    };
}

/// The pie-rs engine for one cache. See `_core.pyi` for the contract.
#[pyclass(module = "pie_rs._core", name = "Engine")]
struct PyEngine {
    inner: Option<AnyEngine>,
    backend: &'static str,
    device_index: i32,
    policy: PolicyConfig,
}

fn stream(handle: u64) -> Stream {
    Stream::Foreign(handle)
}

fn region<B: Backend>(
    buf: &Arc<B::DeviceBuffer>,
    cuda: Option<i32>,
    sync: Option<StreamSync>,
) -> Region {
    Region::new(buf.addr(), buf.len(), cuda, buf.clone(), sync)
}

fn host_region<B: Backend>(buf: &Arc<B::HostBuffer>) -> Region {
    Region::new(buf.addr(), buf.len(), None, buf.clone(), None)
}

fn stats_dict<'py, B: Backend>(py: Python<'py>, e: &Engine<B>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let c = e.counters();
    let plan = e.plan();
    d.set_item("backend", e.backend().name())?;
    d.set_item("layers", e.num_layers())?;
    d.set_item("pooled_layers", plan.pooled.len())?;
    d.set_item("resident_layers", e.num_layers() - plan.pooled.len())?;
    d.set_item("pooled", plan.pooled.clone())?;
    d.set_item("host_attended", plan.host_attended.clone())?;
    d.set_item(
        "host_attended_layer_steps",
        Counters::get(&c.host_attended_layer_steps),
    )?;
    d.set_item("prefetch_depth", plan.staging_slots())?;
    d.set_item("capacity", e.capacity())?;
    d.set_item("device_kv_bytes", e.device_bytes())?;
    d.set_item("peak_device_kv_bytes", Counters::get(&c.peak_device_bytes))?;
    d.set_item("device_budget_bytes", e.device_budget())?;
    d.set_item("host_kv_bytes", e.host_bytes())?;
    d.set_item("h2d_bytes", Counters::get(&c.h2d_bytes))?;
    d.set_item("d2h_bytes", Counters::get(&c.d2h_bytes))?;
    d.set_item("prefetches", Counters::get(&c.prefetches))?;
    d.set_item("prefetch_hits", Counters::get(&c.prefetch_hits))?;
    d.set_item("stall_seconds", e.stall_seconds())?;
    d.set_item("timed_steps", Counters::get(&c.timed_steps))?;
    d.set_item("compute_seconds", Counters::get(&c.step_ns) as f64 * 1e-9)?;
    d.set_item("steps", Counters::get(&c.steps))?;
    d.set_item("plan_changes", Counters::get(&c.plan_changes))?;
    d.set_item("generation", e.generation())?;
    Ok(d)
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (backend, layers, capacity, *, device_index=0, budget_bytes=None, policy="adaptive", objective="speed", pooled_layers=None, prefetch_depth=None, faults=None, wait_timeout=None, host_attention="never", query_group=1, memory_slowdown=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        backend: &str,
        layers: Vec<(usize, usize, usize, usize, usize)>,
        capacity: usize,
        device_index: i32,
        budget_bytes: Option<usize>,
        policy: &str,
        objective: &str,
        pooled_layers: Option<Vec<usize>>,
        prefetch_depth: Option<usize>,
        faults: Option<&Bound<'_, PyDict>>,
        wait_timeout: Option<f64>,
        host_attention: &str,
        query_group: usize,
        memory_slowdown: Option<f64>,
    ) -> PyResult<Self> {
        let specs: Vec<LayerSpec> = layers
            .into_iter()
            .map(|(batch, kv_heads, k_dim, v_dim, elem_size)| LayerSpec {
                batch,
                kv_heads,
                k_dim,
                v_dim,
                elem_size,
            })
            .collect();
        if device_index < 0 {
            return Err(config_error(format!(
                "device_index {device_index} is negative; use a CUDA device ordinal"
            )));
        }
        if query_group == 0 {
            return Err(config_error(
                "query_group must be at least 1 (query heads per KV head), not 0",
            ));
        }
        let config = PolicyConfig::parse(
            policy,
            objective,
            pooled_layers,
            prefetch_depth,
            specs.len(),
        )
        .and_then(|c| c.with_host_attention(host_attention))
        .and_then(|c| with_slowdown(c, memory_slowdown))
        .map_err(to_py)?;
        let mut options = EngineOptions {
            capacity,
            device_budget: budget_bytes,
            ..Default::default()
        };
        if let Some(t) = wait_timeout {
            if !(t.is_finite() && t > 0.0) {
                return Err(config_error(format!(
                    "wait_timeout must be a positive number of seconds, not {t}"
                )));
            }
            options.wait_timeout = std::time::Duration::from_secs_f64(t);
        }
        let faults = parse_faults(faults)?;
        if faults.is_some() && backend != "host" {
            return Err(config_error(
                "fault injection exists only on the host backend; pass backend=\"host\"",
            ));
        }
        // Under "auto" the adaptive policy places each pooled layer by the cost
        // model, which needs this machine's CPU figures; "never" needs none. On
        // the host backend the "device" is this CPU: no link is saved, so "auto"
        // copies (a placement there would follow noisy timings run to run, and
        // copying keeps the default path bit-exact); "always" still attends there.
        let host = match (config.host_attention, backend) {
            (HostAttention::Never, _) | (HostAttention::Auto, "host") => None,
            _ => attention::host_model(&specs, query_group),
        };
        let chosen = config.build_with_host(host);
        let (inner, name) = match backend {
            "host" => {
                let timeout = options.wait_timeout;
                let e = py
                    .detach(move || {
                        let mut b = HostBackend::with_faults(faults.unwrap_or_default())?;
                        b.set_timeout(timeout);
                        Engine::new(b, specs, options, chosen)
                    })
                    .map_err(to_py)?;
                (AnyEngine::Host(e), "host")
            }
            "cuda" => {
                let idx = device_index as usize;
                let e = py
                    .detach(move || Engine::new(CudaBackend::new(idx)?, specs, options, chosen))
                    .map_err(to_py)?;
                (AnyEngine::Cuda(e), "cuda")
            }
            other => {
                return Err(config_error(format!(
                    "backend {other:?} is not known; use \"host\" or \"cuda\""
                )))
            }
        };
        Ok(PyEngine {
            inner: Some(inner),
            backend: name,
            device_index,
            policy: config,
        })
    }

    /// "host" or "cuda".
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    #[getter]
    fn num_layers(&mut self) -> PyResult<usize> {
        with_engine!(self, e => Ok(e.num_layers()))
    }

    #[getter]
    fn capacity(&mut self) -> PyResult<usize> {
        with_engine!(self, e => Ok(e.capacity()))
    }

    #[getter]
    fn generation(&mut self) -> PyResult<u64> {
        with_engine!(self, e => Ok(e.generation()))
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }

    fn will_rebuild(&mut self) -> PyResult<bool> {
        with_engine!(self, e => Ok(e.will_rebuild()))
    }

    fn layer_begin(&mut self, layer: usize, stream: u64) -> PyResult<()> {
        with_engine!(self, e => e.layer_begin(layer, self::stream(stream)).map_err(to_py))
    }

    fn layer_ready(&mut self, py: Python<'_>, layer: usize, stream: u64) -> PyResult<usize> {
        with_engine!(self, e => py.detach(|| e.layer_ready(layer, self::stream(stream))).map_err(to_py))
    }

    /// `(offset, on_host)`: where the layer's KV is for this step's attention
    /// (the device arena, or the host arena for a host-attended layer).
    fn layer_ready_at(
        &mut self,
        py: Python<'_>,
        layer: usize,
        stream: u64,
    ) -> PyResult<(usize, bool)> {
        with_engine!(self, e => match py.detach(|| e.layer_ready_at(layer, self::stream(stream))).map_err(to_py)? {
            LayerKv::Device(offset) => Ok((offset, false)),
            LayerKv::Host(offset) => Ok((offset, true)),
        })
    }

    fn layer_written(&mut self, layer: usize, n_new: usize, stream: u64) -> PyResult<usize> {
        with_engine!(self, e => e.layer_written(layer, n_new, self::stream(stream)).map_err(to_py))
    }

    fn layer_done(&mut self, layer: usize, stream: u64) -> PyResult<()> {
        with_engine!(self, e => e.layer_done(layer, self::stream(stream)).map_err(to_py))
    }

    fn seq_len(&mut self, layer: usize) -> PyResult<usize> {
        with_engine!(self, e => e.seq_len(layer).map_err(to_py))
    }

    fn set_seq_len(&mut self, py: Python<'_>, layer: usize, tokens: usize) -> PyResult<()> {
        with_engine!(self, e => py.detach(|| e.set_seq_len(layer, tokens)).map_err(to_py))
    }

    fn ensure_capacity(&mut self, py: Python<'_>, tokens: usize) -> PyResult<bool> {
        with_engine!(self, e => py.detach(|| e.ensure_capacity(tokens)).map_err(to_py))
    }

    fn quiesce(&mut self, py: Python<'_>) -> PyResult<()> {
        with_engine!(self, e => py.detach(|| e.quiesce()).map_err(to_py))
    }

    fn resume(&mut self, py: Python<'_>) -> PyResult<()> {
        with_engine!(self, e => py.detach(|| e.resume()).map_err(to_py))
    }

    fn is_pooled(&mut self, layer: usize) -> PyResult<bool> {
        with_engine!(self, e => Ok(matches!(e.residence(layer).map_err(to_py)?, Residence::Pooled { .. })))
    }

    fn device_offset(&mut self, layer: usize) -> PyResult<Option<usize>> {
        with_engine!(self, e => Ok(match e.residence(layer).map_err(to_py)? {
            Residence::Resident { device_offset } => Some(device_offset),
            Residence::Pooled { .. } => None,
        }))
    }

    fn host_offset(&mut self, layer: usize) -> PyResult<Option<usize>> {
        with_engine!(self, e => Ok(match e.residence(layer).map_err(to_py)? {
            Residence::Pooled { host_offset } => Some(host_offset),
            Residence::Resident { .. } => None,
        }))
    }

    /// Where layer `layer`'s KV is now (`device_offset` if resident,
    /// `host_offset` if pooled) and its geometry at the engine's capacity.
    fn layer_view<'py>(&mut self, py: Python<'py>, layer: usize) -> PyResult<Bound<'py, PyDict>> {
        with_engine!(self, e => {
            let Some(&spec) = e.specs().get(layer) else {
                return Err(config_error(format!("layer {layer} is out of range; the engine manages {} layers", e.num_layers())));
            };
            let arenas = e.arenas();
            let d = geometry::geometry_dict(py, &spec.geometry(arenas.layout.capacity).map_err(to_py)?)?;
            d.set_item("device_offset", arenas.layout.device_slot[layer])?;
            d.set_item("host_offset", arenas.layout.host_slot[layer])?;
            Ok(d)
        })
    }

    /// Beam search's reorder of every layer, in the engine (GIL released).
    fn reorder(&mut self, py: Python<'_>, indices: Vec<i64>, stream: u64) -> PyResult<()> {
        let idx = indices
            .iter()
            .map(|&i| usize::try_from(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| config_error(format!("reorder indices {indices:?} include a negative index; give one index in 0..batch per sequence")))?;
        with_engine!(self, e => py.detach(|| e.reorder(&idx, self::stream(stream))).map_err(to_py))
    }

    fn reset(&mut self, py: Python<'_>) -> PyResult<()> {
        with_engine!(self, e => py.detach(|| e.reset()).map_err(to_py))
    }

    fn device_region(&mut self) -> PyResult<Region> {
        let dev = self.device_index;
        match self.inner.as_mut() {
            Some(AnyEngine::Host(e)) => Ok(region::<HostBackend>(&e.arenas().device, None, None)),
            Some(AnyEngine::Cuda(e)) => {
                let sync = e.stream_sync();
                let sync: StreamSync = Arc::new(move |h| sync(Stream::Foreign(h)));
                Ok(region::<CudaBackend>(
                    &e.arenas().device,
                    Some(dev),
                    Some(sync),
                ))
            }
            None => Err(state_error(
                "the engine is closed; attach again to use pie-rs",
            )),
        }
    }

    fn host_region(&mut self) -> PyResult<Region> {
        with_engine!(self, e => Ok(host_region_of(e)))
    }

    /// Pins a plan from the next step on; `host_attended` (a subset of
    /// `pooled_layers`, any order) are attended on the host, the rest copied.
    #[pyo3(signature = (pooled_layers, prefetch_depth, host_attended=None))]
    fn set_plan(
        &mut self,
        pooled_layers: Vec<usize>,
        prefetch_depth: usize,
        host_attended: Option<Vec<usize>>,
    ) -> PyResult<()> {
        with_engine!(self, e => {
            let plan = Plan::from_placed_layers(
                pooled_layers,
                host_attended.unwrap_or_default(),
                prefetch_depth,
                e.num_layers(),
            )
            .map_err(to_py)?;
            e.set_plan(plan).map_err(to_py)
        })
    }

    fn plan<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let policy = self.policy.kind.name();
        let objective = self.policy.objective.name();
        let host_attention = self.policy.host_attention.name();
        let memory_slowdown = self.policy.memory_slowdown.get();
        with_engine!(self, e => {
            let d = PyDict::new(py);
            let plan = e.plan();
            d.set_item("pooled_layers", plan.pooled.clone())?;
            d.set_item("host_attended", plan.host_attended.clone())?;
            d.set_item("prefetch_depth", plan.staging_slots())?;
            d.set_item("policy", policy)?;
            d.set_item("host_attention", host_attention)?;
            d.set_item("objective", objective)?;
            d.set_item("memory_slowdown", memory_slowdown)?;
            Ok(d)
        })
    }

    fn predicted_h2d_bytes_per_step(&mut self) -> PyResult<u64> {
        with_engine!(self, e => Ok(e.predicted_h2d_bytes_per_step()))
    }

    fn flush_telemetry(&mut self, py: Python<'_>) -> PyResult<()> {
        with_engine!(self, e => py.detach(|| e.flush_telemetry()).map_err(to_py))
    }

    fn stats<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        with_engine!(self, e => stats_dict(py, e))
    }

    fn last_sample<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        with_engine!(self, e => {
            let Some(s) = e.last_sample() else { return Ok(None) };
            let d = PyDict::new(py);
            d.set_item("step", s.step)?;
            d.set_item("layer_compute", s.layer_compute)?;
            d.set_item("layer_stall", s.layer_stall)?;
            d.set_item("h2d_seconds", s.h2d_seconds)?;
            d.set_item("h2d_bytes", s.h2d_bytes)?;
            d.set_item("d2h_seconds", s.d2h_seconds)?;
            d.set_item("d2h_bytes", s.d2h_bytes)?;
            d.set_item("step_seconds", s.step_seconds)?;
            d.set_item("host_attended", s.plan.host_attended.clone())?;
            d.set_item("pooled_layers", s.plan.pooled)?;
            d.set_item("layer_start", s.layer_start)?;
            d.set_item("h2d_spans", s.h2d_spans)?;
            d.set_item("d2h_spans", s.d2h_spans)?;
            Ok(Some(d))
        })
    }

    fn close(&mut self, py: Python<'_>) {
        if let Some(mut inner) = self.inner.take() {
            py.detach(move || match &mut inner {
                AnyEngine::Host(e) => e.close(),
                AnyEngine::Cuda(e) => e.close(),
            });
        }
    }

    fn __repr__(&mut self) -> String {
        let backend = self.backend;
        match self.inner.as_mut() {
            Some(AnyEngine::Host(e)) => format!(
                "Engine(backend={backend}, layers={}, pooled={:?})",
                e.num_layers(),
                e.plan().pooled
            ),
            Some(AnyEngine::Cuda(e)) => format!(
                "Engine(backend={backend}, layers={}, pooled={:?})",
                e.num_layers(),
                e.plan().pooled
            ),
            None => format!("Engine(backend={backend}, closed)"),
        }
    }
}

/// Reads `{"fail_copy_at": n, "hang_copy_at": n, "alloc_limit": bytes}`.
fn parse_faults(faults: Option<&Bound<'_, PyDict>>) -> PyResult<Option<FaultConfig>> {
    let Some(d) = faults else { return Ok(None) };
    let mut f = FaultConfig::default();
    for (k, v) in d.iter() {
        let key: String = k.extract()?;
        match key.as_str() {
            "fail_copy_at" => f.fail_copy_at = Some(v.extract()?),
            "hang_copy_at" => f.hang_copy_at = Some(v.extract()?),
            "alloc_limit" => f.alloc_limit = Some(v.extract()?),
            other => {
                return Err(config_error(format!(
                    "unknown fault {other:?}; use fail_copy_at, hang_copy_at or alloc_limit"
                )))
            }
        }
    }
    Ok(Some(f))
}

fn host_region_of<B: Backend>(e: &Engine<B>) -> Region {
    host_region::<B>(&e.arenas().host)
}

/// Parses a pool's policy options once, as every engine of the pool will:
/// `{"policy", "objective", "pooled_layers", "prefetch_depth", "host_attention", "memory_slowdown"}`
/// after pie-core's rules (pinned layers make the policy static and are sorted), or a ConfigError.
#[pyfunction]
#[pyo3(signature = (policy, objective, pooled_layers, prefetch_depth, num_layers, host_attention="never", memory_slowdown=None))]
#[allow(clippy::too_many_arguments)]
fn policy_config<'py>(
    py: Python<'py>,
    policy: &str,
    objective: &str,
    pooled_layers: Option<Vec<usize>>,
    prefetch_depth: Option<usize>,
    num_layers: usize,
    host_attention: &str,
    memory_slowdown: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let config = PolicyConfig::parse(policy, objective, pooled_layers, prefetch_depth, num_layers)
        .and_then(|c| c.with_host_attention(host_attention))
        .and_then(|c| with_slowdown(c, memory_slowdown))
        .map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("policy", config.kind.name())?;
    d.set_item("objective", config.objective.name())?;
    d.set_item(
        "pooled_layers",
        config.pinned.as_ref().map(|p| p.pooled.clone()),
    )?;
    d.set_item("prefetch_depth", config.prefetch_depth)?;
    d.set_item("host_attention", config.host_attention.name())?;
    d.set_item("memory_slowdown", config.memory_slowdown.get())?;
    Ok(d)
}

/// The memory objective's allowance, when the caller gives one (pie-core's default otherwise).
fn with_slowdown(
    config: PolicyConfig,
    memory_slowdown: Option<f64>,
) -> pie_core::Result<PolicyConfig> {
    match memory_slowdown {
        Some(factor) => config.with_memory_slowdown(factor),
        None => Ok(config),
    }
}

/// Whether a CUDA driver and at least one device can be used (never raises).
#[pyfunction]
fn cuda_available() -> bool {
    pie_cuda::cuda_available()
}

/// Why CUDA is or is not available, in words.
#[pyfunction]
fn cuda_probe() -> String {
    match pie_cuda::probe() {
        Ok(s) => s,
        Err(e) => e,
    }
}

/// Measures the engine's own copy bandwidth on CUDA device `device_index`:
/// one dict per size with H2D, D2H and simultaneous GB/s.
#[pyfunction]
#[pyo3(signature = (sizes, iters=10, device_index=0))]
fn cuda_copy_bench<'py>(
    py: Python<'py>,
    sizes: Vec<usize>,
    iters: usize,
    device_index: usize,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let rows = py
        .detach(|| {
            let b = CudaBackend::new(device_index)?;
            pie_cuda::bench_copies(&b, &sizes, iters)
        })
        .map_err(to_py)?;
    rows.into_iter()
        .map(|r| {
            let d = PyDict::new(py);
            d.set_item("bytes", r.bytes)?;
            d.set_item("iters", r.iters)?;
            d.set_item("h2d_gbps", r.h2d_gbps)?;
            d.set_item("d2h_gbps", r.d2h_gbps)?;
            d.set_item("both_h2d_gbps", r.both_h2d_gbps)?;
            d.set_item("both_d2h_gbps", r.both_d2h_gbps)?;
            d.set_item("both_total_gbps", r.both_total_gbps)?;
            Ok(d)
        })
        .collect()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<PyEngine>()?;
    paged::register(m)?;
    m.add_class::<Region>()?;
    m.add_function(wrap_pyfunction!(policy_config, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_probe, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_copy_bench, m)?)?;
    simulate::register(m)?;
    geometry::register(m)?;
    attention::register(m)?;
    serving::register(m)?;
    Ok(())
}
