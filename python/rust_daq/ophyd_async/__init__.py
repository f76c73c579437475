"""rust-daq inside ophyd-async: a detector for bluesky plans (:class:`RustDaqDetector`).
Needs the ``bluesky`` extra (``pip install 'rust-daq[bluesky]'``); docs/bluesky.md."""

from __future__ import annotations

from ._detector import RustDaqDetector

__all__ = ["RustDaqDetector"]
