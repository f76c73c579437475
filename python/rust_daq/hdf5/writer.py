"""The background HDF5 writer: drains a ring into an HDF5 file that h5py, MATLAB, Igor, silx
and HDFView open, while the acquisition loop never waits for it.

Run it in its own process (the default deployment: h5py holds the GIL between calls and a
writer thread beside a hardware loop shows up as jitter)::

    python -m rust_daq.writer --ring RING --output run.h5 [--layout append|batches]
    python -m rust_daq.writer --repair run.h5     # after a crash, for plain h5py opens

or in-process, from async code (asyncio or trio, through anyio)::

    async with HDF5Writer("run.h5", ring) as writer:
        await writer.run()          # until cancelled, or `await writer.stop()`

Durability: a pass writes the data and flushes; writes every stream's book (rows, records,
lost, next stream_seq, unwritable) into the slot of the next marker (``rust_daq/resume``) and
flushes; writes the progress marker naming that slot (``rust_daq/progress``) with the readable
views (``rust_daq/streams``) and flushes; only then commits the ring's ``read_tail``. A writer
killed at any moment and started again on the same ring and file trims every dataset to the
marker's slot and skips what the file already holds: every record ends up in the file exactly
once, as long as the ring did not overwrite it meanwhile (then it is counted as lost, from
the gaps in the sequence numbers, in the file and the log).

Any batch: Arrow columns become HDF5 arrays as ``columns.py`` tabulates (nulls: fill value
plus a validity dataset), names are mapped to valid HDF5 names, a type change starts a new
dataset generation (``layouts.py``); a record that still cannot be written is quarantined in
``rust_daq/quarantine`` (its Arrow bytes, stream, reason) and counted. The file is never
touched before it is known to be this run's and closed elsewhere (an OFD lock for the writer's
life). docs/reliability.md states all of it, with the tests.

Layouts:

- ``"append"`` (default): ``measurements/<stream>/<column>``, one chunked dataset per column,
  extended at each flush; NeXus attributes so silx/NeXpy plot the default stream with no code;
  SWMR, so ``h5py.File(path, "r", libver="latest", swmr=True)`` and ``refresh()`` follow a
  running acquisition. The streams in the ring's schema table get their groups when the file
  opens; SWMR forbids creating objects, so a stream or column that appears later makes the
  writer leave SWMR for the milliseconds it takes to create them, also under readers that
  hold the file open (they see the new stream once they reopen it).
- ``"batches"``: the original system's layout, ``measurements/batch_000001/<column>``, one
  group per stream per flush with the stream name, sequence range, ring positions, flush time
  and the Arrow schema (JSON) as attributes. No SWMR (new groups every flush).

Errors are raised before anything is consumed: the ring's ``read_tail`` never moves past data
that did not reach the file, so a failed flush loses nothing the ring still holds; the next
flush retries from the same place. On a nearly full disk a pass takes the whole records that
fit and leaves the rest in the ring.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import math
import os
import re
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import h5py
import numpy as np

from .._arrow import StreamInfo, empty_batch
from .._errors import IncompatibleFileError, RustDaqError
from .._native import __version__
from .._records import DECODE_ERRORS, SchemaTable, decode
from .._ring import RingBuffer
from .columns import pieces_of
from .file import (
    allocate,
    arrow_name,
    attr_text,
    clear_consistency_flags,
    consistency_flags,
    hdf5_name,
    held_by_another_hdf5,
    iso_now,
    lock_output,
    looks_like_run,
    open_for_writing,
    set_arrow_name,
)
from .layouts import BOOK_FIELDS, ENTRY_NAMES, AppendLayout, BatchesLayout, Item, StreamBook

__all__ = ["HDF5Writer", "IncompatibleFileError", "repair"]

log = logging.getLogger("rust_daq.writer")

Layout = Literal["append", "batches"]
_PROGRESS = "rust_daq/progress"  # int64[4]: last_seq, records, records_lost, flushes
_READ_CHUNK = 4096  # at most this many records decoded and written per step...
_READ_BYTES = 64 << 20  # ...and about this many bytes: the writer's memory stays flat
# The file format version: HDF5 1.10's, the oldest with SWMR. h5py may bundle a newer HDF5
# whose "latest" formats MATLAB, Igor and older h5dump builds cannot read.
_LIBVER = ("v110", "v110")
# Per dataset: a few of its ~1 MiB chunks (or frames); w0=1 evicts fully written chunks first.
_CHUNK_CACHE = 4 << 20


def _compression(spec: str | None) -> dict[str, Any]:
    if spec is None or spec == "none":
        return {}
    if spec in ("gzip", "lzf"):
        return {"compression": spec, **({"compression_opts": 4} if spec == "gzip" else {})}
    name, _, level = spec.partition(":")
    if name == "gzip" and level:
        if not (level.isdigit() and 0 <= int(level) <= 9):
            raise ValueError(f"compression {spec!r}: a gzip level is 0 (none) to 9 (smallest), got {level!r}")
        return {"compression": "gzip", "compression_opts": int(level)}
    if name not in ("blosc", "lz4", "zstd", "bitshuffle"):
        raise ValueError(
            f"unknown compression {spec!r}; use gzip, gzip:LEVEL, lzf, blosc, lz4, zstd or bitshuffle"
        )
    try:
        import hdf5plugin
    except ImportError as e:
        raise ValueError(
            f"compression {spec!r} needs the hdf5plugin package (pip install 'rust-daq[hdf5plugin]'); "
            "gzip and lzf are built in"
        ) from e
    filters: dict[str, Any] = {
        "blosc": hdf5plugin.Blosc,
        "lz4": hdf5plugin.LZ4,
        "zstd": hdf5plugin.Zstd,
        "bitshuffle": hdf5plugin.Bitshuffle,
    }
    return dict(filters[name]())


def repair(path: str | os.PathLike[str]) -> bool:
    """Lets plain ``h5py.File(path)`` open a file whose writer was killed: clears the "open for
    (SWMR) write" flags HDF5 leaves in the superblock, like ``h5clear -s``. A writer restarted
    on the file does this itself, and SWMR readers (``swmr=True``) need no repair. Returns True
    if the file needed it."""
    return clear_consistency_flags(os.fspath(path))


class _TornRead(Exception):
    """Records were overwritten in the ring while the writer copied them into the file."""


class _NoSpace(OSError):
    """Not one more record fits on the disk (or under RLIMIT_FSIZE); nothing was written."""


class _Unwritable(Exception):
    """Writing these records failed for a reason of their own, not the disk's."""

    def __init__(self, seqs: list[int], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.seqs = seqs


def _errno_of(e: BaseException) -> int | None:
    match = re.search(r"errno = (\d+)", str(e))
    if match:
        return int(match.group(1))
    code = getattr(e, "errno", None)
    return code if isinstance(code, int) else None


def _io_error(path: str, e: BaseException) -> OSError:
    """An OSError with the errno HDF5 reports (e.g. 28 no space, 27 file too large)."""
    code = _errno_of(e) or errno.EIO
    return OSError(
        code,
        f"writing {path} failed ({os.strerror(code)}); nothing past the last flush was committed "
        "to the ring, which still holds it: the next flush retries",
        path,
    )


# last_seq, records, records_lost, flushes, records_unwritable, records_skipped, marker (the
# number of the flush that wrote it: which slot of the streams' resume books goes with it)
_PROGRESS_FIELDS = 7
_RESUME = "rust_daq/resume"
_UNCOMMITTED = [0, 0, 0, -1, 0]  # a stream's book before anything of it is committed
_QUARANTINE = "rust_daq/quarantine"
#: The quarantine's datasets (one row per record that could not be written) and their types.
_QUARANTINE_FIELDS: dict[str, Any] = {
    "seq": np.int64,
    "stream": h5py.string_dtype(),
    "timestamp_ns": np.int64,
    "reason": h5py.string_dtype(),
    "payload": h5py.vlen_dtype(np.dtype(np.uint8)),  # the record's Arrow IPC message, as in the ring
    "schema": h5py.vlen_dtype(np.dtype(np.uint8)),  # its stream's Arrow schema message (or empty)
}
# What a pass may write when the disk is nearly full: payload * factor + margin per record must
# fit. HDF5 adds chunk rounding and metadata; a write that still fails is retried, smaller.
_PLENTY = 1 << 30
_SPACE_MARGIN = 256 << 10
_SPACE_FACTOR = 1.25
_SPACE_FACTOR_MAX = 1 << 12
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_LOGGED_PER_STREAM = 10  # quarantined records logged one by one per stream, then every 1000th
_ATTEMPTS = 256  # passes a flush may abandon (each torn, or finding a record HDF5 refuses)


class HDF5Writer:
    """Drains a ring into an HDF5 file. See the module documentation.

    Raises FileNotFoundError / PermissionError (output directory missing or not writable),
    IncompatibleFileError (an existing file of another layout or ring session), BlockingIOError
    (the file is open for writing elsewhere), ValueError (bad arguments).
    """

    def __init__(
        self,
        output_path: str | os.PathLike[str],
        ring_buffer: RingBuffer | str | os.PathLike[str],
        *,
        flush_interval: float = 1.0,
        layout: Layout = "append",
        compression: str | None = None,
        swmr: bool = True,
        metadata: dict[str, Any] | None = None,
        streams: Sequence[str] | None = None,
    ) -> None:
        if layout not in ("append", "batches"):
            raise ValueError(f"unknown layout {layout!r}; use 'append' or 'batches'")
        if not (
            isinstance(flush_interval, int | float) and math.isfinite(flush_interval) and flush_interval > 0
        ):
            raise ValueError(f"flush_interval must be a positive number of seconds, got {flush_interval!r}")
        self.path = os.fspath(output_path)
        self.layout: Layout = layout
        self.flush_interval = float(flush_interval)
        self._filters = _compression(compression)
        self._append = AppendLayout(self._filters) if layout == "append" else None
        self._batches = BatchesLayout(self._filters) if layout == "batches" else None
        self._swmr_wanted = swmr and layout == "append"
        self._metadata = dict(metadata or {})
        self._only = set(streams) if streams is not None else None
        self._ring = ring_buffer if isinstance(ring_buffer, RingBuffer) else RingBuffer.open(ring_buffer)
        self._owns_ring = not isinstance(ring_buffer, RingBuffer)
        self._state = SchemaTable(self._ring)
        self._lock = threading.Lock()  # one flush at a time (run() and flush_to_disk())
        self._closed = False
        self.batch_count = 0
        self.records_written = 0
        self.records_lost = 0
        self.records_unwritable = 0  # quarantined: in rust_daq/quarantine, not in measurements
        self.records_skipped = 0  # not Arrow, or a stream not selected
        self._books: dict[str, StreamBook] = {}
        # Records whose write failed for a reason of their own (seq -> reason): quarantined on
        # the retry. Suspects are written one record at a time, to find which one it was.
        self._condemned: dict[int, str] = {}
        self._suspects: set[int] = set()
        self._warned: set[str] = set()
        self._space_factor = _SPACE_FACTOR
        self._left_in_ring = 0
        self._unfinished = False  # the last flush stopped early: records still to quarantine
        self._marker = 0  # the number of the last progress marker written
        self._lock_fd: int | None = None  # our lock on the output file, for the writer's life
        try:
            self._file: h5py.File = self._open()
        except BaseException:
            self._release()
            raise
        self._file_ok = True  # False after an I/O error: reopened on the next flush
        self._new_reader()

    # -- the file -----------------------------------------------------------------------------

    def _open(self) -> h5py.File:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(2, f"output directory {directory} does not exist", self.path)
        if not os.access(directory, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            raise PermissionError(13, f"output directory {directory} is not writable", self.path)
        session = str(self._ring.session_id)
        fresh = self._claim()
        if not fresh:
            # Nothing is written to a file before it is known to be ours and closed elsewhere.
            if held_by_another_hdf5(self.path):
                raise BlockingIOError(
                    errno.EWOULDBLOCK, f"{self.path} is open for writing by another process", self.path
                )
            if consistency_flags(self.path):
                if not looks_like_run(self.path, session):
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
            if info.get("rust_daq_layout") != self.layout or info.get("ring_session_id") != session:
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
                    f"{session}: choose another output file (or delete this one)"
                )
            self._file = f
            self._resume(f)
            self._ready()
            return self._file
        # The empty file _claim made (and locked) is ours to fill.
        f = h5py.File(self.path, "w", libver=_LIBVER, rdcc_nbytes=_CHUNK_CACHE, rdcc_w0=1.0)
        f.attrs.update(
            rust_daq_layout=self.layout,
            ring_session_id=session,
            ring_path=self._ring.path,
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
        meta.create_dataset("json", data=json.dumps(self._metadata, default=str), dtype=h5py.string_dtype())
        taken: set[str] = {"json"}
        for key, value in self._metadata.items():
            if isinstance(value, str) and "\0" in value:
                continue  # HDF5 strings end at NUL: the JSON above holds it whole
            if isinstance(value, bool | int | float | str):
                name = allocate(hdf5_name(str(key)), taken)
                taken.add(name)
                meta.create_dataset(name, data=value).attrs["key"] = attr_text(str(key))
        # The writer's own books: no NeXus class (NXroot holds NXentry groups only), so NeXus
        # tools pass them by.
        book = f.create_group("rust_daq")
        book.create_dataset("progress", data=np.array([-1, 0, 0, 0, 0, 0, 0], dtype=np.int64))
        book.create_group("streams")
        book.create_group("resume")
        self._marker = 0
        self._create_quarantine(f)
        f.flush()
        self._file = f
        self._ready()
        return self._file

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

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _ready(self) -> None:
        """Datasets for the streams known now, then SWMR: from here on a reader can open the
        file at any moment, also after a crash (``swmr=True``)."""
        if self._append is not None:
            start = self._file["measurements/start_time"][()]
            start = start.decode() if isinstance(start, bytes) else str(start)
            self._append.start_time = start
            when = dt.datetime.fromisoformat(start.strip())
            self._append.start_ns = (int(when.timestamp()) * 1_000_000 + when.microsecond) * 1000
        self._precreate()
        self._file.flush()
        self._enter_swmr()

    def _create_quarantine(self, f: h5py.File) -> None:
        q = f.require_group(_QUARANTINE)
        for name, dtype in _QUARANTINE_FIELDS.items():
            if name not in q:
                q.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))

    def _open_existing(self) -> h5py.File:
        try:
            return open_for_writing(self.path, libver=_LIBVER)
        except BlockingIOError:
            raise
        except OSError as e:
            # A write that failed midway (disk full) can leave the superblock's end of file
            # beyond the file's end: extend it with zeros; _resume then trims every dataset
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

    def _resume(self, f: h5py.File) -> None:
        """Back to the state of the last completed flush: trim what came after it."""
        progress = [int(v) for v in f[_PROGRESS][()]]
        legacy = len(progress) < _PROGRESS_FIELDS  # a writer from before the resume slots
        progress += [0] * (_PROGRESS_FIELDS - len(progress))
        if f[_PROGRESS].shape != (_PROGRESS_FIELDS,):  # a file from an older writer
            del f[_PROGRESS]
            f.create_dataset(_PROGRESS, data=np.array(progress, dtype=np.int64))
        _, written, lost, flushes, unwritable, skipped, marker = progress
        self.records_written, self.records_lost, self.batch_count = written, lost, flushes
        self.records_unwritable, self.records_skipped = unwritable, skipped
        self._marker = marker
        self._books.clear()
        streams = f["rust_daq/streams"]
        resume = f.require_group(_RESUME)
        for group, ds in list(streams.items()):
            if group in resume:
                # The slot written with this marker: the books of the flush the marker closed (a
                # writer killed between its books and its marker left the other slot newer).
                slots = resume[group][()]
                values = next(
                    (list(map(int, s[:BOOK_FIELDS])) for s in slots if s[BOOK_FIELDS] == marker), None
                )
                values = values or list(_UNCOMMITTED)  # made after that flush: nothing committed
            elif legacy:  # an older writer's file: its flat book
                values = [int(v) for v in ds[()]]
                values += [0] * (BOOK_FIELDS - len(values))
            else:  # a view whose slots a killed writer never wrote: nothing of it committed
                values = list(_UNCOMMITTED)
            name = arrow_name(ds.attrs, group)
            rows, records, lost_, next_seq, unwritable_ = values[:BOOK_FIELDS]
            b = self._books[name] = StreamBook(name, group, rows, records, lost_, next_seq, unwritable_)
            if ds.shape != (BOOK_FIELDS,):
                del streams[group]
                set_arrow_name(streams.create_dataset(group, data=np.array(b.values(), np.int64)).attrs, name)
            else:
                ds[...] = b.values()  # the readable view, as the marker says
            if group not in resume:
                self._create_resume(resume, b, committed=True)
            if self._append is not None:
                self._append.resume(f, b)
        if self._append is not None:
            # Groups a pass made before it was abandoned (no marker covers them): adopted empty,
            # so the stream keeps its name instead of getting a second group.
            for group, g in f["measurements"].items():
                if isinstance(g, h5py.Group) and "arrow_name" in g.attrs:
                    name = arrow_name(g.attrs, group)
                    if name not in self._books:
                        self._append.resume(
                            f, self._books.setdefault(name, StreamBook(name, group, next_seq=-1))
                        )
        if self._batches is not None:
            for key in list(f["measurements"]):
                if key.startswith("batch_") and int(key[6:]) > flushes:
                    del f["measurements"][key]
        self._create_quarantine(f)
        for name in _QUARANTINE_FIELDS:
            ds = f[_QUARANTINE][name]
            if ds.shape[0] > unwritable:
                ds.resize(unwritable, axis=0)
        f.flush()

    def _book(self, name: str) -> StreamBook:
        book = self._books.get(name)
        if book is None:
            m = self._file["measurements"]
            taken = {b.group for b in self._books.values()} | set(m) | set(self._file["rust_daq/streams"])
            group = allocate(hdf5_name(name, ENTRY_NAMES), taken | ENTRY_NAMES)
            book = self._books[name] = StreamBook(name, group, next_seq=-1)
        return book

    def _precreate(self) -> None:
        """Groups and datasets for the streams the ring's schema table holds now, before SWMR
        starts: SWMR forbids new objects, and leaving it takes every reader's file away."""
        try:
            streams = self._state.streams()
        except DECODE_ERRORS + (RustDaqError,) as e:
            log.error("the ring's schema table does not decode: %s", e)
            return
        for name, info in streams.items():
            if self._only is not None and name not in self._only:
                continue
            book = self._book(name)
            if self._append is not None:
                empty = empty_batch(info.schema)
                try:
                    self._append.write(
                        self._file, self._structural, book, [Item(pieces_of(empty), 0, None, info)]
                    )
                except Exception as e:  # its first record will tell (and be quarantined if need be)
                    log.warning("stream %r: cannot prepare its datasets: %s", name, e)
        self._create_books()

    def _create_books(self) -> None:
        streams = self._file["rust_daq/streams"]
        if any(b.group not in streams for b in self._books.values()):
            f = self._structural()
            streams, resume = f["rust_daq/streams"], f.require_group(_RESUME)
            for b in self._books.values():
                if b.group not in streams:
                    # Nothing of it is committed yet (this pass's marker may never be written):
                    # the view says so too, until the marker does.
                    book = streams.create_dataset(b.group, data=np.array(_UNCOMMITTED, np.int64))
                    set_arrow_name(book.attrs, b.name)
                    self._create_resume(resume, b, committed=False)

    def _create_resume(self, resume: h5py.Group, b: StreamBook, *, committed: bool) -> None:
        """Two slots of [rows, records, lost, next_stream_seq, unwritable, marker]: each flush
        writes one, then the progress marker naming it, so that a writer killed between the
        two leaves the slot of the last marker whole (``rust_daq/streams`` is the readable
        view; it may run one flush ahead of the marker after such a kill)."""
        state = b.values() if committed else _UNCOMMITTED  # (a new stream: nothing committed yet)
        slots = np.array([[*state, self._marker], [*state, -1]], dtype=np.int64)
        if b.group in resume:  # (left by a writer killed before the stream's view was made)
            del resume[b.group]
        set_arrow_name(resume.create_dataset(b.group, data=slots).attrs, b.name)

    def _structural(self) -> h5py.File:
        """The file, out of SWMR mode: new objects can be created (SWMR forbids it)."""
        if self._file.swmr_mode:
            self._file.close()
            # SWMR readers may have the file open: they see the new objects once they reopen it.
            self._file = open_for_writing(self.path, libver=_LIBVER, rdcc_nbytes=_CHUNK_CACHE, rdcc_w0=1.0)
        return self._file

    def _enter_swmr(self) -> None:
        if self._swmr_wanted and not self._file.swmr_mode:
            self._file.swmr_mode = True

    # -- draining -------------------------------------------------------------------------------

    def flush_to_disk(self) -> int:
        """One synchronous pass: drain what the ring holds, write it, flush, record progress,
        commit the ring's read_tail. Returns the number of records written.

        A record that cannot be written for a reason of its own (it does not decode, or HDF5
        refuses its data) is quarantined: its Arrow bytes go to ``rust_daq/quarantine`` and it
        is counted as ``unwritable`` for its stream, and the pass goes on. Raises OSError when
        the disk fails (nothing is committed; the next call retries)."""
        with self._lock:
            if self._closed:
                raise ValueError("flush_to_disk() on a closed HDF5Writer")
            return self._flush_retrying()

    def _flush_retrying(self) -> int:
        if not self._file_ok:
            self._reattach()
        copy = False
        self._unfinished = False
        for _ in range(_ATTEMPTS):
            try:
                return self._flush(copy=copy)
            except _TornRead as e:
                # Retry with private copies (copy, then validate): a producer that keeps lapping
                # the writer costs it records, counted as lost, never another torn pass.
                log.warning("%s; retrying from the ring's tail with copies", e)
                copy = True
            except _Unwritable as e:
                if len(e.seqs) == 1:
                    self._condemned[e.seqs[0]] = f"HDF5 refused it: {e}"
                else:
                    log.warning(
                        "writing records %d..%d failed (%s); finding the record", e.seqs[0], e.seqs[-1], e
                    )
                    self._suspects.update(e.seqs)
            except _NoSpace:
                raise  # nothing was written: the ring holds it all
            except (OSError, RuntimeError) as e:
                # h5py reports failed writes (disk full, EFBIG, EIO) as RuntimeError or OSError.
                self._abandon()
                if _errno_of(e) in _FULL and self._space_factor < _SPACE_FACTOR_MAX:
                    # The disk took less than the estimate: retry with a smaller share of it.
                    log.warning(
                        "%s: %s; retrying with fewer records", self.path, os.strerror(_errno_of(e) or 0)
                    )
                    self._space_factor *= 4
                    self._reattach()
                    continue
                raise _io_error(self.path, e) from e
            # Abandon this pass before its marker: the retry reads the ring again from its tail.
            self._abandon()
            self._reattach()
        # Each attempt found one more record to quarantine: the next flush goes on from there.
        log.warning(
            "%s: %d records quarantined so far; this flush goes on at the next",
            self.path,
            len(self._condemned),
        )
        self._unfinished = True
        return 0

    def _abandon(self) -> None:
        """After a failed pass, HDF5's in-memory state cannot be trusted: drop the handle.
        Nothing was committed to the ring past the last good marker, so the next flush
        reopens the file, trims it to that marker and reads the ring again from its tail."""
        self._file_ok = False
        try:
            self._file.close()
        except Exception as e:  # the file is being abandoned either way
            log.debug("closing after a failed pass failed: %s", e)

    def _reattach(self) -> None:
        self._books.clear()
        self._file = self._open()
        self._file_ok = True
        self._new_reader()

    def _new_reader(self) -> None:
        """A cursor at the ring's read_tail. Losses are counted from sequence gaps after the
        file's last record and this starting point, not from the reader's own count: a new
        reader at the tail would count again what was lost (or written) before."""
        self._reader = self._ring.reader("tail")
        self._reader_from = self._ring.read_tail_seq

    def _info(self, schema_id: int) -> StreamInfo | None:
        try:
            return self._state.info(schema_id)
        except DECODE_ERRORS + (RustDaqError,) as e:
            log.error("the ring's schema table does not decode: %s", e)
            return None

    def _flush(self, copy: bool = False) -> int:
        written = 0
        quarantined = 0
        committed_seq = last_seq = int(self._file[_PROGRESS][0])
        limit = 64  # records per read until their size is known
        budget, code = self._space()
        full = False  # the disk holds no more this pass: the rest stays in the ring
        pass_rows: dict[str, int] = {}  # rows of each stream this pass has taken so far
        expected = max(last_seq + 1, self._reader_from)  # the next record, unless lost
        lost = 0
        skipped_before = self.records_skipped
        while not full:
            # Zero-copy: HDF5 reads the columns straight from the ring. Every record used is
            # validated after the write; a torn one aborts the flush.
            records = self._reader.read(max_records=limit, copy=copy)
            pending: dict[str, list[Item]] = {}
            bad: list[tuple[Any, StreamInfo | None, str]] = []
            taken = 0
            for rec in records:
                if rec.seq <= last_seq:
                    taken += 1
                    continue  # already in the file (a restart after its marker, before its commit)
                sorted_ = self._sort(rec)
                if budget is not None and sorted_ is not None:
                    cost = self._cost(rec, sorted_, pass_rows)
                    if cost + _SPACE_MARGIN > budget:
                        full = True  # whole records only, in ring order: the marker stays exact
                        break
                    budget -= cost
                if rec.seq > expected:  # overwritten in the ring before the writer read them
                    lost += rec.seq - expected
                expected = rec.seq + 1
                taken += 1
                self._take(rec, sorted_, pending, bad, pass_rows)
            records = records[:taken]
            if full and not pending and not bad and written == 0 and quarantined == 0:
                self._new_reader()  # (our cursor read past what it wrote)
                self.records_skipped = skipped_before  # counted again when read again
                raise _NoSpace(
                    code,
                    f"{self.path}: no room for the next record ({budget or 0} bytes left after a "
                    f"{_SPACE_MARGIN}-byte margin); nothing was written, the ring still holds it",
                )
            for name, items in pending.items():
                written += self._write_stream(self._books[name], items)
            if bad:
                self._quarantine(bad)
                quarantined += len(bad)
            used = [it.record for items in pending.values() for it in items] + [r for r, _, _ in bad]
            torn = sorted(r.seq for r in used if not r.valid())
            if torn:
                # The producer lapped the writer while HDF5 copied these records: what reached
                # the file may be torn. Abandon this flush before its marker; the retry reads
                # the ring again from its tail (the lapped records are then counted as lost).
                raise _TornRead(f"records {torn[0]}..{torn[-1]} were overwritten while being written")
            if records:
                last_seq = max(last_seq, records[-1].seq)
            if len(records) < limit:
                break
            average = sum(len(r.data) for r in records) / len(records)
            limit = int(min(max(_READ_BYTES // max(average, 1), 1), _READ_CHUNK))
        if lost:
            log.warning("%d record(s) were overwritten in the ring before the writer read them", lost)
            self.records_lost += lost
        if written == 0 and not quarantined and not lost and last_seq == committed_seq:
            return 0
        # 1. the data, 2. the marker that says it is there, 3. the ring's read_tail.
        self._file.flush()
        if written and self._append is not None:
            self.batch_count += 1
        self.records_written += written
        self.records_unwritable += quarantined
        self._create_books()
        f = self._file  # (new objects may have reopened it)
        # The books in the slot of the next marker, then the marker: HDF5 writes each small
        # dataset with its own pwrite at a flush, so a kill can fall between any two of them.
        marker = self._marker + 1
        resume = f[_RESUME]
        for b in self._books.values():
            resume[b.group][marker % 2] = [*b.values(), marker]
        f.flush()
        f[_PROGRESS][...] = [
            last_seq,
            self.records_written,
            self.records_lost,
            self.batch_count,
            self.records_unwritable,
            self.records_skipped,
            marker,
        ]
        for b in self._books.values():
            f["rust_daq/streams"][b.group][...] = b.values()
        f["measurements/end_time"][()] = iso_now().encode()
        f.flush()
        self._marker = marker
        self._enter_swmr()
        if full:
            # Our cursor went past what the disk took: leave read_tail where it is and read again
            # from it next time (what the file holds is skipped by its marker).
            self._new_reader()
            log.warning(
                "%s: disk nearly full: wrote %d record(s); the rest stays in the ring until space returns",
                self.path,
                written + quarantined,
            )
        else:
            self._reader.commit()
            self._space_factor = _SPACE_FACTOR
        return written

    def _sort(self, rec: Any) -> Item | tuple[StreamInfo | None, str] | None:
        """What a record is, with no side effect: None (not Arrow, or a stream not selected:
        skipped), an Item to write, or (stream, reason) to quarantine."""
        if rec.schema_id == 0:
            return None
        info = self._info(rec.schema_id)
        if info is None:
            return None, f"schema id {rec.schema_id} is not in the ring's schema table"
        if self._only is not None and info.name not in self._only:
            return None
        reason = self._condemned.get(rec.seq)
        if reason is not None:
            return info, reason
        try:
            batch = decode(rec, info)
            return Item(pieces_of(batch), batch.num_rows, rec, info)
        except DECODE_ERRORS as e:
            return info, f"does not decode with its stream's schema: {e}"
        except Exception as e:  # a batch that contradicts its schema
            return info, f"cannot be converted for HDF5: {type(e).__name__}: {e}"

    def _cost(
        self, rec: Any, sorted_: Item | tuple[StreamInfo | None, str], pass_rows: dict[str, int]
    ) -> int:
        """Bytes of file a record may take: its payload (an upper bound of its columns), and
        the chunks its rows open (HDF5 allocates a chunk whole at its first write)."""
        cost = int(len(rec.data) * self._space_factor)
        if isinstance(sorted_, Item) and self._append is not None:
            name = sorted_.info.name
            book = self._books.get(name) or StreamBook(name, "")
            cost += self._append.new_chunk_bytes(book, sorted_, book.rows + pass_rows.get(name, 0))
        return cost

    def _take(
        self,
        rec: Any,
        sorted_: Item | tuple[StreamInfo | None, str] | None,
        pending: dict[str, list[Item]],
        bad: list[tuple[Any, StreamInfo | None, str]],
        pass_rows: dict[str, int],
    ) -> None:
        """Takes a sorted record into this pass: counted as skipped, to be written, or to be
        quarantined; its stream's sequence accounted."""
        if sorted_ is None:
            self.records_skipped += 1
            if rec.schema_id == 0:
                self._warn_once("plain", "plain (non-Arrow) records are counted as skipped, not written")
            return
        info = sorted_.info if isinstance(sorted_, Item) else sorted_[0]
        if info is not None:
            self._count(self._book(info.name), rec.stream_seq)
        if isinstance(sorted_, Item):
            name = sorted_.info.name
            pending.setdefault(name, []).append(sorted_)
            pass_rows[name] = pass_rows.get(name, 0) + sorted_.rows
        else:
            bad.append((rec, info, sorted_[1]))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _write_stream(self, book: StreamBook, items: list[Item]) -> int:
        """Writes one stream's records of this pass; a failure that is not the disk's names
        the records (all of them, or the one, when they are written one by one)."""
        isolate = any(it.record.seq in self._suspects for it in items)
        for group in [[it] for it in items] if isolate else [items]:
            try:
                if self._append is not None:
                    self._append.write(self._file, self._structural, book, group)
                else:
                    assert self._batches is not None
                    self._batches.write(self._structural(), self._next_batch, book, group)
            except Exception as e:
                if isinstance(e, OSError | RuntimeError) and self._disk_trouble(e):
                    raise
                raise _Unwritable([it.record.seq for it in group], e) from e
        book.records += len(items)
        return len(items)

    def _next_batch(self) -> int:
        self.batch_count += 1
        return self.batch_count

    def _disk_trouble(self, e: BaseException) -> bool:
        """Whether a failed HDF5 call was the disk's doing (HDF5 reports the errno of a failed
        write), or looks like it (almost no space left)."""
        if _errno_of(e) is not None:
            return True
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return True
        return st.f_bavail * st.f_frsize < (16 << 20)

    def _quarantine(self, bad: list[tuple[Any, StreamInfo | None, str]]) -> None:
        """Records that cannot be written: their Arrow bytes, stream and reason go to
        rust_daq/quarantine, they count as unwritable, and the pass goes on."""
        q = self._file[_QUARANTINE]
        n = q["seq"].shape[0]
        for ds in q.values():
            ds.resize(n + len(bad), axis=0)
        for i, (rec, info, reason) in enumerate(bad):
            name = info.name if info is not None else ""
            q["seq"][n + i] = rec.seq
            q["stream"][n + i] = attr_text(name)
            q["timestamp_ns"][n + i] = rec.timestamp_ns
            q["reason"][n + i] = attr_text(reason)
            q["payload"][n + i] = np.frombuffer(bytes(rec.data), np.uint8)
            schema = info.schema.serialize().to_pybytes() if info is not None else b""
            q["schema"][n + i] = np.frombuffer(schema, np.uint8)
            count = 0
            if info is not None:
                book = self._book(info.name)
                book.unwritable += 1
                count = book.unwritable
            if count <= _LOGGED_PER_STREAM or count % 1000 == 0:
                log.error(
                    "record %d of stream %r quarantined (%s): %s; its bytes are in %s",
                    rec.seq,
                    name,
                    f"{count} so far" if count else "no stream",
                    reason,
                    _QUARANTINE,
                )

    def _space(self) -> tuple[int | None, int]:
        """Bytes this flush may still write (free space, or what RLIMIT_FSIZE leaves), None when
        that is plenty; and the errno to report when it runs out (ENOSPC, EFBIG). HDF5 cannot
        undo a half-done write: a pass takes only the whole records that fit."""
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return None, errno.ENOSPC
        free, code = st.f_bavail * st.f_frsize, errno.ENOSPC
        try:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY and limit - os.path.getsize(self.path) < free:
                free, code = limit - os.path.getsize(self.path), errno.EFBIG
        except (ImportError, OSError):
            pass
        return (None if free > _PLENTY else max(free - _SPACE_MARGIN, 0)), code

    def _count(self, book: StreamBook, stream_seq: int | None) -> None:
        """Per-stream accounting: a gap in the stream's sequence numbers is its records lost."""
        if stream_seq is None:
            return
        if book.next_seq < 0:
            # First record of this stream in this file. If the reader lost nothing so far, the
            # stream's earlier records went to another file: this one is the baseline. If it
            # did (the ring lapped the tail before this file got it), they count as lost.
            book.next_seq = 0 if self._reader.lost > 0 else stream_seq
        if stream_seq > book.next_seq:
            book.lost += stream_seq - book.next_seq
            log.warning(
                "stream %r: %d record(s) lost to ring overwrite", book.name, stream_seq - book.next_seq
            )
        book.next_seq = stream_seq + 1

    def stream_stats(self) -> dict[str, dict[str, int]]:
        """Per stream: records written, records lost (overwritten in the ring before the writer
        read them), records unwritable (quarantined in ``rust_daq/quarantine``) and rows in the
        file. The same figures are in the file, under ``rust_daq/streams/<stream>`` as
        ``[rows, records, lost, next_stream_seq, unwritable]``."""
        return {
            b.name: {"records": b.records, "lost": b.lost, "rows": b.rows, "unwritable": b.unwritable}
            for b in self._books.values()
        }

    @property
    def records_pending(self) -> int:
        """Records the ring holds that the file does not (yet): written after the file's last
        flush. After ``close()``: what the final flush could not write."""
        if self._closed:
            return self._left_in_ring
        try:
            last = int(self._file[_PROGRESS][0]) if self._file_ok else None
        except (OSError, ValueError, KeyError):
            last = None
        if last is None:  # the ring's own count: after what was committed
            return max(self._ring.records_written - self._ring.read_tail_seq, 0)
        return max(self._ring.records_written - 1 - last, 0)

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """A final drain and flush, then the file is closed (idempotent). If the final flush
        fails, what it could not write stays in the ring (its read_tail was not advanced)."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush_retrying()
                while self._unfinished:  # (many records to quarantine: each pass finds one)
                    self._flush_retrying()
            finally:
                # What the final flush could not write (a nearly full disk: the rest of a
                # partial pass, or all of it when it failed) stays in the ring: say how much.
                self._left_in_ring = self.records_pending
                self._closed = True
                if self._file_ok:
                    self._file.close()
                self._release()
                if self._owns_ring:
                    self._ring.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def run(self) -> None:
        """Flushes every ``flush_interval`` seconds until cancelled or ``stop()``; HDF5 work runs
        in a worker thread so the event loop never blocks. Then a final drain and flush, and
        the file is closed."""
        self._stop_event = anyio.Event()
        self._done_event = anyio.Event()
        limiter = anyio.CapacityLimiter(1)
        try:
            while not self._stop_event.is_set():
                try:
                    await anyio.to_thread.run_sync(self.flush_to_disk, limiter=limiter)
                except OSError as e:  # disk full, I/O error: nothing was committed; retry
                    log.error("flush failed, will retry: %s", e)
                with anyio.move_on_after(self.flush_interval):
                    await self._stop_event.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.close, limiter=limiter)
                self._done_event.set()

    async def stop(self) -> None:
        """Stops ``run()`` (waiting for its final flush), or closes the writer if it is not running."""
        stop, done = getattr(self, "_stop_event", None), getattr(self, "_done_event", None)
        if stop is not None and done is not None and not done.is_set():
            stop.set()
            await done.wait()
        else:
            await anyio.to_thread.run_sync(self.close)
