"""What rust-daq puts on NATS JetStream: subjects, headers, the schema and position buckets,
the object store for large records. A consumer in another language follows these; they are
documented in docs/distributed.md ("JetStream: subjects and headers").

- The records of a prefix go to the JetStream stream that holds the subjects ``<prefix>.>``:
  one an operator made, or (made by the first publisher) ``RDAQ_<prefix>`` (dots become
  ``_``), file storage; each record of a ring goes to ``<prefix>.<host>.<stream>``
  (host and stream percent-encoded into one NATS token each: :func:`token`).
- Payload: the ring record's Arrow IPC message (a record batch, without its schema: the
  ring's own payload, sent as it is). The schema is stored once in the key-value bucket
  ``rdaq-schemas`` under its SHA-256 (``Rdaq-Schema``), so a consumer that starts late
  decodes everything.
- A record larger than what fits in one message (the server's ``max_payload``) goes to the
  object store ``RDAQ_<prefix>_OBJ`` under ``<session>.<seq>``; the stream gets a pointer
  message with an empty payload and ``Rdaq-Object`` naming it (``Rdaq-Size`` its bytes).
- A publisher that the ring lapped sends a loss marker (``Rdaq-Kind: lost``) on the stream's
  subject before the stream's next record: the records (``Rdaq-Lost-Records``) and, where
  known, rows (``Rdaq-Lost-Rows``) lost since its previous record.
- Publishers store their position (ring session, next ring sequence, rows per stream) in
  the bucket ``rdaq-publishers``, after the records up to it were acknowledged; a restarted
  publisher resumes there and re-sends what came after, which the server drops by
  ``Nats-Msg-Id`` (the stream's duplicate window).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

import pyarrow as pa

__all__ = [
    "DEFAULT_PREFIX",
    "Header",
    "MessageInfo",
    "object_bucket",
    "parse",
    "position_key",
    "records_filter",
    "schema_key",
    "split_key",
    "stream_key",
    "stream_name",
    "subject",
    "token",
]

DEFAULT_PREFIX: Final = "rdaq"
SCHEMAS_BUCKET: Final = "rdaq-schemas"
POSITIONS_BUCKET: Final = "rdaq-publishers"
#: Room left for the headers when a record is sent inline (the rest of max_payload).
HEADER_ROOM: Final = 1024
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class Header:
    """The headers of a record message (all values ASCII strings)."""

    MSG_ID: Final = "Nats-Msg-Id"  #: ``<session>:<seq>`` (``<session>:<seq>:lost`` for a marker)
    KIND: Final = "Rdaq-Kind"  #: ``batch`` (a record) or ``lost`` (a loss marker)
    HOST: Final = "Rdaq-Host"  #: the publisher's host name (percent-encoded)
    STREAM: Final = "Rdaq-Stream"  #: the ring's stream name (percent-encoded UTF-8)
    SESSION: Final = "Rdaq-Session"  #: the ring's session id (a new ring: a new session)
    SEQ: Final = "Rdaq-Seq"  #: the record's sequence number in its ring
    STREAM_SEQ: Final = "Rdaq-Stream-Seq"  #: ...in its stream (a gap: records lost)
    ROWS: Final = "Rdaq-Rows"  #: rows in the batch
    ROWS_BEFORE: Final = "Rdaq-Rows-Before"  #: rows of the stream before it (where known)
    TIMESTAMP: Final = "Rdaq-Timestamp-Ns"  #: the record's timestamp in the ring (ns, Unix)
    SCHEMA: Final = "Rdaq-Schema"  #: the schema's key in the bucket ``rdaq-schemas``
    OBJECT: Final = "Rdaq-Object"  #: the payload's name in the object store (large records)
    SIZE: Final = "Rdaq-Size"  #: the payload's bytes (with Rdaq-Object)
    LOST_RECORDS: Final = "Rdaq-Lost-Records"  #: a loss marker: records lost
    LOST_ROWS: Final = "Rdaq-Lost-Rows"  #: ...and the rows they held, where known


def token(name: str) -> str:
    """`name` as one NATS subject token: percent-encoded UTF-8, with ``.``, ``*``, ``>``,
    whitespace and ``%`` encoded too (``cam.roi 1`` -> ``cam%2Eroi%201``); the empty name
    is ``%``. Reversible: :func:`untoken`."""
    if name == "":
        return "%"
    return quote(name, safe="").replace(".", "%2E").replace("~", "%7E")


def untoken(value: str) -> str:
    return "" if value == "%" else unquote(value)


def check_prefix(prefix: str) -> str:
    """A subject prefix: tokens of letters, digits, ``_`` and ``-`` joined by dots."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ValueError(
            f"bad NATS subject prefix {prefix!r}: use tokens of letters, digits, '_' and '-' "
            "joined by dots (e.g. rdaq.cam1)"
        )
    return prefix


