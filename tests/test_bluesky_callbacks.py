"""rust_daq.bluesky: a real RunEngine's documents (ophyd-async sim devices, bluesky plans)
into a ring through RingCallback, and one HDF5 file per run through RunFileWriter, read back
against the documents a second subscriber collected (validated by event-model's schemas)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import event_model
import h5py
import numpy as np
import pyarrow as pa
import pytest
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted
from ophyd_async.core import Array1D, StandardReadable, Table, init_devices, soft_signal_rw
from ophyd_async.sim import SimMotor

from rust_daq import (
    DocumentError,
    HDF5Writer,
    ReadOnlyRingError,
    RingBuffer,
    RingConfigError,
    WriterProcessError,
)
from rust_daq.bluesky import RingCallback, RunFileWriter, seconds_to_ns
from rust_daq.hdf5.file import hdf5_name

Docs = list[tuple[str, dict[str, Any]]]


# -- devices -----------------------------------------------------------------------------------


class Pair(Table):
    index: Array1D[np.int32]
    weight: Array1D[np.float64]


class Det(StandardReadable):
    """A soft detector with one signal of each kind."""

    def __init__(self, name: str = "") -> None:
        with self.add_children_as_readables():
            self.volts = soft_signal_rw(float, 1.5, units="V", precision=3)
            self.count = soft_signal_rw(int, 7)
            self.ok = soft_signal_rw(bool, True)
            self.label = soft_signal_rw(str, "ünïcödé")
            self.trace = soft_signal_rw(Array1D[np.float64], np.arange(4.0) / 3)
            self.bytes_ = soft_signal_rw(Array1D[np.uint8], np.array([0, 128, 255], np.uint8))
        super().__init__(name=name)


class Camera:
    """A bluesky Readable (the protocol, no library) with a 2-D frame that changes per read;
    `keys` and `value` let a test describe what it likes."""

    def __init__(
        self,
        name: str,
        keys: dict[str, dict[str, Any]] | None = None,
        value: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        self.name, self.parent, self.reads = name, None, 0
        self._keys = keys or {
            f"{name}_image": {
                "source": "sim://camera",
                "dtype": "array",
                "shape": [2, 3],
                "dtype_numpy": "<u2",
            }
        }
        self._value = value or (
            lambda i: {f"{name}_image": (np.arange(6, dtype=np.uint16).reshape(2, 3) + 10 * i)}
        )

    def describe(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._keys.items()}

    def read(self) -> dict[str, dict[str, Any]]:
        self.reads += 1
        return {k: {"value": v, "timestamp": time.time()} for k, v in self._value(self.reads).items()}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def RE() -> RunEngine:
    return RunEngine({})


@pytest.fixture(scope="module")
def devices(RE: RunEngine) -> tuple[SimMotor, Det]:
    with init_devices():
        motor = SimMotor()
        det = Det()
    return motor, det


@pytest.fixture
def ring(ring_path: str) -> Iterator[RingBuffer]:
    with RingBuffer.create(ring_path, capacity_mb=16) as r:
        yield r


@pytest.fixture
def docs(RE: RunEngine) -> Iterator[Docs]:
    """Every document of the test's runs, each validated by event-model's schema."""
    out: Docs = []

    def keep(name: str, doc: dict[str, Any]) -> None:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
        out.append((name, doc))

    token = RE.subscribe(keep)
    yield out
    RE.unsubscribe(token)


@pytest.fixture
def subscribe(RE: RunEngine) -> Iterator[Callable[[Any], None]]:
    tokens: list[int] = []
    yield lambda cb: tokens.append(RE.subscribe(cb))
    for t in tokens:
        RE.unsubscribe(t)


def of(docs: Docs, name: str, run: str | None = None) -> list[dict[str, Any]]:
    """The documents called `name`, of the run `run` (all runs: None)."""
    descriptors = {d["uid"]: d["run_start"] for n, d in docs if n == "descriptor"}
    out = []
    for n, d in docs:
        if n != name:
            continue
        owner = d.get("run_start", descriptors.get(d.get("descriptor", ""), d.get("uid")))
        if run is None or owner == run:
            out.append(d)
    return out


def ring_table(ring: RingBuffer, stream: str) -> pa.Table:
    return ring.reader("oldest").read_table(stream)


def check_rows(table: pa.Table, events: list[dict[str, Any]], keys: list[str]) -> None:
    """The ring's rows are the events: time, seq_num, every value and timestamp."""
    assert table.num_rows == len(events)
    assert table.column("seq_num").to_pylist() == [e["seq_num"] for e in events]
    ns = table.column("time").cast(pa.int64()).to_numpy()
    np.testing.assert_array_equal(ns, seconds_to_ns([e["time"] for e in events]))
    assert np.abs(ns / 1e9 - np.array([e["time"] for e in events])).max() < 1e-6
    stamps = table.column("timestamps").combine_chunks()
    for key in keys:
        col = table.column(key).combine_chunks()
        for i, e in enumerate(events):
            want = e["data"][key]
            if isinstance(col.type, pa.FixedShapeTensorType):
                got = col.to_numpy_ndarray()[i]
                np.testing.assert_array_equal(got, want)
                assert got.dtype == np.asarray(want).dtype
            else:
                assert col[i].as_py() == (want.tolist() if isinstance(want, np.ndarray) else want), key
        np.testing.assert_array_equal(
            stamps.field(key).cast(pa.int64()).to_numpy(),
            seconds_to_ns([e["timestamps"][key] for e in events]),
        )


