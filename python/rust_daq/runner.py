"""One run of a :class:`~rust_daq.config.Session`: what ``rust-daq run`` / ``demo`` and the
daemon share. Its ring (created here, removed at the end if the run owns it, unless a writer
that was given up on left records only the ring holds), its supervised writer
(:class:`~rust_daq._supervisor.WriterSupervisor`), its acquisition until the duration,
SIGINT/SIGTERM or (``rust-daq run``) a writer that cannot be kept alive, and the stats that
say what stopped it and what is where.

Signals are plain handlers for the whole run, not an event-loop signal receiver: a second
Ctrl-C (during the final flush, or 1 ms after the first) is noted, never a KeyboardInterrupt
through the shutdown (no summary, coroutines never awaited).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio

from ._errors import RustDaqError
from ._realtime import RealtimeSettings
from ._ring import RingBuffer
from ._session import Session
from ._supervisor import WriterSupervisor, file_progress
from .acquisition import Acquisition, RowIndex
from .hdf5.options import WriterOptions

__all__ = ["Runner", "noting_signals", "run_session"]

_WATCH = 0.05  # seconds between checks of the stop conditions


@contextlib.contextmanager
def noting_signals(stopped_by: list[str]) -> Iterator[None]:
    """SIGINT and SIGTERM append their names to `stopped_by` (and do nothing else) inside."""

    def on_signal(signum: int, _frame: object) -> None:
        stopped_by.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Runner:
    """The ring, acquisition and writer of one session; see the module documentation.

    ``own_ring``: remove the ring at the end (None: if the session owns it and this creates
    it); ``row_index``: write through a :class:`~rust_daq.acquisition.RowIndex` (the daemon's
    subscribers learn from it how many rows they lost); ``stopped_by``: the list that
    :func:`noting_signals` fills (default: a new one). A session without instruments has no
    acquisition (:attr:`acq` None): the run then only waits, for its duration or a signal.
    """

    def __init__(
        self,
        session: Session,
        *,
        own_ring: bool | None = None,
        row_index: bool = False,
        stopped_by: list[str] | None = None,
    ) -> None:
        self.session = session
        if own_ring is None:
            own_ring = session.own_ring and not os.path.exists(session.ring_path)
        self.own_ring = own_ring
        self.ring = RingBuffer.create(
            session.ring_path,
            capacity_mb=session.capacity_mb,
            policy=session.policy,  # type: ignore[arg-type]
            schema_mb=session.schema_mb,
        )
        self.publisher: Any = None
        self.writer: WriterSupervisor | None = None
        self._closed = False
        try:
            # A publisher in the run knows each record's rows: lost rows are exact downstream.
            self.row_index = RowIndex(self.ring) if row_index or session.nats else None
            self.acq = (
                Acquisition(
                    self.ring,
                    session.instruments,
                    row_index=self.row_index,
                    batch_rows=session.batch_rows,
                    realtime=False if session.realtime is None else RealtimeSettings(**session.realtime),
                )
                if session.instruments
                else None
            )
            if session.nats is not None:
                self.publisher = _publisher(self.ring, session.nats, self.row_index)
        except BaseException:
            self.close()
            raise
        self.started = time.time()
        #: The signals received (their names), first first: :func:`noting_signals` fills it.
        self.stopped_by: list[str] = [] if stopped_by is None else stopped_by
        #: The writer process of the recording in progress, if any.
        self.writer = None
        self._stop_on_writer_failure = False
        self._closed = False

    def start_writer(
        self, options: WriterOptions, *, on_event: Callable[[str], None] | None = None
    ) -> WriterSupervisor:
        """Starts a supervised writer (ready: its file is open); RustDaqError if it does not start."""
        if self.writer is not None:
            raise RustDaqError(f"already writing {self.writer.output}")
        sup = WriterSupervisor(options, on_event=on_event)
        sup.start()
        self.writer = sup
        return sup

    def stop_writer(self) -> WriterSupervisor | None:
        """The writer's final flush (a dead writer is started once more for it); returns it,
        its state ``"stopped"`` or ``"failed"``."""
        sup, self.writer = self.writer, None
        if sup is not None:
            sup.stop()
        return sup

    def acquire(
        self,
        *,
        tasks: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
        on_started: Callable[[], Awaitable[None]] | None = None,
        stop_on_writer_failure: bool = True,
    ) -> dict[str, Any]:
        """Acquires (with `tasks` alongside, cancelled at the end; `on_started` awaited once
        they run) until the duration, a signal noted in :attr:`stopped_by` or, with
        `stop_on_writer_failure`, a writer given up on. Returns the acquisition's stats with
        ``stopped_by``."""
        self._stop_on_writer_failure = stop_on_writer_failure
        anyio.run(self._main, tasks, on_started)
        stats: dict[str, Any] = (
            self.acq.stats()
            if self.acq is not None
            else {"elapsed_s": time.time() - self.started, "streams": {}}
        )
        stats["stopped_by"] = (
            self.stopped_by[0]
            if self.stopped_by
            else "writer failure"
            if self._writer_failed()
            else ("duration" if self.session.duration else "end")
        )
        return stats

    def _writer_failed(self) -> bool:
        return self._stop_on_writer_failure and self.writer is not None and self.writer.state == "failed"

    async def _main(
        self,
        tasks: Sequence[Callable[[], Coroutine[Any, Any, None]]],
        on_started: Callable[[], Awaitable[None]] | None,
    ) -> None:
        async with AsyncExitStack() as stack:
            if self.acq is not None:
                await stack.enter_async_context(self.acq)
            tg = await stack.enter_async_context(anyio.create_task_group())

            async def watch() -> None:
                # Until cancelled: acq.stop() before acq.run() began would be lost.
                while True:
                    if self.stopped_by or self._writer_failed():
                        if self.acq is not None:
                            self.acq.stop()
                        else:
                            tg.cancel_scope.cancel()
                    await anyio.sleep(_WATCH)

            tg.start_soon(watch)
            for task in tasks:
                tg.start_soon(task)
            if on_started is not None:
                await on_started()
            if self.acq is not None:
                await self.acq.run(duration=self.session.duration)
            elif self.session.duration is not None:
                await anyio.sleep(self.session.duration)
            else:
                await anyio.sleep_forever()
            tg.cancel_scope.cancel()

    def close(self) -> dict[str, Any]:
        """The writer's final flush, then the ring closed and, if the run owns it, removed.
        Returns ``writer`` (state, restarts, reason; if there was one) and ``ring_left``
        (path, records the writer did not commit, removed). Idempotent."""
        if self._closed:
            return {}
        self._closed = True
        end: dict[str, Any] = {}
        try:
            if self.publisher is not None:  # (first: it publishes what the ring holds)
                stats = self.publisher.stop()
                end["published"] = None if stats is None else dataclasses.asdict(stats)
                if self.publisher.error is not None:
                    end["published_error"] = str(self.publisher.error)
            sup = self.stop_writer()
            if sup is not None:
                end["writer"] = {"state": sup.state, "restarts": sup.restarts, "reason": sup.reason}
            if not self.ring.closed:
                rs = self.ring.status()
                end["ring_left"] = {
                    "path": self.ring.path,
                    "records": rs["records_written"] - rs["read_tail_seq"],
                }
        finally:
            self.ring.close()
            # A ring holding records the given-up writer never committed is the only copy of
            # them: keep it (the summary says how to write them), whatever own_ring says.
            unwritten = end.get("writer", {}).get("state") == "failed" and end.get("ring_left", {}).get(
                "records", 0
            )
            removed = self.own_ring and not unwritten
            if removed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.ring.path)
            if "ring_left" in end:
                end["ring_left"]["removed"] = removed
        return end


def _publisher(ring: RingBuffer, nats: dict[str, Any], rows: RowIndex | None) -> Any:
    """The ``[nats]`` section's publisher, started (connected): JetStreamError if it cannot be."""
    from .nats.connection import Credentials
    from .nats.thread import PublisherThread

    keys = ("user", "password", "token", "creds", "tls_ca", "tls_cert", "tls_key")
    credentials = Credentials.from_env(**{k: nats.get(k) for k in keys})
    p = PublisherThread(
        ring,
        nats["url"],
        prefix=nats.get("prefix"),
        host=nats.get("host_name"),
        replicas=int(nats.get("replicas", 1)),
        credentials=credentials,
        rows=rows,
    )
    p.start()
    return p


