"""The writer against what a hostile or careless user writes into a ring: names HDF5 cannot
hold, every Arrow type with nulls, schema changes mid-run, records that cannot be written.
Nothing may crash it, stall it, or make it skip rows it does not count (issue 15, item 1)."""

from __future__ import annotations

import datetime as dt
import decimal
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rust_daq import HDF5Writer, IncompatibleFileError, RingBuffer
from rust_daq.hdf5.layouts import AppendLayout

from h5stream import book, columns, stream_group
from processes import writer_process


@pytest.fixture
def h5_path(tmp_path: Path) -> str:
    return str(tmp_path / "run.h5")


def _x(n: int, start: int = 0) -> pa.RecordBatch:
    return pa.record_batch({"x": np.arange(start, start + n, dtype=np.int64)})


def _garbage(ring: RingBuffer, stream: str, data: bytes) -> None:
    """A record of an Arrow stream whose payload is not an Arrow batch."""
    info = ring._schema_table.stream(stream)
    with ring.reserve(len(data), stream=info.stream_id, schema_id=info.schema_id) as res:
        res.write(data)


ODD_STREAMS = [
    "metadata",
    "start_time",
    "end_time",
    "/",
    ".",
    "..",
    "x",
    "x/a",
    "",
    "a\0b",
    "%2F",
    "rust_daq",
]


