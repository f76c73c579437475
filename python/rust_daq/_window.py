"""The latest rows of one stream: a window over the newest decoded records, shared by
``RingBuffer.latest`` (one call) and :class:`~rust_daq.LiveView` (kept current)."""

from __future__ import annotations

import operator
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import _native
from ._arrow import _empty, _to_numpy
from ._records import RecordDecoder

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["RowWindow"]

_READ = 1024  # records per read while catching up


class RowWindow:
    """The newest records of one stream holding at least `rows` rows (zero-copy batches)."""

    def __init__(self, rows: int) -> None:
        try:
            n = operator.index(rows)  # (numpy integers too)
        except TypeError:
            n = 0
        if isinstance(rows, bool) or n <= 0:
            raise ValueError(f"rows must be a positive integer, got {rows!r}")
        self.rows = n
        self.window: deque[tuple[pa.RecordBatch, _native.Record]] = deque()
        self.nrows = 0

    def fill(
        self, reader: _native.RingReader, decoder: RecordDecoder, stream_id: int, timeout: float
    ) -> None:
        """Reads what `reader` has (waiting up to `timeout` s for something), keeps the
        newest batches of `stream_id`, and drops records the producer overwrote meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            records = reader.read(copy=False, timeout=max(deadline - time.monotonic(), 0.0))
            for rec in records:
                d = decoder.decode(rec, stream_id=stream_id)
                if d is None or d.batch is None:
                    continue  # (undecodable: counted; one bad record must not fail every later update)
                self.window.append((d.batch, rec))
                self.nrows += d.batch.num_rows
                while self.window and self.nrows - self.window[0][0].num_rows >= self.rows:
                    self.nrows -= self.window.popleft()[0].num_rows
            if len(records) < _READ:
                break
        while self.window and not self.window[0][1].valid():
            self.nrows -= self.window.popleft()[0].num_rows  # overwritten meanwhile

    def valid(self) -> bool:
        """Whether every record in the window is still intact in the ring."""
        return all(rec.valid() for _, rec in self.window)

    def _current(self) -> list[pa.RecordBatch]:
        """The window's batches of the stream's newest schema (a schema change starts anew)."""
        batches = [b for b, _ in self.window]
        schema = batches[-1].schema
        k = len(batches)
        while k > 0 and batches[k - 1].schema.equals(schema, check_metadata=True):
            k -= 1
        return batches[k:]

    def table(self, schema: pa.Schema) -> pa.Table:
        """The latest rows as a table over the window's batches (zero-copy); `schema`'s empty
        table if there are none."""
        if not self.window:
            return schema.empty_table()
        table = pa.Table.from_batches(self._current())
        return table.slice(max(table.num_rows - self.rows, 0))

    def arrays(self, schema: pa.Schema) -> dict[str, npt.NDArray[Any]]:
        """The latest rows, one numpy array per column (tensor columns as (N, ...)): a view of
        the ring when one batch holds them, else a copy."""
        if not self.window:
            return {f.name: _to_numpy(_empty(f.type)) for f in schema}
        last = self.window[-1][0]
        if last.num_rows >= min(self.rows, self.nrows):  # one batch holds them: a view
            window = last.slice(max(last.num_rows - self.rows, 0))
            cols = {name: window.column(name) for name in window.schema.names}
        else:
            table = self.table(schema)
            cols = {name: table.column(name).combine_chunks() for name in table.schema.names}
        return {name: _to_numpy(col) for name, col in cols.items()}
