"""Arrow record streams through the ring.

A record of an Arrow stream is one Arrow IPC *record batch message*; the stream's schema is
stored once, in the ring's schema table (docs/ring-format.md, "Schema region"), and each
record names it by ``schema_id``. Writing copies each column buffer once, straight into
reserved ring space: pyarrow's IPC stream writer writes to a pyarrow memory map of the
producer's own ring file, seeked to each reservation before the batch is written, so the
column bytes go from the caller's buffers to the ring in one memcpy with no Python call
per buffer.

n-D data (camera frames) uses Arrow's canonical ``arrow.fixed_shape_tensor`` extension type:
``pa.FixedShapeTensorArray.from_numpy_ndarray(frames)`` for an ``(N, H, W)`` array, and
``column.to_numpy_ndarray()`` back, both without a copy.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from . import _native
from ._errors import (
    RecordTooLargeError,
    RingCorruptError,
    RingUsageError,
    UnknownStreamError,
    UnsupportedTypeError,
)

if TYPE_CHECKING:
    import numpy.typing as npt

    from ._ring import RingBuffer, RingReader

__all__ = ["LiveView", "StreamInfo"]


@dataclass(frozen=True)
class StreamInfo:
    """One entry of the ring's schema table."""

    name: str
    stream_id: int
    schema_id: int
    schema: pa.Schema
    #: Batches of this schema need full validation (variable-length layouts) when decoded.
    full_validation: bool = False


def _type_name(obj: object) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def to_batches(data: object) -> Iterator[pa.RecordBatch]:
    """The record batches of a pyarrow RecordBatch or Table, or of any object exporting the
    Arrow PyCapsule interface (``__arrow_c_array__`` / ``__arrow_c_stream__``), zero-copy."""
    if isinstance(data, pa.RecordBatch):
        yield data
    elif isinstance(data, pa.Table):
        yield from data.to_batches()
    elif hasattr(data, "__arrow_c_stream__"):
        yield from pa.RecordBatchReader.from_stream(data)
    elif hasattr(data, "__arrow_c_array__"):
        yield pa.record_batch(data)
    else:
        raise TypeError(
            "write_arrow_batch() needs a pyarrow RecordBatch or Table, or an object with "
            f"__arrow_c_array__ / __arrow_c_stream__ (polars, arro3, nanoarrow...); got {_type_name(data)}"
        )


def _unsupported(t: pa.DataType) -> pa.DataType | None:
    """The first type inside `t` that the ring does not carry, if any."""
    if pa.types.is_dictionary(t):
        return t
    if isinstance(t, pa.BaseExtensionType):
        return _unsupported(t.storage_type)
    for i in range(t.num_fields):
        inner = _unsupported(t.field(i).type)
        if inner is not None:
            return inner
    return None


def check_supported(schema: pa.Schema, stream: str) -> None:
    for field in schema:
        bad = _unsupported(field.type)
        if bad is not None:
            raise UnsupportedTypeError(
                f"stream {stream!r}: column {field.name!r} has type {bad}, which the ring does not carry "
                "(dictionary-encoded data needs its dictionary in every record; cast it to the value "
                "type, e.g. column.dictionary_decode())"
            )


def map_ring_file(ring: _native.RingBuffer) -> tuple[pa.MemoryMappedFile, int, _native.MappingGuard]:
    """A pyarrow memory map of the producer's open ring file (the same inode, through
    /proc/self/fd), the file offset of its data region, and the registration of that map
    with the ring's SIGBUS guard (a file truncated while pyarrow writes into it gives
    RingCorruptError, not a dead process; drop it before closing the map)."""
    fd, data_offset = ring._data_file()
    path = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else ring.path
    mm = pa.memory_map(path, "r+")
    if mm.size() != data_offset + ring.capacity or mm.read_at(8, 48) != ring.session_id.to_bytes(8, "little"):
        mm.close()
        raise RingUsageError(f"{ring.path} is no longer the file this producer opened")
    mm.seek(0)
    base = mm.read_buffer(1).address  # (a zero-copy slice of the map: its first byte)
    mm.seek(0)
    guard = ring._guard_mapping(base, mm.size())
    return mm, data_offset, guard


