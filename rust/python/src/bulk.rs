//! Bulk reads (`RingReader.read_into`, `RingReader.read_array`): many records of one size
//! copied into one array per call, with their sequence numbers, timestamps and streams in
//! arrays beside it. A consumer of small messages then pays one Python call per batch, not
//! one `Record` object per message. Copy, then validate, as `read` does.

use std::ffi::c_int;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use rust_daq_core::{Next, Reader, RecordRef};

use crate::buffer::{type_name, SendPtr};
use crate::errors::IntoPy;
use crate::wait::{copy_maybe_detached, lock_detached, sleep_slice};

/// A caller's writable, C-contiguous buffer, borrowed for one call: `rows` rows (its first
/// dimension) of `len / rows` bytes each.
pub struct Dest {
    pub ptr: *mut u8,
    pub len: usize,
    pub rows: usize,
    view: Box<ffi::Py_buffer>,
}

impl Dest {
    /// Borrows `obj` for writing. `what` names the argument in error messages.
    pub fn new(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Dest> {
        let mut view: Box<ffi::Py_buffer> = Box::new(ffi::Py_buffer::new());
        let flags: c_int = ffi::PyBUF_WRITABLE | ffi::PyBUF_ND | ffi::PyBUF_C_CONTIGUOUS;
        // SAFETY: view is a valid, owned Py_buffer; on success it is released in Drop.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) };
        if rc != 0 {
            let cause = PyErr::fetch(obj.py());
            let err = PyBufferError::new_err(format!(
                "{what} must be a writable, C-contiguous buffer (a numpy array, a bytearray); \
                 got {}",
                type_name(obj)
            ));
            err.set_cause(obj.py(), Some(cause));
            return Err(err);
        }
        let len = view.len as usize;
        let rows = if view.ndim == 0 || view.shape.is_null() {
            1 // a scalar (a 0-d array): one row of all its bytes
        } else {
            // SAFETY: PyBUF_ND asked for the shape; it has ndim >= 1 entries.
            (unsafe { *view.shape }) as usize
        };
        Ok(Dest {
            ptr: view.buf as *mut u8,
            len,
            rows,
            view,
        })
    }

    /// Bytes per row (0 for an empty buffer).
    pub fn row_bytes(&self) -> usize {
        self.len.checked_div(self.rows).unwrap_or(0)
    }

    /// Checks that this is an array of at least `rows` items of `item` bytes (`seq=` etc.).
    pub fn check_items(&self, what: &str, rows: usize, item: usize) -> PyResult<()> {
        if self.view.itemsize as usize != item || self.len < rows * item {
            return Err(PyValueError::new_err(format!(
                "{what} must hold at least {rows} items of {item} bytes (one per row of the \
                 data buffer); got {} bytes in items of {}",
                self.len, self.view.itemsize
            )));
        }
        Ok(())
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        // SAFETY: filled by a successful PyObject_GetBuffer, released once, with the GIL
        // held (Dest is !Send through its raw pointer).
        unsafe { ffi::PyBuffer_Release(&mut *self.view) };
    }
}

/// What a bulk read asks for.
pub struct Want {
    pub max: usize,
    pub stream: Option<u32>,
    /// Every record's payload length (a caller's buffer rows), or any one length.
    pub size: Option<u64>,
    /// The payload length must be a multiple of this (a dtype's item size).
    pub item: u64,
    /// When the wait for a run ends.
    pub deadline: Instant,
}

/// Waits (GIL released, in slices) until a run of records `want` can take is committed, or
/// the timeout passes; returns the reader and the run (empty on timeout, or when the next
/// record is of another stream). Raises ValueError, consuming nothing, when the next record
/// has a length the caller cannot take: it is for `read()`.
fn wait_run<'a>(
    py: Python<'_>,
    reader: &'a Mutex<Reader>,
    scratch: &'a Mutex<Vec<RecordRef>>,
    want: &Want,
) -> PyResult<(MutexGuard<'a, Reader>, MutexGuard<'a, Vec<RecordRef>>)> {
    let mut rd = lock_detached(py, reader);
    let mut run = lock_detached(py, scratch);
    let deadline = want.deadline;
    loop {
        rd.peek_run(want.max, want.stream, &mut run).py_err(py)?;
        if let Some(first) = run.first() {
            let len = first.payload_len;
            if want.size.is_some_and(|s| s != len) || len % want.item != 0 {
                let wanted = match want.size {
                    Some(s) => format!("rows of {s} bytes"),
                    None => format!("a multiple of the dtype's {} bytes", want.item),
                };
                return Err(PyValueError::new_err(format!(
                    "record {} (stream {}) has {len} bytes, and this bulk read takes {wanted}: \
                     read it with read(); nothing was consumed",
                    first.seq, first.stream
                )));
            }
            return Ok((rd, run));
        }
        if want.max == 0 {
            return Ok((rd, run));
        }
        if let Next::Record(r) = rd.peek().py_err(py)? {
            if want.stream.is_some_and(|s| s != r.stream) {
                // The next record is of another stream: waiting would not change that.
                return Ok((rd, run));
            }
            continue; // committed since peek_run looked
        }
        let r: &Reader = &rd;
        if !sleep_slice(py, deadline, |slice| r.wait(slice))? {
            return Ok((rd, run));
        }
        rd.ring().check_intact().py_err(py)?;
    }
}

