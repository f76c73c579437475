"""The writer's shortcut for the columns its schema decides (hdf5/columns.py ``plan_of``): for
every Arrow type, with nulls and without, sliced or not, a planned batch gives exactly the
pieces the general path gives (values, dtype, validity, signature, attributes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from rust_daq.hdf5.columns import pieces_of, plan_of

MD = {"units": "mV", "source": "PV:1", "precision": "3"}
TYPES = [
    pa.int8(),
    pa.int16(),
    pa.int32(),
    pa.int64(),
    pa.uint8(),
    pa.uint16(),
    pa.uint32(),
    pa.uint64(),
    pa.float16(),
    pa.float32(),
    pa.float64(),
    pa.bool_(),
    pa.timestamp("ns"),
    pa.timestamp("ns", tz="Europe/Berlin"),
    pa.timestamp("us"),  # (not planned: cast to ns by the general path)
    pa.timestamp("s", tz="UTC"),
    pa.duration("ns"),
    pa.duration("ms"),
    pa.time64("ns"),
    pa.time64("us"),
    pa.time32("ms"),
    pa.date32(),
    pa.string(),
    pa.list_(pa.float64()),
    pa.struct([("x", pa.int32()), ("y", pa.float64())]),
    pa.dictionary(pa.int8(), pa.string()),
]


def _column(t: pa.DataType, n: int, nulls: bool) -> pa.Array:
    rng = np.random.default_rng(7)
    mask = rng.random(n) < 0.3 if nulls else None
    if pa.types.is_floating(t):
        vals = rng.normal(size=n).astype(t.to_pandas_dtype())
        return pa.array(vals, type=t, mask=mask)
    if pa.types.is_boolean(t):
        return pa.array(rng.random(n) < 0.5, mask=mask)
    if pa.types.is_integer(t):
        info = np.iinfo(t.to_pandas_dtype())
        return pa.array(rng.integers(info.min, info.max, n, dtype=t.to_pandas_dtype()), type=t, mask=mask)
    if pa.types.is_string(t):
        return pa.array([f"v{i}" for i in range(n)], mask=mask)
    if pa.types.is_list(t):
        return pa.array([[float(i)] * (i % 3) for i in range(n)], type=t, mask=mask)
    if pa.types.is_struct(t):
        return pa.StructArray.from_arrays(
            [pa.array(np.arange(n, dtype=np.int32)), pa.array(np.arange(n) / 2)],
            fields=list(t),
            mask=None if mask is None else pa.array(mask),
        )
    if pa.types.is_dictionary(t):
        return pa.array([f"s{i % 4}" for i in range(n)], mask=mask).dictionary_encode().cast(t)
    if pa.types.is_time32(t):
        return pa.array(rng.integers(0, 86_400_000, n).astype(np.int32), type=t, mask=mask)
    if pa.types.is_time64(t):
        per_day = 86_400 * (10**9 if t.unit == "ns" else 10**6)
        return pa.array(rng.integers(0, per_day, n), type=t, mask=mask)
    if pa.types.is_date32(t):
        return pa.array(rng.integers(0, 30_000, n).astype(np.int32), type=t, mask=mask)
    return pa.array(rng.integers(-(10**12), 10**12, n), type=t, mask=mask)  # timestamps, durations


def _same(a: list, b: list) -> None:  # type: ignore[type-arg]
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        assert (p.path, p.signature, p.attrs) == (q.path, q.signature, q.attrs)
        assert p.data.dtype == q.data.dtype and p.data.shape == q.data.shape
        assert p.data.flags.c_contiguous
        if p.data.dtype.kind in "fiub":
            np.testing.assert_array_equal(p.data, q.data)
        else:
            assert [repr(x) for x in p.data] == [repr(x) for x in q.data]
        assert (p.valid is None) == (q.valid is None)
        if p.valid is not None:
            np.testing.assert_array_equal(p.valid, q.valid)


@pytest.mark.parametrize("t", TYPES, ids=str)
@pytest.mark.parametrize("nulls", [False, True], ids=["no nulls", "nulls"])
def test_a_planned_batch_gives_the_pieces_the_general_path_gives(t: pa.DataType, nulls: bool) -> None:
    schema = pa.schema(
        [
            pa.field("t", pa.timestamp("ns"), metadata={"units": "ns", "epoch": "unix"}),
            pa.field("col", t, metadata=MD),
        ]
    )
    n = 64
    batch = pa.record_batch([_column(pa.timestamp("ns"), n, False), _column(t, n, nulls)], schema=schema)
    plan = plan_of(schema)
    assert plan[0] is not None, "a nanosecond timestamp is planned"
    for b in (batch, batch.slice(5, 40), batch.slice(63, 1), batch.slice(0, 0)):
        general = pieces_of(b)
        _same(pieces_of(b, plan), general)
    # The plan is the schema's, not the batch's: a second batch of it gives its own values.
    other = pa.record_batch([_column(pa.timestamp("ns"), 3, False), _column(t, 3, nulls)], schema=schema)
    _same(pieces_of(other, plan), pieces_of(other))


def test_only_the_types_whose_values_are_the_piece_are_planned() -> None:
    planned = {str(t) for t in TYPES if plan_of(pa.schema([pa.field("c", t)]))[0] is not None}
    assert planned == {
        *("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"),
        *("halffloat", "float", "double", "bool"),
        *("timestamp[ns]", "timestamp[ns, tz=Europe/Berlin]", "duration[ns]", "time64[ns]"),
    }


def test_a_planned_piece_owns_its_attributes() -> None:
    schema = pa.schema([pa.field("v", pa.float64(), metadata=MD)])
    plan = plan_of(schema)
    b = pa.record_batch([pa.array([1.0, 2.0])], schema=schema)
    first, second = pieces_of(b, plan)[0], pieces_of(b, plan)[0]
    first.attrs["units"] = "changed"
    assert second.attrs["units"] == "mV" and pieces_of(b, plan)[0].attrs["units"] == "mV"


def test_the_writer_plans_each_schema_once_and_writes_the_same_values(
    ring_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import h5py

    import rust_daq.hdf5.writer as writer_module
    from rust_daq import HDF5Writer, RingBuffer

    planned: list[pa.Schema] = []

    def counting(schema: pa.Schema) -> Any:
        planned.append(schema)
        return plan_of(schema)

    monkeypatch.setattr(writer_module, "plan_of", counting)
    schema = pa.schema([pa.field("t", pa.timestamp("ns")), pa.field("v", pa.float64(), metadata=MD)])
    out = tmp_path / "planned.h5"
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        w = HDF5Writer(str(out), ring, swmr=False)
        for k in range(40):
            for name in ("a", "b"):
                t = pa.array(np.arange(k * 5, k * 5 + 5), pa.timestamp("ns"))
                v = pa.array(
                    np.arange(k * 5, k * 5 + 5) / 4, mask=np.arange(5) == k % 5 if k % 3 == 0 else None
                )
                ring.write_arrow_batch(pa.record_batch([t, v], schema=schema), name)
            if k % 10 == 9:
                w.flush_to_disk()
        w.close()
    # One plan per schema-table entry (a stream's schema), not one per record.
    assert len(planned) == 2 and all(s.equals(schema) for s in planned)
    with h5py.File(out) as f:
        for name in ("a", "b"):
            g = f[f"measurements/{name}"]
            v, valid = g["v"][()], g["v__valid"][()]
            assert v.shape == (200,) and g["t"].shape == (200,)
            assert g["v"].attrs["units"] == "mV"
            expect_valid = np.array([not (k % 3 == 0 and i == k % 5) for k in range(40) for i in range(5)])
            np.testing.assert_array_equal(valid.astype(bool), expect_valid)
            np.testing.assert_array_equal(v[expect_valid], (np.arange(200) / 4)[expect_valid])
            assert np.isnan(v[~expect_valid]).all()
