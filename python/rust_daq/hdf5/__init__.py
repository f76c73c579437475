"""HDF5 output: the writer that drains a ring into an HDF5 file (:mod:`.writer`), the file's
open/lock/repair rules (:mod:`.file`, :mod:`.open`), its layouts (:mod:`.layouts`), the
Arrow-to-HDF5 type mapping (:mod:`.columns`), its progress format and :func:`read_progress`
(:mod:`.progress`), quarantine (:mod:`.quarantine`), disk-space budget (:mod:`.space`), and
the writer as its own process (:mod:`.process`, ``python -m rust_daq.writer``). Everything h5py-dependent lives here."""

from .._errors import IncompatibleFileError
from .options import WriterOptions
from .process import main, start_process, stop_process
from .progress import Progress, StreamProgress, read_progress
from .writer import HDF5Writer, repair

__all__ = [
    "HDF5Writer",
    "IncompatibleFileError",
    "Progress",
    "StreamProgress",
    "WriterOptions",
    "main",
    "read_progress",
    "repair",
    "start_process",
    "stop_process",
]
