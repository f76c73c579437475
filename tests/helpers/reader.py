"""A reader process for cross-process tests.

    python reader.py RING LAST_SEQ TIMEOUT_S

Attaches to RING, prints "ready", then reads until it receives the record with seq LAST_SEQ
(or TIMEOUT_S passes), checking every payload's CRC and that payload index == seq and seqs
only grow. Prints one JSON line: delivered, lost, corrupt, out_of_order, last.
"""

from __future__ import annotations

import json
import sys
import time

from rust_daq import RingBuffer

from payloads import check_payload


def main() -> None:
    path, last_seq, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ring = RingBuffer.open(path)
    reader = ring.reader("oldest")
    print("ready", flush=True)
    delivered = corrupt = out_of_order = 0
    last = -1
    deadline = time.monotonic() + timeout
    while last < last_seq and time.monotonic() < deadline:
        for rec in reader.read(timeout=0.2):
            try:
                if check_payload(rec.data) != rec.seq:
                    corrupt += 1
            except AssertionError:
                corrupt += 1
            if rec.seq <= last:
                out_of_order += 1
            last = rec.seq
            delivered += 1
    result = {
        "delivered": delivered,
        "lost": reader.lost,
        "corrupt": corrupt,
        "out_of_order": out_of_order,
        "last": last,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
