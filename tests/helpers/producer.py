"""A producer process for cross-process tests.

    python producer.py RING COUNT SEED MAX_SIZE [--forever]

Opens RING as its producer, writes records whose payload carries index == sequence number
and a CRC (continuing the sequence of a ring it took over), prints "started <seq>" first
and "done <records_written>" at the end. With --forever it writes until killed.
"""

from __future__ import annotations

import random
import sys

from rust_daq import RingBuffer

from payloads import make_payload


def main() -> None:
    path, count, seed, max_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    forever = "--forever" in sys.argv
    rng = random.Random(seed)
    with RingBuffer.open(path, writable=True) as ring:
        first = ring.records_written
        print(f"started {first}", flush=True)
        i = first
        while forever or i < first + count:
            size = rng.randrange(16, max_size) if rng.random() < 0.05 else rng.randrange(16, 300)
            seq = ring.write(make_payload(i, size))
            assert seq == i, (seq, i)
            i += 1
        print(f"done {ring.records_written}", flush=True)


if __name__ == "__main__":
    main()
