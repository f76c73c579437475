"""The acquisition loop: reads each instrument on its own schedule, stamps and batches rows per
stream, writes them to the ring with ``write_arrow_batch``. It never waits for the writer (a
ring with ``policy="overwrite"`` never blocks the producer).

    async with Acquisition(ring, [SimulatedVoltmeter(), SimulatedCamera()]) as acq:
        await acq.run(duration=10)
    print(acq.stats())

Scheduling: reads are due at absolute times ``start + k / rate_hz``, so lateness never
accumulates. asyncio's timers resolve to about a millisecond, so a precise task sleeps until
1.5 ms before its deadline and then yields until the deadline (what makes 1 kHz work, at the
cost of a busy core). ``precise=None`` (the default) is precise for instruments read at 200 Hz
or more, where a millisecond is a fifth of the period, and plain sleeps below (a 100 Hz poll
would otherwise cost 15 % of a core); True or False forces it for all. A read that starts
more than a period late is a missed deadline: the schedule skips the slots it missed and
counts them.

The event loop: the acquisition runs in the loop that awaits ``run()``, never one of its own.
Embedded in bluesky that is the RunEngine's loop (``call_in_bluesky_event_loop``, or a plan's
device methods); a second loop in another thread would put two loops' tasks on one ring
handle and one GIL.

Why not a thread of its own for the polled instruments' schedule: their reads are Python,
so that thread needs the GIL at each deadline, and any other thread running Python holds it
for up to the switch interval (5 ms). A 1 kHz schedule spinning in a thread of its own
beside a thread running Python code missed 2,049 of 5,000 deadlines on this machine (none
beside a thread that sleeps). Inside the event loop, the loop's other tasks run between its
checkpoints instead, and ``realtime`` gives the thread the CPU first.

Garbage collection: ``freeze_gc`` freezes the objects alive at the start (``gc.freeze()``) so
that collections of the older generations, which walk every live object, stay short during
the run. Freezing is counted across acquisitions: the first to start freezes (after a
``gc.collect()``, before the acquisition's first run only, and only on the main thread's
loop, which the acquisition owns; never on a loop
another framework runs, where a collection of a large heap stalls it), the last to end
unfreezes, and only if nothing was frozen before the first started (a user's own
``gc.freeze()`` is left as it was). ``freeze_gc=None`` (the default) freezes on the main
thread only.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, cast

import anyio
import anyio.lowlevel
import numpy as np
import pyarrow as pa

from ._arrow import warm_up
from ._gc import frozen as _frozen_gc
from ._native import sleep_until
from ._realtime import RealtimeSettings, SpinBudget, thread_budget
from ._realtime import apply as apply_realtime
from ._realtime import restore as restore_realtime
from ._ring import RingBuffer
from ._rowindex import RowIndex, RowTableReader
from .adapters import Instrument, PolledInstrument

__all__ = ["Acquisition", "RowIndex", "RowTableReader"]

_SAMPLES = 1 << 17  # latency/jitter samples kept (a ring of the most recent)
_PRECISE_HZ = 200.0  # precise=None: spin to the deadline at this rate and above
# realtime: sleeps of at most this long (ns) between the loop's other tasks, and the spin
# before a deadline (at most _RT_SPIN_SHARE of the period): a SCHED_FIFO thread's wake-up
# took 45 µs typically and up to 900 µs on this VM, and a vCPU woken from a sleep is
# sometimes late by more (the host's), which a spinning one never is. Spinning 800 µs of
# each 1 ms, five runs of case 6 missed 0, 0, 7, 1 and 0 deadlines in 30 s; spinning 500,
# 21, 10, 2, 6 and 1. With the loop's own work, 80 % can reach the kernel's real-time
# throttle (95 % of each second): SpinBudget spins what is left of 85 %. (While it sleeps,
# the loop's other tasks wait: at most a slice.)
_RT_SLICE, _RT_SPIN, _RT_SPIN_SHARE = 100_000, 800_000, 0.8


def rt_spin_ns(period: float) -> int:
    """How long (ns) a real-time loop spins before each deadline of a `period` s schedule."""
    return min(_RT_SPIN, int(period * _RT_SPIN_SHARE * 1e9))


class _Samples:
    """The last `_SAMPLES` values of a measurement, for percentiles; no allocation per sample."""

    def __init__(self, keep: int = _SAMPLES) -> None:
        self.values = np.zeros(keep, dtype=np.float64)
        self.n = 0

    def add(self, v: float) -> None:
        self.values[self.n % len(self.values)] = v
        self.n += 1

    def summary(self, scale: float = 1e6) -> dict[str, float]:
        if self.n == 0:
            return {"p50": 0.0, "p99": 0.0, "p99.9": 0.0, "max": 0.0, "n": 0}
        v = self.values[: min(self.n, len(self.values))] * scale
        p50, p99, p999 = np.percentile(v, [50, 99, 99.9])
        return {
            "p50": float(p50),
            "p99": float(p99),
            "p99.9": float(p999),
            "max": float(v.max()),
            "n": self.n,
        }


@dataclass
class _Stream:
    instrument: Instrument
    polled: bool = False
    pending: list[pa.RecordBatch] = field(default_factory=list)
    pending_rows: int = 0
    pending_bytes: int = 0
    oldest: float = 0.0  # perf_counter of the oldest pending row
    rows: int = 0
    records: int = 0
    bytes: int = 0
    reads: int = 0
    missed: int = 0
    jitter: _Samples = field(default_factory=_Samples)
    # this stream's writes into the ring (a camera's frames and a voltmeter's readings cost
    # different things: their percentiles apart, besides all writes')
    write_latency: _Samples = field(default_factory=lambda: _Samples(_SAMPLES // 8))


class Acquisition:
    """Runs instruments into a ring. See the module documentation.

    ``batch_rows``: rows per record at most; ``max_latency``: seconds a row may wait for its
    batch; ``max_batch_bytes``: bytes per record at most (frames go out one by one);
    ``precise``: spin to each deadline (None: for instruments read at 200 Hz or more);
    ``freeze_gc``: freeze the objects alive during the run (None: on the main thread only;
    see the module documentation); ``row_index``: write through this :class:`RowIndex` (the
    daemon's, so its subscribers learn how many rows they lost); ``realtime``: run the loop's
    thread under SCHED_FIFO, pinned, with memory locked, while a run lasts (True, or a
    :class:`~rust_daq._realtime.RealtimeSettings`; each setting applied if permitted and
    reported in ``stats()["realtime"]``), the precise schedule then sleeping in the kernel
    instead of spinning.
    """

    def __init__(
        self,
        ring: RingBuffer,
        instruments: Sequence[Instrument],
        *,
        batch_rows: int = 1000,
        max_latency: float = 0.1,
        max_batch_bytes: int = 4 << 20,
        precise: bool | None = None,
        freeze_gc: bool | None = None,
        row_index: RowIndex | None = None,
        realtime: bool | RealtimeSettings = False,
    ) -> None:
        if not ring.writable:
            raise ValueError(
                "the acquisition needs the ring's producer handle (RingBuffer.create or writable=True)"
            )
        names = [i.name for i in instruments]
        if len(set(names)) != len(names):
            raise ValueError(f"instrument names must be unique (they name the streams): {names}")
        if not instruments:
            raise ValueError("no instruments to acquire from")
        if batch_rows < 1 or max_latency <= 0 or max_batch_bytes < 1:
            raise ValueError("batch_rows, max_latency and max_batch_bytes must be positive")
        self.ring = ring
        self.instruments = list(instruments)
        self.batch_rows, self.max_latency, self.max_batch_bytes = batch_rows, max_latency, max_batch_bytes
        self.precise = precise
        self.freeze_gc = freeze_gc
        self._streams = {i.name: _Stream(i, isinstance(i, PolledInstrument)) for i in instruments}
        self.row_index = row_index
        self._write_latency = _Samples()
        self._started: float | None = None
        self._elapsed = 0.0  # seconds of the runs that ended
        self._run_started: float | None = None
        self._collected = False  # gc.collect() before the first frozen run only
        self._lost_at_end: int | None = None
        self._stop: anyio.Event | None = None
        self.realtime = RealtimeSettings() if realtime is True else (realtime or None)
        self._fifo = False  # the loop's thread runs under SCHED_FIFO (a run with realtime)
        self._spin_budget: SpinBudget | None = None  # (its spinning, below the kernel's throttle)

    async def __aenter__(self) -> Self:
        warm_up()  # (pyarrow's lazy imports: here, not in the first read of the run)
        self.ring._prepare_arrow()  # (and the map Arrow writes go through)
        for inst in self.instruments:
            await inst.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            for inst in self.instruments:
                await inst.close()

    async def run(self, reads: int | None = None, duration: float | None = None) -> None:
        """Acquires until every instrument has been read `reads` times (a streaming
        instrument: `reads` batches), `duration` seconds have passed, `stop()`, or
        cancellation, whichever comes first; then writes what is pending (also when
        cancelled), so that when it returns every row read is in the ring. Runs may follow
        one another on the same acquisition (a detector's points); stats() add up."""
        if reads is not None and (isinstance(reads, bool) or not isinstance(reads, int) or reads < 1):
            raise ValueError(f"reads must be a positive number of reads, got {reads!r}")
        if duration is not None and not (math.isfinite(duration) and duration >= 0):
            raise ValueError(f"duration must be a number of seconds >= 0, got {duration!r}")
        self._stop = anyio.Event()
        main = threading.current_thread() is threading.main_thread()
        freeze = main if self.freeze_gc is None else self.freeze_gc
        # (one collection per acquisition: a detector's thousand short runs must not make a
        # thousand collections of the whole heap, ~40 ms each with bluesky imported)
        collect = main and freeze and not self._collected
        self._collected = self._collected or collect
        rt = self.realtime
        if rt is not None:
            apply_realtime(rt)
            self._fifo = rt.fifo
            self._spin_budget = thread_budget() if rt.fifo else None  # (this thread's, kept across runs)
        try:
            with _frozen_gc(collect=collect) if freeze else _nothing():
                await self._run(reads, duration)
        finally:
            if rt is not None:
                restore_realtime(rt)
                self._fifo = False

    async def _run(self, reads: int | None, duration: float | None) -> None:
        assert self._stop is not None
        started = time.perf_counter()
        if self._started is None:
            self._started = started
        self._run_started = started
        if reads == 1 and duration is None and len(self._streams) == 1:
            (st,) = self._streams.values()
            if st.polled:
                # One read of one instrument (a detector's point): due now, read now; no task
                # group, no schedule (half the cost of a run on a busy loop).
                try:
                    # (st.polled says what it is: an isinstance against the runtime-checkable
                    # protocol took 20-30 µs, a third of a detector's point in this method)
                    inst = cast(PolledInstrument, st.instrument)
                    st.jitter.add(0.0)
                    self._add(st, await inst.read())
                finally:
                    self._elapsed += time.perf_counter() - started
                    self._run_started = None
                    self._flush(st)
                    self._lost_at_end = self.ring.records_lost
                return
        left = [len(self._streams)]  # instruments still to finish their reads

        async def counted(task: Any, st: _Stream) -> None:
            await task(st, reads)
            left[0] -= 1
            if left[0] == 0 and self._stop is not None:
                self._stop.set()

        try:
            async with anyio.create_task_group() as tg:
                for st in self._streams.values():
                    tg.start_soon(counted, self._poll if st.polled else self._consume, st)
                if reads is None or reads > 1 or not all(st.polled for st in self._streams.values()):
                    # (a run of one read per polled instrument ends with its final flush)
                    tg.start_soon(self._latency_flusher)
                if duration is not None:
                    with anyio.move_on_after(duration):
                        await self._stop.wait()
                else:
                    await self._stop.wait()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One instrument failed: its own error, not a group of one (the caller sees what
            # went wrong, e.g. a detector's trigger fails with the instrument's OSError).
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
        finally:
            self._elapsed += time.perf_counter() - started
            self._run_started = None
            for st in self._streams.values():
                self._flush(st)
            self._lost_at_end = self.ring.records_lost

    def stop(self) -> None:
        """Ends the `run()` in progress (from a task in the same event loop); one that has not
        begun yet is not affected (cancel its task instead: a cancelled run writes its pending
        rows too)."""
        if self._stop is not None:
            self._stop.set()

    async def _sleep_until(self, deadline: float, precise: bool, period: float) -> None:
        delay = deadline - time.perf_counter()
        if not precise:
            if delay > 0:
                await anyio.sleep(delay)
            return
        if delay > 0.002:
            await anyio.sleep(delay - 0.0015)
        if self._fifo:
            # Under SCHED_FIFO a thread that spins all the time loses 50 ms of each second to
            # the kernel's real-time throttle: sleep in the kernel (GIL released; in slices,
            # the loop's other tasks between them) to the spin before the deadline, then spin
            # as below. A late wake-up then costs nothing. The spin is what the throttle
            # leaves: with the loop's own work, 85 % of the CPU at most (SpinBudget).
            end = int(deadline * 1e9)
            budget = self._spin_budget
            spin = rt_spin_ns(period) if budget is None else budget.allowed(rt_spin_ns(period))
            while True:
                left = end - time.perf_counter_ns()
                if left <= spin:
                    break
                sleep_until(time.perf_counter_ns() + min(left - spin, _RT_SLICE), 0)
                await anyio.lowlevel.checkpoint()
        while time.perf_counter() < deadline:
            await anyio.lowlevel.checkpoint()

    async def _poll(self, st: _Stream, reads: int | None) -> None:
        inst = cast(PolledInstrument, st.instrument)  # (st.polled)
        period = 1.0 / inst.rate_hz
        precise = self._precise(inst)
        start = time.perf_counter()
        k = 0
        done = 0
        while reads is None or done < reads:
            deadline = start + k * period
            await self._sleep_until(deadline, precise, period)
            late = time.perf_counter() - deadline
            if late > period:  # slots passed while we were busy: skip them, count them
                skipped = int(late // period)
                st.missed += skipped
                k += skipped
                late -= skipped * period
            st.jitter.add(late)
            self._add(st, await inst.read())
            k += 1
            done += 1

    async def _consume(self, st: _Stream, reads: int | None) -> None:
        done = 0
        if reads is None or reads > 0:
            async for batch in st.instrument.stream():  # type: ignore[union-attr]
                self._add(st, batch)
                done += 1
                if reads is not None and done >= reads:
                    break

    async def _latency_flusher(self) -> None:
        while True:
            await anyio.sleep(self.max_latency / 4)
            now = time.perf_counter()
            for st in self._streams.values():
                if st.pending and now - st.oldest >= self.max_latency:
                    self._flush(st)

    def _add(self, st: _Stream, batch: pa.RecordBatch) -> None:
        st.reads += 1
        if not st.pending:
            st.oldest = time.perf_counter()
        st.pending.append(batch)
        st.pending_rows += batch.num_rows
        st.pending_bytes += batch.nbytes
        if st.pending_rows >= self.batch_rows or st.pending_bytes >= self.max_batch_bytes:
            self._flush(st)

    def _flush(self, st: _Stream) -> None:
        if not st.pending:
            return
        if len(st.pending) == 1:
            batch = st.pending[0]
        else:
            batch = pa.Table.from_batches(st.pending).combine_chunks().to_batches()[0]
        t0 = time.perf_counter()
        if self.row_index is not None:
            self.row_index.write(batch, st.instrument.name)
        else:
            self.ring.write_arrow_batch(batch, st.instrument.name)
        took = time.perf_counter() - t0
        self._write_latency.add(took)
        st.write_latency.add(took)
        st.rows += batch.num_rows
        st.records += 1
        st.bytes += batch.nbytes
        st.pending.clear()
        st.pending_rows = st.pending_bytes = 0

    def loop_cpu(self, allowed: Sequence[int] | None = None) -> int | None:
        """The CPU this acquisition's loop keeps busy while it runs, for its owner to keep its
        other processes off (the daemon's Flight process): the CPU a real-time run pins its
        thread to, or, for a loop that spins to its deadlines (a precise polled instrument),
        the last this process may use: not pinned there, the loop is where the scheduler
        puts it once the owner's other processes keep off that CPU. None when the loop
        leaves its CPU free between reads, or this process may use only one CPU. `allowed`:
        the CPUs to choose from (None: the calling thread's, or a real-time run's before it
        pinned its thread); the same rule as the real-time pin's.

        On 2 cores, with 50 subscribers whose own process kept off the loop's CPU (as those
        on other hosts do), the daemon's Flight process on any CPU cost a 1 kHz loop at
        normal priority 13 to 1,856 missed deadlines in runs of 8 s; kept off the loop's
        CPU, 0 to 18 (benchmarks/flight.py, case 8 and 6)."""
        if not hasattr(os, "sched_getaffinity"):
            return None
        rt = self.realtime
        if allowed is None:
            cpus = rt.allowed() if rt is not None else sorted(os.sched_getaffinity(0))
        else:
            cpus = sorted(allowed)
        if len(cpus) < 2:
            return None
        if rt is not None:  # (the CPU apply() pins the thread to, unless it refuses)
            cpu = cpus[-1] if rt.cpu is None else rt.cpu
            if cpu in cpus:
                return cpu
        for st in self._streams.values():
            if st.polled and self._precise(st.instrument):
                return cpus[-1]
        return None

    def _precise(self, inst: Instrument) -> bool:
        rate = getattr(inst, "rate_hz", 0.0)
        return rate >= _PRECISE_HZ if self.precise is None else self.precise

    def rows(self) -> dict[str, int]:
        """Rows written so far per stream (cheap: for frequent polling, unlike :meth:`stats`)."""
        return {name: st.rows for name, st in self._streams.items()}

    def stats(self) -> dict[str, Any]:
        """Rows, records and bytes per stream; read jitter (lateness against the schedule, µs)
        and missed deadlines per polled stream; write latency into the ring (µs), per stream
        and over all writes; records the ring lost (overwritten before its primary consumer
        read them)."""
        running = self._run_started
        elapsed = self._elapsed + (time.perf_counter() - running if running is not None else 0.0)
        streams = {}
        for name, st in self._streams.items():
            rate = getattr(st.instrument, "rate_hz", None)
            streams[name] = {
                "rows": st.rows,
                "records": st.records,
                "bytes": st.bytes,
                "reads": st.reads,
                "rate_hz": rate,
                "expected_reads": math.floor(elapsed * rate) if rate else None,
                "deadlines_missed": st.missed,
                "jitter_us": st.jitter.summary(),
                "write_latency_us": st.write_latency.summary(),
            }
        return {
            "elapsed_s": elapsed,
            "streams": streams,
            "write_latency_us": self._write_latency.summary(),
            "records_lost": self._lost_at_end if self.ring.closed else self.ring.records_lost,
            "realtime": None if self.realtime is None else dict(self.realtime.report),
        }


@contextmanager
def _nothing() -> Iterator[None]:
    yield
