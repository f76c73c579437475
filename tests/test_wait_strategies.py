"""Wait strategies (`wait="adaptive" | "busy" | "park"`) of readers and of blocked producers:
each mode hands every record over across processes, in order, with its bytes; each honours
its timeout; a bad name is refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from rust_daq import RingBuffer, RingConfigError, RingFullError

MODES = ["adaptive", "busy", "park"]

PRODUCER = textwrap.dedent(
    """
    import sys, numpy as np
    from rust_daq import RingBuffer
    path, total, size, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ring = RingBuffer.open(path, writable=True, wait=wait)
    msg = np.zeros(size, np.uint8)
    idx = msg[:8].view(np.int64)
    for i in range(total):
        idx[0] = i
        msg[8:] = i & 0xFF
        ring.write(msg, timeout=60)
    ring.close()
    """
)


@pytest.mark.parametrize("producer_wait", MODES)
@pytest.mark.parametrize("reader_wait", MODES)
def test_every_mode_hands_over_every_frame_in_order(
    ring_path: str, reader_wait: str, producer_wait: str
) -> None:
    """Frames of 64 KiB through a ring of four: the producer waits for room and the reader for
    data all the time, in the modes under test."""
    size, total = 64 * 1024, 400
    RingBuffer.create(ring_path, capacity_bytes=4 * (size + 64), policy="block").close()
    ring = RingBuffer.open(ring_path)
    rd = ring.reader(wait=reader_wait)
    assert rd.wait == reader_wait
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, ring_path, str(total), str(size), producer_wait])
    out = np.empty((1, size), np.uint8)
    seq = np.empty(1, np.uint64)
    try:
        for i in range(total):
            assert rd.read_into(out, seq=seq, timeout=30.0) == 1, f"frame {i} not there after 30 s"
            assert int(seq[0]) == i and int(out[0, :8].view(np.int64)[0]) == i
            assert (out[0, 8:] == (i & 0xFF)).all()
            rd.commit()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert rd.lost == 0 and rd.delivered == total
    ring.close()


@pytest.mark.parametrize("wait", MODES)
def test_each_mode_returns_at_its_timeout(ring_path: str, wait: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=8192, policy="block", wait=wait) as ring:
        assert ring.wait == wait
        rd = ring.reader(wait=wait)
        t0 = time.monotonic()
        assert rd.read(timeout=0.3) == [] and len(rd.read_array(timeout=0.1)) == 0
        assert time.monotonic() - t0 >= 0.35  # it waited (an early return is a bug)
        ring.write(b"x" * 8000)
        with pytest.raises(RingFullError):
            ring.write(b"y" * 8000, timeout=0.2)
        assert [r.data for r in rd.read()] == [b"x" * 8000]  # nothing lost or half-written


def test_modes_can_be_changed_and_bad_names_are_refused(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=8192) as ring:
        assert ring.wait == "adaptive" and ring.reader().wait == "adaptive"
        ring.wait = "busy"
        rd = ring.reader()
        rd.wait = "park"
        assert (ring.wait, rd.wait) == ("busy", "park")
        for bad in ("spin", "", "Busy"):
            with pytest.raises(RingConfigError, match='unknown wait .*"adaptive", "busy" or "park"'):
                ring.wait = bad
            with pytest.raises(RingConfigError, match="unknown wait"):
                ring.reader(wait=bad)  # type: ignore[arg-type]
        with pytest.raises(RingConfigError, match="unknown wait"):
            RingBuffer.open(ring_path, wait="sleep")  # type: ignore[arg-type]
        assert (ring.wait, rd.wait) == ("busy", "park")


@pytest.mark.parametrize("wait", ["adaptive", "park"])
def test_a_write_many_that_fills_the_ring_wakes_its_sleeping_reader(ring_path: str, wait: str) -> None:
    """write_many wakes readers once, at its end; a call that fills a block ring and waits
    for room must wake them first, or a reader asleep since before the call frees no room
    until its sleep runs out (a 50 ms slice each time the ring fills: 4,000 records of 1 KiB
    through 16 KiB took seconds). Not a timing goal: the bound is a hundred times what the
    hand-over takes, and a tenth of the stalls it would have had."""
    import threading

    n = 4000
    with RingBuffer.create(ring_path, capacity_bytes=16 * 1024, policy="block", wait=wait) as ring:
        rd = ring.reader("tail", wait=wait)
        got: list[int] = []

        def consume() -> None:
            while len(got) < n:
                for r in rd.read(max_records=64, timeout=30.0):
                    got.append(int(np.frombuffer(r.data[:8], np.int64)[0]))
                rd.commit()

        t = threading.Thread(target=consume)
        t.start()
        time.sleep(0.2)  # the reader is asleep (adaptive: its 50 µs spin long over)
        block = np.zeros((n, 1024), np.uint8)
        block[:, :8].view(np.int64)[:, 0] = np.arange(n)
        t0 = time.monotonic()
        ring.write_many(block, timeout=60)
        t.join(timeout=60)
        took = time.monotonic() - t0
    assert got == list(range(n))
    assert took < 1.5, f"{took:.2f} s: the reader slept while the ring was full"
