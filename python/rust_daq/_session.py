"""What one run runs: :class:`Session`, made from a config file (:func:`rust_daq.config.load_config`)
or built in (the demo's)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from .adapters import Instrument

__all__ = ["Session", "default_ring_name"]


@dataclass(frozen=True, kw_only=True)
class Session:
    """What to run: from a config file (:func:`load_config`), or the demo's built-in one."""

    instruments: list[Instrument]
    ring_path: str
    capacity_mb: float = 256
    #: ``[ring] schema_mb``: the stream table's size (None: the ring's default).
    schema_mb: float | None = None
    #: Rows per ring record at most (the demo: 1, every reading written at once, as case 6).
    batch_rows: int = 1000
    #: ``[acquisition] realtime``: the loop's real-time settings (priority, cpu), or None.
    realtime: dict[str, Any] | None = None
    policy: str = "overwrite"
    #: The HDF5 file the run writes (None: no writer).
    output: str | None = "experiment_data.h5"
    layout: str = "append"
    compression: str | None = None
    flush_interval: float = 1.0
    duration: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Remove the ring at the end, if this run created it (everything but ``[ring] keep = true``).
    own_ring: bool = False
    #: ``[daemon] data_dir``: where the daemon creates recordings asked for over the wire.
    data_dir: str | None = None
    #: ``[nats]``: publish the ring to JetStream while the run lasts (its keys, validated).
    nats: dict[str, Any] | None = None


def default_ring_name(kind: str) -> str:
    """A ring name for one process: ``rust-daq-<kind>-<pid>-<random>``. Not predictable, so
    that nobody can plant a file at the path before the run creates it."""
    return f"rust-daq-{kind}{'-' if kind else ''}{os.getpid()}-{secrets.token_hex(4)}"
