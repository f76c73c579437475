//! `RingBuffer`: a handle on a ring file, the producer's when writable.
//!
//! (Over 500 lines: it is the Python class's whole surface, one `#[pymethods]` block, as
//! PyO3 wants it without its `multiple-pymethods` feature; what is not surface is in
//! `buffer.rs`, `wait.rs` and `reserve.rs`.)

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use rust_daq_core::{
    Claim, ClaimResult, Error, Guard, Policy, Producer, Ring, WaitStrategy, HOT_WRAP_DEFAULT,
};

use crate::buffer::{MapView, Rows, SendPtr, Source};
use crate::errors::{to_py, IntoPy};
use crate::reserve::Reservation;
use crate::wait::{copy_maybe_detached, duration, lock_detached, sleep_slice};

/// (schema_id, stream_id, name, Arrow IPC schema bytes, activation), as `_schemas` returns.
type SchemaRow<'py> = (u32, u32, String, Bound<'py, PyBytes>, u64);

/// A ring buffer file: the producer's handle (from `create`, or `open(writable=True)`) or a
/// read-only one. The Python subclass `rust_daq.RingBuffer` is the public face.
#[pyclass(frozen, subclass, module = "rust_daq._native")]
pub struct RingBuffer {
    ring: Arc<Ring>,
    /// The producer (None for read-only handles, and after close). A Mutex because a
    /// frozen pyclass is shared between Python threads; writes take it for one record.
    /// Shared with the reservations made from this handle, which commit through it.
    producer: Arc<Mutex<Option<Producer>>>,
    writable: bool,
    closed: AtomicBool,
    /// Default wait of a blocked write, in seconds, as f64 bits (settable from Python).
    block_timeout: AtomicU64,
    /// How a blocked write waits for room (a `WaitStrategy`, as `wait_code`).
    wait: AtomicU8,
    /// Policy "block": `Producer::set_hot_wrap` (settable from Python as `hot_bytes`).
    hot_wrap: AtomicU64,
}

fn wait_code(w: WaitStrategy) -> u8 {
    match w {
        WaitStrategy::Adaptive => 0,
        WaitStrategy::Busy => 1,
        WaitStrategy::Park => 2,
    }
}

fn wait_of(code: u8) -> WaitStrategy {
    match code {
        1 => WaitStrategy::Busy,
        2 => WaitStrategy::Park,
        _ => WaitStrategy::Adaptive,
    }
}

impl RingBuffer {
    /// The ring, unless closed or truncated under its mapping (RingCorruptError).
    pub fn ring(&self) -> PyResult<&Arc<Ring>> {
        if self.closed.load(Ordering::Acquire) {
            return Python::attach(|py| Err(to_py(py, Error::Closed)));
        }
        if let Err(e) = self.ring.check_tripped() {
            return Python::attach(|py| Err(to_py(py, e)));
        }
        Ok(&self.ring)
    }

    fn producer<'a>(
        &'a self,
        py: Python<'_>,
        what: &'static str,
    ) -> PyResult<MutexGuard<'a, Option<Producer>>> {
        if !self.writable {
            return Err(to_py(py, Error::ReadOnly { what }));
        }
        let guard = lock_detached(py, &self.producer);
        if guard.is_none() {
            return Err(to_py(py, Error::Closed));
        }
        Ok(guard)
    }

    /// How long a write may wait for room: the caller's `timeout`, else `block_timeout`;
    /// zero under policy "overwrite", which never waits. Gives the producer this handle's
    /// wait strategy.
    fn wait_limit(&self, p: &mut Producer, timeout: Option<f64>) -> PyResult<Duration> {
        if p.ring().policy() != Policy::Block {
            return Ok(Duration::ZERO);
        }
        p.set_wait(wait_of(self.wait.load(Ordering::Relaxed)));
        p.set_hot_wrap(self.hot_wrap.load(Ordering::Relaxed));
        match timeout {
            Some(t) => duration(t, "timeout"),
            None => Ok(Duration::from_secs_f64(f64::from_bits(
                self.block_timeout.load(Ordering::Relaxed),
            ))),
        }
    }
}

/// Rows `write_many` hands `Producer::write_rows` at a time (the GIL is held meanwhile:
/// about 50 µs of 64-byte records).
const WRITE_ROWS_RUN: usize = 1024;

