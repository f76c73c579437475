"""The ring against hostile files and callers (issue 15), in real processes on real files in
/dev/shm: a ring truncated while other processes have it mapped, header positions
overwritten by another process, ring files planted by another user, plain records on an
Arrow stream's id, corrupt Arrow data, and odd configurations."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from rust_daq import (
    RingBuffer,
    RingConfigError,
    RingCorruptError,
    RingUsageError,
    RustDaqError,
)

HELPERS = Path(__file__).parent / "helpers"
WRITE_POS = 128  # docs/ring-format.md: header offsets
COMMIT_POS = 136
OLDEST_POS = 144
SCHEMA_REGION = 4096
DATA = 4096 + 256 * 1024


def _child(code: str, *args: object) -> subprocess.Popen[str]:
    """A Python process running `code` (with the test helpers importable), text pipes."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HELPERS,
    )


def _wait_line(proc: subprocess.Popen[str], expected: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != expected:
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"child said {line!r}, expected {expected!r}; stderr:\n{err}")


# -- 1. truncation while mapped ----------------------------------------------------------------

HOLDER = """
import sys
from payloads import check_payload, make_payload
from rust_daq import RingBuffer, RingCorruptError

path = sys.argv[1]
ring = RingBuffer.create(path, capacity_bytes=1 << 16)
import pyarrow as pa
batch = pa.record_batch({"v": pa.array([1.0, 2.0])})
for i in range(40):
    ring.write(make_payload(i, 200))
ring.write_arrow_batch(batch, "volts")
reader = ring.reader("oldest")
copies = reader.read(10)                       # delivered copies
views = reader.read(5, copy=False)             # zero-copy records
import numpy as np
arrays = [np.frombuffer(r.data, dtype=np.uint8) for r in views]
data = ring.data_view()
other = RingBuffer.open(path)                  # a second, read-only mapping
other_reader = other.reader("oldest")
print("ready", flush=True)
sys.stdin.readline()                           # the test truncates the file now

# Touching zero-copy memory reads zeros instead of killing the process...
print("view-sum", int(sum(int(a.sum()) for a in arrays)), "data-sum", int(data[:4096].sum()), flush=True)
# ...and no view says it is valid.
print("views-valid", any(r.valid() for r in views), flush=True)
for name, op in [
    ("write-many-rows", lambda: ring.write_many(np.zeros((100, 64), np.uint8))),  # first: untripped
    ("read", lambda: reader.read()),
    ("read-timeout", lambda: reader.read(timeout=0.2)),
    ("other-read", lambda: other_reader.read()),
    ("write", lambda: ring.write(b"after")),
    ("reserve", lambda: ring.reserve(64)),
    ("arrow-write", lambda: ring.write_arrow_batch(batch, "volts")),
    ("snapshot", lambda: ring.read_snapshot()),
    ("new-reader", lambda: other.reader("oldest")),
    ("status", lambda: ring.status()),
]:
    try:
        op()
        print(name, "no-error", flush=True)
    except RingCorruptError as e:
        assert "truncated while mapped" in str(e), e
        print(name, "RingCorruptError", flush=True)
# Nothing already delivered is lost.
print("copies", [check_payload(r.data) for r in copies], flush=True)
ring.close()
other.close()
print("done", flush=True)
"""


def test_truncation_while_mapped_gives_ring_corrupt_error_not_sigbus(ring_path: str) -> None:
    child = _child(HOLDER, ring_path)
    _wait_line(child, "ready")
    os.truncate(ring_path, 12288)
    out, err = child.communicate("go\n", timeout=120)
    assert child.returncode == 0, f"child died (SIGBUS is -7): {child.returncode}\n{out}\n{err}"
    lines = out.splitlines()
    assert lines[0] == "view-sum 0 data-sum 0", lines
    assert lines[1] == "views-valid False"
    for name in (
        "write-many-rows",
        "read",
        "read-timeout",
        "other-read",
        "write",
        "reserve",
        "arrow-write",
        "snapshot",
        "new-reader",
        "status",
    ):
        assert f"{name} RingCorruptError" in lines, (name, lines, err)
    assert f"copies {list(range(10))}" in lines
    assert lines[-1] == "done"


