"""A detector built on rust-daq for bluesky plans: :class:`RustDaqDetector`, an ophyd-async
``StandardDetector`` whose exposures are reads of rust-daq instruments into a ring, drained
by an in-process :class:`~rust_daq.HDF5Writer` into one file per prepare, which bluesky sees
as ``StreamResource`` documents (and Tiled reads back, live).

    with init_devices():
        det = RustDaqDetector([SimulatedVoltmeter(rate_hz=1000)], ring, path_provider, name="det")
    RE(bp.count([det], num=10))

One exposure is one read of every instrument (its ``read()``: streaming instruments, whose
batches hold whatever came since the last, are refused), so one collection is one row of
each of the detector's streams. An exposure that fails (an instrument's read raises) fails
the trigger or complete that waits for it, at once, with its error.
The main data key (named after the detector) is the main column (``main=``, or the first
numeric column of the first instrument that is not a timestamp); every other column of
every stream is ``<det>-<column>`` (``<det>-<stream>-<column>`` for the streams after the
first), its validity dataset, if the column has nulls, ``<det>-<column>__valid``.
``collections_written`` is the rows of every stream the file holds, set from the writer's
``on_flush`` on every flush (the writer flushes when an exposure's reads are in the ring, so
a step scan's point waits for its own flush, not a flush interval).

Stop order, whatever ends the scan (complete, stop, abort, an exception): the acquisition is
stopped and its last rows written to the ring; the writer drains them into the file and
closes it; only then is the next file started, at the ring's head (``start="now"``): a new
scan never gets rows of the one before.

Everything runs on the RunEngine's event loop (the detector's methods are called there); the
HDF5 work of each flush in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from event_model import DataKey
from ophyd_async.core import (
    DEFAULT_TIMEOUT,
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    PathProvider,
    StandardDetector,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    WatchableAsyncStatus,
    soft_signal_r_and_setter,
)

from .._ring import RingBuffer
from ..acquisition import Acquisition
from ..adapters import Instrument, PolledInstrument
from ..hdf5 import HDF5Writer
from ..hdf5.writer import DatasetInfo

__all__ = ["RustDaqDetector"]

log = logging.getLogger("rust_daq.ophyd_async")


class _Session:
    """What the three logics share: the acquisition into the ring, the writer of the current
    file, and the task of the current exposures."""

    def __init__(
        self,
        name: str,
        instruments: Sequence[Instrument],
        ring: RingBuffer,
        *,
        main: str | None,
        flush_interval: float,
        compression: str | None,
    ) -> None:
        if not instruments:
            raise ValueError("a RustDaqDetector needs at least one instrument")
        streaming = [i.name for i in instruments if not isinstance(i, PolledInstrument)]
        if streaming:
            # A pushed batch is not an exposure: it holds whatever came since the last one,
            # so the streams' rows would not line up with the scan's points.
            raise ValueError(
                f"{name or 'RustDaqDetector'}: {streaming} push their data (streaming instruments); "
                "a detector's exposure is one read of each instrument: poll them instead "
                "(SignalInstrument(signal, 'poll', rate_hz=...))"
            )
        self.name = name
        self.instruments = list(instruments)
        self.ring = ring
        self.main = main
        self.flush_interval = flush_interval
        self.compression = compression
        self.acquisition = Acquisition(ring, self.instruments)  # (checks the ring and the names)
        self.connected = False
        self.reads = 1  # exposures per start_acquiring
        self.task: asyncio.Task[None] | None = None
        self.guarded: list[WatchableAsyncStatus[Any]] = []  # trigger/complete statuses waiting on rows
        self.writer: HDF5Writer | None = None
        self.writer_task: asyncio.Task[None] | None = None
        self.written, self._set_written = soft_signal_r_and_setter(int, 0)
        self.streams = [i.name for i in self.instruments]

    async def connect(self) -> None:
        if not self.connected:
            await self.acquisition.__aenter__()
            self.connected = True

    # -- exposures ------------------------------------------------------------------------

    def start(self) -> None:
        if self.task is not None and not self.task.done():
            raise RuntimeError(f"{self.name}: an acquisition is already running")
        self.task = asyncio.get_running_loop().create_task(self._expose(self.reads))

    async def _expose(self, reads: int) -> None:
        try:
            await self.acquisition.run(reads=reads)
            if self.writer is not None:
                # The rows are in the ring and the point waits for them: flushed now, on the
                # loop (a one-row flush costs less than a handoff to the writer's thread).
                await self.writer.flush(in_thread=False)
        except Exception as e:
            self.fail(e)
            raise

    def guard(self, status: WatchableAsyncStatus[Any]) -> None:
        """`status` waits for rows that a failed exposure will never write: fail it then (with
        the exposure's error), instead of letting it wait out its timeout."""
        self.guarded = [s for s in self.guarded if not s.done] + [status]
        task = self.task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            self.fail(task.exception())  # (it failed before this status began to wait)

    def fail(self, error: BaseException | None) -> None:
        message = f"{self.name}: the acquisition failed: {type(error).__name__}: {error}"
        for status in self.guarded:
            _cancel(status, message)
        self.guarded = []

    async def wait(self) -> None:
        if self.task is not None:
            await self.task

    async def stop_acquiring(self) -> None:
        task, self.task = self.task, None
        if task is None:
            return
        # Cancelled, not just stop(): a stop() before the run has begun would be lost. The
        # acquisition writes its pending rows to the ring when cancelled.
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        # (its error, if any, failed the trigger or complete that waited for it)
        except Exception as e:
            log.warning("%s: the acquisition ended with %s: %s", self.name, type(e).__name__, e)

    # -- files ----------------------------------------------------------------------------

    async def open(self, path: Path) -> HDF5Writer:
        """A writer for the next file, from the ring's head, its datasets made now."""
        await self.close()
        self._set_written(0)
        schemas = {i.name: i.schema for i in self.instruments}
        writer = await asyncio.to_thread(
            HDF5Writer,
            path,
            self.ring,
            start="now",
            streams=self.streams,
            schemas=schemas,
            on_flush=self._flushed,
            flush_interval=self.flush_interval,
            compression=self.compression,
            metadata={"detector": self.name},
        )
        self.writer = writer
        self.writer_task = asyncio.get_running_loop().create_task(writer.run())
        return writer

    def _flushed(self, rows: dict[str, int]) -> None:
        self._set_written(min(rows.get(s, 0) for s in self.streams))

    async def close(self) -> None:
        """The stop order: the acquisition first (its last rows into the ring), then the
        writer's final flush of them, then its file is closed."""
        await self.stop_acquiring()
        writer, task = self.writer, self.writer_task
        self.writer = self.writer_task = None
        if writer is None or task is None:
            return
        await writer.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _cancel(status: WatchableAsyncStatus[Any], message: str, tries: int = 100) -> None:
    """Cancels `status` until it is done: Python 3.11's asyncio.wait_for swallows a
    cancellation that arrives as the awaited value does (ophyd-async waits for rows so), so
    one cancel() may be lost; it is repeated on the next turns of the loop."""
    if status.done or tries == 0:
        return
    status.task.cancel(message)
    asyncio.get_running_loop().call_later(0.001, _cancel, status, message, tries - 1)


def _data_keys(
    session: _Session, base: str, datasets: dict[str, list[DatasetInfo]]
) -> list[tuple[str, DatasetInfo]]:
    """(data key, dataset) for every column of every stream: the main one named `base`."""
    main_stream = session.streams[0]
    main = session.main
    if main is None:
        main = next(
            (
                d.column
                for d in datasets[main_stream]
                if d.column not in ("time", "timestamp") and d.dtype.kind in "fiub"
            ),
            None,
        )
    out: list[tuple[str, DatasetInfo]] = []
    found = False
    for stream in session.streams:
        for d in datasets[stream]:
            if d.column == "time":
                continue  # (the writer's time axis: derived from the timestamp column)
            if stream == main_stream and d.column == main:
                key, found = base, True
            elif stream == main_stream:
                key = f"{base}-{d.column}"
            else:
                key = f"{base}-{stream}-{d.column}"
            out.append((key, d))
    if not found:
        columns = [d.column for d in datasets[main_stream] if d.column != "time"]
        raise ValueError(f"{base}: main column {main!r} is not a column of {main_stream!r} ({columns})")
    return out


class _DataLogic(DetectorDataLogic):
    def __init__(self, session: _Session, path_provider: PathProvider) -> None:
        self.session = session
        self.path_provider = path_provider

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        info = self.path_provider(datakey_name)
        path = Path(info.directory_path) / f"{info.filename}.h5"
        writer = await self.session.open(path)
        datasets = {s: writer.datasets(s) for s in self.session.streams}
        resources = []
        for key, d in _data_keys(self.session, datakey_name, datasets):
            resources.append(
                StreamResourceInfo(
                    data_key=key,
                    shape=d.shape,
                    chunk_shape=d.chunks,
                    dtype_numpy=d.dtype.str,
                    parameters={"dataset": d.path, "swmr": True},
                )
            )
            if d.validity is not None:
                resources.append(
                    StreamResourceInfo(
                        data_key=f"{key}__valid",
                        shape=(),
                        chunk_shape=d.chunks[:1],
                        dtype_numpy="|u1",
                        parameters={"dataset": d.validity, "swmr": True},
                    )
                )
        return _Provider(
            uri=f"{info.directory_uri}{info.filename}.h5",
            resources=resources,
            mimetype="application/x-hdf5",
            collections_written_signal=self.session.written,
            units=_units(self.session, datasets),
        )

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]

    async def stop(self) -> None:
        await self.session.close()