/// Claims room for `len` payload bytes; under policy "block" waits (GIL released, Ctrl-C
/// honoured) up to `timeout`.
#[allow(clippy::too_many_arguments)]
fn claim_with_wait(
    py: Python<'_>,
    p: &mut Producer,
    len: u64,
    stream: u32,
    schema_id: u32,
    ts: Option<i64>,
    timeout: Duration,
    prefill: Option<&Source>,
) -> PyResult<Claim> {
    let mut deadline: Option<Instant> = None;
    let mut prefilled = false;
    loop {
        let claimed = if prefilled {
            p.try_claim_prefilled(len, stream, schema_id, ts)
        } else {
            p.try_claim_tagged(len, stream, schema_id, ts)
        };
        let claimed = claimed.py_err(py)?;
        if let ClaimResult::WouldBlock { .. } = claimed {
            // Wake the readers of what this call committed so far (write_many notifies once
            // at its end): asleep, they would free no room until their own timeout.
            p.notify();
        }
        match claimed {
            ClaimResult::Claimed(c) => return Ok(c),
            ClaimResult::WouldBlock {
                needed_tail,
                hot_wait: Some(d),
            } => {
                // A hot wait (not full): Producer::hot_wait, without the GIL (at most 2 ms).
                let end = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                let left = end.saturating_duration_since(Instant::now());
                let src = prefill.map(|s| (SendPtr(s.ptr as *mut u8), s.len));
                let pr = &mut *p;
                prefilled = py
                    .detach(move || {
                        let src = src.map(|(ptr, len)| (ptr.get() as *const u8, len));
                        // SAFETY: the caller's Source holds the buffer export for this call.
                        unsafe { pr.hot_wait(needed_tail, d, left, src) }
                    })
                    .py_err(py)?;
            }
            ClaimResult::WouldBlock { needed_tail, .. } => {
                let end = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                let pr = &*p;
                if !sleep_slice(py, end, |slice| {
                    pr.wait_for_room(needed_tail, slice);
                })? {
                    return Err(to_py(py, p.full_error(needed_tail, timeout)));
                }
            }
        }
    }
}

/// Writes one record (claim, copy, commit). Returns the sequence number.
fn write_one(
    py: Python<'_>,
    p: &mut Producer,
    src: &Source,
    stream: u32,
    ts: Option<i64>,
    timeout: Duration,
) -> PyResult<u64> {
    let c = claim_with_wait(py, p, src.len as u64, stream, 0, ts, timeout, Some(src))?;
    if c.prefilled {
        return p.commit(c).py_err(py);
    }
    let (s, n) = (SendPtr(src.ptr as *mut u8), src.len);
    let pr = &*p;
    // SAFETY: `src` holds the buffer export (or the bytes object) until after this call;
    // the claim's payload space is ours until commit.
    copy_maybe_detached(py, n, move || unsafe { pr.fill(&c, s.get(), n) });
    p.commit(c).py_err(py)
}

