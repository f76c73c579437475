"""A reader for the torture run: reads until the producer is done and it has drained the
ring, checking every payload (index == seq, CRC; tiny payloads by their byte value) and that
seqs only grow. Prints one JSON line.

    python torture_reader.py RING
"""

from __future__ import annotations

import json
import sys
import time

from rust_daq import RingBuffer

from payloads import MIN_SIZE, check_payload


def main() -> None:
    ring = RingBuffer.open(sys.argv[1])
    reader = ring.reader("oldest")
    print("ready", flush=True)
    delivered = corrupt = out_of_order = 0
    last = -1
    idle_since = time.monotonic()
    while ring.producer_alive or time.monotonic() - idle_since < 1.0:
        records = reader.read(timeout=0.2)
        if records:
            idle_since = time.monotonic()
        for rec in records:
            data = rec.data
            try:
                ok = (
                    check_payload(data) == rec.seq if len(data) >= MIN_SIZE else set(data) <= {rec.seq & 0xFF}
                )
            except AssertionError:
                ok = False
            corrupt += not ok
            out_of_order += rec.seq <= last
            last = rec.seq
            delivered += 1
    print(
        json.dumps(
            {
                "delivered": delivered,
                "lost": reader.lost,
                "corrupt": corrupt,
                "out_of_order": out_of_order,
                "last": last,
            }
        )
    )


if __name__ == "__main__":
    main()
