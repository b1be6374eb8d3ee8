//! The one place where engine errors become Python exceptions: a hierarchy
//! rooted at `pie_rs.PieError`, one subclass per [`ErrorKind`]. The classes
//! are made at import (so `ConfigError` can also be a `ValueError` and
//! `BackendError`/`StateError` `RuntimeError`s, which `create_exception!`
//! cannot express) and kept here for the conversion.

use pie_core::{ErrorKind, PieError};
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

struct Classes {
    budget: Py<PyType>,
    config: Py<PyType>,
    backend: Py<PyType>,
    state: Py<PyType>,
    internal: Py<PyType>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn make_class<'py>(
    py: Python<'py>,
    name: &str,
    doc: &str,
    bases: Vec<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__doc__", doc)?;
    ns.set_item("__module__", "pie_rs")?;
    let bases = PyTuple::new(py, bases)?;
    let cls = py
        .get_type::<PyType>()
        .call1((name, bases, ns))?
        .cast_into::<PyType>()?;
    Ok(cls)
}

/// Converts an engine error into the matching `pie_rs` exception.
pub fn to_py(e: PieError) -> PyErr {
    let msg = e.to_string();
    Python::attach(|py| match CLASSES.get(py) {
        Some(c) => {
            let cls = match e.kind() {
                ErrorKind::Budget => &c.budget,
                ErrorKind::Config => &c.config,
                ErrorKind::Backend => &c.backend,
                ErrorKind::State => &c.state,
                ErrorKind::Internal => &c.internal,
            };
            PyErr::from_type(cls.bind(py).clone(), msg)
        }
        None => PyRuntimeError::new_err(msg),
    })
}

/// Shorthand: a `pie_rs.ConfigError` with `msg`.
pub fn config_error(msg: impl Into<String>) -> PyErr {
    to_py(PieError::Config(msg.into()))
}

/// Shorthand: a `pie_rs.StateError` with `msg`.
pub fn state_error(msg: impl Into<String>) -> PyErr {
    to_py(PieError::State(msg.into()))
}

/// Creates the exception classes and adds them to the module.
pub fn register<'py>(m: &Bound<'py, PyModule>) -> PyResult<()> {
    let py = m.py();
    let base = make_class(
        py,
        "PieError",
        "Root of every pie-rs error.",
        vec![py.get_type::<PyException>().into_any()],
    )?;
    let sub = |name: &str, doc: &str, extra: Bound<'py, PyType>| {
        make_class(
            py,
            name,
            doc,
            vec![base.clone().into_any(), extra.into_any()],
        )
    };
    let budget = make_class(
        py,
        "BudgetError",
        "The device budget cannot hold what was asked; raise the budget or pool more.",
        vec![base.clone().into_any()],
    )?;
    let config = sub(
        "ConfigError",
        "An argument, shape, plan or option is invalid.",
        py.get_type::<PyValueError>(),
    )?;
    let backend = sub(
        "BackendError",
        "The backend (CUDA driver, allocation, copy engine) failed.",
        py.get_type::<PyRuntimeError>(),
    )?;
    let state = sub(
        "StateError",
        "The engine's state does not allow the operation (closed, stopped after a failure, misuse).",
        py.get_type::<PyRuntimeError>(),
    )?;
    let internal = sub(
        "InternalError",
        "An engine invariant broke: a bug in pie-rs, not in the calling code; please report it.",
        py.get_type::<PyRuntimeError>(),
    )?;
    m.add("PieError", &base)?;
    m.add("BudgetError", &budget)?;
    m.add("ConfigError", &config)?;
    m.add("BackendError", &backend)?;
    m.add("StateError", &state)?;
    m.add("InternalError", &internal)?;
    let _ = CLASSES.set(
        py,
        Classes {
            budget: budget.unbind(),
            config: config.unbind(),
            backend: backend.unbind(),
            state: state.unbind(),
            internal: internal.unbind(),
        },
    );
    Ok(())
}
