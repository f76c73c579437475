"""Live views for notebooks: :class:`LiveView`, the latest rows of one stream kept current.
Above the ring API (``_ring.py``): a LiveView is a reader, a decoder and a row window."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ._errors import RingUsageError
from ._records import RecordDecoder, SchemaTable
from ._window import RowWindow

if TYPE_CHECKING:
    import numpy.typing as npt

    from ._arrow import StreamInfo
    from ._ring import RingBuffer

__all__ = ["LiveView"]


class LiveView:
    """The latest `rows` rows of one stream as numpy arrays, kept current by `update()`.

    Made for notebooks: ``view = LiveView(ring, "voltmeter", rows=2000)``, then
    ``arrays = view.update()`` in a plotting loop. Only new records are decoded on each call.
    With ``copy=False`` (the default) an array views the ring when one batch covers the
    window (always for a window no larger than a batch), else it is a copy; ``valid()`` says
    whether the viewed records are still intact.
    """

    def __init__(self, ring: RingBuffer, stream: str, rows: int = 1000, *, copy: bool = False) -> None:
        self._window = RowWindow(rows)
        self._ring = ring
        self._reader = ring.reader("oldest")
        self._decoder = RecordDecoder(SchemaTable(ring))
        self._stream = stream
        self._copy = copy

    @property
    def undecodable(self) -> int:
        """Records of the stream that did not decode (skipped)."""
        return self._decoder.undecodable

    def update(self, timeout: float = 0.0) -> dict[str, npt.NDArray[Any]]:
        """Reads what arrived since the last call (waiting up to `timeout` s for something)
        and returns the latest rows, one array per column (tensor columns as (N, ...))."""
        info = self._advance(timeout)
        out = self._window.arrays(info.schema)
        if self._copy:
            out = {k: np.array(v, copy=True) for k, v in out.items()}
        return out

    def update_table(self, timeout: float = 0.0, *, attempts: int = 10) -> pa.Table:
        """As :meth:`update`, but the latest rows as one Arrow table (types, field metadata and
        tensor columns as written), always a copy: intact however long it is kept. A copy the
        producer tore (it overwrote the records meanwhile) is made again, up to `attempts`
        times; then RingUsageError."""
        for _ in range(attempts):
            info = self._advance(timeout)
            table = self._window.table(info.schema)
            copied = table.take(pa.array(np.arange(table.num_rows, dtype=np.int64)))
            if self.valid():
                return copied
            timeout = 0.0
        raise RingUsageError(
            f"the producer overwrote the latest rows of {self._stream!r} {attempts} times while "
            "they were copied; the ring is too small for this many rows"
        )

    def _advance(self, timeout: float) -> StreamInfo:
        info = self._decoder.schemas.stream(self._stream)
        self._window.fill(self._reader, self._decoder, info.stream_id, timeout)
        return info

    def valid(self) -> bool:
        """Whether every record in the window is still intact in the ring."""
        return self._window.valid()
