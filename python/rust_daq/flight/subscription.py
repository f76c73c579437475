"""A live subscription of the Flight service (``do_get`` of a stream): its records read
from the ring with its own cursor, decoded (once for all the subscriptions of the stream:
:class:`SharedDecodes`), each as a batch of its own or, for a ticket with ``coalesce_ms``,
consecutive ones together; what it lost counted from the stream's sequence numbers and
the producer's row index. :mod:`.server` serves them; the wire format is :mod:`.protocol`'s.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import pyarrow as pa
import pyarrow.flight as fl

from .._arrow import StreamInfo
from .._records import LossAccount, RecordDecoder, SchemaTable
from .._ring import RingBuffer, RingReader
from .protocol import SCHEMA_CHANGED, BatchMeta, RecordMeta, Ticket, error

__all__ = ["Counters", "RingSide", "RowsBefore", "SharedDecodes", "Subscription", "first_record"]

_READ_RECORDS = 256  # records per ring read in a subscription
_POLL = 0.1  # seconds a subscription waits for data before checking for cancellation
_COALESCE_RECORDS = 256  # records a coalescing subscription sends together, at most
_COALESCE_BYTES = 1 << 20  # and their bytes (a record bigger than this goes alone)


class RingSide(Protocol):
    """What serving streams needs: the ring, the producer's row index (``rows_before``), and
    an event set when the daemon stops (subscriptions then end at the last record)."""

    @property
    def ring(self) -> RingBuffer: ...
    @property
    def row_index(self) -> RowsBefore: ...
    @property
    def stopping(self) -> threading.Event: ...


class RowsBefore(Protocol):
    def rows_before(self, seq: int) -> int | None: ...


class Counters:
    """The service's subscribers and the rows it sent, for ``status``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.subscribers = 0
        self.rows_sent = 0

    def started(self) -> None:
        with self._lock:
            self.subscribers += 1

    def ended(self) -> int:
        """One fewer; returns how many are left."""
        with self._lock:
            self.subscribers -= 1
            return self.subscribers

    def sent(self, rows: int) -> None:
        with self._lock:
            self.rows_sent += rows


class Subscription:
    """One ``do_get`` of a live stream: `reader` (positioned where the ticket says), with
    `pending`, the records it read already (see :func:`first_record`), given first; the
    batches have `schema`, the stream's records of another end it (``schema_changed``).
    `check_daemon` raises when the daemon died (not stopped)."""

    def __init__(
        self,
        side: RingSide,
        ticket: Ticket,
        state: SchemaTable,
        stream_id: int,
        schema: pa.Schema,
        reader: RingReader,
        pending: list[Any],
        *,
        decodes: SharedDecodes,
        counters: Counters,
        check_daemon: Callable[[], None],
    ) -> None:
        self.side, self.ticket, self.stream_id, self.schema = side, ticket, stream_id, schema
        self.reader, self.pending = reader, pending
        self.decodes, self.counters, self.check_daemon = decodes, counters, check_daemon
        # Our own copies: gRPC sends a batch after this generator moves on. A copy torn by the
        # producer is lost (a gap before the next record); an undecodable record, counted by
        # the writer, is skipped.
        self.decoder = RecordDecoder(state, copy=True)
        self.account = LossAccount()
        self.lost = self.account.start(stream_id, None)  # this subscription's losses

    def batches(self, context: fl.ServerCallContext) -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
        """The stream's batches and their metadata, until the daemon stops (or the client
        cancels, or the stream's schema changes: ``schema_changed``)."""
        t, schema, reader, ring = self.ticket, self.schema, self.reader, self.side.ring
        pending, self.pending = self.pending, []
        # Decoded one at a time as gRPC takes them: a subscriber that does not read holds at
        # most a batch's copies here, not a ring read's.
        window = None if t.coalesce_ms is None else t.coalesce_ms / 1000
        group: list[_Sent] = []  # coalescing: records not sent yet (copies, safe from laps)
        size = 0
        hold = 0.0  # (monotonic) when the group goes out at the latest
        self.counters.started()
        try:
            while not context.is_cancelled():
                self.check_daemon()
                # In place: only this stream's records are copied (below), not the others'.
                # Stopping: no long wait at the end of what was written.
                stopping = self.side.stopping.is_set()
                timeout = 0.01 if stopping else _POLL
                if group and not stopping:  # held for the window: sleep to its end
                    time.sleep(min(max(hold - time.monotonic(), 0.0), _POLL))
                    timeout = 0.0
                if pending:
                    records, pending = pending, []
                else:
                    records = reader.read(max_records=_READ_RECORDS, timeout=timeout, copy=False)
                changed = None
                for info, sent in self._decoded(records):
                    if not info.schema.equals(schema, check_metadata=True):
                        changed = schema_changed(info, sent)
                        break
                    if window is None:
                        yield self._batch([sent])
                        continue
                    if group and (len(group) >= _COALESCE_RECORDS or size + sent.nbytes > _COALESCE_BYTES):
                        yield self._batch(group)
                        group, size = [], 0
                    if not group:
                        hold = time.monotonic() + window
                    group.append(sent)
                    size += sent.nbytes
                if group and (
                    changed is not None
                    or stopping
                    or len(records) >= _READ_RECORDS  # (behind: no reason to wait)
                    or time.monotonic() >= hold
                ):
                    yield self._batch(group)
                    group, size = [], 0
                if changed is not None:
                    raise changed
                if not records and not group and stopping and reader.position >= ring.status()["write_head"]:
                    self.check_daemon()  # (died, not stopped: not the end a stop sends)
                    return  # the daemon stops: everything written has been sent
        finally:
            if not self.counters.ended():
                self.decodes.clear()  # (nobody to share them with)

    def _decoded(self, records: list[Any]) -> Iterator[tuple[StreamInfo, _Sent]]:
        """The records of the subscription's stream among `records`, one at a time, decoded,
        with their row index and their stream's info (its schema may have changed); a record
        another subscription decoded already is its copy."""
        rows, shared, t, stream_id, decoder = (
            self.side.row_index,
            self.decodes,
            self.ticket,
            self.stream_id,
            self.decoder,
        )
        for rec in records:
            if rec.stream != stream_id or (t.after_seq is not None and rec.seq <= t.after_seq):
                continue
            # One decodes, the others woken by the same record wait for it (those of other
            # streams never: a lock per stream).
            with shared.lock(stream_id):
                hit = shared.get(rec.seq)
                if hit is None:
                    d = decoder.decode(rec, stream_id=stream_id)
                    if d is None or d.info is None or d.batch is None:
                        continue  # (another stream's; undecodable; torn: a gap)
                    before = rows.rows_before(rec.seq)
                    hit = (
                        d.info,
                        _Sent(rec.seq, rec.stream_seq, rec.timestamp_ns, d.batch, before, len(rec)),
                    )
                    shared.put(rec.seq, hit)
            yield hit

    def _batch(self, group: list[_Sent]) -> tuple[pa.RecordBatch, pa.Buffer]:
        """One wire batch of `group` (consecutive records of the stream) and its metadata."""
        lost = self.lost
        for r in group:
            self.account.observe(self.stream_id, r.stream_seq, r.batch.num_rows, r.rows_before)
        first = group[0]
        if len(group) == 1:
            batch, each = first.batch, None
        else:
            batch = concat([r.batch for r in group])
            each = [
                RecordMeta(r.seq, r.stream_seq, r.timestamp_ns, r.batch.num_rows, r.rows_before)
                for r in group
            ]
        self.counters.sent(batch.num_rows)
        meta = BatchMeta(
            first.seq, first.stream_seq, first.timestamp_ns, lost.records, lost.rows, first.rows_before, each
        )
        return batch, meta.encode()