class _Provider(StreamResourceDataProvider):
    """The stream resources, with each column's units in its data key."""

    def __init__(self, *, units: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._units = units

    async def make_datakeys(self, collections_per_event: int) -> dict[str, DataKey]:
        keys = await super().make_datakeys(collections_per_event)
        for resource in self.resources:
            dataset = str(resource.parameters["dataset"])
            units = self._units.get(dataset)
            if units:
                keys[resource.data_key]["units"] = units
        return keys


def _units(session: _Session, datasets: dict[str, list[DatasetInfo]]) -> dict[str, str]:
    """Units of each column's dataset path, from the instruments' schemas (timestamps: ns)."""
    out: dict[str, str] = {}
    for inst in session.instruments:
        fields = {f.name: f for f in inst.schema}
        for d in datasets[inst.name]:
            f = fields.get(d.column)
            md = (f.metadata or {}) if f is not None else {}
            if b"units" in md:
                out[d.path] = md[b"units"].decode("utf-8", "replace")
    return out


class _TriggerLogic(DetectorTriggerLogic):
    def __init__(self, session: _Session) -> None:
        self.session = session

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        if livetime or deadtime:
            rates = {i.name: getattr(i, "rate_hz", None) for i in self.session.instruments}
            raise ValueError(
                f"{self.session.name}: its instruments are read at their own rates ({rates}); "
                f"livetime={livetime} and deadtime={deadtime} cannot be set (use 0)"
            )
        self.session.reads = max(int(num), 1)

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class _AcquireLogic(DetectorAcquireLogic):
    def __init__(self, session: _Session) -> None:
        self.session = session

    async def start_acquiring(self) -> None:
        self.session.start()

    async def wait_for_idle(self) -> None:
        await self.session.wait()

    async def ensure_stopped(self) -> None:
        await self.session.stop_acquiring()


class RustDaqDetector(StandardDetector):
    """rust-daq instruments as one ophyd-async detector (see the module documentation).

    `instruments`: rust-daq instruments (``rust_daq.adapters``, or ophyd-async signals and
    devices through :class:`~rust_daq.ophyd_async.SignalInstrument` /
    :class:`~rust_daq.ophyd_async.ReadableInstrument`), one stream each, named after them;
    `ring`: the producer handle of a ring this detector's writer drains (its own: another
    consumer that commits the ring's read_tail would take records from it); `path_provider`:
    where each file goes (``<directory>/<filename>.h5``); `main`: the column named after the
    detector; `flush_interval`: seconds between the writer's flushes during a fly scan."""

    def __init__(
        self,
        instruments: Sequence[Instrument],
        ring: RingBuffer,
        path_provider: PathProvider,
        name: str = "",
        *,
        main: str | None = None,
        flush_interval: float = 0.2,
        compression: str | None = None,
    ) -> None:
        self._session = _Session(
            name, instruments, ring, main=main, flush_interval=flush_interval, compression=compression
        )
        self.add_detector_logics(
            _TriggerLogic(self._session),
            _AcquireLogic(self._session),
            _DataLogic(self._session, path_provider),
        )
        super().__init__(name=name)

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        super().set_name(name, child_name_separator=child_name_separator)
        self._session.name = name

    async def connect(
        self,
        mock: bool | Any = False,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (ophyd-async's signature)
        force_reconnect: bool = False,
    ) -> None:
        """Connects the detector's signals, then (not in mock mode) its instruments, once."""
        await super().connect(mock=mock, timeout=timeout, force_reconnect=force_reconnect)
        if not mock:
            await self._session.connect()

    def trigger(self) -> WatchableAsyncStatus[int]:
        status = super().trigger()
        self._session.guard(status)
        return status

    def complete(self) -> WatchableAsyncStatus[int]:
        status = super().complete()
        self._session.guard(status)
        return status

    @property
    def file_path(self) -> str | None:
        """The file the detector writes now (None between prepares)."""
        writer = self._session.writer
        return None if writer is None else writer.path

    async def close(self) -> None:
        """Stops acquiring, closes the file, closes the instruments."""
        await self._session.close()
        if self._session.connected:
            await self._session.acquisition.__aexit__(None, None, None)
            self._session.connected = False
