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

:func:`relay` is the remote HDF5 writer (``rust-daq write --from grpc://...``): it copies the
daemon's streams into a ring on this machine and runs the ordinary writer on it, so the file
has the local writer's layouts and guarantees; what was lost upstream stays counted.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
from .server import ticket

__all__ = ["RemoteBatch", "RemoteDaq", "RemoteError", "RemoteReader", "connect", "relay"]

log = logging.getLogger("rust_daq.remote")


def _clean(e: BaseException) -> str:
    """A Flight error's message without gRPC's appendix."""
    return re.split(r"\. Detail: |\. gRPC client debug context", str(e), maxsplit=1)[0]


def _remote_error(e: BaseException, what: str) -> RemoteError:
    if isinstance(e, fl.FlightUnavailableError):
        return RemoteError(f"{what}: the daemon cannot be reached ({_clean(e)})")
    message = _clean(e)
    if type(e) is fl.FlightServerError:  # the daemon's own message, which names the request
        return RemoteError(message)
    return RemoteError(f"{what}: {message}")


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
        payload = json.dumps(body or {}).encode()
        try:
            results = list(self._client.do_action(fl.Action(kind, payload), options=self.options(120)))
        except fl.FlightError as e:
            raise _remote_error(e, kind) from None
        return json.loads(results[0].body.to_pybytes()) if results else None

    def status(self) -> dict[str, Any]:
        """Streams (rows, records, rows/s), ring (fill, records written and lost), writer
        (recording, file, lag), subscribers."""
        result: dict[str, Any] = self.action("status")
        return result

    def list_streams(self) -> dict[str, dict[str, str]]:
        """Every stream with its columns (name: Arrow type)."""
        result: dict[str, dict[str, str]] = self.action("list_streams")
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
        body: dict[str, Any] = {"file": file, "layout": layout, "metadata": metadata or {}}
        if compression:
            body["compression"] = compression
        result: dict[str, Any] = self.action("start_recording", body)
        return result

    def stop_recording(self) -> dict[str, Any]:
        """Stops the writer after its final flush; what the file holds (records, rows, lost)."""
        result: dict[str, Any] = self.action("stop_recording")
        return result

    # -- data ----------------------------------------------------------------------------------

    def reader(
        self,
        streams: list[str] | str | None = None,
        start: str = "latest",
        *,
        max_buffered: int = 1024,
        max_buffered_bytes: int = 64 << 20,
    ) -> RemoteReader:
        """A live subscription to `streams` (None: all, including streams that appear later),
        from the ``"latest"`` record or the ``"oldest"`` still in the daemon's ring."""
        return RemoteReader(
            self, streams, start, max_buffered=max_buffered, max_buffered_bytes=max_buffered_bytes
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
    if "unknown stream" in str(e):
        return UnknownStreamError(_clean(e))
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
        seq: int = json.loads(ack.to_pybytes())["seq"]
        return seq

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


class RemoteReader:
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
    ) -> None:
        if start not in ("latest", "oldest"):
            raise ValueError(f'start must be "latest" or "oldest", got {start!r}')
        self.daq = daq
        self.start = start
        self._want = [streams] if isinstance(streams, str) else streams
        if max_buffered < 1 or max_buffered_bytes < 1:
            raise ValueError("max_buffered and max_buffered_bytes must be at least 1")
        self._max = max_buffered
        self._max_bytes = max_buffered_bytes
        self._buf: deque[RemoteBatch] = deque()
        self._buf_bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._threads: dict[str, threading.Thread] = {}
        self._calls: dict[str, fl.FlightStreamReader] = {}
        self._ended: set[str] = set()
        self._lost: dict[str, tuple[int, int | None]] = {}
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
        base: tuple[int, int | None] = (0, 0)  # lost before a resubscription
        while not self._closed:
            try:
                call = self.daq._client.do_get(
                    ticket(name, start, after_seq=after), options=self.daq.options()
                )
                self._calls[name] = call
                while True:
                    try:
                        chunk = call.read_chunk()
                    except StopIteration:
                        break
                    meta = json.loads(chunk.app_metadata.to_pybytes())
                    item = RemoteBatch(
                        name,
                        chunk.data,
                        meta["seq"],
                        meta["stream_seq"],
                        meta["timestamp_ns"],
                        base[0] + meta["lost_records"],
                        None if base[1] is None or meta["lost_rows"] is None else base[1] + meta["lost_rows"],
                    )
                    with self._cond:
                        while (
                            self._buf
                            and (len(self._buf) >= self._max or self._buf_bytes >= self._max_bytes)
                            and not self._closed
                        ):
                            self._cond.wait(0.1)
                        if self._closed:
                            return
                        self._buf.append(item)
                        self._buf_bytes += item.batch.nbytes
                        self._last_seq[name] = item.seq
                        self._lost[name] = (item.lost_records, item.lost_rows)
                        self._cond.notify_all()
            except fl.FlightError as e:
                if self._closed:
                    return
                if "changed its schema" in str(e) and name in self._last_seq:
                    after = self._last_seq[name]  # resume right after the last record we have
                    base = self._lost[name]
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

    @property
    def lost_records(self) -> int:
        """Records this subscriber lost (lapped in the daemon's ring), all streams."""
        return sum(lost for lost, _ in self._lost.values())

    @property
    def lost_rows(self) -> int | None:
        """Rows in those records; None if the daemon no longer knew for some of them."""
        rows = [r for _, r in self._lost.values()]
        return None if any(r is None for r in rows) else sum(r for r in rows if r is not None)

    def lost_by_stream(self) -> dict[str, tuple[int, int | None]]:
        """Per stream: (records lost, rows lost or None)."""
        return dict(self._lost)

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
            out = [self._buf.popleft() for _ in range(n)]
            self._buf_bytes -= sum(b.batch.nbytes for b in out)
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


def relay(
    url: str,
    output: str,
    *,
    token: str | None = None,
    tls_root_certs: bytes | str | os.PathLike[str] | None = None,
    layout: str = "append",
    compression: str | None = None,
    flush_interval: float = 1.0,
    capacity_mb: float = 256,
    metadata: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
    on_ready: Any = None,
) -> dict[str, Any]:
    """The remote HDF5 writer: subscribes to every stream of the daemon at `url` from the
    oldest record its ring holds, writes the batches into a ring on this machine (keeping
    their timestamps and per-stream sequence numbers, so records lost upstream are counted
    as lost in the file), and runs the ordinary writer process on that ring into `output`.
    Runs until the daemon stops (its streams end) or `stop` is set; then the writer's final
    flush. Returns records relayed and lost per stream."""
    from .._ring import RingBuffer
    from ..hdf5.options import WriterOptions
    from ..hdf5.process import start_process, stop_process

    if os.path.exists(output):
        raise RustDaqError(f"{output} already exists; choose another output file (or delete it)")
    daq = connect(url, token=token, tls_root_certs=tls_root_certs)
    path = (
        f"/dev/shm/rust-daq-relay-{os.getpid()}"
        if os.path.isdir("/dev/shm")
        else f"rust-daq-relay-{os.getpid()}"
    )
    ring = RingBuffer.create(path, capacity_mb=capacity_mb, replace=True)
    stats: dict[str, dict[str, Any]] = {}
    writer = None
    try:
        meta = {"relayed_from": url, **(metadata or {})}
        writer = start_process(
            WriterOptions(
                ring=ring.path,
                output=output,
                layout=layout,
                flush_interval=flush_interval,
                compression=compression,
                metadata=meta,
            )
        )
        with daq.reader(start="oldest") as reader:
            if on_ready is not None:
                on_ready()
            while True:
                stopping = stop is not None and stop.is_set()
                # Stopping: what was received is still written (no wait for more).
                items = reader.read(timeout=0.0 if stopping else 0.2)
                for b in items:
                    ring.write_arrow_batch(
                        b.batch, b.stream, timestamp_ns=b.timestamp_ns, stream_seq=b.stream_seq
                    )
                    st = stats.setdefault(b.stream, {"records": 0, "rows": 0})
                    st["records"] += 1
                    st["rows"] += b.batch.num_rows
                if not items and (stopping or reader.ended):
                    break
                if writer.poll() is not None:  # nothing would write the ring into the file
                    _, err = writer.communicate()
                    code, writer = writer.returncode, None
                    last = err.strip().splitlines()[-1:] or ["no message"]
                    raise RustDaqError(f"the writer process exited with {code}: {last[0]}")
            for name, (lost, rows) in reader.lost_by_stream().items():
                stats.setdefault(name, {"records": 0, "rows": 0}).update(lost_records=lost, lost_rows=rows)
    finally:
        if writer is not None:
            code, err = stop_process(writer)
            if code != 0:
                log.error("the writer exited with %d: %s", code, err.strip())
        ring.close()
        try:
            os.unlink(ring.path)
        except FileNotFoundError:
            pass
        daq.close()
    return stats
