//! `RingReader` and `Record`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyList, PyMemoryView};
use rust_daq_core::{Next, Reader, RecordRef, Ring, Start, WaitStrategy};

use crate::buffer::{MapView, SendPtr};
use crate::bulk::{read_run, Columns, Dest, Want};
use crate::errors::IntoPy;
use crate::ring::RingBuffer;
use crate::wait::{copy_maybe_detached, duration, lock_detached, sleep_slice};

/// One record read from the ring.
#[pyclass(frozen, module = "rust_daq._native")]
pub struct Record {
    /// Sequence number: 0, 1, 2... per ring, across producer restarts.
    #[pyo3(get)]
    seq: u64,
    /// Wall-clock time in ns since the epoch (given by the writer, or taken at the write).
    #[pyo3(get)]
    timestamp_ns: i64,
    /// Stream id the record was written under.
    #[pyo3(get)]
    stream: u32,
    /// Absolute position of the record in the ring.
    #[pyo3(get)]
    position: u64,
    /// Schema id (Arrow streams) and flags from the record header.
    #[pyo3(get)]
    schema_id: u32,
    #[pyo3(get)]
    flags: u32,
    /// Sequence number within the stream (None for streams the ring does not number).
    #[pyo3(get)]
    stream_seq: Option<u64>,
    /// The payload: `bytes` (copy=True) or a read-only `memoryview` into the ring (copy=False).
    #[pyo3(get)]
    data: Py<PyAny>,
    /// Set for zero-copy records: the ring the view points into.
    view_of: Option<Arc<Ring>>,
}

#[pymethods]
impl Record {
    /// Whether `data` still holds this record. Always True for copies; for zero-copy views,
    /// False once the producer has reclaimed the space (then discard what was read from it).
    /// Call it after using the data: True covers every read made before the call.
    fn valid(&self) -> bool {
        self.view_of
            .as_ref()
            .is_none_or(|ring| ring.still_valid(self.position))
    }

    /// True if `data` is a zero-copy view into the ring.
    #[getter]
    fn zero_copy(&self) -> bool {
        self.view_of.is_some()
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.data.bind(py).len()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Record(seq={}, stream={}, timestamp_ns={}, {} bytes{})",
            self.seq,
            self.stream,
            self.timestamp_ns,
            self.data.bind(py).len()?,
            if self.view_of.is_some() {
                ", zero-copy"
            } else {
                ""
            }
        ))
    }
}

/// A cursor over a ring, with its own position and loss count. Any number may exist, in
/// any process.
#[pyclass(frozen, subclass, module = "rust_daq._native")]
pub struct RingReader {
    /// A Mutex because the frozen object may be shared between Python threads; `read`
    /// holds it for one call (and releases the GIL while it waits).
    inner: Mutex<Reader>,
    /// The records of a bulk read's run (kept between calls: no allocation per batch).
    scratch: Mutex<Vec<RecordRef>>,
    ring_obj: Py<RingBuffer>,
}

/// A new `bytearray` of `len` bytes, uninitialised (the caller fills it).
fn new_bytearray(py: Python<'_>, len: usize) -> PyResult<Bound<'_, PyByteArray>> {
    // SAFETY: a NULL source asks CPython for an uninitialised bytearray of `len` bytes.
    let obj = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyByteArray_FromStringAndSize(std::ptr::null(), len as ffi::Py_ssize_t),
        )?
    };
    Ok(obj.cast_into::<PyByteArray>()?)
}

fn shrink(b: &Bound<'_, PyByteArray>, len: usize) -> PyResult<()> {
    // SAFETY: b is a bytearray we own; shrinking keeps its first `len` bytes.
    if unsafe { ffi::PyByteArray_Resize(b.as_ptr(), len as ffi::Py_ssize_t) } != 0 {
        return Err(PyErr::fetch(b.py()));
    }
    Ok(())
}

fn make_record(
    py: Python<'_>,
    rec: &RecordRef,
    data: Py<PyAny>,
    view_of: Option<Arc<Ring>>,
) -> PyResult<Py<PyAny>> {
    let r = Record {
        seq: rec.seq,
        timestamp_ns: rec.timestamp_ns,
        stream: rec.stream,
        position: rec.pos,
        schema_id: rec.schema_id,
        flags: rec.flags,
        stream_seq: (rec.stream_seq != rust_daq_core::format::NO_SEQ).then_some(rec.stream_seq),
        data,
        view_of,
    };
    Ok(Py::new(py, r)?.into_any())
}

