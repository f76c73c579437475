"""Case 5, ring to HDF5, and case 6, the hardware loop's jitter, each beside plain h5py.

Case 5. Drain throughput: the ring is filled with 10,000-row batches of two float64 columns
(and, separately, 512x512 uint16 frames, one per batch); ``HDF5Writer.flush_to_disk()``
drains it into a file; a plain h5py loop writes the same arrays into the same chunked layout
(resize + write per batch, one flush). Runs alternate (writer, h5py, writer, ...) so both see
the same machine state. Then sustained: a producer at 1 M rows/s (100 batches/s of 10,000
rows) with the writer in its own process (``python -m rust_daq.writer``): rows written,
records lost, the writer's private memory at the start and the end. Files go to the
directory limits.py measured the raw write bandwidth of.

Case 6. A 1 kHz loop: ``Acquisition`` reading a simulated voltmeter and writing every reading
to the ring at once (batch_rows=1, the worst case for write latency), with the HDF5 writer in
its own process; beside the same 1 kHz schedule in one process appending each reading to an
h5py dataset inline (resize + write, flush every second). Per-write latency percentiles and
missed deadlines.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import h5py
import numpy as np
import pyarrow as pa

from rust_daq import Acquisition, HDF5Writer, RingBuffer
from rust_daq.adapters import SimulatedVoltmeter

from ._common import Goal, Table, fmt_rate, scratch_dir, shm_path


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


def start_writer(ring_path: str, out: str, *options: str) -> subprocess.Popen[str]:
    """The HDF5 writer in its own process (the default deployment), once it is ready."""
    p = subprocess.Popen(
        [sys.executable, "-m", "rust_daq.writer", "--ring", ring_path, "--output", out, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError(f"the writer process did not start: {p.communicate()[1]}")
    return p


def sustained(seconds: float, ring_path: str, out: str) -> dict[str, Any]:
    rows, rate = 10_000, 100  # batches per second: 1 M rows/s
    batch = volt_batches(1, rows)[0]
    if os.path.exists(ring_path):
        os.unlink(ring_path)
    with RingBuffer.create(ring_path, capacity_mb=256) as ring:
        p = start_writer(ring_path, out, "--flush-interval", "0.5")
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


def jitter_ours(seconds: float, tmp: str, realtime: bool = False) -> dict[str, Any]:
    ring_path = shm_path("jitter")
    ring = RingBuffer.create(ring_path, capacity_mb=64)
    writer = start_writer(ring_path, os.path.join(tmp, "jitter.h5"))
    acq = Acquisition(ring, [SimulatedVoltmeter(rate_hz=1000)], batch_rows=1, realtime=realtime)

    async def main() -> None:
        async with acq:
            await acq.run(duration=seconds)

    try:
        anyio.run(main)
    finally:
        writer.terminate()
        writer.communicate(timeout=60)
        ring.close()
        os.unlink(ring_path)
    stats = acq.stats()
    lat = {k: v for k, v in stats["write_latency_us"].items() if k != "n"}
    s = stats["streams"]["voltmeter"]
    jitter = {f"jitter_{k}": v for k, v in s["jitter_us"].items() if k != "n"}
    return {
        **lat,
        **jitter,
        "missed": s["deadlines_missed"],
        "writes": s["records"],
        "lost": stats["records_lost"],
        "realtime": stats["realtime"],
    }


def _spin_schedule(seconds: float, step: Callable[[], float | None]) -> dict[str, Any]:
    """A 1 kHz absolute schedule in a tight spin, as a naive loop keeps one: `step()` runs at
    each deadline and returns the latency of its write (None: it writes nothing). Returns
    write latency and read jitter percentiles (µs) and missed deadlines (a step more than a
    period late: its slots are skipped and counted), as ``jitter_ours`` reports them."""
    period, lateness, lat, missed = 1e-3, [], [], 0
    start = time.perf_counter()
    k = 0
    while time.perf_counter() - start < seconds:
        deadline = start + k * period
        while time.perf_counter() < deadline:
            pass
        late = time.perf_counter() - deadline
        if late > period:
            skipped = int(late // period)
            missed += skipped
            k += skipped
            late -= skipped * period
        lateness.append(late)
        took = step()
        if took is not None:
            lat.append(took)
        k += 1

    def pct(values: list[float], prefix: str) -> dict[str, float]:
        if not values:
            return {f"{prefix}{q}": float("nan") for q in ("p50", "p99", "p99.9", "max")}
        v = np.array(values) * 1e6
        p50, p99, p999 = np.percentile(v, [50, 99, 99.9])
        return {f"{prefix}p50": p50, f"{prefix}p99": p99, f"{prefix}p99.9": p999, f"{prefix}max": v.max()}

    out = {k: float(v) for k, v in {**pct(lat, ""), **pct(lateness, "jitter_")}.items()}
    return {**out, "missed": missed, "writes": len(lateness), "lost": 0, "realtime": None}


def jitter_floor(seconds: float) -> dict[str, Any]:
    """The 1 kHz schedule alone (no read, no write, no event loop): how late this machine lets
    a busy thread be (a shared VM's own stalls), the floor of every loop."""
    return _spin_schedule(seconds, lambda: None)


def jitter_h5py(seconds: float, tmp: str) -> dict[str, Any]:
    volt = SimulatedVoltmeter(rate_hz=1000)
    with h5py.File(os.path.join(tmp, "naive.h5"), "w") as f:
        t_ds = f.create_dataset("timestamp", (0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        v_ds = f.create_dataset("voltage", (0,), maxshape=(None,), dtype=np.float64, chunks=(4096,))
        state = {"n": 0, "last_flush": time.perf_counter()}

        def step() -> float:
            batch = anyio.run(volt.read)
            t0 = time.perf_counter()
            n = state["n"]
            t_ds.resize(n + 1, axis=0)
            v_ds.resize(n + 1, axis=0)
            t_ds[n] = batch.column(0).cast("int64")[0].as_py()
            v_ds[n] = batch.column(1)[0].as_py()
            state["n"] = n + 1
            if t0 - state["last_flush"] >= 1.0:
                f.flush()
                state["last_flush"] = t0
            return time.perf_counter() - t0

        return _spin_schedule(seconds, step)


def run(quick: bool, reps: int, storage: str) -> dict[str, Any]:
    n_volts = 20 if quick else 200
    n_frames = 20 if quick else 300
    tmp = scratch_dir(storage)
    ring_path = shm_path("h5")
    out = os.path.join(tmp, "bench.h5")
    try:
        volts, frames = volt_batches(n_volts), frame_batches(n_frames)
        res: dict[str, Any] = {"storage_dir": storage, "volt_rows": n_volts * 10_000, "frames": n_frames}
        res["volts_writer_s"], res["volts_h5py_s"] = alternating(
            lambda: writer_drain(volts, ring_path, out), lambda: h5py_loop(volts, out), reps
        )
        res["frames_writer_s"], res["frames_h5py_s"] = alternating(
            lambda: writer_drain(frames, ring_path, out), lambda: h5py_loop(frames, out), reps
        )
        res["sustained"] = sustained(2.0 if quick else 10.0, ring_path, out)
        seconds = 3.0 if quick else 30.0
        res["jitter_seconds"] = seconds
        for key, fn in (
            ("jitter_ours", lambda d: jitter_ours(seconds, d)),
            ("jitter_ours_rt", lambda d: jitter_ours(seconds, d, realtime=True)),
            ("jitter_h5py", lambda d: jitter_h5py(seconds, d)),
            ("jitter_floor", lambda d: jitter_floor(seconds)),
        ):
            d = scratch_dir(tmp)  # (a file per run: a writer does not take another ring's file)
            res[key] = fn(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(ring_path):
            os.unlink(ring_path)
    return res


def tables(res: dict[str, Any]) -> list[Table]:
    rows, frames = res["volt_rows"], res["frames"]
    vw, vh = rows / res["volts_writer_s"], rows / res["volts_h5py_s"]
    fw, fh = frames / res["frames_writer_s"], frames / res["frames_h5py_s"]
    t5 = Table(
        f"Case 5: ring to HDF5 (files in {res['storage_dir']})",
        ["", "HDF5Writer draining the ring", "plain h5py loop, same chunking", "writer / h5py"],
        [
            [
                "2 float64 columns, 10,000-row batches",
                f"{fmt_rate(vw)} rows/s",
                f"{fmt_rate(vh)} rows/s",
                f"{vw / vh:.2f}x",
            ],
            [
                "512×512 uint16 frames, one per batch",
                f"{fw:,.0f} frames/s",
                f"{fh:,.0f} frames/s",
                f"{fw / fh:.2f}x",
            ],
        ],
    )
    sus = res["sustained"]
    t5.notes.append(
        f"Sustained 1 M rows/s with the writer in its own process: {sus['rows_written']:,.0f} of "
        f"{sus['rows_produced']:,.0f} rows written, {sus['records_lost']:.0f} records lost; the writer's "
        f"private memory {sus['rss_start_mb']:.0f} MB at the start, {sus['rss_end_mb']:.0f} MB at the end."
    )
    a, rt, b = res["jitter_ours"], res.get("jitter_ours_rt"), res["jitter_h5py"]
    runs = [("rust-daq: `Acquisition` → ring, writer in its own process", a)]
    if rt is not None:
        runs.append(("the same, `realtime=True`", rt))
    runs.append(("plain h5py inline in the loop", b))
    if "jitter_floor" in res:
        runs.append(
            ("the schedule alone, spinning (no read or write): the machine's floor", res["jitter_floor"])
        )
    t6 = Table(
        f"Case 6: 1 kHz loop for {res['jitter_seconds']:.0f} s: write latency, read jitter, missed deadlines",
        ["", "write p50", "p99", "p99.9", "max", "read jitter p99", "p99.9", "max", "missed deadlines"],
        [
            [
                label,
                *[f"{r[k]:.1f} µs" if r[k] == r[k] else "" for k in ("p50", "p99", "p99.9", "max")],
                *[f"{r.get('jitter_' + k, float('nan')):.1f} µs" for k in ("p99", "p99.9", "max")],
                f"{r['missed']:.0f} of {r['writes'] + r['missed']:.0f}",
            ]
            for label, r in runs
        ],
        [
            "Read jitter: how late each read started against its absolute deadline (a read more than a "
            "period late is a missed deadline, its slot skipped). The default loop spins the last 1.5 ms "
            "to each deadline; `realtime=True` runs it under SCHED_FIFO, pinned, pages locked, sleeping "
            "in the kernel to 800 µs before each deadline (at most 80 % of the period) and spinning from there"
            + (
                f" ({', '.join(f'{k} {v}' for k, v in rt['realtime'].items())})."
                if rt and rt.get("realtime")
                else "."
            )
        ],
    )
    return [t5, t6]


def goals(res: dict[str, Any]) -> list[Goal]:
    naive = max(res["jitter_h5py"]["missed"], 1e-9)
    loops = [("", res["jitter_ours"])]
    if res.get("jitter_ours_rt") is not None:
        loops.append((", realtime", res["jitter_ours_rt"]))
    six = []
    for tag, r in loops:
        six.append(
            Goal(
                "case 6",
                f"missed deadlines{tag} / the naive loop's ({r['missed']} / {res['jitter_h5py']['missed']})",
                r["missed"] / naive,
                0.1,
                "x",
                higher_is_better=False,
            )
        )
        six.append(
            Goal("case 6", f"p99.9 read jitter{tag}", r["jitter_p99.9"], 100.0, " µs", higher_is_better=False)
        )
    return six + [
        Goal(
            "case 5",
            "HDF5 writer vs plain h5py, 2 columns",
            res["volts_h5py_s"] / res["volts_writer_s"],
            0.9,
            "x",
        ),
        Goal(
            "case 5",
            "HDF5 writer vs plain h5py, frames",
            res["frames_h5py_s"] / res["frames_writer_s"],
            0.9,
            "x",
        ),
    ]
