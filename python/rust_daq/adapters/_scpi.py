"""SCPI instruments over PyVISA (bench multimeters, supplies...). Tests run the same code
against pyvisa-sim with a YAML device definition; real hardware is a resource string away."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import pyarrow as pa

from ._base import TIMESTAMP, timestamps

__all__ = ["ScpiInstrument"]


class ScpiInstrument:
    """Queries ``query`` (e.g. ``MEAS:VOLT:DC?``) ``rate_hz`` times a second and stores the
    float answer in ``column`` with ``units``. ``backend`` is PyVISA's: ``""`` for the system
    VISA, ``"@py"`` for pyvisa-py, ``"path/to/devices.yaml@sim"`` for pyvisa-sim. VISA I/O
    blocks, so it runs in a worker thread."""

    def __init__(
        self,
        resource: str,
        *,
        name: str = "dmm",
        query: str = "MEAS:VOLT:DC?",
        column: str = "voltage",
        units: str = "V",
        rate_hz: float = 10.0,
        backend: str = "",
        timeout_ms: int = 2000,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        self.name = name
        self.rate_hz = float(rate_hz)
        self.resource, self.query, self.backend, self.timeout_ms = resource, query, backend, timeout_ms
        self._clock = clock
        self._dev: Any = None
        self._rm: Any = None
        self.schema = pa.schema(
            [TIMESTAMP, pa.field(column, pa.float64(), nullable=False, metadata={"units": units})],
            metadata={"instrument": f"SCPI {resource}"},
        )

    def _open(self) -> str:
        import pyvisa

        self._rm = pyvisa.ResourceManager(self.backend)
        self._dev = self._rm.open_resource(self.resource, read_termination="\n", write_termination="\n")
        self._dev.timeout = self.timeout_ms
        return str(self._dev.query("*IDN?")).strip()

    async def connect(self) -> None:
        self.identity = await anyio.to_thread.run_sync(self._open)

    async def close(self) -> None:
        if self._dev is not None:
            await anyio.to_thread.run_sync(self._dev.close)
            self._dev = None
        if self._rm is not None:
            await anyio.to_thread.run_sync(self._rm.close)
            self._rm = None

    async def read(self) -> pa.RecordBatch:
        if self._dev is None:
            raise RuntimeError(f"{self.name}: read() before connect()")
        t = self._clock()
        answer = await anyio.to_thread.run_sync(self._dev.query, self.query)
        try:
            value = float(str(answer).strip())
        except ValueError as e:
            raise ValueError(f"{self.name}: {self.query!r} answered {answer!r}, not a number") from e
        return pa.record_batch([timestamps(t), pa.array([value])], schema=self.schema)
