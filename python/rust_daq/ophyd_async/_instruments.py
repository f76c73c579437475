"""ophyd-async signals and devices as rust-daq instruments.

    sig = soft_signal_rw(float, name="temperature", units="K")
    motor = SimMotor(name="motor")                      # connected by init_devices
    instruments = [
        SignalInstrument(sig),                          # every update one row (monitor)
        SignalInstrument(image, "poll", rate_hz=10),    # read 10 times a second
        ReadableInstrument(motor, rate_hz=100),         # a device's read(), one row per read
    ]
    async with Acquisition(ring, instruments) as acq:
        await acq.run(duration=10)

The schema comes from ``describe()`` at ``connect()`` (the type mapping is in
``_columns.py``: scalars, strings and enums, n-D arrays as ``fixed_shape_tensor`` with one frame
per row, Tables as structs; units, source, precision, limits and choices in the field
metadata, the whole ``describe()`` as JSON in the schema metadata, key
``ophyd_async.describe``). Every row's ``timestamp`` is the Reading's own (ns since the epoch),
never the time of the poll. A key that has no column raises :class:`~rust_daq.SignalTypeError`
at ``connect()``, a reading that does not match its description at read time: nothing is
skipped or truncated.

The devices are the caller's: connect them first (``init_devices`` or ``await
device.connect()``); ``connect()`` here describes them, it does not connect them. All of it
runs on the event loop ophyd-async runs on (asyncio).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, overload

import numpy as np
import pyarrow as pa

try:
    from ophyd_async.core import AsyncReadable, SignalR
except ImportError as e:  # the optional extra
    raise ImportError("rust_daq.ophyd_async needs ophyd-async: pip install 'rust-daq[bluesky]'") from e

from .._errors import SignalTypeError
from ..adapters import timestamps
from ._columns import Column, needs_sample, timestamps_ns

__all__ = ["MonitoredSignalInstrument", "PolledSignalInstrument", "ReadableInstrument", "SignalInstrument"]

TIMESTAMP = pa.field("timestamp", pa.timestamp("ns"), nullable=False, metadata={"units": "ns"})
#: Rows a monitor's batch holds at most, in bytes (Acquisition's default ``max_batch_bytes``).
_MAX_BATCH_BYTES = 4 << 20
_MAX_BATCH_ROWS = 10_000

Mode = Literal["monitor", "poll"]


def _rate(rate_hz: Any) -> float:
    if isinstance(rate_hz, bool) or not isinstance(rate_hz, int | float) or not (0 < rate_hz < math.inf):
        raise ValueError(f"rate_hz must be a positive number of reads per second, got {rate_hz!r}")
    return float(rate_hz)


def _describe_metadata(describe: Mapping[str, Any]) -> dict[str, str]:
    return {"ophyd_async.describe": json.dumps(describe, default=str, sort_keys=True)}


def _stamp_metadata(dk: Mapping[str, Any]) -> dict[str, str]:
    source = dk.get("source")
    return {"units": "ns", "source": str(source)} if source is not None else {"units": "ns"}


def _target(signal: Any, mode: Any, rate_hz: Any) -> type[SignalInstrument]:
    """The class a SignalInstrument(signal, mode, rate_hz) is, or the error that says why none."""
    if not isinstance(signal, SignalR):
        hint = " (a device: use ReadableInstrument)" if isinstance(signal, AsyncReadable) else ""
        raise TypeError(
            f"SignalInstrument needs a readable ophyd-async signal (SignalR), got {signal!r}{hint}"
        )
    if mode == "poll":
        if rate_hz is None:
            raise ValueError("mode='poll' needs rate_hz (reads per second, > 0)")
        _rate(rate_hz)
        return PolledSignalInstrument
    if mode == "monitor":
        if rate_hz is not None:
            raise ValueError(
                f"mode='monitor' takes no rate_hz (got {rate_hz!r}): the signal's updates set the "
                "rate; use mode='poll' to read it at a fixed rate"
            )
        return MonitoredSignalInstrument
    raise ValueError(f"mode must be 'monitor' or 'poll', got {mode!r}")


class SignalInstrument:
    """One ophyd-async signal as an instrument; its stream is named after the signal (or
    `name`) and has two columns, ``timestamp`` (the Reading's) and ``value``.

    ``mode="monitor"`` (default): every update the signal's subscription delivers is one row,
    the current value at ``connect()`` first; updates that arrive between two batches go out
    together; none is dropped (updates arriving after ``connect()`` and before a run are
    kept for it). ``mode="poll"``: ``read(cached=False)`` ``rate_hz`` times a second.

    The object is a :class:`MonitoredSignalInstrument` (a streaming instrument: ``stream()``)
    or a :class:`PolledSignalInstrument` (``read()``, ``rate_hz``), so the acquisition
    dispatches on it like on any instrument. Raises ValueError (a mode and rate that do not
    go together, no name) and TypeError (not a readable signal).
    """

    signal: SignalR[Any]
    name: str
    schema: pa.Schema
    mode: Mode

    #: The mode of ``SignalInstrument(signal)`` without one.
    _default_mode: Mode = "monitor"

    @overload
    def __new__(
        cls, signal: SignalR[Any], mode: Literal["poll"], rate_hz: float, *, name: str | None = None
    ) -> PolledSignalInstrument: ...
    @overload
    def __new__(
        cls,
        signal: SignalR[Any],
        mode: Literal["monitor"] = "monitor",
        rate_hz: None = None,
        *,
        name: str | None = None,
    ) -> MonitoredSignalInstrument: ...
    @overload
    def __new__(
        cls,
        signal: SignalR[Any],
        mode: str | None = None,
        rate_hz: float | None = None,
        *,
        name: str | None = None,
    ) -> SignalInstrument: ...
    def __new__(
        cls,
        signal: SignalR[Any],
        mode: str | None = None,
        rate_hz: float | None = None,
        *,
        name: str | None = None,
    ) -> SignalInstrument:
        mode = cls._default_mode if mode is None else mode
        target = _target(signal, mode, rate_hz)
        if cls is not SignalInstrument and cls is not target:
            raise ValueError(f"{cls.__name__} is not mode={mode!r}; make it with SignalInstrument(...)")
        return object.__new__(target)

    def __init__(
        self,
        signal: SignalR[Any],
        mode: str | None = None,
        rate_hz: float | None = None,
        *,
        name: str | None = None,
    ) -> None:
        stream = signal.name if name is None else name
        if not isinstance(stream, str) or not stream:
            raise ValueError(
                f"signal {signal.source!r} has no name to call its stream: pass name=..., or name "
                "the signal (soft_signal_rw(..., name=...), init_devices, set_name)"
            )
        self.signal = signal
        self.mode = "poll" if (mode or self._default_mode) == "poll" else "monitor"
        self.name = stream
        self.schema = pa.schema([TIMESTAMP])  # completed by connect()
        self._column: Column | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.signal.name!r}, mode={self.mode!r}, name={self.name!r})"

    async def _describe(self) -> None:
        describe = await self.signal.describe()
        if len(describe) != 1:
            raise SignalTypeError(f"signal {self.name!r}: describe() gave {len(describe)} keys, not one")
        ((_key, dk),) = describe.items()
        sample = None
        if needs_sample(dk):
            sample = self._value(await self.signal.read(cached=False))[0]
        self._column = Column(f"signal {self.name!r}", "value", dk, sample)
        self.schema = pa.schema([TIMESTAMP, self._column.field], metadata=_describe_metadata(describe))

    def _value(self, readings: Mapping[str, Any]) -> tuple[Any, Any]:
        if len(readings) != 1:
            raise SignalTypeError(f"signal {self.name!r}: a reading of {len(readings)} keys, not one")
        (reading,) = readings.values()
        return reading["value"], reading["timestamp"]

    def _batch(self, items: list[tuple[Any, Any]]) -> pa.RecordBatch:
        if self._column is None:
            raise RuntimeError(f"{self!r}: connect() first")
        values = self._column.array([v for v, _ in items])
        ts = timestamps(timestamps_ns(f"signal {self.name!r}", [t for _, t in items]))
        return pa.record_batch([ts, values], schema=self.schema)

    async def connect(self) -> None:
        """Describes the signal (it must be connected already) and makes the schema."""
        await self._describe()

    async def close(self) -> None:
        return None


class PolledSignalInstrument(SignalInstrument):
    """A signal read ``rate_hz`` times a second; made by ``SignalInstrument(sig, "poll", rate_hz)``."""

    rate_hz: float
    _default_mode: Mode = "poll"

    def __init__(
        self,
        signal: SignalR[Any],
        mode: str | None = None,
        rate_hz: float | None = None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(signal, mode, rate_hz, name=name)
        self.rate_hz = _rate(rate_hz)

    async def read(self) -> pa.RecordBatch:
        """One row: ``read(cached=False)``'s value and timestamp."""
        return self._batch([self._value(await self.signal.read(cached=False))])


class MonitoredSignalInstrument(SignalInstrument):
    """A signal whose every update is one row; made by ``SignalInstrument(sig)``.

    The subscription is made in ``connect()`` and removed in ``close()``; updates are queued
    in between (without bound: a monitor nobody streams from grows), and ``stream()`` yields
    what is queued each time it wakes, in order, split in batches of at most 4 MiB. Updates
    may come from another thread (the queue is thread-safe, the wake-up goes through the
    loop). When the acquisition ends the stream (cancellation), what is still queued is
    yielded first. A reading that does not fit the column raises from ``stream()`` after
    the rows before it are yielded.
    """

    def __init__(
        self,
        signal: SignalR[Any],
        mode: str | None = None,
        rate_hz: float | None = None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(signal, mode, rate_hz, name=name)
        self._queue: deque[tuple[Any, Any]] = deque()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._subscribed = False
        self._closed = False

    @property
    def pending(self) -> int:
        """Updates received and not yet yielded by ``stream()``; after ``close()``, those that
        arrived once the last run had ended its stream (no run delivered them)."""
        return len(self._queue)

    async def connect(self) -> None:
        """Describes the signal and subscribes to it (its current value is the first row)."""
        await self._describe()
        if not self._subscribed:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.get_ident()
            self._wake = asyncio.Event()
            self._closed = False
            self.signal.subscribe_reading(self._on_reading)
            self._subscribed = True

    async def close(self) -> None:
        """Unsubscribes; a ``stream()`` still running ends."""
        if self._subscribed:
            self.signal.clear_sub(self._on_reading)
            self._subscribed = False
        self._closed = True
        if self._wake is not None:
            self._wake.set()

    def _on_reading(self, readings: dict[str, Any]) -> None:
        # Called by ophyd-async inside its own callback chain: never raise here (an exception
        # would surface in whoever set the signal). Checked when batched.
        for reading in readings.values():
            self._queue.append((reading.get("value"), reading.get("timestamp")))
        if self._wake is None or self._loop is None:
            return
        if threading.get_ident() == self._thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _rows_per_batch(self) -> int:
        assert self._column is not None
        col = self._column
        row = (math.prod(col.shape) * col.np_dtype.itemsize) if col.np_dtype is not None and col.shape else 64
        return max(1, min(_MAX_BATCH_ROWS, _MAX_BATCH_BYTES // max(row, 1)))

    def _take(self) -> tuple[pa.RecordBatch | None, SignalTypeError | None]:
        """Up to a batch's worth of queued updates; on a reading that does not fit, the rows
        before it and the error (that reading is consumed)."""
        n = min(len(self._queue), self._rows_per_batch())
        items = [self._queue.popleft() for _ in range(n)]
        try:
            return self._batch(items), None
        except SignalTypeError:
            pass
        for i in range(n):  # which one: convert them one by one
            try:
                self._batch(items[i : i + 1])
            except SignalTypeError as e:
                for item in reversed(items[i + 1 :]):
                    self._queue.appendleft(item)
                return (self._batch(items[:i]) if i else None), e
        raise AssertionError("unreachable: the batch failed but no reading did")  # pragma: no cover

    async def stream(self) -> AsyncIterator[pa.RecordBatch]:
        """Batches of the updates, as they come, until ``close()``."""
        if self._wake is None or not self._subscribed:
            raise RuntimeError(f"{self!r}: connect() first")
        wake = self._wake
        while not self._closed:
            try:
                await wake.wait()
            except asyncio.CancelledError:
                # The acquisition ends its streams by cancelling them: what arrived since the
                # last wake-up is delivered first (the consumer adds it without awaiting).
                while self._queue:
                    batch, error = self._take()
                    if batch is not None:
                        yield batch
                    if error is not None:
                        raise error from None  # (not hidden by the cancellation)
                raise
            wake.clear()
            while self._queue:
                batch, error = self._take()
                if batch is not None:
                    yield batch
                if error is not None:
                    raise error


class ReadableInstrument:
    """Any ophyd-async readable device (``read()`` and ``describe()``: a ``StandardReadable``
    such as ``SimMotor``, a signal...) read ``rate_hz`` times a second; one row per read.

    Columns: ``timestamp`` (the newest of the read's Reading timestamps), one column per
    ``describe()`` key in its order (the key is the column name, whatever its characters:
    the writer encodes names HDF5 cannot hold), and ``timestamps``, a struct of every key's
    own Reading timestamp (``timestamps.<key>`` in the file). Raises TypeError (not a
    readable device), ValueError (bad rate, no name); ``connect()`` raises ValueError for a
    device that describes nothing or a key named ``timestamp``/``timestamps``, and
    SignalTypeError for a key without a column; ``read()`` raises SignalTypeError when
    ``read()``'s keys are not ``describe()``'s.
    """

    def __init__(self, device: AsyncReadable, rate_hz: float, *, name: str | None = None) -> None:
        if not isinstance(device, AsyncReadable):
            raise TypeError(
                f"ReadableInstrument needs an ophyd-async readable device (async read() and describe()), got {device!r}"
            )
        self.rate_hz = _rate(rate_hz)
        stream = device.name if name is None else name
        if not isinstance(stream, str) or not stream:
            raise ValueError(
                f"{device!r} has no name to call its stream: pass name=..., or name the device "
                "(init_devices, set_name)"
            )
        self.device = device
        self.name = stream
        self.schema = pa.schema([TIMESTAMP])  # completed by connect()
        self._columns: list[tuple[str, Column]] = []
        self._stamps: pa.StructType | None = None

    def __repr__(self) -> str:
        return f"ReadableInstrument({self.device.name!r}, rate_hz={self.rate_hz}, name={self.name!r})"

    async def connect(self) -> None:
        """Describes the device (it must be connected already) and makes the schema."""
        describe = await self.device.describe()
        if not describe:
            raise ValueError(f"device {self.name!r}: describe() lists no data keys; nothing to record")
        for reserved in ("timestamp", "timestamps"):
            if reserved in describe:
                raise ValueError(
                    f"device {self.name!r} has a data key named {reserved!r}, the name of the "
                    "instrument's own time column; rename the device or its signal"
                )
        sample: Mapping[str, Any] = {}
        if any(needs_sample(dk) for dk in describe.values()):
            sample = await self.device.read()
        self._columns = [
            (
                key,
                Column(
                    f"data key {key!r} of device {self.name!r}",
                    key,
                    dk,
                    sample.get(key, {}).get("value"),
                ),
            )
            for key, dk in describe.items()
        ]
        self._stamps = pa.struct(
            [
                pa.field(key, pa.timestamp("ns"), nullable=False, metadata=_stamp_metadata(describe[key]))
                for key, _ in self._columns
            ]
        )
        stamps = pa.field("timestamps", self._stamps, nullable=False)
        fields = [TIMESTAMP, *(c.field for _, c in self._columns), stamps]
        self.schema = pa.schema(fields, metadata=_describe_metadata(describe))

    async def close(self) -> None:
        return None

    async def read(self) -> pa.RecordBatch:
        """One row from the device's ``read()``."""
        if self._stamps is None:
            raise RuntimeError(f"{self!r}: connect() first")
        readings = await self.device.read()
        keys = [k for k, _ in self._columns]
        if readings.keys() != set(keys):
            missing = [k for k in keys if k not in readings]
            extra = [k for k in readings if k not in set(keys)]
            raise SignalTypeError(
                f"device {self.name!r}: read() gave keys that describe() did not (missing {missing}, "
                f"not described {extra}); reconnect the instrument after changing what the device reads"
            )
        ns = timestamps_ns(f"device {self.name!r}", [readings[k]["timestamp"] for k in keys])
        values = [c.array([readings[k]["value"]]) for k, c in self._columns]
        stamps = pa.StructArray.from_arrays([timestamps(t) for t in ns], fields=list(self._stamps))
        return pa.record_batch([timestamps(np.max(ns)), *values, stamps], schema=self.schema)