/// Where a run's records go: `run.len()` rows of `size` bytes at `data`, and one item per
/// row in each of the optional column arrays.
#[derive(Clone, Copy)]
pub struct Columns {
    pub data: SendPtr,
    pub size: usize,
    pub seq: Option<*mut u64>,
    pub timestamp_ns: Option<*mut i64>,
    pub stream: Option<*mut u32>,
}

/// Copies the run's payloads into `out`, validates them, and moves the intact ones (a
/// suffix: the producer reclaims in order) to the front. Returns how many are intact; those
/// are delivered (the reader is past them).
///
/// # Safety
/// `out.data` is valid for writes of `run.len() * out.size` bytes, and each column pointer
/// for `run.len()` items; none of them is ring memory.
unsafe fn copy_run(py: Python<'_>, rd: &mut Reader, run: &[RecordRef], out: &Columns) -> usize {
    let (data, size) = (out.data, out.size);
    let r: &Reader = rd;
    // SAFETY: row i lies inside the caller's buffer (run.len() rows of `size` bytes); each
    // record's payload is `size` bytes (wait_run saw to that); the ring stays mapped (`rd`).
    copy_maybe_detached(py, run.len() * size, move || {
        for (i, rec) in run.iter().enumerate() {
            unsafe { r.copy_payload(rec, data.get().add(i * size)) };
        }
    });
    let first = rd.confirm_run(run);
    let intact = &run[first..];
    // SAFETY: all pointers are valid for run.len() >= intact.len() rows/items (the caller's
    // promise); the data move may overlap, hence ptr::copy.
    unsafe {
        if first > 0 {
            std::ptr::copy(
                data.get().add(first * size),
                data.get(),
                intact.len() * size,
            );
        }
        for (i, rec) in intact.iter().enumerate() {
            // (a caller's array need not be aligned: numpy makes unaligned views)
            if let Some(p) = out.seq {
                p.add(i).write_unaligned(rec.seq);
            }
            if let Some(p) = out.timestamp_ns {
                p.add(i).write_unaligned(rec.timestamp_ns);
            }
            if let Some(p) = out.stream {
                p.add(i).write_unaligned(rec.stream);
            }
        }
    }
    intact.len()
}

/// A bulk read to its end: waits for a run, asks `dest(rows, record size)` where it goes,
/// copies and validates it, and waits on (to the deadline) when the producer reclaimed the
/// whole run while it was copied. Returns the rows delivered and the destination (None: no
/// run before the deadline, or the next record is another stream's). Both bulk reads use it.
///
/// # Safety
/// The `Columns` that `dest` returns must be valid for that many rows and items, and stay so
/// until this returns; none of it ring memory.
pub unsafe fn read_run<D>(
    py: Python<'_>,
    reader: &Mutex<Reader>,
    scratch: &Mutex<Vec<RecordRef>>,
    want: &Want,
    mut dest: impl FnMut(usize, usize) -> PyResult<(D, Columns)>,
) -> PyResult<Option<(usize, D)>> {
    loop {
        let (mut rd, run) = wait_run(py, reader, scratch, want)?;
        let Some(first) = run.first() else {
            return Ok(None);
        };
        let (d, cols) = dest(run.len(), first.payload_len as usize)?;
        // SAFETY: the caller's promise for what `dest` returned.
        let got = unsafe { copy_run(py, &mut rd, &run, &cols) };
        if got > 0 || Instant::now() >= want.deadline {
            return Ok(Some((got, d)));
        }
    }
}
