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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import pyarrow as pa
import pyarrow.flight as fl

from .._access import NAME_MAX, control_char, shown
from .._errors import RingUsageError, RustDaqError
from .._live import LiveView
from .._records import SchemaTable
from .protocol import (
    ACTIONS,
    BAD_REQUEST,
    INTERNAL,
    LIST_STREAMS,
    REFUSED,
    START_RECORDING,
    STATUS,
    STOP_RECORDING,
    UNAUTHENTICATED,
    UNKNOWN_STREAM,
    action_result,
    error,
    loads,
    one_line,
    parse_ticket,
    put_ack,
)
from .subscription import Counters, RingSide, SharedDecodes, Subscription, first_record

__all__ = ["DaemonControl", "DaqFlightServer", "RingFlightService", "RingSide", "TokenAuth"]

log = logging.getLogger("rust_daq.flight")

_VIEWS = 16  # LiveViews kept for latest-rows requests, the least recently used dropped


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
        # One LiveView per (stream, rows) asked for: each request decodes only the records
        # written since the last (`rust-daq tail` asks twice a second), not the whole ring.
        self._views: OrderedDict[tuple[str, int], LiveView] = OrderedDict()
        self._views_lock = threading.Lock()
        self._decodes = SharedDecodes()
        self.counters = Counters()
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
        # Parked, not spinning, while it waits: many subscribers share the acquisition's cores.
        reader = self.side.ring.reader(
            "oldest" if t.start == "oldest" or t.after_seq is not None else "latest", wait="park"
        )
        # The stream's batches have the schema of the first record it sends: a subscription
        # from the oldest record of a stream whose schema changed since starts with the old
        # one (the stream's current schema would end it at once, at a record before which
        # nothing could be resumed), then ends at the change with ``schema_changed``.
        schema = info.schema
        pending: list[Any] = []
        if t.start == "oldest" or t.after_seq is not None:
            first, pending = first_record(reader, t.after_seq, info.stream_id)
            known = state.info(first.schema_id) if first is not None else None
            if known is not None:
                schema = known.schema
        return fl.GeneratorStream(
            schema,
            _guarded_iter(
                f"do_get of {shown(t.stream, 40)}",
                Subscription(
                    self.side,
                    t,
                    state,
                    info.stream_id,
                    schema,
                    reader,
                    pending,
                    decodes=self._decodes,
                    counters=self.counters,
                    check_daemon=self._check_daemon,
                ).batches(context),
            ),
        )

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
            result["subscribers"] = self.counters.subscribers
            result["rows_sent"] = self.counters.rows_sent
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