#[pymethods]
impl RingBuffer {
    // Mirrors the keyword arguments of the Python classmethods that call it.
    #[allow(clippy::too_many_arguments)]
    #[new]
    #[pyo3(signature = (path, *, create=false, capacity_bytes=0, policy="overwrite", writable=false, replace=false, block_timeout=10.0, wait="adaptive", schema_bytes=None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        create: bool,
        capacity_bytes: u64,
        policy: &str,
        writable: bool,
        replace: bool,
        block_timeout: f64,
        wait: &str,
        schema_bytes: Option<u64>,
    ) -> PyResult<Self> {
        let policy = Policy::parse(policy).py_err(py)?;
        let wait = WaitStrategy::parse(wait).py_err(py)?;
        duration(block_timeout, "block_timeout")?;
        let opened = py.detach(|| {
            if create {
                Ring::create_with(&path, capacity_bytes, policy, replace, schema_bytes)
                    .map(|(r, p)| (r, Some(p)))
            } else {
                Ring::open(&path, writable)
            }
        });
        let (ring, producer) = opened.py_err(py)?;
        Ok(RingBuffer {
            ring,
            writable: producer.is_some(),
            producer: Arc::new(Mutex::new(producer)),
            closed: AtomicBool::new(false),
            block_timeout: AtomicU64::new(block_timeout.to_bits()),
            wait: AtomicU8::new(wait_code(wait)),
            hot_wrap: AtomicU64::new(HOT_WRAP_DEFAULT),
        })
    }

    /// Writes one record; returns its sequence number.
    #[pyo3(signature = (data, /, *, stream=0, timestamp_ns=None, timeout=None))]
    fn write(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        stream: u32,
        timestamp_ns: Option<i64>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        let src = Source::new(data, "write()")?;
        let mut guard = self.producer(py, "write()")?;
        let p = guard.as_mut().expect("checked by producer()");
        let timeout = self.wait_limit(p, timeout)?;
        let seq = write_one(py, p, &src, stream, timestamp_ns, timeout)?;
        p.notify();
        Ok(seq)
    }

    /// Writes every item of `items` as one record each, in one call; a C-contiguous array
    /// of two or more dimensions is written one record per row (its first dimension),
    /// without a Python object per row. Returns the sequence number of the last record (-1
    /// if `items` was empty).
    #[pyo3(signature = (items, /, *, stream=0, timeout=None))]
    fn write_many(
        &self,
        py: Python<'_>,
        items: &Bound<'_, PyAny>,
        stream: u32,
        timeout: Option<f64>,
    ) -> PyResult<i64> {
        let mut guard = self.producer(py, "write_many()")?;
        let p = guard.as_mut().expect("checked by producer()");
        let timeout = self.wait_limit(p, timeout)?;
        let mut last = -1i64;
        let result = (|| {
            if let Some(rows) = Rows::of(items) {
                // One record per row, straight from the array: no Python object per row;
                // runs of rows through Producer::write_rows (one clock read and one publish
                // a run), a row the ring has no room for through write_one's wait.
                let mut i = 0;
                while i < rows.rows {
                    // SAFETY: rows i.. lie inside the exported buffer (rows * row bytes).
                    let at = unsafe { rows.ptr.add(i * rows.row) };
                    let run = (rows.rows - i).min(WRITE_ROWS_RUN);
                    // SAFETY: `run` rows from `at` lie inside the exported buffer.
                    let n = unsafe { p.write_rows(at, run, rows.row, stream) }.py_err(py)?;
                    if n != 0 {
                        i += n;
                        last = p.next_seq() as i64 - 1;
                        continue;
                    }
                    let src = Source::raw(at, rows.row);
                    last = write_one(py, p, &src, stream, None, timeout)? as i64;
                    i += 1;
                }
                return Ok(last);
            }
            for item in items.try_iter()? {
                let item = item?;
                let src = Source::new(&item, "write_many()")?;
                last = write_one(py, p, &src, stream, None, timeout)? as i64;
            }
            Ok(last)
        })();
        // Whatever was committed before an error stays committed: wake its readers.
        p.notify();
        result
    }

    /// Closes the handle: releases the producer lock (a pending reservation is aborted).
    /// Readers and zero-copy views made from it keep the mapping alive and keep working.
    fn close(&self, py: Python<'_>) {
        self.closed.store(true, Ordering::Release);
        let taken = lock_detached(py, &self.producer).take();
        drop(taken);
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    /// A copy of the committed bytes the primary consumer has not consumed yet (framed
    /// records: headers, payloads and padding, as docs/ring-format.md describes).
    fn read_snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let ring = self.ring()?.clone();
        let (_, bytes) = py.detach(move || ring.read_snapshot()).py_err(py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Marks `nbytes` more of the snapshot consumed (whole records); returns the new `read_tail`.
    fn advance_tail(&self, py: Python<'_>, nbytes: u64) -> PyResult<u64> {
        self.ring()?.advance_tail(nbytes).py_err(py)
    }

    /// Address of the data region in this process's memory.
    fn data_address(&self) -> PyResult<usize> {
        Ok(self.ring()?.region().data_ptr() as usize)
    }

    /// A read-only buffer over the whole data region that keeps the mapping alive.
    fn _data_buffer(&self) -> PyResult<MapView> {
        let ring = self.ring()?.clone();
        let (ptr, len) = (
            ring.region().data_ptr() as *const u8,
            ring.capacity() as usize,
        );
        Ok(MapView::new(ring, ptr, len))
    }

    /// (file descriptor, data region offset in the file) of the producer's open ring file,
    /// for writers that map the same file to fill reservations in place (pyarrow's IPC
    /// writer maps /proc/self/fd/N). Writing anywhere but inside an open reservation
    /// corrupts the ring.
    fn _data_file(&self, py: Python<'_>) -> PyResult<(i32, u64)> {
        drop(self.producer(py, "mapping the data region for writing")?);
        let region = self.ring.region();
        Ok((region.raw_fd(), region.geometry().data_offset))
    }

    /// Registers another mapping of this ring's file (pyarrow's, which fills reservations in
    /// place) with the SIGBUS guard, so that a file truncated under it gives RingCorruptError
    /// instead of killing the process, and maps all of its pages writable now (as the ring's
    /// own mapping is, MAP_POPULATE): pyarrow maps without it, and its first lap took a page
    /// fault per 4 KiB, 95 µs for a 256 KiB record instead of 15. Keep the returned object for
    /// as long as that mapping is mapped, and drop it before unmapping.
    fn _guard_mapping(
        &self,
        py: Python<'_>,
        address: usize,
        length: usize,
    ) -> PyResult<MappingGuard> {
        drop(self.producer(py, "guarding a mapping of the ring file")?);
        let guard = Guard::register(address as *const u8, length, true).py_err(py)?;
        #[cfg(target_os = "linux")]
        py.detach(|| {
            // SAFETY: MADV_POPULATE_WRITE only faults pages in (their contents are unchanged);
            // on a range that is not a writable mapping it fails with an error, which is
            // ignored: the pages then fault on first touch, as without it (kernels < 5.14).
            unsafe {
                libc::madvise(
                    address as *mut libc::c_void,
                    length,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        });
        Ok(MappingGuard { _guard: guard })
    }

    /// Positions, counters and producer state, read now.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ring = self.ring()?;
        ring.check_intact().py_err(py)?;
        let s = ring.status();
        let d = PyDict::new(py);
        d.set_item("path", ring.path().to_string_lossy())?;
        d.set_item("capacity", ring.capacity())?;
        d.set_item("policy", ring.policy().name())?;
        d.set_item("session_id", ring.session_id())?;
        d.set_item("write_position", s.write_pos)?;
        d.set_item("write_head", s.commit_pos)?;
        d.set_item("oldest_position", s.oldest_pos)?;
        d.set_item("read_tail", s.read_tail)?;
        d.set_item("read_tail_seq", s.read_tail_seq)?;
        d.set_item("records_written", s.next_seq)?;
        d.set_item("records_lost", s.records_lost)?;
        d.set_item("producer_pid", s.producer_pid)?;
        d.set_item("producer_alive", s.producer_alive)?;
        d.set_item("heartbeat_ns", s.heartbeat_ns)?;
        Ok(d)
    }

    /// The primary consumer's durable position (absolute bytes).
    #[getter]
    fn read_tail(&self) -> PyResult<u64> {
        Ok(self.ring()?.tail_snapshot().0)
    }
    /// Sequence number of the first record at or after `read_tail`.
    #[getter]
    fn read_tail_seq(&self) -> PyResult<u64> {
        Ok(self.ring()?.tail_snapshot().1)
    }
    /// End of the committed data (absolute bytes).
    #[getter]
    fn write_head(&self) -> PyResult<u64> {
        Ok(self.ring()?.snapshot().0)
    }
    /// Start of the oldest record still in the ring (absolute bytes).
    #[getter]
    fn oldest_position(&self) -> PyResult<u64> {
        Ok(self.ring()?.oldest_pos())
    }
    /// Data records committed since the ring was created (the next sequence number).
    #[getter]
    fn records_written(&self) -> PyResult<u64> {
        Ok(self.ring()?.snapshot().1)
    }
    /// Data records overwritten before the primary consumer's `read_tail` reached them.
    #[getter]
    fn records_lost(&self) -> PyResult<u64> {
        Ok(self.ring()?.records_lost())
    }
    #[getter]
    fn capacity(&self) -> u64 {
        self.ring.capacity()
    }
    /// Largest payload one record can carry.
    #[getter]
    fn max_record_size(&self) -> u64 {
        self.ring.max_payload()
    }
    #[getter]
    fn path(&self) -> String {
        self.ring.path().to_string_lossy().into_owned()
    }
    #[getter]
    fn policy(&self) -> &'static str {
        self.ring.policy().name()
    }
    #[getter]
    fn session_id(&self) -> u64 {
        self.ring.session_id()
    }
    /// True for the producer's handle.
    #[getter]
    fn writable(&self) -> bool {
        self.writable
    }
    #[getter]
    fn producer_pid(&self) -> PyResult<Option<u32>> {
        Ok(self.ring()?.status().producer_pid)
    }
    #[getter]
    fn producer_alive(&self) -> PyResult<bool> {
        Ok(self.ring()?.status().producer_alive)
    }
    #[getter]
    fn heartbeat_ns(&self) -> PyResult<i64> {
        Ok(self.ring()?.heartbeat_ns())
    }
    /// Bytes of the schema region (the stream table; fixed at creation).
    #[getter]
    fn schema_capacity(&self) -> PyResult<u64> {
        Ok(self.ring()?.region().geometry().schema_size)
    }

    /// Default seconds a write waits for room under policy "block".
    #[getter]
    fn get_block_timeout(&self) -> f64 {
        f64::from_bits(self.block_timeout.load(Ordering::Relaxed))
    }
    #[setter]
    fn set_block_timeout(&self, seconds: f64) -> PyResult<()> {
        duration(seconds, "block_timeout")?;
        self.block_timeout
            .store(seconds.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// How a write blocked for room waits: "adaptive" (spin 50 µs, then sleep), "busy"
    /// (spin) or "park" (sleep on the futex at once).
    #[getter]
    fn get_wait(&self) -> &'static str {
        wait_of(self.wait.load(Ordering::Relaxed)).name()
    }
    #[setter]
    fn set_wait(&self, py: Python<'_>, wait: &str) -> PyResult<()> {
        let w = WaitStrategy::parse(wait).py_err(py)?;
        self.wait.store(wait_code(w), Ordering::Relaxed);
        Ok(())
    }

    /// Policy "block": how far into the ring (bytes) the producer goes before it returns to
    /// the start early, once the consumer has taken every record (and at least twice the
    /// record's size): records a consumer keeps up with cycle through memory still in cache,
    /// and a drained ring keeps about that much history. Records of 64 KiB to 8 MiB wait
    /// there, once a lap and briefly, for a consumer a record or two behind, the next
    /// record copied ahead meanwhile. 0: every lap the whole ring, no wait.
    #[getter]
    fn get_hot_bytes(&self) -> u64 {
        self.hot_wrap.load(Ordering::Relaxed)
    }
    #[setter]
    fn set_hot_bytes(&self, nbytes: u64) {
        self.hot_wrap.store(nbytes, Ordering::Relaxed);
    }

    /// Reserves ring space for one record of `nbytes` payload bytes (waiting for room under
    /// policy "block"). Fill it, then commit it; see `Reservation`.
    #[pyo3(signature = (nbytes, *, stream=0, schema_id=0, timestamp_ns=None, timeout=None))]
    fn reserve(
        &self,
        py: Python<'_>,
        nbytes: u64,
        stream: u32,
        schema_id: u32,
        timestamp_ns: Option<i64>,
        timeout: Option<f64>,
    ) -> PyResult<Reservation> {
        let mut guard = self.producer(py, "reserve()")?;
        let p = guard.as_mut().expect("checked by producer()");
        // fstat: a reservation may be filled through another mapping of the file (pyarrow's
        // IPC writer maps it), which the SIGBUS guard does not cover: refuse a shrunk file.
        p.ring().check_intact().py_err(py)?;
        let limit = self.wait_limit(p, timeout)?;
        let claim = claim_with_wait(py, p, nbytes, stream, schema_id, timestamp_ns, limit, None)?;
        Ok(Reservation::new(
            self.ring.clone(),
            self.producer.clone(),
            claim,
        ))
    }

    /// Moves stream id `stream`'s next sequence number forward to `next` (never back); the
    /// records skipped count as lost for readers. Returns the stream's next sequence number.
    fn _advance_stream_seq(&self, py: Python<'_>, stream: u32, next: u64) -> PyResult<u64> {
        let mut guard = self.producer(py, "advancing a stream's sequence number")?;
        guard
            .as_mut()
            .expect("checked by producer()")
            .advance_stream_seq(stream, next)
            .py_err(py)
    }

    /// Registers an Arrow IPC schema for stream `name`; returns (stream_id, schema_id).
    fn _register_schema(&self, py: Python<'_>, name: &str, schema: &[u8]) -> PyResult<(u32, u32)> {
        let mut guard = self.producer(py, "registering a stream schema")?;
        let e = guard
            .as_mut()
            .expect("checked by producer()")
            .register_schema(name, schema)
            .py_err(py)?;
        Ok((e.stream_id, e.schema_id))
    }

    /// The registered schemas from `first_id` on: (schema_id, stream_id, name, schema bytes,
    /// activation); a stream's current schema is its entry with the highest activation.
    #[pyo3(signature = (first_id=1))]
    fn _schemas<'py>(&self, py: Python<'py>, first_id: u32) -> PyResult<Vec<SchemaRow<'py>>> {
        let entries = self.ring()?.schemas_from(first_id).py_err(py)?;
        Ok(entries
            .into_iter()
            .map(|e| {
                (
                    e.schema_id,
                    e.stream_id,
                    e.name,
                    PyBytes::new(py, &e.schema),
                    e.activation,
                )
            })
            .collect())
    }

    /// Every schema's activation, by schema_id - 1.
    fn _schema_activations(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        self.ring()?.schema_activations().py_err(py)
    }

    /// The no-op native call: what calling into the extension costs (for benchmarks).
    fn _noop(&self) {}
}

/// A mapping of a ring file registered with the SIGBUS guard (``RingBuffer._guard_mapping``);
/// dropping it unregisters the mapping.
#[pyclass(frozen, module = "rust_daq._native")]
pub struct MappingGuard {
    // Only held: its Drop frees the guard's slot.
    _guard: Guard,
}
