"""rust-daq inside ophyd-async (needs ``pip install 'rust-daq[bluesky]'``; docs/bluesky.md):

- ophyd-async signals and devices as rust-daq instruments: ``SignalInstrument(signal,
  mode="monitor" | "poll", rate_hz=None)`` and ``ReadableInstrument(device, rate_hz)`` (the
  type mapping from ``describe()`` to Arrow columns is in ``_columns.py``);
- rust-daq instruments as an ophyd-async detector for bluesky plans: :class:`RustDaqDetector`.
"""

from __future__ import annotations

from ._detector import RustDaqDetector
from ._instruments import (
    MonitoredSignalInstrument,
    PolledSignalInstrument,
    ReadableInstrument,
    SignalInstrument,
)

__all__ = [
    "MonitoredSignalInstrument",
    "PolledSignalInstrument",
    "ReadableInstrument",
    "RustDaqDetector",
    "SignalInstrument",
]