@pytest.mark.parametrize("layout", ["append", "batches"])
def test_stream_names_hdf5_cannot_hold_are_mapped_and_kept(ring_path: str, h5_path: str, layout: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        for i, name in enumerate(ODD_STREAMS):
            ring.write_arrow_batch(pa.record_batch({"a": np.full(3, i, dtype=np.int64)}), name or "%")
        with HDF5Writer(h5_path, ring, layout=layout) as w:  # type: ignore[arg-type]
            assert w.flush_to_disk() == len(ODD_STREAMS)
            stats = w.stream_stats()
    names = [n or "%" for n in ODD_STREAMS]
    assert sorted(stats) == sorted(names)
    assert all(s == {"records": 1, "lost": 0, "rows": 3, "unwritable": 0} for s in stats.values())
    with h5py.File(h5_path, "r") as f:
        assert f["measurements/metadata/json"][()] == b"{}", "the run's own entries are untouched"
        for i, name in enumerate(names):
            assert book(f, name)[:5] == [3, 1, 0, 1, 0]
            if layout == "append":
                g = stream_group(f, name)
                assert g.name.count("/") == 2, f"{name!r} is one group directly under measurements"
                assert columns(g)[(("a",), 0)] == [i, i, i]
            else:
                groups = [g for g in f["measurements"].values() if _batch_stream(g) == name]
                assert len(groups) == 1 and groups[0]["a"][:].tolist() == [i, i, i]


def _batch_stream(g: h5py.Group) -> str | None:
    if "stream_utf8" in g.attrs:  # a name with a NUL, which HDF5 strings cannot hold
        return bytes(g.attrs["stream_utf8"]).decode()
    return g.attrs.get("stream")


def test_column_names_hdf5_cannot_hold_and_duplicates(ring_path: str, h5_path: str) -> None:
    names = ["/", ".", "", "a\0b", "arrow_schema", "dup", "dup", "x.y", "z"]
    batch = pa.RecordBatch.from_arrays([pa.array([i, i + 100]) for i in range(len(names))], names=names)
    struct = pa.record_batch(
        {"x": pa.array([{"y": 1.5}, {"y": 2.5}]), "x.y": pa.array([7, 8]), "z": pa.array([0, 0])}
    )
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(batch, "odd")
        ring.write_arrow_batch(struct, "clash")  # a struct field and a column that map alike
        with HDF5Writer(h5_path, ring) as w:
            w.flush_to_disk()
    with h5py.File(h5_path, "r") as f:
        cols = columns(stream_group(f, "odd"))
        assert (
            cols[(("/",), 0)] == [0, 100] and cols[((".",), 0)] == [1, 101] and cols[(("",), 0)] == [2, 102]
        )
        assert cols[(("a\0b",), 0)] == [3, 103] and cols[(("arrow_schema",), 0)] == [4, 104]
        assert cols[(("dup",), 0)] == [5, 105] and cols[(("dup",), 1)] == [6, 106]
        g = stream_group(f, "odd")
        assert pa.ipc.read_schema(pa.py_buffer(g["arrow_schema"][:].tobytes())).names == names
        clash = columns(stream_group(f, "clash"))
        assert clash[(("x", "y"), 0)] == [1.5, 2.5] and clash[(("x.y",), 0)] == [7, 8]


def test_a_column_named_time_keeps_its_name_and_the_time_axis_takes_the_next(
    ring_path: str, h5_path: str
) -> None:
    """The time axis (derived from the time column) is named after the stream's own columns:
    a column called "time" keeps "time" in every file, the axis gets "time__2"."""
    ts = pa.field("timestamp", pa.timestamp("ns"), metadata={"units": "ns", "epoch": "unix"})
    schema = pa.schema([ts, pa.field("time", pa.float64())])
    t0 = 1_700_000_000_000_000_000
    batch = pa.record_batch(
        [pa.array([t0, t0 + 10**9], pa.timestamp("ns")), pa.array([7.0, 8.0])], schema=schema
    )
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(batch, "clock")
        with HDF5Writer(h5_path, ring) as w:
            w.flush_to_disk()
            ring.write_arrow_batch(batch, "clock")
    with h5py.File(h5_path, "r") as f:
        g = stream_group(f, "clock")
        assert g["time"][:].tolist() == [7.0, 8.0, 7.0, 8.0]
        assert g["time"].attrs["rust_daq_key"] != "axis"
        axis = g["time__2"]
        assert axis.attrs["rust_daq_key"] == "axis" and axis.attrs["units"] == "s"
        assert np.diff(axis[:]).tolist()[:1] == [1.0]


def test_a_stream_named_like_another_streams_column(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(pa.record_batch({"a": [1.0, 2.0]}), "x")
        ring.write_arrow_batch(pa.record_batch({"b": [3, 4]}), "x/a")
        with HDF5Writer(h5_path, ring) as w:
            w.flush_to_disk()
            ring.write_arrow_batch(pa.record_batch({"a": [5.0]}), "x")
            ring.write_arrow_batch(pa.record_batch({"b": [6]}), "x/a")
            w.flush_to_disk()
    with h5py.File(h5_path, "r") as f:
        assert columns(stream_group(f, "x"))[(("a",), 0)] == [1.0, 2.0, 5.0]
        assert columns(stream_group(f, "x/a"))[(("b",), 0)] == [3, 4, 6]


def _every_type() -> pa.RecordBatch:
    cols = {
        "f64": pa.array([1.5, None, -0.0]),
        "f32": pa.array([1.5, None, 3.0], pa.float32()),
        "f16": pa.array(np.array([1, 2, 3], np.float16)).cast(pa.float16()),
        "i8": pa.array([-1, None, 3], pa.int8()),
        "u64": pa.array([2**64 - 1, None, 0], pa.uint64()),
        "bool": pa.array([True, None, False]),
        "str": pa.array(["a", None, "ünï"]),
        "large_str": pa.array(["a", None, "c"], pa.large_string()),
        "str_view": pa.array(["a", None, "c" * 40], pa.string_view()),
        "str_nul": pa.array(["a\0b", None, "c"]),
        "bin": pa.array([b"\x00\x01", None, b""]),
        "bin_view": pa.array([b"\x00\x01", None, b"x" * 30], pa.binary_view()),
        "fixed_bin": pa.array([b"ab", None, b"cd"], pa.binary(2)),
        "dec": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("-2.25")], pa.decimal128(6, 2)),
        "ts": pa.array([1, None, 3], pa.timestamp("s", tz="Europe/Berlin")),
        "ts_far": pa.array([10**17, None, 0], pa.timestamp("s")),  # past 2262: no ns
        "date32": pa.array([dt.date(2026, 12, 1), None, dt.date(1970, 1, 2)]),
        "date64": pa.array([86_400_000, None, 0], pa.date64()),
        "time64": pa.array([1, None, 3], pa.time64("us")),
        "dur": pa.array([5, None, 7], pa.duration("ms")),
        "fsl": pa.array([[1.0, 2.0], None, [7.0, 8.0]], pa.list_(pa.float64(), 2)),
        "fsl_int": pa.array([[1, 2], None, [7, 8]], pa.list_(pa.int32(), 2)),
        "fsl_null_elem": pa.array([[1, None], None, [7, 8]], pa.list_(pa.int32(), 2)),
        "list": pa.array([[1.0], None, []], pa.list_(pa.float64())),
        "large_list": pa.array([[1, 2], None, []], pa.large_list(pa.int64())),
        "list_str": pa.array([["a"], None, []], pa.list_(pa.string())),
        "struct": pa.array(
            [{"x": 1.0, "y": "a"}, None, {"x": None, "y": "c"}],
            pa.struct([("x", pa.float64()), ("y", pa.string())]),
        ),
        "map": pa.array([[("k", 1)], None, []], pa.map_(pa.string(), pa.int32())),
        "null": pa.nulls(3),
        "interval": pa.array([pa.MonthDayNano([1, 2, 3]), None, pa.MonthDayNano([0, 0, 0])]),
        "ree": pc.run_end_encode(pa.array([1, 1, None])),
        "union": pa.UnionArray.from_sparse(
            pa.array([0, 1, 0], pa.int8()), [pa.array([1, 2, 3]), pa.array(["a", "b", "c"])]
        ),
        "tensor": pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.arange(12, dtype=np.uint16).reshape(3, 2, 2)
        ),
    }
    return pa.record_batch(list(cols.values()), names=list(cols))


