"""rust-daq in a bluesky stack: RunEngine documents into a ring (:class:`RingCallback`) and
one HDF5 file per run (:class:`RunFileWriter`). Needs the ``bluesky`` extra (event-model).

::

    RE.subscribe(RingCallback(ring))                      # every run's streams into the ring
    RE.subscribe(RunFileWriter(ring, "data/"))            # or: each run into its own file
"""

from ._callback import RESERVED_NAMES, RingCallback, document_json, seconds_to_ns
from ._files import DEFAULT_TEMPLATE, RunFileWriter, start_metadata, stop_metadata

__all__ = [
    "DEFAULT_TEMPLATE",
    "RESERVED_NAMES",
    "RingCallback",
    "RunFileWriter",
    "document_json",
    "seconds_to_ns",
    "start_metadata",
    "stop_metadata",
]
