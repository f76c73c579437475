"""A run configuration (TOML) and the :class:`Session` it describes. (The session itself is
in :mod:`rust_daq._session`, re-exported here: what runs it needs no pydantic.)

The schema is pydantic models (:class:`RunTable` and its tables; the instruments' tables come
from :mod:`rust_daq.adapters.registry`), so that every bad value is named, with its file,
table and key, what it is and what is allowed, before anything runs; all of them at once,
one line each, in a :class:`~rust_daq.ConfigError`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, ValidationError, model_validator

from ._errors import ConfigError
from ._ring import resolve_ring_path
from ._session import Session, default_ring_name
from .adapters import Instrument
from .adapters.registry import INSTRUMENT_TYPES, Finite, Table, said
from .hdf5.options import check_compression

__all__ = ["ConfigError", "RunTable", "Session", "default_ring_name", "load_config"]


# -- the schema -------------------------------------------------------------------------------


def _positive(what: str) -> AfterValidator:
    def check(value: float) -> float:
        if not value > 0:
            raise ValueError(f"must be a positive number of {what}")
        return value

    return AfterValidator(check)


class RingTable(Table):
    path: str | None = None
    capacity_mb: Annotated[Finite, _positive("MiB")] = 256
    #: The stream table's size (default: a sixteenth of the capacity, 0.25 to 64 MiB; a
    #: stream's schema takes about 450 bytes).
    schema_mb: Annotated[Finite, _positive("MiB")] | None = None
    policy: Literal["overwrite", "block"] = "overwrite"
    keep: bool = False

    @model_validator(mode="after")
    def _kept_rings_are_named(self) -> RingTable:
        if self.keep and self.path is None:
            raise said("keep = true needs a path (a ring kept under a random name cannot be found)")
        return self


def _compression(value: str) -> str:
    try:
        check_compression(value)
    except ValueError as e:  # its message names the value and what is allowed
        raise said(str(e)) from None
    return value


class WriterTable(Table):
    output: str = "experiment_data.h5"
    layout: Literal["append", "batches"] = "append"
    compression: Annotated[str, AfterValidator(_compression)] | None = None
    flush_interval: Annotated[Finite, _positive("seconds")] = 1.0
    enabled: bool = True


class DaemonTable(Table):
    data_dir: str | None = None


def _nats_url(value: str) -> str:
    from ._errors import JetStreamError
    from .nats.connection import parse_url

    try:
        parse_url(value)
    except JetStreamError as e:
        raise said(str(e)) from None
    return value


def _prefix(value: str) -> str:
    from .nats.protocol import check_prefix

    try:
        return check_prefix(value)
    except ValueError as e:
        raise said(str(e)) from None


class NatsTable(Table):
    """``[nats]``: publish the run's ring to JetStream while it runs (rust_daq.nats). The
    credentials may be here or in the environment (RUST_DAQ_NATS_*), never on a command line."""

    url: Annotated[str, AfterValidator(_nats_url)]
    prefix: Annotated[str, AfterValidator(_prefix)] = "rdaq"
    host_name: str | None = None
    replicas: Annotated[int, Field(ge=1, le=5)] = 1
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


class AcquisitionTable(Table):
    """``[acquisition]``: how the loop runs. ``realtime``: SCHED_FIFO at ``priority``, pinned
    to ``cpu`` (default: the last), memory locked; each applied if permitted, reported in the
    run's summary either way."""

    realtime: bool = False
    priority: Annotated[int, Field(ge=1, le=99)] = 50
    cpu: Annotated[int, Field(ge=0)] | None = None


Duration = Annotated[Finite, _positive("seconds (omit it to run until Ctrl-C)")]


class RunTable(Table):
    """The whole file; see ``rust-daq run --help``."""

    duration: Duration | None = None
    ring: RingTable = RingTable()
    acquisition: AcquisitionTable = AcquisitionTable()
    writer: WriterTable = WriterTable()
    daemon: DaemonTable = DaemonTable()
    nats: NatsTable | None = None
    metadata: dict[str, Any] = {}
    #: Checked one by one against the registry (:func:`_instrument`).
    instruments: list[Any] = []


# -- loading -----------------------------------------------------------------------------------


