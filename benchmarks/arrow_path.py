"""Arrow write path: `ring.write_arrow_batch` beside pyarrow's own IPC writer serialising the
same batches into memory, in one run.

    python benchmarks/arrow_path.py [--quick] [--json FILE]

Cases: 1000-row batches of (int64 timestamp, float64 voltage), reported in rows/s (and
10,000-row batches, to show how the fixed per-record cost of the ring path amortises); and
512x512 uint16 camera frames (one `fixed_shape_tensor` frame per batch), in frames/s. The
peers serialise with `pa.ipc.new_stream(sink, schema).write_batch(b)` into a growing
`BufferOutputStream` (what most code does) and into a preallocated buffer through
`FixedSizeBufferWriter` (one copy, no reallocation: the floor for serialising at all).
Target (issue 3): ring path / serialising alone >= 1.0, since the ring must not add a copy.
Medians of several repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from rust_daq import RingBuffer


def median_seconds(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def voltmeter_batches(n: int, rows: int = 1000) -> list[pa.RecordBatch]:
    schema = pa.schema(
        [
            pa.field("timestamp", pa.int64(), metadata={"units": "ns"}),
            pa.field("voltage", pa.float64(), metadata={"units": "V"}),
        ]
    )
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
        out.append(pa.record_batch([t, rng.standard_normal(rows)], schema=schema))
    return out


def frame_batches(n: int, distinct: int = 8) -> list[pa.RecordBatch]:
    rng = np.random.default_rng(1)
    pool = [
        pa.record_batch(
            [
                pa.FixedShapeTensorArray.from_numpy_ndarray(
                    rng.integers(0, 4096, (1, 512, 512), dtype=np.uint16)
                )
            ],
            names=["frame"],
        )
        for _ in range(distinct)
    ]
    return [pool[i % distinct] for i in range(n)]


def measure(batches: list[pa.RecordBatch], ring_path: str, reps: int) -> dict[str, float]:
    schema = batches[0].schema
    total = sum(pa.ipc.get_record_batch_size(b) for b in batches)

    with RingBuffer.create(ring_path, capacity_mb=100, replace=True) as ring:
        write = ring.write_arrow_batch

        def ring_path_fn() -> None:
            for b in batches:
                write(b, "bench")

        ring_s = median_seconds(ring_path_fn, reps)

    def growing() -> None:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as w:
            for b in batches:
                w.write_batch(b)
        sink.getvalue()

    target = pa.allocate_buffer(total + (1 << 20))

    def preallocated() -> None:
        with pa.ipc.new_stream(pa.FixedSizeBufferWriter(target), schema) as w:
            for b in batches:
                w.write_batch(b)

    return {
        "ring_s": ring_s,
        "growing_s": median_seconds(growing, reps),
        "prealloc_s": median_seconds(preallocated, reps),
        "bytes": float(total),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    n_batches = 500 if args.quick else 5000
    n_frames = 100 if args.quick else 1000
    path = f"/dev/shm/rdaq-bench-arrow-{os.getpid()}"
    try:
        volts = measure(voltmeter_batches(n_batches), path, reps)
        volts10k = measure(voltmeter_batches(n_batches // 10, rows=10_000), path, reps)
        cams = measure(frame_batches(n_frames), path, reps)
    finally:
        if os.path.exists(path):
            os.unlink(path)

    print(
        f"rust-daq Arrow write path ({platform.machine()}, {os.cpu_count()} CPUs, pyarrow {pa.__version__})"
    )
    print(f"medians of {reps} runs\n")
    peers = [
        ("ring.write_arrow_batch", "ring_s"),
        ("pyarrow IPC writer -> BufferOutputStream", "growing_s"),
        ("pyarrow IPC writer -> preallocated buffer", "prealloc_s"),
    ]
    for title, res, rows in [
        ("1000-row batches (int64, float64)", volts, n_batches * 1000),
        ("10,000-row batches (int64, float64)", volts10k, (n_batches // 10) * 10_000),
    ]:
        print(f"{title:52} {'M rows/s':>10} {'MB/s':>8} {'ring/this':>10}")
        for label, key in peers:
            s = res[key]
            print(
                f"{label:52} {rows / s / 1e6:>10.2f} {res['bytes'] / s / 1e6:>8.0f} {s / res['ring_s']:>10.2f}"
            )
        print()
    print(f"{'512x512 uint16 frames (fixed_shape_tensor)':52} {'frames/s':>10} {'MB/s':>8} {'ring/this':>10}")
    for label, key in peers:
        s = cams[key]
        print(f"{label:52} {n_frames / s:>10.0f} {cams['bytes'] / s / 1e6:>8.0f} {s / cams['ring_s']:>10.2f}")
    print("\ntarget: ring path at least as fast as serialising alone (ratio >= 1.0)")
    for name, res in [("1000-row", volts), ("10,000-row", volts10k), ("frames", cams)]:
        for peer, key in [("BufferOutputStream", "growing_s"), ("preallocated", "prealloc_s")]:
            ratio = res[key] / res["ring_s"]
            print(f"  {name:11} vs {peer:19} {ratio:5.2f}  {'met' if ratio >= 1.0 else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"voltmeter": volts, "voltmeter_10k": volts10k, "camera": cams}, f, indent=2)


if __name__ == "__main__":
    main()
