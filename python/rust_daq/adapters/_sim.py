"""Simulated instruments: first-class, so every test and the demo run without hardware."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from ._base import TIMESTAMP, timestamps

__all__ = ["SimulatedCamera", "SimulatedVoltmeter"]


class SimulatedVoltmeter:
    """A voltmeter reading a sine plus Gaussian noise: one row per read, ``rate_hz`` reads a
    second (100 Hz by default). The clock is injectable so tests control time."""

    def __init__(
        self,
        name: str = "voltmeter",
        *,
        rate_hz: float = 100.0,
        amplitude: float = 1.0,
        frequency_hz: float = 5.0,
        noise: float = 0.01,
        seed: int | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        self.name = name
        self.rate_hz = float(rate_hz)
        self._amplitude, self._frequency, self._noise = amplitude, frequency_hz, noise
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        self.schema = pa.schema(
            [TIMESTAMP, pa.field("voltage", pa.float64(), nullable=False, metadata={"units": "V"})],
            metadata={"instrument": "simulated voltmeter"},
        )

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def read(self) -> pa.RecordBatch:
        t = self._clock()
        v = self._amplitude * np.sin(2 * np.pi * self._frequency * t * 1e-9) + self._rng.normal(
            0, self._noise
        )
        return pa.record_batch([timestamps(t), pa.array([v])], schema=self.schema)


class SimulatedCamera:
    """A camera producing uint16 frames with a moving Gaussian spot over a noisy background,
    ``fps`` frames a second, as Arrow ``fixed_shape_tensor`` rows (``(N, H, W)`` in HDF5).

    The frames are rendered once, at :meth:`connect` (in a worker thread), as a cycle in which
    the spot circles the centre: 100 frames, fewer for frames so large that 100 would exceed
    64 MiB. A read then hands out the next frame of the cycle without computing anything:
    rendering a frame per read held the GIL for milliseconds in a thread beside the event loop,
    which delayed the other instruments' reads and writes by up to the GIL's switch interval
    (5 ms), so the demo's figures measured the simulation, not the ring."""

    CYCLE_BYTES = 64 << 20

    def __init__(
        self,
        name: str = "camera",
        *,
        shape: tuple[int, int] = (256, 256),
        fps: float = 10.0,
        seed: int | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"shape must be (height, width) with positive sizes, got {shape}")
        self.name = name
        self.rate_hz = float(fps)
        self.shape = (int(shape[0]), int(shape[1]))
        self._seed = seed
        self._clock = clock
        self._frame = 0
        h, w = self.shape
        self.cycle = int(max(1, min(100, self.CYCLE_BYTES // (h * w * 2))))
        self._frames: npt.NDArray[np.uint16] | None = None
        self._tensor = pa.fixed_shape_tensor(pa.uint16(), self.shape)
        self.schema = pa.schema(
            [
                TIMESTAMP,
                pa.field("frame_id", pa.int64(), nullable=False),
                pa.field("frame", self._tensor, nullable=False, metadata={"units": "counts"}),
            ],
            metadata={"instrument": "simulated camera"},
        )

    def _render(self) -> npt.NDArray[np.uint16]:
        h, w = self.shape
        rng = np.random.default_rng(self._seed)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        out = np.empty((self.cycle, h, w), np.uint16)
        for k in range(self.cycle):
            cy = h / 2 + h / 4 * np.sin(2 * np.pi * k / self.cycle)
            cx = w / 2 + w / 4 * np.cos(2 * np.pi * k / self.cycle)
            spot = 3000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (min(h, w) / 16) ** 2))
            out[k] = spot + rng.poisson(100, self.shape)
        out.flags.writeable = False
        return out

    def frame(self, k: int) -> npt.NDArray[np.uint16]:
        """Frame `k` (read-only): frame ``k % cycle`` of the cycle."""
        if self._frames is None:
            self._frames = self._render()
        out: npt.NDArray[np.uint16] = self._frames[k % self.cycle]
        return out

    async def connect(self) -> None:
        if self._frames is None:
            self._frames = await anyio.to_thread.run_sync(self._render)

    async def close(self) -> None:
        return None

    async def read(self) -> pa.RecordBatch:
        t = self._clock()
        k = self._frame
        self._frame += 1
        frame = self.frame(k)
        tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(frame.reshape((1, *frame.shape)))
        return pa.record_batch([timestamps(t), pa.array([k]), tensor], schema=self.schema)
