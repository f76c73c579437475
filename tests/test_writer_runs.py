"""The writer API that runs of another stack need (bluesky: one run, one file): where a file
starts (``start="now"``), when a flush is known (``on_flush``, ``flush_soon``), datasets that
exist before the first record (``schemas``, ``datasets``), and the rotation from one file to
the next, in-process and in the writer process (``rotate``, ``rotate_process``)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import h5py
import numpy as np
import pyarrow as pa
import pytest

from rust_daq import HDF5Writer, RingBuffer, RustDaqError
from rust_daq.hdf5.options import WriterOptions
from rust_daq.hdf5.process import rotate_process, start_process, stop_process

SCHEMA = pa.schema([pa.field("index", pa.int64()), pa.field("volts", pa.float64(), metadata={"units": "V"})])
FRAME = pa.fixed_shape_tensor(pa.uint16(), [6, 4])


def batch(first: int, rows: int = 10) -> pa.RecordBatch:
    idx = np.arange(first, first + rows, dtype=np.int64)
    return pa.record_batch([idx, idx * 0.5], schema=SCHEMA)


def indices(path: str | Path, stream: str = "v") -> np.ndarray[Any, Any]:
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        return np.asarray(f[f"measurements/{stream}/index"][:])


def metadata_json(path: str | Path, name: str = "json") -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        value = f[f"measurements/metadata/{name}"][()]
        return dict(json.loads(value.decode() if isinstance(value, bytes) else value))


def test_start_now_takes_only_what_comes_after(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        for k in range(5):  # an earlier run's records, never drained
            ring.write_arrow_batch(batch(k * 10), "v")
        with HDF5Writer(tmp_path / "now.h5", ring, start="now") as w:
            for k in range(5, 8):
                ring.write_arrow_batch(batch(k * 10), "v")
            w.flush_to_disk()
            assert w.stream_stats()["v"] == {"records": 3, "lost": 0, "rows": 30, "unwritable": 0}
            assert w.records_lost == 0
        np.testing.assert_array_equal(indices(tmp_path / "now.h5"), np.arange(50, 80))
        # The same ring drained from its tail: the primary consumer moved read_tail past all
        # eight, so a tail writer now starts after them.
        ring.write_arrow_batch(batch(80), "v")
        with HDF5Writer(tmp_path / "tail.h5", ring) as w:
            pass
        np.testing.assert_array_equal(indices(tmp_path / "tail.h5"), np.arange(80, 90))


def test_start_tail_takes_everything_not_yet_in_a_file(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        for k in range(5):
            ring.write_arrow_batch(batch(k * 10), "v")
        with HDF5Writer(tmp_path / "tail.h5", ring, start="tail"):
            pass
        np.testing.assert_array_equal(indices(tmp_path / "tail.h5"), np.arange(50))


def test_bad_arguments_are_named(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        with pytest.raises(ValueError, match="unknown start 'later'"):
            HDF5Writer(tmp_path / "x.h5", ring, start="later")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="on_flush must be callable"):
            HDF5Writer(tmp_path / "x.h5", ring, on_flush=3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="schemas maps stream names to pyarrow.Schema"):
            HDF5Writer(tmp_path / "x.h5", ring, schemas={"v": "float64"})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="start must be 'tail' or 'now'"):
            WriterOptions(ring=ring_path, output="x.h5", start="oldest")


def test_on_flush_reports_committed_rows_per_stream(ring_path: str, tmp_path: Path) -> None:
    seen: list[dict[str, int]] = []
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        w = HDF5Writer(tmp_path / "f.h5", ring, on_flush=seen.append)
        ring.write_arrow_batch(batch(0, 7), "v")
        w.flush_to_disk()
        assert seen == [{"v": 7}]
        w.flush_to_disk()  # nothing new: no call
        assert seen == [{"v": 7}]
        ring.write_arrow_batch(batch(7, 5), "v")
        ring.write_arrow_batch(pa.record_batch([pa.array([1.5, 2.5])], names=["t"]), "other")
        w.flush_to_disk()
        assert seen[-1] == {"v": 12, "other": 2}
        ring.write_arrow_batch(batch(12, 1), "v")
        w.close()  # the final flush is reported too
        assert seen[-1] == {"v": 13, "other": 2}
        assert len(seen) == 3
    np.testing.assert_array_equal(indices(tmp_path / "f.h5"), np.arange(13))


def test_run_reports_on_the_loop_and_flush_soon_does_not_wait_for_the_interval(
    ring_path: str, tmp_path: Path
) -> None:
    async def main() -> list[dict[str, int]]:
        got: list[dict[str, int]] = []
        flushed = anyio.Event()

        async def on_flush(rows: dict[str, int]) -> None:
            await anyio.lowlevel.checkpoint()  # (awaited: a coroutine function works)
            got.append(rows)
            flushed.set()

        with RingBuffer.create(ring_path, capacity_mb=4) as ring:
            # An interval far longer than the test may take: only flush_soon can flush.
            w = HDF5Writer(tmp_path / "f.h5", ring, flush_interval=3600, on_flush=on_flush)
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(w.run)
                    for point in range(5):
                        ring.write_arrow_batch(batch(point * 3, 3), "v")
                        w.flush_soon()
                        await flushed.wait()
                        flushed = anyio.Event()
                        assert got[-1] == {"v": 3 * (point + 1)}
                    await w.stop()
        return got

    got = anyio.run(main)
    assert [g["v"] for g in got] == [3, 6, 9, 12, 15]
    np.testing.assert_array_equal(indices(tmp_path / "f.h5"), np.arange(15))


def test_schemas_make_the_datasets_before_the_first_record(ring_path: str, tmp_path: Path) -> None:
    cam = pa.schema(
        [pa.field("timestamp", pa.timestamp("ns")), pa.field("frame", FRAME), pa.field("gain", pa.float32())]
    )
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        w = HDF5Writer(tmp_path / "s.h5", ring, schemas={"cam": cam})
        info = {d.column: d for d in w.datasets("cam")}
        assert set(info) == {"timestamp", "frame", "gain", "time"}
        assert info["frame"].path == "/measurements/cam/frame"
        assert info["frame"].dtype == np.uint16 and info["frame"].shape == (6, 4)
        assert info["frame"].chunks == (1, 6, 4)
        assert info["gain"].dtype == np.float32 and info["gain"].shape == ()
        assert info["gain"].chunks[0] >= 1 and info["gain"].validity is None
        assert info["timestamp"].dtype == np.int64
        with h5py.File(tmp_path / "s.h5", "r", libver="latest", swmr=True) as f:  # there, empty
            assert f["measurements/cam/frame"].shape == (0, 6, 4)
        frames = np.arange(2 * 24, dtype=np.uint16).reshape(2, 6, 4)
        ring.write_arrow_batch(
            pa.record_batch(
                [
                    pa.array([1, 2], pa.timestamp("ns")),
                    pa.FixedShapeTensorArray.from_numpy_ndarray(frames),
                    pa.array([1.0, 2.0], pa.float32()),
                ],
                schema=cam,
            ),
            "cam",
        )
        w.flush_to_disk()
        assert {d.column: d.path for d in w.datasets("cam")}["frame"] == "/measurements/cam/frame"
        with pytest.raises(KeyError, match="stream 'nope' has no datasets"):
            w.datasets("nope")
        w.close()
        with pytest.raises(ValueError, match="no open file"):
            w.datasets("cam")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["measurements/cam/frame"][:], frames)
        assert "frame__2" not in f["measurements/cam"]  # the records went into the same datasets


def test_stream_metadata_becomes_group_attributes(ring_path: str, tmp_path: Path) -> None:
    schema = SCHEMA.with_metadata({"bluesky.run_uid": "abc", "NX_class": "not ours", "scan\0id": "7"})
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        ring.write_arrow_batch(batch(0).replace_schema_metadata(schema.metadata), "v")
        with HDF5Writer(tmp_path / "m.h5", ring):
            pass
    with h5py.File(tmp_path / "m.h5", "r") as f:
        g = f["measurements/v"]
        assert g.attrs["bluesky.run_uid"] == "abc"
        assert g.attrs["NX_class"] == "NXdata"  # the writer's own attributes are not overridden
        assert g.attrs["scan\u2400id"] == "7"


def test_rotate_puts_each_run_in_its_own_file(ring_path: str, tmp_path: Path) -> None:
    one, two, three = (tmp_path / f"run{k}.h5" for k in (1, 2, 3))
    seen: list[dict[str, int]] = []
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        w = HDF5Writer(one, ring, metadata={"run": 1}, on_flush=seen.append)
        for k in range(3):
            ring.write_arrow_batch(batch(k * 10), "v")
        w.flush_to_disk()
        ring.write_arrow_batch(batch(30), "v")  # still run 1: not flushed yet
        w.rotate(two, {"run": 2}, final_metadata={"exit_status": "success", "num_events": 4})
        assert w.path == str(two) and w.last_file_records == 4
        boundary = ring.records_written
        for k in range(4, 6):
            ring.write_arrow_batch(batch(k * 10), "v")
        ring.write_arrow_batch(batch(1000, 2), "late")  # a stream run 1 never had
        # An explicit boundary that has not been reached when rotate() is called: what comes
        # before it, even later, is this file's.
        w.rotate(None, at=boundary + 4, final_metadata={"exit_status": "abort"})
        ring.write_arrow_batch(batch(60), "v")  # the 4th record of run 2
        ring.write_arrow_batch(batch(70), "v")  # written while the writer holds no file
        assert w.records_pending == 2
        w.rotate(three, {"run": 3})
        ring.write_arrow_batch(batch(80), "v")
        w.close()
    np.testing.assert_array_equal(indices(one), np.arange(40))
    # rotate(None, at=...) closes the file at once: records below `at` that were not written
    # yet are not lost, they go to the next file (with everything from `at` on).
    np.testing.assert_array_equal(indices(two), np.arange(40, 60))
    np.testing.assert_array_equal(indices(two, "late"), [1000, 1001])
    np.testing.assert_array_equal(indices(three), np.arange(60, 90))
    assert metadata_json(one) == {"run": 1}
    assert metadata_json(one, "final_json") == {"exit_status": "success", "num_events": 4}
    with h5py.File(one, "r") as f:
        assert f["measurements/metadata/exit_status"][()] == b"success"
        assert f["measurements/metadata/num_events"][()] == 4
        assert f["rust_daq/streams/v"][2] == 0  # nothing lost
    assert metadata_json(two) == {"run": 2}
    assert metadata_json(two, "final_json") == {"exit_status": "abort"}
    assert metadata_json(three) == {"run": 3}
    # on_flush: each file's rows, the closing flush of each included (a rotated file makes
    # no datasets of the streams of earlier runs: "late" is not in the third).
    assert seen == [{"v": 30}, {"v": 40}, {"v": 20, "late": 2}, {"v": 30}]
    with h5py.File(three, "r") as f:
        assert "late" not in f["measurements"]


def test_rotate_at_a_boundary_already_flushed_is_refused(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        with HDF5Writer(tmp_path / "a.h5", ring) as w:
            for k in range(3):
                ring.write_arrow_batch(batch(k * 10), "v")
            w.flush_to_disk()
            with pytest.raises(ValueError, match=r"rotate\(at=1\): .* already holds the records up to 2"):
                w.rotate(tmp_path / "b.h5", at=1)
            assert w.path == str(tmp_path / "a.h5")  # nothing changed
            ring.write_arrow_batch(batch(30), "v")
    np.testing.assert_array_equal(indices(tmp_path / "a.h5"), np.arange(40))
    assert not (tmp_path / "b.h5").exists()


def test_rotate_to_a_bad_path_leaves_no_file_and_loses_nothing(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        w = HDF5Writer(tmp_path / "a.h5", ring)
        ring.write_arrow_batch(batch(0), "v")
        with pytest.raises(FileNotFoundError, match="does not exist"):
            w.rotate(tmp_path / "missing" / "b.h5")
        ring.write_arrow_batch(batch(10), "v")
        w.flush_to_disk()  # no file: nothing is taken from the ring
        w.rotate(tmp_path / "c.h5")
        w.close()
        with pytest.raises(ValueError, match="closed"):
            w.rotate(tmp_path / "d.h5")
    np.testing.assert_array_equal(indices(tmp_path / "a.h5"), np.arange(10))
    np.testing.assert_array_equal(indices(tmp_path / "c.h5"), np.arange(10, 20))


def test_rotate_process(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        ring.write_arrow_batch(batch(-10), "v")  # before the writer: not this run's
        p = start_process(
            WriterOptions(ring=ring_path, output=str(tmp_path / "p1.h5"), start="now", flush_interval=0.05)
        )
        try:
            for k in range(3):
                ring.write_arrow_batch(batch(k * 10), "v")
            # (the writer may have flushed them already: a rotation takes what the ring holds
            # when the writer gets it; the next run writes only after it returns)
            assert rotate_process(p, tmp_path / "p2.h5", {"scan_id": 2}, final_metadata={"a": 1}) == 3
            ring.write_arrow_batch(batch(30), "v")
            with pytest.raises(RustDaqError, match="could not rotate: .*does not exist"):
                rotate_process(p, tmp_path / "nowhere" / "p3.h5")
            ring.write_arrow_batch(batch(40), "v")  # no file now: it waits in the ring
            assert rotate_process(p, tmp_path / "p3.h5") == 0  # (the failed rotation closed p2.h5)
            p.stdin.write("not json\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
            assert json.loads(p.stdout.readline()) == {  # type: ignore[union-attr]
                "ok": False,
                "error": "a command must be one JSON object per line (Expecting value: line 1 column 1 (char 0))",
            }
            ring.write_arrow_batch(batch(50), "v")
        finally:
            code, err = stop_process(p)
        assert code == 0, err
    np.testing.assert_array_equal(indices(tmp_path / "p1.h5"), np.arange(30))
    assert metadata_json(tmp_path / "p1.h5", "final_json") == {"a": 1}
    np.testing.assert_array_equal(indices(tmp_path / "p2.h5"), np.arange(30, 40))
    assert metadata_json(tmp_path / "p2.h5") == {"scan_id": 2}
    np.testing.assert_array_equal(indices(tmp_path / "p3.h5"), np.arange(40, 60))


def test_rotate_process_says_when_the_writer_is_gone(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4):
        p = start_process(WriterOptions(ring=ring_path, output=str(tmp_path / "k.h5")))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        with pytest.raises(RustDaqError, match="has exited .*exit status -9"):
            rotate_process(p, tmp_path / "k2.h5", timeout=30)
        p.communicate(timeout=30)


def test_a_rotated_file_holds_only_its_run(ring_path: str, tmp_path: Path) -> None:
    """What another producer writes between two runs (rotate(None), then rotate(path, at=...))
    is no file's; a stream whose current schema in the ring is an earlier run's (a column the
    next run does not have) gets no datasets of that schema in the next file."""
    with_motor = pa.schema([pa.field("index", pa.int64()), pa.field("motor", pa.float64())])
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        w = HDF5Writer(one, ring, start="now")
        ring.write_arrow_batch(pa.record_batch([[0, 1], [0.5, 1.5]], schema=with_motor), "v")
        w.rotate(None, at=ring.records_written, final_metadata={"exit_status": "success"})
        ring.write_arrow_batch(batch(99, 1), "between")  # between the runs
        w.rotate(two, {"run": 2}, at=ring.records_written)
        ring.write_arrow_batch(batch(10, 3), "v")
        w.close()
    np.testing.assert_array_equal(indices(one), [0, 1])
    with h5py.File(two, "r") as f:
        assert sorted(f["measurements"]) == ["end_time", "metadata", "start_time", "v"]
        assert "motor" not in f["measurements/v"]
        np.testing.assert_array_equal(f["measurements/v/index"][:], [10, 11, 12])


def test_a_file_started_now_keeps_its_start_across_a_crash(ring_path: str, tmp_path: Path) -> None:
    out = tmp_path / "now.h5"
    options = WriterOptions(ring=ring_path, output=str(out), start="now", flush_interval=3600)
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        for k in range(3):  # an earlier run's records, never drained: read_tail stays at 0
            ring.write_arrow_batch(batch(k * 10), "v")
        p = start_process(options)
        ring.write_arrow_batch(batch(1000), "v")
        p.send_signal(signal.SIGKILL)  # before its first commit
        p.communicate(timeout=30)
        ring.write_arrow_batch(batch(1010), "v")
        p = start_process(options)  # resumed: it starts where the file started, not at the tail
        code, err = stop_process(p)
        assert code == 0, err
    np.testing.assert_array_equal(indices(out), np.arange(1000, 1020))


def test_a_failed_rotation_does_not_make_the_next_file_take_the_last_ones_records(
    ring_path: str, tmp_path: Path
) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        w = HDF5Writer(tmp_path / "a.h5", ring)
        ring.write_arrow_batch(batch(0), "v")
        ring.write_arrow_batch(batch(10), "v")  # the next run's, already in the ring
        with pytest.raises(FileNotFoundError):
            w.rotate(tmp_path / "missing" / "b.h5", at=1)
        w.rotate(tmp_path / "c.h5")
        w.close()
    np.testing.assert_array_equal(indices(tmp_path / "a.h5"), np.arange(10))
    np.testing.assert_array_equal(indices(tmp_path / "c.h5"), np.arange(10, 20))


def test_flush_calls_on_flush_on_the_callers_loop(ring_path: str, tmp_path: Path) -> None:
    import threading

    calls: list[tuple[str, dict[str, int]]] = []

    async def on_flush(rows: dict[str, int]) -> None:
        await anyio.lowlevel.checkpoint()
        calls.append((threading.current_thread().name, rows))

    async def main() -> None:
        with RingBuffer.create(ring_path, capacity_mb=4) as ring:
            w = HDF5Writer(tmp_path / "f.h5", ring, on_flush=on_flush)
            ring.write_arrow_batch(batch(0, 3), "v")
            assert await w.flush() == 1  # in a worker thread; on_flush awaited here
            ring.write_arrow_batch(batch(3, 2), "v")
            assert await w.flush(in_thread=False) == 1
            await w.stop()

    anyio.run(main)
    me = threading.current_thread().name
    assert calls[:2] == [(me, {"v": 3}), (me, {"v": 5})]


def test_records_pending_of_a_file_started_now_counts_only_its_own(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        for k in range(5):
            ring.write_arrow_batch(batch(k * 10), "v")
        w = HDF5Writer(tmp_path / "p.h5", ring, start="now")
        assert w.records_pending == 0
        ring.write_arrow_batch(batch(50), "v")
        assert w.records_pending == 1
        w.close()
        assert w.records_pending == 0


def test_a_file_started_now_survives_kills_at_random_moments(ring_path: str, tmp_path: Path) -> None:
    import random
    import time

    rng = random.Random(17)
    out = tmp_path / "now.h5"
    options = WriterOptions(ring=ring_path, output=str(out), start="now", flush_interval=0.02)
    with RingBuffer.create(ring_path, capacity_mb=32) as ring:
        for k in range(20):  # an earlier run's, never drained
            ring.write_arrow_batch(batch(-1000 + k * 10), "v")
        n = 0
        for _round in range(5):
            p = start_process(options)
            deadline = time.monotonic() + rng.uniform(0.1, 0.4)
            while time.monotonic() < deadline:
                ring.write_arrow_batch(batch(n * 10), "v")
                n += 1
                time.sleep(0.001)
            p.send_signal(signal.SIGKILL)
            p.communicate(timeout=30)
        code, err = stop_process(start_process(options))
        assert code == 0, err
    # Every record of this run exactly once, in order; none of the earlier run's.
    np.testing.assert_array_equal(indices(out), np.arange(n * 10))
