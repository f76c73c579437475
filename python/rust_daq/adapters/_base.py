"""The instrument protocols and the callable wrapper."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

__all__ = ["CallableInstrument", "Instrument", "PolledInstrument", "StreamingInstrument", "timestamps"]

TIMESTAMP = pa.field("timestamp", pa.timestamp("ns"), nullable=False, metadata={"units": "ns"})


@runtime_checkable
class PolledInstrument(Protocol):
    """An instrument the acquisition reads ``rate_hz`` times a second."""

    name: str
    schema: pa.Schema
    rate_hz: float

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def read(self) -> pa.RecordBatch: ...


@runtime_checkable
class StreamingInstrument(Protocol):
    """An instrument that pushes batches when it has them."""

    name: str
    schema: pa.Schema

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    def stream(self) -> AsyncIterator[pa.RecordBatch]: ...


Instrument = PolledInstrument | StreamingInstrument


def timestamps(ns: int | np.ndarray[Any, Any]) -> pa.Array:
    """An Arrow timestamp[ns] array from int64 nanoseconds since the epoch."""
    # (reshape, not atleast_1d: pyarrow takes ~190 µs for atleast_1d's view of a 0-d array)
    return pa.array(np.asarray(ns, dtype=np.int64).reshape(-1)).view(pa.timestamp("ns"))


class CallableInstrument:
    """Any function (plain or async) as a polled instrument. It returns a number (one column,
    ``column``), a mapping of column names to numbers, or a mapping of columns to equal-length
    arrays; each read becomes rows stamped with the time of the call.

    ``units`` maps column names to their units (stored in the schema, then in HDF5).
    """

    def __init__(
        self,
        fn: Callable[[], Any] | Callable[[], Awaitable[Any]],
        name: str,
        *,
        rate_hz: float = 10.0,
        column: str = "value",
        units: Mapping[str, str] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        self.name = name
        self.rate_hz = float(rate_hz)
        self._fn = fn
        self._column = column
        self._units = dict(units or {})
        self._clock = clock
        self.schema = pa.schema([TIMESTAMP])  # completed by the first read (connect)

    async def connect(self) -> None:
        sample = await self._call()
        cols = self._columns(sample)
        fields = [TIMESTAMP]
        for name, values in cols.items():
            md = {"units": self._units[name]} if name in self._units else None
            fields.append(pa.field(name, pa.array(values).type, metadata=md))
        self.schema = pa.schema(fields)

    async def close(self) -> None:
        return None

    async def _call(self) -> Any:
        out = self._fn()
        return await out if inspect.isawaitable(out) else out

    def _columns(self, sample: Any) -> dict[str, np.ndarray[Any, Any]]:
        if isinstance(sample, Mapping):
            return {str(k): _rows(v) for k, v in sample.items()}
        return {self._column: _rows(sample)}

    async def read(self) -> pa.RecordBatch:
        t = self._clock()
        cols = self._columns(await self._call())
        n = len(next(iter(cols.values())))
        arrays = [timestamps(np.full(n, t, dtype=np.int64))] + [
            pa.array(cols[f.name], type=f.type) for f in self.schema if f.name != "timestamp"
        ]
        return pa.record_batch(arrays, schema=self.schema)


def _rows(value: Any) -> np.ndarray[Any, Any]:
    """A value as rows: a scalar as one (np.atleast_1d's view of a 0-d array costs pyarrow
    ~190 µs to convert; a reshaped one ~5)."""
    a = np.asarray(value)
    return a.reshape(1) if a.ndim == 0 else a
