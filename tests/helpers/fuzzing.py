"""Shared by the fuzz tests and the atheris target: a valid wrapped ring (plain records; and one
with Arrow streams), and the harnesses that open and drain or decode a (mutated) ring file,
where only rust-daq's own errors are acceptable."""

from __future__ import annotations

import functools
import os
import random
import tempfile

import pyarrow as pa

from rust_daq import RingBuffer, RingConfigError, RingCorruptError, RingFormatError, RustDaqError

from payloads import make_payload

DATA = 4096 + 256 * 1024  # data region offset (docs/ring-format.md)
SCHEMAS = 4096  # schema region offset
#: Data region of the Arrow ring (large enough for a few batches of each stream).
ARROW_CAPACITY = 16384


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


@functools.cache
def pristine_arrow() -> bytes:
    """A valid ring holding two Arrow streams (numbers, strings, a list) interleaved with
    plain records, wrapped once."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ring")
        with RingBuffer.create(path, capacity_bytes=ARROW_CAPACITY) as ring:
            for i in range(30):
                ring.write(make_payload(i, 100 + 7 * i))
                ring.write_arrow_batch(
                    pa.record_batch({"v": pa.array([i * 0.5, i + 1.0]), "n": pa.array([i, -i], pa.int32())}),
                    "volts",
                )
                ring.write_arrow_batch(
                    pa.record_batch({"s": pa.array(["ab" * i, None]), "l": pa.array([[1, 2], [i]])}),
                    "labels",
                )
        with open(path, "rb") as f:
            return f.read()


def open_and_decode(path: str) -> int:
    """Opens a (mutated) Arrow ring and goes through every Arrow entry point: ``streams()``,
    ``latest()`` of each stream, ``read_batches()`` (copies and zero-copy, then touching every
    column), ``read_table()``. Only rust-daq errors may escape (anything else propagates and
    fails the caller). Returns the batches decoded."""
    try:
        ring = RingBuffer.open(path)
    except (RingFormatError, RingConfigError):
        return 0
    n = 0
    with ring:
        names = ["volts", "labels"]
        try:
            names = list(ring.streams()) or names
        except RustDaqError:
            pass
        for name in names:
            try:
                ring.latest(name, rows=5)
            except RustDaqError:
                pass
        for copy in (True, False):
            try:
                reader = ring.reader("oldest")
                for _, batch in reader.read_batches(copy=copy):
                    batch.to_pydict()  # every value, validated or not: must not crash
                    n += 1
            except RustDaqError:
                pass
        for name in names:
            try:
                ring.reader("oldest").read_table(name)
            except RustDaqError:
                pass
    return n
