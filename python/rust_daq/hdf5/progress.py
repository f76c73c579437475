"""The writer's progress in its file: what it has committed, written so that a writer killed at
any moment and started again resumes exactly once (docs/reliability.md).

- ``rust_daq/progress``: int64[7], the progress marker: last_seq (the last ring sequence in the
  file), records, records_lost, flushes, records_unwritable, records_skipped, marker (the
  number of the flush that wrote it).
- ``rust_daq/resume/<group>``: int64[2, 6], per stream two slots of [rows, records, lost,
  next_stream_seq, unwritable, marker]; the slot whose last value is the marker's number is
  the stream's committed book.
- ``rust_daq/streams/<group>``: int64[5], the readable view of each stream's book (it may run
  one flush ahead of the marker after a writer was killed between the two).

A flush commits in this order, each step flushed before the next (HDF5 writes each small
dataset with its own pwrite, so a kill can fall between any two): the data; the books in the
slot of the next marker; the marker, the views and ``measurements/end_time``. Only then does
the writer move the ring's ``read_tail``. :func:`read_progress` reads the committed state of
any file, also one another process is writing.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .._errors import IncompatibleFileError
from .file import arrow_name, consistency_flags, iso_now, set_arrow_name
from .layouts import StreamBook

__all__ = ["Progress", "StreamProgress", "read_progress"]

PROGRESS = "rust_daq/progress"
STREAMS = "rust_daq/streams"
RESUME = "rust_daq/resume"
PROGRESS_FIELDS = 7
BOOK_FIELDS = 5  # rows, records, lost, next_stream_seq, unwritable
UNCOMMITTED = [0, 0, 0, -1, 0]  # a stream's book before anything of it is committed


@dataclass(frozen=True)
class StreamProgress:
    """One stream's committed book: rows and records in the file, records lost (overwritten
    in the ring before the writer read them), the next stream sequence number expected (-1:
    nothing of the stream committed yet), records unwritable (quarantined)."""

    rows: int
    records: int
    lost: int
    next_seq: int
    unwritable: int


@dataclass(frozen=True)
class Progress:
    """A writer's file by its last progress marker (see the module documentation); `streams`
    by Arrow stream name."""

    last_seq: int
    records: int
    lost: int
    flushes: int
    unwritable: int
    skipped: int
    marker: int
    streams: Mapping[str, StreamProgress]


def _committed(f: h5py.File) -> tuple[list[int], bool, dict[str, tuple[str, list[int]]]]:
    """The marker's fields (padded to 7), whether the file is an older writer's (no resume
    slots), and per stream group its Arrow name and committed book."""
    progress = [int(v) for v in f[PROGRESS][()]]
    legacy = len(progress) < PROGRESS_FIELDS  # a writer from before the resume slots
    progress += [0] * (PROGRESS_FIELDS - len(progress))
    marker = progress[6]
    resume = f.get(RESUME)
    books: dict[str, tuple[str, list[int]]] = {}
    for group, ds in f[STREAMS].items():
        if resume is not None and group in resume:
            # The slot written with this marker: the books of the flush the marker closed (a
            # writer killed between its books and its marker left the other slot newer).
            slots = resume[group][()]
            values = next((list(map(int, s[:BOOK_FIELDS])) for s in slots if s[BOOK_FIELDS] == marker), None)
            values = values or list(UNCOMMITTED)  # made after that flush: nothing committed
        elif legacy:  # an older writer's file: its flat book
            values = [int(v) for v in ds[()]]
            values += [0] * (BOOK_FIELDS - len(values))
        else:  # a view whose slots a killed writer never wrote: nothing of it committed
            values = list(UNCOMMITTED)
        books[group] = (arrow_name(ds.attrs, group), values[:BOOK_FIELDS])
    return progress, legacy, books


def _open_for_reading(path: str) -> h5py.File:
    """The file as its readers open it: SWMR (a running append writer), else plainly, else
    without HDF5's locking (readers of its own may hold the file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(2, f"{path} does not exist", path)
    for kwargs in ({"libver": "latest", "swmr": True}, {}, {"locking": False}):
        try:
            return h5py.File(path, "r", **kwargs)
        except OSError as e:
            error = e
    if consistency_flags(path):
        raise BlockingIOError(
            errno.EWOULDBLOCK,
            f"{path} is open for writing without SWMR (a running batches-layout writer; an append-layout "
            "writer for the moment it makes a new stream's datasets: retry), or was left so by a killed "
            f"writer; HDF5 reads it once its writer closes it, or after rust_daq.writer.repair() ({error})",
            path,
        )
    raise IncompatibleFileError(f"{path} is not a readable HDF5 file: {error}")


