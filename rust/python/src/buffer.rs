//! Buffers in both directions: borrowing a Python object's bytes for a write (bytes fast
//! path, else the buffer protocol, C-contiguous only), and exporting ring memory as a
//! read-only buffer that keeps the mapping alive (`MapView`).

use std::ffi::c_int;
use std::sync::Arc;

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rust_daq_core::Ring;

/// A raw pointer that may cross into `py.detach` (the bytes it points to stay alive and
/// exported for the duration, see the users).
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut u8);
// SAFETY: only used to move an address into a closure that runs while the caller keeps
// the pointed-to memory alive (a held buffer export or a ring mapping).
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// The address. A method, so closures capture the whole (Send) wrapper, not the field.
    pub fn get(self) -> *mut u8 {
        self.0
    }
}

/// The bytes of a Python object, borrowed for the duration of a write.
pub struct Source {
    pub ptr: *const u8,
    pub len: usize,
    view: Option<Box<ffi::Py_buffer>>,
}

impl Source {
    /// Borrows `obj`'s bytes. `what` names the calling method in error messages.
    pub fn new(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Source> {
        if let Ok(b) = obj.cast::<PyBytes>() {
            let s = b.as_bytes();
            return Ok(Source {
                ptr: s.as_ptr(),
                len: s.len(),
                view: None,
            });
        }
        // SAFETY: obj is a live object; PyObject_CheckBuffer only inspects its type.
        if unsafe { ffi::PyObject_CheckBuffer(obj.as_ptr()) } == 0 {
            return Err(PyTypeError::new_err(format!(
                "{what} needs a bytes-like object (bytes, bytearray, memoryview, numpy array); got {}",
                type_name(obj)
            )));
        }
        let mut view: Box<ffi::Py_buffer> = Box::new(ffi::Py_buffer::new());
        // SAFETY: view is a valid, owned Py_buffer; on success we release it in Drop.
        let rc =
            unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, ffi::PyBUF_C_CONTIGUOUS) };
        if rc != 0 {
            let cause = PyErr::fetch(obj.py());
            let err = PyBufferError::new_err(format!(
                "{what} needs a C-contiguous buffer; got a non-contiguous {} \
                 (copy it first, e.g. numpy.ascontiguousarray(a))",
                type_name(obj)
            ));
            err.set_cause(obj.py(), Some(cause));
            return Err(err);
        }
        Ok(Source {
            ptr: view.buf as *const u8,
            len: view.len as usize,
            view: Some(view),
        })
    }
}

impl Source {
    /// Bytes the caller keeps alive and unchanged for as long as this Source lives.
    pub fn raw(ptr: *const u8, len: usize) -> Source {
        Source {
            ptr,
            len,
            view: None,
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(view) = self.view.as_mut() {
            // SAFETY: the view was filled by a successful PyObject_GetBuffer and is
            // released exactly once; Source is only created and dropped with the GIL held
            // (it is !Send through its raw pointer).
            unsafe { ffi::PyBuffer_Release(&mut **view) };
        }
    }
}

/// A C-contiguous buffer of two or more dimensions, borrowed for a write: `rows` rows (its
/// first dimension) of `row` bytes each, one record per row (`write_many(array)`).
pub struct Rows {
    pub ptr: *const u8,
    pub rows: usize,
    pub row: usize,
    view: Box<ffi::Py_buffer>,
}

impl Rows {
    /// `Some` if `obj` exports a C-contiguous buffer of ndim >= 2 (else None, no error:
    /// the caller iterates `obj` instead).
    pub fn of(obj: &Bound<'_, PyAny>) -> Option<Rows> {
        // SAFETY: obj is a live object; PyObject_CheckBuffer only inspects its type.
        if obj.is_instance_of::<PyBytes>()
            || unsafe { ffi::PyObject_CheckBuffer(obj.as_ptr()) } == 0
        {
            return None;
        }
        let mut view: Box<ffi::Py_buffer> = Box::new(ffi::Py_buffer::new());
        let flags = ffi::PyBUF_ND | ffi::PyBUF_C_CONTIGUOUS;
        // SAFETY: view is a valid, owned Py_buffer; on success it is released in Drop.
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) } != 0 {
            let _ = PyErr::take(obj.py()); // not a contiguous array: iterate it instead
            return None;
        }
        let mut rows = Rows {
            ptr: view.buf as *const u8,
            rows: 0,
            row: 0,
            view,
        };
        if rows.view.ndim < 2 || rows.view.shape.is_null() {
            return None; // dropped: the export is released
        }
        // SAFETY: PyBUF_ND gave a shape of ndim >= 2 entries.
        rows.rows = unsafe { *rows.view.shape } as usize;
        rows.row = (rows.view.len as usize).checked_div(rows.rows).unwrap_or(0);
        Some(rows)
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        // SAFETY: filled by a successful PyObject_GetBuffer, released once, GIL held.
        unsafe { ffi::PyBuffer_Release(&mut *self.view) };
    }
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .fully_qualified_name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

/// Read-only view of ring memory that keeps the ring's mapping alive. Exposed through the
/// buffer protocol: `memoryview(v)`, `numpy.frombuffer(v, ...)`.
#[pyclass(frozen, module = "rust_daq._native")]
pub struct MapView {
    // Keeps the mapping (and so `ptr`) alive as long as any buffer export of this object.
    ring: Arc<Ring>,
    ptr: usize,
    len: usize,
}

impl MapView {
    pub fn new(ring: Arc<Ring>, ptr: *const u8, len: usize) -> MapView {
        MapView {
            ring,
            ptr: ptr as usize,
            len,
        }
    }
}

#[pymethods]
impl MapView {
    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let me = slf.get();
        // SAFETY: ptr/len describe memory inside `me.ring`'s mapping, alive while `slf`
        // is; PyBuffer_FillInfo takes a new reference to `slf` (view.obj), so the export
        // keeps it alive. readonly=1: a writable request fails with BufferError.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                me.ptr as *mut std::ffi::c_void,
                me.len as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// Address of the first byte in this process.
    #[getter]
    fn address(&self) -> usize {
        self.ptr
    }

    fn __repr__(&self) -> String {
        format!(
            "<MapView {} bytes at 0x{:x} of {}>",
            self.len,
            self.ptr,
            self.ring.path().display()
        )
    }
}
