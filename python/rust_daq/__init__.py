"""rust-daq: a lossless data plane for laboratory acquisition.

A Rust ring buffer in shared memory (:class:`RingBuffer`), read by any number of processes
(:class:`RingReader`), zero-copy through numpy; Arrow record streams with their schemas
stored in the ring (:meth:`RingBuffer.write_arrow_batch`, :meth:`RingReader.read_batches`).
"""

from typing import TYPE_CHECKING, Any

from ._arrow import StreamInfo
from ._errors import (
    AccessError,
    ConfigError,
    DaemonConfigError,
    DocumentError,
    IncompatibleFileError,
    JetStreamError,
    ProducerActiveError,
    ReadOnlyRingError,
    RecordingNameError,
    RecordTooLargeError,
    RemoteError,
    RingClosedError,
    RingConfigError,
    RingCorruptError,
    RingFormatError,
    RingFullError,
    RingPermissionError,
    RingUsageError,
    RustDaqError,
    SignalTypeError,
    UnknownStreamError,
    UnsupportedTypeError,
    WriterProcessError,
)
from ._live import LiveView
from ._native import FORMAT_VERSION, Record, __version__
from ._ring import RecordArrays, RingBuffer, RingReader, resolve_ring_path
from .acquisition import Acquisition

if TYPE_CHECKING:
    from .hdf5 import HDF5Writer

# The writer (h5py; `python -m rust_daq.writer` runs it) is imported on first use, not with
# the package: importing it here made runpy warn that 'rust_daq.writer' was already
# in sys.modules before it ran as __main__.
_LAZY = {"HDF5Writer": "hdf5"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AccessError",
    "RecordingNameError",
    "Acquisition",
    "ConfigError",
    "DaemonConfigError",
    "DocumentError",
    "FORMAT_VERSION",
    "HDF5Writer",
    "IncompatibleFileError",
    "JetStreamError",
    "ProducerActiveError",
    "ReadOnlyRingError",
    "Record",
    "RemoteError",
    "RecordTooLargeError",
    "RingBuffer",
    "RingClosedError",
    "RingConfigError",
    "RingCorruptError",
    "RingFormatError",
    "RingFullError",
    "RingPermissionError",
    "RecordArrays",
    "RingReader",
    "RingUsageError",
    "RustDaqError",
    "LiveView",
    "SignalTypeError",
    "StreamInfo",
    "UnknownStreamError",
    "UnsupportedTypeError",
    "WriterProcessError",
    "__version__",
    "resolve_ring_path",
]
