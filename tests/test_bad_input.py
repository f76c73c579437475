"""Bad input gets a clear error that says what was wrong, and loses nothing. Never a crash:
these tests run in the pytest process, so a segfault or SIGBUS would fail the whole run."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

import rust_daq
from rust_daq import (
    ProducerActiveError,
    ReadOnlyRingError,
    RecordTooLargeError,
    RingBuffer,
    RingClosedError,
    RingConfigError,
    RingCorruptError,
    RingFormatError,
    RingUsageError,
    RustDaqError,
)

import fuzzing
from conftest import check_payload, make_payload

HEADER = 4096
SCHEMA = 256 * 1024
DATA = HEADER + SCHEMA


def make_ring(path: str, records: int = 5, capacity: int = 8192) -> None:
    with RingBuffer.create(path, capacity_bytes=capacity) as ring:
        for i in range(records):
            ring.write(make_payload(i, 100))


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_every_error_is_a_rust_daq_error_with_a_builtin_base() -> None:
    assert issubclass(RingFormatError, ValueError)
    assert issubclass(RingCorruptError, RingFormatError)
    assert issubclass(ReadOnlyRingError, PermissionError)
    assert issubclass(rust_daq.RingFullError, TimeoutError)
    for name in rust_daq._errors.__all__:
        assert issubclass(getattr(rust_daq, name), RustDaqError)
        assert getattr(rust_daq, name).__doc__


# -- files that are not (good) rings ------------------------------------------------------


def test_not_a_ring_file(ring_path: str) -> None:
    with open(ring_path, "wb") as f:
        f.write(b"hello world, definitely not a ring" * 200)
    with pytest.raises(RingFormatError, match=r"not a rust-daq ring file \(magic 0x68656c6c6f20776f"):
        RingBuffer.open(ring_path)


def test_empty_file(ring_path: str) -> None:
    open(ring_path, "wb").close()
    with pytest.raises(RingFormatError, match="not a rust-daq ring file"):
        RingBuffer.open(ring_path)


def test_unsupported_version(ring_path: str) -> None:
    make_ring(ring_path)
    patch(ring_path, 8, struct.pack("<I", 7))
    with pytest.raises(
        RingFormatError, match="unsupported ring layout version 7; this rust-daq reads version 1"
    ):
        RingBuffer.open(ring_path)


def test_truncated_file(ring_path: str) -> None:
    make_ring(ring_path)
    os.truncate(ring_path, DATA + 4000)
    with pytest.raises(RingFormatError, match="truncated or not a ring"):
        RingBuffer.open(ring_path)
    os.truncate(ring_path, 1000)
    with pytest.raises(RingFormatError, match="truncated ring file: 1000 bytes"):
        RingBuffer.open(ring_path)


def test_header_capacity_larger_than_the_file(ring_path: str) -> None:
    make_ring(ring_path)
    patch(ring_path, 16, struct.pack("<Q", 1 << 30))
    with pytest.raises(RingFormatError, match="describes .* bytes \\(capacity 1073741824\\)"):
        RingBuffer.open(ring_path)


def test_positions_beyond_the_capacity(ring_path: str) -> None:
    make_ring(ring_path)
    patch(ring_path, 128, struct.pack("<Q", 1 << 40))  # write_pos far beyond oldest + capacity
    with pytest.raises(RingFormatError, match="inconsistent positions"):
        RingBuffer.open(ring_path)
    patch(ring_path, 128, struct.pack("<Q", 1 << 63))
    with pytest.raises(RingFormatError, match="positions out of range"):
        RingBuffer.open(ring_path)


def test_unknown_policy_in_header(ring_path: str) -> None:
    make_ring(ring_path)
    patch(ring_path, 56, struct.pack("<I", 9))
    with pytest.raises(RingFormatError, match="unknown policy 9"):
        RingBuffer.open(ring_path)


def test_a_directory_is_not_a_ring(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(IsADirectoryError):
        RingBuffer.open(tmp_path)


def test_create_over_a_non_ring_file_refuses_unless_replace(ring_path: str) -> None:
    with open(ring_path, "wb") as f:
        f.write(b"precious data")
    with pytest.raises(RingFormatError, match="not a rust-daq ring file"):
        RingBuffer.create(ring_path, capacity_mb=1)
    with open(ring_path, "rb") as f:
        assert f.read() == b"precious data", "nothing was overwritten"
    with RingBuffer.create(ring_path, capacity_mb=1, replace=True) as ring:
        assert ring.write(b"x") == 0


def test_create_does_not_follow_a_planted_symlink(ring_path: str, tmp_path: os.PathLike[str]) -> None:
    victim = os.path.join(tmp_path, "victim")
    with open(victim, "wb") as f:
        f.write(b"do not touch")
    os.symlink(victim, ring_path)
    with pytest.raises(OSError, match="refusing to follow a symlink"):
        RingBuffer.create(ring_path, capacity_mb=1)
    with open(victim, "rb") as f:
        assert f.read() == b"do not touch"


# -- corrupt records ----------------------------------------------------------------------


def test_corrupt_record_length_raises_not_crashes(ring_path: str) -> None:
    make_ring(ring_path, records=5)
    # Record 1 starts at 192: make its size run past the end of the data region.
    patch(ring_path, DATA + 192, struct.pack("<Q", (1 << 63) | (1 << 40)))
    with RingBuffer.open(ring_path) as ring:
        reader = ring.reader()
        with pytest.raises(RingCorruptError, match="record header at position 192 .* is invalid"):
            reader.read()
        # What came before the corruption was delivered intact... on the next call.
        assert reader.delivered == 1


def test_unknown_record_type(ring_path: str) -> None:
    make_ring(ring_path, records=3)
    patch(ring_path, DATA + 8, struct.pack("<I", 77))
    with RingBuffer.open(ring_path) as ring, pytest.raises(RingCorruptError, match="type 77"):
        ring.reader().read()


def test_record_position_field_mismatch(ring_path: str) -> None:
    make_ring(ring_path, records=3)
    patch(ring_path, DATA + 192 + 24, struct.pack("<Q", 4242))
    with RingBuffer.open(ring_path) as ring, pytest.raises(RingCorruptError, match="stored position 4242"):
        ring.reader().read()


# -- API misuse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity_bytes": 0}, "greater than 0"),
        ({"capacity_bytes": -5}, "greater than 0"),
        ({"capacity_mb": 0}, "greater than 0"),
        ({"capacity_bytes": 100}, "too small"),
        ({"capacity_bytes": 1 << 50}, "beyond what can be mapped"),
        ({"capacity_bytes": 1.5}, "must be an int"),
        ({"capacity_mb": "big"}, "must be a number"),
        ({"policy": "drop"}, 'unknown policy "drop"'),
    ],
)
def test_bad_create_arguments(ring_path: str, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(RingConfigError, match=match):
        RingBuffer.create(ring_path, **kwargs)  # type: ignore[arg-type]
    assert not os.path.exists(ring_path)


def test_capacity_beyond_free_space(tmp_path: os.PathLike[str]) -> None:
    # A capacity that passes the mapping limit but not the filesystem.
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    path = f"/dev/shm/rdaq-test-nospace-{os.getpid()}"
    try:
        with pytest.raises(RingConfigError, match="not enough space"):
            RingBuffer.create(path, capacity_bytes=free + (1 << 30))
        assert not os.path.exists(path)
        assert not [p for p in os.listdir("/dev/shm") if "rdaq-test-nospace" in p], "no temp file left"
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_record_larger_than_the_ring_writes_nothing(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=4096) as ring:
        ring.write(b"keep me")
        with pytest.raises(
            RecordTooLargeError, match=r"record of 5000 bytes .* \(at most 4032 payload bytes\)"
        ):
            ring.write(b"x" * 5000)
        assert ring.max_record_size == 4032
        assert ring.records_written == 1
        assert [bytes(r.data) for r in ring.reader().read()] == [b"keep me"]


def test_write_through_a_read_only_handle(ring_path: str) -> None:
    make_ring(ring_path, records=1)
    with RingBuffer.open(ring_path) as ro:
        with pytest.raises(ReadOnlyRingError, match=r"write\(\) needs the producer handle"):
            ro.write(b"x")
        with pytest.raises(PermissionError):
            ro.write_many([b"x"])
        assert ro.records_written == 1


def test_second_producer_in_this_process(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1):
        with pytest.raises(ProducerActiveError, match=f"this process \\(pid {os.getpid()}\\) already has"):
            RingBuffer.create(ring_path, capacity_mb=1)


def test_non_contiguous_and_non_buffer_inputs(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        with pytest.raises(BufferError, match=r"non-contiguous numpy.ndarray .*ascontiguousarray"):
            ring.write(np.arange(100.0)[::2])
        with pytest.raises(BufferError, match="C-contiguous"):
            ring.write(np.zeros((4, 4)).T)
        with pytest.raises(TypeError, match=r"bytes-like object .* got int"):
            ring.write(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="got str"):
            ring.write("text")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not iterable"):
            ring.write_many(5)  # type: ignore[arg-type]
        assert ring.records_written == 0


def test_missing_directory(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "no", "such", "dir", "ring")
    with pytest.raises(FileNotFoundError, match="does the directory exist"):
        RingBuffer.create(missing, capacity_mb=1)
    with pytest.raises(FileNotFoundError, match="cannot open ring"):
        RingBuffer.open(missing)


@contextmanager
def as_user(uid: int) -> Iterator[None]:
    """Run the block with another effective uid (root can switch back; others skip)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


