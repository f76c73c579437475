"""The one read path: ring records to Arrow batches, and what a reader lost.

Every consumer of a ring (``RingReader.read_batches``, :class:`~rust_daq.LiveView`, the HDF5
writer, the Flight subscription, the remote reader, any later transport) reads records the
same way, with these three parts:

- :class:`SchemaTable`: a read-only cache of the ring's schema table (docs/ring-format.md,
  "Schema region"). An entry that does not decode is set aside (``bad_ids``), never hiding
  the others.
- :class:`RecordDecoder`: one record to one :class:`Decoded` batch. Plain records (schema id
  0) are counted in ``not_arrow``; a record whose schema is unknown or whose payload does not
  decode is counted in ``undecodable`` and reported with the reason, never raised: one bad
  record must not stop a reader.
- :class:`LossAccount`: records (and, where a source of row positions exists, rows) lost per
  stream, from the gaps in the per-stream sequence numbers (``stream_seq``).

Depends on ``_native`` and ``_arrow`` only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from . import _native
from ._arrow import StreamInfo, empty_batch, variable_length
from ._errors import RingCorruptError, RustDaqError, UnknownStreamError

__all__ = [
    "DECODE_ERRORS",
    "Decoded",
    "LossAccount",
    "RecordDecoder",
    "SchemaTable",
    "StreamLoss",
    "decode",
    "decode_buffer",
]

#: What decoding a corrupted payload or schema can raise (pyarrow raises all of these).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    pa.ArrowException,
    ValueError,
    OSError,
    EOFError,
    IndexError,
    KeyError,
    OverflowError,
    TypeError,
)


def names_decode(t: pa.Schema | pa.DataType) -> bool:
    """Whether every field name in `t` (nested ones too) is UTF-8. pyarrow decodes a schema
    with undecodable names and raises UnicodeDecodeError only when a name is used later."""
    try:
        fields = list(t) if isinstance(t, pa.Schema) else [t.field(i) for i in range(t.num_fields)]
        return all(isinstance(f.name, str) and names_decode(f.type) for f in fields)
    except UnicodeDecodeError:
        return False


class SchemaTable:
    """The ring's schema table, decoded once per entry (the table only grows)."""

    def __init__(self, ring: _native.RingBuffer) -> None:
        self.ring = ring
        self.by_id: dict[int, StreamInfo] = {}
        self.bad_ids: set[int] = set()  # entries that do not decode (a corrupt ring file)
        self.next_id = 1  # the first schema id not loaded yet

    def refresh(self) -> None:
        """Loads the entries not seen yet (the table only grows: a ring of 10,000 streams
        is not read 10,000 times over). An entry that does not decode (bytes, names that are
        not UTF-8, types pyarrow cannot hold) goes to ``bad_ids``: it must not hide the others."""
        first = self.next_id
        for schema_id, stream_id, name, raw, _activation in self.ring._schemas(first):
            self.next_id = max(self.next_id, schema_id + 1)
            if schema_id not in self.by_id and schema_id not in self.bad_ids:
                try:
                    schema = pa.ipc.read_schema(pa.py_buffer(raw))
                    if not names_decode(schema):
                        raise ValueError("a field name is not UTF-8")
                    probe = empty_batch(schema)  # types pyarrow cannot hold raise now, not later
                    [probe.column(i) for i in range(probe.num_columns)]
                except DECODE_ERRORS:
                    self.bad_ids.add(schema_id)
                    continue
                full = any(variable_length(f.type) for f in schema)
                self.by_id[schema_id] = StreamInfo(name, stream_id, schema_id, schema, full)

    def info(self, schema_id: int) -> StreamInfo | None:
        """The entry of `schema_id`; None if the table has none that decodes."""
        if schema_id not in self.by_id and schema_id >= self.next_id:
            self.refresh()
        return self.by_id.get(schema_id)

    def streams(self) -> dict[str, StreamInfo]:
        """The current schema of every stream (the one the producer switched to last).
        Raises RingCorruptError when an entry does not decode (which stream's current schema
        it held cannot be known)."""
        self.refresh()
        if self.bad_ids:
            raise RingCorruptError(
                f"{self.ring.path}: the ring's schema table entries {sorted(self.bad_ids)} do not decode "
                "(corrupt ring file)"
            )
        activations = self.ring._schema_activations()

        def activation(info: StreamInfo) -> int:
            i = info.schema_id - 1
            return activations[i] if 0 <= i < len(activations) else 0

        latest: dict[str, StreamInfo] = {}
        for info in sorted(self.by_id.values(), key=activation):
            latest[info.name] = info
        return latest

    def stream(self, name: str) -> StreamInfo:
        """The current entry of stream `name`; UnknownStreamError lists the known streams."""
        streams = self.streams()
        if name not in streams:
            known = ", ".join(repr(s) for s in streams) or "none yet"
            raise UnknownStreamError(f"unknown stream {name!r}; the ring's streams: {known}")
        return streams[name]


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


