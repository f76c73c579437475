"""JetStream as the HDF5 writer's input (``rust-daq write --from nats://HOST:4222/<prefix>``):
:class:`JetStreamSource` gives :class:`~rust_daq.hdf5.writer.HDF5Writer` what a ring gives it
(a reader at the last commit, records with sequence numbers, a schema table, ``commit()``),
so the file has the local writer's layouts, books and guarantees.

Exactly once into the file: a record's ``seq`` is its JetStream stream sequence, the number
the writer stores as its progress marker's ``last_seq`` with each flush. A writer started
on a file makes its durable pull consumer deliver from that marker on (the consumer is made
again at each start: the file, not the server, says what is written), skips what the file
holds, and acknowledges messages only after the flush that wrote them. Streams in the file
are named ``<host>.<stream>`` (:func:`~.protocol.stream_key`: a host with dots in its name
has them encoded); losses upstream (a publisher the ring lapped, messages the
stream's limits removed) show as gaps in each stream's ``Rdaq-Stream-Seq`` and are counted
in the file's books like a ring's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections import deque
from typing import Any

import pyarrow as pa

from .._arrow import StreamInfo, variable_length
from .._errors import JetStreamError, UnknownStreamError
from .._records import names_decode
from . import protocol
from ._loop import LoopThread
from .connection import Credentials, NatsUrl, connect_js, parse_url, patiently, stream_of, transient

__all__ = ["JetStreamSource"]

log = logging.getLogger("rust_daq.nats")

_FETCH = 256  # messages per pull request, at most
#: Bytes one pull request may ask for, at most (by the largest message seen so far): the
#: server cuts off a client that has more than its max_pending (64 MB by default) unread,
#: and the messages of that fetch come back only after ack_wait.
_FETCH_BYTES = 32 << 20
_BUFFER_BYTES = 256 << 20  # fetched, not yet committed: at most about this much in memory


class _Record:
    """A JetStream message as the writer reads a ring record."""

    __slots__ = (
        "data",
        "position",
        "rows_before",
        "schema_id",
        "seq",
        "stream",
        "stream_seq",
        "timestamp_ns",
    )
    zero_copy = False
    flags = 0

    def __init__(self, seq: int, info: protocol.MessageInfo, schema_id: int, data: bytes) -> None:
        self.seq = seq
        self.position = seq
        self.stream = 0
        self.stream_seq = info.stream_seq
        self.timestamp_ns = info.timestamp_ns
        self.rows_before = info.rows_before
        self.schema_id = schema_id
        self.data = data

    def valid(self) -> bool:
        return True  # (a private copy: nothing can overwrite it)

    def __len__(self) -> int:
        return len(self.data)


class _Schemas:
    """The schema table the writer's decoder reads: one id per (file stream, schema key),
    schemas from the bucket ``rdaq-schemas``."""

    def __init__(self) -> None:
        self.by_id: dict[int, StreamInfo] = {}
        self.bad_ids: set[int] = set()
        self._ids: dict[tuple[str, str], int] = {}
        self._latest: dict[str, StreamInfo] = {}

    def id_for(self, name: str, key: str, schema: pa.Schema | None) -> int:
        sid = self._ids.get((name, key))
        if sid is None:
            sid = self._ids[(name, key)] = len(self._ids) + 1
            if schema is None or not names_decode(schema):
                self.bad_ids.add(sid)
            else:
                full = any(variable_length(f.type) for f in schema)
                self.by_id[sid] = StreamInfo(name, 0, sid, schema, full)
        info = self.by_id.get(sid)
        if info is not None:
            self._latest[name] = info
        return sid

    def refresh(self) -> None:
        return None

    def info(self, schema_id: int) -> StreamInfo | None:
        return self.by_id.get(schema_id)

    def streams(self) -> dict[str, StreamInfo]:
        return dict(self._latest)

    def stream(self, name: str) -> StreamInfo:
        if name not in self._latest:
            raise UnknownStreamError(
                f"unknown stream {name!r}; streams so far: {', '.join(self._latest) or 'none'}"
            )
        return self._latest[name]


class _Reader:
    """A cursor over what the source fetched and the writer has not committed."""

    lost = 0

    def __init__(self, source: JetStreamSource, at_end: bool) -> None:
        self.source = source
        with source._lock:
            self._index = len(source._buffer) if at_end else 0
            self._base = source._dropped  # entries committed (dropped) before our index 0

    @property
    def next_seq(self) -> int:
        return self.source.records_written

    def read(self, max_records: int | None = None, timeout: float = 0.0, copy: bool = True) -> list[Any]:
        s = self.source
        s.raise_error()
        with s._lock:
            start = self._index - (s._dropped - self._base)
            start = max(start, 0)
            out: list[Any] = []
            i = start
            while i < len(s._buffer) and (max_records is None or len(out) < max_records):
                rec = s._buffer[i][0]
                if rec is not None:
                    out.append(rec)
                i += 1
            self._index, self._base = i, s._dropped
        return out

    def commit(self) -> None:
        """Acknowledges what this reader read (after the writer's flush)."""
        s = self.source
        with s._lock:
            n = self._index - (s._dropped - self._base)
            done = [s._buffer.popleft() for _ in range(max(n, 0))]
            s._dropped += len(done)
            self._index, self._base = 0, s._dropped
            s._bytes -= sum(len(r.data) for r, _ in done if r is not None)
        s.ack([m for _, m in done])


class JetStreamSource:
    """The messages of a prefix's JetStream stream, as an HDF5 writer's ring. Connects at
    construction (JetStreamError if the server, the credentials, JetStream or the stream are
    not there); :meth:`close` ends it. `durable`: the consumer's name (default: from the
    output file's path), one per output file."""

    dense = False  # sequence gaps are other messages (markers, other subjects), not losses

    def __init__(
        self,
        url: str | NatsUrl,
        *,
        output: str,
        prefix: str | None = None,
        credentials: Credentials | None = None,
        durable: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.url = parse_url(url) if isinstance(url, str) else url
        self.prefix = protocol.check_prefix(prefix or self.url.prefix or protocol.DEFAULT_PREFIX)
        self.stream = protocol.stream_name(self.prefix)
        self.path = f"{','.join(self.url.servers)}/{self.prefix}"
        digest = hashlib.sha256(os.path.abspath(output).encode()).hexdigest()[:16]
        self.durable = durable or f"rdaq-writer-{digest}"
        self._credentials = credentials or Credentials.from_env()
        self._timeout = timeout
        self._lock = threading.Lock()
        self._buffer: deque[tuple[_Record | None, Any]] = deque()
        self._dropped = 0
        self._bytes = 0
        self._high = 0  # the highest stream sequence fetched
        self._largest = 0  # the largest message fetched (0: none yet, fetch one)
        self._fetch_bytes = _FETCH_BYTES  # what one pull asks for at most (halved after losses)
        # (consumer's deliveries, ours) when the server had delivered more than arrived
        self._short: tuple[int, int] | None = None
        self._start: int | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._schemas = _Schemas()
        self._schema_cache: dict[str, pa.Schema | None] = {}
        self._loop = LoopThread("rust-daq-jetstream")
        self._seek_event = asyncio.Event()
        try:
            self.session_id = self._call(self._connect())
        except JetStreamError:
            self.close()
            raise
        except Exception as e:
            self.close()
            if not type(e).__module__.startswith("nats"):
                raise
            raise JetStreamError(f"JetStream at {self.path} failed: {type(e).__name__}: {e}") from None

    # -- what the writer asks of a ring ----------------------------------------------------

    def schema_table(self) -> _Schemas:
        return self._schemas

    def reader(self, start: str = "tail") -> _Reader:
        return _Reader(self, at_end=start == "latest")

    @property
    def read_tail_seq(self) -> int:
        with self._lock:
            first = next((m.metadata.sequence.stream for _, m in self._buffer), None)
        return int(first) if first is not None else self._high + 1

    @property
    def records_written(self) -> int:
        return self._high + 1

    def seek(self, held: int) -> None:
        """Delivery from the record after `held` (the file's last), once per source: the
        durable consumer is made again there."""
        if self._start is None:
            self._start = max(held + 1, 1)
            self._call(self._subscribe(self._start))

    def raise_error(self) -> None:
        # Kept, not cleared: the fetch loop has ended, so every later read fails as this one.
        if self._error is not None:
            raise self._error

    def ack(self, msgs: list[Any]) -> None:
        if msgs and not self._closed:
            self._loop.submit(self._ack(msgs))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.close(self._shutdown)

    # -- the fetch loop (on the source's own event loop) -----------------------------------

    def _call(self, coro: Any) -> Any:
        return self._loop.call(coro)

    async def _connect(self) -> str:
        self._nc, self._js = await connect_js(
            self.url, self._credentials, timeout=self._timeout, name="rust-daq write"
        )
        info = await patiently(lambda: stream_of(self._js, self.prefix, self.url))
        self.stream = info.config.name
        import nats.js.errors

        try:
            self._kv = await patiently(lambda: self._js.key_value(protocol.SCHEMAS_BUCKET))
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            raise JetStreamError(
                f"the bucket {protocol.SCHEMAS_BUCKET} is missing: no publisher ran on this server"
            ) from None
        self._objects: Any = None
        created = info.created if getattr(info, "created", None) else ""
        # (the prefix too: one stream may hold several prefixes, and a file is one prefix's)
        return f"jetstream:{self.stream}:{created}:{self.prefix}"

    async def _subscribe(self, start: int) -> None:
        await patiently(lambda: self._consumer(start))
        self._high = start - 1
        self._fetcher = asyncio.get_running_loop().create_task(self._fetch_loop())

    async def _consumer(self, start: int) -> None:
        self._delivered = 0  # the consumer's own delivery count: a gap is deliveries lost
        self._short = None
        old = getattr(self, "_sub", None)
        if old is not None:
            try:
                await old.unsubscribe()
            except Exception as e:  # (its connection is being replaced)
                log.debug("unsubscribing the previous consumer: %s", e)
        import nats.js.api as api
        import nats.js.errors

        try:
            await self._js.delete_consumer(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            pass
        config = api.ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=300.0,
            max_ack_pending=-1,
            filter_subject=protocol.records_filter(self.prefix),
        )
        self._sub = await self._js.pull_subscribe(
            protocol.records_filter(self.prefix), durable=self.durable, stream=self.stream, config=config
        )

    async def _fetch_loop(self) -> None:
        """Fetches until the source closes. It never ends silently while the writer waits:
        a failure it cannot retry (or a bug of ours) is the writer's next read's error."""
        try:
            await self._fetching()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self._closed:
                log.error("JetStream fetch stopped: %s: %s", type(e).__name__, e)
                self._error = (
                    e
                    if isinstance(e, JetStreamError)
                    else JetStreamError(
                        f"fetching from JetStream at {self.path} stopped: {type(e).__name__}: {e}"
                    )
                )

    async def _fetching(self) -> None:
        import nats.errors

        again: int | None = None  # deliver again from this message: the consumer to make anew
        while not self._closed:
            if again is not None:
                try:
                    await patiently(lambda start=again: self._consumer(start))
                except Exception as e:
                    if not transient(e) or isinstance(e, nats.errors.ConnectionClosedError):
                        raise
                    # (the server away longer than patiently waits: the client reconnects
                    # for ever; so do we)
                    log.warning(
                        "JetStream consumer not made again yet (%s: %s); retrying", type(e).__name__, e
                    )
                    await asyncio.sleep(0.5)
                    continue
                again = None
            if self._bytes > _BUFFER_BYTES:
                await asyncio.sleep(0.01)
                continue
            try:
                batch = min(_FETCH, self._fetch_bytes // self._largest) if self._largest else 1
                msgs = await self._sub.fetch(max(batch, 1), timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                if await self._deliveries_lost():
                    self._fetch_bytes = max(self._fetch_bytes // 2, 1)
                    again = self._high + 1
                continue
            except nats.errors.ConnectionClosedError:
                if self._closed:
                    return
                raise JetStreamError(f"the connection to JetStream at {self.path} closed") from None
            except Exception as e:  # the server away: the client reconnects, fetch again
                log.warning("JetStream fetch: %s: %s", type(e).__name__, e)
                await asyncio.sleep(0.25)
                continue
            self._largest = max([self._largest, *(len(m.data) for m in msgs)])
            for m in msgs:
                delivered = int(m.metadata.sequence.consumer)
                if delivered > self._delivered + 1:
                    # Deliveries lost on the way (a connection dropped during a fetch, a
                    # slow-consumer disconnect): the server would send them again only after
                    # ack_wait, out of order. Deliver again from the message after the last
                    # one we have, at once and in order.
                    log.warning(
                        "JetStream deliveries %d..%d did not arrive; delivering again from message %d",
                        self._delivered + 1,
                        delivered - 1,
                        self._high + 1,
                    )
                    # (and ask for half as much at a time: the server's max_pending is lower)
                    self._fetch_bytes = max(self._fetch_bytes // 2, 1)
                    again = self._high + 1
                    break
                self._delivered = delivered
                await self._add(m)  # (an error here is a bug of ours, not a bad message)

    async def _deliveries_lost(self) -> bool:
        """After a fetch that got nothing: whether the server delivered more than arrived. A
        slow-consumer disconnect can take every delivery of a fetch with it, the last of the
        stream's messages among them: no later one then shows the gap, and the server would
        send them again only after ack_wait (300 s)."""
        try:
            info = await self._sub.consumer_info()
        except Exception as e:  # (the server away: the next fetch says so)
            log.debug("JetStream consumer info: %s: %s", type(e).__name__, e)
            return False
        sent = int(info.delivered.consumer_seq) if info.delivered is not None else 0
        # Lost only if seen twice, nothing having arrived in between (a 0.5 s fetch): a
        # delivery still on its way when a fetch timed out is not fetched again for nothing.
        seen, self._short = self._short, (sent, self._delivered) if sent > self._delivered else None
        if seen is None or self._short is None or seen[1] != self._delivered:
            return False
        self._short = None
        log.warning(
            "JetStream deliveries %d..%d did not arrive; delivering again from message %d",
            self._delivered + 1,
            sent,
            self._high + 1,
        )
        return True

    async def _add(self, m: Any) -> None:
        seq = int(m.metadata.sequence.stream)
        if seq <= self._high:
            return  # a redelivery of what is buffered, or committed
        self._high = seq
        try:
            info = protocol.parse(m.headers)
        except ValueError as e:
            log.warning("message %d on %s: %s; skipped", seq, m.subject, e)
            info = None
        rec: _Record | None = None
        if info is not None and info.kind == "batch":
            name = protocol.stream_key(info.host, info.stream)
            key = info.schema or ""
            if key not in self._schema_cache:
                self._schema_cache[key] = await self._schema(key)
            sid = self._schemas.id_for(name, key, self._schema_cache[key])
            data: bytes | None = bytes(m.data)
            if info.object is not None:
                data = await self._object(info.object, seq)
            if data is not None:
                rec = _Record(seq, info, sid, data)
        with self._lock:
            self._buffer.append((rec, m))
            if rec is not None:
                self._bytes += len(rec.data)

    async def _schema(self, key: str) -> pa.Schema | None:
        import nats.js.errors

        try:
            entry = await self._kv.get(key)
            return pa.ipc.read_schema(pa.py_buffer(entry.value or b""))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            log.error("schema %s is not in %s: its records are quarantined", key, protocol.SCHEMAS_BUCKET)
        except (pa.ArrowInvalid, ValueError) as e:
            log.error("schema %s does not decode: %s", key, e)
        return None

    async def _object(self, name: str, seq: int) -> bytes | None:
        import nats.js.errors

        try:
            if self._objects is None:
                self._objects = await self._js.object_store(protocol.object_bucket(self.prefix))
            return bytes((await self._objects.get(name)).data or b"")
        except (
            nats.js.errors.NotFoundError,
            nats.js.errors.ObjectNotFoundError,
            nats.js.errors.BucketNotFoundError,
        ) as e:
            log.error("message %d: its object %s is gone (%s): counted as lost", seq, name, type(e).__name__)
            return None

    async def _ack(self, msgs: list[Any]) -> None:
        for m in msgs:
            try:
                await m.ack()
            except Exception as e:  # (redelivered later, and skipped: the file says it has it)
                log.debug("ack: %s", e)
                return

    async def _shutdown(self) -> None:
        fetcher = getattr(self, "_fetcher", None)
        if fetcher is not None:
            fetcher.cancel()
        nc = getattr(self, "_nc", None)
        if nc is not None:
            try:
                await nc.flush(1)
            except Exception:
                pass
            await nc.close()