# -- RingCallback ----------------------------------------------------------------------------------


def test_scan_into_the_ring_values_types_and_metadata(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, docs: Docs, subscribe: Any
) -> None:
    motor, det = devices
    cam = Camera("cam")
    cb = RingCallback(ring)
    subscribe(cb)
    (uid,) = RE(bp.scan([det, cam], motor, -1, 1, 5), sample="Si ünï")
    (start,) = of(docs, "start", uid)
    (desc,) = of(docs, "descriptor", uid)
    events = of(docs, "event", uid)
    assert len(events) == 5
    stream = f"primary_{uid[:8]}"
    assert cb.streams_of(uid) == {"primary": stream}
    table = ring_table(ring, stream)
    keys = list(desc["data_keys"])
    check_rows(table, events, keys)
    assert table.column("motor").to_pylist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    schema = table.schema
    types = {f.name: f.type for f in schema}
    assert types["time"] == pa.timestamp("ns") and types["seq_num"] == pa.int64()
    assert types["det-volts"] == pa.float64() and types["det-count"] == pa.int64()
    assert types["det-ok"] == pa.bool_() and types["det-label"] == pa.string()
    assert types["det-trace"] == pa.fixed_shape_tensor(pa.float64(), [4])
    assert types["det-bytes_"] == pa.fixed_shape_tensor(pa.uint8(), [3])
    assert types["cam_image"] == pa.fixed_shape_tensor(pa.uint16(), [2, 3])
    assert schema.field("time").metadata == {b"units": b"ns"}
    assert schema.field("det-volts").metadata == {
        b"units": b"V",
        b"source": b"soft://det-volts",
        b"precision": b"3",
    }
    assert schema.field("motor").metadata[b"units"] == b"mm"
    md = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert md["bluesky.run_uid"] == uid and md["bluesky.scan_id"] == str(start["scan_id"])
    assert md["bluesky.descriptor_uid"] == desc["uid"] and md["bluesky.descriptor_name"] == "primary"
    assert json.loads(md["bluesky.start"])["sample"] == "Si ünï"
    assert json.loads(md["bluesky.start"])["uid"] == uid
    assert json.loads(md["bluesky.descriptor"])["data_keys"] == json.loads(json.dumps(desc["data_keys"]))
    assert json.loads(md["bluesky.external"]) == {}
    # One record per event.
    records = ring.reader("oldest").read_batches()
    assert [b.num_rows for _, b in records] == [1] * 5


def test_the_hdf5_writer_reads_it_back(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, docs: Docs, subscribe: Any, tmp_path: Path
) -> None:
    motor, det = devices
    subscribe(RingCallback(ring))
    (uid,) = RE(bp.scan([det, Camera("cam")], motor, 0, 2, 3))
    events = of(docs, "event", uid)
    with HDF5Writer(tmp_path / "run.h5", ring) as w:
        w.flush_to_disk()
    with h5py.File(tmp_path / "run.h5", "r") as f:
        g = f[f"measurements/{hdf5_name(f'primary_{uid[:8]}')}"]
        assert g["seq_num"][:].tolist() == [1, 2, 3]
        assert g["time"].dtype == np.int64 and g["time"].attrs["units"] == "ns"
        np.testing.assert_array_equal(g["time"][:], seconds_to_ns([e["time"] for e in events]))
        np.testing.assert_array_equal(g["motor"][:], [0.0, 1.0, 2.0])
        assert g["motor"].attrs["units"] == "mm"
        frames = g["cam_image"]
        assert frames.shape == (3, 2, 3) and frames.dtype == np.uint16
        np.testing.assert_array_equal(frames[:], np.stack([e["data"]["cam_image"] for e in events]))
        assert g["det-trace"].shape == (3, 4)
        assert [s.decode() if isinstance(s, bytes) else s for s in g["det-label"][:]] == ["ünïcödé"] * 3
        assert g["det-ok"].dtype == np.bool_
        np.testing.assert_array_equal(
            g["timestamps.motor"][:], seconds_to_ns([e["timestamps"]["motor"] for e in events])
        )
        schema = json.loads(g.attrs["arrow_schema_json"])
        assert schema["metadata"]["bluesky.run_uid"] == uid
        assert json.loads(schema["metadata"]["bluesky.start"])["uid"] == uid


