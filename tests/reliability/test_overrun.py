"""Overrun: a producer process far faster than the writer for a while. The losses are counted
exactly, and identically, by the ring, by an independent reader and in the HDF5 file; after
the burst the writer catches up and nothing else is lost."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np

from rust_daq import HDF5Writer, RingBuffer

from processes import spawn

ROWS = 100


def test_burst_then_catch_up(ring_path: str, tmp_path: Path) -> None:
    h5_path = tmp_path / "overrun.h5"
    burst, slow = 3000, 200
    # ~2.5 KB per record: the 64 KiB ring holds ~25 of them, the burst is 120 rings' worth.
    RingBuffer.create(ring_path, capacity_bytes=64 * 1024).close()
    with RingBuffer.open(ring_path) as ring:
        writer = HDF5Writer(h5_path, ring)
        reader = ring.reader("oldest")
        producer = spawn("burst_producer.py", ring_path, burst, slow, 400)
        # The writer drains every 50 ms (at most ~25 records a pass: the ring's size), while the
        # burst runs at well over ten times that; the slow phase (400/s, 20 a pass) it keeps up with.
        seen: list[int] = []
        deadline = time.monotonic() + 120
        while producer.poll() is None:
            assert time.monotonic() < deadline, "producer did not finish"
            writer.flush_to_disk()
            seen.extend(r.seq for r in reader.read(max_records=10_000))
            time.sleep(0.05)
        out, err = producer.communicate()
        assert producer.returncode == 0, err
        writer.flush_to_disk()
        seen.extend(r.seq for r in reader.read(max_records=10_000))
        lines = dict(line.split() for line in out.splitlines())
        slow_from, written = int(lines["slow"]), int(lines["done"])
        assert (slow_from, written) == (burst, burst + slow)

        # The writer fell behind and lost records, and knows exactly which.
        lost = writer.records_lost
        assert lost > burst // 2, lost
        assert writer.records_written + lost == written
        # The ring counts what was overwritten before the writer *committed* it: the same, plus
        # any record the writer had read (and written) but not yet committed when lapped.
        assert lost <= ring.records_lost < lost + burst // 20, (ring.records_lost, lost)
        # The independent reader counts its own losses exactly.
        assert len(seen) + reader.lost == written
        assert seen == sorted(seen) and seen[-1] == written - 1
        stats = writer.stream_stats()["voltmeter"]
        writer.close()

    assert stats == {
        "records": written - lost,
        "lost": lost,
        "rows": (written - lost) * ROWS,
        "unwritable": 0,
    }
    with h5py.File(h5_path, "r") as f:
        index = f["measurements/voltmeter/index"][:]
        progress = list(f["rust_daq/progress"][()])
        stream = list(f["rust_daq/streams/voltmeter"][()])
    assert len(index) == (written - lost) * ROWS
    assert progress[1:3] == [written - lost, lost]
    assert stream[:4] == [(written - lost) * ROWS, written - lost, lost, written]
    # Whole batches, in order, none twice.
    batches = index.reshape(-1, ROWS)
    np.testing.assert_array_equal(batches - batches[:, :1], np.tile(np.arange(ROWS), (len(batches), 1)))
    first = batches[:, 0] // ROWS
    assert np.all(np.diff(first) > 0)
    # After the burst the writer caught up: every record of the slow phase is in the file (but
    # for its first quarter second, which a loaded machine may give the writer to catch up in).
    np.testing.assert_array_equal(first[-(slow - 100) :], np.arange(burst + 100, burst + slow))
