"""Real processes on one ring: a producer, readers, and a producer killed with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rust_daq import ProducerActiveError, RingBuffer

from conftest import check_payload
from processes import spawn


def first_line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if not line:
        raise AssertionError(f"helper exited early: {p.wait()} {p.stderr.read() if p.stderr else ''}")
    return line


def test_one_producer_two_reader_processes_many_laps(ring_path: str) -> None:
    capacity = 256 * 1024
    n = 40_000
    RingBuffer.create(ring_path, capacity_bytes=capacity).close()
    readers = [spawn("reader.py", ring_path, n - 1, 120) for _ in range(2)]
    for r in readers:
        assert first_line(r) == "ready"
    producer = spawn("producer.py", ring_path, n, 5, capacity // 4)
    assert first_line(producer) == "started 0"
    out, err = producer.communicate(timeout=120)
    assert producer.returncode == 0, err
    assert out.strip() == f"done {n}"
    with RingBuffer.open(ring_path) as ring:
        assert ring.records_written == n
        assert ring.write_head > 10 * capacity, "the data wrapped the ring many times"
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        assert res["corrupt"] == 0 and res["out_of_order"] == 0, res
        assert res["last"] == n - 1, res
        assert res["delivered"] + res["lost"] == n, res


def test_producer_killed_mid_write_then_restarted(ring_path: str) -> None:
    """Large records make it likely the kill lands inside a payload copy. Whatever the
    moment, readers never get a torn record and the sequence continues across restarts."""
    capacity = 8 * 1024 * 1024
    RingBuffer.create(ring_path, capacity_bytes=capacity).close()
    ring = RingBuffer.open(ring_path)
    reader = ring.reader("oldest")
    rng = random.Random(1)
    seen: list[int] = []
    starts: list[int] = []
    for round_ in range(6):
        p = spawn("producer.py", ring_path, 0, round_, 2 * 1024 * 1024, "--forever")
        starts.append(int(first_line(p).split()[1]))
        deadline = time.monotonic() + rng.uniform(0.05, 0.3)
        while time.monotonic() < deadline:
            for rec in reader.read(timeout=0.01):
                assert check_payload(rec.data) == rec.seq
                seen.append(rec.seq)
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=10)
        assert ring.producer_pid == p.pid and not ring.producer_alive, "lock left by the dead producer"
    # One more producer takes the dead one's lock over, recovers the torn claim, continues.
    final = spawn("producer.py", ring_path, 100, 99, 1024)
    starts.append(int(first_line(final).split()[1]))
    final.communicate(timeout=60)
    assert final.returncode == 0
    for rec in reader.read():
        assert check_payload(rec.data) == rec.seq
        seen.append(rec.seq)
    assert seen == sorted(set(seen)), "in order, no duplicates"
    assert starts == sorted(starts) and starts[0] == 0
    assert seen[-1] == ring.records_written - 1
    assert len(seen) + reader.lost == ring.records_written
    ring.close()


def test_second_producer_process_is_refused_then_takes_over_a_dead_one(ring_path: str) -> None:
    RingBuffer.create(ring_path, capacity_bytes=64 * 1024).close()
    p = spawn("producer.py", ring_path, 0, 0, 100, "--forever")
    first_line(p)
    try:
        with pytest.raises(ProducerActiveError, match=f"another process \\(pid {p.pid}\\) is the producer"):
            RingBuffer.open(ring_path, writable=True)
        with pytest.raises(ProducerActiveError, match=f"pid {p.pid}"):
            RingBuffer.create(ring_path, capacity_bytes=64 * 1024)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=10)
    with RingBuffer.create(ring_path, capacity_bytes=64 * 1024) as ring:
        n = ring.records_written
        assert ring.write(b"after the takeover") == n
        assert ring.producer_pid == os.getpid()


def test_a_forked_child_cannot_write_or_release_the_parents_lock(ring_path: str) -> None:
    import multiprocessing

    ring = RingBuffer.create(ring_path, capacity_bytes=64 * 1024)
    ring.write(b"parent")

    def child(q: multiprocessing.Queue[str]) -> None:
        try:
            ring.write(b"child")
            q.put("wrote")
        except ProducerActiveError as e:
            q.put(str(e))
        ring.close()  # must not release the parent's producer lock

    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue[str] = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    msg = q.get(timeout=30)
    p.join(timeout=30)
    q.close()
    q.join_thread()
    assert "inherited across fork()" in msg
    assert ring.producer_pid == os.getpid(), "the parent still holds the lock"
    with pytest.raises(ProducerActiveError, match="already has a producer"):
        RingBuffer.open(ring_path, writable=True)
    assert ring.write(b"parent again") == 1
    assert [bytes(r.data) for r in ring.reader().read()] == [b"parent", b"parent again"]
    ring.close()


@pytest.mark.parametrize("wait", ["adaptive", "busy", "park"])
@pytest.mark.parametrize("blocked_in", ["read", "write"])
def test_ctrl_c_interrupts_a_blocked_call(ring_path: str, blocked_in: str, wait: str) -> None:
    code = f"""
