"""The Python ring API: every name the issue lists, checked on the data it returns."""

from __future__ import annotations

import gc
import os
import stat
import threading
import time
from typing import Any

import numpy as np
import pytest

import rust_daq
from rust_daq import RingBuffer, RingFullError

from conftest import check_payload, make_payload


def test_create_write_read_round_trip(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        assert ring.writable and not ring.closed
        assert ring.capacity == 1024 * 1024
        assert ring.path == ring_path
        assert ring.policy == "overwrite"
        reader = ring.reader()
        payloads = [make_payload(i, 20 + 13 * i) for i in range(50)]
        seqs = [ring.write(p, stream=3, timestamp_ns=1000 + i) for i, p in enumerate(payloads)]
        assert seqs == list(range(50))
        records = reader.read()
        assert [r.seq for r in records] == seqs
        assert [bytes(r.data) for r in records] == payloads
        assert {r.stream for r in records} == {3}
        assert [r.timestamp_ns for r in records] == [1000 + i for i in range(50)]
        assert all(r.valid() and not r.zero_copy for r in records)
        assert isinstance(records[0].data, bytes)
        assert reader.lost == 0 and reader.delivered == 50
        assert ring.records_written == 50
        assert ring.write_head == reader.position
    assert ring.closed


def test_timestamps_default_to_the_wall_clock(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        before = time.time_ns()
        ring.write(b"x")
        after = time.time_ns()
        (rec,) = ring.reader().read()
        assert before <= rec.timestamp_ns <= after
        assert before <= ring.heartbeat_ns <= after


def test_write_accepts_any_c_contiguous_buffer(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        frame = np.arange(12, dtype=np.float64).reshape(3, 4)
        ring.write(b"bytes")
        ring.write(bytearray(b"bytearray"))
        ring.write(memoryview(b"memoryview"))
        ring.write(frame)
        ring.write(np.arange(5, dtype=np.uint16))
        recs = ring.reader().read()
        assert [bytes(r.data) for r in recs[:3]] == [b"bytes", b"bytearray", b"memoryview"]
        np.testing.assert_array_equal(np.frombuffer(recs[3].data, np.float64).reshape(3, 4), frame)
        assert np.frombuffer(recs[4].data, np.uint16).tolist() == [0, 1, 2, 3, 4]


def test_write_many_batches_records(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        reader = ring.reader()
        assert ring.write_many([]) == -1
        last = ring.write_many(make_payload(i, 64) for i in range(1000))
        assert last == 999
        assert ring.write_many([b"a", b"b"], stream=9) == 1001
        recs = reader.read()
        assert len(recs) == 1002
        assert [check_payload(r.data) for r in recs[:1000]] == list(range(1000))
        assert [r.stream for r in recs[1000:]] == [9, 9]


def test_write_many_of_an_array_writes_every_row_in_runs_that_share_a_timestamp(ring_path: str) -> None:
    """Rows go in runs of up to 1,024, each with one clock read; a run that meets a full
    block ring goes on through the wait; rows of 64 KiB each go one by one."""
    rows = np.zeros((3000, 64), np.uint8)
    rows[:, :8].view(np.int64)[:, 0] = np.arange(3000)
    rows[:, 8:] = (np.arange(3000) % 251)[:, None]
    with RingBuffer.create(ring_path, capacity_bytes=128 * 1024, policy="block") as ring:
        reader = ring.reader("tail")
        got: list[Any] = []

        def consume() -> None:
            while len(got) < 3000 + 3:
                got.extend(reader.read(max_records=256, timeout=10.0))
                reader.commit()

        t = threading.Thread(target=consume)
        t.start()
        t0 = time.time_ns()
        assert ring.write_many(rows, stream=4, timeout=30) == 2999  # 384 KiB through 128 KiB
        big = np.full((3, 64 * 1024), 7, np.uint8)
        assert ring.write_many(big, stream=5, timeout=30) == 3002
        t.join(timeout=60)
    assert [r.seq for r in got] == list(range(3003))
    data = np.array([np.frombuffer(r.data, np.uint8) for r in got[:3000]])
    np.testing.assert_array_equal(data, rows)
    assert [r.stream_seq for r in got[:3000]] == list(range(3000))
    stamps = np.array([r.timestamp_ns for r in got[:3000]])
    assert np.all(np.diff(stamps) >= 0) and stamps[0] >= t0
    # Runs of at most 1,024 rows share one clock read (more when the ring was full).
    _, counts = np.unique(stamps, return_counts=True)
    assert counts.max() <= 1024 and len(counts) >= 3
    assert [bytes(r.data) == bytes(big[0]) for r in got[3000:]] == [True] * 3
    assert [(r.stream, r.stream_seq) for r in got[3000:]] == [(5, 0), (5, 1), (5, 2)]


def test_write_many_keeps_what_it_wrote_before_a_bad_item(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        with pytest.raises(TypeError, match="got int"):
            ring.write_many([b"ok", b"ok2", 3, b"never"])
        assert [bytes(r.data) for r in ring.reader().read()] == [b"ok", b"ok2"]


def test_read_limits_and_waits(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        reader = ring.reader()
        for i in range(10):
            ring.write(make_payload(i, 30))
        assert [r.seq for r in reader.read(max_records=4)] == [0, 1, 2, 3]
        assert [r.seq for r in reader.read(max_records=100)] == list(range(4, 10))
        t0 = time.monotonic()
        assert reader.read(timeout=0.05) == []
        assert time.monotonic() - t0 >= 0.04

        def later() -> None:
            time.sleep(0.05)
            ring.write(b"late")

        th = threading.Thread(target=later)
        th.start()
        got = reader.read(timeout=10)
        th.join()
        assert [bytes(r.data) for r in got] == [b"late"]


def test_reader_start_positions_and_commit(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        for i in range(10):
            ring.write(make_payload(i, 40))
        primary = ring.reader("oldest")
        assert len(primary.read(max_records=6)) == 6
        primary.commit()
        assert ring.read_tail == primary.position
        assert ring.read_tail_seq == 6
        latest = ring.reader("latest")
        tail = ring.reader("tail")
        ring.write(make_payload(10, 40))
        assert [r.seq for r in latest.read()] == [10]
        assert [r.seq for r in tail.read()] == [6, 7, 8, 9, 10]
        with pytest.raises(rust_daq.RingConfigError, match='unknown start "newest"'):
            ring.reader("newest")  # type: ignore[arg-type]


def test_lapped_reader_counts_exactly_what_it_lost(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=64 * 1024) as ring:
        reader = ring.reader()
        for i in range(5000):
            ring.write(make_payload(i, 100))
        recs = reader.read()
        seqs = [r.seq for r in recs]
        assert seqs == list(range(seqs[0], 5000)), "the survivors, in order"
        assert reader.lost == seqs[0] > 0
        assert reader.lost + reader.delivered == 5000
        assert all(check_payload(r.data) == r.seq for r in recs)
        # Nobody committed a tail: every overwritten record counts as lost to the producer.
        assert ring.records_lost == reader.lost


def test_zero_copy_views_point_into_the_mapping(ring_path: str) -> None:
    ring = RingBuffer.create(ring_path, capacity_bytes=64 * 1024)
    frame = np.arange(256, dtype=np.float64)
    ring.write(frame)
    (rec,) = ring.reader().read(copy=False)
    assert rec.zero_copy and isinstance(rec.data, memoryview) and rec.data.readonly
    arr = np.frombuffer(rec.data, dtype=np.float64)
    base = ring.data_address()
    assert base <= arr.ctypes.data < base + ring.capacity
    assert arr.ctypes.data % 64 == 0, "payloads are 64-byte aligned"
    np.testing.assert_array_equal(arr, frame)
    with pytest.raises(ValueError, match="read-only"):
        arr[0] = 1.0
    assert rec.valid()
    # Overwrite it: the view stays mapped (no crash), and valid() reports it.
    for i in range(2000):
        ring.write(make_payload(i, 200))
    assert not rec.valid()
    # The view keeps the mapping alive after the ring handle is closed and collected.
    ring.close()
    del ring
    gc.collect()
    assert len(arr) == 256
    _ = arr.sum()


def test_data_view_is_a_read_only_numpy_array_over_the_data_region(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=8192) as ring:
        view = ring.data_view()
        assert view.dtype == np.uint8 and view.shape == (8192,)
        assert not view.flags.writeable
        assert view.ctypes.data == ring.data_address()
        ring.write(b"\x11" * 10)
        # First record: 64-byte header then the payload, visible through the view.
        assert bytes(view[64:74]) == b"\x11" * 10
        assert int.from_bytes(bytes(view[24:32]), "little") == 0  # the record's position


def test_read_snapshot_and_advance_tail(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=8192) as ring:
        for i in range(3):
            ring.write(make_payload(i, 100))
        snap = ring.read_snapshot()
        assert len(snap) == 3 * 192
        assert check_payload(snap[64 : 64 + 100]) == 0
        assert ring.advance_tail(192) == 192
        assert ring.read_tail == 192 and ring.read_tail_seq == 1
        assert len(ring.read_snapshot()) == 2 * 192
        with pytest.raises(rust_daq.RingUsageError, match="inside a record"):
            ring.advance_tail(100)
        with pytest.raises(rust_daq.RingUsageError, match="past the committed data"):
            ring.advance_tail(10**6)
        ring.advance_tail(len(ring.read_snapshot()))
        assert ring.read_snapshot() == b""
        assert ring.read_tail == ring.write_head


def test_block_policy_times_out_then_loses_nothing(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=4096, policy="block", block_timeout=0.05) as ring:
        for i in range(3):
            ring.write(make_payload(i, 1000))
        t0 = time.monotonic()
        with pytest.raises(RingFullError, match="waited 0.0") as exc:
            ring.write(make_payload(3, 1000))
        assert isinstance(exc.value, TimeoutError)
        assert time.monotonic() - t0 >= 0.04
        assert ring.records_written == 3
        reader = ring.reader("tail")
        seen: list[int] = []

        def consume() -> None:
            while len(seen) < 300:
                for r in reader.read(timeout=1.0):
                    seen.append(check_payload(r.data))
                reader.commit()

        th = threading.Thread(target=consume)
        th.start()
        for i in range(3, 300):
            ring.write(make_payload(i, 1000), timeout=10)
        th.join(timeout=30)
        assert seen == list(range(300))
        assert reader.lost == 0 and ring.records_lost == 0


def test_reopen_continues_the_sequence(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        session = ring.session_id
        for i in range(5):
            ring.write(make_payload(i, 50))
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        assert ring.session_id == session
        assert ring.write(make_payload(5, 50)) == 5
        assert [check_payload(r.data) for r in ring.reader().read()] == list(range(6))
    with pytest.raises(rust_daq.RingConfigError, match="pass replace=True"):
        RingBuffer.create(ring_path, capacity_mb=2)
    with RingBuffer.create(ring_path, capacity_mb=2, replace=True) as ring:
        assert ring.capacity == 2 * 1024 * 1024
        assert ring.records_written == 0 and ring.session_id != session


def test_open_read_only_and_writable(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as producer:
        producer.write(b"one")
        with RingBuffer.open(ring_path) as ro:
            assert not ro.writable
            assert ro.producer_pid == os.getpid() and ro.producer_alive
            assert [bytes(r.data) for r in ro.reader().read()] == [b"one"]
            with pytest.raises(rust_daq.ProducerActiveError, match="already has a producer"):
                RingBuffer.open(ring_path, writable=True)
    with RingBuffer.open(ring_path, writable=True) as again:
        assert again.write(b"two") == 1
    with RingBuffer.open(ring_path) as ro:
        assert ro.producer_pid is None and not ro.producer_alive


def test_bare_names_live_in_dev_shm() -> None:
    name = f"rdaq-bare-{os.getpid()}"
    try:
        with RingBuffer.create(name, capacity_mb=1) as ring:
            assert ring.path == f"/dev/shm/{name}"
        assert rust_daq.resolve_ring_path("a/b") == "a/b"
    finally:
        os.unlink(f"/dev/shm/{name}")


def test_files_are_private_to_their_owner(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1):
        assert stat.S_IMODE(os.stat(ring_path).st_mode) == 0o600


def test_status_reports_positions_and_counters(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=8192) as ring:
        ring.write(b"x" * 100)
        s = ring.status()
        assert s["path"] == ring_path and s["capacity"] == 8192 and s["policy"] == "overwrite"
        assert s["write_head"] == s["write_position"] == 192
        assert s["records_written"] == 1 and s["records_lost"] == 0
        assert s["producer_pid"] == os.getpid() and s["producer_alive"] is True


def test_many_python_threads_share_one_producer_and_reader(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        reader = ring.reader()
        got: list[int] = []
        lock = threading.Lock()

        def write(k: int) -> None:
            for i in range(2000):
                ring.write(make_payload(k * 10_000 + i, 40))

        def read() -> None:
            for _ in range(200):
                recs = reader.read(max_records=50, timeout=0.01)
                with lock:
                    got.extend(check_payload(r.data) for r in recs)

        threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
        threads += [threading.Thread(target=read) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got.extend(check_payload(r.data) for r in reader.read())
        expected = {k * 10_000 + i for k in range(4) for i in range(2000)}
        assert sorted(got) == sorted(expected), "every record exactly once across reader threads"
        assert ring.records_written == 8000 and reader.lost == 0


def test_version_is_single_sourced() -> None:
    from importlib.metadata import version

    assert rust_daq.__version__ == version("rust-daq")


def test_misusing_a_reservation_raises_ring_usage_error(ring_path: str) -> None:
    usage = rust_daq.RingUsageError
    assert issubclass(usage, ValueError)
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        res = ring.reserve(8)
        with pytest.raises(usage, match="overflows the reservation"):
            res.write(b"123456789")  # past its end
        res.write(b"12345678")
        with pytest.raises(usage, match="overflows the reservation"):
            res.write(b"x")  # full: one byte past its end
        seq = res.commit()
        with pytest.raises(usage, match=f"already committed \\(seq {seq}\\)"):
            res.commit()  # twice
        with pytest.raises(usage, match="already committed"):
            res.abort()  # after commit
        with pytest.raises(usage, match="already committed"):
            res.write(b"x")  # after commit

        res = ring.reserve(8)
        res.abort()
        with pytest.raises(usage, match="already aborted"):
            res.commit()  # after abort
        with pytest.raises(usage, match="already aborted"):
            res.abort()  # twice
        with pytest.raises(usage, match="already aborted"):
            res.write(b"x")  # after abort

        # A second reservation while one is pending is a usage error of the ring.
        res = ring.reserve(8)
        with pytest.raises(usage, match="pending"):
            ring.reserve(8)
        res.abort()
        assert [r.seq for r in ring.reader().read()] == [seq]


def test_hot_bytes_takes_a_byte_count_and_refuses_anything_else(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4, policy="block") as ring:
        assert ring.hot_bytes == 1 << 20  # the default
        ring.hot_bytes = 0
        assert ring.hot_bytes == 0
        for bad, error in ((-1, OverflowError), (2**64, OverflowError), (1.5, TypeError), ("1", TypeError)):
            with pytest.raises(error):
                ring.hot_bytes = bad  # type: ignore[assignment]
            assert ring.hot_bytes == 0  # unchanged
        ring.write(b"x" * 100)
        assert ring.reader("oldest").read()[0].data == b"x" * 100