def test_event_page_is_one_record_of_all_its_rows(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, ring_path: str, docs: Docs
) -> None:
    """The same run's documents as event pages (event-model's own packing) give the same rows."""
    motor, det = devices
    (uid,) = RE(bp.scan([det, Camera("cam")], motor, 0, 1, 4))
    events = of(docs, "event", uid)
    cb = RingCallback(ring)
    for name, doc in docs:
        if name == "event":
            continue
        if name == "stop":  # (the page first: it belongs before the stop)
            cb("event_page", event_model.pack_event_page(*events))
        cb(name, doc)
    records = ring.reader("oldest").read_batches()
    assert [b.num_rows for _, b in records] == [4]
    (desc,) = of(docs, "descriptor", uid)
    check_rows(ring_table(ring, f"primary_{uid[:8]}"), events, list(desc["data_keys"]))


def test_two_runs_per_run_two_streams_each_intact(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, docs: Docs, subscribe: Any, tmp_path: Path
) -> None:
    """per_run=True: a scan with a motor, then a count without one: two streams, each with
    only its own rows and keys (no motor column filled with zeros in the second)."""
    motor, det = devices
    cb = RingCallback(ring)
    subscribe(cb)
    (first,) = RE(bp.scan([det], motor, 0, 1, 3))
    (second,) = RE(bp.count([Camera("cam")], num=2))
    s1, s2 = cb.streams_of(first)["primary"], cb.streams_of(second)["primary"]
    assert s1 != s2
    t1, t2 = ring_table(ring, s1), ring_table(ring, s2)
    check_rows(t1, of(docs, "event", first), ["motor", "det-volts"])
    check_rows(t2, of(docs, "event", second), ["cam_image"])
    assert "motor" not in t2.schema.names and "cam_image" not in t1.schema.names
    assert t2.schema.metadata[b"bluesky.run_uid"] == second.encode()
    with HDF5Writer(tmp_path / "both.h5", ring) as w:
        w.flush_to_disk()
    with h5py.File(tmp_path / "both.h5", "r") as f:
        g1, g2 = f["measurements"][hdf5_name(s1)], f["measurements"][hdf5_name(s2)]
        assert g1["motor"][:].tolist() == [0.0, 0.5, 1.0] and "motor" not in g2
        assert g2["cam_image"].shape == (2, 2, 3) and "cam_image" not in g1
        assert json.loads(g2.attrs["arrow_schema_json"])["metadata"]["bluesky.run_uid"] == second


def test_per_run_false_runs_follow_each_other_in_one_stream(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, docs: Docs, subscribe: Any
) -> None:
    motor, det = devices
    cb = RingCallback(ring, per_run=False)
    subscribe(cb)
    (first,) = RE(bp.scan([det], motor, 0, 1, 2))
    (second,) = RE(bp.count([det], num=3))
    assert cb.streams_of(first) == cb.streams_of(second) == {"primary": "primary"}
    batches = [b for name, b in ring.reader("oldest").read_batches() if name == "primary"]
    assert [b.schema.metadata[b"bluesky.run_uid"].decode() for b in batches] == [first] * 2 + [second] * 3
    assert ["motor" in b.schema.names for b in batches] == [True] * 2 + [False] * 3
    assert [b.column("seq_num")[0].as_py() for b in batches] == [1, 2, 1, 2, 3]


def test_missing_values_are_nulls(RE: RunEngine, ring: RingBuffer, docs: Docs, subscribe: Any) -> None:
    """A value of None (a device that had none to give) is a null, its timestamp too."""
    keys = {
        "v": {"source": "t", "dtype": "number", "shape": []},
        "n": {"source": "t", "dtype": "integer", "shape": []},
        "img": {"source": "t", "dtype": "array", "shape": [2], "dtype_numpy": "<i2"},
        "s": {"source": "t", "dtype": "string", "shape": []},
    }

    def value(i: int) -> dict[str, Any]:
        if i == 2:
            return {"v": None, "n": None, "img": None, "s": None}
        return {"v": i / 2, "n": i, "img": np.array([i, -i], np.int16), "s": f"#{i}"}

    subscribe(RingCallback(ring))
    (uid,) = RE(bp.count([Camera("c", keys, value)], num=3))
    t = ring_table(ring, f"primary_{uid[:8]}")
    assert t.column("v").to_pylist() == [0.5, None, 1.5]
    assert t.column("n").to_pylist() == [1, None, 3]
    assert t.column("s").to_pylist() == ["#1", None, "#3"]
    assert t.column("img").combine_chunks().storage.to_pylist() == [[1, -1], None, [3, -3]]


