"""Shared by the fuzz tests and the atheris target: a valid wrapped ring, and the harness that
opens and drains a (mutated) ring file, where only rust-daq's own errors are acceptable."""

from __future__ import annotations

import functools
import os
import random
import tempfile

from rust_daq import RingBuffer, RingConfigError, RingCorruptError, RingFormatError

from payloads import make_payload

DATA = 4096 + 256 * 1024  # data region offset (docs/ring-format.md)


@functools.cache
def pristine() -> bytes:
    """A valid ring that wrapped its 4 KiB data region several times (padding included)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ring")
        with RingBuffer.create(path, capacity_bytes=4096) as ring:
            rng = random.Random(3)
            for i in range(40):
                ring.write(make_payload(i, rng.randrange(16, 700)))
        with open(path, "rb") as f:
            return f.read()


def open_and_drain(path: str) -> int:
    """Opens and reads everything; returns the records read. Raises only if something other
    than a clear rust-daq error happens (a crash would end the process)."""
    try:
        ring = RingBuffer.open(path)
    except (RingFormatError, RingConfigError):
        return 0
    with ring:
        n = 0
        try:
            reader = ring.reader("oldest")
            for _ in range(3):
                for rec in reader.read():
                    assert len(rec.data) <= ring.max_record_size
                    n += 1
                ring.read_snapshot()
        except RingCorruptError:
            pass
        return n