def test_every_arrow_type_with_nulls_is_written(ring_path: str, h5_path: str) -> None:
    batch = _every_type()
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(batch, "all")
        with HDF5Writer(h5_path, ring) as w:
            assert w.flush_to_disk() == 1
            assert w.stream_stats()["all"]["unwritable"] == 0 and w.records_unwritable == 0
    with h5py.File(h5_path, "r") as f:
        g = stream_group(f, "all")
        c = {(path[0] if len(path) == 1 else path): v for (path, _), v in columns(g).items()}
        assert c["f64"] == [1.5, None, -0.0] and c["f32"] == [1.5, None, 3.0] and c["f16"] == [1.0, 2.0, 3.0]
        assert np.isnan(g["f64"][1]), "a null float is NaN as well"
        assert (
            c["i8"] == [-1, None, 3] and c["u64"] == [2**64 - 1, None, 0] and c["bool"] == [True, None, False]
        )
        assert c["str"] == ["a", None, "ünï"] and c["large_str"] == ["a", None, "c"]
        assert c["str_view"] == ["a", None, "c" * 40], "polars' string_view is written, not skipped"
        assert [bytes(v).decode() if v is not None else None for v in c["str_nul"]] == ["a\0b", None, "c"]
        assert c["bin"] == [[0, 1], None, []] and c["bin_view"] == [[0, 1], None, [120] * 30]
        assert c["fixed_bin"] == [[97, 98], None, [99, 100]]
        assert c["dec"] == ["1.50", None, "-2.25"]
        assert (
            c["ts"] == [1_000_000_000, None, 3_000_000_000] and g["ts"].attrs["timezone"] == "Europe/Berlin"
        )
        assert c["ts_far"] == [10**17, None, 0]
        units = {g[n].attrs["units"] for n in g if g[n].attrs.get("arrow_name") == "ts_far"}
        assert "s" in units, "past 2262 the source unit is kept (and said)"
        assert c["date32"] == [20788, None, 1] and c["date64"] == [86_400_000, None, 0]
        assert c["time64"] == [1000, None, 3000] and c["dur"] == [5_000_000, None, 7_000_000]
        assert c["fsl"] == [[1.0, 2.0], None, [7.0, 8.0]] and c["fsl_int"] == [[1, 2], None, [7, 8]]
        assert c["fsl_null_elem"] == [[1, None], None, [7, 8]], "null elements stay null (JSON)"
        assert c["list"] == [[1.0], None, []] and c["large_list"] == [[1, 2], None, []]
        assert c["list_str"] == [["a"], None, []] and c["map"] == [[["k", 1]], None, []]
        assert c[("struct", "x")] == [1.0, None, None] and c[("struct", "y")] == ["a", None, "c"]
        assert c["null"] == [None, None, None] and c["interval"] == [[1, 2, 3], None, [0, 0, 0]]
        assert c["ree"] == [1, 1, None] and c["union"] == [1, "b", 3]
        assert c["tensor"] == np.arange(12).reshape(3, 2, 2).tolist() and g["tensor"].dtype == np.uint16


