"""The public ring API: :class:`RingBuffer` and :class:`RingReader` over the native core."""

from __future__ import annotations

import math
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self, TypeVar, cast

import numpy as np
import pyarrow as pa

from . import _native
from ._arrow import ArrowWriter
from ._errors import RingConfigError, RingCorruptError, RingUsageError, RustDaqError
from ._records import DECODE_ERRORS, LossAccount, RecordDecoder, SchemaTable
from ._window import RowWindow

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["RecordArrays", "RingBuffer", "RingReader", "resolve_ring_path"]

Policy = Literal["overwrite", "block"]
StartAt = Literal["oldest", "latest", "tail"]
Wait = Literal["adaptive", "busy", "park"]
"""How a side waits for the other: ``"adaptive"`` spins about 50 µs, then sleeps on the ring's
futex; ``"busy"`` spins (a core busy while waiting, the lowest latency);
``"park"`` sleeps at once (no CPU, a system call and a wake-up per hand-over)."""

_MB = 1024 * 1024

_T = TypeVar("_T")


def _as_corrupt(what: str, call: Callable[[], _T]) -> _T:
    """``call()``, with a raw library error from decoding ring contents turned into
    RingCorruptError (rust-daq's own errors pass through unchanged)."""
    try:
        return call()
    except RustDaqError:
        raise
    except DECODE_ERRORS as e:
        raise RingCorruptError(
            f"{what}: the ring's Arrow data does not decode ({type(e).__name__}: {e})"
        ) from e


def resolve_ring_path(path: str | os.PathLike[str]) -> str:
    """A bare name (no directory part) names a ring in ``/dev/shm`` on Linux; anything else
    is used as given."""
    p = os.fspath(path)
    if sys.platform.startswith("linux") and "/" not in p and p not in ("", ".", ".."):
        return "/dev/shm/" + p
    return p


def _schema_bytes(schema_mb: float) -> int:
    if isinstance(schema_mb, bool) or not isinstance(schema_mb, int | float) or not math.isfinite(schema_mb):
        raise RingConfigError(f"schema_mb must be a finite number of MiB, got {schema_mb!r}")
    if schema_mb <= 0:
        raise RingConfigError(f"schema_mb must be greater than 0, got {schema_mb}")
    return int(math.ceil(schema_mb * _MB))