/// Copies the payload into a new `bytes`, validates, and returns it (None if torn).
fn copy_record(py: Python<'_>, rd: &mut Reader, rec: &RecordRef) -> PyResult<Option<Py<PyAny>>> {
    let len = rec.payload_len as ffi::Py_ssize_t;
    // SAFETY: a NULL source asks CPython for an uninitialised bytes object of `len` bytes,
    // which we fill completely before anybody else can see it.
    let obj = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyBytes_FromStringAndSize(std::ptr::null(), len))?
    };
    // SAFETY: obj is a bytes object we own; its buffer holds `len` bytes.
    let dst = SendPtr(unsafe { ffi::PyBytes_AsString(obj.as_ptr()) } as *mut u8);
    let r: &Reader = rd;
    // SAFETY: dst is valid for len bytes (the bytes object lives across the call and is not
    // shared yet); the ring mapping is kept alive by `rd`.
    copy_maybe_detached(py, len as usize, move || unsafe {
        r.copy_payload(rec, dst.get())
    });
    Ok(rd.confirm(rec).then(|| obj.into_any().unbind()))
}

/// What `_read_array` returns: data, seq, timestamp_ns, streams (bytearrays), record size.
type Arrays<'py> = (
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    usize,
);

#[pymethods]
impl RingReader {
    #[new]
    #[pyo3(signature = (ring, start="oldest", wait="adaptive"))]
    fn new(py: Python<'_>, ring: Py<RingBuffer>, start: &str, wait: &str) -> PyResult<Self> {
        let start = Start::parse(start).py_err(py)?;
        let wait = WaitStrategy::parse(wait).py_err(py)?;
        let shared = ring.get().ring()?.clone();
        let mut reader = Reader::new(shared, start).py_err(py)?;
        reader.set_wait(wait);
        Ok(RingReader {
            inner: Mutex::new(reader),
            scratch: Mutex::new(Vec::new()),
            ring_obj: ring,
        })
    }

