"""The live reader's side on its event loop (:mod:`.reader`): one ephemeral pull consumer
per filter subject and its fetch loop, which fetches and decodes only while the reader's
buffer has room and makes the consumer again after the last message received if the server
removed it; and the loss account that reads the publishers' loss markers."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .._arrow import StreamInfo, variable_length
from .._records import DECODE_ERRORS, LossAccount, decode_buffer
from . import protocol

if TYPE_CHECKING:
    from .reader import JetStreamReader

log = logging.getLogger("rust_daq.nats")

_FETCH_WAIT = 0.5  # s a pull request waits for messages
_CHECK = 2.0  # s of fetching nothing between checks that the consumer is still there
_INACTIVE = 60.0  # s without a pull request before the server removes a reader's consumer
PAUSE = 0.005  # s between looks at a full buffer


class Losses(LossAccount):
    """A LossAccount that also reads the publishers' loss markers. A marker says that its
    stream's ``records`` records from ``first`` on (``rows`` rows, where known) were lost
    before the stream's next record, so it moves the stream's expected ``stream_seq`` past
    them: the next record's own gap then counts nothing again. Where the marker does not say
    the rows (or JetStream lost messages before it) but the stream's row count is known, the
    next record's ``rows_before`` says them exactly."""

    def __init__(self) -> None:
        super().__init__()
        self._rows_pending: set[str] = set()

    def marker(self, key: str, first: int | None, records: int, rows: int | None) -> None:
        loss = self.streams.get(key) or self.start(key, None)
        gap = 0
        if first is not None:
            if loss.next_seq is not None and first > loss.next_seq:
                gap = first - loss.next_seq  # (messages before the marker did not arrive either)
            loss.next_seq = first + records
        loss.records += gap + records
        if gap == 0 and rows is not None:
            if loss.rows is not None:
                loss.rows += rows
            if loss.next_row is not None:
                loss.next_row += rows
        elif loss.next_row is not None:
            self._rows_pending.add(key)
        else:
            loss.rows = None

    def record(self, key: str, stream_seq: int | None, rows: int, rows_before: int | None) -> None:
        self.observe(key, stream_seq, rows, rows_before)
        if key in self._rows_pending:
            self._rows_pending.discard(key)
            if rows_before is None:
                self.streams[key].rows = None

    def unreadable(self, key: str, stream_seq: int | None, rows: int, rows_before: int | None) -> None:
        """A record that arrived but cannot be given (its schema or object is gone, it does
        not decode): lost, with the rows its headers say."""
        self.record(key, stream_seq, rows, rows_before)
        loss = self.streams[key]
        loss.records += 1
        if loss.rows is not None:
            loss.rows += rows


def subjects_of(prefix: str, names: Iterable[str]) -> list[str]:
    """The subject of each stream name (``<host>.<stream>``: :func:`~.protocol.stream_key`)."""
    out: list[str] = []
    for name in names:
        s = protocol.subject(prefix, *protocol.split_key(name))
        if s not in out:
            out.append(s)
    return out


def transient() -> tuple[type[BaseException], ...]:
    import nats.errors

    return (TimeoutError, ConnectionError, nats.errors.Error)