_read_batch, _buffer = pa.ipc.read_record_batch, pa.py_buffer  # (per record: no attribute lookups)

#: :attr:`Decoded.error` of a private copy the producer overwrote while it was made.
TORN = "overwritten in the ring while it was copied"


@dataclass(slots=True)  # (not frozen: a frozen dataclass costs 1 µs more per record)
class Decoded:
    """One Arrow record, decoded, or why it could not be: ``batch`` is None and ``error`` says
    why (``info`` is None too when the record's schema is not in the table)."""

    record: _native.Record
    info: StreamInfo | None
    batch: pa.RecordBatch | None
    error: str | None = None


class RecordDecoder:
    """Decodes ring records into Arrow batches and counts what it skips.

    ``copy=True``: each batch is decoded from a private copy of its payload, taken while the
    record is known intact (for batches that outlive the read, e.g. sent over the network
    after the reader moved on); a copy the producer tore is reported with ``error`` =
    :data:`TORN`, not counted as undecodable (the reader lost it: its stream shows a gap).
    """

    def __init__(self, schemas: SchemaTable, *, copy: bool = False) -> None:
        self.schemas = schemas
        self._by_id = schemas.by_id  # (the same dict, looked up once per record)
        self.copy = copy
        self.not_arrow = 0  #: plain records (schema id 0) skipped
        self.undecodable = 0  #: Arrow records whose schema or payload did not decode

    def info(self, rec: _native.Record) -> StreamInfo | None:
        """The schema-table entry of an Arrow record; None if the table has none that decodes."""
        try:
            return self.schemas.info(rec.schema_id)
        except RustDaqError:
            raise
        except DECODE_ERRORS:
            return None

    def decode(
        self,
        rec: _native.Record,
        *,
        stream_id: int | None = None,
        wanted: Callable[[StreamInfo], bool] | None = None,
    ) -> Decoded | None:
        """`rec` decoded. None (and nothing counted) for a record of another stream than
        `stream_id`, or one whose stream `wanted` rejects; None for a plain record (counted
        in ``not_arrow``)."""
        if stream_id is not None and rec.stream != stream_id:
            return None
        info = self._by_id.get(rec.schema_id)  # (schema id 0 is never in the table)
        if info is None:
            if rec.schema_id == 0:
                self.not_arrow += 1
                return None
            info = self.info(rec)  # a schema registered since, or one that does not decode
            if info is None:
                self.undecodable += 1
                return Decoded(
                    rec, None, None, f"schema id {rec.schema_id} is not in the ring's schema table"
                )
        if wanted is not None and not wanted(info):
            return None
        try:
            if self.copy:
                data = bytes(rec.data)
                if not rec.valid():
                    return Decoded(rec, info, None, TORN)
                batch = decode_buffer(data, info)
            elif info.full_validation and rec.zero_copy:
                batch = decode_buffer(bytes(rec.data), info)  # (see decode)
            else:
                batch = _read_batch(_buffer(rec.data), info.schema)
                batch.validate(full=info.full_validation)
        except RustDaqError:
            raise
        except DECODE_ERRORS as e:
            self.undecodable += 1
            return Decoded(rec, info, None, f"does not decode with its stream's schema: {e}")
        return Decoded(rec, info, batch)


@dataclass(slots=True)
class StreamLoss:
    """What one reader lost of one stream."""

    #: The ``stream_seq`` the stream's next record should carry; None before its first record.
    next_seq: int | None = None
    #: Records of the stream lost (sequence numbers that never arrived).
    records: int = 0
    #: Rows they held; None once unknown (records were lost whose rows no source knows).
    rows: int | None = 0
    #: The stream's row index the next record should start at, where known.
    next_row: int | None = None


