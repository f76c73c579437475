"""Zero-copy batches the producer has lapped: no access through them may crash the process
(issue 15, item 5). Run in a child process, so that a crash fails the test instead of
killing pytest."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHILD = r"""
import sys
import pyarrow as pa, pyarrow.compute as pc
from rust_daq import RingBuffer

ring = RingBuffer.create(sys.argv[1], capacity_bytes=256 * 1024)
reader = ring.reader("oldest")
kinds = {
    "str": lambda n: pa.array(["ab"] * n),
    "list": lambda n: pa.array([[1.5, 2.5]] * n, pa.list_(pa.float64())),
    "view": lambda n: pa.array(["ab" * 10] * n, pa.string_view()),
    "union": lambda n: pa.UnionArray.from_dense(
        pa.array([0, 1] * (n // 2), pa.int8()), pa.array([i // 2 for i in range(n)], pa.int32()),
        [pa.array(range(n // 2)), pa.array(["x"] * (n // 2))]),
}
col = kinds[sys.argv[2]]
for _ in range(5):
    ring.write_arrow_batch(pa.record_batch({"c": col(500)}), "s")
held = reader.read_batches(copy=False)
assert len(held) == 5, (held, reader.undecodable)
for _ in range(200):  # lap them many times with other bytes
    ring.write_arrow_batch(pa.record_batch({"c": pa.array(["\xff" * 4000])}), "t")
total = 0
for _, b in held:
    c = b.column("c")
    if sys.argv[2] in ("str", "view"):
        total += pc.sum(pc.utf8_length(c.cast(pa.string()))).as_py()
    elif sys.argv[2] == "list":
        total += len(pc.list_flatten(c))
    c.to_pylist()
    b.validate(full=True)
print("ok", total, [reader.batch_valid(b) for _, b in held].count(True))
"""


@pytest.mark.parametrize("kind", ["str", "list", "view", "union"])
def test_lapped_zero_copy_batches_never_crash(ring_path: str, kind: str) -> None:
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, ring_path, kind], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, f"the reader process died ({p.returncode}): {p.stderr[-2000:]}"
    words = p.stdout.split()
    assert words[0] == "ok"
    if kind == "str":
        assert int(words[1]) == 5 * 500 * 2, "the batches read before the lap hold what was written"