class Consumer:
    """One ephemeral pull consumer of a reader, on one filter subject, and its fetch loop."""

    def __init__(self, reader: JetStreamReader, subject: str) -> None:
        self.reader, self.subject = reader, subject
        self.last: int | None = None  # the last JetStream sequence received (or before the start)
        self.name = ""
        self.sub: Any = None
        self._delivered = 0
        self.task: asyncio.Task[None] | None = None
        self._infos: dict[tuple[str, str], StreamInfo] = {}  # by (stream, schema key)

    async def open(self) -> None:
        """Makes the consumer: from the reader's start, or after the last message received."""
        import nats.js.api as api

        daq, start = self.reader.daq, self.reader.start
        policy, seq = api.DeliverPolicy.BY_START_SEQUENCE, self.last
        if seq is not None:
            seq += 1
        elif start == "oldest":
            policy = api.DeliverPolicy.ALL
        elif start == "latest":
            policy = api.DeliverPolicy.NEW
        else:
            seq = int(start)
        self.name = f"rdaq-reader-{uuid.uuid4().hex[:16]}"
        self._delivered = 0  # the consumer's own delivery count: a gap is deliveries lost
        config = api.ConsumerConfig(
            name=self.name,
            deliver_policy=policy,
            opt_start_seq=seq,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=self.subject,
            inactive_threshold=_INACTIVE,
            description="rust-daq live reader",
        )
        info = await daq._js.add_consumer(daq.stream, config=config)
        self.sub = await daq._js.pull_subscribe_bind(consumer=self.name, stream=daq.stream)
        if self.last is None:  # (where it starts: delivery resumes after this if made again)
            self.last = int(info.delivered.stream_seq)

    async def check(self) -> None:
        """Makes the consumer again if the server no longer has it."""
        import nats.js.errors

        try:
            await self.sub.consumer_info()
            return
        except nats.js.errors.NotFoundError:
            log.info("the reader's consumer of %s is gone: made again after %s", self.subject, self.last)
        except transient() as e:  # (the server away: once it is back)
            log.debug("consumer info: %s: %s", type(e).__name__, e)
            return
        await self._reopen()

    async def _reopen(self) -> None:
        try:
            await self.sub.unsubscribe()
        except transient():
            pass
        try:
            await self.open()
        except transient() as e:
            log.debug("making the consumer again: %s: %s", type(e).__name__, e)

    async def run(self) -> None:
        r = self.reader
        checked = time.monotonic()
        try:
            while not r._closed:
                n = r._room()
                if n == 0:
                    await asyncio.sleep(PAUSE)
                    continue
                try:
                    msgs = await self.sub.fetch(n, timeout=_FETCH_WAIT)
                except transient() as e:  # nothing to fetch, the server away, the consumer gone
                    if not isinstance(e, TimeoutError):
                        log.debug("fetch: %s: %s", type(e).__name__, e)
                        await asyncio.sleep(0.25)
                    if time.monotonic() - checked > _CHECK:
                        await self.check()
                        checked = time.monotonic()
                    continue
                for m in msgs:
                    delivered = int(m.metadata.sequence.consumer)
                    if delivered > self._delivered + 1:
                        # Deliveries lost on the way (a dropped connection mid-fetch): with no
                        # acks they would never come again. A consumer from after the last
                        # message received delivers them, in order.
                        log.warning("reader of %s: deliveries lost on the way; fetching again", self.subject)
                        await self._reopen()
                        break
                    self._delivered = delivered
                    await self._add(m)
                checked = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # (a bug of ours: the reader raises it)
            log.exception("reading %s", self.subject)
            with r._cond:
                r._error = e
                r._cond.notify_all()

    async def _add(self, m: Any) -> None:
        seq, r = int(m.metadata.sequence.stream), self.reader
        if self.last is not None and seq <= self.last:
            return  # (delivered again by a consumer made again)
        try:
            info = protocol.parse(m.headers)
        except ValueError as e:
            log.warning("message %d on %s: %s; skipped", seq, m.subject, e)
        else:
            name = protocol.stream_key(info.host, info.stream)
            while (r._want is None or name in r._want) and not r._closed:
                if r._room():
                    try:
                        batch = None if info.kind == "lost" else await self._decode(seq, name, info, m.data)
                        r._take(seq, name, info, batch)
                        break
                    except transient() as e:  # (fetching a schema or an object: again)
                        log.debug("message %d: %s: %s", seq, type(e).__name__, e)
                        await asyncio.sleep(0.25)
                        continue
                await asyncio.sleep(PAUSE)
        self.last = seq

    async def _decode(
        self, seq: int, name: str, info: protocol.MessageInfo, data: bytes
    ) -> pa.RecordBatch | None:
        """The record's batch: its schema from the bucket, its payload inline or from the
        object store; None if either is gone or it does not decode (it is lost)."""
        daq = self.reader.daq
        schema = await daq._schema(info.schema)
        if schema is None:
            return None
        if info.object is not None:
            got = await daq._object(info.object)
            if got is None:
                return None
            data = got
        key = (name, info.schema or "")
        si = self._infos.get(key)
        if si is None:
            full = any(variable_length(f.type) for f in schema)
            si = self._infos[key] = StreamInfo(name, 0, 0, schema, full)
        try:
            return decode_buffer(data, si)
        except DECODE_ERRORS as e:
            log.error("message %d (%s) does not decode with its schema: %s; lost", seq, name, e)
            return None