def test_permission_denied(ring_path: str) -> None:
    make_ring(ring_path)
    if os.geteuid() != 0:
        os.chmod(ring_path, 0)
    with as_user(65534):
        with pytest.raises(PermissionError, match="cannot open ring .* Permission denied"):
            RingBuffer.open(ring_path)
        with pytest.raises(PermissionError):
            RingBuffer.create(ring_path, capacity_bytes=8192)


def test_closed_handles(ring_path: str) -> None:
    ring = RingBuffer.create(ring_path, capacity_mb=1)
    ring.write(b"x")
    reader = ring.reader()
    ring.close()
    ring.close()  # idempotent
    with pytest.raises(RingClosedError, match="closed ring handle"):
        ring.write(b"y")
    with pytest.raises(RingClosedError):
        ring.reader()
    with pytest.raises(RingClosedError):
        _ = ring.read_tail
    # A reader made before the close keeps its own mapping and still reads.
    assert [bytes(r.data) for r in reader.read()] == [b"x"]


def test_bad_read_and_timeout_arguments(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        reader = ring.reader()
        with pytest.raises(ValueError, match="timeout must be a finite number"):
            reader.read(timeout=-1)
        with pytest.raises(ValueError, match="timeout must be a finite number"):
            reader.read(timeout=float("nan"))
        with pytest.raises(ValueError, match="block_timeout must be"):
            ring.block_timeout = -3
        with pytest.raises(RingUsageError, match="past the committed data"):
            ring.advance_tail(64)
        assert reader.read(max_records=0) == []


def test_a_reader_never_returns_a_payload_that_fails_its_crc(ring_path: str) -> None:
    with open(ring_path, "wb") as f:
        f.write(fuzzing.pristine())
    with RingBuffer.open(ring_path) as ring:
        recs = ring.reader().read()
        assert recs, "the pristine ring has records"
        assert [check_payload(r.data) for r in recs] == [r.seq for r in recs]
        assert recs[-1].seq == 39
