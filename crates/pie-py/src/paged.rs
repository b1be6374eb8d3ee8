//! Bindings for paged caches (continuous batching): scattered write-backs on
//! an engine and the sizing of a paged cache under a budget. Conversions only;
//! the logic is `pie_core::engine` (`layer_written_ranges`) and `pie_core::paged`.

use crate::errors::{config_error, state_error, to_py};
use crate::{AnyEngine, PyEngine};
use pie_core::paged::{paged_fit as fit, PagedTarget};
use pie_core::{LayerSpec, Plan, Stream};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Records that token rows `ranges` (`(start, n)` pairs) of `layer` were
/// written on `stream`; a pooled layer writes back exactly those rows. Returns
/// the layer's new length (its high-water mark).
#[pyfunction]
fn paged_written(
    engine: &Bound<'_, PyEngine>,
    layer: usize,
    ranges: Vec<(usize, usize)>,
    stream: u64,
) -> PyResult<usize> {
    let mut engine = engine.borrow_mut();
    let s = Stream::Foreign(stream);
    match engine.inner.as_mut() {
        Some(AnyEngine::Host(e)) => e.layer_written_ranges(layer, &ranges, s).map_err(to_py),
        Some(AnyEngine::Cuda(e)) => e.layer_written_ranges(layer, &ranges, s).map_err(to_py),
        None => Err(state_error(
            "the engine is closed (the pool was detached); attach again to use pie-rs",
        )),
    }
}

/// Sets how many rows of `layer` a prefetch moves (between steps; waits for
/// every copy first).
#[pyfunction]
fn paged_set_extent(
    py: Python<'_>,
    engine: &Bound<'_, PyEngine>,
    layer: usize,
    rows: usize,
) -> PyResult<()> {
    let mut engine = engine.borrow_mut();
    match engine.inner.as_mut() {
        Some(AnyEngine::Host(e)) => py.detach(|| e.set_extent(layer, rows)).map_err(to_py),
        Some(AnyEngine::Cuda(e)) => py.detach(|| e.set_extent(layer, rows)).map_err(to_py),
        None => Err(state_error(
            "the engine is closed (the pool was detached); attach again to use pie-rs",
        )),
    }
}

/// Sizes a paged cache: see `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (row, layers, budget_bytes, quantum, min_rows, *, pooled_layers=None, pooled_count=None, rows=None, prefetch_depth=2, host_attended=false))]
#[allow(clippy::too_many_arguments)]
fn paged_fit<'py>(
    py: Python<'py>,
    row: (usize, usize, usize),
    layers: usize,
    budget_bytes: Option<usize>,
    quantum: usize,
    min_rows: usize,
    pooled_layers: Option<Vec<usize>>,
    pooled_count: Option<usize>,
    rows: Option<usize>,
    prefetch_depth: usize,
    host_attended: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let (k_dim, v_dim, elem_size) = row;
    let spec = LayerSpec {
        batch: 1,
        kv_heads: 1,
        k_dim,
        v_dim,
        elem_size,
    };
    let staging = prefetch_depth.max(1);
    let target = match (pooled_layers, pooled_count, rows) {
        (Some(list), None, None) => {
            let mut plan = Plan::from_layers(list, staging, layers).map_err(to_py)?;
            // As for `Pooled`: with every layer pooled the copied sizing holds.
            if host_attended && plan.pooled.len() < layers {
                plan.host_attended = plan.pooled.clone();
            }
            PagedTarget::Plan(plan)
        }
        (None, Some(count), None) => PagedTarget::Pooled {
            count,
            staging,
            host_attended,
        },
        // The fewest pooled layers that hold the rows, sized with staging slots
        // (what a copied plan needs, so enough for a host-attended one too).
        (None, None, Some(rows)) => PagedTarget::Rows { rows, staging },
        _ => {
            return Err(config_error(
                "give exactly one of pooled_layers, pooled_count or rows",
            ))
        }
    };
    let f = fit(&spec, layers, budget_bytes, quantum, min_rows, &target).map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("rows", f.rows)?;
    d.set_item("pooled_layers", f.plan.pooled.clone())?;
    d.set_item("prefetch_depth", f.plan.staging_slots())?;
    d.set_item("device_bytes", f.device_bytes)?;
    d.set_item("host_bytes", f.host_bytes)?;
    Ok(d)
}

/// Adds this module's functions to `_core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(paged_written, m)?)?;
    m.add_function(wrap_pyfunction!(paged_fit, m)?)?;
    m.add_function(wrap_pyfunction!(paged_set_extent, m)?)?;
    Ok(())
}
