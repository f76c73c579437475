"""A rust-daq daemon on another machine, through Arrow Flight: live streams with the reader
API, the latest rows, remote instruments, and control. ::

    import rust_daq.remote
    daq = rust_daq.remote.connect("grpc://daq-host:8815", token="...")
    daq.streams()                                   # {name: pyarrow.Schema}
    with daq.reader() as reader:                    # every stream, from now on
        for stream, batch in reader.read_batches(timeout=1.0):
            ...
    daq.latest("voltmeter", rows=1000)              # {column: numpy array}
    daq.start_recording("run.h5"); daq.stop_recording()   # a file in the daemon's data_dir

What goes over the wire is :mod:`.protocol`'s; the client tells the daemon's errors apart by
their code, never by their message. The remote HDF5 writer built on it is :mod:`.relay`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from .._access import local_token
from .._arrow import _to_numpy
from .._errors import RemoteError, RustDaqError, UnknownStreamError
from .._records import LossAccount, LossTotals
from . import protocol
from .protocol import BatchMeta, error_info, ticket

__all__ = ["RemoteBatch", "RemoteDaq", "RemoteError", "RemotePut", "RemoteReader", "connect"]

log = logging.getLogger("rust_daq.remote")

# The codes of errors whose message names the request (the daemon's own words, given as is);
# the others (a missing token, an internal error) are prefixed with what the client was doing.
_NAMES_THE_REQUEST = frozenset(
    {protocol.BAD_REQUEST, protocol.UNKNOWN_STREAM, protocol.SCHEMA_CHANGED, protocol.REFUSED}
)


def _remote_error(e: BaseException, what: str) -> RemoteError:
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


def connect(
    url: str,
    *,
    token: str | None = None,
    tls_root_certs: bytes | str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> RemoteDaq:
    """A client of the daemon at `url` (``grpc://host:port``, ``grpc+tls://host:port``).
    ``token``: the daemon's token (default: the RUST_DAQ_TOKEN environment variable, else,
    for a daemon on this machine's loopback, the token file its daemon wrote for this user:
    see :mod:`rust_daq._access`; ``""``: send none); ``tls_root_certs``: PEM bytes or a file of the certificates to trust (a self-signed
    daemon's own certificate). Raises RemoteError if the daemon does not answer within
    `timeout` seconds or refuses the token."""
    return RemoteDaq(url, token=token, tls_root_certs=tls_root_certs, timeout=timeout)


class RemoteDaq:
    """A connection to a daemon; see :func:`connect`."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        tls_root_certs: bytes | str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not url.startswith(("grpc://", "grpc+tcp://", "grpc+tls://")):
            raise ValueError(f"a daemon URL looks like grpc://host:port or grpc+tls://host:port, got {url!r}")
        certs = tls_root_certs
        if certs is not None and not isinstance(certs, bytes):
            certs = Path(certs).read_bytes()
        if token is None:
            token = os.environ.get("RUST_DAQ_TOKEN") or local_token(url)
        self.url = url
        self._headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._timeout = timeout
        kwargs: dict[str, Any] = {"tls_root_certs": certs} if certs is not None else {}
        self._client = fl.connect(url, **kwargs)
        try:
            self.streams()  # fails now, with a clear message, if the daemon is not there
        except BaseException:
            self._client.close()
            raise

    def options(self, timeout: float | None = None) -> fl.FlightCallOptions:
        """Call options with the token; `timeout` None: no deadline (streams)."""
        return fl.FlightCallOptions(headers=self._headers, timeout=timeout)

    # -- discovery and control ------------------------------------------------------------------

    def streams(self) -> dict[str, pa.Schema]:
        """Every stream of the daemon and its schema."""
        try:
            return {
                f.descriptor.path[0].decode(): f.schema
                for f in self._client.list_flights(options=self.options(self._timeout))
            }
        except fl.FlightError as e:
            raise _remote_error(e, f"listing the streams of {self.url}") from None

    def action(self, kind: str, body: dict[str, Any] | None = None) -> Any:
        """Runs a ``do_action`` (see :data:`rust_daq.flight.ACTIONS`); its JSON result."""
        try:
            results = list(self._client.do_action(protocol.action(kind, body), options=self.options(120)))
        except fl.FlightError as e:
            raise _remote_error(e, kind) from None
        return protocol.read_action_result(results)

    def status(self) -> dict[str, Any]:
        """Streams (rows, records, rows/s), ring (fill, records written and lost), writer
        (recording, file, lag), subscribers."""
        result: dict[str, Any] = self.action(protocol.STATUS)
        return result

    def list_streams(self) -> dict[str, dict[str, str]]:
        """Every stream with its columns (name: Arrow type)."""
        result: dict[str, dict[str, str]] = self.action(protocol.LIST_STREAMS)
        return result

    def start_recording(
        self,
        file: str,
        *,
        layout: str = "append",
        compression: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Starts the daemon's HDF5 writer into `file`: a file name (.h5, .hdf5, .nxs, no
        directories), created in the daemon's data directory; the result names its path."""
        body = protocol.start_recording_body(file, layout=layout, compression=compression, metadata=metadata)
        result: dict[str, Any] = self.action(protocol.START_RECORDING, body)
        return result

    def stop_recording(self) -> dict[str, Any]:
        """Stops the writer after its final flush; what the file holds (records, rows, lost)."""
        result: dict[str, Any] = self.action(protocol.STOP_RECORDING)
        return result

    # -- data ----------------------------------------------------------------------------------

    def reader(
        self,
        streams: list[str] | str | None = None,
        start: str = "latest",
        *,
        max_buffered: int = 1024,
        max_buffered_bytes: int = 64 << 20,
        coalesce_ms: float | None = 0.0,
    ) -> RemoteReader:
        """A live subscription to `streams` (None: all, including streams that appear later),
        from the ``"latest"`` record or the ``"oldest"`` still in the daemon's ring.
        `coalesce_ms`: the daemon sends the records that piled up together, and with more
        than 0 also holds records back that long to send them with those that follow (fewer
        messages for many subscribers of fast streams: see ``Ticket``); they are read here
        one record at a time, with their own sequence numbers, either way. None: each record
        a message of its own (as clients that do not know ``coalesce_ms`` get them)."""
        return RemoteReader(
            self,
            streams,
            start,
            max_buffered=max_buffered,
            max_buffered_bytes=max_buffered_bytes,
            coalesce_ms=coalesce_ms,
        )

    def latest_table(self, stream: str, rows: int = 1000) -> pa.Table:
        """The latest `rows` rows of `stream` as a table."""
        try:
            return self._client.do_get(
                ticket(stream, last_rows=rows), options=self.options(self._timeout)
            ).read_all()
        except fl.FlightError as e:
            raise _stream_error(e, stream, f"latest rows of {stream!r}") from None

    def latest(self, stream: str, rows: int = 1000) -> dict[str, np.ndarray[Any, Any]]:
        """The latest `rows` rows of `stream` as numpy arrays (tensor columns as (N, ...)),
        like ``RingBuffer.latest``."""
        table = self.latest_table(stream, rows).combine_chunks()
        return {name: _to_numpy(table.column(name).combine_chunks()) for name in table.schema.names}

    def put(self, stream: str, data: pa.RecordBatch | pa.Table) -> int:
        """Writes `data` into the daemon's ring as `stream` (a remote instrument); returns the
        ring sequence number of the last record."""
        batches = [data] if isinstance(data, pa.RecordBatch) else data.to_batches()
        if not batches:
            return -1
        with self.put_stream(stream, batches[0].schema) as put:
            for b in batches:
                seq = put.write(b)
        return seq

    def put_stream(self, stream: str, schema: pa.Schema) -> RemotePut:
        """An open ``do_put`` for sending many batches of `schema` to `stream`."""
        return RemotePut(self, stream, schema)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteDaq {self.url}>"


def _stream_error(e: BaseException, stream: str, what: str) -> RustDaqError:
    said = error_info(e)
    if said.code == protocol.UNKNOWN_STREAM:
        return UnknownStreamError(said.message)
    return _remote_error(e, what)


class RemotePut:
    """An open ``do_put`` to one stream: :meth:`write` each batch, then :meth:`close`."""

    def __init__(self, daq: RemoteDaq, stream: str, schema: pa.Schema) -> None:
        self.stream = stream
        self.schema = schema
        try:
            self._writer, self._acks = daq._client.do_put(
                fl.FlightDescriptor.for_path(stream), schema, options=daq.options()
            )
        except fl.FlightError as e:
            raise _remote_error(e, f"do_put to {stream!r}") from None

    def write(self, batch: pa.RecordBatch) -> int:
        """Sends `batch`; returns its sequence number in the daemon's ring once it is there.
        Raises ValueError if its schema is not the one this put was opened with."""
        if not batch.schema.equals(self.schema):
            raise ValueError(
                f"do_put to {self.stream!r} was opened for schema ({self.schema}), got a batch of "
                f"({batch.schema}); open another put_stream for the new schema"
            )
        try:
            self._writer.write_batch(batch)
            ack = self._acks.read()
        except fl.FlightError as e:
            raise _remote_error(e, f"do_put to {self.stream!r}") from None
        if ack is None:
            raise RemoteError(f"do_put to {self.stream!r}: the daemon closed the stream")
        return protocol.read_put_ack(ack)

    def close(self) -> None:
        try:
            self._writer.done_writing()
            self._writer.close()
        except fl.FlightError as e:
            raise _remote_error(e, f"do_put to {self.stream!r}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteReader(LossTotals):
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
                with self._cond:
                    self._error = _remote_error(e, f"stream {name!r}")
                    self._ended.add(name)
                    self._cond.notify_all()
                return
            with self._cond:  # the daemon stopped: everything it wrote was received
                self._ended.add(name)
                self._cond.notify_all()
            return

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

    def read_batches(
        self, max_records: int | None = None, timeout: float = 0.0
    ) -> list[tuple[str, pa.RecordBatch]]:
        """``(stream name, RecordBatch)`` pairs received so far, like ``RingReader.read_batches``."""
        return [(b.stream, b.batch) for b in self.read(max_records, timeout)]

    def read_table(self, stream: str, max_records: int | None = None, timeout: float = 0.0) -> pa.Table:
        """The batches of `stream` received so far as one table; batches of other streams read
        meanwhile are dropped (use a reader per stream), like ``RingReader.read_table``."""
        batches = [b for name, b in self.read_batches(max_records, timeout) if name == stream]
        if batches:
            return pa.Table.from_batches(batches)
        schemas = self.daq.streams()
        if stream not in schemas:
            raise UnknownStreamError(f"unknown stream {stream!r}; the daemon's streams: {', '.join(schemas)}")
        return schemas[stream].empty_table()

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
