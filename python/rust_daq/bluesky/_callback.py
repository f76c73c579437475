"""RunEngine documents into a ring: :class:`RingCallback`, an event-model ``DocumentRouter``
to subscribe (``RE.subscribe(RingCallback(ring))``).

Each event descriptor becomes an Arrow stream of the ring, its schema made from the
descriptor's data keys (``_keys.py`` has the type table):

- ``time``: ``timestamp[ns]`` from the event's ``time`` (field metadata ``units: ns``);
- ``seq_num``: int64, the event's sequence number in its descriptor;
- one column per data key, nullable (a missing value is a null), with the key's ``units``,
  ``source`` and ``precision`` as field metadata;
- ``timestamps``: a struct of one ``timestamp[ns]`` per data key, the key's own timestamp
  (the HDF5 writer stores it as ``timestamps.<key>``).

Keys whose data is ``external`` (``STREAM:``, ``FILESTORE:``: a detector that writes its own
file) have no column: they are listed in the stream's ``bluesky.external`` metadata with
their data keys; the values events carry for them (datum ids) are references, not data, and
are not written.

The schema's metadata identifies the run (``schema_metadata="documents"``, the default):
``bluesky.run_uid``, ``bluesky.scan_id`` (when the start document has one),
``bluesky.descriptor_uid``, ``bluesky.descriptor_name``, ``bluesky.start`` and
``bluesky.descriptor`` (the documents as JSON) and ``bluesky.external``. The HDF5 writer
stores it with the stream (``arrow_schema_json`` of the stream's group).

An ``event`` is written as one record of one row, an ``event_page`` as one record of all its
rows, both with ``RingBuffer.write_arrow_batch``.

The ring's schema table is append-only (256 KiB): a schema is registered once per stream and
distinct schema, and a schema that carries a run's documents is distinct for every run. A
``bp.count`` of one soft detector with a SimMotor registers 3.1 KiB: the table is full after
about 80 runs, fewer with devices whose configuration fills the descriptor, and the next
run's first event raises RingConfigError. ``schema_metadata`` chooses:

============  =================================================  ==========================
value         schema metadata                                    runs a ring holds
============  =================================================  ==========================
documents     all of the above                                   ~256 KiB / (schema + docs)
ids           the same without ``bluesky.start`` and             ~256 KiB / schema
              ``bluesky.descriptor``
minimal       ``bluesky.descriptor_name`` and ``bluesky.external``  per_run=False: unbounded
              only: runs of the same devices share one schema     (one schema per distinct
                                                                  set of keys)
============  =================================================  ==========================

``per_run=True`` makes new streams every run, so it registers schemas every run whatever the
metadata. :class:`~rust_daq.bluesky.RunFileWriter` uses ``per_run=False, "minimal"`` and
stores the documents in each run's file instead.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import pyarrow as pa
from event_model import DocumentRouter
from event_model.documents import Event, EventDescriptor, EventPage, RunStart, RunStop

from .._errors import DocumentError, ReadOnlyRingError, RingConfigError, RustDaqError
from .._ring import RingBuffer
from ._keys import Column, Number, _Invalid, column_for

__all__ = ["RESERVED_NAMES", "RingCallback", "document_json"]

#: Columns every stream has; a data key of one of these names is refused (two columns of one
#: name would make the file ambiguous).
RESERVED_NAMES = ("time", "seq_num", "timestamps")

SchemaMetadata = Literal["documents", "ids", "minimal"]
_LEVELS = ("documents", "ids", "minimal")

_NS = pa.timestamp("ns")
_SECONDS = Number(np.dtype(np.float64))
_SEQ = Number(np.dtype(np.int64))


def _json_default(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, set | frozenset):
        return sorted(v, key=repr)
    if isinstance(v, bytes):
        return {"base64": base64.b64encode(v).decode("ascii")}
    return repr(v)


def document_json(doc: Mapping[str, Any]) -> str:
    """A document as JSON: numpy arrays as lists, numpy scalars as numbers, anything else JSON
    does not know as its ``repr``."""
    return json.dumps(doc, default=_json_default)


def _ns(seconds: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Float seconds since the epoch as int64 ns, exact to the float's own resolution (whole
    seconds and the fraction apart: ``t * 1e9`` alone rounds to 256 ns)."""
    whole = np.floor(seconds)
    ns: np.ndarray[Any, Any] = whole.astype(np.int64) * 1_000_000_000
    ns += np.rint((seconds - whole) * 1e9).astype(np.int64)
    return ns