@pytest.mark.parametrize(
    ("key", "good", "bad", "message"),
    [
        (
            {"dtype": "array", "shape": [3], "dtype_numpy": "<f8"},
            np.zeros(3),
            np.zeros(4),
            r"shape \(4,\).*shape \[3\]",
        ),
        ({"dtype": "array", "shape": [2, 2]}, np.zeros((2, 2)), np.zeros(4), r"shape \(4,\).*shape \[2, 2\]"),
        (
            {"dtype": "array", "shape": [2], "dtype_numpy": "<i4"},
            [1, 2],
            [1, 2.5],
            r"float 2.5 is not a whole number",
        ),
        ({"dtype": "array", "shape": [2]}, [1, 2], [[1, 2], [3]], r"holds a ragged array"),
        ({"dtype": "number", "shape": []}, 1.5, "1.5", r"str '1.5' is not a number"),
        ({"dtype": "integer", "shape": []}, 1, 1.5, r"float 1.5 is not a whole number for int64"),
        (
            {"dtype": "number", "shape": [], "dtype_numpy": "|u1"},
            255,
            300,
            r"int 300 is out of range for uint8",
        ),
        ({"dtype": "number", "shape": [], "dtype_numpy": "<i8"}, 1, 2.0**63, r"out of range for int64"),
        ({"dtype": "number", "shape": []}, 1.0, [1.0, 2.0], r"shape \(2,\); the data key declares a scalar"),
        ({"dtype": "boolean", "shape": []}, True, 2, r"int 2 is not a boolean"),
        ({"dtype": "string", "shape": []}, "x", 3, r"int 3 is not a string"),
        ({"dtype": "string", "shape": []}, b"x", b"\xff", r"is not UTF-8 text"),
    ],
)
def test_a_value_that_contradicts_its_data_key_is_an_error_naming_it(
    RE: RunEngine,
    ring: RingBuffer,
    docs: Docs,
    subscribe: Any,
    key: dict[str, Any],
    good: Any,
    bad: Any,
    message: str,
) -> None:
    """The error reaches RE(...) with the key and event named; the run is stopped as failed;
    the rows before it are in the ring; the next run is clean."""
    cam = Camera("c", {"odd key": {"source": "t", **key}}, lambda i: {"odd key": good if i == 1 else bad})
    subscribe(RingCallback(ring))
    with pytest.raises(DocumentError, match=message) as err:
        RE(bp.count([cam], num=3))
    assert "data key 'odd key'" in str(err.value) and "event seq_num 2" in str(err.value)
    stop = of(docs, "stop")[-1]
    assert stop["exit_status"] == "fail"
    assert ring_table(ring, f"primary_{stop['run_start'][:8]}").num_rows == 1
    (uid,) = RE(bp.count([Camera("ok")], num=2))
    assert ring_table(ring, f"primary_{uid[:8]}").num_rows == 2


def test_odd_data_key_names_and_an_odd_stream(
    RE: RunEngine, ring: RingBuffer, docs: Docs, subscribe: Any, tmp_path: Path
) -> None:
    """Names event-model allows (no '.' or '/'): spaces, unicode, '%', the writer's own
    dataset name; a descriptor name with a space."""
    names = ["with space", "ünï µm", "100%", "arrow_schema", "-dash", "9lives", "a:b", "x" * 200]
    keys = {n: {"source": "t", "dtype": "number", "shape": []} for n in names}
    subscribe(RingCallback(ring))

    def plan() -> Any:
        cam = Camera("c", keys, lambda i: {n: i * 10.0 + k for k, n in enumerate(names)})
        yield from bps.open_run()
        for _ in range(2):
            yield from bps.trigger_and_read([cam], name="odd stream")
        yield from bps.close_run()

    (uid,) = RE(plan())
    t = ring_table(ring, f"odd stream_{uid[:8]}")
    for k, n in enumerate(names):
        assert t.column(n).to_pylist() == [10.0 + k, 20.0 + k]
    with HDF5Writer(tmp_path / "odd.h5", ring) as w:
        w.flush_to_disk()
    with h5py.File(tmp_path / "odd.h5", "r") as f:
        g = f["measurements"][hdf5_name(f"odd stream_{uid[:8]}")]
        by_name = {g[d].attrs.get("arrow_name"): g[d] for d in g if isinstance(g[d], h5py.Dataset)}
        for k, n in enumerate(names):
            assert by_name[n][:].tolist() == [10.0 + k, 20.0 + k]
            assert g[f"timestamps.{hdf5_name(n)}"].dtype == np.int64  # (a struct's leaves: <col>.<field>)


def test_a_reserved_column_name_is_refused(RE: RunEngine, ring: RingBuffer, subscribe: Any) -> None:
    subscribe(RingCallback(ring))
    cam = Camera("c", {"time": {"source": "t", "dtype": "number", "shape": []}}, lambda i: {"time": 1.0})
    with pytest.raises(
        DocumentError, match=r"data key 'time': the name is taken by a column every stream has"
    ):
        RE(bp.count([cam]))


