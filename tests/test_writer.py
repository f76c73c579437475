"""The HDF5 writer: files read back exactly, both layouts, live SWMR readers, crashes and
restarts, overruns, both anyio backends, bad input."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import h5py
import numpy as np
import pyarrow as pa
import pytest

from rust_daq import HDF5Writer, IncompatibleFileError, RingBuffer
from rust_daq.hdf5.file import clear_consistency_flags
from rust_daq.writer import repair

from processes import writer_process

VOLT_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64()),
        pa.field("timestamp", pa.timestamp("ns"), metadata={"units": "ns"}),
        pa.field("voltage", pa.float64(), metadata={"units": "V"}),
    ]
)


def volts(i: int, rows: int = 100) -> pa.RecordBatch:
    idx = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
    return pa.record_batch(
        [idx, pa.array(1_700_000_000_000_000_000 + idx * 1000, pa.timestamp("ns")), np.sin(idx / 50.0)],
        schema=VOLT_SCHEMA,
    )


def frames(i: int, n: int = 2, h: int = 16, w: int = 24) -> pa.RecordBatch:
    stack = (np.arange(n * h * w, dtype=np.uint32).reshape(n, h, w) + i).astype(np.uint16)
    return pa.record_batch(
        [pa.array(np.arange(i * n, (i + 1) * n)), pa.FixedShapeTensorArray.from_numpy_ndarray(stack)],
        names=["frame_id", "frame"],
    )


@pytest.fixture
def h5_path(tmp_path: Path) -> str:
    return str(tmp_path / "run.h5")


def test_append_layout_reads_back_exactly(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        text = pa.record_batch(
            [pa.array(["ok", "ünïcödé", None]), pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.int16(), 2))],
            names=["status", "pair"],
        )
        for i in range(10):
            ring.write_arrow_batch(volts(i), "voltmeter")
            if i % 5 == 0:
                ring.write_arrow_batch(frames(i), "camera")
        ring.write_arrow_batch(text, "log")
        ring.write(b"plain bytes are not Arrow: skipped")
        with HDF5Writer(h5_path, ring, metadata={"sample": "Si-42", "temperature_K": 4.2}) as w:
            assert w.flush_to_disk() == 13
            assert w.records_skipped == 1
    with h5py.File(h5_path, "r") as f:
        v = f["measurements/voltmeter"]
        np.testing.assert_array_equal(v["index"][:], np.arange(1000))
        np.testing.assert_array_equal(v["voltage"][:], np.sin(np.arange(1000) / 50.0))
        assert v["timestamp"].dtype == np.int64 and v["timestamp"].attrs["units"] == "ns"
        assert v["timestamp"][0] == 1_700_000_000_000_000_000
        assert v["voltage"].attrs["units"] == "V" and v["voltage"].dtype == np.float64
        assert v.attrs["NX_class"] == "NXdata" and v.attrs["signal"] == "voltage"
        # The plot's axis: seconds since start_time, from the int64 ns timestamps (kept as they
        # are), an HDF5 dimension scale of every column (netCDF readers see one "time" dim).
        assert list(v.attrs["axes"]) == ["time"]
        start = dt.datetime.fromisoformat(f["measurements/start_time"][()].decode()).timestamp()
        np.testing.assert_allclose(v["time"][:], (v["timestamp"][:] / 1e9) - start, atol=1e-5)
        assert v["time"].attrs["units"] == "s" and v["time"].attrs["rust_daq_key"] == "axis"
        assert v["voltage"].dims[0][0].name == v["time"].name
        assert v["index"].dims[0][0].name == v["time"].name
        cam = f["measurements/camera/frame"]
        assert cam.shape == (4, 16, 24) and cam.dtype == np.uint16 and cam.chunks == (1, 16, 24)
        np.testing.assert_array_equal(cam[2:], frames(5).column("frame").to_numpy_ndarray())
        log = f["measurements/log"]
        assert [s.decode() for s in log["status"][:]] == ["ok", "ünïcödé", ""]
        assert log["status"].attrs["validity"] == "status__valid"
        np.testing.assert_array_equal(log["status__valid"][:], [1, 1, 0])  # the null is not data
        np.testing.assert_array_equal(log["pair"][:], [[1, 2], [3, 4], [5, 6]])
        assert f.attrs["default"] == "measurements" and f["measurements"].attrs["default"] == "voltmeter"
        assert json.loads(f["measurements/metadata/json"][()]) == {"sample": "Si-42", "temperature_K": 4.2}
        assert f["measurements/metadata/temperature_K"][()] == 4.2
        schema = json.loads(v.attrs["arrow_schema_json"])
        assert schema["fields"][2] == {
            "name": "voltage",
            "type": "double",
            "nullable": True,
            "metadata": {"units": "V"},
        }
        assert pa.ipc.read_schema(pa.py_buffer(v["arrow_schema"][:].tobytes())).equals(
            VOLT_SCHEMA, check_metadata=True
        )
        # last seq, records, lost, flushes, unwritable, skipped, marker
        assert list(f["rust_daq/progress"][()]) == [13, 13, 0, 1, 0, 1, 1]


def test_batches_layout_and_the_original_example(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        with HDF5Writer(h5_path, ring, layout="batches") as w:
            for i in range(3):
                ring.write_arrow_batch(volts(i), "voltmeter")
            w.flush_to_disk()
            ring.write_arrow_batch(volts(3), "voltmeter")
            w.flush_to_disk()
            assert w.batch_count == 2
    # The original system's example, verbatim:
    f = h5py.File(h5_path, "r")
    voltage = f["measurements/batch_000001"]["voltage"][:]
    f.close()
    np.testing.assert_array_equal(voltage, np.sin(np.arange(300) / 50.0))
    with h5py.File(h5_path, "r") as f:
        b1, b2 = f["measurements/batch_000001"], f["measurements/batch_000002"]
        assert (b1.attrs["stream"], b1.attrs["seq_first"], b1.attrs["seq_last"], b1.attrs["rows"]) == (
            "voltmeter",
            0,
            2,
            300,
        )
        assert (b2.attrs["seq_first"], b2.attrs["seq_last"]) == (3, 3)
        assert b1.attrs["position_last"] > b1.attrs["position_first"]
        assert json.loads(b1.attrs["arrow_schema_json"])["fields"][0]["name"] == "index"
        np.testing.assert_array_equal(b2["index"][:], np.arange(300, 400))


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools) not installed")
def test_h5dump_parses_both_layouts(ring_path: str, tmp_path: Path) -> None:
    for layout in ("append", "batches"):
        with RingBuffer.create(ring_path, capacity_mb=8, replace=True) as ring:
            ring.write_arrow_batch(volts(0, 5), "voltmeter")
            ring.write_arrow_batch(frames(0), "camera")
            path = str(tmp_path / f"{layout}.h5")
            HDF5Writer(path, ring, layout=layout).close()  # type: ignore[arg-type]
        out = subprocess.run(["h5dump", "-A", path], capture_output=True, text=True, check=True).stdout
        assert "voltage" in out and "frame" in out and 'ATTRIBUTE "units"' in out, out[:2000]
        dataset = "/measurements/" + ("voltmeter/index" if layout == "append" else "batch_000001/index")
        values = subprocess.run(
            ["h5dump", "-d", dataset, path], capture_output=True, text=True, check=True
        ).stdout
        assert "0, 1, 2, 3, 4" in values, values


def test_nexus_default_plot_is_found(ring_path: str, h5_path: str) -> None:
    nexusformat = pytest.importorskip("nexusformat.nexus")
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(volts(0), "voltmeter")
        HDF5Writer(h5_path, ring).close()
    root = nexusformat.nxload(h5_path)
    plot = root.plottable_data
    assert plot.nxname == "voltmeter"
    assert plot.nxsignal.nxname == "voltage"
    assert [a.nxname for a in plot.nxaxes] == ["time"]  # seconds since start_time
    root.nxfile.close()


def test_swmr_reader_in_another_process_sees_data_grow(ring_path: str, h5_path: str) -> None:
    ring = RingBuffer.create(ring_path, capacity_mb=8)
    ring.write_arrow_batch(volts(0), "voltmeter")
    w = HDF5Writer(h5_path, ring, swmr=True)
    w.flush_to_disk()
    reader = textwrap.dedent(
        f"""
        import h5py, time, sys
        f = h5py.File({h5_path!r}, "r", libver="latest", swmr=True)
        d = f["measurements/voltmeter/index"]
        print("ready", d.shape[0], flush=True)
        seen = [d.shape[0]]
        deadline = time.time() + 20
        while seen[-1] < 1000 and time.time() < deadline:
            time.sleep(0.02)
            d.refresh()
            if d.shape[0] != seen[-1]:
                seen.append(d.shape[0])
        print(" ".join(map(str, seen)), int(d[d.shape[0] - 1]), flush=True)
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", reader], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    assert p.stdout.readline().split() == ["ready", "100"]
    for i in range(1, 10):
        ring.write_arrow_batch(volts(i), "voltmeter")
        w.flush_to_disk()
        time.sleep(0.1)
    out, err = p.communicate(timeout=30)
    *sizes, last = (int(x) for x in out.split())
    assert sizes[0] == 100 and sizes[-1] == 1000 and len(sizes) >= 3, (out, err)
    assert sizes == sorted(sizes) and last == 999
    w.close()
    ring.close()


