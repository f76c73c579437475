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