def seconds_to_ns(seconds: Sequence[float]) -> np.ndarray[Any, Any]:
    """What :class:`RingCallback` writes for the document times `seconds` (for comparisons)."""
    return _ns(np.asarray(seconds, dtype=np.float64))


@dataclass
class _Stream:
    """What the callback knows of one descriptor."""

    name: str  # in the ring
    run_uid: str
    descriptor_uid: str
    descriptor_name: str
    schema: pa.Schema
    columns: list[tuple[str, Column]]
    external: frozenset[str]
    events: int = 0
    _keys: frozenset[str] = field(default=frozenset())

    def __post_init__(self) -> None:
        self._keys = frozenset(k for k, _ in self.columns)
        self._stamp_fields = list(self.schema.field("timestamps").type) if self.columns else []

    def _where(self, seq_nums: Sequence[Any], row: int) -> str:
        seq = seq_nums[row] if row < len(seq_nums) else "?"
        return f"stream {self.descriptor_name!r} (descriptor {self.descriptor_uid}), event seq_num {seq}"

    def _check_keys(self, what: str, got: Mapping[str, Any], seq_nums: Sequence[Any]) -> None:
        unknown = [k for k in got if k not in self._keys and k not in self.external]
        if unknown:
            raise DocumentError(
                f"{self._where(seq_nums, 0)}: {what} {unknown[0]!r} is not a data key of the descriptor "
                f"(its keys: {sorted(self._keys | self.external)})"
            )

    def _timestamps(
        self, n: int, seq_nums: Sequence[Any], timestamps: Mapping[str, Sequence[Any]]
    ) -> pa.StructArray:
        """The ``timestamps`` struct: every key's at once (one array of seconds, NaN where an
        event has none), a null where it is missing."""
        seconds = np.full((len(self.columns), n), np.nan)
        for j, (key, _) in enumerate(self.columns):
            got = timestamps.get(key)
            if got is None:
                continue
            try:
                seconds[j] = np.asarray(got, dtype=np.float64)  # (None: NaN)
            except (TypeError, ValueError):
                try:
                    _SECONDS.convert(list(got))
                except _Invalid as e:
                    raise DocumentError(
                        f"{self._where(seq_nums, e.row)}: timestamps[{key!r}] {e.why}"
                    ) from None
                raise  # (a value numpy refused that the check took: not expected)
        missing = ~np.isfinite(seconds)
        ns = _ns(np.where(missing, 0.0, seconds)).reshape(-1)
        # One Arrow array for every key (pa.array of a timestamp type costs ~20 us a call).
        flat = pa.array(ns, mask=missing.reshape(-1) if missing.any() else None).view(_NS)
        children = [flat.slice(j * n, n) for j in range(len(self.columns))]
        return pa.StructArray.from_arrays(children, fields=self._stamp_fields)

    def batch(
        self,
        n: int,
        times: Sequence[Any],
        seq_nums: Sequence[Any],
        data: Mapping[str, Sequence[Any]],
        timestamps: Mapping[str, Sequence[Any]],
    ) -> pa.RecordBatch:
        """The rows of `n` events (columns of values, as in an event page) as one batch.
        Raises DocumentError naming the key and event of a value that does not fit."""
        self._check_keys("data key", data, seq_nums)
        self._check_keys("timestamps key", timestamps, seq_nums)
        for what, values in [
            ("time", times),
            ("seq_num", seq_nums),
            *((f"data[{k!r}]", v) for k, v in data.items()),
            *((f"timestamps[{k!r}]", v) for k, v in timestamps.items()),
        ]:
            if not isinstance(values, Sequence) or len(values) != n:
                raise DocumentError(
                    f"{self._where(seq_nums, 0)}: {what} holds {len(values) if isinstance(values, Sequence) else values!r}"
                    f" values for {n} events"
                )
        arrays: list[pa.Array] = []
        try:
            t = _SECONDS.array(list(times))
        except _Invalid as e:
            raise DocumentError(f"{self._where(seq_nums, e.row)}: time {e.why}") from None
        if not np.isfinite(t).all():
            raise DocumentError(f"{self._where(seq_nums, 0)}: time {list(times)} is not finite")
        arrays.append(pa.array(_ns(t), type=_NS))
        try:
            arrays.append(pa.array(_SEQ.array(list(seq_nums)), type=pa.int64()))
        except _Invalid as e:
            raise DocumentError(f"{self._where(seq_nums, e.row)}: seq_num {e.why}") from None
        for key, column in self.columns:
            got = data.get(key)
            try:
                arrays.append(column.convert([None] * n if got is None else list(got)))
            except _Invalid as e:
                raise DocumentError(
                    f"{self._where(seq_nums, e.row)}: data key {key!r} ({column.what}): {e.why}"
                ) from None
        if self.columns:
            arrays.append(self._timestamps(n, seq_nums, timestamps))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _field_metadata(data_key: Mapping[str, Any]) -> dict[str, str]:
    md: dict[str, str] = {}
    for name in ("units", "source", "precision"):
        value = data_key.get(name)
        if value is not None:
            md[name] = str(value)
    return md


