"""Property test of the writer (issue 15, item 1): random streams with odd names, random
schemas of every supported type with nulls, schema changes mid-stream, records that are not
Arrow batches at all, written through a real ring and a real writer process. Every row must
be in the file exactly once, with its value, or its record accounted for as quarantined.

Each example holds many streams, so that a CI run covers thousands (``RDAQ_PROPERTY_STREAMS``
sets how many; the default 2,000 runs in about a minute here)."""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rust_daq import RingBuffer

from h5stream import book, columns, stream_group
from processes import writer_process

_RUNS = itertools.count()
STREAMS_PER_EXAMPLE = 20
EXAMPLES = int(os.environ.get("RDAQ_PROPERTY_EXAMPLES", "15"))
FUZZ_STREAMS = int(os.environ.get("RDAQ_FUZZ_STREAMS", "2000"))
FUZZ_STREAMS_PER_RING = 200  # (each ring's schema table holds a few hundred schemas)

# Names with every character HDF5 or our own layout could trip on.
NAME = st.lists(
    st.sampled_from(list("ab/.%_ é\0\t") + ["__valid", "__2", "arrow_schema", "metadata"]), max_size=3
).map("".join)

TYPES: dict[str, pa.DataType] = {
    "i64": pa.int64(),
    "i8": pa.int8(),
    "u16": pa.uint16(),
    "f64": pa.float64(),
    "f32": pa.float32(),
    "bool": pa.bool_(),
    "str": pa.string(),
    "lstr": pa.large_string(),
    "sview": pa.string_view(),
    "bin": pa.binary(),
    "ts": pa.timestamp("us", tz="UTC"),
    "fsl": pa.list_(pa.float64(), 3),
    "list": pa.list_(pa.int32()),
    "struct": pa.struct([("a", pa.float64()), ("b", pa.string())]),
    "null": pa.null(),
}


def _value(kind: str) -> st.SearchStrategy[Any]:
    if kind == "i64":
        return st.integers(-(2**63), 2**63 - 1)
    if kind == "ts":  # microseconds that fit in int64 nanoseconds
        return st.integers(-(2**53), 2**53)
    if kind == "i8":
        return st.integers(-128, 127)
    if kind == "u16":
        return st.integers(0, 2**16 - 1)
    if kind == "f64":
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == "f32":
        return st.floats(width=32, allow_nan=False)
    if kind == "bool":
        return st.booleans()
    if kind in ("str", "lstr", "sview"):
        return st.text(alphabet=st.sampled_from(list("xyé\0 ") + ["\U0001f600"]), max_size=6)
    if kind == "bin":
        return st.binary(max_size=6)
    if kind == "fsl":
        return st.lists(st.floats(allow_nan=False), min_size=3, max_size=3)
    if kind == "list":
        return st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3)
    if kind == "struct":
        return st.fixed_dictionaries(
            {"a": st.none() | st.floats(allow_nan=False), "b": st.none() | st.text(max_size=3)}
        )
    return st.none()


@dataclass
class Column:
    name: str
    kind: str
    values: list[Any]

    def array(self) -> pa.Array:
        t = TYPES[self.kind]
        if self.kind == "ts":
            return pa.array(self.values, pa.int64()).cast(t)
        return pa.array(self.values, t)


@st.composite
def batches(draw: st.DrawFn) -> list[list[Column]]:
    """One stream: 1-4 batches, each of one of up to 3 schemas (a schema change mid-stream)."""
    schemas = draw(
        st.lists(
            st.lists(st.tuples(NAME, st.sampled_from(sorted(TYPES))), min_size=1, max_size=4),
            min_size=1,
            max_size=3,
        )
    )
    out = []
    for _ in range(draw(st.integers(1, 4))):
        schema = draw(st.sampled_from(schemas))
        rows = draw(st.integers(1, 5))
        cols = []
        for name, kind in schema:
            nullable = kind == "null" or draw(st.booleans())
            value = st.none() | _value(kind) if nullable else _value(kind)
            cols.append(Column(name, kind, draw(st.lists(value, min_size=rows, max_size=rows))))
        out.append(cols)
    return out


