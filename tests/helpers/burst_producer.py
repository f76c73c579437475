"""A producer for the overrun test: Arrow batches of 100 rows (an index column running on
from batch to batch) written as fast as it can for BURST batches, then SLOW batches at RATE
per second. Prints the sequence number where the slow phase started, then the total.

    python burst_producer.py RING BURST SLOW RATE
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa

from rust_daq import RingBuffer

ROWS = 100


def batch(i: int) -> pa.RecordBatch:
    idx = np.arange(i * ROWS, (i + 1) * ROWS, dtype=np.int64)
    return pa.record_batch({"index": idx, "volts": np.sin(idx / 50.0)})


def main() -> None:
    path, burst, slow, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    with RingBuffer.open(path, writable=True) as ring:
        for i in range(burst):
            ring.write_arrow_batch(batch(i), "voltmeter")
        print(f"slow {ring.records_written}", flush=True)
        t = time.monotonic()
        for i in range(burst, burst + slow):
            t += 1.0 / rate
            time.sleep(max(0.0, t - time.monotonic()))
            ring.write_arrow_batch(batch(i), "voltmeter")
        print(f"done {ring.records_written}", flush=True)


if __name__ == "__main__":
    main()