def run_session(
    s: Session,
    *,
    on_event: Callable[[str], None] | None = None,
    progress: Callable[[Runner], Coroutine[Any, Any, None]] | None = None,
) -> dict[str, Any]:
    """``rust-daq run`` and ``demo``: the ring, a supervised writer process into
    ``s.output`` (if any), the acquisition until the duration, SIGINT/SIGTERM or a writer that
    cannot be kept alive; the final flush; the ring removed unless kept. `progress` runs
    alongside. The stats say what the file holds (``file``), the writer's fate (``writer``)
    and what the ring still held at the end (``ring_left``)."""
    if s.output is not None and os.path.exists(s.output):
        raise RustDaqError(f"{s.output} already exists; choose another output file (or delete it)")
    stats: dict[str, Any] = {}
    stopped_by: list[str] = []
    with noting_signals(stopped_by):
        run = Runner(s, stopped_by=stopped_by)
        try:
            if s.output is not None:
                run.start_writer(
                    WriterOptions(
                        ring=s.ring_path,
                        output=s.output,
                        layout=s.layout,
                        flush_interval=s.flush_interval,
                        compression=s.compression,
                        metadata=s.metadata,
                        # The run SIGKILLed: its writer is the last to know of the ring it made.
                        remove_ring_if_orphaned=run.own_ring,
                    ),
                    on_event=on_event,
                )
            stats = run.acquire(tasks=[lambda: progress(run)] if progress is not None else ())
        finally:
            stats.update(run.close())
    stats["output"] = s.output
    exists = s.output is not None and os.path.exists(s.output)
    stats["file"] = file_progress(s.output) if s.output is not None and exists else None
    stats["file_bytes"] = os.path.getsize(s.output) if s.output is not None and exists else 0
    return stats
