"""A producer for the torture run: writes records of random sizes (0 up to a quarter of the
ring) for SECONDS, each carrying its index and a CRC; prints how many it wrote.

    python timed_producer.py RING SECONDS SEED
"""

from __future__ import annotations

import random
import sys
import time

from rust_daq import RingBuffer

from payloads import MIN_SIZE, make_payload


def main() -> None:
    path, seconds, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    with RingBuffer.open(path, writable=True) as ring:
        quarter = ring.max_record_size // 4
        print("started", flush=True)
        end = time.monotonic() + seconds
        i = ring.records_written
        while time.monotonic() < end:
            r = rng.random()
            size = (
                rng.randrange(0, MIN_SIZE)
                if r < 0.05
                else rng.randrange(MIN_SIZE, 512)
                if r < 0.9
                else rng.randrange(512, quarter)
            )
            payload = make_payload(i, size) if size >= MIN_SIZE else bytes([i & 0xFF]) * size
            assert ring.write(payload) == i
            i += 1
        print(f"done {ring.records_written}", flush=True)


if __name__ == "__main__":
    main()
