"""The writer process's options as one value: validated once, when made, and turned into the
command line of ``python -m rust_daq.writer`` in one place (:meth:`WriterOptions.argv`), which
:func:`rust_daq.hdf5.process.main` parses back into the same value."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import h5py

from .writer import _compression

__all__ = ["LAYOUTS", "WriterOptions", "check_compression"]

LAYOUTS = ("append", "batches")


def check_compression(compression: object) -> str | None:
    """`compression` if the writer can use it, else ValueError naming it and what is allowed.
    Options the writer's parser lets through can still be refused by HDF5 when the first
    dataset is created (gzip:99): one is created, in memory, as the writer would."""
    if compression is None:
        return None
    if not isinstance(compression, str):
        raise ValueError(f"compression must be a string (gzip, gzip:LEVEL, lzf, ...), got {compression!r}")
    filters = _compression(compression)  # the writer's own parser: ValueError for unknown names
    if not filters:
        return compression
    try:
        with h5py.File(f"rust-daq-check-{os.getpid()}", "w", driver="core", backing_store=False) as f:
            f.create_dataset("x", shape=(0,), maxshape=(None,), chunks=(64,), dtype="f8", **filters)
    except (ValueError, TypeError, OSError) as e:
        raise ValueError(
            f"compression {compression!r} is refused by HDF5 ({e}); use gzip, gzip:0 to gzip:9, "
            "lzf, blosc, lz4, zstd or bitshuffle"
        ) from None
    return compression


@dataclass(frozen=True, kw_only=True)
class WriterOptions:
    """What one writer process does. Raises ValueError, naming the option and what is
    allowed, for options that would make the writer refuse to start or die at its first flush.

    ``start``: ``"tail"`` (the ring's read_tail: what no file holds yet) or ``"now"`` (only
    records written from the writer's start on; a new file only). ``parent_pipe``: stop
    (final flush, exit 0) when standard input closes, i.e. when the parent that started the
    writer died, and take commands on it (:func:`~rust_daq.hdf5.process.rotate_process`);
    ``remove_ring_if_orphaned``: then also remove the ring (the parent created it, and no one
    else would)."""

    ring: str
    output: str
    layout: str = "append"
    flush_interval: float = 1.0
    compression: str | None = None
    swmr: bool = True
    streams: tuple[str, ...] | None = None
    metadata: Mapping[str, Any] | None = field(default=None, hash=False)
    start: str = "tail"
    parent_pipe: bool = False
    remove_ring_if_orphaned: bool = False

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be 'append' or 'batches', got {self.layout!r}")
        flush = self.flush_interval
        if (
            isinstance(flush, bool)
            or not isinstance(flush, int | float)
            or not math.isfinite(flush)
            or not flush > 0
        ):
            raise ValueError(f"flush_interval must be a positive number of seconds, got {flush!r}")
        check_compression(self.compression)
        if self.start not in ("tail", "now"):
            raise ValueError(f"start must be 'tail' or 'now', got {self.start!r}")
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise ValueError(f"metadata must be a mapping (a JSON object), got {self.metadata!r}")
        if self.streams is not None:
            object.__setattr__(self, "streams", tuple(self.streams))

    def argv(self) -> list[str]:
        """The arguments of ``python -m rust_daq.writer`` for these options."""
        args = [
            "--ring",
            self.ring,
            "--output",
            self.output,
            "--layout",
            self.layout,
            "--flush-interval",
            repr(float(self.flush_interval)),
        ]
        if self.compression:
            args += ["--compression", self.compression]
        if not self.swmr:
            args.append("--no-swmr")
        for stream in self.streams or ():
            args += ["--stream", stream]
        if self.metadata is not None:
            args += ["--metadata", json.dumps(dict(self.metadata), default=str)]
        if self.start != "tail":
            args += ["--start", self.start]
        if self.parent_pipe:
            args.append("--parent-pipe")
        if self.remove_ring_if_orphaned:
            args.append("--remove-ring-if-orphaned")
        return args

    def command(self) -> list[str]:
        """The whole command line: this Python running ``-m rust_daq.writer`` with :meth:`argv`."""
        return [sys.executable, "-m", "rust_daq.writer", *self.argv()]
