//! Python bindings for smg-core. Errors are converted in one place; CPU work releases the GIL.
use pyo3::prelude::*;

/// Wire-format version implemented by the bundled smg-core.
#[pyfunction]
fn wire_format_version() -> u32 {
    smg_core::WIRE_FORMAT_VERSION
}

#[pymodule]
fn _smg(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(wire_format_version, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