import sys
from rust_daq import RingBuffer
ring = RingBuffer.create({ring_path!r}, capacity_bytes=4096, policy="block", wait={wait!r})
if {blocked_in!r} == "write":
    ring.write(b"x" * 4000)
    print("ready", flush=True)
    ring.write(b"y" * 4000, timeout=60)
else:
    print("ready", flush=True)
    ring.reader(wait={wait!r}).read(timeout=60)
"""
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert first_line(p) == "ready"
    time.sleep(0.2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert time.monotonic() - t0 < 5
    assert p.returncode != 0 and "KeyboardInterrupt" in err


@pytest.mark.parametrize(
    ("hot_bytes", "size", "batch"),
    [(1 << 20, 64 * 1024, 16), (1 << 20, 256 * 1024, 1), (0, 64 * 1024, 16)],
    ids=["hot", "hot-frames-one-at-a-time-in-place", "whole-ring"],
)
def test_a_block_ring_reused_from_its_start_loses_and_tears_nothing(
    ring_path: str, hot_bytes: int, size: int, batch: int
) -> None:
    """Policy "block" with hot reuse (the default): while the consumer process keeps up, the
    producer goes back to the start of the 8 MiB ring after about 1 MiB, racing the reads and
    commits of the consumer; every record arrives once, whole, in order. Frames read one at
    a time, in place (a record or two behind the producer), are where the producer copies
    the next frame ahead to the start of the ring while it waits for the consumer: a frame
    torn by that copy would fail its checksum here. How often that happens is up to the race
    (87 of about 250 laps in a local run); rust/core/tests/hot.rs makes each case happen.
    (hot_bytes=0: every lap the whole ring, as a control.)"""
    n = 3_000 if batch > 1 else 1_000
    capacity = 8 << 20
    RingBuffer.create(ring_path, capacity_bytes=capacity, policy="block").close()
    helpers = str(Path(__file__).parent / "helpers")
    producer_code = f"""
import sys, time
sys.path.insert(0, {helpers!r})
from payloads import make_payload
from rust_daq import RingBuffer
ring = RingBuffer.open({ring_path!r}, writable=True)
ring.hot_bytes = {hot_bytes}
print("started", flush=True)
for i in range({n}):
    ring.write(make_payload(i, {size}), timeout=60)
    if {batch} == 1 and i % 3 == 2:
        time.sleep(0.0005)  # about the consumer's pace: it keeps up, a frame or two behind
print("done", flush=True)
"""
    with RingBuffer.open(ring_path) as ring:
        reader = ring.reader("tail")
        p = subprocess.Popen(
            [sys.executable, "-c", producer_code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert first_line(p) == "started"
            got: list[int] = []
            while len(got) < n:
                for rec in reader.read(max_records=batch, timeout=5.0, copy=batch > 1):
                    assert check_payload(rec.data) == rec.seq == len(got)
                    assert rec.valid(), "the primary consumer's records are never reclaimed"
                    got.append(rec.seq)
                reader.commit()
                assert p.poll() in (None, 0)
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0 and out.strip() == "done", err
        finally:
            if p.poll() is None:
                p.kill()
        assert reader.lost == 0 and ring.records_lost == 0
        data = n * (size + 64)
        if hot_bytes:
            assert ring.write_head > data + 8 * capacity, "back to the start before the end of laps"
        else:
            assert ring.write_head < data + capacity