def load_config(path: Path, *, need_instruments: bool = True) -> Session:
    """Parses and validates a run configuration (TOML); see ``rust-daq run --help``. A
    daemon's config may have no instruments (``need_instruments=False``): it then only
    receives remote instruments' batches (Flight ``do_put``). Raises ConfigError naming
    every problem."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise ConfigError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    problems: list[str] = []
    specs = raw.get("instruments", [])
    try:
        run = RunTable.model_validate(raw)
    except ValidationError as e:
        problems += _lines(e, str(path), RunTable)
        run = None
    try:  # what a frame must fit in; a bad [ring] is said above
        capacity: float | None = RingTable.model_validate(raw.get("ring", {})).capacity_mb
    except ValidationError:
        capacity = None
    instruments: list[Instrument] = []
    if isinstance(specs, list):
        if not specs and need_instruments:
            problems.append(
                f"{path}: no [[instruments]]; add at least one (type = {', '.join(INSTRUMENT_TYPES)})"
            )
        for i, spec in enumerate(specs):
            where = f"{path} [[instruments]] #{i + 1}"
            try:
                inst = _instrument(where, spec, capacity)
            except ConfigError as e:
                problems += str(e).splitlines()
            else:
                instruments.append(inst)
    if problems:
        raise ConfigError("\n".join(problems))
    assert run is not None
    names = [inst.name for inst in instruments]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: instrument names must be unique (they name the streams): {names}")
    return Session(
        instruments=instruments,
        ring_path=resolve_ring_path(run.ring.path or default_ring_name("")),
        capacity_mb=run.ring.capacity_mb,
        schema_mb=run.ring.schema_mb,
        realtime=(
            {"priority": run.acquisition.priority, "cpu": run.acquisition.cpu}
            if run.acquisition.realtime
            else None
        ),
        policy=run.ring.policy,
        output=run.writer.output if run.writer.enabled else None,
        layout=run.writer.layout,
        compression=run.writer.compression,
        flush_interval=float(run.writer.flush_interval),
        duration=run.duration,
        metadata=run.metadata,
        own_ring=not run.ring.keep,
        data_dir=run.daemon.data_dir,
        nats=run.nats.model_dump() if run.nats is not None else None,
    )


def _instrument(where: str, spec: object, capacity_mb: float | None) -> Instrument:
    """The instrument a ``[[instruments]]`` table describes, by its type's registry entry."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: needs a type ({', '.join(INSTRUMENT_TYPES)})")
    spec = dict(spec)
    kind = spec.pop("type")
    entry = INSTRUMENT_TYPES.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise ConfigError(
            f"{where}: unknown instrument type {kind!r}; allowed: {', '.join(INSTRUMENT_TYPES)}"
        )
    try:
        table = entry.table.model_validate(spec, context={"capacity_mb": capacity_mb})
    except ValidationError as e:
        raise ConfigError("\n".join(_lines(e, where, entry.table))) from None
    try:
        return entry.build(table)
    except (TypeError, ValueError) as e:  # what the adapter itself refuses
        raise ConfigError(f"{where}: {e}") from e


# -- pydantic's errors, as one line each --------------------------------------------------------

_MUST = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "string_type": "a string",
    "bool_type": "true/false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "finite_number": "a finite number",
}


def _lines(error: ValidationError, where: str, model: type[BaseModel]) -> list[str]:
    """One line per problem: ``<file> [table]: <key> must be <what is allowed>, got <value>``."""
    lines = []
    for e in error.errors(include_url=False):
        loc = [str(part) for part in e["loc"]]
        kind, value = e["type"], e.get("input")
        table, fields = model, model.model_fields
        prefix = where
        # Into the tables ([ring]...): their keys are named there. (A table that is not one,
        # `ring = 5`, is the key of its parent.)
        while (
            (len(loc) > 1 or kind == "rust_daq")
            and loc
            and loc[0] in fields
            and _model_of(fields[loc[0]].annotation)
        ):
            table = _model_of(fields[loc[0]].annotation)  # type: ignore[assignment]
            prefix += f" [{loc.pop(0)}]"
            fields = table.model_fields
        key = ".".join(loc)
        if kind == "rust_daq":
            text = e["msg"]
        elif kind == "extra_forbidden":
            text = f"unknown key {key!r}; allowed: {', '.join(sorted(fields))}"
        elif kind == "missing":
            described = fields[key].description if key in fields else None
            text = f"needs a {key}" + (f" ({described})" if described else "")
        elif kind == "value_error":
            text = f"{key} {e['ctx']['error']}, got {value!r}"
        elif kind == "literal_error":
            text = f"{key} must be {e['ctx']['expected']}, got {value!r}"
        elif kind in _MUST:
            text = f"{key} must be {_MUST[kind]}, got {value!r}"
        else:  # a check without a message of ours: pydantic's, still naming key and value
            text = f"{key}: {e['msg']}, got {value!r}"
        lines.append(f"{prefix}: {text}")
    return lines


def _model_of(annotation: object) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
