"""Arrow record streams through the ring: writing them, and the Arrow type helpers the
readers share (reading is in ``_records.py``).

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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import _native
from ._errors import (
    RecordTooLargeError,
    RingUsageError,
    UnsupportedTypeError,
)

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["ArrowWriter", "StreamInfo", "empty_batch", "to_batches", "variable_length", "warm_up"]


@dataclass(frozen=True)
class StreamInfo:
    """One entry of the ring's schema table."""

    name: str
    stream_id: int
    schema_id: int
    schema: pa.Schema
    #: Batches of this schema need full validation (variable-length layouts) when decoded.
    full_validation: bool = False


def warm_up() -> None:
    """Makes pyarrow load what it loads lazily at its first conversion from or to numpy: when
    pandas is installed, pyarrow (>= 2x) imports it then, 0.3-0.5 s. Called where a stall
    does no harm (an acquisition's connect, a writer before "ready"), not in the first read
    of a run, where it would be missed deadlines."""
    import numpy as np

    pa.array(np.zeros(1, np.int64)).to_numpy()


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


class ArrowWriter:
    """A producer handle's Arrow writing state: one :class:`StreamWriter` per stream and the
    memory map of the ring file they share. Held by the ring handle; the handle is passed to
    each call, not stored (no reference cycle)."""

    def __init__(self) -> None:
        self.writers: dict[str, StreamWriter] = {}
        self.file: tuple[pa.MemoryMappedFile, int, _native.MappingGuard] | None = None
        # Serialises Arrow writes: the writers share one file position.
        self.lock = threading.Lock()

    def prepare(self, ring: _native.RingBuffer) -> None:
        """Maps the ring file for Arrow writes now (its pages faulted in: a few ms for 100 MiB),
        so that the first write of a run does not pay for it."""
        with self.lock:
            if self.file is None:
                self.file = map_ring_file(ring)

    def close(self) -> None:
        """Drops the writers and closes their memory map of the ring file."""
        with self.lock:
            self.writers.clear()
            if self.file is not None:
                mm, _, guard = self.file
                self.file = None
                del guard  # unregistered before the map goes: the guard must never outlive it
                mm.close()

    def write(
        self,
        ring: _native.RingBuffer,
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
                        self.file = map_ring_file(ring)
                    w = self.writers[stream] = StreamWriter(ring, *self.file[:2], stream, batch.schema)
                size = pa.ipc.get_record_batch_size(batch)
                if stream_seq is not None:
                    ring._advance_stream_seq(w.stream_id, stream_seq)
                    stream_seq = None  # the batches after the first follow on
                try:
                    res = ring.reserve(
                        size,
                        stream=w.stream_id,
                        schema_id=w.schema_id,
                        timestamp_ns=timestamp_ns,
                        timeout=timeout,
                    )
                except RecordTooLargeError as e:
                    raise RecordTooLargeError(
                        f"Arrow batch for stream {stream!r} ({batch.num_rows} rows) serialises to {size} bytes; "
                        f"a record of this ring holds at most {ring.max_record_size}: write smaller "
                        "batches or create a larger ring"
                    ) from e
                seq = w.put(batch, res, size).commit()
        return seq


def variable_length(t: pa.DataType) -> bool:
    if isinstance(t, pa.BaseExtensionType):
        return variable_length(t.storage_type)
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
    return any(variable_length(t.field(i).type) for i in range(t.num_fields))


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
