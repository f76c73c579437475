"""read_progress: a writer's file by its last progress marker, as a typed value, read the way
any other process would (also while the writer runs, or after it was killed)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest

from rust_daq import HDF5Writer, IncompatibleFileError, RingBuffer
from rust_daq.hdf5 import Progress, StreamProgress, read_progress
from rust_daq.hdf5.layouts import AppendLayout

from processes import writer_process

_REFUSED = 1234


def _x(i: int, rows: int = 10) -> pa.RecordBatch:
    return pa.record_batch({"x": pa.array(np.arange(i * rows, (i + 1) * rows), pa.int64())})


@pytest.fixture
def h5_path(tmp_path: Path) -> str:
    return str(tmp_path / "run.h5")


def test_read_progress_says_what_the_writer_wrote(
    ring_path: str, h5_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts, losses, quarantined and skipped records, per stream, equal the writer's own."""
    original = AppendLayout.write

    def refuse(self, f, structural, book, items):  # type: ignore[no-untyped-def]
        if any(_REFUSED in it.pieces[0].data.tolist() for it in items):
            raise ValueError("HDF5 refuses this one")
        return original(self, f, structural, book, items)

    monkeypatch.setattr(AppendLayout, "write", refuse)
    with RingBuffer.create(ring_path, capacity_bytes=64 * 1024) as ring:
        w = HDF5Writer(h5_path, ring)
        for i in range(300):  # a burst the ring cannot hold: the oldest records are lost
            ring.write_arrow_batch(_x(i, 100), "big")
        ring.write(b"plain")  # not Arrow: skipped
        w.flush_to_disk()
        for i in range(5):
            ring.write_arrow_batch(pa.record_batch({"x": [_REFUSED if i == 2 else i]}), "small")
        w.flush_to_disk()
        stats = w.stream_stats()
        expected_totals = (w.records_written, w.records_lost, w.batch_count, w.records_unwritable)
        skipped = w.records_skipped
        w.close()
    p = read_progress(h5_path)
    assert isinstance(p, Progress)
    assert (p.records, p.lost, p.flushes, p.unwritable) == expected_totals
    assert p.skipped == skipped == 1
    assert p.lost > 0 and p.unwritable == 1 and p.records == 300 - p.lost + 4
    assert p.last_seq == 300 + 1 + 5 - 1  # every record of the ring, the plain one included
    assert p.marker == 2
    assert set(p.streams) == {"big", "small"}
    for name, s in p.streams.items():
        assert isinstance(s, StreamProgress)
        assert {"records": s.records, "lost": s.lost, "rows": s.rows, "unwritable": s.unwritable} == stats[
            name
        ]
    assert p.streams["big"].lost == p.lost and p.streams["big"].next_seq == 300
    assert p.streams["small"] == StreamProgress(rows=4, records=4, lost=0, next_seq=5, unwritable=1)
    with h5py.File(h5_path, "r") as f:
        assert f["measurements/big/x"].shape[0] == p.streams["big"].rows
        assert f["rust_daq/quarantine/seq"].shape[0] == p.unwritable


@pytest.mark.parametrize("layout", ["append", "batches"])
def test_read_progress_on_a_file_being_written(ring_path: str, h5_path: str, layout: str) -> None:
    """A running append writer (SWMR) is read from another process, at its last marker; a
    running batches writer (no SWMR: HDF5 refuses every reader) is a BlockingIOError."""
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        ring.write_arrow_batch(_x(0), "s")  # (known when the file opens: no leaving SWMR for it)
        p = writer_process(ring_path, h5_path, "--layout", layout, flush_interval=0.05)
        try:
            for i in range(1, 20):
                ring.write_arrow_batch(_x(i), "s")
            if layout == "batches":
                with pytest.raises(BlockingIOError, match="open for writing without SWMR"):
                    read_progress(h5_path)
            else:
                deadline = time.monotonic() + 30
                while (progress := read_progress(h5_path)).records < 20:
                    assert time.monotonic() < deadline, progress
                    time.sleep(0.05)
                assert progress.streams["s"].rows == 200 and progress.lost == 0
                assert progress.last_seq == 19
        finally:
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    assert read_progress(h5_path).streams["s"].records == 20


_KILLED_IN_COMMIT = """
import os, sys
from rust_daq import HDF5Writer, RingBuffer
from rust_daq.hdf5 import progress
ring = RingBuffer.open(sys.argv[1])
w = HDF5Writer(sys.argv[2], ring)
w.flush_to_disk()
print("flushed", flush=True)
sys.stdin.readline()
def die(f, books, fields, marker, handles=None):
    # The books in the next slot and the readable views are on disk; the marker is not.
    for b in books.values():
        f[progress.RESUME][b.group][marker % 2] = [*b.values(), marker]
        f[progress.STREAMS][b.group][...] = b.values()
    f.flush()
    os._exit(9)
progress.commit = die
w.flush_to_disk()
"""


def test_read_progress_of_a_writer_killed_before_its_marker(ring_path: str, h5_path: str) -> None:
    """The views and the newer slot ran ahead of the marker: the committed slot is what counts."""
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        for i in range(3):
            ring.write_arrow_batch(_x(i), "s")
        child = subprocess.Popen(
            [sys.executable, "-c", _KILLED_IN_COMMIT, ring_path, h5_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "flushed"
        for i in range(3, 5):
            ring.write_arrow_batch(_x(i), "s")
        child.communicate("go\n", timeout=60)
        assert child.returncode == 9
        with h5py.File(h5_path, "r", libver="latest", swmr=True) as f:
            assert f["rust_daq/streams/s"][()].tolist()[:2] == [50, 5], "the view ran ahead"
            assert f["measurements/s/x"].shape[0] == 50
        p = read_progress(h5_path)
        assert (p.records, p.last_seq, p.marker) == (3, 2, 1)
        assert p.streams["s"] == StreamProgress(rows=30, records=3, lost=0, next_seq=3, unwritable=0)
        with HDF5Writer(h5_path, ring) as w:  # a restart resumes from the same committed state
            assert w.stream_stats()["s"]["rows"] == 30
            w.flush_to_disk()
    p = read_progress(h5_path)
    assert p.streams["s"].records == 5 and p.records == 5 and p.marker == 2


def test_read_progress_refuses_other_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(IncompatibleFileError, match="not a rust-daq writer's file"):
        read_progress(plain)
    text = tmp_path / "notes.txt"
    text.write_text("not HDF5")
    with pytest.raises(IncompatibleFileError, match="not a readable HDF5 file"):
        read_progress(text)
    with pytest.raises(FileNotFoundError):
        read_progress(tmp_path / "missing.h5")