def test_nullable_fixed_size_list_in_a_writer_process(ring_path: str, h5_path: str) -> None:
    """It crashed the writer process on every restart: one batch blocked recording for good."""
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(
            pa.record_batch({"v": pa.array([[1.0, 2.0], None, [7.0, 8.0]], pa.list_(pa.float64(), 2))}), "s"
        )
        ring.write_arrow_batch(pa.record_batch({"v": pa.array([[9.0, 9.5]], pa.list_(pa.float64(), 2))}), "s")
        w = writer_process(ring_path, h5_path, flush_interval=0.1)
        _wait_rows(h5_path, "s", 4)
        w.send_signal(signal.SIGTERM)
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, err
    with h5py.File(h5_path, "r") as f:
        g = stream_group(f, "s")
        np.testing.assert_array_equal(g["v"][:], [[1, 2], [np.nan, np.nan], [7, 8], [9, 9.5]])
        assert g["v__valid"][:].tolist() == [1, 0, 1, 1]


def _wait_rows(h5_path: str, stream: str, rows: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with h5py.File(h5_path, "r", libver="latest", swmr=True) as f:
                if book(f, stream)[0] >= rows:
                    return
        except (OSError, KeyError, AssertionError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{stream}: fewer than {rows} rows in {h5_path} after {timeout} s")


@pytest.mark.parametrize("layout", ["append", "batches"])
def test_type_changes_mid_run_become_generations(ring_path: str, h5_path: str, layout: str) -> None:
    steps = [
        {"v": pa.array(["a", "b"]), "t": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((2, 2, 2)))},
        {"v": pa.array([1.5, 2.5]), "t": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((2, 3, 2)))},
        {"v": pa.array([7, 8]), "t": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((2, 2, 2)))},
        {"v": pa.array(["c", "d"]), "t": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((2, 3, 2)))},
    ]
    with RingBuffer.create(ring_path, capacity_mb=8) as ring, HDF5Writer(h5_path, ring, layout=layout) as w:  # type: ignore[arg-type]
        for step in steps:
            ring.write_arrow_batch(pa.record_batch(step), "dmm")
            w.flush_to_disk()  # one schema change per flush...
        for step in steps:
            ring.write_arrow_batch(pa.record_batch(step), "dmm")
        w.flush_to_disk()  # ...and four in one
        assert w.stream_stats()["dmm"] == {"records": 8, "lost": 0, "rows": 16, "unwritable": 0}
    with h5py.File(h5_path, "r") as f:
        if layout == "batches":
            got = [g["v"][:].tolist() for _, g in sorted(f["measurements"].items()) if _.startswith("batch_")]
            assert got == [[b"a", b"b"], [1.5, 2.5], [7, 8], [b"c", b"d"]] * 2
            return
        g = stream_group(f, "dmm")
        v = columns(g)[(("v",), 0)]
        assert v == ["a", "b", 1.5, 2.5, 7, 8, "c", "d"] * 2
        assert sorted(ds for ds in g if ds.startswith("v") and "valid" not in ds) == ["v", "v__2", "v__3"]
        assert [g[n].attrs.get("generation", 1) for n in ("v", "v__2", "v__3")] == [1, 2, 3]
        assert g["v__2"].dtype == np.float64 and np.isnan(g["v__2"][0])
        t = columns(g)[(("t",), 0)]
        assert [np.shape(x) for x in t] == [
            (2, 2),
            (2, 2),
            (3, 2),
            (3, 2),
            (2, 2),
            (2, 2),
            (3, 2),
            (3, 2),
        ] * 2


def test_int_then_str_in_a_writer_process_then_sigterm_exits_0(ring_path: str, h5_path: str) -> None:
    """It retried forever on HDF5's OSError, and SIGTERM then exited 1."""
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        w = writer_process(ring_path, h5_path, flush_interval=0.05)
        ring.write_arrow_batch(pa.record_batch({"v": [1, 2]}), "s")
        _wait_rows(h5_path, "s", 2)
        ring.write_arrow_batch(pa.record_batch({"v": ["x", "y"]}), "s")
        ring.write_arrow_batch(pa.record_batch({"v": [3]}), "s")
        _wait_rows(h5_path, "s", 5)
        w.send_signal(signal.SIGTERM)
        _, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    assert "flush failed" not in err
    with h5py.File(h5_path, "r") as f:
        assert columns(stream_group(f, "s"))[(("v",), 0)] == [1, 2, "x", "y", 3]