class _Sent(NamedTuple):
    """A record a subscription sends: its numbers, its batch (a private copy), its stream's
    rows before it, and its size in the ring."""

    seq: int
    stream_seq: int | None
    timestamp_ns: int
    batch: pa.RecordBatch
    rows_before: int | None
    nbytes: int


class SharedDecodes:
    """The latest records the subscriptions decoded, by ring sequence number, for the other
    subscriptions of their stream: 50 subscribers of one stream decoded each record 50
    times, the most of what serving them cost. A sequence number names one write of one
    record (a lapped slot holds a later number), so a decoded copy stands for it as long as
    it is kept: at most `max_records` and `max_bytes`, the oldest dropped first."""

    def __init__(self, max_records: int = 4096, max_bytes: int = 64 << 20) -> None:
        self._items: OrderedDict[int, tuple[StreamInfo, _Sent]] = OrderedDict()
        self._bytes = 0
        self._max_records, self._max_bytes = max_records, max_bytes
        self._lock = threading.Lock()  # (the items)
        self._streams: dict[int, threading.Lock] = {}

    def lock(self, stream_id: int) -> threading.Lock:
        """Held while looking up a record of the stream and decoding it if missing: the
        subscriptions woken by the same record decode it once."""
        with self._lock:
            lock = self._streams.get(stream_id)
            if lock is None:
                lock = self._streams[stream_id] = threading.Lock()
            return lock

    def get(self, seq: int) -> tuple[StreamInfo, _Sent] | None:
        with self._lock:
            return self._items.get(seq)

    def put(self, seq: int, item: tuple[StreamInfo, _Sent]) -> None:
        with self._lock:
            if seq in self._items:
                return
            self._items[seq] = item
            self._bytes += item[1].nbytes
            while len(self._items) > self._max_records or (
                self._bytes > self._max_bytes and len(self._items) > 1
            ):
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_PEEK_RECORDS = 1 << 16  # records a subscription's start looks through for its stream's first


def first_record(reader: RingReader, after_seq: int | None, stream_id: int) -> tuple[Any, list[Any]]:
    """The first record of the stream that `reader` would give (after `after_seq`), among
    those in the ring now (the first _PEEK_RECORDS), or None; and the records read to find
    it (views: a lapped one is lost when it is decoded, as any would be)."""
    seen: list[Any] = []
    while len(seen) < _PEEK_RECORDS:
        records = reader.read(max_records=4096, timeout=0.0, copy=False)
        if not records:
            break
        seen += records
        for rec in records:
            if rec.stream == stream_id and (after_seq is None or rec.seq > after_seq):
                return rec, seen
    return None, seen


def concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """`batches` (of one schema) as one batch: ``pa.concat_batches`` where pyarrow has it (19
    and later), through a table before."""
    concat = getattr(pa, "concat_batches", None)
    if concat is not None:
        return concat(batches)
    out = pa.Table.from_batches(batches).combine_chunks().to_batches()
    return out[0] if len(out) == 1 else batches[0].slice(0, 0)  # (none: no rows in any)


def schema_changed(info: StreamInfo, sent: _Sent) -> fl.FlightError:
    return error(
        SCHEMA_CHANGED,
        f"stream {info.name!r} changed its schema at record {sent.seq}; subscribe "
        f'again (ticket {{"stream": ..., "after_seq": {sent.seq - 1}}} resumes here)',
        stream=info.name,
        after_seq=sent.seq - 1,
    )
