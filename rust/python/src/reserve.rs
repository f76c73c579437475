//! `Reservation`: ring space claimed for one record, filled in place, then committed (or
//! aborted). Misuse (a write past its end, anything after it was finished) raises
//! `RingUsageError`.

use std::ffi::c_int;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use rust_daq_core::{Claim, Error, Producer, Ring};

use crate::buffer::Source;
use crate::errors::{to_py, usage_error, IntoPy};
use crate::wait::lock_detached;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Committed(u64),
    Aborted,
}

impl State {
    /// How a reservation that is no longer open was finished, for error messages.
    fn finished(self) -> String {
        match self {
            State::Open => "open".to_string(),
            State::Committed(seq) => format!("committed (seq {seq})"),
            State::Aborted => "aborted".to_string(),
        }
    }
}

struct Inner {
    state: State,
    /// Next byte `write` fills.
    cursor: u64,
    /// Live buffer-protocol exports: commit/abort wait for them to be released, so no
    /// view can write into a record after it was published.
    exports: usize,
}

/// Ring space reserved for one record of `nbytes` bytes. Fill it with `write()` (sequential)
/// or through the buffer protocol (`memoryview(res)`, `numpy.frombuffer(res, ...)`), then
/// `commit()`; `abort()`, an exception in a `with` block, or garbage collection without a
/// commit turn it into padding that readers skip.
#[pyclass(frozen, module = "rust_daq._native")]
pub struct Reservation {
    /// Keeps the mapping alive while the reservation exists.
    ring: Arc<Ring>,
    /// The producer slot of the handle that claimed it (None once that handle is closed,
    /// which aborted the claim): commit and abort go through it.
    producer: Arc<Mutex<Option<Producer>>>,
    claim: Claim,
    /// A Mutex because the frozen object may be shared between Python threads.
    inner: Mutex<Inner>,
}

impl Reservation {
    pub fn new(
        ring: Arc<Ring>,
        producer: Arc<Mutex<Option<Producer>>>,
        claim: Claim,
    ) -> Reservation {
        Reservation {
            ring,
            producer,
            claim,
            inner: Mutex::new(Inner {
                state: State::Open,
                cursor: 0,
                exports: 0,
            }),
        }
    }

    fn payload_ptr(&self) -> *mut u8 {
        self.ring.claim_payload_ptr(&self.claim)
    }

    /// Copies `src` at the cursor. Used by `write` and by the sink.
    pub fn write_bytes(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        let src = Source::new(data, "Reservation.write()")?;
        let mut inner = lock_detached(py, &self.inner);
        if inner.state != State::Open {
            return Err(usage_error(
                py,
                format!(
                    "write() to a reservation that was already {}",
                    inner.state.finished()
                ),
            ));
        }
        let room = self.claim.payload_len - inner.cursor;
        if src.len as u64 > room {
            return Err(usage_error(
                py,
                format!(
                    "write() of {} bytes overflows the reservation: {room} of {} bytes left",
                    src.len, self.claim.payload_len
                ),
            ));
        }
        // SAFETY: [cursor, cursor + len) lies inside the claim's payload (checked above),
        // which only this reservation writes until it is finished (the state is Open, under
        // the lock); `src` holds the source alive.
        unsafe {
            self.ring
                .fill_claim_at(&self.claim, inner.cursor, src.ptr, src.len)
        };
        inner.cursor += src.len as u64;
        Ok(src.len)
    }

    fn finish(&self, py: Python<'_>, commit: bool) -> PyResult<Option<u64>> {
        let mut inner = lock_detached(py, &self.inner);
        if inner.state != State::Open {
            return Err(usage_error(
                py,
                format!(
                    "{}() of a reservation that was already {}",
                    if commit { "commit" } else { "abort" },
                    inner.state.finished()
                ),
            ));
        }
        if inner.exports != 0 {
            return Err(PyBufferError::new_err(format!(
                "{} buffer view(s) of this reservation are still alive: release them (del the \
                 memoryview/array) before {}",
                inner.exports,
                if commit { "commit()" } else { "abort()" }
            )));
        }
        let mut guard = lock_detached(py, &self.producer);
        let Some(p) = guard.as_mut() else {
            inner.state = State::Aborted; // the handle was closed: closing aborted the claim
            return Err(to_py(py, Error::Closed));
        };
        if commit {
            let seq = p.commit(self.claim).py_err(py)?;
            p.notify();
            inner.state = State::Committed(seq);
            Ok(Some(seq))
        } else {
            p.abort(self.claim).py_err(py)?;
            inner.state = State::Aborted;
            Ok(None)
        }
    }
}

#[pymethods]
impl Reservation {
    /// Copies `data` (any C-contiguous buffer) at the write cursor; returns the byte count.
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.write_bytes(py, data)
    }

    /// Publishes the record; returns its sequence number. Raises BufferError while buffer
    /// views of the reservation are alive, RingUsageError if it was already committed or
    /// aborted.
    fn commit(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self
            .finish(py, true)?
            .expect("commit returns a sequence number"))
    }

    /// Abandons the record: readers skip it, its sequence number is reused.
    fn abort(&self, py: Python<'_>) -> PyResult<()> {
        self.finish(py, false).map(|_| ())
    }

    /// Payload bytes reserved.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.claim.payload_len
    }

    /// Bytes filled so far by `write()`.
    #[getter]
    fn written(&self, py: Python<'_>) -> u64 {
        lock_detached(py, &self.inner).cursor
    }

    /// The sequence number the record gets when committed.
    #[getter]
    fn seq(&self) -> u64 {
        self.claim.seq
    }

    /// Address of the payload in this process (64-byte aligned).
    #[getter]
    fn address(&self) -> usize {
        self.payload_ptr() as usize
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Commits on a clean exit, aborts if the block raised.
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let open = lock_detached(py, &self.inner).state == State::Open;
        if open {
            self.finish(py, exc_type.is_none())?;
        }
        Ok(false)
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let me = slf.get();
        let mut inner = lock_detached(slf.py(), &me.inner);
        if inner.state != State::Open {
            return Err(PyBufferError::new_err(
                "the reservation was committed or aborted: its buffer is gone",
            ));
        }
        // SAFETY: the payload (nbytes at payload_ptr) is ours to write until commit/abort,
        // which refuse while exports exist; the mapping lives as long as `slf` (view.obj).
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                me.payload_ptr().cast(),
                me.claim.payload_len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        inner.exports += 1;
        Ok(())
    }

    /// # Safety
    /// Called by CPython once per successful `__getbuffer__`.
    unsafe fn __releasebuffer__(slf: Bound<'_, Self>, _view: *mut ffi::Py_buffer) {
        let me = slf.get();
        let mut inner = lock_detached(slf.py(), &me.inner);
        inner.exports = inner.exports.saturating_sub(1);
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let inner = lock_detached(py, &self.inner);
        format!(
            "<Reservation seq={} {} of {} bytes written, {:?}>",
            self.claim.seq, inner.cursor, self.claim.payload_len, inner.state
        )
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let open = self
            .inner
            .get_mut()
            .map(|i| i.state == State::Open)
            .unwrap_or(false);
        if open {
            // Never committed: give the space back as padding so the producer can go on.
            Python::attach(|py| {
                let _ = self.finish(py, false);
            });
        }
    }
}
