"""The cyclic collector around the writer's passes (rust_daq._gc.paused): no collection while
a pass holds its records, the collector back afterwards, also after a pass that failed, and
nothing changed for a collector someone else disabled."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import textwrap
import threading
import time
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


def _pass_collections(ring_path: str, tmp_path: Path, collections: list[int]) -> list[int]:
    """The collections that start during a steady pass of STREAMS x RECORDS records."""
    out = str(tmp_path / "many.h5")
    with RingBuffer.create(ring_path, capacity_mb=64) as ring:
        w = HDF5Writer(out, ring, swmr=False)
        _fill(ring)
        w.flush_to_disk()  # (the first pass makes every group and dataset)
        _fill(ring)
        before = len(collections)
        assert w.flush_to_disk() == STREAMS * RECORDS
        during = collections[before:]
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
    return during


def test_no_collection_runs_while_a_pass_holds_its_records(
    ring_path: str, tmp_path: Path, collections: list[int]
) -> None:
    assert gc.isenabled()
    during = _pass_collections(ring_path, tmp_path, collections)
    # (the pass's commit, once its records are written, may make a young collection)
    assert len(during) <= 2 and 2 not in during, during
    assert gc.isenabled()


def test_the_same_pass_unpaused_collects_again_and_again(
    ring_path: str, tmp_path: Path, collections: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: without the pause, that pass starts dozens of
    collections (54 here, full ones among them)."""
    import rust_daq.hdf5.writer as writer_module

    monkeypatch.setattr(writer_module, "gc_paused", contextlib.nullcontext)
    assert len(_pass_collections(ring_path, tmp_path, collections)) > 10


def _pause_in_another_thread() -> tuple[threading.Thread, threading.Event, threading.Event]:
    """A thread (not started) that holds a pause from setting `held` until `leave` is set."""
    held, leave = threading.Event(), threading.Event()

    def other() -> None:
        with paused():
            held.set()
            leave.wait(10)

    return threading.Thread(target=other), held, leave


def test_overlapping_pauses_collect_after_max_pause(
    collections: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers whose pauses keep overlapping never let the last holder leave: one that leaves
    after MAX_PAUSE collects, so garbage never waits longer."""
    from rust_daq import _gc

    monkeypatch.setattr(_gc, "MAX_PAUSE", 0.05)
    t, held, done = _pause_in_another_thread()
    t.start()
    assert held.wait(10)
    try:
        with paused():
            pass  # (left before MAX_PAUSE: no collection)
        assert collections == [] and not gc.isenabled()
        time.sleep(0.1)
        with paused():
            pass
        assert collections == [2] and not gc.isenabled()  # a full collection, still paused
    finally:
        done.set()
        t.join(10)
    assert gc.isenabled()


class _Closes:
    """Garbage in a cycle whose finalizer pauses the collector (an HDF5Writer closed by it)."""

    def __init__(self, ran: list[int]) -> None:
        self.ran = ran
        self.other: _Closes | None = None

    def __del__(self) -> None:
        with paused():
            self.ran.append(1)


def test_a_finalizer_that_pauses_during_the_freezes_collection_does_not_deadlock() -> None:
    from rust_daq._gc import frozen

    ran: list[int] = []
    a, b = _Closes(ran), _Closes(ran)
    a.other, b.other = b, a
    del a, b
    done = threading.Event()

    def freeze() -> None:
        with frozen(collect=True):
            pass
        done.set()

    threading.Thread(target=freeze, daemon=True).start()
    assert done.wait(10), "deadlocked"
    assert ran == [1, 1]


def test_pauses_nest_across_threads() -> None:
    assert gc.isenabled()
    t, entered, leave = _pause_in_another_thread()
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
