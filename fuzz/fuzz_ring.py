"""Coverage-guided fuzzing of ring files (atheris): mutated rings are opened and drained;
anything but records or a clear rust-daq error (a crash, a hang, a SIGBUS) is a finding.

    pip install atheris
    python fuzz/fuzz_ring.py -max_total_time=600            # ten minutes
    python fuzz/fuzz_ring.py -atheris_runs=100000

The CI runs the same harness under hypothesis (tests/reliability/test_fuzz.py).
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "helpers"))

with atheris.instrument_imports():
    import fuzzing

PATH = os.path.join(tempfile.mkdtemp(prefix="rdaq-fuzz-"), "ring")
PRISTINE = fuzzing.pristine()


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    ring = bytearray(PRISTINE)
    for _ in range(fdp.ConsumeIntInRange(1, 32)):
        region = fdp.ConsumeIntInRange(0, 1)
        at = fdp.ConsumeIntInRange(0, 447) if region == 0 else fuzzing.DATA + fdp.ConsumeIntInRange(0, 4095)
        ring[at] = fdp.ConsumeIntInRange(0, 255)
    with open(PATH, "wb") as f:
        f.write(ring)
    fuzzing.open_and_drain(PATH)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
