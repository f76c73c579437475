"""The daemon's Arrow Flight service: live streams out of the ring, remote instruments into it,
and remote control. Flight is gRPC carrying Arrow IPC, which pyarrow ships: any Flight client
(pyarrow, the Arrow C++/Rust/Java/Go libraries) talks to it, with no protocol of ours.

- ``list_flights`` / ``get_flight_info`` / ``get_schema``: one flight per stream, descriptor
  path ``[stream name]``, with the stream's schema.
- ``do_get(Ticket)``: the stream's record batches, live, or its latest rows (the tickets and
  each batch's metadata: :mod:`.protocol`). Every subscriber reads the ring with its own
  cursor: a slow one is lapped and loses records, it never slows the producer or anyone
  else. The stream ends when the daemon stops (after the last record), and with a
  ``schema_changed`` error if the stream's schema changes (subscribe again with ``after_seq``).
- ``do_put(descriptor path [stream])``: a remote instrument's record batches, written into
  the ring as that stream, each acknowledged once it is there.
- ``do_action``: see :data:`~.protocol.ACTIONS`; results and bodies are JSON.

Tickets, metadata keys, actions and error codes are :mod:`.protocol`'s. Errors reach the
client as one-line Flight errors that say what was wrong, echoing at most ~100 characters of
the request, with an error code in ``extra_info``, never a server traceback: every method of
the service goes through :func:`_guarded`, which turns anything unexpected into a
``FlightInternalError`` (logged here with its traceback). A token is required on every call
(``Authorization: Bearer <token>``), checked by :class:`TokenAuth`: the daemon's own, or
one it generated for its user's local clients (see :mod:`rust_daq._access`).
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol, TypeVar

import pyarrow as pa
import pyarrow.flight as fl

from .._access import NAME_MAX, control_char, shown
from .._arrow import StreamInfo
from .._errors import RingUsageError, RustDaqError
from .._live import LiveView
from .._records import LossAccount, RecordDecoder, SchemaTable, StreamLoss
from .._ring import RingBuffer
from .protocol import (
    ACTIONS,
    BAD_REQUEST,
    INTERNAL,
    LIST_STREAMS,
    REFUSED,
    SCHEMA_CHANGED,
    START_RECORDING,
    STATUS,
    STOP_RECORDING,
    UNAUTHENTICATED,
    UNKNOWN_STREAM,
    BatchMeta,
    RecordMeta,
    Ticket,
    action_result,
    error,
    loads,
    one_line,
    parse_ticket,
    put_ack,
)

__all__ = ["DaemonControl", "DaqFlightServer", "RingFlightService", "RingSide", "TokenAuth"]

log = logging.getLogger("rust_daq.flight")

_READ_RECORDS = 256  # records per ring read in a subscription
_POLL = 0.1  # seconds a subscription waits for data before checking for cancellation
_VIEWS = 16  # LiveViews kept for latest-rows requests, the least recently used dropped
_COALESCE_RECORDS = 256  # records a coalescing subscription sends together, at most
_COALESCE_BYTES = 1 << 20  # and their bytes (a record bigger than this goes alone)


class RingSide(Protocol):
    """What serving streams needs: the ring, the producer's row index (``rows_before``), and
    an event set when the daemon stops (subscriptions then end at the last record)."""

    @property
    def ring(self) -> RingBuffer: ...
    @property
    def row_index(self) -> RowsBefore: ...
    @property
    def stopping(self) -> threading.Event: ...


class RowsBefore(Protocol):
    def rows_before(self, seq: int) -> int | None: ...


class DaemonControl(RingSide, Protocol):
    """What the Flight service needs from the daemon that runs it."""

    def status(self) -> dict[str, Any]: ...
    def start_recording_from_wire(self, params: dict[str, Any]) -> dict[str, Any]: ...
    def stop_recording(self) -> dict[str, Any]: ...
    def put(self, stream: str, batch: pa.RecordBatch) -> int: ...


class _RequestError(fl.FlightServerError, ValueError):  # type: ignore[misc]
    """A FlightServerError for ``get_schema``, whose pyarrow callback (unlike every other
    one) does not turn a FlightError into a Flight status: any exception there reaches the
    client with ``traceback.format_exception`` of it appended. Formatting this one fails
    (reading ``__suppress_context__`` raises), and pyarrow then appends only the type name,
    "Python exception: _RequestError"; as a ValueError the client gets ArrowInvalid."""

    @property
    def __suppress_context__(self) -> bool:  # type: ignore[override]
        raise RuntimeError("not formatted: the message says it all")


_F = TypeVar("_F", bound=Callable[..., Any])


def _internal(what: str, e: BaseException) -> fl.FlightError:
    log.error("%s: unexpected %s", what, type(e).__name__, exc_info=e)
    return error(
        INTERNAL, f"{what}: internal error in the daemon ({type(e).__name__}); its log has the details"
    )


def _converted(what: str, e: Exception) -> fl.FlightError:
    """The Flight error a client receives for `e`, raised while serving `what`: ours (a
    FlightError) as one short line with its code; a refusal (ValueError, a rust-daq error)
    as a ``refused`` FlightServerError; anything else as an ``internal``
    FlightInternalError, its traceback logged here."""
    if isinstance(e, fl.FlightError):
        converted = type(e)(one_line(str(e)), extra_info=e.extra_info)
    elif isinstance(e, RecursionError):
        converted = error(BAD_REQUEST, f"{what}: the request is nested too deeply")
    elif isinstance(e, RustDaqError | ValueError):
        converted = error(REFUSED, f"{what}: {e}")
    else:
        converted = _internal(what, e)
    return converted


def _guarded_iter(what: str, items: Iterable[Any]) -> Iterator[Any]:
    """`items`, with an error while producing them converted as by :func:`_guarded`."""
    try:
        yield from items
    except Exception as e:
        raise _converted(what, e) from None


def _guarded(what: str) -> Callable[[_F], _F]:
    """Every method of the service: whatever it raises (also while its result is iterated)
    reaches the client as a one-line Flight error (:func:`_converted`), never a traceback."""

    def decorate(method: _F) -> _F:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = method(*args, **kwargs)
            except Exception as e:
                raise _converted(what, e) from None
            if isinstance(result, Iterator):  # a generator: errors come while iterated
                return _guarded_iter(what, result)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


class TokenAuth(fl.ServerMiddlewareFactory):  # type: ignore[misc]  # pyarrow ships no stubs
    """Refuses every call whose ``authorization`` header is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._expected = f"Bearer {token}".encode()

    def start_call(self, info: fl.CallInfo, headers: dict[str, list[Any]]) -> None:
        for value in headers.get("authorization", []):
            given = value if isinstance(value, bytes) else str(value).encode()
            if hmac.compare_digest(given, self._expected):
                return None
        raise error(
            UNAUTHENTICATED,
            "this rust-daq daemon needs a token: send 'authorization: Bearer <token>' (connect(url, "
            "token=...), RUST_DAQ_TOKEN); its own user's local clients read it from its token file"
            if not headers.get("authorization")
            else "wrong token",
        )


