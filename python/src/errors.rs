//! One Python exception per library `ErrorKind` (the same kinds as the C statuses), all under
//! `IntruderGateError`. Their `args` are `(message,)`, so they pickle by class and message.

use intruder_gate::{Error, ErrorKind};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

create_exception!(
    intruder_gate,
    IntruderGateError,
    PyException,
    "Base of every error the library raises; `kind` is the library's error kind label."
);

macro_rules! kinds {
    ($($kind:ident => $name:ident),* $(,)?) => {
        $(create_exception!(intruder_gate, $name, IntruderGateError);)*

        fn type_of(py: Python<'_>, kind: ErrorKind) -> Bound<'_, pyo3::types::PyType> {
            match kind {
                $(ErrorKind::$kind => py.get_type::<$name>(),)*
            }
        }

        /// Adds the hierarchy to the module, each subclass with its `kind` label.
        pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            let py = m.py();
            let base = py.get_type::<IntruderGateError>();
            base.setattr("kind", py.None())?;
            m.add("IntruderGateError", base)?;
            $(
                let t = py.get_type::<$name>();
                t.setattr("kind", ErrorKind::$kind.label())?;
                m.add(stringify!($name), t)?;
            )*
            Ok(())
        }
    };
}

kinds! {
    InvalidArgument => InvalidArgumentError,
    Io => IoError,
    Format => FormatError,
    Shape => ShapeError,
    NonFinite => NonFiniteError,
    Unsupported => UnsupportedError,
    BaseMismatch => BaseMismatchError,
    Limit => LimitError,
    Cuda => CudaError,
    Internal => InternalError,
}

/// The library's error as the matching Python exception, with the library's message.
pub fn to_py(e: Error) -> PyErr {
    Python::attach(|py| PyErr::from_type(type_of(py, e.kind()), e.message().to_string()))
}

/// `Err(InvalidArgumentError(message))`.
pub fn invalid<T>(message: impl Into<String>) -> PyResult<T> {
    Err(to_py(Error::new(ErrorKind::InvalidArgument, message)))
}

/// Runs library code so that a panic comes back as an `Internal` error, never as a Python
/// `PanicException` (a BaseException that `except Exception` would not catch).
pub fn guarded<T>(f: impl FnOnce() -> intruder_gate::Result<T>) -> intruder_gate::Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::new(
            ErrorKind::Internal,
            format!("internal error (panic in intruder-gate): {what}"),
        ))
    })
}

/// [`guarded`] with the GIL released: every call into the library's heavy paths goes through it.
pub fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> intruder_gate::Result<T> + Send,
) -> PyResult<T> {
    py.detach(|| guarded(f)).map_err(to_py)
}
