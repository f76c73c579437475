"""The writer process SIGKILLed at random moments, 20 times, while hostile batches arrive: odd
stream names, schema changes (a column added, a type changed), records that are no Arrow
batch. At the end every row is in the file exactly once, every garbage record is quarantined
exactly once, and nothing was lost (issue 15: "the figures of a writer SIGKILL loop")."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa

from rust_daq import RingBuffer
from rust_daq.writer import repair

from h5stream import book, columns, stream_group
from processes import writer_process

KILLS = 20
ODD = "odd/name\0."


def _writer(ring_path: str, h5_path: Path) -> subprocess.Popen[str]:
    return writer_process(ring_path, h5_path, flush_interval=0.02)


def _odd(i: int) -> pa.RecordBatch:
    """Batch i of the odd stream: its schema changes every 40 batches."""
    phase = (i // 40) % 3
    cols: dict[str, pa.Array] = {"i": pa.array([i, i])}
    if phase >= 1:
        cols["dev"] = pa.array(
            [{"x": float(i), "s": "a\0b"}, None], pa.struct([("x", pa.float64()), ("s", pa.string())])
        )
    cols["v"] = pa.array([str(i), None]) if phase == 2 else pa.array([float(i), None])
    return pa.record_batch(cols)


def _check_after_kill(h5_path: Path, tmp_path: Path) -> int:
    """What a killed writer left: SWMR readers open it as it is, unless the writer died while
    it made new objects (out of SWMR mode, a few ms per new stream); then a repaired copy
    (what the next writer does itself) holds everything committed. Returns 1 if it needed that."""
    if not h5_path.exists():
        return 0
    try:
        f = h5py.File(h5_path, "r", libver="latest", swmr=True)
        repaired = 0
    except OSError:
        copy = tmp_path / "copy.h5"
        shutil.copyfile(h5_path, copy)
        assert repair(copy)
        f = h5py.File(copy, "r")
        repaired = 1
    with f:
        if "rust_daq/streams" in f and any(True for _ in f["rust_daq/streams"]):
            committed = book(f, "v")[0]
            x = stream_group(f, "v")["x"][:committed]
            bad = np.flatnonzero(x != np.arange(committed))
            assert not len(bad), (
                f"{'repaired copy' if repaired else 'SWMR open'}: rows {bad[:3]} of {committed}: {x[bad[:3]]}"
            )
    return repaired


def test_writer_sigkill_loop_keeps_every_row_once(ring_path: str, tmp_path: Path) -> None:
    rng = random.Random(15)
    h5_path = tmp_path / "kills.h5"
    ring = RingBuffer.create(ring_path, capacity_mb=32)
    n = odd = repairs = 0
    garbage: list[int] = []
    try:
        for _ in range(KILLS):
            p = _writer(ring_path, h5_path)
            deadline = time.monotonic() + rng.uniform(0.05, 0.4)
            while time.monotonic() < deadline:
                ring.write_arrow_batch(pa.record_batch({"x": np.arange(50 * n, 50 * (n + 1))}), "v")
                n += 1
                if n % 3 == 0:
                    ring.write_arrow_batch(_odd(odd), ODD)
                    odd += 1
                if n % 97 == 0:
                    info = ring._schema_table.stream("v")
                    with ring.reserve(24, stream=info.stream_id, schema_id=info.schema_id) as res:
                        res.write(b"\xff" * 24)
                        garbage.append(res.seq)
                time.sleep(0.0005)
            p.send_signal(signal.SIGKILL)
            p.communicate(timeout=30)
            repairs += _check_after_kill(h5_path, tmp_path)
        p = _writer(ring_path, h5_path)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert ring.records_lost == 0
    finally:
        ring.close()
    with h5py.File(h5_path, "r") as f:  # plain h5py: the last writer closed it
        np.testing.assert_array_equal(stream_group(f, "v")["x"][:], np.arange(50 * n))
        assert book(f, "v") == [50 * n, n, 0, n + len(garbage), len(garbage)]
        assert book(f, ODD)[:3] == [2 * odd, odd, 0]
        got = columns(stream_group(f, ODD))
        assert got[(("i",), 0)] == [i for i in range(odd) for _ in (0, 1)]
        assert got[(("v",), 0)] == [
            x for i in range(odd) for x in ((float(i) if (i // 40) % 3 < 2 else str(i)), None)
        ]
        assert f["rust_daq/quarantine/seq"][:].tolist() == garbage, "each garbage record once, in order"
        progress = f["rust_daq/progress"][()].tolist()
        assert progress[1:3] == [n + odd, 0] and progress[4] == len(garbage)
    print(
        f"{KILLS} SIGKILLs ({repairs} in the middle of making new objects: file repaired): {n + odd} "
        f"records ({50 * n + 2 * odd} rows) in the file once each, {len(garbage)} quarantined once each, 0 lost"
    )