@pytest.mark.parametrize(
    ("dtype_numpy", "message"),
    [("<c16", "complex numbers"), ("<f16", "floats wider than 64 bits"), ("<M8[D]", "datetimes not in s")],
)
def test_a_type_arrow_does_not_have_is_refused_at_the_descriptor(
    RE: RunEngine, ring: RingBuffer, subscribe: Any, dtype_numpy: str, message: str
) -> None:
    subscribe(RingCallback(ring))
    dk = {"z": {"source": "t", "dtype": "number", "shape": [], "dtype_numpy": dtype_numpy}}
    with pytest.raises(DocumentError, match=rf"data key 'z': dtype_numpy '{dtype_numpy[:3]}.*{message}"):
        RE(bp.count([Camera("c", dk, lambda i: {"z": 0})]))
    assert not ring.streams()


def test_a_table_signal_is_a_struct_of_columns(
    RE: RunEngine, ring: RingBuffer, subscribe: Any, tmp_path: Path
) -> None:
    """An ophyd-async Table (structured dtype_numpy): one struct child per field, each with the
    table's shape; the writer stores them as `<key>.<field>` arrays."""
    with init_devices():
        table = soft_signal_rw(Pair, Pair(index=np.array([1, 2], np.int32), weight=np.array([0.5, 1.5])))
    subscribe(RingCallback(ring))
    (uid,) = RE(bp.count([table], num=2))
    t = ring_table(ring, f"primary_{uid[:8]}")
    assert t.schema.field("table").type == pa.struct(
        [
            pa.field("index", pa.fixed_shape_tensor(pa.int32(), [2])),
            pa.field("weight", pa.fixed_shape_tensor(pa.float64(), [2])),
        ]
    )
    col = t.column("table").combine_chunks()
    np.testing.assert_array_equal(col.field("index").to_numpy_ndarray(), [[1, 2], [1, 2]])
    np.testing.assert_array_equal(col.field("weight").to_numpy_ndarray(), [[0.5, 1.5], [0.5, 1.5]])
    with HDF5Writer(tmp_path / "t.h5", ring) as w:
        w.flush_to_disk()
    with h5py.File(tmp_path / "t.h5", "r") as f:
        g = f["measurements"][hdf5_name(f"primary_{uid[:8]}")]
        np.testing.assert_array_equal(g["table.index"][:], [[1, 2], [1, 2]])
        assert g["table.index"].dtype == np.int32
        np.testing.assert_array_equal(g["table.weight"][:], [[0.5, 1.5], [0.5, 1.5]])


def test_external_keys_are_listed_not_columns(ring: RingBuffer) -> None:
    """Documents from event-model's own composer: a FILESTORE key (its events hold datum ids)
    and a bool array (nested fixed-size lists) and a variable-length one."""
    run = event_model.compose_run(metadata={"scan_id": 9})
    keys: dict[str, Any] = {
        "det": {"source": "t", "dtype": "array", "shape": [512, 512], "external": "FILESTORE:"},
        "mask": {"source": "t", "dtype": "array", "shape": [2, 2], "dtype_numpy": "|b1"},
        "peaks": {"source": "t", "dtype": "array", "shape": [None], "dtype_numpy": "<f4"},
    }
    desc = run.compose_descriptor(data_keys=keys, name="primary")
    cb = RingCallback(ring)
    cb("start", run.start_doc)
    cb("descriptor", desc.descriptor_doc)
    for i in range(2):
        ev = desc.compose_event(
            data={"det": f"datum-{i}", "mask": [[True, False], [i == 1, True]], "peaks": [1.5] * (i + 1)},
            timestamps={"det": 1.0, "mask": 2.0 + i, "peaks": 3.5 if i == 0 else None},
            seq_num=i + 1,
        )
        event_model.schema_validators[event_model.DocumentNames.event].validate(ev)
        cb("event", ev)
    cb("stop", run.compose_stop())
    t = ring_table(ring, f"primary_{run.start_doc['uid'][:8]}")
    assert "det" not in t.schema.names
    assert json.loads(t.schema.metadata[b"bluesky.external"])["det"]["external"] == "FILESTORE:"
    assert t.schema.metadata[b"bluesky.scan_id"] == b"9"
    assert t.column("mask").to_pylist() == [[[True, False], [False, True]], [[True, False], [True, True]]]
    assert t.column("peaks").to_pylist() == [[1.5], [1.5, 1.5]]
    stamps = t.column("timestamps").combine_chunks()
    assert [f.name for f in stamps.type] == ["mask", "peaks"]
    assert stamps.field("mask").cast(pa.int64()).to_pylist() == [2_000_000_000, 3_000_000_000]
    assert stamps.field("peaks").cast(pa.int64()).to_pylist() == [3_500_000_000, None]  # (None: a null)


