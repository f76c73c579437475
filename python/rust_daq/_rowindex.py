"""The producer's row index (:class:`RowIndex`): rows of each stream written before each
record, shared with the daemon's Flight process as an anonymous file (its readers:
:class:`RowTableReader`). Re-exported by :mod:`rust_daq.acquisition`, whose loop writes
through it."""

from __future__ import annotations

import threading

import pyarrow as pa

from . import _native
from ._ring import RingBuffer

__all__ = ["RowIndex", "RowTableReader"]


class RowIndex:
    """Rows of each stream written before each record, for the records a ring can hold.

    A subscriber that the producer lapped knows from the sequence numbers how many records it
    lost, but not how many rows they held: they are gone. The producer knows. Every write
    goes through :meth:`write`, which notes, under the record's sequence number, how many
    rows its stream had before it; a subscriber that gets record ``s`` of a stream after
    having had rows up to ``r`` lost ``rows_before(s) - r`` rows. Sized for the most
    records the ring can hold (a record takes at least 128 bytes; at most 2^20 records, 16
    MiB of index), so the entry of any record still in the ring is there. Thread-safe: one
    lock around each write.

    The table is shared memory (:class:`~rust_daq._native.RowTable`, an anonymous file):
    :attr:`fd` passed to another process and :meth:`attach` there give its readers (the
    daemon's Flight process) the same ``rows_before``, without a file anyone could open.
    """

    def __init__(self, ring: RingBuffer) -> None:
        self.ring = ring
        self._table = _native.RowTable(min(max(1024, ring.capacity // 128), 1 << 20))
        self.rows: dict[str, int] = {}  # rows written per stream
        self.lock = threading.Lock()

    @property
    def fd(self) -> int:
        """The table's descriptor, for another process's :meth:`attach` (open while this lives)."""
        return self._table.fd

    @staticmethod
    def attach(fd: int) -> RowTableReader:
        """The ``rows_before`` of a RowIndex in another process, from its :attr:`fd`."""
        return RowTableReader(_native.RowTable.from_fd(fd))

    def write(self, batch: pa.RecordBatch, stream: str) -> int:
        """Writes `batch` to `stream` (``write_arrow_batch``), noting its rows. Returns its seq."""
        with self.lock:
            before = self.rows.get(stream, 0)
            seq = self.ring.records_written  # ours: this handle is the only producer
            # Noted before the record is committed: a reader that has the record finds it.
            self._table.note(seq, before)
            got = self.ring.write_arrow_batch(batch, stream)
            if got != seq:  # (a table of several batches: the later ones are not indexed)
                self._table.clear(seq)
            self.rows[stream] = before + batch.num_rows
            return got

    def rows_before(self, seq: int) -> int | None:
        """Rows of its stream written before record `seq`; None if not known (overwritten in
        the index, or written by another producer)."""
        return self._table.rows_before(seq) if seq >= 0 else None


class RowTableReader:
    """``rows_before`` of a :class:`RowIndex` written in another process."""

    def __init__(self, table: _native.RowTable) -> None:
        self._table = table

    def rows_before(self, seq: int) -> int | None:
        return self._table.rows_before(seq) if seq >= 0 else None
