"""Physical limits, measured in the same run as the cases they bound, and the ring's own
in-process write path beside them.

- numpy single-core copy bandwidth, for the memory patterns the cases use: 1 MiB into 1 MiB
  (in cache), and 1 MiB or 4 MiB blocks cycling through as much memory as every transport of
  the cross-process cases buffers for them (``transports.depth``: 16 and 32 MiB);
- a no-op call into the extension (``ring._noop()``), the floor of any native call from
  Python, beside ``ring.write`` of 64 B (what a message costs the producer) and the reads of
  64 B records, one ``Record`` each (``read``) or in bulk (``read_into``: what a message costs
  the consumer);
- sequential file write bandwidth to the filesystem the storage cases write to, 4 MiB
  ``os.write`` calls, both into the page cache (what h5py and the writer see) and with an
  ``fsync`` at the end (what the disk sustains).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import numpy as np

from rust_daq import RingBuffer

from ._common import MiB, Table, fmt_rate, median_of, median_rate, scratch_dir, shm_path
from .transports import BUFFER, depth


def copy_bandwidth(block: int, span: int, n: int, reps: int) -> float:
    """Bytes/s of np.copyto of `block`-byte blocks cycling through a `span`-byte buffer."""
    src = np.random.default_rng(1).integers(0, 255, block, dtype=np.uint8)
    dst = np.empty(span, dtype=np.uint8)
    slots = max(span // block, 1)
    views = [dst[i * block : (i + 1) * block] for i in range(slots)]

    def do(k: int) -> None:
        for i in range(k):
            np.copyto(views[i % slots], src)

    do(slots)  # every page of the destination touched once
    return median_rate(do, n, reps) * block


def call_rates(n: int, reps: int) -> dict[str, float]:
    path = shm_path("limits")
    try:
        with RingBuffer.create(path, capacity_bytes=BUFFER) as ring:
            payload = b"\xa5" * 64
            write, noop = ring.write, ring._noop
            batch = [payload] * 10_000

            def do_write(k: int) -> None:
                for _ in range(k):
                    write(payload)

            def do_write_many(k: int) -> None:
                for _ in range(k // len(batch)):
                    ring.write_many(batch)

            def do_noop(k: int) -> None:
                for _ in range(k):
                    noop()

            def do_empty(k: int) -> None:
                for _ in range(k):
                    pass

            frame = np.random.default_rng(0).integers(0, 255, MiB, dtype=np.uint8)

            def do_frames(k: int) -> None:
                for _ in range(k):
                    write(frame)

            # The consumer's side alone: one lap of 64 B records (write_many), read back.
            per_lap = ring.capacity // 128

            def reads_alone(bulk: bool, k: int) -> float:
                # Timed without the writes that fill the ring.
                rows = np.empty((4096, 64), np.uint8)
                total = 0.0
                for _ in range(max(k // per_lap, 1)):
                    ring.write_many([payload] * per_lap)
                    rd, got = ring.reader("oldest"), 0
                    t0 = time.perf_counter()
                    while got < per_lap:
                        got += rd.read_into(rows) if bulk else len(rd.read(4096))
                    total += time.perf_counter() - t0
                return max(k // per_lap, 1) * per_lap / total

            do_frames(ring.capacity // MiB + 1)  # one lap: every page of the ring touched
            read_n = max(n // 4, per_lap)
            return {
                "ring_read_64B": median_of([reads_alone(False, read_n) for _ in range(reps)]),
                "ring_read_into_64B": median_of([reads_alone(True, read_n) for _ in range(reps)]),
                "ring_write_64B": median_rate(do_write, n, reps),
                "ring_write_many_64B": median_rate(do_write_many, n, reps),
                "noop_call": median_rate(do_noop, n, reps),
                "empty_loop": median_rate(do_empty, n, reps),
                "ring_write_1MiB_Bps": median_rate(do_frames, max(n // 2000, 64), reps) * MiB,
            }
    finally:
        if os.path.exists(path):
            os.unlink(path)


def file_write(directory: str, total: int, reps: int) -> dict[str, float]:
    """Bytes/s of sequential 4 MiB writes of `total` bytes to a new file in `directory`."""
    block = np.random.default_rng(2).integers(0, 255, 4 * MiB, dtype=np.uint8).tobytes()
    cached, synced = [], []
    for r in range(reps):
        path = os.path.join(directory, f"limit-{r}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.perf_counter()
            for _ in range(total // len(block)):
                os.write(fd, block)
            t1 = time.perf_counter()
            os.fsync(fd)
            t2 = time.perf_counter()
        finally:
            os.close(fd)
            os.unlink(path)
        cached.append(total / (t1 - t0))
        synced.append(total / (t2 - t0))
    return {"file_write_Bps": median_of(cached), "file_write_fsync_Bps": median_of(synced)}


def run(quick: bool, reps: int, storage: str) -> dict[str, Any]:
    n_copies = 200 if quick else 2000
    res: dict[str, Any] = {
        "copy_1MiB_in_cache_Bps": copy_bandwidth(MiB, MiB, n_copies, reps),
        "copy_1MiB_through_buffer_Bps": copy_bandwidth(MiB, depth(MiB) * MiB, n_copies, reps),
        "copy_4MiB_through_buffer_Bps": copy_bandwidth(
            4 * MiB, depth(4 * MiB) * 4 * MiB, n_copies // 4, reps
        ),
    }
    res.update(call_rates(300_000 if quick else 3_000_000, reps))
    tmp = scratch_dir(storage)
    try:
        res.update(file_write(tmp, (128 if quick else 512) * MiB, reps))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["storage_dir"] = storage
    return res


def tables(res: dict[str, Any]) -> list[Table]:
    def gbs(v: float) -> str:
        return f"{v / 1e9:.1f} GB/s"

    calls = Table(
        "Calls from Python (one process)",
        ["", "calls/s", "ns/call"],
        [
            [label, fmt_rate(res[k]) + "/s", f"{1e9 / res[k]:.0f}"]
            for label, k in [
                ("empty Python loop iteration", "empty_loop"),
                ("no-op native call `ring._noop()` (limit)", "noop_call"),
                ("`ring.write(64 B)`", "ring_write_64B"),
                ("`ring.write_many([64 B] * 10000)`, per record", "ring_write_many_64B"),
                ("`reader.read(4096)` of 64 B records, per record", "ring_read_64B"),
                ("`reader.read_into((4096, 64) array)`, per record", "ring_read_into_64B"),
            ]
        ],
    )
    mib = BUFFER // MiB
    copy = Table(
        "Copy and file bandwidth (one core)",
        ["", "bandwidth"],
        [
            ["numpy copy 1 MiB → 1 MiB, in cache", gbs(res["copy_1MiB_in_cache_Bps"])],
            [
                f"numpy copy, 1 MiB blocks through {depth(MiB)} MiB (limit, case 2)",
                gbs(res["copy_1MiB_through_buffer_Bps"]),
            ],
            [
                f"numpy copy, 4 MiB blocks through {4 * depth(4 * MiB)} MiB (limit, case 2)",
                gbs(res["copy_4MiB_through_buffer_Bps"]),
            ],
            [f"`ring.write(1 MiB)` into a {mib} MiB ring, one process", gbs(res["ring_write_1MiB_Bps"])],
            [
                f"sequential file write to {res['storage_dir']}, page cache (limit, case 5)",
                gbs(res["file_write_Bps"]),
            ],
            ["the same with fsync at the end", gbs(res["file_write_fsync_Bps"])],
        ],
    )
    return [calls, copy]