def _expected(kind: str, v: Any) -> Any:
    """A value as the file holds it (read back by h5stream)."""
    if v is None:
        return None
    if kind == "ts":
        return v * 1000  # ns
    if kind == "bin":
        return list(v)
    if kind == "f32":
        return float(np.float32(v))
    return v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _expect_stream(stream: list[list[Column]]) -> dict[tuple[tuple[str, ...], int], list[Any]]:
    """Per column key (field path, and how many earlier columns of the batch had that same
    path: docs/reliability.md), the value of every row of the stream (None where it has none)."""
    total = sum(len(cols[0].values) for cols in stream)
    out: dict[tuple[tuple[str, ...], int], list[Any]] = {}
    row = 0
    for cols in stream:
        seen: dict[tuple[str, ...], int] = {}
        leaves: list[tuple[tuple[str, ...], str, list[Any]]] = []
        for c in cols:
            if c.kind == "struct":
                for field, kind in (("a", "f64"), ("b", "str")):
                    values = [None if v is None else v[field] for v in c.values]
                    leaves.append(((c.name, field), kind, values))
            else:
                leaves.append(((c.name,), c.kind, c.values))
        for path, kind, values in leaves:
            occ = seen.get(path, 0)
            seen[path] = occ + 1
            # A batch whose strings hold a NUL keeps that column's UTF-8 bytes (HDF5 strings end at NUL).
            as_bytes = kind in ("str", "lstr", "sview") and any(v is not None and "\0" in v for v in values)
            vals = out.setdefault((path, occ), [None] * total)
            for i, v in enumerate(values):
                vals[row + i] = list(v.encode()) if as_bytes and v is not None else _expected(kind, v)
        row += len(cols[0].values)
    return out


def _garbage(ring: RingBuffer, stream: str) -> None:
    info = ring._schema_table.stream(stream)
    with ring.reserve(40, stream=info.stream_id, schema_id=info.schema_id) as res:
        res.write(b"\x07" * 40)


def _write_and_check(
    ring_path: str, out: Path, streams: dict[str, list[list[Column]]], corrupt: set[int]
) -> int:
    """Writes `streams` into a fresh ring (a garbage record after the first batch of the
    streams numbered in `corrupt`), drains it with a writer process, checks every row of the
    file. Returns the rows checked."""
    Path(ring_path).unlink(missing_ok=True)
    with RingBuffer.create(ring_path, capacity_mb=32) as ring:
        bad: dict[str, int] = {}
        for k, (name, stream) in enumerate(streams.items()):
            for cols in stream:
                ring.write_arrow_batch(
                    pa.RecordBatch.from_arrays([c.array() for c in cols], names=[c.name for c in cols]), name
                )
                if k in corrupt and name not in bad:
                    _garbage(ring, name)  # a record of the stream that is no Arrow batch
                    bad[name] = 1
        w = writer_process(ring_path, out)
        w.send_signal(signal.SIGTERM)  # its final flush drains the ring
        _, err = w.communicate(timeout=300)
    Path(ring_path).unlink(missing_ok=True)
    assert w.returncode == 0, err
    checked = 0
    with h5py.File(out, "r") as f:
        progress = f["rust_daq/progress"][()].tolist()
        records = sum(len(s) for s in streams.values())
        reasons = f["rust_daq/quarantine/reason"][:].tolist()
        assert progress[1] == records and progress[2] == 0 and progress[4] == len(bad), (progress, reasons)
        assert sorted(f["rust_daq/quarantine/stream"][:].tolist()) == sorted(
            n.replace("\0", "\u2400").encode() for n in bad
        )
        for name, stream in streams.items():
            rows = sum(len(cols[0].values) for cols in stream)
            assert book(f, name)[:3] == [rows, len(stream), 0] and book(f, name)[4] == bad.get(name, 0)
            got = columns(stream_group(f, name))
            for key, want in _expect_stream(stream).items():
                assert key in got, (name, key, sorted(got))
                assert all(_same(a, b) for a, b in zip(got[key], want, strict=True)), (
                    name,
                    key,
                    got[key],
                    want,
                )
                checked += len(want)
    out.unlink()
    return checked


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same streams in every CI run; a failure reproduces
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    streams=st.dictionaries(NAME.filter(bool), batches(), min_size=1, max_size=STREAMS_PER_EXAMPLE),
    corrupt=st.sets(st.integers(0, STREAMS_PER_EXAMPLE), max_size=3),
)
def test_every_row_lands_once_or_is_quarantined(
    ring_path: str, tmp_path: Path, streams: dict[str, list[list[Column]]], corrupt: set[int]
) -> None:
    _write_and_check(ring_path, tmp_path / f"run-{next(_RUNS)}.h5", streams, corrupt)


