"""`rust-daq run` tells the truth and keeps its writer alive: real `rust-daq` processes, real
signals, files read back with h5py (issue 15, item 2)."""

from __future__ import annotations

import subprocess
import sys


def test_the_writer_module_runs_without_a_runpy_warning() -> None:
    """`rust_daq/__init__` imported the writer, so `python -m rust_daq.writer` found itself
    already in sys.modules and runpy warned; under -W error that warning is fatal."""
    r = subprocess.run(
        [sys.executable, "-W", "error", "-m", "rust_daq.writer", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "usage:" in r.stdout
    # The package still offers the writer's names, imported on first use.
    code = (
        "import sys, rust_daq; assert 'rust_daq.writer' not in sys.modules; "
        "from rust_daq import HDF5Writer, IncompatibleFileError; "
        "assert HDF5Writer.__module__ == 'rust_daq.writer' and rust_daq.IncompatibleFileError"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