def read_progress(path: str | os.PathLike[str]) -> Progress:
    """The progress marker and per-stream books of a writer's file, as its last completed
    flush committed them; safe on a file another process is writing with SWMR (the append
    layout). Raises FileNotFoundError, BlockingIOError (a file open for writing without SWMR:
    HDF5 refuses every reader), IncompatibleFileError (not an HDF5 file, or no rust-daq
    writer's)."""
    path = os.fspath(path)
    with _open_for_reading(path) as f:
        if PROGRESS not in f or STREAMS not in f:
            raise IncompatibleFileError(f"{path} is not a rust-daq writer's file (it has no {PROGRESS})")
        try:
            progress, _, books = _committed(f)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise IncompatibleFileError(f"{path}: its rust-daq progress does not read: {e}") from e
    last, records, lost, flushes, unwritable, skipped, marker = progress
    streams = {name: StreamProgress(*values[:BOOK_FIELDS]) for name, values in books.values()}
    return Progress(last, records, lost, flushes, unwritable, skipped, marker, streams)


# -- the writer's side ------------------------------------------------------------------------


class Handles:
    """The writer's own entries, opened once per file handle: an h5py lookup costs ~65 µs and
    a pass makes a dozen (a one-row flush would spend most of its time there). Refreshed
    when the writer's file handle changes (reopened out of SWMR, or after a failed pass)."""

    def __init__(self) -> None:
        self._file: h5py.File | None = None
        self._open: dict[str, Any] = {}
        #: Stream groups known to have their view and resume slots (in any handle of the file).
        self.known: set[str] = set()

    def __call__(self, f: h5py.File, path: str) -> Any:
        if f is not self._file:
            self._file, self._open = f, {}
        obj = self._open.get(path)
        if obj is None:
            obj = self._open[path] = f[path]
        return obj


_ROW_SPACES: dict[int, Any] = {}
#: File dataspaces of the books' slot datasets (fixed extents), by dataset id: made once.
_SLOT_SPACES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _put(ds: h5py.Dataset, values: Any, row: int | None = None) -> None:
    """``ds[...] = values`` (or ``ds[row] = values``) for the small int64 datasets of the
    books, through the low-level write, with dataspaces made once (a pass writes two books
    per stream: with 1,000 streams, making them was a tenth of the pass)."""
    data = np.asarray(values, dtype=np.int64)
    if row is None:
        ds.id.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
        return
    space = _SLOT_SPACES.get(ds.id)
    if space is None:
        space = _SLOT_SPACES[ds.id] = ds.id.get_space()
    space.select_hyperslab((row, 0), (1, len(data)))
    mem = _ROW_SPACES.get(len(data))
    if mem is None:
        mem = _ROW_SPACES[len(data)] = h5py.h5s.create_simple((1, len(data)))
    ds.id.write(mem, space, data.reshape(1, -1))


def last_seq(f: h5py.File, handles: Handles | None = None) -> int:
    """The last ring sequence number the file's marker covers (-1: none)."""
    ds = f[PROGRESS] if handles is None else handles(f, PROGRESS)
    out = np.empty(ds.id.shape, np.int64)
    ds.id.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
    return int(out[0])


def create(f: h5py.File) -> None:
    """The books of a new file: no NeXus class (NXroot holds NXentry groups only), so NeXus
    tools pass them by."""
    book = f.create_group("rust_daq")
    book.create_dataset("progress", data=np.array([-1, 0, 0, 0, 0, 0, 0], dtype=np.int64))
    book.create_group("streams")
    book.create_group("resume")