    /// Reads what is available, up to `max_records`. With `timeout > 0`, waits up to that
    /// many seconds (GIL released) for at least one record. With `copy=False`, each
    /// record's `data` is a read-only view into the ring: check `record.valid()` after use.
    #[pyo3(signature = (max_records=None, timeout=0.0, copy=true))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        max_records: Option<usize>,
        timeout: f64,
        copy: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let timeout = duration(timeout, "timeout")?;
        let max = max_records.unwrap_or(usize::MAX);
        let out = PyList::empty(py);
        if max == 0 {
            return Ok(out);
        }
        let mut rd = lock_detached(py, &self.inner);
        let deadline = Instant::now() + timeout;
        let mut torn = 0u32;
        loop {
            while out.len() < max {
                let rec = match rd.peek().py_err(py)? {
                    Next::Record(r) => r,
                    Next::Busy { .. } | Next::Empty => break,
                };
                if copy {
                    if let Some(data) = copy_record(py, &mut rd, &rec)? {
                        out.append(make_record(py, &rec, data, None)?)?;
                    } else {
                        // Torn by a producer lapping us: the loop goes on from the new
                        // oldest record; let Ctrl-C through if that keeps happening.
                        torn = torn.wrapping_add(1);
                        if torn % 1024 == 0 {
                            py.check_signals()?;
                        }
                    }
                } else if rd.confirm(&rec) {
                    let ring = rd.ring().clone();
                    let view = Py::new(
                        py,
                        MapView::new(ring.clone(), rd.payload_ptr(&rec), rec.payload_len as usize),
                    )?;
                    let mv = PyMemoryView::from(view.bind(py).as_any())?;
                    out.append(make_record(py, &rec, mv.into_any().unbind(), Some(ring))?)?;
                }
            }
            if !out.is_empty() || out.len() >= max {
                return Ok(out);
            }
            let r: &Reader = &rd;
            if !sleep_slice(py, deadline, |slice| r.wait(slice))? {
                return Ok(out);
            }
            // A reader that waits touches only the header page: a file truncated under it
            // (by a third process, its producer dead) would otherwise keep it waiting forever.
            rd.ring().check_intact().py_err(py)?;
        }
    }

    /// Bulk read into a caller's buffer: up to `len(out)` records (its first dimension), one
    /// per row, each exactly a row's bytes long, with their sequence numbers, timestamps and
    /// streams in the optional 1-D arrays (uint64, int64, uint32). Returns how many rows were
    /// filled. Stops at the first record of another length, or of another stream than
    /// `stream`; a first record of another length raises ValueError and is not consumed.
    #[pyo3(signature = (out, /, *, seq=None, timestamp_ns=None, streams=None, stream=None, timeout=0.0))]
    #[allow(clippy::too_many_arguments)]
    fn read_into(
        &self,
        py: Python<'_>,
        out: &Bound<'_, PyAny>,
        seq: Option<&Bound<'_, PyAny>>,
        timestamp_ns: Option<&Bound<'_, PyAny>>,
        streams: Option<&Bound<'_, PyAny>>,
        stream: Option<u32>,
        timeout: f64,
    ) -> PyResult<usize> {
        let timeout = duration(timeout, "timeout")?;
        let dest = Dest::new(out, "out")?;
        let rows = dest.rows;
        let column = |obj: Option<&Bound<'_, PyAny>>, what: &str, item: usize| {
            obj.map(|o| {
                let d = Dest::new(o, what)?;
                d.check_items(what, rows, item)?;
                Ok::<Dest, PyErr>(d)
            })
            .transpose()
        };
        let (s, t, st) = (
            column(seq, "seq", 8)?,
            column(timestamp_ns, "timestamp_ns", 8)?,
            column(streams, "streams", 4)?,
        );
        let want = Want {
            max: rows,
            stream,
            size: Some(dest.row_bytes() as u64),
            item: 1,
            deadline: Instant::now() + timeout,
        };
        let cols = Columns {
            data: SendPtr(dest.ptr),
            size: dest.row_bytes(),
            seq: s.as_ref().map(|d| d.ptr.cast::<u64>()),
            timestamp_ns: t.as_ref().map(|d| d.ptr.cast::<i64>()),
            stream: st.as_ref().map(|d| d.ptr.cast::<u32>()),
        };
        // SAFETY: a run has at most `rows` records; every buffer holds `rows` rows or items
        // (checked above) and stays exported until the end of this call.
        let got =
            unsafe { read_run(py, &self.inner, &self.scratch, &want, |_, _| Ok(((), cols)))? };
        Ok(got.map_or(0, |(n, ())| n))
    }

    /// Bulk read into new arrays (the Python `read_array` wraps it): (data, seq,
    /// timestamp_ns, streams, record size), the first four as bytearrays.
    #[pyo3(signature = (max_records, stream, item, timeout))]
    fn _read_array<'py>(
        &self,
        py: Python<'py>,
        max_records: usize,
        stream: Option<u32>,
        item: u64,
        timeout: f64,
    ) -> PyResult<Arrays<'py>> {
        let want = Want {
            max: max_records,
            stream,
            size: None,
            item: item.max(1),
            deadline: Instant::now() + duration(timeout, "timeout")?,
        };
        let alloc = |n: usize, size: usize| {
            let arrays = (
                new_bytearray(py, n * size)?,
                new_bytearray(py, n * 8)?,
                new_bytearray(py, n * 8)?,
                new_bytearray(py, n * 4)?,
                size,
            );
            let cols = Columns {
                data: SendPtr(arrays.0.data()),
                size,
                seq: Some(arrays.1.data().cast::<u64>()),
                timestamp_ns: Some(arrays.2.data().cast::<i64>()),
                stream: Some(arrays.3.data().cast::<u32>()),
            };
            Ok((arrays, cols))
        };
        // SAFETY: the bytearrays are made for the run's rows by `alloc`, and nobody else
        // has them before this returns.
        let Some((got, arrays)) =
            (unsafe { read_run(py, &self.inner, &self.scratch, &want, alloc)? })
        else {
            let empty = || new_bytearray(py, 0);
            return Ok((empty()?, empty()?, empty()?, empty()?, 0));
        };
        let (data, s, t, st, size) = &arrays;
        if got * 8 < s.len() {
            shrink(data, got * size)?;
            shrink(s, got * 8)?;
            shrink(t, got * 8)?;
            shrink(st, got * 4)?;
        }
        Ok(arrays)
    }

    /// Stores this reader's position as the ring's `read_tail` (the primary consumer does
    /// this after it has persisted what it read; `policy="block"` producers wait on it).
    fn commit(&self, py: Python<'_>) -> PyResult<()> {
        lock_detached(py, &self.inner).commit().py_err(py)
    }

    /// How a read with a timeout waits for data: "adaptive" (spin 50 µs, then sleep),
    /// "busy" (spin) or "park" (sleep on the futex at once).
    #[getter]
    fn get_wait(&self, py: Python<'_>) -> &'static str {
        lock_detached(py, &self.inner).wait_strategy().name()
    }
    #[setter]
    fn set_wait(&self, py: Python<'_>, wait: &str) -> PyResult<()> {
        let w = WaitStrategy::parse(wait).py_err(py)?;
        lock_detached(py, &self.inner).set_wait(w);
        Ok(())
    }

    /// Records lost so far: overwritten before this reader got to them, or torn copies.
    #[getter]
    fn lost(&self, py: Python<'_>) -> u64 {
        lock_detached(py, &self.inner).lost()
    }

    /// Records delivered so far.
    #[getter]
    fn delivered(&self, py: Python<'_>) -> u64 {
        lock_detached(py, &self.inner).delivered()
    }

    /// Absolute position of the next record this reader looks at.
    #[getter]
    fn position(&self, py: Python<'_>) -> u64 {
        lock_detached(py, &self.inner).position()
    }

    /// Sequence number the next record should have.
    #[getter]
    fn next_seq(&self, py: Python<'_>) -> u64 {
        lock_detached(py, &self.inner).expected_seq()
    }

    /// Whether the record that started at absolute `position` is still intact.
    fn _position_valid(&self, py: Python<'_>, position: u64) -> bool {
        lock_detached(py, &self.inner).ring().still_valid(position)
    }

    /// The ring this reader reads.
    #[getter]
    fn ring(&self, py: Python<'_>) -> Py<RingBuffer> {
        self.ring_obj.clone_ref(py)
    }
}
