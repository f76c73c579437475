"""The public ring API: :class:`RingBuffer` and :class:`RingReader` over the native core."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

import numpy as np
import pyarrow as pa

from . import _native
from ._arrow import ArrowState, BatchReading, LiveView, batches_of
from ._errors import RingConfigError, RingCorruptError, RustDaqError

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["RingBuffer", "RingReader", "resolve_ring_path"]

Policy = Literal["overwrite", "block"]
StartAt = Literal["oldest", "latest", "tail"]

_MB = 1024 * 1024

_T = TypeVar("_T")

#: What pyarrow (and the schema decoding in ``_arrow``) raise on bytes that are not what the
#: ring's format says: from a corrupt ring these become RingCorruptError at this boundary.
_RAW_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    pa.ArrowException,
    ValueError,
    OSError,
    EOFError,
    IndexError,
    KeyError,
    OverflowError,
    TypeError,
)


def _names_decode(t: pa.Schema | pa.DataType) -> bool:
    """Whether every field name in `t` (nested ones too) is UTF-8. pyarrow decodes a schema
    with undecodable names and raises UnicodeDecodeError only when a name is used later."""
    try:
        fields = list(t) if isinstance(t, pa.Schema) else [t.field(i) for i in range(t.num_fields)]
        return all(isinstance(f.name, str) and _names_decode(f.type) for f in fields)
    except UnicodeDecodeError:
        return False


def _checked(schema: pa.Schema, what: str) -> pa.Schema:
    if not _names_decode(schema):
        raise RingCorruptError(f"{what}: a field name in the ring's schema table is not UTF-8")
    return schema


def _as_corrupt(what: str, call: Callable[[], _T]) -> _T:
    """``call()``, with a raw library error from decoding ring contents turned into
    RingCorruptError (rust-daq's own errors pass through unchanged)."""
    try:
        return call()
    except RustDaqError:
        raise
    except _RAW_DECODE_ERRORS as e:
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
    ) -> Self:
        """Create a ring of ``capacity_mb`` MiB (or exactly ``capacity_bytes``) and attach as its
        producer. An existing ring of the same capacity and policy is reopened with its data
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
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False) -> Self:
        """Attach to an existing ring: read-only, or as its producer with ``writable=True``.

        Raises FileNotFoundError, PermissionError, RingFormatError (not a ring, unsupported
        version, truncated), ProducerActiveError (``writable=True`` while a producer lives).
        """
        return cls(resolve_ring_path(path), writable=writable)

    def reader(self, start: StartAt = "oldest") -> RingReader:
        """A new reader with its own cursor: from the ``"oldest"`` record still in the ring, the
        ``"latest"`` (only records committed from now on), or the primary consumer's ``"tail"``."""
        return RingReader(self, start)

    def data_view(self) -> npt.NDArray[np.uint8]:
        """A read-only numpy ``uint8`` array over the whole data region, zero-copy. It keeps the
        mapping alive; its contents change as the producer writes."""
        return np.frombuffer(memoryview(self._data_buffer()), dtype=np.uint8)

    # -- Arrow streams ---------------------------------------------------------------------

    @property
    def _arrow(self) -> ArrowState:
        state: ArrowState | None = self.__dict__.get("_arrow_state")
        if state is None:
            state = self.__dict__["_arrow_state"] = ArrowState(self)
        return state

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
        return self._arrow.write(batch, stream, timestamp_ns, timeout, stream_seq)

    def streams(self) -> dict[str, pa.Schema]:
        """Every Arrow stream in the ring and its current schema. Raises RingCorruptError if
        the ring's schema table does not decode."""
        return _as_corrupt(
            f"{self.path}: reading the stream schemas",
            lambda: {
                name: _checked(info.schema, f"{self.path}: stream {name!r}")
                for name, info in self._arrow.streams().items()
            },
        )

    def latest(self, stream: str, rows: int = 1000) -> dict[str, npt.NDArray[Any]]:
        """The latest ``rows`` rows of ``stream`` as numpy arrays (zero-copy views when one batch
        holds them; tensor columns as ``(N, ...)`` arrays). For repeated calls in a live plot use
        :class:`LiveView`, which decodes only new records each time. Raises UnknownStreamError,
        RingCorruptError (records or schemas that do not decode)."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
            raise ValueError(f"rows must be positive, got {rows}")  # before decoding: not corruption
        return _as_corrupt(
            f"{self.path}: reading the latest rows of {stream!r}",
            lambda: LiveView(self, stream, rows).update(),
        )

    def close(self) -> None:
        """Releases the producer lock and this handle's Arrow writers (and their memory map of
        the ring file). Readers and views made earlier keep working."""
        state: ArrowState | None = self.__dict__.pop("_arrow_state", None)
        if state is not None:
            state.close()  # also breaks the handle <-> Arrow state reference cycle
        super().close()

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("producer" if self.writable else "read-only")
        return f"<RingBuffer {self.path!r} {self.capacity} bytes policy={self.policy!r} {state}>"


class RingReader(_native.RingReader):
    """A cursor over a ring with its own position and loss count (:attr:`lost`).

    ``reader.read()`` returns the records available now (``timeout > 0`` waits for one);
    every record carries ``seq``, ``timestamp_ns``, ``stream`` and ``data``.
    """

    @property
    def _batches(self) -> BatchReading:
        state: BatchReading | None = self.__dict__.get("_batch_state")
        if state is None:
            state = self.__dict__["_batch_state"] = BatchReading(self)
        return state

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
        records = self.read(max_records, timeout, copy)
        batches = self._batches
        counts = batches.not_arrow, batches.undecodable
        try:
            return self._without_bad_schemas(batches.decode_all(records, zero_copy=not copy))
        except RustDaqError:
            raise
        except _RAW_DECODE_ERRORS:
            pass
        # A record (or a schema it needs) raised something decode_all does not count: decode
        # them one by one, so the others are delivered and that one is counted as undecodable.
        batches.not_arrow, batches.undecodable = counts
        out: list[tuple[str, pa.RecordBatch]] = []
        for rec in records:
            try:
                out.extend(batches.decode_all([rec], zero_copy=not copy))
            except RustDaqError:
                raise
            except _RAW_DECODE_ERRORS:
                batches.undecodable += 1
        return self._without_bad_schemas(out)

    def _without_bad_schemas(self, got: list[tuple[str, pa.RecordBatch]]) -> list[tuple[str, pa.RecordBatch]]:
        """`got` without batches whose schema has field names that are not UTF-8 (a corrupt
        schema table), counted as undecodable. Each schema is checked once."""
        checked: set[int] = self.__dict__.setdefault("_checked_schema_ids", set())
        bad: list[pa.Schema] = self.__dict__.setdefault("_bad_schemas", [])
        for schema_id, info in list(self._batches.state.by_id.items()):
            if schema_id not in checked:
                checked.add(schema_id)
                if not _names_decode(info.schema):
                    bad.append(info.schema)
        if not bad:
            return got
        kept = [(name, b) for name, b in got if not any(b.schema.equals(s) for s in bad)]
        self._batches.undecodable += len(got) - len(kept)
        return kept

    def batch_valid(self, batch: pa.RecordBatch) -> bool:
        """For a batch from ``read_batches(copy=False)``: False once the producer has reclaimed
        its space (discard what was computed from it). Check after using the data. True for
        batches that are copies."""
        entry = self._batches.views.get(id(batch))
        if entry is None or entry[0]() is not batch:
            return True
        return self._position_valid(entry[1])

    @property
    def undecodable(self) -> int:
        """Arrow records skipped because their payload did not decode (corruption)."""
        return self._batches.undecodable

    @property
    def not_arrow(self) -> int:
        """Records skipped by ``read_batches`` because they carry no Arrow schema."""
        return self._batches.not_arrow

    def read_table(self, stream: str, max_records: int | None = None, timeout: float = 0.0) -> pa.Table:
        """The available records of ``stream`` as one ``pyarrow.Table`` (copied out of the ring).
        Records of other streams read meanwhile are dropped: use a reader per stream. Raises
        UnknownStreamError."""
        info = _as_corrupt(
            f"{self.ring.path}: reading the stream schemas", lambda: self._batches.state.stream(stream)
        )
        _checked(info.schema, f"{self.ring.path}: stream {stream!r}")
        batches = [b for name, b in self.read_batches(max_records, timeout) if name == stream]
        if not batches:
            return info.schema.empty_table()
        schemas = {id(b.schema) for b in batches}
        if len(schemas) == 1 or all(b.schema.equals(batches[0].schema) for b in batches):
            return pa.Table.from_batches(batches)
        return pa.concat_tables([pa.Table.from_batches([b]) for b in batches], promote_options="default")

    def stream_reader(self, stream: str, *, timeout: float = 0.0, copy: bool = True) -> pa.RecordBatchReader:
        """The batches of ``stream`` from this reader's position as a ``pyarrow.RecordBatchReader``.
        It exports ``__arrow_c_stream__``, so polars, duckdb or arro3 consume it directly. It
        ends when no record arrives for ``timeout`` seconds (0: at the end of what the ring
        holds now). Raises UnknownStreamError; RingUsageError if the schema changes mid-read."""
        schema = _as_corrupt(
            f"{self.ring.path}: reading the stream schemas", lambda: self._batches.state.stream(stream).schema
        )
        _checked(schema, f"{self.ring.path}: stream {stream!r}")
        return pa.RecordBatchReader.from_batches(schema, batches_of(self, stream, schema, timeout, copy))

    def __repr__(self) -> str:
        return f"<RingReader of {self.ring.path!r} at {self.position} lost={self.lost}>"