def resume(f: h5py.File) -> tuple[list[int], dict[str, StreamBook]]:
    """Back to the last marker: its fields, and every stream's book as it committed it (views
    rewritten to match, older writers' layouts brought up to date)."""
    progress, _, committed = _committed(f)
    if f[PROGRESS].shape != (PROGRESS_FIELDS,):  # a file from an older writer
        del f[PROGRESS]
        f.create_dataset(PROGRESS, data=np.array(progress, dtype=np.int64))
    marker = progress[6]
    streams = f[STREAMS]
    resume_group = f.require_group(RESUME)
    books: dict[str, StreamBook] = {}
    for group, (name, values) in committed.items():
        rows, records, lost, next_seq, unwritable = values
        b = books[name] = StreamBook(name, group, rows, records, lost, next_seq, unwritable)
        if streams[group].shape != (BOOK_FIELDS,):
            del streams[group]
            set_arrow_name(streams.create_dataset(group, data=np.array(b.values(), np.int64)).attrs, name)
        else:
            streams[group][...] = b.values()  # the readable view, as the marker says
        if group not in resume_group:
            create_resume(resume_group, b, marker, committed=True)
    return progress, books


def create_books(
    f: h5py.File,
    structural: Callable[[], h5py.File],
    books: Mapping[str, StreamBook],
    marker: int,
    handles: Handles | None = None,
) -> None:
    """Views and resume slots for the streams that have none yet; `structural()` gives the
    file ready for new objects (out of SWMR mode)."""
    known = handles.known if handles is not None else None
    if known is not None and all(b.group in known for b in books.values()):
        return  # (every stream has its view: no lookup at all, the common case)
    streams = f[STREAMS]
    if known is not None:
        known.update(b.group for b in books.values() if b.group in streams)
    if any(b.group not in streams for b in books.values()):
        f = structural()
        streams, resume_group = f[STREAMS], f.require_group(RESUME)
        for b in books.values():
            if b.group not in streams:
                # Nothing of it is committed yet (this pass's marker may never be written):
                # the view says so too, until the marker does.
                view = streams.create_dataset(b.group, data=np.array(UNCOMMITTED, np.int64))
                set_arrow_name(view.attrs, b.name)
                create_resume(resume_group, b, marker, committed=False)


def create_resume(resume_group: h5py.Group, b: StreamBook, marker: int, *, committed: bool) -> None:
    """Two slots of [rows, records, lost, next_stream_seq, unwritable, marker]: each flush
    writes one, then the progress marker naming it, so that a writer killed between the
    two leaves the slot of the last marker whole."""
    state = b.values() if committed else UNCOMMITTED  # (a new stream: nothing committed yet)
    slots = np.array([[*state, marker], [*state, -1]], dtype=np.int64)
    if b.group in resume_group:  # (left by a writer killed before the stream's view was made)
        del resume_group[b.group]
    set_arrow_name(resume_group.create_dataset(b.group, data=slots).attrs, b.name)


def write_slots(f: h5py.File, books: Mapping[str, StreamBook], marker: int, handles: Handles) -> None:
    """The books in the slot of `marker`, the next one: no marker names that slot yet, so they
    may go to disk with the pass's data, in its flush, before :func:`commit` names them."""
    for b in books.values():
        _put(handles(f, f"{RESUME}/{b.group}"), [*b.values(), marker], row=marker % 2)


def commit(
    f: h5py.File,
    books: Mapping[str, StreamBook],
    fields: list[int],
    marker: int,
    handles: Handles | None = None,
) -> None:
    """After the data and the books' slot (:func:`write_slots`) are flushed: the marker
    (`fields`: its first six values) naming that slot, the views and end_time, flush."""
    get = handles or Handles()
    _put(get(f, PROGRESS), [*fields, marker])
    for b in books.values():
        _put(get(f, f"{STREAMS}/{b.group}"), b.values())
    end = get(f, "measurements/end_time")
    now = np.array(iso_now().encode(), dtype=end.dtype)
    end.id.write(h5py.h5s.ALL, h5py.h5s.ALL, now)
    f.flush()