def _run_writer_until(ring_path: str, h5_path: str, stream: str, rows: int, kill_after: float | None) -> None:
    w = writer_process(ring_path, h5_path, flush_interval=0.02)
    if kill_after is not None:
        time.sleep(kill_after)
        w.kill()
        w.communicate(timeout=60)
        return
    _wait_rows(h5_path, stream, rows)
    w.send_signal(signal.SIGTERM)
    _, err = w.communicate(timeout=60)
    assert w.returncode == 0, err


def test_one_bad_record_is_quarantined_and_nothing_else_is_lost_across_restarts(
    ring_path: str, h5_path: str
) -> None:
    """100 good + 1 bad + 100 good batches, the writer process SIGKILLed three times: the
    file held 1,370 of 2,000 rows while its progress said nothing was lost."""
    garbage = b"\x10\x00\x00\x00this is not an Arrow record batch message" * 3
    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        for i in range(100):
            ring.write_arrow_batch(_x(10, 10 * i), "s")
        _garbage(ring, "s", garbage)
        for i in range(100, 200):
            ring.write_arrow_batch(_x(10, 10 * i), "s")
        for kill_after in (0.3, 0.6, 0.9):
            _run_writer_until(ring_path, h5_path, "s", 0, kill_after)
        _run_writer_until(ring_path, h5_path, "s", 2000, None)
    with h5py.File(h5_path, "r") as f:
        np.testing.assert_array_equal(stream_group(f, "s")["x"][:], np.arange(2000))
        assert book(f, "s") == [2000, 200, 0, 201, 1]
        progress = f["rust_daq/progress"][()].tolist()
        assert progress[1:3] == [200, 0] and progress[4] == 1
        q = f["rust_daq/quarantine"]
        assert q["seq"][:].tolist() == [100] and q["stream"][0] == b"s"
        assert q["payload"][0].tobytes() == garbage, "the record's bytes are kept"
        assert pa.ipc.read_schema(pa.py_buffer(q["schema"][0].tobytes())).names == ["x"]
        assert b"does not decode" in q["reason"][0]


