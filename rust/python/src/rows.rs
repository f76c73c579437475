//! `RowTable`: the core's rows-before table (`rust_daq_core::RowTable`), shared with other
//! processes through its file descriptor. Python's `RowIndex` (acquisition.py) writes it;
//! the daemon's Flight process reads it.

use pyo3::exceptions::{PyOSError, PyPermissionError, PyValueError};
use pyo3::prelude::*;
use std::io;

#[pyclass(module = "rust_daq._native", frozen)]
pub struct RowTable {
    inner: rust_daq_core::RowTable,
}

fn to_py(e: io::Error) -> PyErr {
    if e.kind() == io::ErrorKind::InvalidInput {
        PyValueError::new_err(e.to_string())
    } else if e.kind() == io::ErrorKind::PermissionDenied && e.raw_os_error().is_none() {
        PyPermissionError::new_err(e.to_string())
    } else {
        PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string()))
    }
}

#[pymethods]
impl RowTable {
    /// A new, empty table of `slots` entries (an anonymous shared file).
    #[new]
    fn new(slots: u64) -> PyResult<Self> {
        Ok(Self {
            inner: rust_daq_core::RowTable::create(slots).map_err(to_py)?,
        })
    }

    /// The table behind `fd`, a descriptor another process's table passed to this one.
    #[staticmethod]
    fn from_fd(fd: i32) -> PyResult<Self> {
        Ok(Self {
            inner: rust_daq_core::RowTable::from_fd(fd).map_err(to_py)?,
        })
    }

    /// Entries in the table.
    #[getter]
    fn slots(&self) -> u64 {
        self.inner.slots()
    }

    /// The descriptor to pass to another process (open while this table lives).
    #[getter]
    fn fd(&self) -> i32 {
        self.inner.fd()
    }

    /// Notes that record `seq`'s stream held `rows` rows before it (one writer at a time).
    /// Raises PermissionError on a table attached through a read-only descriptor.
    fn note(&self, seq: u64, rows: u64) -> PyResult<()> {
        self.inner.note(seq, rows).map_err(to_py)
    }

    /// Empties the entry of record `seq` (its rows unknown), if it still holds it. Raises
    /// PermissionError on a table attached through a read-only descriptor.
    fn clear(&self, seq: u64) -> PyResult<()> {
        self.inner.clear(seq).map_err(to_py)
    }

    /// Whether this table may be changed here (False: attached read-only).
    #[getter]
    fn writable(&self) -> bool {
        self.inner.writable()
    }

    /// The rows noted for record `seq`; None if its entry holds another record.
    fn rows_before(&self, seq: u64) -> Option<u64> {
        self.inner.rows_before(seq)
    }
}