PRODUCER = """
import sys
from payloads import make_payload
from rust_daq import RingBuffer, RingCorruptError

ring = RingBuffer.create(sys.argv[1], capacity_bytes=1 << 20)
print("ready", flush=True)
n = 0
try:
    while True:
        ring.write(make_payload(n, 500))
        n += 1
except RingCorruptError as e:
    print("RingCorruptError", "truncated while mapped" in str(e), n > 0, flush=True)
"""

READER = """
import sys
from payloads import check_payload
from rust_daq import RingBuffer, RingCorruptError

ring = RingBuffer.open(sys.argv[1])
reader = ring.reader("oldest")
got = 0
try:
    while True:
        for rec in reader.read(timeout=0.1):
            check_payload(rec.data)            # never a record of zeros
            got += 1
            if got == 1000:
                print("ready", flush=True)     # reading while the producer writes
except RingCorruptError as e:
    print("RingCorruptError", "truncated while mapped" in str(e), got >= 1000, flush=True)
"""


def test_producer_and_reader_processes_survive_a_truncation_by_a_third(ring_path: str) -> None:
    producer = _child(PRODUCER, ring_path)
    _wait_line(producer, "ready")
    reader = _child(READER, ring_path)
    _wait_line(reader, "ready")
    os.truncate(ring_path, 12288)
    for proc in (producer, reader):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"died with {proc.returncode}: {out}\n{err}"
        assert out.splitlines()[-1] == "RingCorruptError True True", (out, err)


# -- 2. corrupt header positions --------------------------------------------------------------

VICTIM = """
import sys
from rust_daq import RingBuffer, RingCorruptError

ring = RingBuffer.open(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()                           # the test corrupts the header now
for start in ("oldest", "latest", "tail"):
    try:
        reader = ring.reader(start)
        for _ in range(3):
            reader.read()
        reader.read(timeout=0.05)
        print(start, "read", flush=True)
    except RingCorruptError as e:
        print(start, "RingCorruptError", flush=True)
try:
    ring.read_snapshot()
    print("snapshot ok", flush=True)
except RingCorruptError:
    print("snapshot RingCorruptError", flush=True)
"""


