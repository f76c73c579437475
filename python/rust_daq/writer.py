"""``python -m rust_daq.writer``: the HDF5 writer as its own process. The writer itself lives in
:mod:`rust_daq.hdf5`; this module keeps the import path and the command of earlier releases."""

import sys

from .hdf5 import HDF5Writer, IncompatibleFileError, main, repair, start_process, stop_process

__all__ = ["HDF5Writer", "IncompatibleFileError", "main", "repair", "start_process", "stop_process"]

if __name__ == "__main__":
    sys.exit(main())
