"""ophyd-async in rust-daq: signals and devices as instruments (needs ``rust-daq[bluesky]``).

``SignalInstrument(signal, mode="monitor" | "poll", rate_hz=None)`` and
``ReadableInstrument(device, rate_hz)``; the type mapping from ``describe()`` to Arrow columns
is in ``_columns.py``, docs/bluesky.md has the whole integration.
"""

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
    "SignalInstrument",
]
