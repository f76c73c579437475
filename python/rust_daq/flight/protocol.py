"""The rust-daq Flight protocol: what the daemon's server (:mod:`.server`) and the client
(:mod:`.client`) agree on, and nothing of either's logic. docs/distributed.md ("The
protocol") describes the same for other Flight clients.

- **Tickets** of ``do_get``: the stream name as UTF-8, or a JSON object with
  :data:`TICKET_KEYS` (:class:`Ticket`, built by :func:`ticket`, read by :func:`parse_ticket`).
- **Batch metadata**: each ``do_get`` batch's app_metadata is a JSON object with
  :data:`BATCH_KEYS` (:class:`BatchMeta`); each ``do_put`` batch is acknowledged with
  ``{"seq": N}`` (:func:`put_ack`).
- **Actions** of ``do_action`` (:data:`ACTIONS`): bodies and results are JSON objects.
- **Errors**: every error the daemon raises on purpose carries, in the Flight error's
  ``extra_info``, the JSON object ``{"code": <one of ERROR_CODES>, ...details}``; the message
  is for people. The server raises with :func:`error`, the client classifies with
  :func:`error_info`, never by message text.

Only keys and codes are added over time: a client ignores keys it does not know, and treats
an error without a code (an older daemon, the transport) as a plain failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import pyarrow as pa
import pyarrow.flight as fl

from .._access import shown

__all__ = [
    "ACTIONS",
    "BATCH_KEYS",
    "ERROR_CODES",
    "TICKET_KEYS",
    "BatchMeta",
    "ErrorInfo",
    "RecordMeta",
    "Ticket",
    "error",
    "error_info",
    "parse_ticket",
    "ticket",
]

# -- tickets -----------------------------------------------------------------------------------

#: The keys of a JSON ticket.
TICKET_KEYS: Final = ("stream", "start", "after_seq", "last_rows", "coalesce_ms")
#: The longest a subscription may hold records back to send them together (``coalesce_ms``).
COALESCE_MAX_MS: Final = 1000
#: Where a live subscription starts.
STARTS: Final = ("latest", "oldest")


@dataclass(frozen=True)
class Ticket:
    """A ``do_get`` ticket: `stream`, live from the `start` record (``"latest"``,
    ``"oldest"``), or after ring sequence number `after_seq` (resuming), or only the
    `last_rows` latest rows. With `coalesce_ms` (0 to :data:`COALESCE_MAX_MS`) a live
    subscription sends consecutive records of the stream together, as one batch whose
    metadata has ``records`` (see :class:`BatchMeta`): those that piled up while it was busy
    (0), or also those that arrived within that many milliseconds after the first, which
    bounds the messages a subscriber costs the daemon (1 kHz of one-row records: 1,000
    messages a second without, 50 with ``coalesce_ms=20``). Without it (other clients), every
    record is a batch of its own."""

    stream: str
    start: str = "latest"
    after_seq: int | None = None
    last_rows: int | None = None
    coalesce_ms: float | None = None

    def encode(self) -> bytes:
        """The wire form: the bare name when that says it all, else a JSON object."""
        if (
            self.start == "latest"
            and self.after_seq is None
            and self.last_rows is None
            and self.coalesce_ms is None
        ):
            return self.stream.encode()
        body: dict[str, Any] = {"stream": self.stream, "start": self.start}
        if self.after_seq is not None:
            body["after_seq"] = self.after_seq
        if self.last_rows is not None:
            body["last_rows"] = self.last_rows
        if self.coalesce_ms is not None:
            body["coalesce_ms"] = self.coalesce_ms
        return json.dumps(body).encode()


def ticket(
    stream: str,
    start: str = "latest",
    *,
    after_seq: int | None = None,
    last_rows: int | None = None,
    coalesce_ms: float | None = None,
) -> fl.Ticket:
    """The ``do_get`` ticket for `stream`: live from the ``"latest"`` or ``"oldest"`` record,
    after ring sequence number `after_seq` (resuming), or the `last_rows` latest rows only;
    `coalesce_ms`: see :class:`Ticket`."""
    return fl.Ticket(Ticket(stream, start, after_seq, last_rows, coalesce_ms).encode())


def parse_ticket(raw: bytes) -> Ticket:
    """The ticket's fields; a ``bad_request`` error that says what is wrong otherwise."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise error(BAD_REQUEST, "bad ticket: neither a stream name (UTF-8) nor a JSON object") from None
    if not text.startswith("{"):
        if not text:
            raise error(BAD_REQUEST, "bad ticket: empty; give a stream name (see list_flights)")
        return Ticket(text)
    body = loads(text, "bad ticket:")
    if not isinstance(body, dict) or not isinstance(body.get("stream"), str) or not body["stream"]:
        raise error(BAD_REQUEST, 'bad ticket: a JSON ticket needs "stream" (a stream name)')
    unknown = set(body) - set(TICKET_KEYS)
    if unknown:
        raise error(
            BAD_REQUEST, f"bad ticket: unknown key(s) {_keys(unknown)}; allowed: {sorted(TICKET_KEYS)}"
        )
    start = body.get("start", "latest")
    if start not in STARTS:
        raise error(BAD_REQUEST, f'bad ticket: start must be "latest" or "oldest", got {shown(start)}')
    for key in ("after_seq", "last_rows"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise error(BAD_REQUEST, f"bad ticket: {key} must be a non-negative integer, got {shown(v)}")
    if body.get("last_rows") == 0:
        raise error(BAD_REQUEST, "bad ticket: last_rows must be at least 1")
    coalesce = body.get("coalesce_ms")
    if coalesce is not None and (
        isinstance(coalesce, bool)
        or not isinstance(coalesce, int | float)
        or not 0 <= coalesce <= COALESCE_MAX_MS  # (also refuses NaN)
    ):
        raise error(
            BAD_REQUEST,
            f"bad ticket: coalesce_ms must be a number from 0 to {COALESCE_MAX_MS}, got {shown(coalesce)}",
        )
    if coalesce is not None and body.get("last_rows") is not None:
        raise error(BAD_REQUEST, "bad ticket: coalesce_ms is for live subscriptions, not with last_rows")
    return Ticket(body["stream"], start, body.get("after_seq"), body.get("last_rows"), coalesce)


# -- batch metadata ----------------------------------------------------------------------------

#: The keys of a ``do_get`` batch's app_metadata (:class:`BatchMeta` has their meaning).
BATCH_KEYS: Final = (
    "seq",
    "stream_seq",
    "timestamp_ns",
    "lost_records",
    "lost_rows",
    "rows_before",
    "records",
)


@dataclass(frozen=True, slots=True)
class BatchMeta:
    """The app_metadata of one ``do_get`` batch: the record's sequence numbers in the ring
    (`seq`) and in its stream (`stream_seq`, None for a record written without one), when it
    was written (`timestamp_ns`), what this subscription lost before it (`lost_records`,
    `lost_rows`: None once unknown), and the rows its stream had before it (`rows_before`:
    None if the daemon no longer knows, or an older daemon did not say).

    A batch of a coalescing subscription (``coalesce_ms`` in the ticket) may hold several
    records: `records` then lists each, in order, as ``[seq, stream_seq, timestamp_ns, rows,
    rows_before]`` (their rows follow one another in the batch); the other keys are the
    first record's, the losses those before the last. None: the batch is one record."""

    seq: int
    stream_seq: int | None
    timestamp_ns: int
    lost_records: int
    lost_rows: int | None
    rows_before: int | None = None
    records: list[RecordMeta] | None = None

    def encode(self) -> pa.Buffer:
        body: dict[str, Any] = {
            "seq": self.seq,
            "stream_seq": self.stream_seq,
            "timestamp_ns": self.timestamp_ns,
            "lost_records": self.lost_records,
            "lost_rows": self.lost_rows,
            "rows_before": self.rows_before,
        }
        if self.records is not None:
            body["records"] = self.records
        return _json_buffer(body)

    @classmethod
    def decode(cls, buf: pa.Buffer) -> BatchMeta:
        m = json.loads(buf.to_pybytes())
        records = m.get("records")
        return cls(
            m["seq"],
            m["stream_seq"],
            m["timestamp_ns"],
            m["lost_records"],
            m["lost_rows"],
            m.get("rows_before"),
            None if records is None else [RecordMeta(*r) for r in records],
        )

    def each(self, num_rows: int) -> list[RecordMeta]:
        """The records of a batch of `num_rows` rows this metadata came with. Raises
        ValueError if `records` does not add up to them."""
        if self.records is not None:
            rows = [r.rows for r in self.records]
            if (
                not self.records
                or any(not isinstance(n, int) or n < 0 for n in rows)
                or sum(rows) != num_rows
            ):
                raise ValueError(
                    f"the batch metadata's records ({rows[:8]}...) do not add up to its {num_rows} rows"
                )
            return self.records
        return [RecordMeta(self.seq, self.stream_seq, self.timestamp_ns, num_rows, self.rows_before)]


class RecordMeta(NamedTuple):
    """One record of a coalesced ``do_get`` batch (:attr:`BatchMeta.records`)."""

    seq: int
    stream_seq: int | None
    timestamp_ns: int
    rows: int
    rows_before: int | None


def put_ack(seq: int) -> pa.Buffer:
    """The acknowledgement of a ``do_put`` batch, once it is in the ring as record `seq`."""
    return _json_buffer({"seq": seq})


def read_put_ack(buf: pa.Buffer) -> int:
    seq: int = json.loads(buf.to_pybytes())["seq"]
    return seq


def _json_buffer(body: dict[str, Any]) -> pa.Buffer:
    return pa.py_buffer(json.dumps(body, separators=(",", ":")).encode())


# -- actions -----------------------------------------------------------------------------------

STATUS: Final = "status"
START_RECORDING: Final = "start_recording"
STOP_RECORDING: Final = "stop_recording"
LIST_STREAMS: Final = "list_streams"

#: The actions of ``do_action`` and what they do (``list_actions`` returns this). Bodies and
#: results are JSON objects (an empty body is ``{}``).
ACTIONS: dict[str, str] = {
    STATUS: "JSON: streams (rows, records, rows/s), ring (fill, records written and lost), "
    "writer (recording, file, lag), subscribers",
    START_RECORDING: 'start the HDF5 writer on the ring; body JSON {"file": a file name, created in '
    'the daemon\'s data directory, "layout": "append"|"batches", "compression": str, "metadata": {...}}',
    STOP_RECORDING: "stop the HDF5 writer after its final flush; returns what it wrote (JSON)",
    LIST_STREAMS: "JSON: every stream with its columns (name: Arrow type)",
}


def start_recording_body(
    file: str, *, layout: str, compression: str | None, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    """The body of ``start_recording`` (the daemon also takes ``flush_interval``, seconds)."""
    body: dict[str, Any] = {"file": file, "layout": layout, "metadata": metadata or {}}
    if compression:
        body["compression"] = compression
    return body


def action(kind: str, body: dict[str, Any] | None = None) -> fl.Action:
    return fl.Action(kind, json.dumps(body or {}).encode())


def action_result(result: Any) -> bytes:
    return json.dumps(result).encode()


def read_action_result(results: list[fl.Result]) -> Any:
    return json.loads(results[0].body.to_pybytes()) if results else None


# -- errors ------------------------------------------------------------------------------------

#: A named stream is not (or no longer) in the daemon's ring; details: ``stream``.
UNKNOWN_STREAM: Final = "unknown_stream"
#: A live stream's schema changed; details: ``stream``, ``after_seq`` (the ticket resuming
#: after the last record sent, where the new schema starts).
SCHEMA_CHANGED: Final = "schema_changed"
#: The request is malformed: ticket, descriptor, action name, a body that is not JSON or is
#: nested too deeply, a call that is not offered.
BAD_REQUEST: Final = "bad_request"
#: No token, or the wrong one.
UNAUTHENTICATED: Final = "unauthenticated"
#: A well-formed request the daemon refused: a recording already running or not running, a
#: file name refused or taken, the daemon stopping, a batch the ring cannot carry, a stream
#: name of the daemon's own instruments.
REFUSED: Final = "refused"
#: Something the daemon did not expect; its log has the traceback.
INTERNAL: Final = "internal"

ERROR_CODES: Final = (UNKNOWN_STREAM, SCHEMA_CHANGED, BAD_REQUEST, UNAUTHENTICATED, REFUSED, INTERNAL)

MESSAGE_MAX: Final = 280  # characters of an error message sent to a client

_ERROR_TYPES: dict[str, type[fl.FlightError]] = {
    UNAUTHENTICATED: fl.FlightUnauthenticatedError,
    INTERNAL: fl.FlightInternalError,
}


def one_line(message: str) -> str:
    """`message` as one line of at most MESSAGE_MAX characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 1] + "…"


def error(code: str, message: str, **details: Any) -> fl.FlightError:
    """The Flight error the server raises: `message` for people (one line), `code` and
    `details` (JSON values) for programs, in ``extra_info``. ``unauthenticated`` is a
    FlightUnauthenticatedError, ``internal`` a FlightInternalError, the others
    FlightServerErrors."""
    cls = _ERROR_TYPES.get(code, fl.FlightServerError)
    extra = json.dumps({"code": code, **details}, separators=(",", ":")).encode()
    return cls(one_line(message), extra_info=extra)


@dataclass(frozen=True)
class ErrorInfo:
    """What a client learns from a Flight error: the daemon's `code` (None if it gave none:
    an older daemon, or the transport), its `details`, and the `message` without what the
    client's gRPC appends."""

    code: str | None
    message: str
    details: dict[str, Any]


def error_info(e: BaseException) -> ErrorInfo:
    """The code, details and message of `e`, a Flight error received by a client."""
    message = str(e)
    for appendix in (". Detail: ", ". gRPC client debug context"):
        message = message.split(appendix, 1)[0]
    raw = getattr(e, "extra_info", None)
    try:
        extra = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        extra = None
    if not isinstance(extra, dict) or not isinstance(extra.get("code"), str):
        return ErrorInfo(None, message, {})
    details = {k: v for k, v in extra.items() if k != "code"}
    return ErrorInfo(extra["code"], message, details)


# -- JSON from a client ------------------------------------------------------------------------


def loads(raw: bytes | str, what: str) -> Any:
    """JSON sent by a client; a ``bad_request`` error "`what` not valid JSON (why)" otherwise."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(BAD_REQUEST, f"{what} not valid JSON ({e})") from None
    except RecursionError:
        raise error(BAD_REQUEST, f"{what} not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(BAD_REQUEST, f"{what} not valid JSON ({type(e).__name__})") from None


def _keys(found: Any) -> str:
    """Unknown keys of a request, for a message: a few, each cut short."""
    listed = sorted(found, key=str)
    more = f" and {len(listed) - 3} more" if len(listed) > 3 else ""
    return "[" + ", ".join(shown(k, 30) for k in listed[:3]) + "]" + more
