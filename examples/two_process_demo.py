"""The main job until the `rust-daq` command exists: a simulated instrument loop writes
voltage blocks into a ring in shared memory while a reader in *another process* receives
them, checks every value, and reports what it got.

    python examples/two_process_demo.py [--seconds 3] [--rate 1000] [--samples 100]

The producer writes `--rate` blocks per second, each `--samples` (timestamp_ns, voltage)
pairs as a structured numpy array; the reader process recomputes every voltage from the
block's index and counts mismatches (there must be none) and losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from rust_daq import RingBuffer

BLOCK = np.dtype([("timestamp_ns", "<i8"), ("voltage", "<f8")])


def voltages(block_index: int, samples: int) -> np.ndarray:
    """The simulated signal: a 5 Hz sine sampled at 100 kHz, fully determined by the index."""
    t = (block_index * samples + np.arange(samples)) / 100_000.0
    return np.sin(2 * np.pi * 5.0 * t)


def reader_process(ring_path: str, samples: int) -> None:
    ring = RingBuffer.open(ring_path)
    reader = ring.reader("oldest")
    print("ready", flush=True)
    received = mismatches = 0
    last_seq = -1
    idle_since = time.monotonic()
    # Stop once the producer is gone and nothing new arrived for half a second.
    while ring.producer_alive or time.monotonic() - idle_since < 0.5:
        records = reader.read(timeout=0.1, copy=False)
        if records:
            idle_since = time.monotonic()
        for rec in records:
            block = np.frombuffer(rec.data, dtype=BLOCK)
            ok = rec.valid() and np.array_equal(block["voltage"], voltages(rec.seq, samples))
            mismatches += not ok
            received += 1
            last_seq = rec.seq
        reader.commit()
    print(
        json.dumps(
            {"received": received, "lost": reader.lost, "mismatches": mismatches, "last_seq": last_seq}
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=1000.0, help="blocks per second")
    ap.add_argument("--samples", type=int, default=100, help="samples per block")
    ap.add_argument("--reader", metavar="RING", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reader:
        reader_process(args.reader, args.samples)
        return 0

    ring_path = f"/dev/shm/rust-daq-demo-{os.getpid()}"
    ring = RingBuffer.create(ring_path, capacity_mb=16)
    try:
        child = subprocess.Popen(
            [sys.executable, __file__, "--reader", ring_path, "--samples", str(args.samples)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("reader process failed to start")

        period = 1.0 / args.rate
        block = np.zeros(args.samples, dtype=BLOCK)
        n = int(args.seconds * args.rate)
        write_ns = np.empty(n, dtype=np.int64)
        start = time.perf_counter()
        for i in range(n):
            # The "hardware loop": read the instrument, stamp it, hand it to the ring.
            now = time.time_ns()
            block["timestamp_ns"] = now + np.arange(args.samples) * 10_000
            block["voltage"] = voltages(i, args.samples)
            t0 = time.perf_counter_ns()
            ring.write(block, timestamp_ns=now)
            write_ns[i] = time.perf_counter_ns() - t0
            next_tick = start + (i + 1) * period
            while (delay := next_tick - time.perf_counter()) > 0:
                time.sleep(min(delay, 0.001))
        elapsed = time.perf_counter() - start
        written = ring.records_written
        ring.close()  # the reader sees producer_alive turn False and finishes
        out, _ = child.communicate(timeout=60)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        ring.close()
        os.unlink(ring_path)

    mb = written * args.samples * BLOCK.itemsize / 1e6
    print(
        f"producer: {written} blocks of {args.samples} samples in {elapsed:.2f} s ({mb / elapsed:.2f} MB/s)"
    )
    print(
        f"          ring.write latency p50 {np.percentile(write_ns, 50) / 1000:.1f} us, "
        f"p99 {np.percentile(write_ns, 99) / 1000:.1f} us, max {write_ns.max() / 1000:.1f} us"
    )
    print(
        f"reader (pid {child.pid}): {result['received']} blocks received, {result['lost']} lost, "
        f"{result['mismatches']} with wrong values"
    )
    ok = result["received"] + result["lost"] == written and result["mismatches"] == 0
    print("OK: every block arrived intact or was counted as lost" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
