"""The subscriber's side of the daemon's live streams (:class:`RemoteReader`, made by
``RemoteDaq.reader``): a thread per stream receives its ``do_get``, splits coalesced batches
into their records, counts losses with the same ``LossAccount`` as the ring readers, and
resubscribes across schema changes; and how the client words the daemon's errors
(:func:`remote_error`). The connection itself is :mod:`.client`'s.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self

import pyarrow as pa
import pyarrow.flight as fl

from .._errors import RemoteError, UnknownStreamError
from .._records import BatchReads, LossAccount, LossTotals
from . import protocol
from .protocol import BatchMeta, error_info, ticket

if TYPE_CHECKING:
    from .client import RemoteDaq

__all__ = ["RemoteBatch", "RemoteReader", "remote_error"]

# The codes of errors whose message names the request (the daemon's own words, given as is);
# the others (a missing token, an internal error) are prefixed with what the client was doing.
_NAMES_THE_REQUEST = frozenset(
    {protocol.BAD_REQUEST, protocol.UNKNOWN_STREAM, protocol.SCHEMA_CHANGED, protocol.REFUSED}
)


def remote_error(e: BaseException, what: str) -> RemoteError:
    said = error_info(e)
    if isinstance(e, fl.FlightUnavailableError):
        return RemoteError(f"{what}: the daemon cannot be reached ({said.message})", said.code)
    if said.code in _NAMES_THE_REQUEST:
        return RemoteError(said.message, said.code)
    return RemoteError(f"{what}: {said.message}", said.code)


@dataclass(frozen=True)
class RemoteBatch:
    """One record of a stream, as a subscriber receives it: the batch, its sequence numbers in
    the daemon's ring, and what this subscriber had lost up to it (``lost_rows`` is None once
    unknown)."""

    stream: str
    batch: pa.RecordBatch
    seq: int
    stream_seq: int | None
    timestamp_ns: int
    lost_records: int
    lost_rows: int | None


class RemoteReader(LossTotals, BatchReads):
    """A live subscription to a daemon's streams, with the API of ``RingReader``:
    :meth:`read` (records with their sequence numbers), :meth:`read_batches`,
    :meth:`read_table`. One thread per stream receives batches into a buffer of at most
    `max_buffered` batches and `max_buffered_bytes` bytes (at least one batch); when it is
    full, reception pauses and the daemon (never slowed by it) laps this subscriber, which
    learns how many records and rows it lost (:attr:`lost_records`, :attr:`lost_rows`)."""

    def __init__(
        self,
        daq: RemoteDaq,
        streams: list[str] | str | None,
        start: str,
        *,
        max_buffered: int = 1024,
        max_buffered_bytes: int = 64 << 20,
        coalesce_ms: float | None = 0.0,
    ) -> None:
        if start not in ("latest", "oldest"):
            raise ValueError(f'start must be "latest" or "oldest", got {start!r}')
        if coalesce_ms is not None and (
            isinstance(coalesce_ms, bool)
            or not isinstance(coalesce_ms, int | float)
            or not 0 <= coalesce_ms <= protocol.COALESCE_MAX_MS
        ):
            raise ValueError(
                f"coalesce_ms must be a number from 0 to {protocol.COALESCE_MAX_MS} (or None), got {coalesce_ms!r}"
            )
        self._coalesce_ms = coalesce_ms
        self.daq = daq
        self.start = start
        self._want = [streams] if isinstance(streams, str) else streams
        if max_buffered < 1 or max_buffered_bytes < 1:
            raise ValueError("max_buffered and max_buffered_bytes must be at least 1")
        self._max = max_buffered
        self._max_bytes = max_buffered_bytes
        self._buf: deque[tuple[RemoteBatch, int]] = deque()  # (a batch, its bytes)
        self._buf_bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._threads: dict[str, threading.Thread] = {}
        self._calls: dict[str, fl.FlightStreamReader] = {}
        self._ended: set[str] = set()
        self._loss = LossAccount()  # per stream name; changed and read under _cond
        self._last_seq: dict[str, int] = {}
        known = daq.streams()
        if self._want is not None:
            missing = [s for s in self._want if s not in known]
            if missing:
                raise UnknownStreamError(
                    f"unknown stream(s) {missing}; the daemon's streams: {', '.join(known) or 'none yet'}"
                )
        for name in self._want if self._want is not None else known:
            self._subscribe(name, start)
        if self._want is None:  # streams that appear later are followed from their start
            self._watcher = threading.Thread(target=self._watch, name="rust-daq-remote-watch", daemon=True)
            self._watcher.start()

    # -- receiving ----------------------------------------------------------------------------

    def _subscribe(self, name: str, start: str) -> None:
        t = threading.Thread(
            target=self._receive, args=(name, start), name=f"rust-daq-remote-{name}", daemon=True
        )
        self._threads[name] = t
        t.start()

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(0.5)
            try:
                names = self.daq.streams()
            except RemoteError:
                continue  # the stream threads report a daemon that is gone
            except pa.ArrowException:
                return  # the client was closed
            for name in names:
                if name not in self._threads and not self._closed:
                    self._subscribe(name, "oldest")

    def _receive(self, name: str, start: str) -> None:
        after: int | None = None
        coalesce = self._coalesce_ms
        received = False
        while not self._closed:
            try:
                call = self.daq._client.do_get(
                    ticket(name, start, after_seq=after, coalesce_ms=coalesce),
                    options=self.daq.options(),
                )
                self._calls[name] = call
                while True:
                    try:
                        chunk = call.read_chunk()
                    except StopIteration:
                        break
                    received = True
                    meta = BatchMeta.decode(chunk.app_metadata)
                    with self._cond:
                        offset = 0
                        # (RecordBatch.nbytes of a slice costs 3.6 µs: a share of the chunk's)
                        data, size = chunk.data, chunk.data.get_total_buffer_size()
                        for r in meta.each(data.num_rows):  # (a coalesced batch: several)
                            while (  # room for each record, as for batches of one
                                self._buf
                                and (len(self._buf) >= self._max or self._buf_bytes >= self._max_bytes)
                                and not self._closed
                            ):
                                self._cond.wait(0.1)
                            if self._closed:
                                return
                            # Our own account, from stream_seq and rows_before, continues across
                            # resubscriptions (the daemon's lost_* start again with each).
                            self._loss.observe(name, r.stream_seq, r.rows, r.rows_before)
                            item = RemoteBatch(
                                name,
                                data if r.rows == data.num_rows else data.slice(offset, r.rows),
                                r.seq,
                                r.stream_seq,
                                r.timestamp_ns,
                                self._loss.records(name),
                                self._loss.rows(name),
                            )
                            offset += r.rows
                            share = size * r.rows // data.num_rows if data.num_rows else size
                            self._buf.append((item, share))
                            self._buf_bytes += share
                            self._last_seq[name] = item.seq
                            self._cond.notify_all()
            except fl.FlightError as e:
                if self._closed:
                    return
                code = error_info(e).code
                if code == protocol.SCHEMA_CHANGED and name in self._last_seq:
                    after = self._last_seq[name]  # resume right after the last record we have
                    continue
                if code == protocol.BAD_REQUEST and coalesce is not None and not received:
                    coalesce = None  # a daemon older than coalesce_ms: a record a message
                    continue
                self._fail(name, remote_error(e, f"stream {name!r}"))
                return
            except (ValueError, KeyError, TypeError, pa.ArrowException) as e:
                # A batch or its metadata this client cannot read (a daemon of another
                # release, a bug): the stream ends with an error that says so, never a
                # receiving thread that dies and leaves the reader waiting for ever.
                self._fail(
                    name,
                    RemoteError(
                        f"stream {name!r}: the daemon sent a batch this client cannot read "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                    ),
                )
                return
            with self._cond:  # the daemon stopped: everything it wrote was received
                self._ended.add(name)
                self._cond.notify_all()
            return

    def _fail(self, name: str, error: RemoteError) -> None:
        with self._cond:
            self._error = error
            self._ended.add(name)
            self._cond.notify_all()

    # -- the reader API -------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """True once every subscribed stream has ended (the daemon stopped, or failed) and
        everything received was read."""
        with self._cond:
            return not self._buf and len(self._ended) == len(self._threads) and bool(self._threads)

    def read(self, max_records: int | None = None, timeout: float = 0.0) -> list[RemoteBatch]:
        """The batches received so far (waiting up to `timeout` s for one), with their
        sequence numbers and loss counters. Raises RemoteError if a stream failed (after the
        batches received before the failure were read)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._buf and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or self._error is not None or len(self._ended) == len(self._threads) > 0:
                    break
                self._cond.wait(left)
            n = len(self._buf) if max_records is None else min(max_records, len(self._buf))
            taken = [self._buf.popleft() for _ in range(n)]
            self._buf_bytes -= sum(size for _, size in taken)
            out = [b for b, _ in taken]
            self._cond.notify_all()
            if not out and self._error is not None:
                err, self._error = self._error, None
                raise err
        return out

    def _schema_of(self, stream: str) -> pa.Schema:
        schemas = self.daq.streams()
        if stream not in schemas:
            raise UnknownStreamError(f"unknown stream {stream!r}; the daemon's streams: {', '.join(schemas)}")
        return schemas[stream]

    def __iter__(self) -> Iterator[RemoteBatch]:
        """Every batch until the daemon stops (its streams end)."""
        while not self.ended:
            yield from self.read(timeout=0.5)

    def close(self) -> None:
        """Ends the subscriptions."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for call in list(self._calls.values()):
            try:
                call.cancel()
            except fl.FlightError:
                pass
        for t in [*self._threads.values(), *([self._watcher] if self._want is None else [])]:
            t.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
