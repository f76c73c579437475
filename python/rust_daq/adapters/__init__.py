"""Instruments: a small typed protocol, and instruments that need no hardware.

An instrument has a ``name``, an Arrow ``schema`` (with ``units`` in the field metadata), async
``connect()``/``close()``, and either

- ``async read() -> pyarrow.RecordBatch`` (polled: the acquisition calls it ``rate_hz`` times a
  second), or
- ``stream() -> AsyncIterator[pyarrow.RecordBatch]`` (instruments that push data).

A new device is a class with those members; nothing to inherit. For example::

    class Thermometer:
        name = "thermometer"
        rate_hz = 10.0
        schema = pa.schema([pa.field("timestamp", pa.timestamp("ns")),
                            pa.field("temperature", pa.float64(), metadata={"units": "K"})])
        async def connect(self): self.dev = open_my_device()
        async def close(self): self.dev.close()
        async def read(self):
            t = await anyio.to_thread.run_sync(self.dev.read_kelvin)   # blocking I/O off the loop
            return pa.record_batch([pa.array([time.time_ns()], pa.timestamp("ns")), [t]], schema=self.schema)

A type that a run configuration names (``[[instruments]] type = "..."``) is one entry in
:mod:`rust_daq.adapters.registry`: the adapter and the pydantic model of its table.

Embedding rust-daq in another DAQ stack is the same pattern: wrap the other stack's readable
object (a QCoDeS parameter...) in :class:`CallableInstrument`, or in a class like the one
above whose ``read`` awaits it. ophyd-async signals and devices have their own instruments,
with the schema from ``describe()`` and the Readings' timestamps: :mod:`rust_daq.ophyd_async`.
"""

from __future__ import annotations

from ._base import CallableInstrument, Instrument, PolledInstrument, StreamingInstrument, timestamps
from ._scpi import ScpiInstrument
from ._sim import SimulatedCamera, SimulatedVoltmeter

__all__ = [
    "CallableInstrument",
    "Instrument",
    "PolledInstrument",
    "ScpiInstrument",
    "SimulatedCamera",
    "SimulatedVoltmeter",
    "StreamingInstrument",
    "timestamps",
]
