"""A producer for the JetStream tests: for SECONDS, a voltmeter at RATE rows/s (batches of
50 rows, every row numbered by ``i``, with a nullable float column) and a camera at FPS
frames/s (each frame HxW uint16 filled with its index), into an existing ring; prints
"started" and, at the end, "done <volt rows> <frames>".

    python nats_producer.py RING SECONDS [RATE] [FPS] [H] [W]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa

from rust_daq import RingBuffer


def volt_batch(start: int, n: int) -> pa.RecordBatch:
    i = np.arange(start, start + n, dtype=np.int64)
    v = pa.array(np.sin(i * 1e-3), mask=(i % 13 == 0))
    return pa.record_batch({"i": i, "v": v})


def frame_batch(k: int, h: int, w: int) -> pa.RecordBatch:
    frame = np.full((1, h, w), k % 65536, dtype=np.uint16)
    return pa.record_batch(
        {"k": pa.array([k], pa.int64()), "frame": pa.FixedShapeTensorArray.from_numpy_ndarray(frame)}
    )


def main() -> None:
    path, seconds = sys.argv[1], float(sys.argv[2])
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 1000.0
    fps = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    h = int(sys.argv[5]) if len(sys.argv) > 5 else 256
    w = int(sys.argv[6]) if len(sys.argv) > 6 else 256
    rows_per = 50
    with RingBuffer.open(path, writable=True) as ring:
        print("started", flush=True)
        t0 = time.monotonic()
        rows = frames = 0
        while (now := time.monotonic()) - t0 < seconds:
            due_rows = int((now - t0) * rate) // rows_per * rows_per
            while rows < due_rows:
                ring.write_arrow_batch(volt_batch(rows, rows_per), "volt")
                rows += rows_per
            while fps > 0 and frames < int((now - t0) * fps):
                ring.write_arrow_batch(frame_batch(frames, h, w), "cam")
                frames += 1
            time.sleep(0.005)
        print(f"done {rows} {frames}", flush=True)


if __name__ == "__main__":
    main()
