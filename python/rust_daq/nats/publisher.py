"""The JetStream publisher (``rust-daq publish``, or a run's ``[nats]`` section): reads a ring
with its own cursor and publishes every record to JetStream (protocol.py says how), so that
storage and analysis hosts get the data durably, through network outages and restarts.

Guarantees (docs/distributed.md; tests/test_nats_*.py try to break each):

- Every record of the ring reaches the stream once: acknowledgements are awaited in order
  (up to `window` in flight), the position is stored (bucket ``rdaq-publishers``) only up
  to what was acknowledged, and a publisher killed and restarted re-sends from there; the
  server drops what it already has by ``Nats-Msg-Id`` (``<ring session>:<seq>``).
- While the server cannot be reached the publisher keeps its place in the ring and resends
  from the first record not acknowledged once it is back; what the ring overwrote meanwhile
  is published as loss markers (records exactly; rows exactly where a :class:`RowIndex`
  says them, i.e. a publisher inside the run, else as unknown).
- The acquisition never waits for it: it is a ring reader like any other.

(Over 500 lines: the send, settle and outage paths share the in-flight window and the
acknowledged position, and their order rules read best in one place.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .._arrow import StreamInfo
from .._errors import JetStreamError
from .._records import SchemaTable
from .._ring import RingBuffer
from ..acquisition import RowIndex
from . import protocol
from .connection import (
    Credentials,
    NatsUrl,
    buckets,
    connect_js,
    ensure_stream,
    object_store,
    parse_url,
    patiently,
)
from .connection import (
    transient as _transient,
)
from .protocol import Header

__all__ = ["Publisher", "PublisherStats"]

log = logging.getLogger("rust_daq.nats")

_RESEND_PAUSE = 0.25  # s between attempts while the server is away
#: Bytes in flight (sent, not acknowledged) at most, beside `window` messages: 512 frames of
#: 2 MiB read and queued at once cost more in copies and page faults than they gain.
_WINDOW_BYTES = 64 << 20


@dataclass
class PublisherStats:
    records: int = 0  #: records acknowledged by JetStream (this process)
    bytes: int = 0
    objects: int = 0  #: of which went through the object store (larger than max_payload)
    lost_records: int = 0  #: overwritten in the ring before the publisher read them
    outages: int = 0  #: times the server stopped answering (or refused for want of room)
    storage_full: int = 0  #: ...of which because its storage was full
    next_seq: int = 0  #: the next ring record to publish (acknowledged below it)
    by_stream: dict[str, int] = field(default_factory=dict)


_Msg = tuple[str, bytes, dict[str, str]]  # subject, payload, headers


@dataclass(slots=True)
class _Out:
    """A message sent and not yet acknowledged."""

    seq: int
    subject: str
    payload: bytes
    headers: dict[str, str]
    future: Any
    is_record: bool
    #: (stream, next stream_seq, rows) once this record is acknowledged: what a restart
    #: resuming after it must know (the position stores it)
    state: tuple[str, int | None, int | None] | None = None


class _StreamState:
    """Per stream: the next stream_seq expected and the rows published (None once a gap made
    them unknown)."""

    __slots__ = ("next_seq", "rows")

    def __init__(self, next_seq: int | None, rows: int | None) -> None:
        self.next_seq = next_seq
        self.rows = rows


class Publisher:
    """Publishes a ring's records to JetStream. ``await publisher.run(stop)`` until `stop` is
    set (then what was read is acknowledged and the position stored), or forever.

    `host`: this acquisition host's name in the subjects (default: the machine's); one
    publisher per (prefix, host). `start`: where a publisher with no stored position begins,
    ``"oldest"`` (what the ring holds; records it overwrote before count as lost) or
    ``"latest"``. `rows`: the run's RowIndex (a publisher in the acquisition's process), so
    that lost rows are known exactly. `replicas`: of the stream and buckets it creates (a
    cluster: 3). Raises JetStreamError (from ``run``) if the server cannot be used."""

    def __init__(
        self,
        ring: RingBuffer | str,
        url: str | NatsUrl,
        *,
        prefix: str | None = None,
        host: str | None = None,
        credentials: Credentials | None = None,
        rows: RowIndex | None = None,
        replicas: int = 1,
        start: Literal["oldest", "latest"] = "oldest",
        window: int = 512,
        ack_timeout: float = 5.0,
        save_interval: float = 0.5,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.url = parse_url(url) if isinstance(url, str) else url
        self.prefix = protocol.check_prefix(prefix or self.url.prefix or protocol.DEFAULT_PREFIX)
        self.host = host or socket.gethostname()
        if not self.host:
            raise ValueError("the host name must not be empty")
        if start not in ("oldest", "latest"):
            raise ValueError(f"start must be 'oldest' or 'latest', got {start!r}")
        if window < 1:
            raise ValueError("window must be at least 1")
        self.ring = ring if isinstance(ring, RingBuffer) else RingBuffer.open(ring)
        self.credentials = credentials or Credentials.from_env()
        self.rows = rows
        self.replicas = replicas
        self.start = start
        self.window = window
        self.ack_timeout = ack_timeout
        self.save_interval = save_interval
        self.on_ready = on_ready
        self.stats = PublisherStats()
        self.session = str(self.ring.session_id)
        self._schemas = SchemaTable(self.ring)
        self._schema_keys: dict[int, str] = {}
        self._streams: dict[str, _StreamState] = {}  # as sent
        self._acked_streams: dict[str, tuple[int | None, int | None]] = {}  # as acknowledged
        self._state: tuple[str, int | None, int | None] | None = None  # of the last record made
        self._subjects: dict[str, str] = {}
        self._host_token = protocol.token(self.host)
        self._key = protocol.position_key(self.prefix, self.host)
        self._saved = -1
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        #: Seconds a stopped publisher waits for a server that is away before giving up.
        self.stop_grace = 10.0
        self._js: Any = None
        self._inflight_bytes = 0

    # -- position ---------------------------------------------------------------------------

    async def _load(self, kv: Any) -> int:
        """The next ring record to publish: the stored position of this ring's session, else
        where `start` says."""
        import nats.js.errors

        try:
            entry = await kv.get(self._key)
            pos = json.loads(entry.value or b"{}")
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            pos = {}
        except ValueError:
            log.warning("the stored position of %s does not parse; starting afresh", self._key)
            pos = {}
        if pos.get("session") == self.session:
            for name, (next_seq, rows) in pos.get("streams", {}).items():
                self._streams[name] = _StreamState(next_seq, rows)
                self._acked_streams[name] = (next_seq, rows)
            log.info("resuming at ring record %d (stored position)", pos["next_seq"])
            return int(pos["next_seq"])
        if self.start == "latest":
            return int(self.ring.reader("latest").next_seq)
        return 0

    async def _save(self, kv: Any, next_seq: int) -> None:
        if next_seq == self._saved:
            return
        value = {
            "session": self.session,
            "next_seq": next_seq,
            "host": self.host,
            "ring": self.ring.path,
            "streams": {n: list(v) for n, v in self._acked_streams.items()},
            "time": time.time(),
        }
        await kv.put(self._key, json.dumps(value).encode())
        self._saved = next_seq

    # -- messages ---------------------------------------------------------------------------

    async def _schema_key(self, kv: Any, info: StreamInfo) -> str:
        key = self._schema_keys.get(info.schema_id)
        if key is None:
            key = protocol.schema_key(info.schema)
            await kv.put(key, info.schema.serialize().to_pybytes())
            self._schema_keys[info.schema_id] = key
        return key

    def _subject(self, name: str) -> str:
        s = self._subjects.get(name)
        if s is None:
            s = self._subjects[name] = protocol.subject(self.prefix, self.host, name)
        return s

    def _headers(self, rec: Any, name: str, kind: str) -> dict[str, str]:
        return {
            Header.KIND: kind,
            Header.HOST: self._host_token,
            Header.STREAM: protocol.token(name),
            Header.SESSION: self.session,
            Header.SEQ: str(rec.seq),
            Header.TIMESTAMP: str(rec.timestamp_ns),
        }

    def _loss_marker(self, rec: Any, name: str, st: _StreamState, lost: int, rows: int | None) -> _Msg:
        h = self._headers(rec, name, "lost")
        h[Header.MSG_ID] = f"{self.session}:{rec.seq}:lost"
        h[Header.STREAM_SEQ] = str(st.next_seq)
        h[Header.LOST_RECORDS] = str(lost)
        if rows is not None:
            h[Header.LOST_ROWS] = str(rows)
        return self._subject(name), b"", h

    async def _messages(self, rec: Any, schemas_kv: Any, objects: Any, limit: int) -> list[_Msg]:
        """The messages of one ring record: a loss marker first if its stream lost records
        before it, then the record (inline, or a pointer to the object store). Non-Arrow
        records and records whose schema does not decode are skipped (and logged)."""
        info = self._schemas.info(rec.schema_id) if rec.schema_id else None
        if info is None:
            log.warning("ring record %d is not an Arrow record of a known schema: not published", rec.seq)
            return []
        name = info.name
        data = rec.data
        payload = data if isinstance(data, bytes) else bytes(data)
        rows = _rows_of(payload, info)
        st = self._streams.get(name)
        if st is None:
            st = self._streams[name] = _StreamState(0 if self.start == "oldest" else rec.stream_seq, 0)
        before = self.rows.rows_before(rec.seq) if self.rows is not None else None
        out: list[_Msg] = []
        if rec.stream_seq is not None and st.next_seq is not None and rec.stream_seq > st.next_seq:
            lost = rec.stream_seq - st.next_seq
            lost_rows = before - st.rows if before is not None and st.rows is not None else None
            out.append(self._loss_marker(rec, name, st, lost, lost_rows))
            self.stats.lost_records += lost
            log.warning("stream %r: %d record(s) overwritten in the ring before publishing", name, lost)
            st.rows = before  # (None: unknown from here on, unless the RowIndex says them)
        if (
            before is None
            and st.rows is not None
            and (rec.stream_seq is None or rec.stream_seq == st.next_seq)
        ):
            before = st.rows  # every earlier record of the stream was published: we know
        h = self._headers(rec, name, "batch")
        h[Header.MSG_ID] = f"{self.session}:{rec.seq}"
        if rec.stream_seq is not None:
            h[Header.STREAM_SEQ] = str(rec.stream_seq)
        h[Header.ROWS] = str(rows)
        if before is not None:
            h[Header.ROWS_BEFORE] = str(before)
        h[Header.SCHEMA] = await self._schema_key(schemas_kv, info)
        if len(payload) + protocol.HEADER_ROOM > limit:
            obj = f"{self.session}.{rec.seq}"
            await _put_object(await objects(), obj, payload, limit)
            h[Header.OBJECT], h[Header.SIZE] = obj, str(len(payload))
            self.stats.objects += 1
            payload = b""
        out.append((self._subject(name), payload, h))
        st.next_seq = None if rec.stream_seq is None else rec.stream_seq + 1
        st.rows = None if before is None else before + rows
        self._state = (name, st.next_seq, st.rows)
        return out

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> PublisherStats:
        """Publishes until `stop` is set; then waits for the acknowledgements of what it sent,
        stores the position and returns the stats."""
        stop = stop or asyncio.Event()
        self._stop = stop

        def lost_connection() -> None:
            self._connected.clear()

        nc, js = await connect_js(
            self.url,
            self.credentials,
            name=f"rust-daq publish {self.host}",
            on_disconnect=lost_connection,
            on_reconnect=self._connected.set,
        )
        self._connected.set()
        self._js = js
        try:
            await patiently(lambda: ensure_stream(js, self.prefix, replicas=self.replicas))
            schemas_kv, positions_kv = await patiently(lambda: buckets(js, replicas=self.replicas))
            store: list[Any] = []

            async def objects() -> Any:
                if not store:
                    store.append(await object_store(js, self.prefix, replicas=self.replicas))
                return store[0]

            next_seq = await patiently(lambda: self._load(positions_kv))
            self.stats.next_seq = next_seq
            reader = self.ring.reader("oldest")
            if self.on_ready is not None:
                self.on_ready()
            await self._loop(nc, js, reader, next_seq, stop, schemas_kv, positions_kv, objects)
        finally:
            try:
                await nc.drain()
            except Exception:  # (closing a connection to a server that is gone)
                try:
                    await nc.close()
                except Exception as e:  # (...whose socket is gone too: nothing left to close)
                    log.debug("closing the NATS connection: %s", e)
        return self.stats

    async def _loop(
        self,
        nc: Any,
        js: Any,
        reader: Any,
        next_seq: int,
        stop: asyncio.Event,
        schemas_kv: Any,
        positions_kv: Any,
        objects: Callable[[], Any],
    ) -> None:
        inflight: deque[_Out] = deque()
        acked = next_seq  # every record below this one is acknowledged
        last_save = time.monotonic()
        limit = int(nc.max_payload)
        largest = 0  # the largest record read: read no more than _WINDOW_BYTES of them at once
        self._inflight_bytes = 0
        stop_at: int | None = None  # once stopped: the ring's records then, published first
        while True:
            if stop_at is None and stop.is_set():
                stop_at = int(reader.ring.records_written)
            stopping = stop_at is not None and next_seq >= stop_at
            batch = max(1, min(self.window, _WINDOW_BYTES // largest)) if largest else 1
            records = [] if stopping else reader.read(max_records=batch, timeout=0.0, copy=True)
            if records:
                largest = max(largest, max(len(r) for r in records))
            records = [r for r in records if r.seq >= next_seq and (stop_at is None or r.seq < stop_at)]
            for rec in records:
                try:
                    msgs = await self._messages(rec, schemas_kv, objects, limit)
                except Exception as e:  # the server went away while a schema or object was stored
                    if not _transient(e):
                        raise
                    await self._outage(e, inflight)
                    msgs = await self._messages_retrying(rec, schemas_kv, objects, limit)
                for i, (subject, payload, headers) in enumerate(msgs):
                    last = i == len(msgs) - 1
                    out = _Out(rec.seq, subject, payload, headers, None, last, self._state if last else None)
                    await self._send(js, out, inflight)
                    inflight.append(out)
                    self._inflight_bytes += len(payload)
                next_seq = rec.seq + 1
                if len(inflight) >= self.window or self._inflight_bytes >= _WINDOW_BYTES:
                    # Down to half the window: the next half is sent in one go (a few
                    # writes to the socket, not one per message and loop pass).
                    while len(inflight) > self.window // 2 or self._inflight_bytes > _WINDOW_BYTES // 2:
                        acked = await self._settle(js, inflight, acked)
            if not records:
                while inflight:
                    acked = await self._settle(js, inflight, acked)
                if stop_at is not None:
                    acked = max(acked, next_seq)
                    self.stats.next_seq = acked
                    await self._save_retrying(positions_kv, acked)
                    return
                if not inflight:
                    acked = next_seq
                await _wait_for_ring(reader, stop)
            now = time.monotonic()
            # (while messages are in flight too: the position is what was acknowledged, with
            # each stream's state as of its last acknowledged record)
            if now - last_save >= self.save_interval:
                self.stats.next_seq = acked
                try:
                    await self._save(positions_kv, acked)
                except Exception as e:
                    if not _transient(e):
                        raise
                last_save = now

    async def _save_retrying(self, kv: Any, next_seq: int, patience: float = 30.0) -> None:
        """The final save: retried while the server is away (a restart re-sends otherwise,
        and the dedup window drops it, but only for two minutes)."""
        deadline = time.monotonic() + patience
        while True:
            try:
                return await self._save(kv, next_seq)
            except Exception as e:
                if not _transient(e) or time.monotonic() > deadline:
                    log.error(
                        "the position could not be stored (%s); a restart re-sends from the last one", e
                    )
                    return
                await asyncio.sleep(_RESEND_PAUSE)

    async def _messages_retrying(
        self, rec: Any, schemas_kv: Any, objects: Callable[[], Any], limit: int
    ) -> list[_Msg]:
        while True:
            try:
                return await self._messages(rec, schemas_kv, objects, limit)
            except Exception as e:
                if not _transient(e):
                    raise
                await self._outage(e, deque())

    async def _send(self, js: Any, out: _Out, inflight: deque[_Out]) -> None:
        while True:
            try:
                out.future = await js.publish_async(out.subject, out.payload, headers=dict(out.headers))
                return
            except Exception as e:
                if not _transient(e):
                    raise
                await self._outage(e, inflight)

    async def _settle(self, js: Any, inflight: deque[_Out], acked: int) -> int:
        """Waits for the oldest message's acknowledgement; on a failure (the server went away,
        a timeout) resends everything not acknowledged, in order, once the server is back.
        Returns the new acknowledged position."""
        out = inflight[0]
        try:
            if out.future.done():  # (most are, when settling half a window)
                out.future.result()
            else:
                await asyncio.wait_for(asyncio.shield(out.future), self.ack_timeout)
        except Exception as e:
            if not _transient(e):
                raise
            await self._outage(e, inflight)
            return acked
        inflight.popleft()
        self._inflight_bytes -= len(out.payload)
        if out.is_record:
            self.stats.records += 1
            self.stats.bytes += len(out.payload)
            acked = out.seq + 1
            if out.state is not None:
                name, next_seq, rows = out.state
                self._acked_streams[name] = (next_seq, rows)
        return acked

    async def _outage(self, error: BaseException, inflight: deque[_Out]) -> None:
        """The server stopped answering: wait until it is back, then resend what was not
        acknowledged (the server drops what it already had, by Nats-Msg-Id)."""
        self.stats.outages += 1
        said = self._say(error, None)
        for out in inflight:
            if out.future is not None and not out.future.done():
                out.future.cancel()
        stopped_at: float | None = None
        while True:
            await asyncio.sleep(_RESEND_PAUSE)
            if self._stop.is_set():
                # Stopped while the server is away: wait a little, then give up; what was not
                # acknowledged stays after the stored position, and a restart resends it.
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > self.stop_grace:
                    raise JetStreamError(
                        f"stopped while JetStream did not take our messages: {len(inflight)} message(s) "
                        f"not acknowledged after {self.stop_grace:g} s; the stored position is before "
                        "them, and a publisher started again resends them"
                    )
            if not self._connected.is_set():
                continue
            try:
                for out in inflight:
                    out.future = None
                    ack = await self._js.publish(
                        out.subject, out.payload, headers=dict(out.headers), timeout=self.ack_timeout
                    )
                    out.future = asyncio.get_running_loop().create_future()
                    out.future.set_result(ack)
                log.info("JetStream answers again; %d message(s) resent", len(inflight))
                return
            except Exception as e:
                if not _transient(e):
                    raise
                said = self._say(e, said)

    def _say(self, error: BaseException, said: str | None) -> str:
        """Logs why the server does not take our messages, once per kind; returns the kind."""
        full = "insufficient resources" in str(getattr(error, "description", "") or error)
        kind = "full" if full else "away"
        if kind == said:
            return kind
        if full:
            self.stats.storage_full += 1
            log.error(
                "JetStream's storage is full (insufficient resources: the server's max_file_store, or "
                "its disk); keeping our place in the ring and retrying until it has room (what the "
                "ring overwrites meanwhile is counted as lost)"
            )
        else:
            log.warning(
                "JetStream does not answer (%s: %s); keeping our place in the ring",
                type(error).__name__,
                error,
            )
        return kind


def _rows_of(payload: bytes, info: StreamInfo) -> int:
    """Rows of a record batch from its IPC message header (no decode of the body)."""
    import pyarrow as pa

    msg = pa.ipc.read_message(pa.py_buffer(payload))
    return int(pa.ipc.read_record_batch(msg, info.schema).num_rows)


async def _put_object(store: Any, name: str, payload: bytes, limit: int) -> None:
    import nats.js.api as api

    meta = api.ObjectMeta(
        name=name, options=api.ObjectMetaOptions(max_chunk_size=max(limit - protocol.HEADER_ROOM, 1 << 16))
    )
    await store.put(name, payload, meta=meta)


async def _wait_for_ring(reader: Any, stop: asyncio.Event) -> None:
    """Until the ring has a new record, or `stop`, for at most 0.1 s (polled every ms: the
    ring's own wait blocks the thread, and a thread hop per record costs more)."""
    ring = reader.ring
    for _ in range(100):
        if stop.is_set() or ring.records_written > reader.next_seq:
            return
        await asyncio.sleep(0.001)