class RingBuffer(_native.RingBuffer):
    """A memory-mapped ring buffer file shared between processes.

    Make one with :meth:`create` (you become its producer) or attach with :meth:`open`.
    Records written with :meth:`write` are read by any number of :class:`RingReader`\\ s, in
    this or other processes.
    """

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        capacity_mb: float = 100,
        *,
        capacity_bytes: int | None = None,
        policy: Policy = "overwrite",
        replace: bool = False,
        block_timeout: float = 10.0,
        wait: Wait = "adaptive",
        schema_mb: float | None = None,
    ) -> Self:
        """Create a ring of ``capacity_mb`` MiB (or exactly ``capacity_bytes``) and attach as its
        producer. ``wait`` is how a write blocked for room waits (policy ``"block"``; see
        :data:`Wait`, settable later as :attr:`wait`). ``schema_mb``: the size of the stream
        table (a stream's schema takes about 450 bytes; the default is a sixteenth of the
        capacity, from 0.25 to 64 MiB: about 14,000 streams for 100 MiB); an existing ring
        with a smaller one is reused only with ``replace=True`` (recreated). An existing ring of the same capacity and policy is reopened with its data
        (a restarted producer continues the sequence); one of another capacity or policy is
        an error unless ``replace=True``.

        Raises RingConfigError (bad capacity, policy, or a mismatch with the existing ring),
        ProducerActiveError (another live producer), FileNotFoundError (missing directory),
        PermissionError, RingFormatError (a non-ring file is in the way).
        """
        if capacity_bytes is None:
            if isinstance(capacity_mb, bool) or not isinstance(capacity_mb, int | float):
                raise RingConfigError(f"capacity_mb must be a number, got {type(capacity_mb).__name__}")
            if not math.isfinite(capacity_mb):
                raise RingConfigError(f"capacity_mb must be a finite number of MiB, got {capacity_mb}")
            capacity_bytes = int(capacity_mb * _MB)
        elif isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise RingConfigError(f"capacity_bytes must be an int, got {type(capacity_bytes).__name__}")
        if capacity_bytes <= 0:
            raise RingConfigError(f"ring capacity must be greater than 0 bytes, got {capacity_bytes}")
        if capacity_bytes > _native.MAX_CAPACITY:
            raise RingConfigError(
                f"ring capacity {capacity_bytes} bytes is beyond what can be mapped "
                f"(at most {_native.MAX_CAPACITY} bytes)"
            )
        return cls(
            resolve_ring_path(path),
            create=True,
            capacity_bytes=capacity_bytes,
            policy=policy,
            replace=replace,
            block_timeout=block_timeout,
            wait=wait,
            schema_bytes=None if schema_mb is None else _schema_bytes(schema_mb),
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False, *, wait: Wait = "adaptive") -> Self:
        """Attach to an existing ring: read-only, or as its producer with ``writable=True``
        (``wait``: how a blocked write waits, as for :meth:`create`).

        Raises FileNotFoundError, PermissionError, RingFormatError (not a ring, unsupported
        version, truncated), ProducerActiveError (``writable=True`` while a producer lives).
        """
        return cls(resolve_ring_path(path), writable=writable, wait=wait)

    def reader(self, start: StartAt = "oldest", *, wait: Wait = "adaptive") -> RingReader:
        """A new reader with its own cursor: from the ``"oldest"`` record still in the ring, the
        ``"latest"`` (only records committed from now on, and those of a ``write_many`` run
        going on since its last publish), or the primary consumer's ``"tail"``.
        ``wait`` is how its reads with a timeout wait for data (:data:`Wait`)."""
        return RingReader(self, start, wait)

    def data_view(self) -> npt.NDArray[np.uint8]:
        """A read-only numpy ``uint8`` array over the whole data region, zero-copy. It keeps the
        mapping alive; its contents change as the producer writes."""
        return np.frombuffer(memoryview(self._data_buffer()), dtype=np.uint8)

    # -- Arrow streams ---------------------------------------------------------------------

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # (the native __new__ opened the ring; this handle's Arrow state, read and write side)
        self._arrow_writer = ArrowWriter()
        # Through a weak proxy: the handle must not keep itself alive (closing and dropping a
        # ring unmaps it at once, without waiting for the garbage collector).
        self._schema_table = SchemaTable(cast("RingBuffer", weakref.proxy(self)))

    def _prepare_arrow(self) -> None:
        """Sets up what the first :meth:`write_arrow_batch` would (the map of the ring file it
        writes through), for a loop that must not pay for it in its first write."""
        self._arrow_writer.prepare(self)

    def write_arrow_batch(
        self,
        batch: object,
        stream: str = "default",
        *,
        timestamp_ns: int | None = None,
        timeout: float | None = None,
        stream_seq: int | None = None,
    ) -> int:
        """Write Arrow data to ``stream``: a ``pyarrow.RecordBatch`` or ``Table`` (one record per
        batch), or any object exporting ``__arrow_c_array__`` / ``__arrow_c_stream__`` (polars,
        arro3...). Each record is an Arrow IPC record-batch message, written straight into the
        ring (one copy of the column bytes); the schema is stored once, in the ring's schema
        table, and a new schema for the stream registers a new schema id. Field metadata (e.g.
        ``units``) travels with it. Returns the sequence number of the last record (-1 if the
        data held no batch).

        Raises TypeError (not Arrow data), UnsupportedTypeError (dictionary columns),
        RecordTooLargeError (a batch larger than a record can be), RingConfigError (schema
        region full), and what ``write`` raises.

        ``stream_seq`` is for relays that copy a stream from another ring (``rust-daq write
        --from grpc://...``): the record's sequence number within its stream upstream. The
        stream's numbering jumps forward to it (never back), so records lost upstream count as
        lost here too, for every reader and the HDF5 writer.
        """
        return self._arrow_writer.write(self, batch, stream, timestamp_ns, timeout, stream_seq)

    def streams(self) -> dict[str, pa.Schema]:
        """Every Arrow stream in the ring and its current schema. Raises RingCorruptError if
        the ring's schema table does not decode."""
        return _as_corrupt(
            f"{self.path}: reading the stream schemas",
            lambda: {name: info.schema for name, info in self._schema_table.streams().items()},
        )

    def latest(self, stream: str, rows: int = 1000) -> dict[str, npt.NDArray[Any]]:
        """The latest ``rows`` rows of ``stream`` as numpy arrays (zero-copy views when one batch
        holds them; tensor columns as ``(N, ...)`` arrays). For repeated calls in a live plot use
        :class:`LiveView`, which decodes only new records each time. Raises UnknownStreamError,
        RingCorruptError (records or schemas that do not decode)."""
        window = RowWindow(rows)  # (a bad `rows` raises ValueError before decoding: not corruption)

        def latest() -> dict[str, npt.NDArray[Any]]:
            decoder = RecordDecoder(self._schema_table)
            info = decoder.schemas.stream(stream)
            window.fill(self.reader("oldest"), decoder, info.stream_id, 0.0)
            return window.arrays(info.schema)

        return _as_corrupt(f"{self.path}: reading the latest rows of {stream!r}", latest)

    def close(self) -> None:
        """Releases the producer lock and this handle's Arrow writers (and their memory map of
        the ring file). Readers and views made earlier keep working."""
        self._arrow_writer.close()
        super().close()

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("producer" if self.writable else "read-only")
        return f"<RingBuffer {self.path!r} {self.capacity} bytes policy={self.policy!r} {state}>"