class LossAccount:
    """Records and rows lost per stream, from the gaps in the per-stream sequence numbers.

    A reader that receives a stream's record ``stream_seq = s`` after ``t`` lost ``s - t - 1``
    of that stream's records (the ring format's rule). Rows are known only where something
    gives each record's row index within its stream (``rows_before``: the daemon's
    :class:`~rust_daq.acquisition.RowIndex`, or a Flight batch's metadata); a gap whose rows
    no one knows makes ``rows`` None from then on.
    """

    def __init__(self) -> None:
        self.streams: dict[Hashable, StreamLoss] = {}

    def start(
        self, key: Hashable, next_seq: int | None, records: int = 0, rows: int | None = 0
    ) -> StreamLoss:
        """Sets where stream `key` is (a writer resuming a file, a reader whose losses started
        before its first record) and returns its account."""
        loss = self.streams[key] = StreamLoss(next_seq, records, rows)
        return loss

    def observe(
        self, key: Hashable, stream_seq: int | None, rows: int = 0, rows_before: int | None = None
    ) -> int:
        """Accounts for a record of stream `key` with `rows` rows; returns the records lost just
        before it. ``stream_seq`` None (a record without a per-stream number) counts no records,
        only rows where ``rows_before`` says them."""
        loss = self.streams.get(key)
        if loss is None:
            loss = self.streams[key] = StreamLoss()
        gap = 0
        if stream_seq is not None:
            if stream_seq == loss.next_seq and rows_before is None:  # nothing lost, no rows known
                loss.next_seq = stream_seq + 1
                loss.next_row = None
                return 0
            if loss.next_seq is not None and stream_seq > loss.next_seq:
                gap = stream_seq - loss.next_seq
            loss.next_seq = stream_seq + 1
            loss.records += gap
        if rows_before is None:
            if gap:
                loss.rows = None  # the lost records' rows are no longer known
            loss.next_row = None
        else:
            if loss.next_row is not None and loss.rows is not None:
                loss.rows += max(rows_before - loss.next_row, 0)
            elif gap:
                loss.rows = None
            loss.next_row = rows_before + rows
        return gap

    def caught_up(self, key: Hashable, first: int | None, last: int | None, count: int) -> bool:
        """Accounts for `count` records of stream `key` numbered `first`..`last` in one step, if
        that is all of them with none lost (the common case: the read had no gap in the ring's
        sequence and no stream's numbering jumped); returns False, changing nothing, if not
        (then :meth:`observe` each record)."""
        loss = self.streams.get(key)
        if first is None or last is None:
            return False
        expected = first if loss is None or loss.next_seq is None else loss.next_seq
        if first != expected or last - first + 1 != count:
            return False
        if loss is None:
            loss = self.streams[key] = StreamLoss()
        loss.next_seq = last + 1
        loss.next_row = None
        return True

    def records(self, key: Hashable) -> int:
        loss = self.streams.get(key)
        return 0 if loss is None else loss.records

    def rows(self, key: Hashable) -> int | None:
        loss = self.streams.get(key)
        return 0 if loss is None else loss.rows


class LossTotals:
    """``lost_records``, ``lost_rows`` and ``lost_by_stream()`` of a live reader that keeps a
    :class:`LossAccount` (``_loss``, by stream name) under a lock (``_cond``): the remote
    readers of Flight and JetStream."""

    _loss: LossAccount
    _cond: threading.Condition

    @property
    def lost_records(self) -> int:
        """Records lost upstream, all streams, up to what was received."""
        return sum(lost for lost, _ in self.lost_by_stream().values())

    @property
    def lost_rows(self) -> int | None:
        """Rows in those records; None if unknown for some of them."""
        rows = [r for _, r in self.lost_by_stream().values()]
        return None if any(r is None for r in rows) else sum(r for r in rows if r is not None)

    def lost_by_stream(self) -> dict[str, tuple[int, int | None]]:
        """Per stream: (records lost, rows lost or None)."""
        with self._cond:
            return {str(name): (loss.records, loss.rows) for name, loss in self._loss.streams.items()}


class BatchReads:
    """``read_batches`` and ``read_table`` of a live reader, over its ``read()`` (items with
    ``stream`` and ``batch``) and ``_schema_of(stream)`` (the stream's schema when nothing of
    it was read; UnknownStreamError for a stream there is none of): the remote readers of
    Flight and JetStream."""

    def read(self, max_records: int | None = None, timeout: float = 0.0) -> Sequence[Any]:
        raise NotImplementedError

    def _schema_of(self, stream: str) -> pa.Schema:
        raise NotImplementedError

    def read_batches(
        self, max_records: int | None = None, timeout: float = 0.0
    ) -> list[tuple[str, pa.RecordBatch]]:
        """``(stream name, RecordBatch)`` pairs received so far, like ``RingReader.read_batches``."""
        return [(b.stream, b.batch) for b in self.read(max_records, timeout)]

    def read_table(self, stream: str, max_records: int | None = None, timeout: float = 0.0) -> pa.Table:
        """The batches of `stream` received so far as one table (empty, of its schema, if
        none; batches on both sides of a schema change promoted to one schema); batches of
        other streams read meanwhile are dropped (use a reader per stream). Raises
        UnknownStreamError for a stream there is none of."""
        batches = [b for name, b in self.read_batches(max_records, timeout) if name == stream]
        if batches:
            if all(b.schema.equals(batches[0].schema) for b in batches):
                return pa.Table.from_batches(batches)
            tables = [pa.Table.from_batches([b]) for b in batches]
            return pa.concat_tables(tables, promote_options="default")
        return pa.Table.from_batches([empty_batch(self._schema_of(stream))])