class StreamWriter:
    """Writes batches of one (stream, schema) pair: a pyarrow IPC stream writer over a
    memory map of the ring file, positioned at each reservation before a batch is written."""

    def __init__(
        self,
        ring: _native.RingBuffer,
        file: pa.MemoryMappedFile,
        data_offset: int,
        name: str,
        schema: pa.Schema,
    ) -> None:
        check_supported(schema, name)
        # Everything pyarrow can fail on for this schema happens before it enters the ring's
        # schema table: an entry readers cannot decode would hide the others.
        try:
            raw = schema.serialize().to_pybytes()
            empty = empty_batch(pa.ipc.read_schema(pa.py_buffer(raw)))
            size = schema.serialize().size + pa.ipc.get_record_batch_size(empty)
        except (pa.ArrowException, OSError, ValueError, KeyError, RecursionError) as e:
            raise UnsupportedTypeError(
                f"stream {name!r}: Arrow cannot read this schema back ({e}); nothing was written "
                "(a type nested hundreds of levels deep?)"
            ) from e
        self.schema = schema
        self.stream_id, self.schema_id = ring._register_schema(name, raw)
        # Reservation addresses are in our mapping; the file offset is relative to the data region.
        self.base = ring.data_address() - data_offset
        self.file = file
        self.writer = pa.ipc.new_stream(file, schema)
        # pyarrow writes the schema message before its first batch: let it land in a record
        # that is then aborted (it becomes padding readers skip); the table has the schema.
        self.put(empty_batch(schema), ring.reserve(size), size).abort()

    def put(self, batch: pa.RecordBatch, res: _native.Reservation, size: int) -> _native.Reservation:
        """Serialises `batch` into `res` (exactly `size` bytes); aborts it on any failure."""
        start = res.address - self.base
        try:
            self.file.seek(start)
            self.writer.write_batch(batch)
            end = self.file.tell()
        except BaseException:
            res.abort()
            raise
        if end != start + size:
            res.abort()
            raise RingUsageError(
                f"pyarrow wrote {end - start} bytes for a {size}-byte record-batch message; nothing was written"
            )
        return res