class RecordArrays(NamedTuple):
    """What :meth:`RingReader.read_array` returns: ``n`` records of one size, as arrays."""

    data: npt.NDArray[Any]
    """``(n, size)`` uint8 (or ``(n, size // itemsize)`` of the dtype asked for; ``(n,)`` when
    the dtype's item is a whole record, as a structured dtype's is)."""
    seq: npt.NDArray[np.uint64]
    timestamp_ns: npt.NDArray[np.int64]
    stream: npt.NDArray[np.uint32]

    def __len__(self) -> int:  # the number of records, not of fields
        return len(self.seq)


class RingReader(_native.RingReader):
    """A cursor over a ring with its own position and loss count (:attr:`lost`).

    ``reader.read()`` returns the records available now (``timeout > 0`` waits for one);
    every record carries ``seq``, ``timestamp_ns``, ``stream`` and ``data``.
    """

    def __init__(self, ring: _native.RingBuffer, start: StartAt = "oldest", wait: Wait = "adaptive") -> None:
        # (the native __new__ placed the cursor and set its wait; this reader's Arrow decoding)
        self._decoder = RecordDecoder(SchemaTable(ring))
        self._loss = LossAccount()  # per stream, from the gaps in stream_seq
        # Zero-copy batches handed out, by id: (a weak reference, the record's ring position).
        self._views: dict[int, tuple[weakref.ref[pa.RecordBatch], int]] = {}

    def read_array(
        self,
        max_records: int = 65536,
        *,
        stream: int | None = None,
        timeout: float = 0.0,
        dtype: npt.DTypeLike = np.uint8,
    ) -> RecordArrays:
        """Up to ``max_records`` records of one size in one call, as arrays (copied out, then
        validated, as :meth:`read` is): for small messages, one Python call per batch instead
        of one :class:`Record` per message.

        The batch stops at the first record of another size, or of another stream than
        ``stream``; such a record is left for the next call (:meth:`read` takes any record). A
        next record whose size is not a multiple of ``dtype``'s item raises ValueError and is
        not consumed. ``timeout > 0`` waits (GIL released) for at least one record. To reuse
        one buffer, see :meth:`read_into`.
        """
        dt = np.dtype(dtype)
        if max_records < 0:
            raise ValueError(f"max_records must be >= 0, got {max_records}")
        if dt.itemsize == 0 or dt.hasobject:
            # (checked before reading: a view that fails afterwards would lose the records)
            raise ValueError(f"dtype {dt} cannot view a record's bytes (empty, or holds Python objects)")
        data, seq, ts, streams, size = self._read_array(max_records, stream, dt.itemsize, timeout)
        n = len(seq) // 8
        raw: npt.NDArray[Any] = np.frombuffer(data, np.uint8).reshape(n, size)
        arr: npt.NDArray[Any]
        if dt == np.uint8:
            arr = raw
        elif dt.itemsize == size:
            arr = raw.view(dt).reshape(n)
        else:
            arr = raw.view(dt)
        return RecordArrays(
            arr, np.frombuffer(seq, np.uint64), np.frombuffer(ts, np.int64), np.frombuffer(streams, np.uint32)
        )

    def read_batches(
        self, max_records: int | None = None, timeout: float = 0.0, copy: bool = True
    ) -> list[tuple[str, pa.RecordBatch]]:
        """The Arrow records available now, as ``(stream name, RecordBatch)`` pairs, in ring order.

        With ``copy=False`` the batches' buffers view the ring's shared memory (no copy; they keep
        the mapping alive); :meth:`batch_valid` says whether a batch was overwritten since.
        Records that are not Arrow (plain ``write``) are skipped and counted in
        :attr:`not_arrow`; records that do not decode are skipped and counted in
        :attr:`undecodable`.
        """
        lost = self.lost
        records = self.read(max_records, timeout, copy)
        decode, out = self._decoder.decode, []
        # Per stream: its first and last record read, and how many (for the loss account).
        seen: dict[str, list[Any]] = {}
        for rec in records:
            d = decode(rec)
            if d is None or d.info is None:
                continue
            s = seen.get(d.info.name)
            if s is None:
                seen[d.info.name] = [rec, rec, 1]
            else:
                s[1] = rec
                s[2] += 1
            if d.batch is None:
                continue
            # A private copy (see _records.decode) stays valid, unless it was torn as it was copied.
            if not copy and (not d.info.full_validation or not rec.valid()):
                self._remember(d.batch, rec.position)
            out.append((d.info.name, d.batch))
        self._count_losses(records, seen, gapless=self.lost == lost)
        return out

    def _count_losses(self, records: list[_native.Record], seen: dict[str, list[Any]], gapless: bool) -> None:
        """Per-stream losses of what one read returned. With no gap in the ring's sequence
        numbers and no stream's numbering jumping (a relay's ``stream_seq``), each stream's
        account moves in one step; otherwise each record is accounted for."""
        loss, slow = self._loss, set()
        for name, (first, last, n) in seen.items():
            if not (gapless and loss.caught_up(name, first.stream_seq, last.stream_seq, n)):
                slow.add(name)
        if slow:
            by_id = self._decoder.schemas.by_id
            for rec in records:
                info = by_id.get(rec.schema_id)
                if info is not None and info.name in slow:
                    loss.observe(info.name, rec.stream_seq)  # (a ring does not know the lost rows)

    def _remember(self, batch: pa.RecordBatch, position: int) -> None:
        key, views = id(batch), self._views
        views[key] = (weakref.ref(batch, lambda _r: views.pop(key, None)), position)

    def batch_valid(self, batch: pa.RecordBatch) -> bool:
        """For a batch from ``read_batches(copy=False)``: False once the producer has reclaimed
        its space (discard what was computed from it). Check after using the data. True for
        batches that are copies."""
        entry = self._views.get(id(batch))
        if entry is None or entry[0]() is not batch:
            return True
        return self._position_valid(entry[1])

    @property
    def undecodable(self) -> int:
        """Arrow records skipped because their payload did not decode (corruption)."""
        return self._decoder.undecodable

    def lost_by_stream(self) -> dict[str, tuple[int, int | None]]:
        """Per Arrow stream, ``(records, rows)`` this reader lost (overwritten before it read
        them), as ``rust_daq.remote``'s reader reports them. Records are counted from the gaps
        in the stream's sequence numbers, from the first record of the stream that
        ``read_batches`` returned; the rows they held are gone with them (None), unless none
        were lost (0). :attr:`lost` counts every record, of any stream."""
        return {str(name): (loss.records, loss.rows) for name, loss in self._loss.streams.items()}

    @property
    def not_arrow(self) -> int:
        """Records skipped by ``read_batches`` because they carry no Arrow schema."""
        return self._decoder.not_arrow

    def _stream(self, stream: str) -> pa.Schema:
        return _as_corrupt(
            f"{self.ring.path}: reading the stream schemas",
            lambda: self._decoder.schemas.stream(stream).schema,
        )

    def read_table(self, stream: str, max_records: int | None = None, timeout: float = 0.0) -> pa.Table:
        """The available records of ``stream`` as one ``pyarrow.Table`` (copied out of the ring).
        Records of other streams read meanwhile are dropped: use a reader per stream. Raises
        UnknownStreamError."""
        schema = self._stream(stream)
        batches = [b for name, b in self.read_batches(max_records, timeout) if name == stream]
        if not batches:
            return schema.empty_table()
        schemas = {id(b.schema) for b in batches}
        if len(schemas) == 1 or all(b.schema.equals(batches[0].schema) for b in batches):
            return pa.Table.from_batches(batches)
        return pa.concat_tables([pa.Table.from_batches([b]) for b in batches], promote_options="default")

    def stream_reader(self, stream: str, *, timeout: float = 0.0, copy: bool = True) -> pa.RecordBatchReader:
        """The batches of ``stream`` from this reader's position as a ``pyarrow.RecordBatchReader``.
        It exports ``__arrow_c_stream__``, so polars, duckdb or arro3 consume it directly. It
        ends when no record arrives for ``timeout`` seconds (0: at the end of what the ring
        holds now). Raises UnknownStreamError; RingUsageError if the schema changes mid-read."""
        schema = self._stream(stream)
        return pa.RecordBatchReader.from_batches(schema, self._batches_of(stream, schema, timeout, copy))

    def _batches_of(
        self, stream: str, schema: pa.Schema, timeout: float, copy: bool
    ) -> Iterator[pa.RecordBatch]:
        """Batches of one stream until nothing arrives for `timeout` s."""
        while True:
            got = self.read_batches(timeout=timeout, copy=copy)
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

    def __repr__(self) -> str:
        return f"<RingReader of {self.ring.path!r} at {self.position} lost={self.lost}>"
