"""The HDF5 writer beside a hand-written h5py loop, in one run.

    python benchmarks/hdf5_writer.py [--quick] [--json FILE]

1. Drain throughput: the ring is filled with 10,000-row batches of two float64 columns (and,
   separately, 512x512 uint16 frames, one per batch); `HDF5Writer.flush_to_disk()` drains it
   into a file; a plain h5py loop writes the same arrays into the same chunked layout
   (resize + write per batch, one flush). Target (issue 4): writer >= 0.9x the h5py loop.
2. Sustained: a producer at 1 M rows/s (100 batches/s of 10,000 rows) for a few seconds
   with the writer in its own process (`python -m rust_daq.writer`); reports rows written,
   records lost, and the writer process's resident memory at the start and the end.
Runs alternate (writer, h5py, writer, ...) so both see the same machine state. Files go to a
temporary directory in /dev/shm by default, which measures the software path without disk
writeback stalls (on this shared machine they made repeated 150 MB writes vary 5x); set
RDAQ_BENCH_DIR to a disk directory to include the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np
import pyarrow as pa

from rust_daq import HDF5Writer, RingBuffer


def volt_batches(n: int, rows: int = 10_000) -> list[pa.RecordBatch]:
    rng = np.random.default_rng(0)
    return [
        pa.record_batch([rng.standard_normal(rows), rng.standard_normal(rows)], names=["voltage", "current"])
        for _ in range(n)
    ]


def frame_batches(n: int) -> list[pa.RecordBatch]:
    """Distinct frames: a pool reused from the CPU cache would flatter the plain h5py loop."""
    rng = np.random.default_rng(1)
    return [
        pa.record_batch(
            [
                pa.FixedShapeTensorArray.from_numpy_ndarray(
                    rng.integers(0, 4096, (1, 512, 512), dtype=np.uint16)
                )
            ],
            names=["frame"],
        )
        for _ in range(n)
    ]


def alternating(a: Callable[[], float], b: Callable[[], float], reps: int) -> tuple[float, float]:
    """Medians of `reps` runs of a and b, interleaved."""
    ra, rb = [], []
    for _ in range(reps):
        ra.append(a())
        rb.append(b())
    return statistics.median(ra), statistics.median(rb)


def writer_drain(batches: list[pa.RecordBatch], ring_path: str, out: str) -> float:
    """Seconds for the writer to drain `batches` from a ring into a new file."""
    size = sum(pa.ipc.get_record_batch_size(b) + 64 for b in batches)
    if os.path.exists(ring_path):
        os.unlink(ring_path)  # a fresh ring per run (create() would reopen one of this size)
    with RingBuffer.create(ring_path, capacity_bytes=size + (64 << 20)) as ring:
        for b in batches:
            ring.write_arrow_batch(b, "s")
        w = HDF5Writer(out, ring, swmr=False)
        t0 = time.perf_counter()
        w.flush_to_disk()
        w.close()
        dt = time.perf_counter() - t0
    os.unlink(out)
    return dt


def h5py_loop(batches: list[pa.RecordBatch], out: str) -> float:
    """Seconds for a hand-written h5py loop to write the same arrays, same chunking."""
    t0 = time.perf_counter()
    with h5py.File(out, "w", libver=("v110", "v110")) as f:
        dsets = {}
        for name in batches[0].schema.names:
            col = batches[0].column(name)
            if isinstance(col, pa.FixedShapeTensorArray):
                shape = col.to_numpy_ndarray().shape[1:]
                dsets[name] = f.create_dataset(
                    name, (0, *shape), maxshape=(None, *shape), dtype=np.uint16, chunks=(1, *shape)
                )
            else:
                dsets[name] = f.create_dataset(
                    name, (0,), maxshape=(None,), dtype=np.float64, chunks=(131072,)
                )
        n = 0
        for b in batches:
            rows = b.num_rows
            for name, ds in dsets.items():
                col = b.column(name)
                arr = col.to_numpy_ndarray() if isinstance(col, pa.FixedShapeTensorArray) else col.to_numpy()
                ds.resize(n + rows, axis=0)
                ds[n : n + rows] = arr
            n += rows
        f.flush()
    dt = time.perf_counter() - t0
    os.unlink(out)
    return dt


def rss_kb(pid: int) -> int:
    """The process's private resident memory (RssAnon). VmRSS would also count the shared
    ring pages it maps and touches, which grow to the ring's size without being its memory."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def sustained(seconds: float, ring_path: str, out: str) -> dict[str, Any]:
    rows, rate = 10_000, 100  # batches per second: 1 M rows/s
    batch = volt_batches(1, rows)[0]
    if os.path.exists(ring_path):
        os.unlink(ring_path)
    with RingBuffer.create(ring_path, capacity_mb=256) as ring:
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rust_daq.writer",
                "--ring",
                ring_path,
                "--output",
                out,
                "--flush-interval",
                "0.5",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        rss = [rss_kb(p.pid)]
        t0 = time.perf_counter()
        n = int(seconds * rate)
        for i in range(n):
            ring.write_arrow_batch(batch, "volts")
            while time.perf_counter() < t0 + (i + 1) / rate:
                time.sleep(0.0005)
            if i % rate == 0:
                rss.append(rss_kb(p.pid))
        rss.append(rss_kb(p.pid))
        time.sleep(1.0)
        p.terminate()
        p.communicate(timeout=60)
        lost = ring.records_lost
    with h5py.File(out, "r") as f:
        written = f["measurements/volts/voltage"].shape[0]
    return {
        "rows_produced": float(n * rows),
        "rows_written": float(written),
        "records_lost": float(lost),
        "rss_start_mb": rss[1] / 1024,
        "rss_end_mb": rss[-1] / 1024,
        "rss_max_mb": max(rss) / 1024,
        "rss_samples_mb": [round(r / 1024) for r in rss],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    reps = 3 if args.quick else 5
    n_volts = 20 if args.quick else 200
    n_frames = 20 if args.quick else 300
    tmp = tempfile.mkdtemp(prefix="rdaq-h5bench-", dir=os.environ.get("RDAQ_BENCH_DIR", "/dev/shm"))
    ring_path = f"/dev/shm/rdaq-bench-h5-{os.getpid()}"
    out = os.path.join(tmp, "bench.h5")
    try:
        volts, frames = volt_batches(n_volts), frame_batches(n_frames)
        res: dict[str, Any] = {}
        res["volts_writer_s"], res["volts_h5py_s"] = alternating(
            lambda: writer_drain(volts, ring_path, out), lambda: h5py_loop(volts, out), reps
        )
        res["frames_writer_s"], res["frames_h5py_s"] = alternating(
            lambda: writer_drain(frames, ring_path, out), lambda: h5py_loop(frames, out), reps
        )
        sus = sustained(2.0 if args.quick else 10.0, ring_path, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(ring_path):
            os.unlink(ring_path)

    rows = n_volts * 10_000
    print(
        f"rust-daq HDF5 writer ({platform.machine()}, {os.cpu_count()} CPUs, h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version})"
    )
    print(f"medians of {reps} runs; files on {tmp.rsplit('/', 1)[0]}\n")
    print(f"{'2 float64 columns, 10,000-row batches':44} {'M rows/s':>10} {'writer/h5py':>12}")
    print(
        f"{'HDF5Writer draining the ring':44} {rows / res['volts_writer_s'] / 1e6:>10.2f} {res['volts_h5py_s'] / res['volts_writer_s']:>12.2f}"
    )
    print(
        f"{'hand-written h5py loop, same chunking':44} {rows / res['volts_h5py_s'] / 1e6:>10.2f} {1.0:>12.2f}"
    )
    print(f"\n{'512x512 uint16 frames, one per batch':44} {'frames/s':>10} {'writer/h5py':>12}")
    print(
        f"{'HDF5Writer draining the ring':44} {n_frames / res['frames_writer_s']:>10.0f} {res['frames_h5py_s'] / res['frames_writer_s']:>12.2f}"
    )
    print(
        f"{'hand-written h5py loop, same chunking':44} {n_frames / res['frames_h5py_s']:>10.0f} {1.0:>12.2f}"
    )
    for name, key in [("2 columns", "volts"), ("frames", "frames")]:
        ratio = res[f"{key}_h5py_s"] / res[f"{key}_writer_s"]
        print(f"target writer >= 0.9x h5py, {name}: {ratio:.2f} ({'met' if ratio >= 0.9 else 'MISSED'})")
    print(
        f"\nsustained 1 M rows/s, writer in its own process: {sus['rows_written']:.0f} of {sus['rows_produced']:.0f} rows "
        f"written, {sus['records_lost']:.0f} records lost; writer private memory (RssAnon) {sus['rss_start_mb']:.0f} MB at start, "
        f"{sus['rss_end_mb']:.0f} MB at the end (max {sus['rss_max_mb']:.0f} MB)"
    )
    print(f"writer private memory each second (MB): {sus['rss_samples_mb']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, **sus}, f, indent=2)


if __name__ == "__main__":
    main()