class ArrowState:
    """Per-ring-handle Arrow state: the writers of this producer and the decoded schema table."""

    def __init__(self, ring: _native.RingBuffer) -> None:
        self.ring = ring
        self.writers: dict[str, StreamWriter] = {}
        self.file: tuple[pa.MemoryMappedFile, int, _native.MappingGuard] | None = None
        self.by_id: dict[int, StreamInfo] = {}
        self.bad_ids: set[int] = set()  # schema table entries that do not decode
        # Serialises Arrow writes: the writers share one file position.
        self.lock = threading.Lock()

    def close(self) -> None:
        """Drops the writers and closes their memory map of the ring file."""
        self.writers.clear()
        if self.file is not None:
            mm, _, guard = self.file
            self.file = None
            del guard  # unregistered before the map goes: the guard must never outlive it
            mm.close()

    def refresh(self) -> dict[int, int]:
        """Reloads the schema table; returns each schema id's activation. An entry that does
        not decode is left out (and remembered in ``bad_ids``): it must not hide the others."""
        activations = {}
        for schema_id, stream_id, name, raw, activation in self.ring._schemas():
            activations[schema_id] = activation
            if schema_id not in self.by_id and schema_id not in self.bad_ids:
                try:
                    schema = pa.ipc.read_schema(pa.py_buffer(raw))
                    [f.name for f in schema]  # names that are not UTF-8 raise now, not later
                    probe = empty_batch(schema)  # types pyarrow cannot hold raise now, not later
                    [probe.column(i) for i in range(probe.num_columns)]
                except DECODE_ERRORS + (KeyError,):
                    self.bad_ids.add(schema_id)
                    continue
                full = any(_variable_length(f.type) for f in schema)
                self.by_id[schema_id] = StreamInfo(name, stream_id, schema_id, schema, full)
        return activations

    def info(self, schema_id: int) -> StreamInfo | None:
        if schema_id not in self.by_id:
            self.refresh()
        return self.by_id.get(schema_id)

    def streams(self) -> dict[str, StreamInfo]:
        """The current schema of every stream (the one the producer switched to last).
        Raises RingCorruptError when an entry of the schema table does not decode (which
        stream's current schema it held cannot be known)."""
        activations = self.refresh()
        if self.bad_ids:
            raise RingCorruptError(
                f"the ring's schema table entries {sorted(self.bad_ids)} do not decode (corrupt ring file)"
            )
        latest: dict[str, StreamInfo] = {}
        for info in sorted(self.by_id.values(), key=lambda i: activations.get(i.schema_id, 0)):
            latest[info.name] = info
        return latest

    def stream(self, name: str) -> StreamInfo:
        streams = self.streams()
        if name not in streams:
            known = ", ".join(repr(s) for s in streams) or "none yet"
            raise UnknownStreamError(f"unknown stream {name!r}; the ring's streams: {known}")
        return streams[name]

    def write(
        self,
        data: object,
        stream: str,
        timestamp_ns: int | None,
        timeout: float | None,
        stream_seq: int | None = None,
    ) -> int:
        if not isinstance(stream, str) or not stream:
            raise TypeError(f"stream must be a non-empty str, got {stream!r}")
        if stream_seq is not None and (
            isinstance(stream_seq, bool) or not isinstance(stream_seq, int) or stream_seq < 0
        ):
            raise TypeError(f"stream_seq must be a non-negative int, got {stream_seq!r}")
        seq = -1
        batches = (data,) if isinstance(data, pa.RecordBatch) else to_batches(data)
        with self.lock:
            for batch in batches:
                w = self.writers.get(stream)
                if w is None or not w.schema.equals(batch.schema, check_metadata=True):
                    if self.file is None:
                        self.file = map_ring_file(self.ring)
                    w = self.writers[stream] = StreamWriter(self.ring, *self.file[:2], stream, batch.schema)
                size = pa.ipc.get_record_batch_size(batch)
                if stream_seq is not None:
                    self.ring._advance_stream_seq(w.stream_id, stream_seq)
                    stream_seq = None  # the batches after the first follow on
                try:
                    res = self.ring.reserve(
                        size,
                        stream=w.stream_id,
                        schema_id=w.schema_id,
                        timestamp_ns=timestamp_ns,
                        timeout=timeout,
                    )
                except RecordTooLargeError as e:
                    raise RecordTooLargeError(
                        f"Arrow batch for stream {stream!r} ({batch.num_rows} rows) serialises to {size} bytes; "
                        f"a record of this ring holds at most {self.ring.max_record_size}: write smaller "
                        "batches or create a larger ring"
                    ) from e
                seq = w.put(batch, res, size).commit()
        return seq