class RingCallback(DocumentRouter):
    """RunEngine documents into `ring` (a producer handle): subscribe it with
    ``RE.subscribe(RingCallback(ring))``. See the module documentation for the schema.

    ``per_run=True``: each run's streams are its own, named ``<descriptor name>_<uid[:8]>``
    (``primary_1a2b3c4d``; the whole uid if another run in the ring already has that name), so
    two runs never share a stream (a reader or the HDF5 writer keeps them apart; a stream's
    metadata holds its run). ``per_run=False``: streams are named after the descriptors
    (``primary``), and the runs' rows follow each other in them, each run's with its own
    schema (and metadata).

    Errors (DocumentError: a value that contradicts its data key, an event of a descriptor not
    seen; what ``write_arrow_batch`` raises) are raised to the RunEngine, which stops the
    run with them unless told to ignore callback exceptions.
    """

    def __init__(
        self, ring: RingBuffer, per_run: bool = True, *, schema_metadata: SchemaMetadata = "documents"
    ) -> None:
        super().__init__()
        if schema_metadata not in _LEVELS:
            raise ValueError(
                f"schema_metadata must be one of {', '.join(map(repr, _LEVELS))}, got {schema_metadata!r}"
            )
        if not isinstance(ring, RingBuffer):
            raise TypeError(f"ring must be a rust_daq.RingBuffer, got {type(ring).__name__}")
        if not ring.writable:
            raise ReadOnlyRingError(
                f"{ring.path}: this handle is not the ring's producer; pass the RingBuffer from "
                "RingBuffer.create() or RingBuffer.open(path, writable=True)"
            )
        self.ring = ring
        self.per_run = bool(per_run)
        self.schema_metadata = schema_metadata
        self._starts: dict[str, RunStart] = {}
        self._streams: dict[str, _Stream] = {}  # by descriptor uid
        self._names: dict[str, str] = {}  # ring stream name -> run uid, of the runs seen
        self._runs: dict[str, dict[str, str]] = {}  # run uid -> {descriptor name: ring stream}

    def streams_of(self, run_uid: str) -> dict[str, str]:
        """The ring streams of a run this callback wrote: ``{descriptor name: stream}``."""
        return dict(self._runs.get(run_uid, {}))

    # -- documents ---------------------------------------------------------------------------

    def start(self, doc: RunStart) -> RunStart | None:
        self._starts[doc["uid"]] = doc
        self._runs.setdefault(doc["uid"], {})
        return None

    def descriptor(self, doc: EventDescriptor) -> EventDescriptor | None:
        run_uid = doc.get("run_start")
        start = self._starts.get(run_uid) if isinstance(run_uid, str) else None
        name = str(doc.get("name") or "primary")
        if start is None:
            raise DocumentError(
                f"descriptor {doc.get('uid')} (stream {name!r}) belongs to run {run_uid}, whose start "
                "document this callback has not seen: subscribe it before the run starts"
            )
        assert isinstance(run_uid, str)
        stream = self._stream_name(name, run_uid)
        data_keys = doc.get("data_keys")
        if not isinstance(data_keys, Mapping):
            raise DocumentError(f"descriptor {doc.get('uid')} (stream {name!r}) has no data_keys mapping")
        columns: list[tuple[str, Column]] = []
        fields = [
            pa.field("time", _NS, nullable=False, metadata={"units": "ns"}),
            pa.field("seq_num", pa.int64(), nullable=False),
        ]
        external: dict[str, Any] = {}
        for key, dk in data_keys.items():
            where = f"descriptor {doc.get('uid')} (stream {name!r}), data key {key!r}"
            if isinstance(dk, Mapping) and dk.get("external"):
                external[key] = dict(dk)
                continue
            if key in RESERVED_NAMES or key.startswith("timestamps."):
                raise DocumentError(
                    f"{where}: the name is taken by a column every stream has ({', '.join(RESERVED_NAMES)}); "
                    "rename the signal (its device's name)"
                )
            column = column_for(where, dk)
            columns.append((key, column))
            fields.append(pa.field(key, column.type, nullable=True, metadata=_field_metadata(dk) or None))
        if columns:
            stamps = pa.struct([pa.field(key, _NS) for key, _ in columns])
            fields.append(pa.field("timestamps", stamps, nullable=True))
        metadata = {"bluesky.descriptor_name": name, "bluesky.external": document_json(external)}
        if self.schema_metadata != "minimal":
            metadata["bluesky.run_uid"] = run_uid
            metadata["bluesky.descriptor_uid"] = str(doc.get("uid"))
            if start.get("scan_id") is not None:
                metadata["bluesky.scan_id"] = str(start.get("scan_id"))
        if self.schema_metadata == "documents":
            metadata["bluesky.start"] = document_json(start)
            metadata["bluesky.descriptor"] = document_json(doc)
        schema = pa.schema(fields, metadata=metadata)
        self._streams[str(doc.get("uid"))] = _Stream(
            stream, run_uid, str(doc.get("uid")), name, schema, columns, frozenset(external)
        )
        self._names[stream] = run_uid
        self._runs.setdefault(run_uid, {})[name] = stream
        return None

    def event(self, doc: Event) -> Event:
        s = self._stream_of(doc, doc.get("seq_num"))
        data = doc.get("data", {})
        stamps = doc.get("timestamps", {})
        if not isinstance(data, Mapping) or not isinstance(stamps, Mapping):
            raise DocumentError(f"event {doc.get('uid')}: data and timestamps must be mappings")
        batch = s.batch(
            1,
            [doc.get("time")],
            [doc.get("seq_num")],
            {k: [v] for k, v in data.items()},
            {k: [v] for k, v in stamps.items()},
        )
        self._write(s, batch)
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        seq_nums = doc.get("seq_num")
        s = self._stream_of(doc, seq_nums[0] if isinstance(seq_nums, Sequence) and seq_nums else None)
        n = len(seq_nums) if isinstance(seq_nums, Sequence) else 0
        data, stamps = doc.get("data", {}), doc.get("timestamps", {})
        if not isinstance(data, Mapping) or not isinstance(stamps, Mapping):
            raise DocumentError(
                f"event page of descriptor {doc.get('descriptor')}: data and timestamps must be mappings"
            )
        batch = s.batch(n, cast(Sequence[Any], doc.get("time")), cast(Sequence[Any], seq_nums), data, stamps)
        if n:
            self._write(s, batch)
        return doc

    def stop(self, doc: RunStop) -> RunStop | None:
        run_uid = doc.get("run_start")
        self._starts.pop(str(run_uid), None)
        for uid in [u for u, s in self._streams.items() if s.run_uid == run_uid]:
            del self._streams[uid]
        return None

    # -- helpers -----------------------------------------------------------------------------

    def _stream_of(self, doc: Mapping[str, Any], seq_num: Any) -> _Stream:
        uid = doc.get("descriptor")
        s = self._streams.get(uid) if isinstance(uid, str) else None
        if s is None:
            raise DocumentError(
                f"event (seq_num {seq_num}) of descriptor {uid}, which this callback has not seen: "
                "subscribe it before the run starts"
            )
        return s

    def _stream_name(self, name: str, run_uid: str) -> str:
        if not self.per_run:
            return name
        short = f"{name}_{run_uid[:8]}"
        owner = self._names.get(short)
        if owner is None:
            try:
                schema = self.ring.streams().get(short)
            except RustDaqError:  # an undecodable schema table: the write will say so
                schema = None
            if schema is not None:
                owner = (schema.metadata or {}).get(b"bluesky.run_uid", b"").decode("utf-8", "replace")
        return short if owner in (None, run_uid) else f"{name}_{run_uid}"

    def _write(self, s: _Stream, batch: pa.RecordBatch) -> None:
        try:
            self.ring.write_arrow_batch(batch, s.name)
        except RingConfigError as e:
            if "schema region is full" not in str(e):
                raise
            raise RingConfigError(
                f"{e}: every run registers its own schemas (with its documents as metadata) in the "
                f"ring's schema table, which is full; write the next runs to a new ring"
            ) from e
        s.events += batch.num_rows
