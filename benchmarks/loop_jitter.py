"""A 1 kHz hardware loop with the writer active, beside a naive loop that writes h5py inline.

    python benchmarks/loop_jitter.py [--seconds 60] [--quick]

Ours: `Acquisition` reading a simulated voltmeter at 1 kHz and writing every reading to the
ring at once (batch_rows=1, the worst case for write latency), with the HDF5 writer in its
own process (the default deployment). Naive: the same 1 kHz schedule in one process, each
reading appended to an h5py dataset inline (resize + write, flush every second).
Reported for both: per-write latency p50/p99/p99.9/max and missed deadlines.
Targets (issue 5): p99.9 write latency <= 100 us and no missed deadline at 1 kHz.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import anyio
import h5py
import numpy as np

from rust_daq import Acquisition, RingBuffer
from rust_daq.adapters import SimulatedVoltmeter


def ours(seconds: float, tmp: str) -> dict[str, float]:
    ring_path = f"/dev/shm/rdaq-jitter-{os.getpid()}"
    if os.path.exists(ring_path):
        os.unlink(ring_path)
    ring = RingBuffer.create(ring_path, capacity_mb=64)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rust_daq.writer",
            "--ring",
            ring_path,
            "--output",
            tempfile.mktemp(suffix=".h5", dir=tmp),  # a new file per run (a new ring session)
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    acq = Acquisition(ring, [SimulatedVoltmeter(rate_hz=1000)], batch_rows=1)

    async def main() -> None:
        async with acq:
            await acq.run(duration=seconds)

    anyio.run(main)
    writer.terminate()
    writer.communicate(timeout=60)
    stats = acq.stats()
    ring.close()
    os.unlink(ring_path)
    lat = stats["write_latency_us"]
    s = stats["streams"]["voltmeter"]
    return {**lat, "missed": s["deadlines_missed"], "writes": s["records"], "lost": stats["records_lost"]}


def naive(seconds: float, tmp: str) -> dict[str, float]:
    volt = SimulatedVoltmeter(rate_hz=1000)
    lat = []
    missed = 0
    with h5py.File(os.path.join(tmp, "naive.h5"), "w") as f:
        t_ds = f.create_dataset("timestamp", (0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        v_ds = f.create_dataset("voltage", (0,), maxshape=(None,), dtype=np.float64, chunks=(4096,))
        period = 1e-3
        start = time.perf_counter()
        last_flush = start
        k = n = 0
        while time.perf_counter() - start < seconds:
            deadline = start + k * period
            while time.perf_counter() < deadline:
                pass
            late = time.perf_counter() - deadline
            if late > period:
                skipped = int(late // period)
                missed += skipped
                k += skipped
            batch = anyio.run(volt.read)
            t0 = time.perf_counter()
            t_ds.resize(n + 1, axis=0)
            v_ds.resize(n + 1, axis=0)
            t_ds[n] = batch.column(0).cast("int64")[0].as_py()
            v_ds[n] = batch.column(1)[0].as_py()
            n += 1
            if t0 - last_flush >= 1.0:
                f.flush()
                last_flush = t0
            lat.append(time.perf_counter() - t0)
            k += 1
    v = np.array(lat) * 1e6
    p50, p99, p999 = np.percentile(v, [50, 99, 99.9])
    return {"p50": p50, "p99": p99, "p99.9": p999, "max": v.max(), "missed": missed, "writes": n, "lost": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true", help="5 s instead of 60")
    args = ap.parse_args()
    seconds = 5.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        a = ours(seconds, tmp)
        b = naive(seconds, tmp)
    print(
        f"1 kHz loop for {seconds:.0f} s ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})\n"
    )
    print(f"{'':46} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>9} {'missed':>7} {'writes':>7}")
    for label, r in [
        ("rust-daq: ring write, writer in its own process", a),
        ("naive: h5py inline in the loop", b),
    ]:
        print(
            f"{label:46} {r['p50']:>7.1f}µ {r['p99']:>7.1f}µ {r['p99.9']:>7.1f}µ {r['max']:>8.1f}µ {r['missed']:>7.0f} {r['writes']:>7.0f}"
        )
    ok = a["p99.9"] <= 100 and a["missed"] == 0
    print(
        f"\ntarget p99.9 <= 100 us and no missed deadline: {'met' if ok else 'MISSED'}"
        f" (p99.9 {a['p99.9']:.1f} us, {a['missed']:.0f} missed, {a['lost']:.0f} records lost)"
    )


if __name__ == "__main__":
    main()