def _random_value(rng: random.Random, kind: str) -> Any:
    if kind == "i64":
        return rng.randint(-(2**63), 2**63 - 1)
    if kind == "ts":
        return rng.randint(-(2**53), 2**53)
    if kind == "i8":
        return rng.randint(-128, 127)
    if kind == "u16":
        return rng.randint(0, 2**16 - 1)
    if kind == "f64":
        return rng.choice([rng.uniform(-1e300, 1e300), math.nan, math.inf, -0.0, 1.5])
    if kind == "f32":
        return float(np.float32(rng.uniform(-1e30, 1e30)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind in ("str", "lstr", "sview"):
        return "".join(rng.choice("xyé\0 \U0001f600") for _ in range(rng.randint(0, 6)))
    if kind == "bin":
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 6)))
    if kind == "fsl":
        return [rng.uniform(-1, 1) for _ in range(3)]
    if kind == "list":
        return [rng.randint(-(2**31), 2**31 - 1) for _ in range(rng.randint(0, 3))]
    if kind == "struct":
        return {"a": rng.choice([None, rng.uniform(-1, 1)]), "b": rng.choice([None, "", "ab", "é\0"])}
    return None


def _random_name(rng: random.Random) -> str:
    parts = list("ab/.%_ é\0\t") + ["__valid", "__2", "arrow_schema", "metadata"]
    return "".join(rng.choice(parts) for _ in range(rng.randint(0, 3)))


def _random_stream(rng: random.Random) -> list[list[Column]]:
    kinds = sorted(TYPES)
    schemas = [
        [(_random_name(rng), rng.choice(kinds)) for _ in range(rng.randint(1, 4))]
        for _ in range(rng.randint(1, 3))
    ]
    out = []
    for _ in range(rng.randint(1, 4)):
        rows = rng.randint(1, 5)
        cols = []
        for name, kind in rng.choice(schemas):
            nullable = kind == "null" or rng.random() < 0.5
            values = [
                None if nullable and rng.random() < 0.3 else _random_value(rng, kind) for _ in range(rows)
            ]
            cols.append(Column(name, kind, values))
        out.append(cols)
    return out


def test_fuzz_thousands_of_generated_streams(ring_path: str, tmp_path: Path) -> None:
    """The same property over RDAQ_FUZZ_STREAMS (2,000) seeded random streams, a few hundred
    per ring and writer process. Prints the figures for the record."""
    rng = random.Random(20261201)
    streams_done = rows = records = quarantined = 0
    while streams_done < FUZZ_STREAMS:
        streams: dict[str, list[list[Column]]] = {}
        while len(streams) < min(FUZZ_STREAMS_PER_RING, FUZZ_STREAMS - streams_done):
            name = _random_name(rng) or "%"
            streams.setdefault(f"{name}{len(streams)}" if name in streams else name, _random_stream(rng))
        corrupt = set(rng.sample(range(len(streams)), k=min(5, len(streams))))
        rows += _write_and_check(ring_path, tmp_path / f"fuzz-{streams_done}.h5", streams, corrupt)
        streams_done += len(streams)
        records += sum(len(s) for s in streams.values())
        quarantined += len(corrupt)
    print(
        f"fuzz: {streams_done} streams, {records} records, {rows} values checked, {quarantined} quarantined"
    )


def test_dictionary_columns_are_refused_at_write_naming_the_column(ring_path: str) -> None:
    from rust_daq import UnsupportedTypeError

    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        batch = pa.record_batch({"cat": pa.array(["a", "b", "a"]).dictionary_encode()})
        with pytest.raises(UnsupportedTypeError, match="'cat'"):
            ring.write_arrow_batch(batch, "s")