def test_documents_of_runs_it_has_not_seen_are_errors(ring: RingBuffer) -> None:
    run = event_model.compose_run()
    desc = run.compose_descriptor(data_keys={"x": {"source": "t", "dtype": "number", "shape": []}}, name="p")
    cb = RingCallback(ring)
    with pytest.raises(DocumentError, match=r"whose start document this callback has not seen"):
        cb("descriptor", desc.descriptor_doc)
    ev = desc.compose_event(data={"x": 1.0}, timestamps={"x": 1.0}, seq_num=1)
    with pytest.raises(DocumentError, match=r"descriptor .* which this callback has not seen"):
        cb("event", ev)
    cb("start", run.start_doc)
    cb("descriptor", desc.descriptor_doc)
    bad = dict(ev, data={"x": 1.0, "y": 2.0}, timestamps={"x": 1.0, "y": 1.0})
    with pytest.raises(DocumentError, match=r"data key 'y' is not a data key of the descriptor"):
        cb("event", bad)
    assert not ring.reader("oldest").read_batches()


def test_an_aborted_run_is_stopped_and_the_next_is_clean(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, docs: Docs, subscribe: Any
) -> None:
    motor, det = devices
    cb = RingCallback(ring)
    subscribe(cb)

    def failing() -> Any:
        yield from bps.open_run()
        for _ in range(2):
            yield from bps.trigger_and_read([det, motor])
        raise RuntimeError("the sample fell off")

    with pytest.raises(RuntimeError, match="the sample fell off"):
        RE(failing())
    stop = of(docs, "stop")[-1]
    assert stop["exit_status"] == "fail" and "the sample fell off" in stop["reason"]
    (uid,) = RE(bp.count([det], num=1))
    assert ring_table(ring, f"primary_{stop['run_start'][:8]}").num_rows == 2
    assert ring_table(ring, f"primary_{uid[:8]}").num_rows == 1


def test_a_read_only_ring_is_refused(ring_path: str, ring: RingBuffer) -> None:
    with (
        RingBuffer.open(ring_path) as view,
        pytest.raises(ReadOnlyRingError, match="not the ring's producer"),
    ):
        RingCallback(view)
    with pytest.raises(ValueError, match="schema_metadata must be one of"):
        RingCallback(ring, schema_metadata="all")  # type: ignore[arg-type]


def test_a_full_schema_table_is_a_clear_error(ring_path: str) -> None:
    """Every run registers its schemas; "documents" fills the ring's table soonest, "minimal"
    with per_run=False reuses one schema for runs of the same keys."""
    ring = RingBuffer.create(ring_path, capacity_mb=16, schema_mb=0.25)
    keys = {"x": {"source": "t", "dtype": "number", "shape": []}}

    def one_run(cb: RingCallback) -> None:
        run = event_model.compose_run(metadata={"notes": "n" * 2000})
        desc = run.compose_descriptor(data_keys=keys, name="primary")
        cb("start", run.start_doc)
        cb("descriptor", desc.descriptor_doc)
        cb("event", desc.compose_event(data={"x": 1.0}, timestamps={"x": 1.0}, seq_num=1))
        cb("stop", run.compose_stop())

    minimal = RingCallback(ring, per_run=False, schema_metadata="minimal")
    for _ in range(3):
        one_run(minimal)
    assert len(ring._schemas()) == 1
    cb = RingCallback(ring)
    with pytest.raises(RingConfigError, match=r"schema region is full.*every run registers its own schemas"):
        for _ in range(200):
            one_run(cb)
    assert 40 < len(ring._schemas()) < 200
    ring.close()


# -- RunFileWriter ----------------------------------------------------------------------------------


