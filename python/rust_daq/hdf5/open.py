"""The writer's output file: claimed (an OFD lock for the writer's life), checked to be this
run's and closed elsewhere before anything is written to it, created with its fixed entries,
reopened after a failed write, taken in and out of SWMR.

The file is never touched before it is known to be this run's (its layout and ring session)
and closed by every other writer; a killed writer's consistency flags are cleared only on a
file of this run; a file left short by a failed write is extended to the end its superblock
records (the progress marker then trims it back).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from typing import Any

import h5py

from .._errors import IncompatibleFileError
from .._native import __version__
from . import progress, quarantine
from .file import (
    allocate,
    attr_text,
    clear_consistency_flags,
    consistency_flags,
    hdf5_name,
    held_by_another_hdf5,
    iso_now,
    lock_output,
    looks_like_run,
    open_for_writing,
)
from .space import _NoSpace

__all__ = ["OutputFile"]

log = logging.getLogger("rust_daq.writer")

# The file format version: HDF5 1.10's, the oldest with SWMR. h5py may bundle a newer HDF5
# whose "latest" formats MATLAB, Igor and older h5dump builds cannot read.
_LIBVER = ("v110", "v110")
# Per dataset: a few of its ~1 MiB chunks (or frames); w0=1 evicts fully written chunks first.
_CHUNK_CACHE = 4 << 20


class OutputFile:
    """The file at `path` a writer of `layout` on ring session `session` writes; `.file` is
    its open HDF5 handle (it changes when the file is reopened)."""

    def __init__(self, path: str, layout: str, session: str, *, swmr: bool) -> None:
        self.path = path
        self.layout = layout
        self.session = session
        self.file: h5py.File
        self.ok = False  # True once open and resumed; False after an I/O error: reopened
        self._swmr = swmr
        self._lock_fd: int | None = None  # our lock on the output file, for the writer's life

    def open(self, ring_path: str, metadata: dict[str, Any]) -> bool:
        """Opens the file (claimed first); returns True if it is a new one, made now, False if
        it holds an earlier writer's run (to be resumed). Raises FileNotFoundError,
        PermissionError, IncompatibleFileError, BlockingIOError (see HDF5Writer)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(2, f"output directory {directory} does not exist", self.path)
        if not os.access(directory, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            raise PermissionError(13, f"output directory {directory} is not writable", self.path)
        fresh = self._claim()
        # The empty file _claim made (and locked) is ours to fill.
        self.file = self._create(ring_path, metadata) if fresh else self._open_run()
        return fresh

    def _open_run(self) -> h5py.File:
        # Nothing is written to a file before it is known to be ours and closed elsewhere.
        if held_by_another_hdf5(self.path):
            raise BlockingIOError(
                errno.EWOULDBLOCK, f"{self.path} is open for writing by another process", self.path
            )
        if consistency_flags(self.path):
            if not looks_like_run(self.path, self.session):
                raise IncompatibleFileError(
                    f"{self.path} is another program's HDF5 file (or another ring session's), left open "
                    "for writing; it was not touched: choose another output file"
                )
            if clear_consistency_flags(self.path):
                log.warning("%s: cleared the consistency flags a killed writer left behind", self.path)
        try:
            f = self._open_existing()
        except BlockingIOError as e:
            raise BlockingIOError(
                e.errno, f"{self.path} is open for writing by another process", self.path
            ) from e
        except _NoSpace:
            raise
        except OSError as e:
            raise IncompatibleFileError(f"{self.path} exists but is not a readable HDF5 file: {e}") from e
        info = dict(f.attrs)
        if info.get("rust_daq_layout") != self.layout or info.get("ring_session_id") != self.session:
            f.close()
            what = (
                f"layout {info.get('rust_daq_layout')!r}"
                if info.get("rust_daq_layout") != self.layout
                else f"ring session {info.get('ring_session_id')}"
            )
            if "rust_daq_layout" not in info:
                what = "no rust-daq run"
            raise IncompatibleFileError(
                f"{self.path} holds {what}; this writer has layout {self.layout!r} and ring session "
                f"{self.session}: choose another output file (or delete this one)"
            )
        return f

    def _create(self, ring_path: str, metadata: dict[str, Any]) -> h5py.File:
        f = h5py.File(self.path, "w", libver=_LIBVER, rdcc_nbytes=_CHUNK_CACHE, rdcc_w0=1.0)
        f.attrs.update(
            rust_daq_layout=self.layout,
            ring_session_id=self.session,
            ring_path=ring_path,
            creator=f"rust-daq {__version__}",
            file_name=os.path.basename(self.path),
            file_time=iso_now(),
            HDF5_Version=h5py.version.hdf5_version,
            h5py_version=h5py.version.version,
            default="measurements",
        )
        m = f.create_group("measurements")
        m.attrs["NX_class"] = "NXentry"
        now = iso_now().encode()
        # Both times: fixed-length UTF-8, ISO 8601 (datetime.fromisoformat reads them); end_time
        # is rewritten at every flush, which SWMR allows for fixed-size data.
        times = h5py.string_dtype("utf-8", len(now))
        m.create_dataset("start_time", data=now, dtype=times)
        m.create_dataset("end_time", data=now, dtype=times)
        meta = m.create_group("metadata")
        meta.attrs["NX_class"] = "NXcollection"
        write_metadata(meta, metadata, "json")
        progress.create(f)
        quarantine.create(f)
        f.flush()
        return f

    def _claim(self) -> bool:
        """Takes this writer's lock on its output (once per writer: it is kept across reopens);
        creates the file, empty, if there is none. Returns True if the file holds nothing yet.
        Raises BlockingIOError when another rust-daq writer holds the file."""
        if self._lock_fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise IncompatibleFileError(
                        f"{self.path} is a symbolic link; the writer does not follow it"
                    ) from e
                raise
            if not lock_output(fd):
                os.close(fd)
                raise BlockingIOError(
                    errno.EWOULDBLOCK,
                    f"{self.path} is open for writing by another process (another rust-daq writer holds it)",
                    self.path,
                )
            self._lock_fd = fd
        return os.fstat(self._lock_fd).st_size == 0

    def release(self) -> None:
        """Gives up the writer's lock (after the file is closed)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open_existing(self) -> h5py.File:
        try:
            return open_for_writing(self.path, libver=_LIBVER)
        except BlockingIOError:
            raise
        except OSError as e:
            # A write that failed midway (disk full) can leave the superblock's end of file
            # beyond the file's end: extend it with zeros; the resume then trims every dataset
            # back to the last progress marker, which only covers data flushed before.
            m = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(e))
            if not m or int(m.group(2)) <= int(m.group(1)):
                raise
            log.warning(
                "%s: extending the file to the end its superblock records after a failed write", self.path
            )
            try:
                os.truncate(self.path, int(m.group(2)))
            except OSError as full:  # no room even for that (RLIMIT_FSIZE): retried later
                raise _NoSpace(
                    full.errno or errno.ENOSPC,
                    f"{self.path} needs {int(m.group(2)) - int(m.group(1))} more bytes to be repaired "
                    f"after a failed write ({full.strerror}); the ring still holds what it lacks",
                ) from full
            return open_for_writing(self.path, libver=_LIBVER)

    def structural(self) -> h5py.File:
        """The file, out of SWMR mode: new objects can be created (SWMR forbids it)."""
        if self.file.swmr_mode:
            self.file.close()
            # SWMR readers may have the file open: they see the new objects once they reopen it.
            self.file = open_for_writing(self.path, libver=_LIBVER, rdcc_nbytes=_CHUNK_CACHE, rdcc_w0=1.0)
        return self.file

    def enter_swmr(self) -> None:
        if self._swmr and not self.file.swmr_mode:
            self.file.swmr_mode = True

    def abandon(self) -> None:
        """After a failed pass, HDF5's in-memory state cannot be trusted: drop the handle."""
        self.ok = False
        try:
            self.file.close()
        except Exception as e:  # the file is being abandoned either way
            log.debug("closing after a failed pass failed: %s", e)

    def finish(self, metadata: dict[str, Any]) -> None:
        """Adds `metadata` (known only at the end of the run: a stop document, say) to
        ``measurements/metadata``: whole as JSON in ``final_json``, each scalar as a dataset
        beside the opening metadata's (a key already taken gets ``__2``)."""
        f = self.structural()
        write_metadata(f["measurements/metadata"], metadata, "final_json")
        f.flush()

    def close(self) -> None:
        """Closes the file (if it is open) and gives up the lock."""
        if self.ok:
            self.file.close()
        self.release()


def write_metadata(group: h5py.Group, metadata: dict[str, Any], json_name: str) -> None:
    """`metadata` into `group`: whole as JSON in `json_name`; each scalar (bool, int, float,
    str) also as its own dataset named after its key (the key in its ``key`` attribute)."""
    taken = set(group.keys())
    group.create_dataset(
        allocate(json_name, taken), data=json.dumps(metadata, default=str), dtype=h5py.string_dtype()
    )
    taken = set(group.keys())
    for key, value in metadata.items():
        if isinstance(value, str) and "\0" in value:
            continue  # HDF5 strings end at NUL: the JSON holds it whole
        if isinstance(value, bool | int | float | str):
            name = allocate(hdf5_name(str(key)), taken)
            taken.add(name)
            group.create_dataset(name, data=value).attrs["key"] = attr_text(str(key))
