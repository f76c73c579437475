"""rust-daq in ten lines: a 1 kHz voltmeter into a ring, an HDF5 writer draining it.

python examples/quickstart.py      # writes quickstart.h5 in the current directory
"""

import anyio

from rust_daq import Acquisition, HDF5Writer, RingBuffer
from rust_daq.adapters import SimulatedVoltmeter


async def main() -> None:
    ring = RingBuffer.create("quickstart", capacity_mb=64, replace=True)  # /dev/shm/quickstart
    async with (
        Acquisition(ring, [SimulatedVoltmeter(rate_hz=1000)]) as acq,
        HDF5Writer("quickstart.h5", ring) as w,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.run)  # in-process here; `rust-daq write` runs it in its own process
            await acq.run(duration=3)
            await w.stop()  # final drain and flush
    print(f"{acq.stats()['streams']['voltmeter']['rows']} rows in quickstart.h5")


anyio.run(main)
