"""Bulk reads (`RingReader.read_array`, `RingReader.read_into`): many records of one size per
call, copied out then validated. Every test checks the records' bytes against their sequence
numbers, so a torn, skipped or repeated record fails it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from rust_daq import RecordArrays, RingBuffer


def stamped(i: int, size: int = 64) -> np.ndarray:
    """A payload that says which record it is: its first 8 bytes are i, the rest i's low byte."""
    a = np.full(size, i & 0xFF, np.uint8)
    a[:8] = np.frombuffer(np.int64(i).tobytes(), np.uint8)
    return a


def index_of(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows[:, :8]).view(np.int64).ravel()


def test_read_array_returns_values_sequence_numbers_timestamps_and_streams(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        for i in range(100):
            ring.write(stamped(i), stream=i % 3, timestamp_ns=1_000 + i)
        rd = ring.reader()
        got = rd.read_array(64)
        assert isinstance(got, RecordArrays) and len(got) == 64
        assert got.data.shape == (64, 64) and got.data.dtype == np.uint8
        assert (
            got.seq.dtype == np.uint64
            and got.timestamp_ns.dtype == np.int64
            and got.stream.dtype == np.uint32
        )
        assert got.seq.tolist() == list(range(64))
        assert index_of(got.data).tolist() == list(range(64))
        assert (got.data[:, 8:] == (np.arange(64, dtype=np.uint8))[:, None]).all()
        assert got.timestamp_ns.tolist() == [1_000 + i for i in range(64)]
        assert got.stream.tolist() == [i % 3 for i in range(64)]
        rest = rd.read_array()
        assert rest.seq.tolist() == list(range(64, 100))
        assert rd.delivered == 100 and rd.lost == 0 and rd.next_seq == 100
        assert len(rd.read_array()) == 0 and len(rd.read_array(timeout=0.01).data) == 0


def test_dtype_views_rows_or_whole_records(ring_path: str) -> None:
    point = np.dtype([("x", "<f8"), ("y", "<f8"), ("n", "<i4"), ("flag", "<u4")])
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        for i in range(5):
            ring.write(np.arange(4, dtype=np.float64) * i)
        for i in range(3):
            ring.write(np.array([(i, -i, i * 10, 1)], point))
        rd = ring.reader()
        floats = rd.read_array(dtype=np.float64)
        assert floats.data.dtype == np.float64 and floats.data.shape == (5, 4)
        assert floats.data.tolist() == [[0.0, i, 2.0 * i, 3.0 * i] for i in range(5)]
        points = rd.read_array(dtype=point)
        assert points.data.shape == (3,) and points.data["n"].tolist() == [0, 10, 20]
        assert points.data["y"].tolist() == [0.0, -1.0, -2.0] and points.seq.tolist() == [5, 6, 7]
        assert points.data.flags.writeable  # a private copy the caller may change


def test_a_batch_stops_at_the_first_record_of_another_size(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        for i in range(3):
            ring.write(stamped(i, 64))
        ring.write(stamped(3, 24))
        for i in range(4, 6):
            ring.write(stamped(i, 64))
        rd = ring.reader()
        assert rd.read_array().seq.tolist() == [0, 1, 2]
        short = rd.read_array()
        assert (
            short.seq.tolist() == [3] and short.data.shape == (1, 24) and index_of(short.data).tolist() == [3]
        )
        assert rd.read_array().seq.tolist() == [4, 5]
        assert rd.lost == 0 and rd.delivered == 6


def test_a_size_the_dtype_cannot_take_raises_and_consumes_nothing(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        ring.write(b"x" * 12)
        ring.write(b"y" * 16)
        rd = ring.reader()
        with pytest.raises(
            ValueError, match=r"record 0 \(stream 0\) has 12 bytes.*multiple of the dtype's 8"
        ):
            rd.read_array(dtype=np.float64)
        assert rd.delivered == 0 and rd.next_seq == 0
        recs = rd.read(1)
        assert [(r.seq, r.data) for r in recs] == [(0, b"x" * 12)]
        assert rd.read_array(dtype=np.float64).data.tolist() == [
            np.frombuffer(b"y" * 16, np.float64).tolist()
        ]


def test_read_into_fills_a_callers_buffers_and_checks_them_first(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        for i in range(10):
            ring.write(stamped(i), stream=7, timestamp_ns=5_000 + i)
        ring.write(stamped(10, 32))
        rd = ring.reader()
        out = np.zeros((4, 64), np.uint8)
        seq = np.full(4, 99, np.uint64)
        ts = np.zeros(4, np.int64)
        streams = np.zeros(4, np.uint32)
        assert rd.read_into(out, seq=seq, timestamp_ns=ts, streams=streams) == 4
        assert index_of(out).tolist() == [0, 1, 2, 3] and seq.tolist() == [0, 1, 2, 3]
        assert ts.tolist() == [5_000, 5_001, 5_002, 5_003] and streams.tolist() == [7] * 4

        # Wrong buffers are refused before anything is consumed.
        with pytest.raises(BufferError, match="writable, C-contiguous"):
            rd.read_into(np.zeros((4, 64), np.uint8)[:, ::2])
        frozen = np.zeros((4, 64), np.uint8)
        frozen.flags.writeable = False
        with pytest.raises(BufferError, match="writable"):
            rd.read_into(frozen)
        with pytest.raises(BufferError):
            rd.read_into(b"\0" * 256)
        with pytest.raises(ValueError, match="seq must hold at least 4 items of 8 bytes"):
            rd.read_into(out, seq=np.zeros(3, np.uint64))
        with pytest.raises(ValueError, match="seq must hold at least 4 items of 8 bytes"):
            rd.read_into(out, seq=np.zeros(4, np.uint32))
        with pytest.raises(ValueError, match="record 4 .* has 64 bytes, and this bulk read takes rows of 32"):
            rd.read_into(np.zeros((4, 32), np.uint8))
        assert rd.delivered == 4 and rd.next_seq == 4

        # One flat buffer of structured items works as well: one record per item.
        rows = np.zeros(16, np.dtype([("i", "<i8"), ("rest", "u1", 56)]))
        assert rd.read_into(rows, seq=np.zeros(16, np.uint64)) == 6
        assert rows["i"][:6].tolist() == [4, 5, 6, 7, 8, 9]
        with pytest.raises(ValueError, match="record 10 .* has 32 bytes"):
            rd.read_into(out)
        with pytest.raises(ValueError, match="takes rows of 1 bytes"):
            rd.read_into(bytearray(32))  # one dimension: 32 rows of 1 byte
        last = np.zeros((1, 32), np.uint8)
        assert rd.read_into(last) == 1 and index_of(last).tolist() == [10]
        assert rd.delivered == 11


def test_stream_filter_stops_at_another_stream_without_waiting_for_it(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        for i in range(4):
            ring.write(stamped(i), stream=1)
        ring.write(stamped(4), stream=2)
        ring.write(stamped(5), stream=1)
        rd = ring.reader()
        assert rd.read_array(stream=1).seq.tolist() == [0, 1, 2, 3]
        t0 = time.monotonic()
        assert len(rd.read_array(stream=1, timeout=30.0)) == 0  # would wait 30 s if it waited
        assert time.monotonic() - t0 < 25.0
        assert rd.read_array(stream=2).seq.tolist() == [4]
        assert rd.read_array(stream=1).seq.tolist() == [5]


def test_a_timeout_waits_for_the_first_record(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        rd = ring.reader()
        assert len(rd.read_array(timeout=0.01)) == 0
        threading.Timer(0.2, lambda: ring.write(stamped(0))).start()
        got = rd.read_array(timeout=30.0)
        assert got.seq.tolist() == [0] and index_of(got.data).tolist() == [0]
        with pytest.raises(ValueError, match="timeout"):
            rd.read_array(timeout=-1.0)
        with pytest.raises(ValueError, match="max_records"):
            rd.read_array(-1)
        assert len(rd.read_array(0)) == 0


def test_commit_after_a_bulk_read_makes_room_for_a_blocking_producer(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=64 * 128, policy="block", block_timeout=0.05) as ring:
        rd = ring.reader()
        n = 0
        while True:
            try:
                ring.write(stamped(n))
            except Exception:
                break
            n += 1
        assert n >= 32
        got = rd.read_array()
        assert got.seq.tolist() == list(range(n))
        rd.commit()
        for i in range(n, n + 8):
            ring.write(stamped(i))
        assert index_of(rd.read_array().data).tolist() == list(range(n, n + 8))


def test_write_many_of_an_array_writes_one_record_per_row(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        block = np.stack([stamped(i, 48) for i in range(10)])
        assert ring.write_many(block, stream=4) == 9
        cube = np.arange(3 * 2 * 8, dtype=np.uint8).reshape(3, 2, 8)  # rows of 16 bytes
        assert ring.write_many(cube) == 12
        assert ring.write_many(np.zeros((0, 8), np.uint8)) == -1
        with pytest.raises(BufferError, match="C-contiguous"):
            ring.write_many(np.zeros((4, 16), np.uint8)[:, ::2])  # rows iterated: not contiguous
        rd = ring.reader()
        got = rd.read_array()
        assert index_of(got.data).tolist() == list(range(10)) and got.stream.tolist() == [4] * 10
        rows = rd.read_array()
        assert rows.data.tolist() == cube.reshape(3, 16).tolist() and rows.seq.tolist() == [10, 11, 12]


PRODUCER = textwrap.dedent(
    """
    import sys, numpy as np
    from rust_daq import RingBuffer
    path, total, policy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ring = RingBuffer.open(path, writable=True)
    block = np.zeros((1000, 64), np.uint8)
    idx = block[:, :8].view(np.int64)
    for start in range(0, total, 1000):
        idx[:, 0] = np.arange(start, start + 1000)
        block[:, 8:] = (idx[:, 0] & 0xFF).astype(np.uint8)[:, None]
        ring.write_many(block)
    ring.close()
    """
)


def _produce(path: str, total: int, policy: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", PRODUCER, path, str(total), policy])


def test_lossless_across_processes_with_read_into(ring_path: str) -> None:
    total = 300_000
    RingBuffer.create(ring_path, capacity_bytes=256 * 1024, policy="block", block_timeout=60).close()
    ring = RingBuffer.open(ring_path)
    rd = ring.reader()
    out = np.empty((4096, 64), np.uint8)
    seq = np.empty(4096, np.uint64)
    proc = _produce(ring_path, total, "block")
    try:
        got = 0
        while got < total:
            n = rd.read_into(out, seq=seq, timeout=30.0)
            assert n > 0, f"nothing for 30 s after {got} records"
            assert seq[:n].tolist() == list(range(got, got + n))
            assert (index_of(out[:n]) == seq[:n].astype(np.int64)).all()
            assert (out[:n, 8:] == (seq[:n] & 0xFF).astype(np.uint8)[:, None]).all()
            rd.commit()
            got += n
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert rd.lost == 0 and rd.delivered == total
    ring.close()


def test_a_lapped_bulk_reader_returns_only_intact_records_and_counts_the_rest(ring_path: str) -> None:
    """A small overwrite ring, a producer much faster than this reader: every row handed out
    must match its sequence number (a torn copy would not), and delivered + lost must account
    for every record written."""
    total = 2_000_000
    RingBuffer.create(ring_path, capacity_bytes=64 * 1024, policy="overwrite").close()
    ring = RingBuffer.open(ring_path)
    rd = ring.reader()
    proc = _produce(ring_path, total, "overwrite")
    checked = 0
    try:
        last = -1
        while True:
            got = rd.read_array(512, timeout=0.5)
            if len(got):
                idx = index_of(got.data)
                assert (idx == got.seq.astype(np.int64)).all(), "a row does not hold its record"
                assert (got.data[:, 8:] == (got.seq & 0xFF).astype(np.uint8)[:, None]).all()
                assert (np.diff(got.seq.astype(np.int64)) > 0).all() and int(got.seq[0]) > last
                last = int(got.seq[-1])
                checked += len(got)
                time.sleep(0.0005)  # fall behind on purpose
            elif proc.poll() is not None:
                if len(rd.read_array(timeout=0.1)) == 0:
                    break
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert rd.next_seq == total and rd.delivered == checked
    assert rd.delivered + rd.lost == total and rd.lost > 0
    ring.close()


def test_review_fixes_dtypes_scalars_unaligned_arrays(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        for i in range(3):
            ring.write(stamped(i, 8))
        rd = ring.reader()
        for bad in ("S0", object, "U0"):
            with pytest.raises(ValueError, match="cannot view a record"):
                rd.read_array(dtype=bad)
        assert rd.delivered == 0  # refused before anything was read
        one = np.zeros((), np.dtype([("i", "<i8")]))  # a 0-d array: one row of 8 bytes
        assert rd.read_into(one) == 1 and int(one["i"]) == 0
        raw = np.zeros(8 * 2 + 1, np.uint8)
        seq = np.frombuffer(raw.data, np.uint64, count=2, offset=1)  # unaligned, writable
        assert not seq.flags.aligned
        assert rd.read_into(np.zeros((2, 8), np.uint8), seq=seq) == 2
        assert seq.tolist() == [1, 2]


def test_a_bulk_read_that_loses_its_run_waits_on_to_its_timeout(ring_path: str) -> None:
    """A producer that reclaims a whole run while it is copied: the call goes on waiting for
    the next, it does not return 0 before its timeout."""
    big = 256 * 1024
    with RingBuffer.create(ring_path, capacity_bytes=4 * (big + 64), policy="overwrite") as ring:
        stop = threading.Event()

        def produce() -> None:
            msg = np.zeros(big, np.uint8)
            i = 0
            while not stop.is_set():
                msg[:8] = np.frombuffer(np.int64(i).tobytes(), np.uint8)
                ring.write(msg)
                i += 1

        t = threading.Thread(target=produce)
        t.start()
        try:
            rd = ring.reader()
            out = np.empty((4, big), np.uint8)
            seq = np.empty(4, np.uint64)
            for _ in range(300):
                t0 = time.monotonic()
                n = rd.read_into(out, seq=seq, timeout=0.5)
                if n == 0:
                    assert time.monotonic() - t0 >= 0.45, "returned 0 before its timeout"
                else:
                    assert (index_of(out[:n]) == seq[:n].astype(np.int64)).all()
        finally:
            stop.set()
            t.join()
        assert rd.delivered + rd.lost <= ring.records_written


def test_zero_byte_records_are_counted_in_bulk(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        for _ in range(5):
            ring.write(b"")
        got = ring.reader().read_array()
        assert got.data.shape == (5, 0) and got.seq.tolist() == [0, 1, 2, 3, 4]
        out = np.zeros((3, 0), np.uint8)
        seq = np.zeros(3, np.uint64)
        rd = ring.reader()
        assert rd.read_into(out, seq=seq) == 3 and seq.tolist() == [0, 1, 2]