def h5_metadata(path: str) -> dict[str, Any]:
    """measurements/metadata of a run file: every dataset, strings decoded."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        for name, ds in f["measurements/metadata"].items():
            v = ds[()]
            out[str(ds.attrs.get("key", name))] = v.decode() if isinstance(v, bytes) else v
    return out


def h5_stream(path: str, stream: str = "primary") -> dict[str, np.ndarray[Any, Any]]:
    with h5py.File(path, "r") as f:
        g = f["measurements"][stream]
        return {
            name: ds[:] for name, ds in g.items() if isinstance(ds, h5py.Dataset) and name != "arrow_schema"
        }


def test_two_runs_two_files_each_with_its_own_metadata_and_rows(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, docs: Docs, subscribe: Any, tmp_path: Path
) -> None:
    motor, det = devices
    with RunFileWriter(ring, tmp_path, flush_interval=0.2) as writer:
        subscribe(writer)
        (first,) = RE(bp.scan([det, Camera("cam")], motor, 0, 1, 3), sample="Si", temperature={"K": 4.2})
        assert writer.path is None and len(writer.paths) == 1
        # Another producer's record between the runs: in neither file.
        ring.write_arrow_batch(pa.record_batch([pa.array([1.0])], names=["x"]), "between")
        (second,) = RE(bp.count([det], num=2), sample="Ge")
    runs = {first: writer.paths[0], second: writer.paths[1]}
    for uid, path in runs.items():
        (start,) = of(docs, "start", uid)
        (stop,) = of(docs, "stop", uid)
        (desc,) = of(docs, "descriptor", uid)
        events = of(docs, "event", uid)
        assert Path(path).name == f"{start['scan_id']}_{uid[:8]}.h5"
        md = h5_metadata(path)
        assert json.loads(md["bluesky_start"])["uid"] == uid
        assert md["start.uid"] == uid and md["start.scan_id"] == start["scan_id"]
        assert md["start.sample"] == start["sample"] and md["start.plan_name"] == start["plan_name"]
        assert json.loads(md["bluesky_stop"])["uid"] == stop["uid"]
        assert md["exit_status"] == "success" and md["num_events.primary"] == len(events)
        assert json.loads(md["bluesky_descriptors"])["descriptors"][0]["uid"] == desc["uid"]
        rows = h5_stream(path)
        assert rows["seq_num"].tolist() == [e["seq_num"] for e in events]
        np.testing.assert_array_equal(rows["time"], seconds_to_ns([e["time"] for e in events]))
        np.testing.assert_array_equal(rows["det-volts"], [e["data"]["det-volts"] for e in events])
        np.testing.assert_array_equal(rows["det-trace"], np.stack([e["data"]["det-trace"] for e in events]))
        with h5py.File(path, "r") as f:
            assert sorted(f["measurements"]) == ["end_time", "metadata", "primary", "start_time"]
    assert h5_metadata(runs[first])["start.temperature.K"] == 4.2
    one, two = h5_stream(runs[first]), h5_stream(runs[second])
    assert one["motor"].tolist() == [0.0, 0.5, 1.0] and one["cam_image"].shape == (3, 2, 3)
    assert "motor" not in two and "cam_image" not in two and "motor__valid" not in two


def test_an_aborted_and_a_failed_run_record_their_exit_status(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, docs: Docs, subscribe: Any, tmp_path: Path
) -> None:
    motor, det = devices

    def paused() -> Any:
        yield from bps.open_run()
        yield from bps.trigger_and_read([det, motor])
        yield from bps.checkpoint()
        yield from bps.pause()
        yield from bps.trigger_and_read([det, motor])
        yield from bps.close_run()

    def failing() -> Any:
        yield from bps.open_run()
        for _ in range(2):
            yield from bps.trigger_and_read([det])
        raise RuntimeError("the sample fell off")

    with RunFileWriter(ring, tmp_path, template="{plan_name}/{uid}.h5", flush_interval=0.2) as writer:
        subscribe(writer)
        with pytest.raises(RunEngineInterrupted):
            RE(paused())
        RE.abort(reason="beam dump")
        with pytest.raises(RuntimeError, match="the sample fell off"):
            RE(failing())
        (clean,) = RE(bp.count([det], num=3))
    aborted, failed, good = writer.paths
    assert Path(aborted).parent.name == "paused" and Path(good).name == f"{clean}.h5"
    md = h5_metadata(aborted)
    assert md["exit_status"] == "abort" and md["reason"] == "beam dump" and md["num_events.primary"] == 1
    assert h5_stream(aborted)["seq_num"].tolist() == [1]
    md = h5_metadata(failed)
    assert md["exit_status"] == "fail" and "the sample fell off" in md["reason"]
    assert h5_stream(failed)["seq_num"].tolist() == [1, 2]
    assert h5_metadata(good)["exit_status"] == "success"
    assert h5_stream(good)["seq_num"].tolist() == [1, 2, 3]
    assert json.loads(h5_metadata(good)["bluesky_start"])["uid"] == clean


def test_a_killed_writer_is_an_error_at_the_next_document_and_the_next_run_is_clean(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, docs: Docs, subscribe: Any, tmp_path: Path
) -> None:
    motor, det = devices
    with RunFileWriter(ring, tmp_path, flush_interval=0.2) as writer:
        subscribe(writer)

        def killed() -> Any:
            yield from bps.open_run()
            yield from bps.trigger_and_read([det])
            pid = writer.writer_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            # Until it is gone (without reaping it: that is the writer's to see), so that the
            # next event is the first document after its death.
            while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                yield from bps.sleep(0.01)
            yield from bps.trigger_and_read([det])
            yield from bps.close_run()

        with pytest.raises(WriterProcessError, match=r"the writer process \(pid \d+\) exited with status -9"):
            RE(killed())
        assert of(docs, "stop")[-1]["exit_status"] == "fail"
        assert writer.writer_pid is None
        (uid,) = RE(bp.count([det], num=2))
    assert h5_metadata(writer.paths[-1])["exit_status"] == "success"
    assert h5_stream(writer.paths[-1])["seq_num"].tolist() == [1, 2]
    assert json.loads(h5_metadata(writer.paths[-1])["bluesky_start"])["uid"] == uid


def test_file_names_that_cannot_be_made_are_errors_naming_the_template(
    RE: RunEngine, devices: tuple[SimMotor, Det], ring: RingBuffer, docs: Docs, subscribe: Any, tmp_path: Path
) -> None:
    _, det = devices
    with RunFileWriter(ring, tmp_path, template="{sample}_{scan_id}.h5", flush_interval=0.2) as writer:
        subscribe(writer)
        with pytest.raises(
            DocumentError,
            match=r"template '\{sample\}_\{scan_id\}.h5' needs 'sample'.*RE\(plan, sample=...\)",
        ):
            RE(bp.count([det]))
        assert writer.writer_pid is None and not writer.paths  # (no process for a run without a file)
        (uid,) = RE(bp.count([det]), sample="Si", scan_id=7)
        with pytest.raises(DocumentError, match=r"Si_7.h5 exists.*never continues another's file"):
            RE(bp.count([det]), sample="Si", scan_id=7)
        with pytest.raises(DocumentError, match=r"is not a file inside"):
            RE(bp.count([det]), sample="../../etc/x", scan_id=8)
        (after,) = RE(bp.count([det], num=2), sample="Ge")
    assert [Path(p).name for p in writer.paths] == [
        "Si_7.h5",
        f"Ge_{of(docs, 'start', after)[0]['scan_id']}.h5",
    ]
    assert h5_stream(writer.paths[0])["seq_num"].tolist() == [1]
    assert h5_stream(writer.paths[1])["seq_num"].tolist() == [1, 2]
    assert json.loads(h5_metadata(writer.paths[0])["bluesky_start"])["uid"] == uid


def test_bad_arguments_are_refused_at_construction(ring: RingBuffer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not positional"):
        RunFileWriter(ring, tmp_path, template="{}.h5")
    with pytest.raises(ValueError, match="has no field"):
        RunFileWriter(ring, tmp_path, template="run.h5")
    with pytest.raises(ValueError, match="does not format a start document"):
        RunFileWriter(ring, tmp_path, template="{scan_id:q}.h5")
    with pytest.raises(TypeError, match="sets the writer option.*output"):
        RunFileWriter(ring, tmp_path, output="x.h5")
    with pytest.raises(TypeError, match="unknown writer option.*flush"):
        RunFileWriter(ring, tmp_path, flush=1)
    with pytest.raises(ValueError, match="flush_interval must be a positive number"):
        RunFileWriter(ring, tmp_path, flush_interval=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunFileWriter(ring, tmp_path / "missing")


def test_event_pages_and_a_close_in_the_middle_of_a_run(ring: RingBuffer, tmp_path: Path) -> None:
    """Documents from event-model's composer: event pages into the run's file; close() with
    a run open keeps what it holds (no stop: no exit status); a run after close() starts a
    new writer process."""
    keys = {"x": {"source": "t", "dtype": "number", "shape": [], "units": "K"}}
    writer = RunFileWriter(ring, tmp_path, template="{uid}.h5", flush_interval=0.2)
    uids = []
    for k in range(2):
        run = event_model.compose_run(metadata={"scan_id": k})
        uids.append(run.start_doc["uid"])
        desc = run.compose_descriptor(data_keys=keys, name="primary")
        writer("start", run.start_doc)
        writer("descriptor", desc.descriptor_doc)
        events = [
            desc.compose_event(data={"x": k + i / 4}, timestamps={"x": 1.0 + i}, seq_num=i + 1)
            for i in range(4)
        ]
        writer("event_page", event_model.pack_event_page(*events))
        if k == 0:
            pid = writer.writer_pid
            writer.close()
            assert writer.writer_pid is None and writer.path is None
        else:
            assert writer.writer_pid not in (None, pid)
            writer("stop", run.compose_stop(exit_status="success"))
            writer.close()
    first, second = (str(tmp_path / f"{u}.h5") for u in uids)
    assert writer.paths == [first, second]
    assert h5_stream(first)["x"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert "exit_status" not in h5_metadata(first) and h5_metadata(first)["start.scan_id"] == 0
    assert h5_stream(second)["x"].tolist() == [1.0, 1.25, 1.5, 1.75]
    assert h5_metadata(second)["exit_status"] == "success" and h5_metadata(second)["num_events.primary"] == 4
    with h5py.File(second, "r") as f:
        assert f["measurements/primary/x"].attrs["units"] == "K"
