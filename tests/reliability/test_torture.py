"""Torture: one producer process and four reader processes on one ring, records of random
sizes from 0 bytes to a quarter of the ring, for --torture-seconds (CI 20 s; a soak: 600).
Zero corrupt or reordered records; per reader, delivered + lost == written, exactly."""

from __future__ import annotations

import json
import time

from rust_daq import RingBuffer

from processes import spawn


def test_one_producer_four_readers(ring_path: str, torture_seconds: float) -> None:
    RingBuffer.create(ring_path, capacity_bytes=1 << 20).close()
    readers = [spawn("torture_reader.py", ring_path) for _ in range(4)]
    for r in readers:
        assert r.stdout is not None and r.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    producer = spawn("timed_producer.py", ring_path, torture_seconds, 11)
    out, err = producer.communicate(timeout=torture_seconds + 120)
    assert producer.returncode == 0, err
    written = int(out.split()[-1])
    results = []
    for r in readers:
        rout, rerr = r.communicate(timeout=120)
        assert r.returncode == 0, rerr
        results.append(json.loads(rout.strip().splitlines()[-1]))
    with RingBuffer.open(ring_path) as ring:
        laps = ring.write_head / ring.capacity
    summary = {
        "seconds": round(time.monotonic() - t0, 1),
        "written": written,
        "laps": round(laps, 1),
        "readers": results,
    }
    print("torture:", json.dumps(summary))
    assert written > 1000 and laps > 5
    for res in results:
        assert res["corrupt"] == 0 and res["out_of_order"] == 0, res
        assert res["last"] == written - 1, res
        assert res["delivered"] + res["lost"] == written, res


def test_a_reader_killed_mid_read_affects_nobody(ring_path: str) -> None:
    import os
    import signal

    RingBuffer.create(ring_path, capacity_bytes=1 << 20).close()
    survivor = spawn("torture_reader.py", ring_path)
    victims = [spawn("torture_reader.py", ring_path) for _ in range(2)]
    for r in [survivor, *victims]:
        assert r.stdout is not None and r.stdout.readline().strip() == "ready"
    producer = spawn("timed_producer.py", ring_path, 4, 12)
    time.sleep(1.0)
    os.kill(victims[0].pid, signal.SIGKILL)  # mid-read, very likely mid-copy
    time.sleep(0.5)
    victims[1].send_signal(signal.SIGSTOP)  # frozen, possibly asleep on the futex...
    os.kill(victims[1].pid, signal.SIGKILL)  # ...then killed: its waiters flag stays set
    out, err = producer.communicate(timeout=120)
    assert producer.returncode == 0, err
    written = int(out.split()[-1])
    rout, rerr = survivor.communicate(timeout=120)
    res = json.loads(rout.strip().splitlines()[-1])
    assert res["corrupt"] == 0 and res["out_of_order"] == 0 and res["last"] == written - 1, res
    assert res["delivered"] + res["lost"] == written
    for v in victims:
        v.communicate(timeout=10)
    # The ring works on as before: a new producer and reader, nothing stuck.
    with RingBuffer.open(ring_path, writable=True) as ring:
        rd = ring.reader("latest")
        seq = ring.write(b"after the kills")
        (rec,) = rd.read(timeout=5)
        assert rec.seq == seq and bytes(rec.data) == b"after the kills"
