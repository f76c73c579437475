"""Many streams in one ring and one file (a slow-controls logger: thousands of process
variables of a few rows each): the schema region sized for them, registration and reading that
do not grow with the number of streams already there, and files that hold their data plus a
small fixed cost per stream."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest

from rust_daq import HDF5Writer, RingBuffer, RingConfigError

SCHEMA = pa.schema(
    [
        pa.field("timestamp", pa.timestamp("ns"), nullable=False, metadata={"units": "ns", "epoch": "unix"}),
        pa.field("value", pa.float64(), nullable=False, metadata={"units": "V"}),
    ]
)


def batch(stream: int, k: int, rows: int = 10) -> pa.RecordBatch:
    t0 = 1_700_000_000_000_000_000 + k * rows
    ts = pa.array(np.arange(t0, t0 + rows, dtype=np.int64), pa.timestamp("ns"))
    return pa.record_batch([ts, pa.array(stream + np.arange(rows) / 1000 + k)], schema=SCHEMA)


def test_the_schema_region_scales_with_the_ring_and_can_be_sized(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=100) as ring:
        assert ring.schema_capacity == 100 * 2**20 // 16  # a sixteenth of the capacity
    with RingBuffer.create(ring_path + "-s", capacity_bytes=1 << 20) as ring:
        assert ring.schema_capacity == 256 * 1024  # the smallest default
    with RingBuffer.create(ring_path + "-s", capacity_bytes=1 << 20, schema_mb=8, replace=True) as ring:
        assert ring.schema_capacity == 8 << 20
    # Reused as it is when big enough; a larger one asked for is refused unless replaced.
    with RingBuffer.create(ring_path + "-s", capacity_bytes=1 << 20, schema_mb=2) as ring:
        assert ring.schema_capacity == 8 << 20
    with pytest.raises(
        RingConfigError, match=r"schema region of 8388608 bytes, less than the 16777216 asked"
    ):
        RingBuffer.create(ring_path + "-s", capacity_bytes=1 << 20, schema_mb=16)
    for bad in (0, -1, float("nan"), "1"):
        with pytest.raises(RingConfigError, match="schema_mb must be"):
            RingBuffer.create(ring_path + "-b", capacity_bytes=1 << 20, schema_mb=bad)  # type: ignore[arg-type]
    with pytest.raises(RingConfigError, match="schema region size must be"):
        RingBuffer.create(ring_path + "-b", capacity_bytes=1 << 20, schema_mb=2048)
    assert not os.path.exists(ring_path + "-b")
    os.unlink(ring_path + "-s")


def test_ten_thousand_streams_in_one_ring(ring_path: str) -> None:
    """Registered, written, and read back by a reader that attaches afterwards and by one
    that follows along; every record carries its own stream's values."""
    n = 10_000
    with RingBuffer.create(ring_path, capacity_mb=64, schema_mb=8) as ring:
        follower = ring.reader()
        for s in range(n):
            ring.write_arrow_batch(batch(s, 0, rows=2), f"pv:{s:05d}")
            if s % 2500 == 2499:  # a reader keeps up with the new streams as they come
                got = follower.read_batches()
                assert [name for name, _ in got] == [f"pv:{i:05d}" for i in range(s - 2499, s + 1)]
        assert len(ring.streams()) == n
        late = ring.reader()
        got = late.read_batches()
        assert len(got) == n
        for s in (0, 1, 4_999, 9_999):
            name, b = got[s]
            assert name == f"pv:{s:05d}" and b.column("value").to_pylist() == [s, s + 0.001]
        # A stream switching back to its first schema after a second one: the current one
        # is the one written last, for the streams and for a new reader's view.
        other = pa.schema([pa.field("value", pa.int32())])
        ring.write_arrow_batch(pa.record_batch([pa.array([7], pa.int32())], schema=other), "pv:00003")
        assert ring.streams()["pv:00003"] == other
        ring.write_arrow_batch(batch(3, 1, rows=2), "pv:00003")
        assert ring.streams()["pv:00003"] == SCHEMA
        assert len(ring._schemas()) == n + 1  # the switch back reused the first entry


def test_the_schema_region_full_says_how_to_get_a_larger_one(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        s = 0
        with pytest.raises(RingConfigError, match=r"schema region is full .*schema_mb=") as e:
            while True:
                ring.write_arrow_batch(batch(s, 0), f"pv:{s:05d}")
                s += 1
        assert 400 < s < 1000, e.value
        rd = ring.reader()
        assert len(rd.read_batches()) == s  # what was written before stays readable


def _file_of(path: Path, ring: RingBuffer, swmr: bool) -> HDF5Writer:
    return HDF5Writer(str(path), ring, swmr=swmr)


@pytest.mark.parametrize("swmr", [False, True])
def test_slow_streams_get_small_chunks_and_a_small_file(ring_path: str, tmp_path: Path, swmr: bool) -> None:
    """500 streams of 10 rows a pass: the file holds the data plus at most 64 KiB per
    stream (1 MiB chunks made it 3 MB per stream), and every value is in it."""
    n, passes = 500, 6
    out = tmp_path / "many.h5"
    with RingBuffer.create(ring_path, capacity_mb=64) as ring:
        if swmr:  # the streams exist before the file: their datasets are made without rows
            for s in range(n):
                ring.write_arrow_batch(batch(s, 0), f"pv:{s:04d}")
        w = _file_of(out, ring, swmr)
        for k in range(1 if swmr else 0, passes):
            for s in range(n):
                ring.write_arrow_batch(batch(s, k), f"pv:{s:04d}")
            w.flush_to_disk()
        w.close()
    data = n * passes * 10 * 16
    size = out.stat().st_size
    assert size <= 2 * data + n * 64 * 1024, f"{size} bytes for {data} bytes of data"
    with h5py.File(out, "r") as f:
        for s in (0, 7, n - 1):
            g = f[f"measurements/pv:{s:04d}"]
            assert g["value"].shape == (passes * 10,)
            want = np.concatenate([s + np.arange(10) / 1000 + k for k in range(passes)])
            np.testing.assert_array_equal(g["value"][:], want)
            assert g["value"].chunks[0] * 8 <= 16 << 10, g["value"].chunks


def test_a_fast_stream_still_gets_large_chunks(ring_path: str, tmp_path: Path) -> None:
    out = tmp_path / "fast.h5"
    with RingBuffer.create(ring_path, capacity_mb=64) as ring:
        w = _file_of(out, ring, False)
        for k in range(3):
            ring.write_arrow_batch(batch(0, k, rows=100_000), "fast")
            ring.write_arrow_batch(batch(1, k, rows=10), "slow")
            w.flush_to_disk()
        w.close()
    with h5py.File(out, "r") as f:
        fast, slow = f["measurements/fast/value"], f["measurements/slow/value"]
        assert fast.chunks[0] * 8 == 1 << 20 and slow.chunks[0] * 8 == 4 << 10
        assert fast.shape == (300_000,) and slow.shape == (30,)
        np.testing.assert_array_equal(slow[:10], 1 + np.arange(10) / 1000)
