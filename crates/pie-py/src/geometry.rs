//! Geometry and fit questions, answered by pie-core's own functions
//! ([`pie_core::layout`], [`pie_core::fit`]) so the Python side computes no
//! byte offset, slot size, capacity or budget fit itself. Pure functions: no
//! engine is built. Bad arguments raise `pie_rs.ConfigError`, a budget too
//! small for any plan `pie_rs.BudgetError`.

use crate::errors::{config_error, to_py};
use pie_core::fit;
use pie_core::layout::{SlotGeometry, SLOT_ALIGN};
use pie_core::{LayerSpec, Plan};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict};

/// A non-negative Python int as `usize`, or a `ConfigError` naming `what`.
fn size(value: &Bound<'_, PyAny>, what: &str) -> PyResult<usize> {
    if !value.is_instance_of::<PyBool>() {
        if let Ok(v) = value.extract::<usize>() {
            return Ok(v);
        }
    }
    Err(config_error(format!(
        "{what} must be a non-negative int, got {}",
        value
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| "?".into())
    )))
}

/// `(batch, kv_heads, k_dim, v_dim, elem_size)` per layer, as [`LayerSpec`]s.
fn layer_specs(layers: &Bound<'_, PyAny>) -> PyResult<Vec<LayerSpec>> {
    let bad = || {
        config_error(
            "layers must be a list of (batch, kv_heads, k_dim, v_dim, elem_size) tuples of ints",
        )
    };
    let mut specs = Vec::new();
    for item in layers.try_iter().map_err(|_| bad())? {
        let item = item?;
        let fields: Vec<Bound<'_, PyAny>> = item
            .try_iter()
            .map_err(|_| bad())?
            .collect::<PyResult<_>>()?;
        let [batch, kv_heads, k_dim, v_dim, elem_size] = fields.as_slice() else {
            return Err(bad());
        };
        specs.push(LayerSpec {
            batch: size(batch, "batch")?,
            kv_heads: size(kv_heads, "kv_heads")?,
            k_dim: size(k_dim, "k_dim")?,
            v_dim: size(v_dim, "v_dim")?,
            elem_size: size(elem_size, "elem_size")?,
        });
    }
    Ok(specs)
}

/// The dict form of a [`SlotGeometry`] (see `_core.pyi`, `layer_geometry`).
pub(crate) fn geometry_dict<'py>(
    py: Python<'py>,
    g: &SlotGeometry,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("capacity", g.capacity)?;
    d.set_item("k_offset", g.k_offset)?;
    d.set_item("v_offset", g.v_offset)?;
    d.set_item("k_shape", g.k_shape)?;
    d.set_item("v_shape", g.v_shape)?;
    d.set_item("k_strides", g.k_strides)?;
    d.set_item("v_strides", g.v_strides)?;
    d.set_item("bytes", g.bytes)?;
    d.set_item("slot_bytes", g.slot_bytes)?;
    Ok(d)
}

/// Where K and V of a layer of this shape lie inside its slot at `capacity`
/// tokens: byte offsets, shapes, element strides and byte sizes.
#[pyfunction]
fn layer_geometry<'py>(
    py: Python<'py>,
    batch: &Bound<'py, PyAny>,
    kv_heads: &Bound<'py, PyAny>,
    k_dim: &Bound<'py, PyAny>,
    v_dim: &Bound<'py, PyAny>,
    elem_size: &Bound<'py, PyAny>,
    capacity: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let spec = LayerSpec {
        batch: size(batch, "batch")?,
        kv_heads: size(kv_heads, "kv_heads")?,
        k_dim: size(k_dim, "k_dim")?,
        v_dim: size(v_dim, "v_dim")?,
        elem_size: size(elem_size, "elem_size")?,
    };
    let g = spec.geometry(size(capacity, "capacity")?).map_err(to_py)?;
    geometry_dict(py, &g)
}

/// `tokens` rounded up to the capacity quantum (at least one quantum).
#[pyfunction]
fn round_capacity(tokens: &Bound<'_, PyAny>) -> PyResult<usize> {
    Ok(fit::round_capacity(size(tokens, "tokens")?))
}

/// Device bytes the plan (`pooled_layers`, `prefetch_depth`) needs for
/// `layers` at `capacity` tokens.
#[pyfunction]
fn device_bytes(
    layers: &Bound<'_, PyAny>,
    capacity: &Bound<'_, PyAny>,
    pooled_layers: &Bound<'_, PyAny>,
    prefetch_depth: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    let specs = layer_specs(layers)?;
    let pooled = pooled_layers
        .try_iter()
        .map_err(|_| config_error("pooled_layers must be a list of layer indices"))?
        .map(|i| size(&i?, "a pooled layer index"))
        .collect::<PyResult<Vec<_>>>()?;
    let plan = Plan::copying(pooled, size(prefetch_depth, "prefetch_depth")?);
    fit::device_bytes(&specs, size(capacity, "capacity")?, &plan).map_err(to_py)
}

/// The plan a budget fits: the fewest pooled layers spread over the depth,
/// with up to `prefetch_depth` staging slots, and the device bytes it takes.
#[pyfunction]
fn fit_plan<'py>(
    py: Python<'py>,
    layers: &Bound<'py, PyAny>,
    capacity: &Bound<'py, PyAny>,
    budget_bytes: &Bound<'py, PyAny>,
    prefetch_depth: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let specs = layer_specs(layers)?;
    let budget = if budget_bytes.is_none() {
        None
    } else {
        Some(size(budget_bytes, "budget_bytes")?)
    };
    let fit = fit::fit_plan(
        &specs,
        size(capacity, "capacity")?,
        budget,
        size(prefetch_depth, "prefetch_depth")?,
    )
    .map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("pooled_layers", fit.plan.pooled.clone())?;
    d.set_item("prefetch_depth", fit.plan.staging_slots())?;
    d.set_item("device_bytes", fit.device_bytes)?;
    Ok(d)
}

/// Adds the geometry constants and functions to `_core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SLOT_ALIGN", SLOT_ALIGN)?;
    m.add("CAPACITY_QUANTUM", fit::CAPACITY_QUANTUM)?;
    m.add_function(wrap_pyfunction!(layer_geometry, m)?)?;
    m.add_function(wrap_pyfunction!(round_capacity, m)?)?;
    m.add_function(wrap_pyfunction!(device_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(fit_plan, m)?)?;
    Ok(())
}