@pytest.mark.parametrize("bad", [0, 64, 12345])
def test_corrupt_write_pos_in_a_mapped_ring_is_an_error_not_a_hang(ring_path: str, bad: int) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=8192) as ring:
        for i in range(300):  # several laps: oldest_pos is far from 0
            ring.write(i.to_bytes(8, "little") * 20)
        child = _child(VICTIM, ring_path)
        _wait_line(child, "ready")
        fd = os.open(ring_path, os.O_RDWR)
        try:
            os.pwrite(fd, struct.pack("<Q", bad), WRITE_POS)  # another process writes the header
        finally:
            os.close(fd)
        try:
            out, err = child.communicate("go\n", timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            pytest.fail(f"write_pos={bad}: the reader hung")
    assert child.returncode == 0, err
    assert "oldest RingCorruptError" in out.splitlines(), (out, err)


def test_commit_pos_beyond_write_pos_is_an_error_for_a_waiting_reader(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=8192) as ring:
        ring.write(b"x" * 100)
        child = _child(VICTIM, ring_path)
        _wait_line(child, "ready")
        fd = os.open(ring_path, os.O_RDWR)
        try:
            (write,) = struct.unpack("<Q", os.pread(fd, 8, WRITE_POS))
            os.pwrite(fd, struct.pack("<Q", write + 640), COMMIT_POS)
        finally:
            os.close(fd)
        out, err = child.communicate("go\n", timeout=120)
    assert child.returncode == 0, err
    lines = out.splitlines()
    assert "latest RingCorruptError" in lines and "oldest RingCorruptError" in lines, (out, err)


# -- 3. ring files strangers planted ----------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def test_ring_files_are_created_0600_whatever_the_umask(ring_path: str) -> None:
    old = os.umask(0)
    try:
        RingBuffer.create(ring_path, capacity_bytes=8192).close()
    finally:
        os.umask(old)
    assert os.stat(ring_path).st_mode & 0o777 == 0o600


@needs_root
def test_create_refuses_a_ring_planted_by_another_user(ring_path: str) -> None:
    RingBuffer.create(ring_path, capacity_bytes=8192).close()
    os.chown(ring_path, 65534, 65534)
    os.chmod(ring_path, 0o666)
    for attach in (
        lambda: RingBuffer.create(ring_path, capacity_bytes=8192),
        lambda: RingBuffer.create(ring_path, capacity_bytes=8192, replace=True),
        lambda: RingBuffer.open(ring_path, writable=True),
    ):
        with pytest.raises(PermissionError) as info:
            attach()
        assert isinstance(info.value, RustDaqError)
        msg = str(info.value)
        assert "owned by uid 65534" in msg and "mode 0666" in msg and "Remove it" in msg, msg
    # Reading someone else's readable ring stays allowed.
    with RingBuffer.open(ring_path) as ro:
        assert ro.reader("oldest").read() == []


@needs_root
def test_create_refuses_a_planted_non_ring_file(ring_path: str) -> None:
    with open(ring_path, "wb") as f:
        f.write(bytes(8192))
    os.chown(ring_path, 65534, 65534)
    os.chmod(ring_path, 0o666)
    with pytest.raises(PermissionError, match="owned by uid 65534"):
        RingBuffer.create(ring_path, capacity_bytes=8192)


def test_create_refuses_an_own_ring_open_to_other_users(ring_path: str) -> None:
    RingBuffer.create(ring_path, capacity_bytes=8192).close()
    os.chmod(ring_path, 0o644)
    with pytest.raises(PermissionError, match="mode 0644") as info:
        RingBuffer.create(ring_path, capacity_bytes=8192)
    assert isinstance(info.value, RustDaqError)


def test_create_refuses_a_symlink_at_the_ring_path(ring_path: str) -> None:
    target = ring_path + "-target"
    RingBuffer.create(target, capacity_bytes=8192).close()
    os.symlink(target, ring_path)
    with pytest.raises(PermissionError, match="symlink") as info:
        RingBuffer.create(ring_path, capacity_bytes=8192)
    assert isinstance(info.value, RustDaqError)


# -- 4. plain records and Arrow streams do not share sequence counters ------------------------


def _batch(i: int) -> pa.RecordBatch:
    return pa.record_batch({"v": pa.array([float(i)] * 4)})


def test_plain_writes_and_an_arrow_stream_keep_their_own_stream_seq(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        for i in range(10):
            ring.write(b"plain %d" % i, stream=1)
            ring.write_arrow_batch(_batch(i), "volts")
        reader = ring.reader("oldest")
        records = reader.read()
    arrow = [r for r in records if r.schema_id != 0]
    plain = [r for r in records if r.schema_id == 0]
    assert len(arrow) == 10 and len(plain) == 10
    assert [r.stream_seq for r in arrow] == list(range(10))
    assert [r.stream_seq for r in plain] == list(range(10))
    assert {r.stream for r in arrow}.isdisjoint({r.stream for r in plain})


def test_plain_writes_to_an_arrow_streams_id_are_refused(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        ring.write_arrow_batch(_batch(0), "volts")
        stream_id = ring.reader("oldest").read()[-1].stream
        for i in range(10):
            with pytest.raises(RingUsageError, match="'volts'|\"volts\""):
                ring.write(b"plain", stream=stream_id)
            with pytest.raises(RingUsageError):
                ring.write_many([b"plain"], stream=stream_id)
            with pytest.raises(RingUsageError):
                ring.reserve(8, stream=stream_id)
            ring.write_arrow_batch(_batch(i + 1), "volts")
        records = [r for r in ring.reader("oldest").read() if r.stream == stream_id]
    assert [r.stream_seq for r in records] == list(range(11))


# -- 5. raw library errors from corrupt Arrow data --------------------------------------------


def _arrow_ring(path: str) -> None:
    with RingBuffer.create(path, capacity_bytes=1 << 16) as ring:
        ring.write(b"plain bytes, not an Arrow message " * 3)
        for i in range(3):
            ring.write_arrow_batch(_batch(i), "volts")


def test_a_plain_record_with_a_mutated_schema_id_is_counted_not_raised(ring_path: str) -> None:
    _arrow_ring(ring_path)
    with open(ring_path, "r+b") as f:
        f.seek(DATA + 48)  # the first record's schema_id (docs/ring-format.md)
        f.write(struct.pack("<I", 1))
    with RingBuffer.open(ring_path) as ring:
        reader = ring.reader("oldest")
        got = reader.read_batches()
        assert [name for name, _ in got] == ["volts"] * 3
        assert reader.undecodable == 1


def test_a_corrupt_schema_table_is_a_ring_corrupt_error(ring_path: str) -> None:
    _arrow_ring(ring_path)
    with open(ring_path, "r+b") as f:
        f.seek(SCHEMA_REGION + 64 + 64 + 64)  # inside the first entry's schema bytes
        f.write(b"\x07" * 32)
    with RingBuffer.open(ring_path) as ring:
        with pytest.raises(RingCorruptError):
            ring.streams()
        with pytest.raises(RingCorruptError):
            ring.latest("volts")
        reader = ring.reader("oldest")
        got = reader.read_batches()  # every record counted, none raised
        assert got == [] and reader.undecodable == 3 and reader.not_arrow == 1


# -- 6. consistent validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"capacity_mb": float("nan")},
        {"capacity_mb": float("inf")},
        {"capacity_mb": -float("inf")},
        {"capacity_bytes": 2**64},
        {"capacity_bytes": 2**70},
    ],
)
def test_impossible_capacities_are_ring_config_errors(ring_path: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(RingConfigError):
        RingBuffer.create(ring_path, **kwargs)  # type: ignore[arg-type]
    assert not os.path.exists(ring_path)


def test_a_250_byte_ring_name_works_and_a_300_byte_one_is_a_config_error(ring_path: str) -> None:
    directory = os.path.dirname(ring_path)
    name = os.path.basename(ring_path)
    long = os.path.join(directory, name + "x" * (250 - len(name)))
    try:
        with RingBuffer.create(long, capacity_bytes=8192) as ring:
            ring.write(b"hello")
        with RingBuffer.open(long) as ring:
            assert ring.reader("oldest").read()[0].data == b"hello"
    finally:
        if os.path.exists(long):
            os.unlink(long)
    with pytest.raises(RingConfigError, match="300 bytes"):
        RingBuffer.create(os.path.join(directory, name + "y" * (300 - len(name))), capacity_bytes=8192)


WAITER = """
import sys
from rust_daq import RingBuffer, RingCorruptError

ring = RingBuffer.open(sys.argv[1])
reader = ring.reader("oldest")
got = len(reader.read())
print("ready", flush=True)
try:
    while True:
        got += len(reader.read(timeout=0.1))  # caught up: it waits, touching only the header
except RingCorruptError as e:
    print("RingCorruptError", "truncated" in str(e), got, flush=True)
"""


def test_a_waiting_reader_learns_of_a_truncation_with_its_producer_gone(ring_path: str) -> None:
    """The reader waits for records that will never come (its producer closed) when a third
    process truncates the file: it touches no page that faults, so only checking the file's
    size while it waits tells it. It used to wait forever."""
    with RingBuffer.create(ring_path, capacity_bytes=1 << 20) as ring:
        for i in range(200):
            ring.write(i.to_bytes(8, "little") * 100)
    waiter = _child(WAITER, ring_path)
    _wait_line(waiter, "ready")
    os.truncate(ring_path, 12288)
    try:
        out, err = waiter.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        waiter.kill()
        waiter.communicate()
        pytest.fail("the waiting reader never noticed the truncation")
    assert waiter.returncode == 0, err
    assert out.splitlines()[-1] == "RingCorruptError True 200", out


ARROW_WRITER = """
import os, sys
import pyarrow as pa
from rust_daq import RingBuffer, RingCorruptError

ring = RingBuffer.create(sys.argv[1], capacity_bytes=1 << 20)
ring.write_arrow_batch(pa.record_batch({"x": list(range(1000))}), "s")
mm, data_offset, _ = ring._arrow_writer.file  # pyarrow's own map of the ring file
os.truncate(sys.argv[1], 12288)        # as another process would, mid-run
mm.seek(data_offset + 600_000)         # pyarrow writes a batch where the file is gone now
mm.write(b"x" * 4096)
try:
    ring.write_arrow_batch(pa.record_batch({"x": [1]}), "s")
    print("written", flush=True)
except RingCorruptError as e:
    print("RingCorruptError", "truncated" in str(e), flush=True)
"""


def test_pyarrows_map_of_a_truncated_ring_is_guarded_too(ring_path: str) -> None:
    """Arrow batches are serialised through pyarrow's own map of the ring file; a truncation
    that lands while pyarrow writes used to end the process with SIGBUS."""
    child = _child(ARROW_WRITER, ring_path)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, f"died with {child.returncode}: {err}"
    assert out.splitlines()[-1] == "RingCorruptError True", (out, err)
