"""Producer write path, measured beside its physical limits in the same run.

    python benchmarks/ring_write.py [--quick] [--json FILE]

Prints, as medians of several repetitions:
- records/s of 64-byte records from Python through `ring.write` and `ring.write_many`,
  beside a no-op call into the same extension (the floor of any native call);
- MB/s of 1 MiB records into a 100 MiB ring (the default size, larger than the caches)
  and into a 4 MiB ring (cache-resident), beside numpy's single-core copy bandwidth for the
  same pattern (1 MiB blocks cycling through a buffer of that size) and numpy's in-cache
  1 MiB -> 1 MiB copy.
Targets (issue 2): >= 3 M writes/s of 64 B with `write`; >= 70 % of the copy bandwidth.
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

from rust_daq import RingBuffer

MiB = 1 << 20


def median_rate(fn: Callable[[int], None], n: int, reps: int) -> float:
    """Median over `reps` runs of n / seconds for fn(n)."""
    fn(max(n // 10, 1))  # warm up: page faults, caches, branch predictors
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(n)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def small_records(ring: RingBuffer, n: int, reps: int) -> dict[str, float]:
    payload = b"\xa5" * 64
    write = ring.write
    noop = ring._noop

    def do_write(k: int) -> None:
        for _ in range(k):
            write(payload)

    batch = [payload] * 10_000

    def do_write_many(k: int) -> None:
        for _ in range(k // len(batch)):
            ring.write_many(batch)

    def do_noop(k: int) -> None:
        for _ in range(k):
            noop()

    def do_empty(k: int) -> None:
        for _ in range(k):
            pass

    return {
        "write_per_s": median_rate(do_write, n, reps),
        "write_many_per_s": median_rate(do_write_many, n, reps),
        "noop_call_per_s": median_rate(do_noop, n, reps),
        "empty_loop_per_s": median_rate(do_empty, n, reps),
    }


def big_records(ring: RingBuffer, n: int, reps: int) -> float:
    block = np.random.default_rng(0).integers(0, 255, MiB, dtype=np.uint8)
    write = ring.write

    def do(k: int) -> None:
        for _ in range(k):
            write(block)

    do(int(ring.capacity // MiB) + 1)  # one full lap: every page of the ring touched
    return median_rate(do, n, reps) * MiB / 1e6


def numpy_copy(dst_bytes: int, n: int, reps: int) -> float:
    """MB/s of np.copyto of 1 MiB blocks cycling through a dst_bytes buffer."""
    src = np.random.default_rng(1).integers(0, 255, MiB, dtype=np.uint8)
    dst = np.empty(dst_bytes, dtype=np.uint8)
    slots = max(dst_bytes // MiB, 1)
    views = [dst[i * MiB : (i + 1) * MiB] for i in range(slots)]

    def do(k: int) -> None:
        for i in range(k):
            np.copyto(views[i % slots], src)

    do(slots)
    return median_rate(do, n, reps) * MiB / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    n_small = 200_000 if args.quick else 2_000_000
    n_big = 100 if args.quick else 1000

    path = f"/dev/shm/rdaq-bench-{os.getpid()}"
    results: dict[str, object] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        with RingBuffer.create(path, capacity_mb=100, replace=True) as ring:
            small = small_records(ring, n_small, reps)
            big_100 = big_records(ring, n_big, reps)
        with RingBuffer.create(path, capacity_mb=4, replace=True) as ring:
            big_4 = big_records(ring, n_big, reps)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    np_in_cache = numpy_copy(MiB, n_big, reps)
    np_4 = numpy_copy(4 * MiB, n_big, reps)
    np_100 = numpy_copy(100 * MiB, n_big, reps)

    results.update(small)
    results.update(
        {
            "ring_1MiB_MBps_100MiB_ring": big_100,
            "ring_1MiB_MBps_4MiB_ring": big_4,
            "numpy_copy_MBps_in_cache": np_in_cache,
            "numpy_copy_MBps_4MiB_cycle": np_4,
            "numpy_copy_MBps_100MiB_cycle": np_100,
        }
    )

    w = small["write_per_s"]
    print(
        f"rust-daq ring write benchmark ({results['machine']}, {results['cpus']} CPUs, Python {results['python']})"
    )
    print(f"medians of {reps} runs; {n_small:,} small records, {n_big:,} 1 MiB records per run\n")
    print(f"{'64 B records from Python':44} {'rate':>14} {'ns/call':>9}")
    for label, key in [
        ("ring.write(b)", "write_per_s"),
        ("ring.write_many([b] * 10000)  (per record)", "write_many_per_s"),
        ("no-op native call (ring._noop())", "noop_call_per_s"),
        ("empty Python loop iteration", "empty_loop_per_s"),
    ]:
        print(f"{label:44} {small[key] / 1e6:>11.2f} M/s {1e9 / small[key]:>9.0f}")
    verdict = "met" if w >= 3e6 else "MISSED"
    print(f"target >= 3 M writes/s with write: {w / 1e6:.2f} M/s ({verdict}; the original claimed 10 k/s)\n")

    print(f"{'1 MiB records':44} {'MB/s':>14} {'of limit':>9}")
    rows = [
        ("ring.write, 100 MiB ring (default size)", big_100, np_100),
        ("numpy copy, 1 MiB blocks through 100 MiB", np_100, np_100),
        ("ring.write, 4 MiB ring (in cache)", big_4, np_4),
        ("numpy copy, 1 MiB blocks through 4 MiB", np_4, np_4),
        ("numpy copy, 1 MiB -> 1 MiB (in cache)", np_in_cache, np_in_cache),
    ]
    for label, value, limit in rows:
        print(f"{label:44} {value:>14,.0f} {value / limit:>8.0%}")
    ratio = min(big_100 / np_100, big_4 / np_4)
    verdict = "met" if ratio >= 0.7 else "MISSED"
    print(f"target >= 70 % of numpy's copy bandwidth for the same pattern: {ratio:.0%} ({verdict})")
    print(
        f"(against numpy's in-cache 1 MiB copy, which no ring larger than the caches can reach: "
        f"{big_100 / np_in_cache:.0%} for the 100 MiB ring, {big_4 / np_in_cache:.0%} for the 4 MiB ring)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
