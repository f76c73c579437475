"""Case 9: rust-daq inside bluesky: a step scan's time per point, and the RunEngine loop's
wake-up lag, beside ophyd-async's own simulated detector, in one run.

    python -m benchmarks --cases bluesky        (or: python -m benchmarks.bluesky_run [--points N])

``bp.count(num=N)`` of three detectors, one RunEngine, the runs interleaved:

- ``RustDaqDetector`` reading a ``SimulatedVoltmeter`` at 1 kHz: each point one read into the
  ring and one durable flush of the writer (data, books, marker) into its HDF5 file;
- ophyd-async's ``SimBlobDetector`` writing its own HDF5 file (a 240x320 uint8 frame and
  its sum per point, flushed per point), with its exposure sleep taken out (``sleep`` of 0),
  so both figures are the overhead of a point, not an exposure time;
- a soft signal read by the RunEngine (no file at all): the RunEngine's own floor.

The wake-up lag: a task on the RunEngine's loop asks for a 1 ms sleep over and over during
each count and records how late it wakes (p50, p99, max): what a detector's work on the
loop costs everything else that runs there (motors, other detectors' watchers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from ._common import Goal, Table, median_of, shm_path

DETECTORS = {
    "rust_daq": "`RustDaqDetector`, 1 kHz voltmeter, one durable flush per point",
    "blob": "ophyd-async `SimBlobDetector` (its own HDF5 file, flushed per point)",
    "signal": "a soft signal (no file): the RunEngine's floor",
}


def run(quick: bool, reps: int, points: int | None = None) -> dict[str, Any]:
    import bluesky.plans as bp
    from bluesky import RunEngine
    from bluesky.run_engine import call_in_bluesky_event_loop
    from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices, soft_signal_rw
    from ophyd_async.sim import PatternGenerator, SimBlobDetector

    from rust_daq import RingBuffer
    from rust_daq.adapters import SimulatedVoltmeter
    from rust_daq.ophyd_async import RustDaqDetector

    n = points or (100 if quick else 1000)
    directory = tempfile.mkdtemp(prefix="rdaq-bench-bluesky-")
    ring_path = shm_path("bluesky")
    RE = RunEngine()  # noqa: N806 (bluesky's name for it)

    async def no_sleep(_: float) -> None:
        await asyncio.sleep(0)

    ring = RingBuffer.create(ring_path, capacity_mb=64)
    try:
        with init_devices():
            dets = {
                "rust_daq": RustDaqDetector(
                    [SimulatedVoltmeter(rate_hz=1000, seed=1)],
                    ring,
                    StaticPathProvider(UUIDFilenameProvider(), directory),
                    name="rdaq",
                ),
                "blob": SimBlobDetector(
                    StaticPathProvider(UUIDFilenameProvider(), directory),
                    PatternGenerator(sleep=no_sleep),
                    name="blob",
                ),
                "signal": soft_signal_rw(float, 1.0, name="sig"),
            }
        for det in dets.values():
            RE(bp.count([det], num=10))  # warm up: imports, first files
        per_point: dict[str, list[float]] = {k: [] for k in dets}
        lags: dict[str, list[float]] = {k: [] for k in dets}
        for _ in range(reps):
            for key, det in dets.items():
                lag: list[float] = []
                stop = asyncio.Event()

                async def watch(lag: list[float] = lag, stop: asyncio.Event = stop) -> None:
                    while not stop.is_set():
                        t = time.perf_counter()
                        await asyncio.sleep(0.001)
                        lag.append(time.perf_counter() - t - 0.001)

                async def start(watch: Any = watch) -> Any:
                    return asyncio.get_running_loop().create_task(watch())

                task = call_in_bluesky_event_loop(start())
                t0 = time.perf_counter()
                RE(bp.count([det], num=n))
                per_point[key].append((time.perf_counter() - t0) / n)

                async def end(task: Any = task, stop: asyncio.Event = stop) -> None:
                    stop.set()
                    await task

                call_in_bluesky_event_loop(end())
                lags[key].extend(lag)
        out: dict[str, Any] = {"points": n, "reps": reps, "detectors": {}}
        for key in dets:
            v = np.array(lags[key]) * 1e6
            out["detectors"][key] = {
                "per_point_ms": median_of(per_point[key]) * 1e3,
                "lag_us": {
                    "p50": float(np.percentile(v, 50)),
                    "p99": float(np.percentile(v, 99)),
                    "max": float(v.max()),
                },
            }
        return out
    finally:
        ring.close()
        os.unlink(ring_path)
        shutil.rmtree(directory, ignore_errors=True)


def tables(res: dict[str, Any]) -> list[Table]:
    d = res["detectors"]
    rows = []
    for key, text in DETECTORS.items():
        r = d[key]
        lag = r["lag_us"]
        rows.append(
            [text, f"{r['per_point_ms']:.2f}", f"{lag['p50']:.0f}", f"{lag['p99']:.0f}", f"{lag['max']:.0f}"]
        )
    ours, blob = d["rust_daq"]["per_point_ms"], d["blob"]["per_point_ms"]
    return [
        Table(
            f"9: bp.count(num={res['points']}) in one RunEngine (median of {res['reps']})",
            ["detector", "ms per point", "loop lag p50 (µs)", "p99", "max"],
            rows,
            [
                f"Goal: RustDaqDetector's per-point time <= the sim detector's: {ours:.2f} ms vs {blob:.2f} ms "
                f"({'met' if ours <= blob else 'not met'}). Loop lag: how late a 1 ms sleep on the "
                "RunEngine's loop wakes during the count."
            ],
        )
    ]


def goals(res: dict[str, Any]) -> list[Goal]:
    d = res["detectors"]
    return [
        Goal(
            "9",
            "bp.count: RustDaqDetector's time per point <= ophyd-async's SimBlobDetector's (ms)",
            d["rust_daq"]["per_point_ms"],
            d["blob"]["per_point_ms"],
            " ms",
            higher_is_better=False,
        )
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    for t in tables(run(False, args.reps, args.points)):
        print(t.markdown())
        print()


if __name__ == "__main__":
    main()
