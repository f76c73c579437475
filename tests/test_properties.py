"""Properties over random record-size sequences (hypothesis), in one process."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from rust_daq import RingBuffer

from conftest import check_payload, make_payload

CAPACITY = 8192


def fresh_ring() -> tuple[RingBuffer, str]:
    fd, path = tempfile.mkstemp(prefix="rdaq-prop-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.close(fd)
    os.unlink(path)
    return RingBuffer.create(path, capacity_bytes=CAPACITY), path


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(16, CAPACITY - 64), min_size=1, max_size=120),
    read_every=st.integers(1, 40),
)
def test_any_size_sequence_is_delivered_or_counted(sizes: list[int], read_every: int) -> None:
    ring, path = fresh_ring()
    try:
        slow, eager = ring.reader(), ring.reader()
        got_slow: list[int] = []
        for i, size in enumerate(sizes):
            assert ring.write(make_payload(i, size)) == i
            assert all(check_payload(r.data) == r.seq for r in eager.read())
            if i % read_every == 0:
                got_slow += [check_payload(r.data) for r in slow.read()]
        got_slow += [check_payload(r.data) for r in slow.read()]
        n = len(sizes)
        assert got_slow == sorted(set(got_slow)), "in order, no duplicates"
        assert got_slow[-1] == n - 1, "the newest record always survives"
        assert len(got_slow) + slow.lost == n
        assert eager.delivered + eager.lost == n
        # What survives in the ring is a suffix of the sequence, and fits in it.
        survivors = [r.seq for r in ring.reader("oldest").read()]
        assert survivors == list(range(n - len(survivors), n))
        assert sum(64 + (s + 63) // 64 * 64 for s in sizes[n - len(survivors) :]) <= CAPACITY
    finally:
        ring.close()
        os.unlink(path)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, CAPACITY // 4 - 64), min_size=1, max_size=200))
def test_a_reader_that_keeps_up_loses_nothing(sizes: list[int]) -> None:
    """Records of at most a quarter of the ring never reclaim one not yet read by a reader
    that reads after every write (padding at the wrap is smaller than the record)."""
    ring, path = fresh_ring()
    try:
        reader = ring.reader()
        for i, size in enumerate(sizes):
            payload = make_payload(i, size) if size >= 12 else bytes([i & 0xFF]) * size
            ring.write(payload)
            (rec,) = reader.read()
            assert rec.seq == i and bytes(rec.data) == payload
        assert reader.lost == 0
    finally:
        ring.close()
        os.unlink(path)
