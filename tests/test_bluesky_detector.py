"""RustDaqDetector in a real RunEngine: step scans, fly scans, documents valid against
event-model's schemas, the file equal to what the instruments produced, read back through a
real Tiled server (live during a fly scan too), and an interrupted scan that leaks nothing
into the next one."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from event_model import DocumentNames, schema_validators
from ophyd_async.core import StaticPathProvider, TriggerInfo, UUIDFilenameProvider, init_devices
from ophyd_async.sim import SimMotor
from tiled.client import from_uri
from tiled.server import SimpleTiledServer

from rust_daq import RingBuffer
from rust_daq.adapters import CallableInstrument
from rust_daq.ophyd_async import RustDaqDetector, SignalInstrument


@pytest.fixture
def tiled(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    data = tmp_path / "data"
    data.mkdir()
    with SimpleTiledServer(tmp_path / "tiled", readable_storage=[data]) as server:
        client = from_uri(server.uri)
        try:
            yield client, data
        finally:
            client.context.close()


@pytest.fixture
def ring(ring_path: str) -> Iterator[RingBuffer]:
    with RingBuffer.create(ring_path, capacity_mb=32) as r:
        yield r


class Counter:
    """A polled instrument whose reads are 1, 2, 3... (connect takes 0)."""

    def __init__(self, name: str = "counter", rate_hz: float = 1000.0) -> None:
        self.n = itertools.count()
        self.instrument = CallableInstrument(
            lambda: float(next(self.n)), name, rate_hz=rate_hz, units={"value": "counts"}
        )


def engine(client: Any = None) -> tuple[RunEngine, list[tuple[str, dict[str, Any]]]]:
    RE = RunEngine()  # noqa: N806
    docs: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    if client is not None:
        RE.subscribe(TiledWriter(client, batch_size=1))
    return RE, docs


def detector(ring: RingBuffer, directory: Path, *instruments: Any, **kw: Any) -> RustDaqDetector:
    with init_devices():
        det = RustDaqDetector(
            list(instruments), ring, StaticPathProvider(UUIDFilenameProvider(), directory), name="det", **kw
        )
    return det


def validate(docs: list[tuple[str, dict[str, Any]]]) -> None:
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)


def files_of(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    uris = [d["uri"] for n, d in docs if n == "stream_resource"]
    return list(dict.fromkeys(u.removeprefix("file://localhost").removeprefix("file://") for u in uris))


def column(path: str, stream: str = "counter", col: str = "value") -> np.ndarray[Any, Any]:
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        return np.asarray(f[f"measurements/{stream}/{col}"][:])


def test_count_documents_file_and_tiled_agree(ring: RingBuffer, tiled: tuple[Any, Path]) -> None:
    client, data = tiled
    RE, docs = engine(client)  # noqa: N806
    c = Counter()
    det = detector(ring, data, c.instrument)
    (uid,) = RE(bp.count([det], num=5))
    validate(docs)
    (path,) = files_of(docs)
    np.testing.assert_array_equal(column(path), [1.0, 2.0, 3.0, 4.0, 5.0])
    resources = {d["data_key"]: d for n, d in docs if n == "stream_resource"}
    assert set(resources) == {"det", "det-timestamp"}
    r = resources["det"]
    assert r["mimetype"] == "application/x-hdf5" and r["uri"].startswith("file://")
    assert r["parameters"]["dataset"] == "/measurements/counter/value"
    assert r["parameters"]["swmr"] is True
    with h5py.File(path, "r") as f:
        assert tuple(r["parameters"]["chunk_shape"]) == f["measurements/counter/value"].chunks
        stamps = f["measurements/counter/timestamp"][:]
        # One commit per point (on_flush), never ahead of the file: the file's books agree.
        assert f["rust_daq/streams/counter"][0] == 5
    datums = [d for n, d in docs if n == "stream_datum" and d["stream_resource"] == r["uid"]]
    assert [(d["indices"]["start"], d["indices"]["stop"]) for d in datums] == [(i, i + 1) for i in range(5)]
    (descriptor,) = [d for n, d in docs if n == "descriptor"]
    assert descriptor["data_keys"]["det"]["units"] == "counts"
    assert descriptor["data_keys"]["det"]["external"] == "STREAM:"
    assert descriptor["data_keys"]["det-timestamp"]["units"] == "ns"
    primary = client[uid]["primary"]
    np.testing.assert_array_equal(primary["det"].read(), [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(primary["det-timestamp"].read(), stamps)
    assert det.file_path is None  # unstaged: the file is closed


def test_scan_records_where_the_motor_was(ring: RingBuffer, tmp_path: Path) -> None:
    RE, docs = engine()  # noqa: N806
    with init_devices():
        motor = SimMotor(name="motor", instant=True)
    position = SignalInstrument(motor.user_readback, "poll", rate_hz=1000, name="position")
    det = detector(ring, tmp_path, position)
    RE(bp.scan([det], motor, -1.0, 3.0, 5))
    validate(docs)
    events = [d for n, d in docs if n == "event"]
    where = [e["data"]["motor"] for e in events]
    assert where == [-1.0, 0.0, 1.0, 2.0, 3.0]
    (path,) = files_of(docs)
    np.testing.assert_array_equal(column(path, "position"), where)


def fly(det: RustDaqDetector, events: int, then: Any = None) -> Any:
    """prepare, kickoff, collect while completing; `then` (a plan) runs after kickoff."""

    @bpp.stage_decorator([det])
    @bpp.run_decorator()
    def inner() -> Any:
        yield from bps.prepare(det, TriggerInfo(number_of_events=events), wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)
        yield from bps.kickoff(det, wait=True)
        if then is not None:
            yield from then()
        yield from bps.collect_while_completing([det], [det], flush_period=0.1)

    return inner()


def test_fly_scan_reads_back_live_through_tiled(ring: RingBuffer, tiled: tuple[Any, Path]) -> None:
    client, data = tiled
    RE, docs = engine(client)  # noqa: N806
    c = Counter()
    det = detector(ring, data, c.instrument, flush_interval=0.05)
    seen_live: list[np.ndarray[Any, Any]] = []

    def peek() -> Any:
        # While the detector acquires: collect what is committed, then read it through Tiled.
        yield from bps.sleep(0.8)
        yield from bps.collect(det)
        run = client[docs[0][1]["uid"]]
        seen_live.append(np.asarray(run["primary"]["det"].read()))

    RE(fly(det, 2400, peek))
    validate(docs)
    live = seen_live[0]
    assert 0 < len(live) < 2400, "Tiled saw the scan while it ran"
    np.testing.assert_array_equal(live, np.arange(1, len(live) + 1, dtype=np.float64))
    (path,) = files_of(docs)
    np.testing.assert_array_equal(column(path), np.arange(1, 2401, dtype=np.float64))
    uid = docs[0][1]["uid"]
    np.testing.assert_array_equal(client[uid]["primary"]["det"].read(), np.arange(1, 2401, dtype=np.float64))
    stops = [d["indices"]["stop"] for n, d in docs if n == "stream_datum"]
    assert max(stops) == 2400 and len(stops) > 2  # emitted as the rows were committed


def test_an_interrupted_scan_leaks_nothing_into_the_next(ring: RingBuffer, tiled: tuple[Any, Path]) -> None:
    client, data = tiled
    RE, docs = engine(client)  # noqa: N806
    c = Counter()
    det = detector(ring, data, c.instrument)

    paths: list[str | None] = []

    def interrupt() -> Any:
        yield from bps.sleep(0.3)
        paths.append(det.file_path)  # (no stream resource yet: nothing was collected)
        raise RuntimeError("the user stopped the scan")

    with pytest.raises(RuntimeError, match="the user stopped the scan"):
        RE(fly(det, 100_000, interrupt))
    (first,) = paths
    assert first is not None
    before = column(first)
    assert len(before) > 0
    np.testing.assert_array_equal(before, np.arange(1, len(before) + 1, dtype=np.float64))
    stop = [d for n, d in docs if n == "stop"][0]
    assert stop["exit_status"] == "fail"
    docs.clear()
    (uid,) = RE(bp.count([det], num=3))
    (second,) = files_of(docs)
    after = column(second)
    assert len(after) == 3, "the interrupted scan's rows stayed out of the next run"
    # Every read of the interrupted scan is in its own file (nothing lost at the stop: the
    # acquisition stopped, then the writer drained, then closed), the next run starts after.
    assert after[0] > before[-1]
    np.testing.assert_array_equal(after, after[0] + np.arange(3))
    np.testing.assert_array_equal(client[uid]["primary"]["det"].read(), after)
    assert len(column(first)) == len(before)  # and the first file did not change


def test_the_users_gc_state_is_unchanged(ring: RingBuffer, tmp_path: Path) -> None:
    RE, _ = engine()  # noqa: N806
    c = Counter()
    det = detector(ring, tmp_path, c.instrument)
    gc.unfreeze()
    try:
        RE(bp.count([det], num=3))
        assert gc.get_freeze_count() == 0  # (the RunEngine's loop is not the main thread's)
        keep = [object() for _ in range(100)]
        gc.freeze()
        frozen = gc.get_freeze_count()
        RE(bp.count([det], num=3))
        assert gc.get_freeze_count() > frozen // 2  # the user's freeze was not undone
        del keep
    finally:
        gc.unfreeze()


def test_livetime_is_refused_with_the_reason(ring: RingBuffer, tmp_path: Path) -> None:
    RE, _ = engine()  # noqa: N806
    c = Counter()
    det = detector(ring, tmp_path, c.instrument)

    @bpp.stage_decorator([det])
    @bpp.run_decorator()
    def plan() -> Any:
        yield from bps.prepare(det, TriggerInfo(number_of_events=3, livetime=0.01), wait=True)

    with pytest.raises(Exception, match=r"read at their own rates .*livetime=0.01"):
        RE(plan())


def test_bad_construction_is_refused(ring: RingBuffer, tmp_path: Path) -> None:
    provider = StaticPathProvider(UUIDFilenameProvider(), tmp_path)
    with pytest.raises(ValueError, match="at least one instrument"):
        RustDaqDetector([], ring, provider, name="det")
    c = Counter()
    with pytest.raises(ValueError, match="must be unique"):
        RustDaqDetector([c.instrument, c.instrument], ring, provider, name="det")
    RE, docs = engine()  # noqa: N806
    det = detector(ring, tmp_path, c.instrument, main="nope")
    with pytest.raises(Exception, match=r"main column 'nope' is not a column of 'counter'"):
        RE(bp.count([det], num=1))


def test_several_instruments_name_their_keys(ring: RingBuffer, tmp_path: Path) -> None:
    RE, docs = engine()  # noqa: N806
    a, b = Counter("a"), Counter("b", rate_hz=500)
    det = detector(ring, tmp_path, a.instrument, b.instrument)
    RE(bp.count([det], num=4))
    validate(docs)
    keys = {d["data_key"]: d["parameters"]["dataset"] for n, d in docs if n == "stream_resource"}
    assert keys == {
        "det": "/measurements/a/value",
        "det-timestamp": "/measurements/a/timestamp",
        "det-b-value": "/measurements/b/value",
        "det-b-timestamp": "/measurements/b/timestamp",
    }
    (path,) = files_of(docs)
    np.testing.assert_array_equal(column(path, "a"), [1, 2, 3, 4])
    np.testing.assert_array_equal(column(path, "b"), [1, 2, 3, 4])


def test_a_failing_instrument_fails_the_trigger_with_its_error(ring: RingBuffer, tmp_path: Path) -> None:
    RE, docs = engine()  # noqa: N806
    n = itertools.count()

    def read() -> float:
        k = next(n)
        if k == 3:
            raise OSError("the voltmeter stopped answering")
        return float(k)

    det = detector(ring, tmp_path, CallableInstrument(read, "flaky", rate_hz=1000))
    with pytest.raises(Exception) as info:
        RE(bp.count([det], num=5))
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    # The trigger failed with the instrument's error, not after waiting out its timeout.
    assert any("the acquisition failed: OSError: the voltmeter stopped answering" in m for m in chain), chain
    assert not any("TimeoutError" in m for m in chain)
    (path,) = files_of(docs)
    np.testing.assert_array_equal(column(path, "flaky"), [1.0, 2.0])  # the points before it


def test_streaming_instruments_are_refused(ring: RingBuffer, tmp_path: Path) -> None:
    from ophyd_async.core import soft_signal_rw

    monitored = SignalInstrument(soft_signal_rw(float, 1.0, name="sp"), "monitor")
    with pytest.raises(ValueError, match=r"\['sp'\] push their data .* poll them instead"):
        RustDaqDetector([monitored], ring, StaticPathProvider(UUIDFilenameProvider(), tmp_path), name="det")


def test_a_scan_stopped_before_its_acquisition_began_ends_at_once(ring: RingBuffer, tmp_path: Path) -> None:
    RE, docs = engine()  # noqa: N806
    c = Counter()
    det = detector(ring, tmp_path, c.instrument)

    def interrupt() -> Any:
        raise RuntimeError("stopped at once")
        yield  # (a plan)

    # 10**7 reads at 1 kHz: without the stop reaching the acquisition this would run for hours
    # (pytest's timeout fails it).
    with pytest.raises(RuntimeError, match="stopped at once"):
        RE(fly(det, 10**7, interrupt))
    assert det.file_path is None
    (uid,) = RE(bp.count([det], num=2))
    (second,) = files_of([d for d in docs if d[0] == "stream_resource" and d[1]["run_start"] == uid])
    assert len(column(second)) == 2


def test_a_grid_scan_of_the_sim_pattern_as_a_source(ring: RingBuffer, tmp_path: Path) -> None:
    from ophyd_async.sim import PatternGenerator, SimStage
    from ophyd_async.sim._pattern_generator import generate_interesting_pattern

    RE, docs = engine()  # noqa: N806
    pattern = PatternGenerator()
    with init_devices():
        stage = SimStage(pattern, name="stage")
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))  # (instant moves)
    source = CallableInstrument(lambda: pattern.generate_point(channel=1), "pattern", rate_hz=1000)
    det = detector(ring, tmp_path, source)
    RE(bp.grid_scan([det, stage], stage.x, -2.0, 2.0, 3, stage.y, -1.0, 1.0, 3))
    validate(docs)
    events = [d["data"] for n, d in docs if n == "event"]
    assert len(events) == 9
    expected = [generate_interesting_pattern(e["stage-x"], e["stage-y"], 1, 10) for e in events]
    (path,) = files_of(docs)
    np.testing.assert_allclose(column(path, "pattern"), expected)
    assert len(set(np.round(expected, 9))) > 3  # (the pattern does vary over the grid)
