"""Live readers of a prefix's JetStream stream, with the reading API of a ring's
``RingReader`` and of :class:`rust_daq.remote.RemoteReader`::

    import rust_daq.nats
    with rust_daq.nats.connect("nats://nats-host:4222/rdaq") as daq:
        daq.streams()                               # {"<host>.<stream>": pyarrow.Schema}
        with daq.reader(start="oldest") as reader:
            for b in reader.read(timeout=1.0):      # JetStreamBatch: stream, batch, seq...
                ...

A reader is an ephemeral pull consumer without acknowledgements (``AckPolicy.NONE``) that
fetches only while its buffer has room (``max_buffered`` batches, ``max_buffered_bytes``):
it never slows a publisher or the HDF5 writer, and what it has not fetched stays in
JetStream. A consumer the server removed (a reader paused past the inactivity threshold, a
server restart) is made again after the last message received. Streams are named
``<host>.<stream>`` as in the HDF5 file; schemas come from the bucket ``rdaq-schemas`` and
large records from the object store, so a reader that starts late decodes everything.

Losses upstream are counted per stream (``lost_records``, ``lost_rows``): a publisher's loss
markers (its ring lapped it) and gaps in ``Rdaq-Stream-Seq`` (messages the stream's limits
removed), rows exactly where the publisher knew them (``Rdaq-Rows-Before``,
``Rdaq-Lost-Rows``); a marker and the record after it count the same loss once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import pyarrow as pa

from .._errors import JetStreamError, UnknownStreamError
from .._records import BatchReads, LossTotals, names_decode
from . import protocol
from ._consumer import Consumer, Losses, subjects_of, transient
from ._loop import LoopThread
from .connection import Credentials, NatsUrl, connect_js, parse_url, stream_of

__all__ = ["JetStreamBatch", "JetStreamDaq", "JetStreamReader", "connect"]

log = logging.getLogger("rust_daq.nats")

_FETCH = 256  # messages per pull request, at most
_MAX_SUBJECTS = 8  # a filter on more subjects than this reads all of the prefix (and filters)
_T = TypeVar("_T")

Start = Literal["oldest", "latest"] | int


@dataclass(frozen=True)
class JetStreamBatch:
    """One record of a stream as a reader receives it: the batch, its JetStream stream
    sequence (``seq``), its sequence number in its stream upstream, the publisher's host, and
    what this reader had lost of the stream up to it (``lost_rows`` None once unknown)."""

    stream: str
    batch: pa.RecordBatch
    seq: int
    stream_seq: int | None
    timestamp_ns: int
    host: str
    lost_records: int
    lost_rows: int | None


def connect(
    url: str | NatsUrl,
    *,
    prefix: str | None = None,
    credentials: Credentials | None = None,
    timeout: float = 5.0,
) -> JetStreamDaq:
    """Connects to the JetStream stream of a prefix: ``nats://host:port[/prefix]`` (several
    servers comma-separated; `prefix` overrides the URL's, default ``rdaq``). `credentials`:
    default from the environment (:class:`Credentials`). Raises JetStreamError saying what is
    wrong: a bad URL, no server there, refused credentials, no JetStream, no stream for the
    prefix."""
    return JetStreamDaq(url, prefix=prefix, credentials=credentials, timeout=timeout)


class JetStreamDaq:
    """A connection to a prefix's JetStream stream (see :func:`connect`), on a private asyncio
    loop in a daemon thread; :meth:`reader` makes live readers, :meth:`close` ends them all."""

    def __init__(
        self,
        url: str | NatsUrl,
        *,
        prefix: str | None = None,
        credentials: Credentials | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.url = parse_url(url) if isinstance(url, str) else url
        self.prefix = protocol.check_prefix(prefix or self.url.prefix or protocol.DEFAULT_PREFIX)
        self.stream = protocol.stream_name(self.prefix)  # (the one holding <prefix>.>, once connected)
        self.timeout = timeout
        self._credentials = credentials or Credentials.from_env()
        self._readers: list[JetStreamReader] = []
        self._schemas: dict[str, pa.Schema | None] = {}  # by key; on the loop only
        self._objects: Any = None
        self._nc: Any = None
        self._closed = False
        self._loop = LoopThread("rust-daq-nats-read")
        try:
            self._call(self._connect())
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, _T], what: str = "") -> _T:
        if self._closed:
            coro.close()
            raise JetStreamError(f"{self!r} is closed")
        try:
            return self._loop.call(coro)
        except JetStreamError:
            raise
        except transient() as e:
            import nats.js.errors

            where = ",".join(self.url.servers)
            if isinstance(e, nats.js.errors.APIError) and e.code != 503:
                raise JetStreamError(f"JetStream at {where} refused{what}: {e.description or e}") from None
            raise JetStreamError(
                f"JetStream at {where} does not answer{what} ({type(e).__name__}: {e})"
            ) from None

    async def _connect(self) -> None:
        import nats.js.errors

        self._nc, self._js = await connect_js(
            self.url, self._credentials, timeout=self.timeout, name="rust-daq read"
        )
        self.stream = (await stream_of(self._js, self.prefix, self.url)).config.name
        try:
            self._kv = await self._js.key_value(protocol.SCHEMAS_BUCKET)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            raise JetStreamError(
                f"the bucket {protocol.SCHEMAS_BUCKET} is missing at {','.join(self.url.servers)}: "
                "no publisher ran on this server"
            ) from None

    @property
    def connected(self) -> bool:
        """Whether the client is connected now (while not, it reconnects, and readers wait)."""
        return bool(self._nc is not None and self._nc.is_connected)

    # -- streams and schemas ---------------------------------------------------------------

    def streams(self) -> dict[str, pa.Schema]:
        """Every stream published under the prefix (``<host>.<stream>``) and the schema of its
        latest record."""
        return self._call(self._streams(), " (listing the streams)")

    def name_of(self, subject: str) -> str | None:
        """The stream name (``<host>.<stream>``) of a record subject; None for another subject."""
        head = self.prefix + "."
        parts = subject[len(head) :].split(".") if subject.startswith(head) else []
        return (
            protocol.stream_key(protocol.untoken(parts[0]), protocol.untoken(parts[1]))
            if len(parts) == 2
            else None
        )

    async def _streams(self) -> dict[str, pa.Schema]:
        info = await self._js.stream_info(self.stream, subjects_filter=protocol.records_filter(self.prefix))
        found: dict[str, tuple[int, pa.Schema]] = {}
        for subject in info.state.subjects or {}:
            name = self.name_of(subject)
            last = None if name is None else await self._last_schema(subject)
            if name is not None and last is not None and (name not in found or last[0] > found[name][0]):
                found[name] = last
        return {name: schema for name, (_, schema) in sorted(found.items())}

    async def _last_schema(self, subject: str) -> tuple[int, pa.Schema] | None:
        """(seq, schema) of the last message on `subject`, or of its first if the last carries
        none (a loss marker whose record is not there yet)."""
        import nats.js.errors

        try:
            msgs = [await self._js.get_last_msg(self.stream, subject)]
            if not (msgs[0].headers or {}).get(protocol.Header.SCHEMA):
                msgs.append(await self._js.get_msg(self.stream, seq=1, subject=subject, next=True))
        except nats.js.errors.NotFoundError:
            return None  # (removed meanwhile)
        for m in msgs:
            schema = await self._schema((m.headers or {}).get(protocol.Header.SCHEMA))
            if schema is not None:
                return int(m.seq), schema
        return None

    async def _schema(self, key: str | None) -> pa.Schema | None:
        """A schema from the bucket (cached); None if it is missing or does not decode."""
        import nats.js.errors

        if not key:
            return None
        if key not in self._schemas:
            schema = None
            try:
                entry = await self._kv.get(key)
                schema = pa.ipc.read_schema(pa.py_buffer(entry.value or b""))
                if not names_decode(schema):
                    raise ValueError("field names that are not UTF-8")
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                log.error("schema %s is not in %s: its records are lost", key, protocol.SCHEMAS_BUCKET)
            except (pa.ArrowException, ValueError) as e:
                log.error("schema %s does not decode (%s): its records are lost", key, e)
                schema = None
            self._schemas[key] = schema
        return self._schemas[key]

    async def _object(self, name: str) -> bytes | None:
        import nats.js.errors

        try:
            if self._objects is None:
                self._objects = await self._js.object_store(protocol.object_bucket(self.prefix))
            return bytes((await self._objects.get(name)).data or b"")
        except (  # (ObjectNotFound, ObjectDeleted, BucketNotFound are NotFoundErrors)
            nats.js.errors.NotFoundError,
            nats.js.errors.DigestMismatchError,
            nats.js.errors.BadObjectMetaError,
        ) as e:
            log.error("object %s is gone (%s): its record is lost", name, type(e).__name__)
            return None

    # -- readers -----------------------------------------------------------------------------

    def reader(
        self,
        streams: list[str] | str | None = None,
        start: Start = "oldest",
        *,
        max_buffered: int = 1024,
        max_buffered_bytes: int = 64 << 20,
    ) -> JetStreamReader:
        """A live reader of `streams` (names ``<host>.<stream>``; None: every stream, those
        that appear later too) from `start`: ``"oldest"`` (all the stream holds),
        ``"latest"`` (what is published from now on) or a JetStream sequence number."""
        return JetStreamReader(
            self, streams, start, max_buffered=max_buffered, max_buffered_bytes=max_buffered_bytes
        )

    def close(self) -> None:
        """Closes the readers and the connection."""
        if self._closed:
            return
        self._closed = True
        for r in list(self._readers):
            r.close()
        self._loop.close(self._shutdown)

    async def _shutdown(self) -> None:
        try:
            if self._nc is not None:
                await self._nc.close()
        except Exception as e:  # (a client that was reconnecting)
            log.debug("closing the NATS connection: %s", e)
        # What the client cancelled runs to its end before the loop closes (as asyncio.run does).
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<JetStreamDaq {self.url} stream {self.stream}{' closed' if self._closed else ''}>"


class JetStreamReader(LossTotals, BatchReads):
    """A live reader of a prefix's streams (see :meth:`JetStreamDaq.reader`), with the API of
    ``RingReader`` and ``RemoteReader``: :meth:`read` (batches with their sequence numbers),
    :meth:`read_batches`, :meth:`read_table`, the loss counters, iteration."""

    _loss: Losses  # (the JetStream account: markers as well as gaps)

    def __init__(
        self,
        daq: JetStreamDaq,
        streams: list[str] | str | None,
        start: Start,
        *,
        max_buffered: int = 1024,
        max_buffered_bytes: int = 64 << 20,
    ) -> None:
        if isinstance(start, bool) or not (start in ("oldest", "latest") or isinstance(start, int)):
            raise ValueError(f'start must be "oldest", "latest" or a JetStream sequence, got {start!r}')
        if isinstance(start, int) and start < 1:
            raise ValueError(f"a JetStream sequence starts at 1, got {start}")
        if max_buffered < 1 or max_buffered_bytes < 1:
            raise ValueError("max_buffered and max_buffered_bytes must be at least 1")
        names = [streams] if isinstance(streams, str) else None if streams is None else list(streams)
        bad = [n for n in names or [] if not isinstance(n, str) or "." not in n[1:]]
        if bad:
            raise UnknownStreamError(
                f"stream name(s) {bad} are not <host>.<stream>; the streams: {', '.join(daq.streams()) or 'none'}"
            )
        self.daq, self.start = daq, start
        self._want = None if names is None else frozenset(names)
        self._max, self._max_bytes = max_buffered, max_buffered_bytes
        self._buf: deque[JetStreamBatch] = deque()
        self._buf_bytes = 0
        self._avg = 0.0  # bytes per batch (sizes the pull requests)
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._loss = Losses()  # per stream name; changed and read under _cond
        self._schemas: dict[str, pa.Schema] = {}  # the latest received per stream
        subjects = subjects_of(daq.prefix, names) if names is not None else []
        if names is None or len(subjects) > _MAX_SUBJECTS:
            subjects = [protocol.records_filter(daq.prefix)]
        self._consumers = [Consumer(self, s) for s in subjects]
        daq._readers.append(self)
        try:
            daq._call(self._open(), " (making the reader's consumer)")
        except BaseException:
            self.close()
            raise

    async def _open(self) -> None:
        info = await self.daq._js.stream_info(self.daq.stream)
        self._avg = info.state.bytes / info.state.messages if info.state.messages else 64 << 10
        for c in self._consumers:
            await c.open()
        for c in self._consumers:
            c.task = asyncio.get_running_loop().create_task(c.run())

    # -- the loop's side -------------------------------------------------------------------

    def _room(self) -> int:
        """Messages to fetch now: 0 while the buffer is full (at least one batch fits)."""
        with self._cond:
            n, left = self._max - len(self._buf), self._max_bytes - self._buf_bytes
            if self._buf and (n <= 0 or left <= 0):
                return 0
            return max(1, min(_FETCH, n, int(left // max(self._avg, 1.0))))

    def _take(self, seq: int, name: str, info: protocol.MessageInfo, batch: pa.RecordBatch | None) -> None:
        """A message of stream `name`: a loss marker, a record (None: one that cannot be given)."""
        with self._cond:
            if info.kind == "lost":
                self._loss.marker(name, info.stream_seq, info.lost_records, info.lost_rows)
                return
            if batch is None:
                self._loss.unreadable(name, info.stream_seq, info.rows, info.rows_before)
                return
            self._loss.record(name, info.stream_seq, batch.num_rows, info.rows_before)
            self._schemas[name] = batch.schema
            item = JetStreamBatch(
                name,
                batch,
                seq,
                info.stream_seq,
                info.timestamp_ns,
                info.host,
                self._loss.records(name),
                self._loss.rows(name),
            )
            self._buf.append(item)
            # (the memory it holds: RecordBatch.nbytes costs 3.7 µs a call, this 0.14)
            size = batch.get_total_buffer_size()
            self._buf_bytes += size
            self._avg = 0.9 * self._avg + 0.1 * size
            self._cond.notify_all()

    # -- the reader API ----------------------------------------------------------------------

    def read(self, max_records: int | None = None, timeout: float = 0.0) -> list[JetStreamBatch]:
        """The batches received so far (waiting up to `timeout` s for one), in JetStream order
        per stream, with their sequence numbers and loss counters."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._buf and not self._closed and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = len(self._buf) if max_records is None else min(max_records, len(self._buf))
            out = [self._buf.popleft() for _ in range(n)]
            self._buf_bytes -= sum(b.batch.get_total_buffer_size() for b in out)
            if not out and self._error is not None:
                err, self._error = self._error, None
                raise err
        return out

    def _schema_of(self, stream: str) -> pa.Schema:
        with self._cond:
            schema = self._schemas.get(stream)
        if schema is None:
            known = self.daq.streams()
            if stream not in known:
                raise UnknownStreamError(
                    f"unknown stream {stream!r}; the streams: {', '.join(known) or 'none'}"
                )
            schema = known[stream]
        return schema

    def __iter__(self) -> Iterator[JetStreamBatch]:
        """Every batch, as it arrives, until the reader is closed (JetStream streams do not end)."""
        while not self._closed:
            yield from self.read(timeout=0.5)

    def close(self) -> None:
        """Ends the reader and removes its consumers from the server."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self in self.daq._readers:
            self.daq._readers.remove(self)
        if self.daq._loop.running:
            try:
                self.daq._loop.call(self._stop(), 10)
            except Exception as e:
                log.debug("closing a reader: %s", e)

    async def _stop(self) -> None:
        tasks = [c.task for c in self._consumers if c.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in self._consumers:
            if c.sub is None:
                continue
            try:  # (the server away: it removes the consumer itself, once inactive)
                await c.sub.unsubscribe()
                if self.daq._nc.is_connected:
                    await asyncio.wait_for(self.daq._js.delete_consumer(self.daq.stream, c.name), 2.0)
            except Exception as e:
                log.debug("removing a consumer: %s", e)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