def test_new_stream_after_swmr_started_loses_nothing(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(volts(0), "voltmeter")
        with HDF5Writer(h5_path, ring) as w:
            w.flush_to_disk()
            assert w._file.swmr_mode
            ring.write_arrow_batch(frames(0), "camera")
            ring.write_arrow_batch(volts(1), "voltmeter")
            assert w.flush_to_disk() == 2
            assert w._file.swmr_mode, "back in SWMR mode"
    with h5py.File(h5_path, "r") as f:
        assert f["measurements/camera/frame"].shape == (2, 16, 24)
        np.testing.assert_array_equal(f["measurements/voltmeter/index"][:], np.arange(200))


def test_schema_change_adds_a_column(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring, HDF5Writer(h5_path, ring) as w:
        ring.write_arrow_batch(volts(0, 3), "dmm")
        w.flush_to_disk()
        extended = volts(1, 3).append_column("range", pa.array([10.0, 10.0, 100.0]))
        ring.write_arrow_batch(extended, "dmm")
        ring.write_arrow_batch(volts(2, 3), "dmm")
        w.flush_to_disk()
    with h5py.File(h5_path, "r") as f:
        g = f["measurements/dmm"]
        np.testing.assert_array_equal(g["index"][:], np.arange(9))
        # Rows without the column are NaN (never a 0 that reads as data) and marked absent.
        np.testing.assert_array_equal(g["range"][:], [np.nan] * 3 + [10, 10, 100] + [np.nan] * 3)
        np.testing.assert_array_equal(g[g["range"].attrs["validity"]][:], [0, 0, 0, 1, 1, 1, 0, 0, 0])
        assert g["range"].attrs["first_row"] == 3


def test_overruns_are_attributed_to_their_streams(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=64 * 1024) as ring:
        w = HDF5Writer(h5_path, ring)
        for i in range(300):  # the camera writes one record per three of the voltmeter
            ring.write_arrow_batch(volts(i, 20), "voltmeter")
            if i % 3 == 0:
                ring.write_arrow_batch(frames(i, n=1), "camera")
        w.flush_to_disk()
        stats = w.stream_stats()
        assert stats["voltmeter"]["records"] + stats["voltmeter"]["lost"] == 300
        assert stats["camera"]["records"] + stats["camera"]["lost"] == 100
        assert stats["voltmeter"]["lost"] + stats["camera"]["lost"] == w.records_lost > 0
        w.close()
    with h5py.File(h5_path, "r") as f:
        assert int(f["rust_daq/streams/camera"][2]) == stats["camera"]["lost"]
        assert f["measurements/camera/frame_id"].shape[0] == stats["camera"]["records"]


def test_overruns_are_counted_exactly(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=64 * 1024) as ring:
        w = HDF5Writer(h5_path, ring)
        n = 400  # ~1.8 KB each: the ring holds ~35 of them
        for i in range(n):
            ring.write_arrow_batch(volts(i), "voltmeter")
        written = w.flush_to_disk()
        assert w.records_lost > 0
        assert written + w.records_lost == n
        for i in range(n, n + 10):  # after the burst the writer keeps up: nothing else lost
            ring.write_arrow_batch(volts(i), "voltmeter")
            w.flush_to_disk()
        lost = w.records_lost
        assert w.stream_stats()["voltmeter"] == {
            "records": n + 10 - lost,
            "lost": lost,
            "rows": (n + 10 - lost) * 100,
            "unwritable": 0,
        }
        w.close()
    with h5py.File(h5_path, "r") as f:
        index = f["measurements/voltmeter/index"][:]
        assert len(index) == (n + 10 - lost) * 100
        assert list(f["rust_daq/progress"][()])[2] == lost
        rows, records, stream_lost, next_seq, unwritable = f["rust_daq/streams/voltmeter"][()]
        assert (records, stream_lost, next_seq) == (n + 10 - lost, lost, n + 10)
        np.testing.assert_array_equal(index[-1000:], np.arange((n) * 100, (n + 10) * 100))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_under_both_anyio_backends(ring_path: str, h5_path: str, backend: str) -> None:
    ring = RingBuffer.create(ring_path, capacity_mb=8)

    async def main() -> None:
        async with HDF5Writer(h5_path, ring, flush_interval=0.05) as w:
            async with anyio.create_task_group() as tg:
                tg.start_soon(w.run)
                for i in range(20):
                    ring.write_arrow_batch(volts(i, 10), "voltmeter")
                    await anyio.sleep(0.01)
                await w.stop()  # final drain and flush, file closed
            assert w.closed

    anyio.run(main, backend=backend)
    ring.close()
    with h5py.File(h5_path, "r") as f:
        np.testing.assert_array_equal(f["measurements/voltmeter/index"][:], np.arange(200))


def test_cancellation_flushes_and_closes(ring_path: str, h5_path: str) -> None:
    ring = RingBuffer.create(ring_path, capacity_mb=8)

    async def main() -> None:
        w = HDF5Writer(h5_path, ring, flush_interval=10)
        with anyio.move_on_after(0.2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(w.run)
                await anyio.sleep(0.05)
                for i in range(5):
                    ring.write_arrow_batch(volts(i, 10), "voltmeter")
                await anyio.sleep(10)
        assert w.closed

    anyio.run(main)
    ring.close()
    with h5py.File(h5_path, "r") as f:
        assert f["measurements/voltmeter/index"].shape == (50,)


def _writer_process(ring_path: str, h5_path: str, interval: float = 0.02) -> subprocess.Popen[str]:
    return writer_process(ring_path, h5_path, flush_interval=interval)


def test_writer_process_stops_cleanly_on_sigterm(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        p = _writer_process(ring_path, h5_path, interval=5.0)
        for i in range(7):
            ring.write_arrow_batch(volts(i), "voltmeter")
        time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "stopped: 7 records" in err
    with h5py.File(h5_path, "r") as f:  # a plain open: the clean exit left no flags behind
        np.testing.assert_array_equal(f["measurements/voltmeter/index"][:], np.arange(700))


def test_writer_killed_and_restarted_keeps_every_record_exactly_once(ring_path: str, h5_path: str) -> None:
    rng = random.Random(4)
    ring = RingBuffer.create(ring_path, capacity_mb=32)
    n = 0
    for _round in range(5):
        p = _writer_process(ring_path, h5_path)
        deadline = time.monotonic() + rng.uniform(0.2, 0.6)
        while time.monotonic() < deadline:
            ring.write_arrow_batch(volts(n, 50), "voltmeter")
            n += 1
            time.sleep(0.001)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=10)
        # After every kill the file opens with h5py (SWMR readers need no repair at all).
        with h5py.File(h5_path, "r", libver="latest", swmr=True) as f:
            got = f["measurements/voltmeter/index"]
            committed = int(f["rust_daq/streams/voltmeter"][0])
            assert got.shape[0] >= committed
            np.testing.assert_array_equal(got[:committed], np.arange(committed))
    p = _writer_process(ring_path, h5_path)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert ring.records_lost == 0
    ring.close()
    with h5py.File(h5_path, "r") as f:
        np.testing.assert_array_equal(f["measurements/voltmeter/index"][:], np.arange(n * 50))
        assert f["rust_daq/progress"][0] == n - 1


def test_consistency_flags_are_repaired(tmp_path: Path) -> None:
    path = str(tmp_path / "killed.h5")
    code = textwrap.dedent(
        f"""
        import h5py, os, signal
        f = h5py.File({path!r}, "w", libver="latest")
        f.create_dataset("x", data=[1, 2, 3], maxshape=(None,))
        f.swmr_mode = True
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    with pytest.raises(OSError, match="h5clear"):
        h5py.File(path, "r")
    r = subprocess.run(
        [sys.executable, "-m", "rust_daq.writer", "--repair", path], capture_output=True, text=True
    )
    assert r.returncode == 0 and "repaired" in r.stdout
    with h5py.File(path, "r") as f:
        assert list(f["x"][:]) == [1, 2, 3]
    assert repair(path) is False
    assert clear_consistency_flags(path) is False


# -- bad input ------------------------------------------------------------------------------


def test_bad_outputs_and_arguments(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            HDF5Writer(tmp_path / "no" / "dir" / "x.h5", ring)
        with pytest.raises(ValueError, match="unknown layout"):
            HDF5Writer(tmp_path / "x.h5", ring, layout="columns")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="flush_interval"):
            HDF5Writer(tmp_path / "x.h5", ring, flush_interval=0)
        with pytest.raises(ValueError, match="unknown compression"):
            HDF5Writer(tmp_path / "x.h5", ring, compression="rar")
        not_h5 = tmp_path / "notes.h5"
        not_h5.write_text("not hdf5")
        with pytest.raises(IncompatibleFileError, match="not a readable HDF5 file"):
            HDF5Writer(not_h5, ring)
        HDF5Writer(tmp_path / "append.h5", ring).close()
        with pytest.raises(IncompatibleFileError, match="holds layout 'append'"):
            HDF5Writer(tmp_path / "append.h5", ring, layout="batches")
        with h5py.File(tmp_path / "other.h5", "w") as f:
            f["x"] = 1
        with pytest.raises(IncompatibleFileError, match="holds no rust-daq run"):
            HDF5Writer(tmp_path / "other.h5", ring)
        assert not (tmp_path / "x.h5").exists()


def test_a_file_from_another_ring_run_is_refused(ring_path: str, tmp_path: Path) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        HDF5Writer(tmp_path / "run.h5", ring).close()
    with RingBuffer.create(ring_path, capacity_mb=2, replace=True) as ring:
        with pytest.raises(IncompatibleFileError, match="holds ring session"):
            HDF5Writer(tmp_path / "run.h5", ring)


def test_a_file_locked_by_another_writer(ring_path: str, h5_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        p = _writer_process(ring_path, h5_path, interval=5.0)
        try:
            with pytest.raises(BlockingIOError, match="open for writing by another process"):
                HDF5Writer(h5_path, ring)
        finally:
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=30)


def test_output_directory_not_writable(ring_path: str) -> None:
    import tempfile

    base = tempfile.mkdtemp(prefix="rdaq-ro-", dir="/tmp")  # traversable by any user
    os.chmod(base, 0o755)
    locked = Path(base) / "locked"
    locked.mkdir(mode=0o555)
    uid = os.geteuid()
    try:
        with RingBuffer.create(ring_path, capacity_mb=1) as ring:
            if uid == 0:
                os.seteuid(65534)  # root ignores permission bits: test as another user
            try:
                with pytest.raises(PermissionError, match="not writable"):
                    HDF5Writer(locked / "x.h5", ring)
            finally:
                if uid == 0:
                    os.seteuid(0)
    finally:
        shutil.rmtree(base)


def test_writer_process_reports_bad_arguments(ring_path: str, tmp_path: Path) -> None:
    RingBuffer.create(ring_path, capacity_mb=1).close()
    r = subprocess.run(
        [sys.executable, "-m", "rust_daq.writer", "--ring", ring_path, "--output", str(tmp_path / "no/x.h5")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "rust_daq.writer", "--output", "x.h5"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "--ring" in r.stderr


@pytest.mark.parametrize("compression", ["gzip", "gzip:9", "lzf"])
def test_built_in_compression_round_trips(ring_path: str, tmp_path: Path, compression: str) -> None:
    path = tmp_path / f"{compression.replace(':', '')}.h5"
    with RingBuffer.create(ring_path, capacity_mb=8, replace=True) as ring:
        for i in range(5):
            ring.write_arrow_batch(volts(i), "voltmeter")
        ring.write_arrow_batch(frames(0), "camera")
        HDF5Writer(path, ring, compression=compression).close()
    with h5py.File(path, "r") as f:
        v = f["measurements/voltmeter/voltage"]
        assert v.compression == compression.split(":")[0]
        np.testing.assert_array_equal(v[:], np.sin(np.arange(500) / 50.0))
        np.testing.assert_array_equal(
            f["measurements/camera/frame"][:], frames(0).column("frame").to_numpy_ndarray()
        )


def test_plugin_compression_round_trips(ring_path: str, h5_path: str) -> None:
    pytest.importorskip("hdf5plugin")
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(volts(0), "voltmeter")
        HDF5Writer(h5_path, ring, compression="zstd").close()
    with h5py.File(h5_path, "r") as f:
        np.testing.assert_array_equal(f["measurements/voltmeter/index"][:], np.arange(100))


def test_disk_full_commits_nothing_and_resumes_when_space_returns(ring_path: str, h5_path: str) -> None:
    """RLIMIT_FSIZE stands in for a full disk: the writer's flush fails, the ring's read_tail
    does not move, and once the limit is lifted every record lands exactly once."""
    code = textwrap.dedent(
        f"""
        import os, resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        from rust_daq import HDF5Writer, RingBuffer
        ring = RingBuffer.open({ring_path!r})
        w = HDF5Writer({h5_path!r}, ring)
        print("first", w.flush_to_disk(), ring.read_tail, flush=True)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize({h5_path!r}) + 4096, hard))
        print("limited", flush=True)
        sys.stdin.readline()
        tail = ring.read_tail
        try:
            w.flush_to_disk()
            print("no error", flush=True)
        except OSError as e:
            import h5py
            with h5py.File({h5_path!r}, "r", libver="latest", swmr=True):  # still readable
                pass
            print("failed", ring.read_tail == tail, e.errno, flush=True)
        try:
            w.flush_to_disk()
        except OSError:
            print("still failing", ring.read_tail == tail, flush=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        print("resumed", w.flush_to_disk(), flush=True)
        w.close()
        """
    )
    with RingBuffer.create(ring_path, capacity_mb=32) as ring:
        for i in range(3):
            ring.write_arrow_batch(volts(i), "voltmeter")
        p = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().split()[:2] == ["first", "3"]
        assert p.stdout.readline().strip() == "limited"
        for i in range(3, 200):  # ~16 KB of new data per record: far past the limit
            ring.write_arrow_batch(volts(i, 1000), "voltmeter")
        p.stdin.write("\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
        lines = out.splitlines()
        assert lines[0] == "failed True 27", (out, err)  # EFBIG, refused before writing
        assert lines[1] == "still failing True"
        assert lines[2] == "resumed 197"
        assert p.returncode == 0, err
    with h5py.File(h5_path, "r") as f:
        index = f["measurements/voltmeter/index"][:]
        expected = np.concatenate(
            [np.arange(300), *[np.arange(i * 1000, (i + 1) * 1000) for i in range(3, 200)]]
        )
        np.testing.assert_array_equal(index, expected)


def test_a_file_left_short_by_a_failed_write_is_repaired(ring_path: str, h5_path: str) -> None:
    """If space vanishes between the writer's check and HDF5's write, the superblock can record
    an end of file beyond the file's end: the writer extends the file and trims to its marker."""
    from rust_daq.hdf5.file import _lookup3

    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        w = HDF5Writer(h5_path, ring, swmr=False)
        ring.write_arrow_batch(volts(0), "voltmeter")
        w.flush_to_disk()
        w.close()
    size = os.path.getsize(h5_path)
    with open(h5_path, "r+b") as f:  # superblock v2/3: end-of-file address at 12 + 2 * 8
        sb = bytearray(f.read(48))
        sb[28:36] = (size + (1 << 20)).to_bytes(8, "little")
        sb[44:48] = _lookup3(bytes(sb[:44])).to_bytes(4, "little")
        f.seek(0)
        f.write(sb)
    with pytest.raises(OSError, match="truncated file"):
        h5py.File(h5_path, "r")
    with RingBuffer.open(ring_path, writable=True) as ring:
        ring.write_arrow_batch(volts(1), "voltmeter")
        with HDF5Writer(h5_path, ring) as w2:
            assert w2.flush_to_disk() == 1
    with h5py.File(h5_path, "r") as f:
        np.testing.assert_array_equal(f["measurements/voltmeter/index"][:], np.arange(200))


def test_bool_tensors_and_descriptive_field_metadata(ring_path: str, h5_path: str) -> None:
    """A fixed_shape_tensor of bool (to_numpy_ndarray refuses it: the record was quarantined)
    is written like any tensor; source, precision, limits and choices in a field's metadata
    become dataset attributes beside units (what an ophyd-async DataKey describes)."""
    masks = np.array([[[True, False, True], [False, False, True]], [[False] * 3, [True] * 3]])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(masks.reshape(-1)), 6)
    tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.bool_(), [2, 3]), storage)
    md = {"units": "V", "source": "ca://X:Y", "precision": "3", "limits": '{"display": {"low": 0}}'}
    schema = pa.schema([pa.field("mask", tensor.type), pa.field("v", pa.float64(), metadata=md)])
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        ring.write_arrow_batch(pa.record_batch([tensor, pa.array([1.0, 2.0])], schema=schema), "s")
        with HDF5Writer(h5_path, ring) as w:
            w.flush_to_disk()
            assert w.records_unwritable == 0
    with h5py.File(h5_path) as f:
        g = f["measurements/s"]
        assert g["mask"].dtype == np.bool_ and g["mask"].shape == (2, 2, 3)
        np.testing.assert_array_equal(g["mask"][:], masks)
        attrs = dict(g["v"].attrs)
        assert (attrs["units"], attrs["source"], attrs["precision"]) == ("V", "ca://X:Y", "3")
        assert json.loads(attrs["limits"]) == {"display": {"low": 0}}
        assert "source" not in g["mask"].attrs