def stream_name(prefix: str) -> str:
    """The JetStream stream of a prefix: ``rdaq.cam1`` -> ``RDAQ_rdaq_cam1``."""
    return "RDAQ_" + check_prefix(prefix).replace(".", "_")


def object_bucket(prefix: str) -> str:
    """The object store of a prefix's large records."""
    return stream_name(prefix) + "_OBJ"


def subject(prefix: str, host: str, stream: str) -> str:
    return f"{prefix}.{token(host)}.{token(stream)}"


def stream_key(host: str, stream: str) -> str:
    """The name a consumer gives a host's stream (HDF5 file, live readers): ``<host>.<stream>``
    with the host as its subject token (``acq1.cam``; a host ``a.b`` is ``a%2Eb``), so that no
    two (host, stream) pairs share a name: the first dot ends the host."""
    return f"{token(host)}.{stream}"


def split_key(name: str) -> tuple[str, str]:
    """(host, stream) of a :func:`stream_key`; ValueError if it has no dot."""
    host, dot, stream = name.partition(".")
    if not dot or not host:
        raise ValueError(f"{name!r} is not <host>.<stream>")
    return untoken(host), stream


def records_filter(prefix: str) -> str:
    """The subjects of a prefix's records, and of no longer prefix's: ``<prefix>.*.*``."""
    return f"{prefix}.*.*"


def position_key(prefix: str, host: str) -> str:
    """A publisher's key in ``rdaq-publishers`` (keys allow ``[-_=./a-zA-Z0-9]``)."""
    return f"{stream_name(prefix)}.{host.encode().hex()}"


def schema_key(schema: pa.Schema) -> str:
    """A schema's key in ``rdaq-schemas``: the SHA-256 of its IPC serialization, 32 hex digits."""
    return hashlib.sha256(schema.serialize().to_pybytes()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """A message's rust-daq headers, parsed."""

    kind: str
    host: str
    stream: str
    session: str
    seq: int
    stream_seq: int | None
    rows: int
    rows_before: int | None
    timestamp_ns: int
    schema: str | None
    object: str | None
    size: int | None
    lost_records: int
    lost_rows: int | None


def _int(headers: dict[str, str], key: str) -> int | None:
    v = headers.get(key)
    return None if v is None or v == "" else int(v)


def parse(headers: dict[str, str] | None) -> MessageInfo:
    """A message's headers; ValueError if it is not a rust-daq message (no ``Rdaq-Kind``,
    or a number that is not one)."""
    h = headers or {}
    kind = h.get(Header.KIND)
    if kind not in ("batch", "lost"):
        raise ValueError(f"not a rust-daq message (Rdaq-Kind {kind!r})")
    return MessageInfo(
        kind,
        untoken(h.get(Header.HOST, "")),
        untoken(h.get(Header.STREAM, "")),
        h.get(Header.SESSION, ""),
        _int(h, Header.SEQ) or 0,
        _int(h, Header.STREAM_SEQ),
        _int(h, Header.ROWS) or 0,
        _int(h, Header.ROWS_BEFORE),
        _int(h, Header.TIMESTAMP) or 0,
        h.get(Header.SCHEMA),
        h.get(Header.OBJECT),
        _int(h, Header.SIZE),
        _int(h, Header.LOST_RECORDS) or 0,
        _int(h, Header.LOST_ROWS),
    )