def _variable_length(t: pa.DataType) -> bool:
    if isinstance(t, pa.BaseExtensionType):
        return _variable_length(t.storage_type)
    if (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_map(t)
        or pa.types.is_union(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
        or pa.types.is_run_end_encoded(t)
    ):
        return True
    return any(_variable_length(t.field(i).type) for i in range(t.num_fields))


#: What decoding a corrupted payload can raise (pyarrow raises all three).
DECODE_ERRORS = (pa.ArrowException, ValueError, OSError, EOFError, IndexError)


def decode(rec: _native.Record, info: StreamInfo) -> pa.RecordBatch:
    """The batch in a record: zero-copy over `rec.data` (bytes or a view into the ring).

    Validated before it is returned, so a corrupted payload raises here instead of crashing
    a later access: buffer sizes always (cheap), offsets too for variable-length layouts.
    A zero-copy record of a schema with offsets (strings, lists, unions, run-end encoding...)
    is decoded from a private copy instead: once the producer laps the record, offsets read
    in place could point anywhere and crash the process; fixed-width data stays in place,
    where overwritten values are merely wrong (``valid()`` says so) and never out of bounds.
    """
    if info.full_validation and rec.zero_copy:
        return decode_buffer(bytes(rec.data), info)
    return decode_buffer(rec.data, info)


def decode_buffer(data: bytes | memoryview, info: StreamInfo) -> pa.RecordBatch:
    """The batch in a record's payload `data`, zero-copy and validated as in :func:`decode`."""
    batch = pa.ipc.read_record_batch(pa.py_buffer(data), info.schema)
    batch.validate(full=info.full_validation)
    return batch


class BatchReading:
    """Per-reader Arrow state: decoded schemas, validity of zero-copy batches, counters."""

    def __init__(self, reader: RingReader) -> None:
        self.state = ArrowState(reader.ring)
        self.views: dict[int, tuple[weakref.ref[pa.RecordBatch], int]] = {}
        self.undecodable = 0
        self.not_arrow = 0

    def remember(self, batch: pa.RecordBatch, position: int) -> None:
        key = id(batch)
        views = self.views
        self.views[key] = (weakref.ref(batch, lambda _r: views.pop(key, None)), position)

    def decode_all(self, records: list[_native.Record], zero_copy: bool) -> list[tuple[str, pa.RecordBatch]]:
        out = []
        for rec in records:
            if rec.schema_id == 0:
                self.not_arrow += 1
                continue
            info = self.state.info(rec.schema_id)
            if info is None:
                self.undecodable += 1
                continue
            try:
                batch = decode(rec, info)
            except DECODE_ERRORS:
                self.undecodable += 1
                continue
            # A private copy (see decode) stays valid, unless the record was torn as it was copied.
            if zero_copy and (not info.full_validation or not rec.valid()):
                self.remember(batch, rec.position)
            out.append((info.name, batch))
        return out


class LiveView:
    """The latest `rows` rows of one stream as numpy arrays, kept current by `update()`.

    Made for notebooks: ``view = LiveView(ring, "voltmeter", rows=2000)``, then
    ``arrays = view.update()`` in a plotting loop. Only new records are decoded on each call.
    With ``copy=False`` (the default) an array views the ring when one batch covers the
    window (always for a window no larger than a batch), else it is a copy; ``valid()`` says
    whether the viewed records are still intact.
    """

    def __init__(self, ring: RingBuffer, stream: str, rows: int = 1000, *, copy: bool = False) -> None:
        if rows <= 0:
            raise ValueError(f"rows must be positive, got {rows}")
        self._ring = ring
        self._reader = ring.reader("oldest")
        self._state = ArrowState(ring)
        self._stream = stream
        self._rows = rows
        self._copy = copy
        self._window: deque[tuple[pa.RecordBatch, _native.Record]] = deque()
        self._nrows = 0
        self.undecodable = 0  #: records of the stream that did not decode (skipped)

    def update(self, timeout: float = 0.0) -> dict[str, npt.NDArray[Any]]:
        """Reads what arrived since the last call (waiting up to `timeout` s for something)
        and returns the latest rows, one array per column (tensor columns as (N, ...))."""
        self._advance(timeout)
        return self._arrays()

    def update_table(self, timeout: float = 0.0, *, attempts: int = 10) -> pa.Table:
        """As :meth:`update`, but the latest rows as one Arrow table (types, field metadata and
        tensor columns as written), always a copy: intact however long it is kept. A copy the
        producer tore (it overwrote the records meanwhile) is made again, up to `attempts`
        times; then RingUsageError."""
        for _ in range(attempts):
            self._advance(timeout)
            table = self._table()
            copied = table.take(pa.array(np.arange(table.num_rows, dtype=np.int64)))
            if self.valid():
                return copied
            timeout = 0.0
        raise RingUsageError(
            f"the producer overwrote the latest rows of {self._stream!r} {attempts} times while "
            "they were copied; the ring is too small for this many rows"
        )

    def _advance(self, timeout: float) -> None:
        stream_id = self._state.stream(self._stream).stream_id
        deadline = time.monotonic() + timeout
        while True:
            records = self._reader.read(copy=False, timeout=max(deadline - time.monotonic(), 0.0))
            for rec in records:
                if rec.stream != stream_id or rec.schema_id == 0:
                    continue
                info = self._state.info(rec.schema_id)
                if info is None:
                    continue
                try:
                    batch = decode(rec, info)
                except DECODE_ERRORS:
                    self.undecodable += 1  # one bad record must not fail every later update
                    continue
                self._window.append((batch, rec))
                self._nrows += batch.num_rows
                while self._window and self._nrows - self._window[0][0].num_rows >= self._rows:
                    self._nrows -= self._window.popleft()[0].num_rows
            if not records or len(records) < 1024:
                break
        while self._window and not self._window[0][1].valid():
            self._nrows -= self._window.popleft()[0].num_rows  # overwritten meanwhile

    def valid(self) -> bool:
        """Whether every record in the window is still intact in the ring."""
        return all(rec.valid() for _, rec in self._window)

    def _current(self) -> list[pa.RecordBatch]:
        """The window's batches of the stream's newest schema (a schema change starts anew)."""
        batches = [b for b, _ in self._window]
        schema = batches[-1].schema
        k = len(batches)
        while k > 0 and batches[k - 1].schema.equals(schema, check_metadata=True):
            k -= 1
        return batches[k:]

    def _table(self) -> pa.Table:
        """The latest rows as a table over the window's batches (zero-copy)."""
        if not self._window:
            return self._state.stream(self._stream).schema.empty_table()
        table = pa.Table.from_batches(self._current())
        return table.slice(max(table.num_rows - self._rows, 0))

    def _arrays(self) -> dict[str, npt.NDArray[Any]]:
        if not self._window:
            schema = self._state.stream(self._stream).schema
            return {f.name: _to_numpy(_empty(f.type)) for f in schema}
        last = self._window[-1][0]
        if last.num_rows >= min(self._rows, self._nrows):  # one batch holds them: a view
            window = last.slice(max(last.num_rows - self._rows, 0))
            cols = {name: window.column(name) for name in window.schema.names}
        else:
            table = self._table()
            cols = {name: table.column(name).combine_chunks() for name in table.schema.names}
        out = {name: _to_numpy(col) for name, col in cols.items()}
        if self._copy:
            out = {k: np.array(v, copy=True) for k, v in out.items()}
        return out


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    """A batch of `schema` with no rows (any type, unions and extensions included)."""
    return pa.RecordBatch.from_arrays([_empty(f.type) for f in schema], schema=schema)


def _empty(t: pa.DataType) -> pa.Array:
    if isinstance(t, pa.BaseExtensionType):
        return pa.ExtensionArray.from_storage(t, _empty(t.storage_type))
    return pa.nulls(0, t)  # (pa.array([], type=t) has no union builder)


def _to_numpy(col: pa.Array) -> npt.NDArray[Any]:
    if isinstance(col, pa.FixedShapeTensorArray):
        out: npt.NDArray[Any] = col.to_numpy_ndarray()
    else:
        out = col.to_numpy(zero_copy_only=False)
    return out


def batches_of(
    reader: RingReader, stream: str, schema: pa.Schema, timeout: float, copy: bool
) -> Iterable[pa.RecordBatch]:
    """Batches of one stream from a reader until nothing arrives for `timeout` s."""
    while True:
        got = reader.read_batches(timeout=timeout, copy=copy)
        if not got:
            return
        for name, batch in got:
            if name != stream:
                continue
            if not batch.schema.equals(schema, check_metadata=True):
                raise RingUsageError(
                    f"stream {stream!r} changed its schema mid-read; a RecordBatchReader has one "
                    "schema: read the rest with a new stream_reader()"
                )
            yield batch
