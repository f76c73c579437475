"""rust-daq: a lossless data plane for laboratory acquisition.

A Rust ring buffer in shared memory (:class:`RingBuffer`), read by any number of processes
(:class:`RingReader`), zero-copy through numpy; Arrow record streams with their schemas
stored in the ring (:meth:`RingBuffer.write_arrow_batch`, :meth:`RingReader.read_batches`).
"""

from ._arrow import LiveView, StreamInfo
from ._errors import (
    ProducerActiveError,
    ReadOnlyRingError,
    RecordTooLargeError,
    RingClosedError,
    RingConfigError,
    RingCorruptError,
    RingFormatError,
    RingFullError,
    RingUsageError,
    RustDaqError,
    UnknownStreamError,
    UnsupportedTypeError,
)
from ._native import FORMAT_VERSION, Record, __version__
from ._ring import RingBuffer, RingReader, resolve_ring_path
from .acquisition import Acquisition
from .writer import HDF5Writer, IncompatibleFileError

__all__ = [
    "Acquisition",
    "FORMAT_VERSION",
    "HDF5Writer",
    "IncompatibleFileError",
    "ProducerActiveError",
    "ReadOnlyRingError",
    "Record",
    "RecordTooLargeError",
    "RingBuffer",
    "RingClosedError",
    "RingConfigError",
    "RingCorruptError",
    "RingFormatError",
    "RingFullError",
    "RingReader",
    "RingUsageError",
    "RustDaqError",
    "LiveView",
    "StreamInfo",
    "UnknownStreamError",
    "UnsupportedTypeError",
    "__version__",
    "resolve_ring_path",
]