@pytest.mark.parametrize("layout", ["append", "batches"])
def test_a_record_hdf5_refuses_is_found_and_quarantined(
    ring_path: str, h5_path: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails for a reason of its own (not the disk's): the writer finds which
    record it was, quarantines it, and writes every other record once; later flushes go on."""
    bad_value = 1234

    def refuse(items: list) -> None:  # type: ignore[type-arg]
        for it in items:
            if bad_value in it.pieces[0].data.tolist():
                raise ValueError("HDF5 refuses this one")

    original_append = AppendLayout.write

    def append(self, f, structural, book_, items):  # type: ignore[no-untyped-def]
        refuse(items)
        return original_append(self, f, structural, book_, items)

    from rust_daq.hdf5.batches import BatchesLayout

    original_batches = BatchesLayout.write

    def batches(self, f, next_index, book_, items):  # type: ignore[no-untyped-def]
        refuse(items)
        return original_batches(self, f, next_index, book_, items)

    monkeypatch.setattr(AppendLayout, "write", append)
    monkeypatch.setattr(BatchesLayout, "write", batches)
    with RingBuffer.create(ring_path, capacity_mb=8) as ring, HDF5Writer(h5_path, ring, layout=layout) as w:  # type: ignore[arg-type]
        for i in range(20):
            ring.write_arrow_batch(pa.record_batch({"x": [bad_value if i == 7 else i]}), "s")
        ring.write_arrow_batch(pa.record_batch({"y": [0.5]}), "other")
        assert w.flush_to_disk() == 20
        for i in range(20, 25):
            ring.write_arrow_batch(pa.record_batch({"x": [i]}), "s")
        assert w.flush_to_disk() == 5
        assert w.stream_stats()["s"] == {"records": 24, "lost": 0, "rows": 24, "unwritable": 1}
    with h5py.File(h5_path, "r") as f:
        if layout == "append":
            assert stream_group(f, "s")["x"][:].tolist() == [i for i in range(25) if i != 7]
            assert stream_group(f, "other")["y"][:].tolist() == [0.5]
        else:
            xs = [
                v
                for k, g in sorted(f["measurements"].items())
                if k.startswith("batch_") and "x" in g
                for v in g["x"][:]
            ]
            assert xs == [i for i in range(25) if i != 7]
        assert f["rust_daq/quarantine/seq"][:].tolist() == [7]
        assert b"HDF5 refuses this one" in f["rust_daq/quarantine/reason"][0]
        assert book(f, "s")[4] == 1


def test_columns_that_appear_and_disappear_are_marked_absent(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring, HDF5Writer(h5_path, ring) as w:
        ring.write_arrow_batch(pa.record_batch({"a": [1, 2]}), "s")
        w.flush_to_disk()
        ring.write_arrow_batch(pa.record_batch({"b": ["x"]}), "s")
        ring.write_arrow_batch(pa.record_batch({"a": [3], "b": ["y"]}), "s")
        w.flush_to_disk()
    with h5py.File(h5_path, "r") as f:
        g = stream_group(f, "s")
        cols = columns(g)
        assert cols[(("a",), 0)] == [1, 2, None, 3] and cols[(("b",), 0)] == [None, None, "x", "y"]
        assert g["a__valid"][:].tolist() == [1, 1, 0, 1], "an int column's absent row is not a 0 of data"


def test_plain_records_are_counted_as_skipped(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring, HDF5Writer(h5_path, ring) as w:
        ring.write_arrow_batch(_x(3), "s")
        ring.write(b"plain")
        ring.write_arrow_batch(_x(3, 3), "s")
        assert w.flush_to_disk() == 2
        assert (w.records_skipped, w.records_unwritable) == (1, 0)
    with h5py.File(h5_path, "r") as f:
        assert stream_group(f, "s")["x"][:].tolist() == list(range(6))
        assert f["rust_daq/progress"][()].tolist() == [2, 2, 0, 1, 0, 1, 1]


# -- files that are not ours (issue 15, item 4) ------------------------------------------------------

_HOLD = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "w", libver="latest")
f.create_dataset("theirs", data=[1, 2, 3])
if sys.argv[2] == "swmr":
    f.swmr_mode = True
f.flush()
print("open", flush=True)
if sys.argv[2] == "killed":
    import os
    os._exit(0)  # the consistency flags stay set, as after a crash
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["open", "swmr", "killed"])
def test_another_programs_hdf5_file_is_refused_untouched(ring_path: str, tmp_path: Path, how: str) -> None:
    path = tmp_path / "theirs.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), how], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        if how == "killed":
            holder.wait(timeout=30)
        before = path.read_bytes()
        assert before[11] != 0, "HDF5 marks the file open for write"
        with RingBuffer.create(ring_path, capacity_mb=1) as ring:
            expected = BlockingIOError if how == "open" else IncompatibleFileError
            with pytest.raises(expected):
                HDF5Writer(str(path), ring)
        assert path.read_bytes() == before, "not one byte of their file changed"
    finally:
        holder.kill()
        holder.communicate()


def test_a_second_writer_process_on_a_running_writers_file_changes_nothing(
    ring_path: str, h5_path: str
) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        ring.write_arrow_batch(_x(5), "s")
        first = writer_process(ring_path, h5_path)
        try:
            _wait_rows(h5_path, "s", 5)
            head = Path(h5_path).read_bytes()[:48]
            assert head[11] != 0, "the running writer's SWMR flags"
            second = subprocess.run(
                [sys.executable, "-m", "rust_daq.writer", "--ring", ring_path, "--output", h5_path],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == 2 and "open for writing by another process" in second.stderr
            assert Path(h5_path).read_bytes()[:48] == head, "the superblock was not rewritten"
        finally:
            first.send_signal(signal.SIGTERM)
            first.communicate(timeout=60)
        assert first.returncode == 0
    with h5py.File(h5_path, "r") as f:
        assert stream_group(f, "s")["x"][:].tolist() == list(range(5))


# -- a nearly full disk (issue 15, item 4) ------------------------------------------------------------

_LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
from rust_daq import HDF5Writer, RingBuffer
ring = RingBuffer.open(sys.argv[1])
w = HDF5Writer(sys.argv[2], ring, streams=["v"])
print("first", w.flush_to_disk(), flush=True)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(sys.argv[2]) + int(sys.argv[3]), hard))
sys.stdin.readline()
tail = ring.read_tail
for _ in range(6):
    try:
        print("limited", w.flush_to_disk(), ring.read_tail == tail, flush=True)
    except OSError as e:
        print("full", e.errno, ring.read_tail == tail, flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
print("resumed", w.flush_to_disk(), flush=True)
w.close()
"""


def test_a_nearly_full_disk_takes_the_whole_records_that_fit(ring_path: str, h5_path: str) -> None:
    """4.18 MB free and 0.64 MB to write used to be refused whole; now the writer writes the
    whole records that fit, in ring order, keeps the rest in the ring, and writes it once
    space returns: every row once, none twice."""
    with RingBuffer.create(ring_path, capacity_mb=32) as ring:
        ring.write_arrow_batch(_x(1000), "v")
        p = subprocess.Popen(
            [sys.executable, "-c", _LIMITED, ring_path, h5_path, str(1 << 20)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().split() == ["first", "1"]
        for i in range(1, 200):  # 8 kB a record, 1.6 MB in all: past the 1 MiB left
            ring.write_arrow_batch(_x(1000, 1000 * i), "v")
        p.stdin.write("\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    lines = [line.split() for line in out.splitlines()]
    limited = [int(w[1]) for w in lines if w[0] == "limited"]
    assert all(w[-1] == "True" for w in lines if w[0] in ("limited", "full")), "read_tail never moved"
    assert sum(limited) > 0, f"something fit and was written: {out}"
    assert sum(limited) < 199, "not everything fit"
    assert lines[-1][0] == "resumed" and sum(limited) + int(lines[-1][1]) == 199, out
    with h5py.File(h5_path, "r") as f:
        np.testing.assert_array_equal(stream_group(f, "v")["x"][:], np.arange(200_000))
        assert book(f, "v")[:3] == [200_000, 200, 0]


def test_sigterm_on_a_full_disk_exits_0_and_says_what_stays_in_the_ring(ring_path: str, h5_path: str) -> None:
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    with RingBuffer.create(ring_path, capacity_mb=32) as ring:
        for i in range(400):  # 3.2 MB: more than the 3 MiB the writer may write
            ring.write_arrow_batch(_x(1000, 1000 * i), "v")
        w = writer_process(ring_path, h5_path, flush_interval=0.05, preexec_fn=limit)
        _wait_rows(h5_path, "v", 1000)
        time.sleep(1.0)  # a few passes against the limit
        w.send_signal(signal.SIGTERM)
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, err
        assert "Traceback" not in err
    with h5py.File(h5_path, "r") as f:
        rows = book(f, "v")[0]
        assert 0 < rows < 400_000 and rows % 1000 == 0
        np.testing.assert_array_equal(stream_group(f, "v")["x"][:], np.arange(rows))
    assert f"{400 - rows // 1000} record(s) are not in" in err, "what stays in the ring is said exactly"


# -- a live file that grows, whatever appears (issue 15, item 3) -----------------------------------

_FOLLOW = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "r", libver="latest", swmr=True)
ds = f["measurements/v/x"]
print("open", flush=True)
for line in sys.stdin:  # one line per question: how many rows now?
    ds.refresh()
    print(ds.shape[0], flush=True)
"""


def test_a_new_stream_mid_run_does_not_stall_the_others_while_a_reader_follows(
    ring_path: str, h5_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It stalled every stream: 'flush failed, will retry: ... is open for writing by another
    process' each second, and nothing reached the file until every SWMR reader closed."""
    with (
        RingBuffer.create(ring_path, capacity_mb=8) as ring,
        HDF5Writer(h5_path, ring, flush_interval=0.05) as w,
    ):
        ring.write_arrow_batch(_x(10), "v")
        w.flush_to_disk()
        reader = subprocess.Popen(
            [sys.executable, "-c", _FOLLOW, h5_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert reader.stdin is not None and reader.stdout is not None
        try:
            assert reader.stdout.readline().strip() == "open"

            def rows_seen() -> int:
                assert reader.stdin is not None and reader.stdout is not None
                reader.stdin.write("?\n")
                reader.stdin.flush()
                return int(reader.stdout.readline())

            assert rows_seen() == 10
            for i in range(1, 4):
                ring.write_arrow_batch(pa.record_batch({"y": [float(i)]}), f"late{i}")  # a new stream...
                ring.write_arrow_batch(pa.record_batch({"x": [0], "z": ["new column"]}), "v")  # ...and column
                ring.write_arrow_batch(_x(10, 10 * i), "v")
                assert w.flush_to_disk() == 3
                assert rows_seen() == 10 + 11 * i, "the reader follows the old stream as it grows"
        finally:
            reader.stdin.close()
            reader.wait(timeout=30)
            reader.stdout.close()
    assert "flush failed" not in caplog.text
    with h5py.File(h5_path, "r") as f:
        for i in range(1, 4):
            assert stream_group(f, f"late{i}")["y"][:].tolist() == [float(i)]
        cols = columns(stream_group(f, "v"))
        assert cols[(("z",), 0)] == [None] * 10 + (["new column"] + [None] * 10) * 3


# -- found by review: each failed before its fix ---------------------------------------------------


def test_zero_width_fixed_size_types_are_written(ring_path: str, h5_path: str) -> None:
    """fixed_size_list[0] and binary(0) failed every write ('All chunk dimensions must be
    positive'): every record quarantined, one abandoned pass each."""
    with RingBuffer.create(ring_path, capacity_mb=8) as ring, HDF5Writer(h5_path, ring) as w:
        for i in range(50):
            ring.write_arrow_batch(
                pa.record_batch(
                    {
                        "l": pa.array([[]], pa.list_(pa.int64(), 0)),
                        "b": pa.array([b""], pa.binary(0)),
                        "i": [i],
                    }
                ),
                "z",
            )
        assert w.flush_to_disk() == 50 and w.records_unwritable == 0
    with h5py.File(h5_path, "r") as f:
        g = stream_group(f, "z")
        assert g["i"][:].tolist() == list(range(50)) and g["l"].shape == (50, 0) and g["b"].shape == (50, 0)


def test_a_schema_arrow_cannot_read_back_is_refused_before_it_enters_the_ring(ring_path: str) -> None:
    """A 400-deep struct used to be registered before pyarrow failed: the schema table then
    held an entry nobody could decode, and streams() raised RingCorruptError from then on."""
    from rust_daq import UnsupportedTypeError

    deep = pa.array([1, 2], pa.int32())
    for _ in range(400):
        deep = pa.StructArray.from_arrays([deep], names=["f"])
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        with pytest.raises(UnsupportedTypeError, match="'s'"):
            ring.write_arrow_batch(pa.record_batch({"s": deep}), "s")
        ring.write_arrow_batch(_x(3), "ok")
        assert list(ring.streams()) == ["ok"]


_KILL_IN_CREATE = """
import os, sys
import numpy as np, pyarrow as pa
from rust_daq import HDF5Writer, RingBuffer
ring = RingBuffer.open(sys.argv[1])
w = HDF5Writer(sys.argv[2], ring)
w.flush_to_disk()  # stream a
print("flushed", flush=True)
sys.stdin.readline()  # stream b is in the ring now: new in the next pass
from rust_daq.hdf5 import progress
original = progress.create_resume
def die(resume, b, marker, *, committed):
    if b.name == "b":  # stream b is new in this pass: its view is made, its slots are not
        resume.file.flush()
        os._exit(9)
    original(resume, b, marker, committed=committed)
progress.create_resume = die
w.flush_to_disk()
"""


def test_a_writer_killed_while_making_a_new_streams_books_writes_its_rows_once(
    ring_path: str, h5_path: str
) -> None:
    """The new stream's readable book held the pass's uncommitted rows; a writer killed before
    its resume slots existed left a restart trusting them: every row of it twice."""
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(_x(3), "a")
        child = subprocess.Popen(
            [sys.executable, "-c", _KILL_IN_CREATE, ring_path, h5_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "flushed"
        ring.write_arrow_batch(pa.record_batch({"y": np.arange(5)}), "b")
        child.communicate("go\n", timeout=60)
        assert child.returncode == 9, "killed while making stream b's books"
        with HDF5Writer(h5_path, ring) as w:
            w.flush_to_disk()
    with h5py.File(h5_path, "r") as f:
        assert stream_group(f, "b")["y"][:].tolist() == list(range(5))
        assert book(f, "b")[:2] == [5, 1]
