//! Core errors to Python exceptions. The classes live in `rust_daq/_errors.py` (one place,
//! one docstring each, built-in bases where the meaning matches); this module looks them up.
//! The core's messages are language-neutral; the advice in terms of the Python API (which
//! argument, method or class to use) is added here, in `python_hint`.

use pyo3::exceptions::{PyFileExistsError, PyFileNotFoundError, PyOSError, PyPermissionError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use rust_daq_core::Error;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    let module = ERRORS.get_or_try_init(py, || {
        PyModule::import(py, "rust_daq._errors").map(Bound::unbind)
    })?;
    Ok(module.bind(py).getattr(name)?.cast_into::<PyType>()?)
}

fn raise(py: Python<'_>, name: &str, msg: String) -> PyErr {
    match class(py, name) {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(e) => e,
    }
}

/// What to do about `e` in terms of the Python API, appended to the core's message.
fn python_hint(e: &Error) -> Option<&'static str> {
    Some(match e {
        Error::Mismatch { .. } => " (pass replace=True to discard it and create a new one)",
        Error::SchemaFull { .. } => " (RingBuffer.create(..., replace=True))",
        Error::StreamIdTaken { .. } => " (ring.streams() lists them), or write_arrow_batch()",
        Error::ReadOnly { .. } => {
            " (use RingBuffer.create(...) or RingBuffer.open(path, writable=True))"
        }
        Error::ProducerActive {
            this_process: false,
            ..
        } => " (open with writable=False to read)",
        Error::Forked => " (or start multiprocessing workers with the 'spawn' method)",
        _ => return None,
    })
}

/// `RingUsageError` with `msg`: a call the binding refuses in the object's current state.
pub fn usage_error(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    raise(py, "RingUsageError", msg.into())
}

pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let mut msg = e.to_string();
    if let Some(hint) = python_hint(&e) {
        msg.push_str(hint);
    }
    match e {
        Error::Io { source, path, .. } => {
            let errno = source.raw_os_error().unwrap_or(0);
            let args = (errno, msg, path.to_string_lossy().into_owned());
            match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(args),
                _ => PyOSError::new_err(args),
            }
        }
        Error::Format { .. } => raise(py, "RingFormatError", msg),
        Error::Corrupt { .. } => raise(py, "RingCorruptError", msg),
        Error::Config { .. } | Error::Mismatch { .. } | Error::SchemaFull { .. } => {
            raise(py, "RingConfigError", msg)
        }
        Error::TooLarge { .. } => raise(py, "RecordTooLargeError", msg),
        Error::ReadOnly { .. } => raise(py, "ReadOnlyRingError", msg),
        Error::ProducerActive { .. } => raise(py, "ProducerActiveError", msg),
        Error::Full { .. } => raise(py, "RingFullError", msg),
        Error::Closed => raise(py, "RingClosedError", msg),
        Error::Forked => raise(py, "ProducerActiveError", msg),
        Error::Invalid { .. } | Error::StreamIdTaken { .. } => raise(py, "RingUsageError", msg),
        // A PermissionError that is a rust-daq error. `RingPermissionError` (a subclass of
        // ReadOnlyRingError) where _errors.py defines it, else ReadOnlyRingError itself.
        Error::Untrusted { .. } => match class(py, "RingPermissionError") {
            Ok(cls) => PyErr::from_type(cls, msg),
            Err(_) => raise(py, "ReadOnlyRingError", msg),
        },
    }
}

/// `?`-friendly conversion for core results.
pub trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    #[inline]
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