class RingFlightService(fl.FlightServerBase):  # type: ignore[misc]  # pyarrow ships no stubs
    """The Flight service over a ring (see the module documentation): discovery and
    subscriptions (``do_get``) from the ring itself; ``do_put`` and the actions other than
    ``list_streams`` are a subclass's (:meth:`_put`, :meth:`_act`): the daemon's own
    (:class:`DaqFlightServer`) or forwarded to it (:mod:`.process`). Serving starts in the
    constructor; ``shutdown()`` (from another thread) ends it."""

    def __init__(
        self,
        location: str,
        daemon: RingSide,
        *,
        token: str | None = None,
        tls_certificates: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        # Everything a call uses is set before serving starts (in FlightServerBase's
        # constructor): a client connecting at once must not find it missing.
        self.side = daemon
        self._state_lock = threading.Lock()
        # One LiveView per (stream, rows) asked for: each request decodes only the records
        # written since the last (`rust-daq tail` asks twice a second), not the whole ring.
        self._views: OrderedDict[tuple[str, int], LiveView] = OrderedDict()
        self._views_lock = threading.Lock()
        self._decodes = _SharedDecodes()
        self.subscribers = 0
        self.rows_sent = 0
        middleware = {"auth": TokenAuth(token)} if token else None
        certs = [fl.CertKeyPair(cert, key) for cert, key in tls_certificates or []]
        super().__init__(location, tls_certificates=certs, middleware=middleware)

    # -- discovery ------------------------------------------------------------------------------

    def _streams(self) -> dict[str, pa.Schema]:
        return self.side.ring.streams()

    def _info(self, name: str, schema: pa.Schema) -> fl.FlightInfo:
        return fl.FlightInfo(
            schema,
            fl.FlightDescriptor.for_path(name),
            [fl.FlightEndpoint(name.encode(), [])],
            -1,
            -1,
        )

    def _schema_of(self, descriptor: fl.FlightDescriptor) -> tuple[str, pa.Schema]:
        if descriptor.descriptor_type != fl.DescriptorType.PATH or len(descriptor.path or []) != 1:
            raise error(BAD_REQUEST, "a rust-daq flight is named by a path of one element: [stream name]")
        name = descriptor.path[0].decode(errors="replace")
        streams = self._streams()
        if name not in streams:
            raise _unknown(name, streams)
        return name, streams[name]

    @_guarded("list_flights")
    def list_flights(self, context: fl.ServerCallContext, criteria: bytes) -> Iterator[fl.FlightInfo]:
        return iter([self._info(name, schema) for name, schema in self._streams().items()])

    @_guarded("get_flight_info")
    def get_flight_info(
        self, context: fl.ServerCallContext, descriptor: fl.FlightDescriptor
    ) -> fl.FlightInfo:
        return self._info(*self._schema_of(descriptor))

    def get_schema(self, context: fl.ServerCallContext, descriptor: fl.FlightDescriptor) -> fl.SchemaResult:
        try:
            return self._get_schema(context, descriptor)
        except fl.FlightError as e:  # see _RequestError: pyarrow would append a traceback
            raise _RequestError(str(e)) from None

    @_guarded("get_schema")
    def _get_schema(self, context: fl.ServerCallContext, descriptor: fl.FlightDescriptor) -> fl.SchemaResult:
        return fl.SchemaResult(self._schema_of(descriptor)[1])

    # -- streams out ------------------------------------------------------------------------------

    @_guarded("do_get")
    def do_get(self, context: fl.ServerCallContext, ticket: fl.Ticket) -> fl.FlightDataStream:
        t = parse_ticket(ticket.ticket)
        state = SchemaTable(self.side.ring)
        streams = state.streams()
        if t.stream not in streams:
            raise _unknown(t.stream, streams)
        info = streams[t.stream]
        if t.last_rows is not None:
            return fl.RecordBatchStream(self._latest(t.stream, t.last_rows))
        return fl.GeneratorStream(
            info.schema,
            _guarded_iter(
                f"do_get of {shown(t.stream, 40)}",
                self._subscription(context, t, state, info.stream_id, info.schema),
            ),
        )

    def _subscription(
        self, context: fl.ServerCallContext, t: Ticket, state: SchemaTable, stream_id: int, schema: pa.Schema
    ) -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
        ring = self.side.ring
        # Parked, not spinning, while it waits: many subscribers share the acquisition's cores.
        reader = ring.reader(
            "oldest" if t.start == "oldest" or t.after_seq is not None else "latest", wait="park"
        )
        # Our own copies: gRPC sends a batch after this generator moves on. A copy torn by the
        # producer is lost (a gap before the next record); an undecodable record, counted by
        # the writer, is skipped. Decoded one at a time as gRPC takes them: a subscriber that
        # does not read holds at most a batch's copies here, not a ring read's.
        decoder = RecordDecoder(state, copy=True)
        account = LossAccount()
        lost = account.start(stream_id, None)  # this subscription's losses
        window = None if t.coalesce_ms is None else t.coalesce_ms / 1000
        group: list[_Sent] = []  # coalescing: records not sent yet (copies, safe from laps)
        size = 0
        hold = 0.0  # (monotonic) when the group goes out at the latest
        with self._state_lock:
            self.subscribers += 1
        try:
            while not context.is_cancelled():
                self._check_daemon()
                # In place: only this stream's records are copied (below), not the others'.
                # Stopping: no long wait at the end of what was written.
                stopping = self.side.stopping.is_set()
                timeout = 0.01 if stopping else _POLL
                if group and not stopping:  # held for the window: sleep to its end (not a wake-up a record)
                    time.sleep(min(max(hold - time.monotonic(), 0.0), _POLL))
                    timeout = 0.0
                records = reader.read(max_records=_READ_RECORDS, timeout=timeout, copy=False)
                changed = None
                for info, sent in self._decoded(records, t, decoder, stream_id):
                    if not info.schema.equals(schema, check_metadata=True):
                        changed = _schema_changed(info, sent)
                        break
                    if window is None:
                        yield self._batch([sent], account, lost, stream_id)
                        continue
                    if group and (len(group) >= _COALESCE_RECORDS or size + sent.nbytes > _COALESCE_BYTES):
                        yield self._batch(group, account, lost, stream_id)
                        group, size = [], 0
                    if not group:
                        hold = time.monotonic() + window
                    group.append(sent)
                    size += sent.nbytes
                if group and (
                    changed is not None
                    or stopping
                    or len(records) >= _READ_RECORDS  # (behind: no reason to wait)
                    or time.monotonic() >= hold
                ):
                    yield self._batch(group, account, lost, stream_id)
                    group, size = [], 0
                if changed is not None:
                    raise changed
                if not records and not group and stopping and reader.position >= ring.status()["write_head"]:
                    self._check_daemon()  # (died, not stopped: not the end a stop sends)
                    return  # the daemon stops: everything written has been sent
        finally:
            with self._state_lock:
                self.subscribers -= 1
                if not self.subscribers:
                    self._decodes.clear()  # (nobody to share them with)

    def _decoded(
        self, records: list[Any], t: Ticket, decoder: RecordDecoder, stream_id: int
    ) -> Iterator[tuple[StreamInfo, _Sent]]:
        """The records of the subscription's stream among `records`, one at a time, decoded,
        with their row index and their stream's info (its schema may have changed); a record
        another subscription decoded already is its copy."""
        rows, shared = self.side.row_index, self._decodes
        for rec in records:
            if rec.stream != stream_id or (t.after_seq is not None and rec.seq <= t.after_seq):
                continue
            # One decodes, the others woken by the same record wait for it (those of other
            # streams never: a lock per stream).
            with shared.lock(stream_id):
                hit = shared.get(rec.seq)
                if hit is None:
                    d = decoder.decode(rec, stream_id=stream_id)
                    if d is None or d.info is None or d.batch is None:
                        continue  # (another stream's; undecodable; torn: a gap)
                    before = rows.rows_before(rec.seq)
                    hit = (
                        d.info,
                        _Sent(rec.seq, rec.stream_seq, rec.timestamp_ns, d.batch, before, len(rec)),
                    )
                    shared.put(rec.seq, hit)
            yield hit

    def _batch(
        self, group: list[_Sent], account: LossAccount, lost: StreamLoss, stream_id: int
    ) -> tuple[pa.RecordBatch, pa.Buffer]:
        """One wire batch of `group` (consecutive records of the stream) and its metadata."""
        for r in group:
            account.observe(stream_id, r.stream_seq, r.batch.num_rows, r.rows_before)
        first = group[0]
        if len(group) == 1:
            batch, each = first.batch, None
        else:
            batch = _concat([r.batch for r in group])
            each = [
                RecordMeta(r.seq, r.stream_seq, r.timestamp_ns, r.batch.num_rows, r.rows_before)
                for r in group
            ]
        with self._state_lock:
            self.rows_sent += batch.num_rows
        meta = BatchMeta(
            first.seq, first.stream_seq, first.timestamp_ns, lost.records, lost.rows, first.rows_before, each
        )
        return batch, meta.encode()

    def _latest(self, stream: str, rows: int) -> pa.Table:
        with self._views_lock:
            key = (stream, rows)
            view = self._views.pop(key, None) or LiveView(self.side.ring, stream, rows)
            self._views[key] = view
            while len(self._views) > _VIEWS:
                self._views.popitem(last=False)
            try:
                return view.update_table()
            except RingUsageError as e:
                raise error(REFUSED, str(e)) from None

    # -- streams in ------------------------------------------------------------------------------

    @_guarded("do_put")
    def do_put(
        self,
        context: fl.ServerCallContext,
        descriptor: fl.FlightDescriptor,
        reader: fl.MetadataRecordBatchReader,
        writer: fl.FlightMetadataWriter,
    ) -> None:
        if descriptor.descriptor_type != fl.DescriptorType.PATH or len(descriptor.path or []) != 1:
            raise error(BAD_REQUEST, "do_put needs a descriptor path of one element: [stream name]")
        try:
            stream = descriptor.path[0].decode()
        except UnicodeDecodeError:
            raise error(BAD_REQUEST, "do_put: the stream name is not UTF-8") from None
        bad = control_char(stream)
        if not stream.strip() or bad is not None or len(stream.encode()) > NAME_MAX:
            why = (
                "is empty"
                if not stream.strip()
                else f"contains the control character {bad!r}"
                if bad is not None
                else f"is longer than {NAME_MAX} bytes"
            )
            raise error(BAD_REQUEST, f"do_put: the stream name {shown(stream)} {why}")
        self._put(stream, _batches(stream, reader), writer)

    def _put(self, stream: str, batches: Iterator[pa.RecordBatch], writer: fl.FlightMetadataWriter) -> None:
        """Writes `batches` into the ring as `stream`, acknowledging each (``put_ack``)."""
        raise NotImplementedError

    @_guarded("do_exchange")
    def do_exchange(
        self,
        context: fl.ServerCallContext,
        descriptor: fl.FlightDescriptor,
        reader: fl.MetadataRecordBatchReader,
        writer: fl.MetadataRecordBatchWriter,
    ) -> None:
        raise error(BAD_REQUEST, "do_exchange is not offered by rust-daq; use do_get and do_put")

    # -- control ------------------------------------------------------------------------------

    @_guarded("list_actions")
    def list_actions(self, context: fl.ServerCallContext) -> list[tuple[str, str]]:
        return list(ACTIONS.items())

    @_guarded("do_action")
    def do_action(self, context: fl.ServerCallContext, action: fl.Action) -> Iterator[bytes]:
        kind = action.type
        if kind not in ACTIONS:
            raise error(BAD_REQUEST, f"unknown action {shown(kind)}; the actions: {', '.join(ACTIONS)}")
        raw = action.body.to_pybytes() if action.body is not None else b""
        params = loads(raw, f"{kind}: the body is") if raw.strip() else {}
        if not isinstance(params, dict):
            raise error(BAD_REQUEST, f"{kind}: the body must be a JSON object")
        result: dict[str, Any]
        if kind == LIST_STREAMS:
            result = {name: {f.name: str(f.type) for f in schema} for name, schema in self._streams().items()}
        else:
            result = self._act(kind, params)
        if kind == STATUS:
            with self._state_lock:
                result["subscribers"] = self.subscribers
                result["rows_sent"] = self.rows_sent
        return iter([action_result(result)])

    def _act(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """The result of action `kind` (status, start_recording, stop_recording)."""
        raise NotImplementedError

    def _check_daemon(self) -> None:
        if self._daemon_gone():
            raise error(
                INTERNAL,
                "the daemon's acquisition process ended without stopping its streams (it died); "
                "what was sent before is all there is",
            )

    def _daemon_gone(self) -> bool:
        """Whether the producer's process ended without stopping (subscriptions then end
        with an error, not as a stop would end them)."""
        return False


class DaqFlightServer(RingFlightService):
    """The Flight service in the daemon's own process: puts and actions call the daemon."""

    side: DaemonControl

    @property
    def daemon(self) -> DaemonControl:
        return self.side

    def _put(self, stream: str, batches: Iterator[pa.RecordBatch], writer: fl.FlightMetadataWriter) -> None:
        for batch in batches:
            try:
                seq = self.daemon.put(stream, batch)
            except pa.ArrowNotImplementedError as e:
                raise error(
                    REFUSED,
                    f"do_put to stream {shown(stream)}: the ring cannot hold this Arrow type ({_first(e)})",
                ) from None
            except (ValueError, TypeError, OSError, RustDaqError, pa.ArrowException) as e:
                raise error(REFUSED, f"do_put to stream {shown(stream)}: {_first(e)}") from None
            writer.write(put_ack(seq))

    def _act(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            if kind == STATUS:
                return self.daemon.status()
            if kind == START_RECORDING:
                return self.daemon.start_recording_from_wire(params)
            assert kind == STOP_RECORDING, kind
            return self.daemon.stop_recording()
        except (ValueError, OSError, RuntimeError) as e:
            raise error(REFUSED, f"{kind}: {_first(e)}") from None


class _Sent(NamedTuple):
    """A record a subscription sends: its numbers, its batch (a private copy), its stream's
    rows before it, and its size in the ring."""

    seq: int
    stream_seq: int | None
    timestamp_ns: int
    batch: pa.RecordBatch
    rows_before: int | None
    nbytes: int


class _SharedDecodes:
    """The latest records the subscriptions decoded, by ring sequence number, for the other
    subscriptions of their stream: 50 subscribers of one stream decoded each record 50
    times, the most of what serving them cost. A sequence number names one write of one
    record (a lapped slot holds a later number), so a decoded copy stands for it as long as
    it is kept: at most `max_records` and `max_bytes`, the oldest dropped first."""

    def __init__(self, max_records: int = 4096, max_bytes: int = 64 << 20) -> None:
        self._items: OrderedDict[int, tuple[StreamInfo, _Sent]] = OrderedDict()
        self._bytes = 0
        self._max_records, self._max_bytes = max_records, max_bytes
        self._lock = threading.Lock()  # (the items)
        self._streams: dict[int, threading.Lock] = {}

    def lock(self, stream_id: int) -> threading.Lock:
        """Held while looking up a record of the stream and decoding it if missing: the
        subscriptions woken by the same record decode it once."""
        with self._lock:
            lock = self._streams.get(stream_id)
            if lock is None:
                lock = self._streams[stream_id] = threading.Lock()
            return lock

    def get(self, seq: int) -> tuple[StreamInfo, _Sent] | None:
        with self._lock:
            return self._items.get(seq)

    def put(self, seq: int, item: tuple[StreamInfo, _Sent]) -> None:
        with self._lock:
            if seq in self._items:
                return
            self._items[seq] = item
            self._bytes += item[1].nbytes
            while len(self._items) > self._max_records or (
                self._bytes > self._max_bytes and len(self._items) > 1
            ):
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """`batches` (of one schema) as one batch: ``pa.concat_batches`` where pyarrow has it (19
    and later), through a table before."""
    concat = getattr(pa, "concat_batches", None)
    if concat is not None:
        return concat(batches)
    out = pa.Table.from_batches(batches).combine_chunks().to_batches()
    return out[0] if len(out) == 1 else batches[0].slice(0, 0)  # (none: no rows in any)


def _schema_changed(info: StreamInfo, sent: _Sent) -> fl.FlightError:
    return error(
        SCHEMA_CHANGED,
        f"stream {info.name!r} changed its schema at record {sent.seq}; subscribe "
        f'again (ticket {{"stream": ..., "after_seq": {sent.seq - 1}}} resumes here)',
        stream=info.name,
        after_seq=sent.seq - 1,
    )


def _batches(stream: str, reader: fl.MetadataRecordBatchReader) -> Iterator[pa.RecordBatch]:
    """The batches a do_put sends; an unreadable one a ``bad_request`` error."""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        except pa.ArrowException as e:
            if isinstance(e, fl.FlightError):
                raise
            raise error(
                BAD_REQUEST, f"do_put to stream {shown(stream)}: unreadable batch ({_first(e)})"
            ) from None
        if chunk.data is not None:
            yield chunk.data


def _unknown(name: str, streams: Iterable[str]) -> fl.FlightError:
    listed = list(streams)
    names = ", ".join(shown(n, 40) for n in listed[:8]) or "none yet"
    if len(listed) > 8:
        names += f" and {len(listed) - 8} more (list_flights)"
    # The name is not among the details: the client knows it, and it may be 100 kB.
    return error(UNKNOWN_STREAM, f"unknown stream {shown(name)}; the daemon's streams: {names}")


def _first(e: BaseException) -> str:
    """The first line of an exception's message (pyarrow's can run on with details)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
