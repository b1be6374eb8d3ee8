//! Reading optional fields of a request dict (the what-if bindings take one).

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_py;
use pie_core::PieError;

/// The value under `key`, `None` when absent or Python `None`; a value of the
/// wrong type is a `ConfigError` naming the call (`what`) and the field.
pub(crate) fn optional<'py, T>(
    what: &str,
    request: &Bound<'py, PyDict>,
    key: &str,
) -> PyResult<Option<T>>
where
    T: for<'a> FromPyObject<'a, 'py>,
{
    match request.get_item(key)? {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v.extract::<T>().map(Some).map_err(|e| {
            let e: PyErr = e.into();
            to_py(PieError::config(format!(
                "{what}: {key} has the wrong type ({e})"
            )))
        }),
    }
}
