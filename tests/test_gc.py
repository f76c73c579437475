"""The cyclic collector around the writer's passes (rust_daq._gc.paused): no collection while
a pass holds its records, the collector back afterwards, also after a pass that failed, and
nothing changed for a collector someone else disabled."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pytest

from rust_daq import HDF5Writer, RingBuffer
from rust_daq._gc import paused

STREAMS, RECORDS, ROWS = 200, 20, 10


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the collections that start while the test runs."""
    seen: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(note)
    yield seen
    gc.callbacks.remove(note)


def _fill(ring: RingBuffer) -> None:
    for k in range(RECORDS):
        for s in range(STREAMS):
            value = pa.array(s * 1000.0 + k * ROWS + np.arange(ROWS, dtype=np.float64))
            ring.write_arrow_batch(pa.record_batch({"value": value}), f"pv{s}")


def test_no_collection_runs_during_a_pass_and_the_collector_is_back_after(
    ring_path: str, tmp_path: Path, collections: list[int]
) -> None:
    assert gc.isenabled()
    out = str(tmp_path / "many.h5")
    with RingBuffer.create(ring_path, capacity_mb=64) as ring:
        w = HDF5Writer(out, ring, swmr=False)
        _fill(ring)
        w.flush_to_disk()  # (the first pass makes every group and dataset)
        _fill(ring)
        before = len(collections)
        assert w.flush_to_disk() == STREAMS * RECORDS
        assert collections[before:] == []
        assert gc.isenabled()
        _fill(ring)
        gc.disable()  # someone else's choice: kept
        try:
            assert w.flush_to_disk() == STREAMS * RECORDS
            assert not gc.isenabled()
        finally:
            gc.enable()
        w.close()
    with h5py.File(out, "r") as f:
        for s in (0, STREAMS - 1):
            v = f[f"measurements/pv{s}/value"][:]
            assert len(v) == 3 * RECORDS * ROWS
            np.testing.assert_array_equal(v[-ROWS:], s * 1000.0 + (RECORDS - 1) * ROWS + np.arange(ROWS))


def test_an_unpaused_pass_of_that_size_collects(ring_path: str, collections: list[int]) -> None:
    """The control for the test above: the records of such a pass, decoded and held as a pass
    holds them, start collections of the collector."""
    from rust_daq._records import RecordDecoder, SchemaTable
    from rust_daq.hdf5.columns import pieces_of

    with RingBuffer.create(ring_path, capacity_mb=64) as ring:
        _fill(ring)
        decoder = RecordDecoder(SchemaTable(ring))
        held = []
        for rec in ring.reader("oldest").read(copy=False):
            d = decoder.decode(rec)
            assert d is not None and d.batch is not None
            held.append((rec, pieces_of(d.batch)))
    assert len(held) == STREAMS * RECORDS
    assert collections, "no collection: the test above would pass without the pause"


def test_pauses_nest_across_threads() -> None:
    assert gc.isenabled()
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with paused():
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    with paused():
        assert not gc.isenabled()
        t.start()
        assert entered.wait(10)
    assert not gc.isenabled()  # (the other thread's pass goes on)
    leave.set()
    t.join(10)
    assert gc.isenabled()


def test_a_failed_pass_enables_the_collector_again(ring_path: str, tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for a full disk: the pass fails with OSError, the collector runs
    again, and the next pass (the limit lifted) writes every record."""
    out = str(tmp_path / "full.h5")
    code = textwrap.dedent(
        f"""
        import gc, os, resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from rust_daq import HDF5Writer, RingBuffer
        ring = RingBuffer.open({ring_path!r})
        w = HDF5Writer({out!r}, ring, swmr=False)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            w.flush_to_disk()
            print("no error")
        except OSError as e:
            print("failed", e.errno is not None, gc.isenabled())
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        print("resumed", w.flush_to_disk(), gc.isenabled())
        w.close()
        """
    )
    with RingBuffer.create(ring_path, capacity_mb=64) as ring:
        _fill(ring)
        got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split("\n")[:2] == ["failed True True", f"resumed {STREAMS * RECORDS} True"], got.stdout
