//! The `intruder_gate._intruder_gate` extension: the library's gate, reports, clamps and errors
//! for Python. The Python package (`py_src/intruder_gate`) re-exports it and adds the PEFT glue.

mod clamp;
mod errors;
mod gate;
mod report;
mod tensors;

use pyo3::prelude::*;

/// The library's default disk cache directory (`Gate`'s `cache_dir` when omitted).
#[pyfunction]
fn default_cache_dir() -> Option<std::path::PathBuf> {
    intruder_gate::config::default_cache_dir()
}

#[pymodule]
fn _intruder_gate(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<gate::PyGate>()?;
    m.add_class::<report::PyReport>()?;
    m.add_class::<report::PyModuleReport>()?;
    m.add_class::<clamp::PyClampedAdapter>()?;
    m.add_function(wrap_pyfunction!(default_cache_dir, m)?)?;
    errors::register(m)
}
