"""Case 4: Arrow record batches from one process to another, as pyarrow on the other side.

Ours: the producer calls ``ring.write_arrow_batch(batch, "volts")`` (policy ``block``); the
consumer calls ``reader.read_batches()`` and commits what it used, either with private copies
(``copy=True``) or reading the batches in place (``copy=False``, checked with
``batch_valid`` before the commit). The peer: ``pyarrow.ipc.new_stream`` over an OS pipe,
read with ``pyarrow.ipc.open_stream``. Batches of (int64 timestamp, float64 voltage) with
1,000 and 10,000 rows; every consumer checks that each batch's first timestamp is the one
expected (complete and in order) and reports rows/s from the producer's first write to the
consumer's last read.

Beside them, in one process, the write path alone: ``write_arrow_batch`` against pyarrow's
IPC writer serialising the same batches into memory (the floor for serialising at all).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from rust_daq import RingBuffer

from ._common import MiB, Table, fmt_rate, median_of, median_rate, shm_path
from .ipc import run_processes

STREAM = "volts"


def make_batches(rows: int, distinct: int = 16) -> list[pa.RecordBatch]:
    """`distinct` batches of `rows` rows; batch k of a run is pool[k % distinct] with its
    timestamps shifted, so each carries its index."""
    rng = np.random.default_rng(0)
    schema = pa.schema(
        [
            pa.field("timestamp", pa.int64(), metadata={"units": "ns"}),
            pa.field("voltage", pa.float64(), metadata={"units": "V"}),
        ]
    )
    return [
        pa.record_batch([np.arange(rows, dtype=np.int64), rng.standard_normal(rows)], schema=schema)
        for _ in range(distinct)
    ]


class Stamped:
    """Batches whose first timestamp is set to the batch's index before it is sent: the
    batches wrap numpy arrays without a copy, and the arrays stay writable here."""

    def __init__(self, rows: int) -> None:
        pool = make_batches(rows)
        self.stamps = [b.column(0).to_numpy().copy() for b in pool]
        self.batches = [
            pa.record_batch([t, b.column(1)], schema=b.schema) for t, b in zip(self.stamps, pool, strict=True)
        ]

    def __call__(self, k: int) -> pa.RecordBatch:
        i = k % len(self.batches)
        self.stamps[i][0] = k
        return self.batches[i]


def _ring_producer(path: str, rows: int, count: int, barrier: Any) -> dict[str, Any]:
    stamped = Stamped(rows)
    with RingBuffer.open(path, writable=True) as ring:
        write = ring.write_arrow_batch
        barrier.wait()
        t0 = time.monotonic()
        for k in range(count):
            write(stamped(k), STREAM)
    return {"t0": t0}


def _ring_consumer(path: str, count: int, copy: bool, barrier: Any) -> dict[str, Any]:
    with RingBuffer.open(path) as ring:
        reader = ring.reader("oldest")
        barrier.wait()
        k = rows = 0
        while k < count:
            got = reader.read_batches(max_records=256, timeout=1.0, copy=copy)
            for _, b in got:
                first = b.column(0)[0].as_py()
                if first != k:
                    raise RuntimeError(f"batch {k} expected, got {first}")
                rows += b.num_rows
                k += 1
            if got and not copy and not reader.batch_valid(got[-1][1]):
                raise RuntimeError("a batch read in place was overwritten before its commit")
            reader.commit()
        return {"t_end": time.monotonic(), "rows": rows, "lost": reader.lost}


def _pipe_producer(fds: tuple[int, int], rows: int, count: int, barrier: Any) -> dict[str, Any]:
    os.close(fds[0])
    stamped = Stamped(rows)
    with pa.output_stream(os.fdopen(fds[1], "wb", buffering=0)) as sink:
        barrier.wait()
        t0 = time.monotonic()
        with pa.ipc.new_stream(sink, stamped.batches[0].schema) as w:
            for k in range(count):
                w.write_batch(stamped(k))
    return {"t0": t0}


def _pipe_consumer(fds: tuple[int, int], count: int, barrier: Any) -> dict[str, Any]:
    os.close(fds[1])
    with pa.input_stream(os.fdopen(fds[0], "rb", buffering=MiB)) as source:
        barrier.wait()
        k = rows = 0
        for b in pa.ipc.open_stream(source):
            first = b.column(0)[0].as_py()
            if first != k:
                raise RuntimeError(f"batch {k} expected, got {first}")
            rows += b.num_rows
            k += 1
    if k != count:
        raise RuntimeError(f"{k} of {count} batches arrived")
    return {"t_end": time.monotonic(), "rows": rows, "lost": 0}


def cross_process(peer: str, rows: int, count: int) -> float:
    """Rows/s of one run of `count` batches of `rows` rows."""
    if peer == "pipe":
        fds = os.pipe()

        def close_parent_ends() -> None:
            for fd in fds:
                os.close(fd)

        got = run_processes(
            peer,
            {
                "producer": (_pipe_producer, (fds, rows, count)),
                "consumer": (_pipe_consumer, (fds, count)),
            },
            timeout=300,
            started=close_parent_ends,
        )
    else:
        path = shm_path("arrow")
        RingBuffer.create(path, capacity_bytes=64 * MiB, policy="block", block_timeout=60).close()
        try:
            got = run_processes(
                peer,
                {
                    "producer": (_ring_producer, (path, rows, count)),
                    "consumer": (_ring_consumer, (path, count, peer == "ring_copy")),
                },
                timeout=300,
            )
        finally:
            os.unlink(path)
    c = got["consumer"]
    if c["rows"] != rows * count or c["lost"]:
        raise RuntimeError(f"{peer}: {c['rows']} rows of {rows * count}, {c['lost']} lost")
    return rows * count / (c["t_end"] - got["producer"]["t0"])


PEERS = {
    "ring_view": "rust-daq ring, `read_batches(copy=False)`",
    "ring_copy": "rust-daq ring, `read_batches(copy=True)`",
    "pipe": "Arrow IPC stream over a pipe",
}


def in_process(rows: int, n: int, reps: int) -> dict[str, float]:
    """Rows/s of serialising batches in one process: into the ring, into a growing buffer,
    into a preallocated one."""
    pool = make_batches(rows)
    batches = [pool[k % len(pool)] for k in range(n)]
    schema = batches[0].schema
    total = sum(pa.ipc.get_record_batch_size(b) for b in batches)
    path = shm_path("arrow-local")
    target = pa.allocate_buffer(total + MiB)

    def growing(k: int) -> None:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as w:
            for b in batches[:k]:
                w.write_batch(b)
        sink.getvalue()

    def preallocated(k: int) -> None:
        with pa.ipc.new_stream(pa.FixedSizeBufferWriter(target), schema) as w:
            for b in batches[:k]:
                w.write_batch(b)

    try:
        with RingBuffer.create(path, capacity_bytes=max(64 * MiB, 2 * total)) as ring:
            write = ring.write_arrow_batch

            def into_ring(k: int) -> None:
                for b in batches[:k]:
                    write(b, STREAM)

            while ring.write_head < ring.capacity:  # one lap first: every page mapped
                into_ring(min(n, 64))

            out = {"ring": median_rate(into_ring, n, reps) * rows}
    finally:
        os.unlink(path)
    out["growing"] = median_rate(growing, n, reps) * rows
    out["preallocated"] = median_rate(preallocated, n, reps) * rows
    return out


def run(quick: bool, reps: int) -> dict[str, Any]:
    res: dict[str, Any] = {"cross_process": {}, "in_process": {}}
    for rows in (1000, 10_000):
        count = (2_000_000 if quick else 20_000_000) // rows
        runs: dict[str, list[float]] = {p: [] for p in PEERS}
        for _ in range(reps):  # interleaved, so that every peer sees the same machine state
            for p in PEERS:
                runs[p].append(cross_process(p, rows, count))
        res["cross_process"][str(rows)] = {p: median_of(v) for p, v in runs.items()}
        res["in_process"][str(rows)] = in_process(rows, count, reps)
    return res


def tables(res: dict[str, Any]) -> list[Table]:
    cp = res["cross_process"]
    rows = []
    for p, label in PEERS.items():
        rows.append(
            [label]
            + [f"{fmt_rate(cp[r][p])} rows/s" for r in cp]
            + [f"{cp[r][p] / cp[r]['pipe']:.2f}x" for r in cp]
        )
    t1 = Table(
        "Case 4: Arrow batches, producer process to consumer process",
        ["", *[f"{int(r):,}-row batches" for r in cp], *[f"vs pipe, {int(r):,} rows" for r in cp]],
        rows,
    )
    ip = res["in_process"]
    labels: dict[str, str] = {
        "ring": "`ring.write_arrow_batch`",
        "growing": "pyarrow IPC writer → BufferOutputStream",
        "preallocated": "pyarrow IPC writer → preallocated buffer (serialising alone)",
    }
    t2 = Table(
        "Case 4, the write path alone (one process)",
        ["", *[f"{int(r):,}-row batches" for r in ip]],
        [[label, *[f"{fmt_rate(ip[r][k])} rows/s" for r in ip]] for k, label in labels.items()],
    )
    return [t1, t2]
