"""The background HDF5 writer: drains a ring into an HDF5 file that h5py, MATLAB, Igor, silx
and HDFView open, while the acquisition loop never waits for it.

Run it in its own process (the default deployment: h5py holds the GIL between calls and a
writer thread beside a hardware loop shows up as jitter)::

    python -m rust_daq.writer --ring RING --output run.h5 [--layout append|batches]
    python -m rust_daq.writer --repair run.h5     # after a crash, for plain h5py opens

or in-process, from async code (asyncio or trio, through anyio)::

    async with HDF5Writer("run.h5", ring) as writer:
        await writer.run()          # until cancelled, or `await writer.stop()`

Durability: a pass writes the data and every stream's book (rows, records, lost, next
stream_seq, unwritable) into the slot of the next marker (``rust_daq/resume``; no marker
names that slot yet) and flushes; writes the progress marker naming that slot (``rust_daq/progress``) with the readable
views (``rust_daq/streams``) and flushes; only then commits the ring's ``read_tail``. A writer
killed at any moment and started again on the same ring and file trims every dataset to the
marker's slot and skips what the file already holds: every record ends up in the file exactly
once, as long as the ring did not overwrite it meanwhile (then it is counted as lost, from
the gaps in the sequence numbers, in the file and the log).

Any batch: records are decoded by the one read path (``rust_daq._records``), Arrow columns
become HDF5 arrays as ``columns.py`` tabulates (nulls: fill value plus a validity dataset),
names are mapped to valid HDF5 names, a type change starts a new dataset generation
(``layouts.py``); a record that still cannot be written is quarantined in
``rust_daq/quarantine`` (its Arrow bytes, stream, reason; ``quarantine.py``) and counted. The
file is never touched before it is known to be this run's and closed elsewhere (an OFD lock
for the writer's life; ``open.py``). docs/reliability.md states all of it, with the tests.

This module is the drain loop and the writer's lifecycle; the progress format is
``progress.py``, the disk-space budget ``space.py``, the layouts ``layouts.py`` and
``batches.py``. (Over 500 lines: a third is this documentation, and the pass with its
retry rules reads best in one place.)

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

import inspect
import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import anyio
import h5py
import numpy as np
import pyarrow as pa

from .._arrow import StreamInfo
from .._errors import IncompatibleFileError, JetStreamError, RustDaqError
from .._gc import paused as gc_paused
from .._records import DECODE_ERRORS, LossAccount, RecordDecoder, SchemaTable
from .._ring import RingBuffer
from . import progress, quarantine
from .batches import BatchesLayout
from .columns import Plan, pieces_of, plan_of
from .file import allocate, clear_consistency_flags, compression_filters, hdf5_name
from .layouts import ENTRY_NAMES, AppendLayout, FileLayout, Item, StreamBook
from .open import OutputFile
from .quarantine import Bad, Quarantine, _Unwritable
from .space import MARGIN, SpaceBudget, _NoSpace, disk_trouble, errno_of, io_error

__all__ = ["DatasetInfo", "HDF5Writer", "IncompatibleFileError", "RecordSource", "repair"]

log = logging.getLogger("rust_daq.writer")

Layout = Literal["append", "batches"]
Start = Literal["tail", "now"]
#: Called after every flush that committed records, with the rows of each stream the file
#: holds; may return an awaitable (awaited by ``run()``).
OnFlush = Callable[[dict[str, int]], None | Awaitable[None]]
# At most this many records decoded and written per step (each stream's records of a step
# are one append per column: with 1,000 streams of 10 records a pass, 4,096 made three
# appends per column a pass instead of one)...
_READ_CHUNK = 16384
_READ_BYTES = 64 << 20  # ...and about this many bytes: the writer's memory stays flat
_ATTEMPTS = 256  # passes a flush may abandon (each torn, or finding a record HDF5 refuses)
FIRST_SEQ = "rust_daq_first_seq"  # file attribute: the first ring record the file may hold


#: The writer's compression option parser (the supervisor checks options with it).
_compression = compression_filters


def repair(path: str | os.PathLike[str]) -> bool:
    """Lets plain ``h5py.File(path)`` open a file whose writer was killed: clears the "open for
    (SWMR) write" flags HDF5 leaves in the superblock, like ``h5clear -s``. A writer restarted
    on the file does this itself, and SWMR readers (``swmr=True``) need no repair. Returns True
    if the file needed it."""
    return clear_consistency_flags(os.fspath(path))


class RecordSource(Protocol):
    """What the writer drains instead of a ring: ``rust_daq.nats.source.JetStreamSource``
    (JetStream). Readers at its last commit (``reader("tail")``, with ``read()`` and
    ``commit()``), records as a ring's, its own schema table; ``dense`` False: gaps in its
    sequence numbers are other messages, not losses (those show in each stream's numbering);
    ``seek(held)`` is told the file's last record before the first reader is made."""

    path: str
    session_id: Any
    dense: bool

    def reader(self, start: str = ...) -> Any: ...
    def schema_table(self) -> Any: ...
    def seek(self, held: int) -> None: ...
    @property
    def read_tail_seq(self) -> int: ...
    @property
    def records_written(self) -> int: ...


class _TornRead(Exception):
    """Records were overwritten in the ring while the writer copied them into the file."""


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset of a stream (append layout), as :meth:`HDF5Writer.datasets` gives it."""

    column: str  #: the Arrow column (a struct's field as ``col.field``; ``time``: the axis)
    path: str  #: the dataset's path in the file, e.g. ``/measurements/voltmeter/voltage``
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  #: of one row (``()`` for scalars, ``(h, w)`` for frames)
    chunks: tuple[int, ...]  #: the dataset's chunk shape, rows first
    validity: str | None  #: the path of its validity dataset, if it has one (nulls)


class HDF5Writer:
    """Drains a ring into an HDF5 file. See the module documentation.

    Raises FileNotFoundError / PermissionError (output directory missing or not writable),
    IncompatibleFileError (an existing file of another layout or ring session), BlockingIOError
    (the file is open for writing elsewhere), ValueError (bad arguments).
    """

    def __init__(
        self,
        output_path: str | os.PathLike[str],
        ring_buffer: RingBuffer | str | os.PathLike[str] | RecordSource,
        *,
        flush_interval: float = 1.0,
        layout: Layout = "append",
        compression: str | None = None,
        swmr: bool = True,
        metadata: dict[str, Any] | None = None,
        streams: Sequence[str] | None = None,
        start: Start = "tail",
        on_flush: OnFlush | None = None,
        schemas: Mapping[str, pa.Schema] | None = None,
    ) -> None:
        if start not in ("tail", "now"):
            raise ValueError(f"unknown start {start!r}; use 'tail' or 'now'")
        if on_flush is not None and not callable(on_flush):
            raise ValueError(f"on_flush must be callable, got {type(on_flush).__name__}")
        for name, schema in (schemas or {}).items():
            if not isinstance(name, str) or not isinstance(schema, pa.Schema):
                raise ValueError(f"schemas maps stream names to pyarrow.Schema; got {name!r}: {schema!r}")
        if layout not in ("append", "batches"):
            raise ValueError(f"unknown layout {layout!r}; use 'append' or 'batches'")
        if not (
            isinstance(flush_interval, int | float) and math.isfinite(flush_interval) and flush_interval > 0
        ):
            raise ValueError(f"flush_interval must be a positive number of seconds, got {flush_interval!r}")
        self.layout: Layout = layout
        self.flush_interval = float(flush_interval)
        self._filters = compression_filters(compression)
        self._swmr = swmr
        self._start: Start = start
        self._on_flush = on_flush
        self._schemas = dict(schemas or {})
        self._only = set(streams) if streams is not None else None
        # A ring, or what reads like one (rust_daq.nats.source: JetStream), which gives its own
        # schema table and whose sequence numbers have gaps that are not losses (``dense``).
        opened = isinstance(ring_buffer, str | os.PathLike)
        ring: Any = ring_buffer
        self._ring: Any = RingBuffer.open(os.fspath(ring)) if opened else ring
        self._owns_ring = opened
        table = getattr(self._ring, "schema_table", None)
        self._decoder = RecordDecoder(table() if table is not None else SchemaTable(self._ring))
        self._dense = bool(getattr(self._ring, "dense", True))
        if start == "now" and not self._dense:
            raise ValueError(
                "start='now' needs a ring: a writer of a source (JetStream) starts where its file "
                "ends, or at the source's first record for a new file"
            )
        only = self._only
        self._wanted = None if only is None else (lambda info: info.name in only)
        self._losses = LossAccount()  # the books' StreamLoss objects, by stream name
        self._plans: dict[int, tuple[StreamInfo, Plan]] = {}  # id(info) -> its schema's plan
        self._lock = threading.Lock()  # one flush at a time (run() and flush_to_disk())
        self._closed = False
        self._in_run = False  # run() delivers on_flush on its event loop
        self._commits = 0  # progress markers written, all files
        self._notified = 0  # ...of which on_flush has been told
        # (markers written, rows per stream at the last one): one value, replaced whole, so
        # that the loop never pairs a new count with old rows
        self._committed: tuple[int, dict[str, int]] = (0, {})
        self._wake: anyio.Event | None = None
        self._warned: set[str] = set()
        self._left_in_ring = 0
        self.last_file_records = 0  #: records the last file closed (by rotate or close) holds
        self._end_seq = 0  # the record after the last one the last closed file covers
        self._idle = False  # rotated to no file
        self._floor = 0  # records before this seq belong to no file of ours (set by _open)
        self._begin(output_path, metadata, at=None)

    def _begin(
        self, output_path: str | os.PathLike[str], metadata: dict[str, Any] | None, at: int | None
    ) -> None:
        """Starts a file: a new one (at the ring's tail, at ``start="now"``'s head, or at
        `at` after a rotation), or an earlier writer's run of this ring, resumed."""
        self.path = os.fspath(output_path)
        self._metadata = dict(metadata or {})
        self._layout: FileLayout = (
            AppendLayout(self._filters) if self.layout == "append" else BatchesLayout(self._filters)
        )
        self.records_written = 0
        self.records_lost = 0
        self.records_unwritable = 0  # quarantined: in rust_daq/quarantine, not in measurements
        self.records_skipped = 0  # not Arrow, or a stream not selected
        self._books: dict[str, StreamBook] = {}
        self._quarantine = Quarantine()
        self._space = SpaceBudget(self.path)
        self._unfinished = False  # the last flush stopped early: records still to quarantine
        self._until: int | None = None  # rotating: records from this seq on go to the next file
        self._marker = 0  # the number of the last progress marker written
        # Where a new file starts: at `at` (a rotation), at the ring's head (start="now"), or
        # at its tail. Stored in the file (rust_daq_first_seq), so that a writer restarted
        # on it after a crash starts there too; `_floor` is set from the file by _open() (a
        # failed open keeps the previous one, which the next file then starts from).
        latest = self._ring.reader("latest") if at is None and self._start == "now" else None
        self._first = at if at is not None else (latest.next_seq if latest is not None else None)
        self._handles = progress.Handles()  # the file's own entries, opened once per handle
        self._out = OutputFile(
            self.path, self.layout, str(self._ring.session_id), swmr=self._swmr and self._layout.swmr
        )
        try:
            fresh = self._open()
        except BaseException:
            self._out.release()
            raise
        if fresh and latest is not None:
            # From now on: what the ring holds already is an earlier run's, not this file's.
            self._reader, self._reader_from = latest, self._floor
            return
        self._new_reader()

    @property
    def batch_count(self) -> int:
        """The progress marker's ``flushes``: flushes that wrote records (append layout), batch
        groups written (batches layout)."""
        return self._layout.flushes

    @property
    def _file(self) -> h5py.File:
        """The open HDF5 file (it changes when the writer leaves SWMR or reopens it)."""
        return self._out.file

    # -- the file -----------------------------------------------------------------------------

    def _open(self) -> bool:
        """Opens the file (new, or resumed at its last marker); then datasets for the streams
        known now, then SWMR: from here on a reader can open the file at any moment, also
        after a crash (``swmr=True``). Returns True if the file is new."""
        fresh = self._out.open(self._ring.path, self._metadata)
        if fresh:
            self._marker = 0
            if self._first is not None:  # (an attribute: made before SWMR)
                self._out.file.attrs[FIRST_SEQ] = self._first
        else:
            self._resume()
        first = self._out.file.attrs.get(FIRST_SEQ)
        # Records before this seq belong to no file of ours (an earlier run's, another file's).
        self._floor = 0 if first is None else int(first)
        # A file that starts at a given record (start="now", a rotation) is a new run's: the
        # ring's schema table holds earlier runs' streams (and their schemas, which need not
        # be this run's), so only `schemas` are made at its open.
        self._at_boundary = first is not None
        self._losses = LossAccount()
        self._losses.streams.update({b.name: b.loss for b in self._books.values()})
        f = self._out.file
        self._layout.ready(f)
        self._precreate()
        self._out.file.flush()
        self._out.enter_swmr()
        self._out.ok = True
        self._held = progress.last_seq(self._out.file)  # the last record the file holds
        return fresh

    def _resume(self) -> None:
        """Back to the state of the last completed flush: trim what came after it."""
        f = self._out.file
        fields, books = progress.resume(f)
        _, written, lost, flushes, unwritable, skipped, marker = fields
        self.records_written, self.records_lost = written, lost
        self.records_unwritable, self.records_skipped = unwritable, skipped
        self._marker = marker
        self._books.clear()
        self._books.update(books)
        self._layout.resume(f, self._books, flushes)
        quarantine.trim(f, unwritable)
        f.flush()

    def _book(self, name: str) -> StreamBook:
        book = self._books.get(name)
        if book is None:
            f = self._out.file
            taken = (
                {b.group for b in self._books.values()} | set(f["measurements"]) | set(f[progress.STREAMS])
            )
            group = allocate(hdf5_name(name, ENTRY_NAMES), taken | ENTRY_NAMES)
            book = self._books[name] = StreamBook(name, group, next_seq=-1)
            self._losses.streams[name] = book.loss
        return book

    def _precreate(self) -> None:
        """Groups and datasets for the streams the ring's schema table holds now, before SWMR
        starts: SWMR forbids new objects, and leaving it takes every reader's file away. (A
        file that starts at a boundary: only those of ``schemas``.)"""
        streams: dict[str, StreamInfo] = {}
        try:
            if not self._at_boundary:
                streams = dict(self._decoder.schemas.streams())
        except DECODE_ERRORS + (RustDaqError,) as e:
            log.error("the ring's schema table does not decode: %s", e)
        for name, schema in self._schemas.items():  # (given: the ring's own comes first)
            streams.setdefault(name, StreamInfo(name, 0, 0, schema))
        for name, info in streams.items():
            if self._only is not None and name not in self._only:
                continue
            book = self._book(name)
            try:
                self._layout.prepare(self._out.file, self._out.structural, book, info)
            except Exception as e:  # its first record will tell (and be quarantined if need be)
                log.warning("stream %r: cannot prepare its datasets: %s", name, e)
        self._create_books()

    def _create_books(self) -> None:
        progress.create_books(self._out.file, self._out.structural, self._books, self._marker, self._handles)

    # -- draining -------------------------------------------------------------------------------

    def flush_to_disk(self) -> int:
        """One synchronous pass: drain what the ring holds, write it, flush, record progress,
        commit the ring's read_tail. Returns the number of records written.

        A record that cannot be written for a reason of its own (it does not decode, or HDF5
        refuses its data) is quarantined: its Arrow bytes go to ``rust_daq/quarantine`` and it
        is counted as ``unwritable`` for its stream, and the pass goes on. Raises OSError when
        the disk fails (nothing is committed; the next call retries)."""
        written = self._flush_locked()
        if not self._in_run:
            self._notify_here()
        return written

    def _flush_locked(self) -> int:
        with self._lock:
            if self._closed:
                raise ValueError("flush_to_disk() on a closed HDF5Writer")
            return self._flush_retrying()

    def _flush_retrying(self) -> int:
        if self._idle:  # (rotated to no file: the ring keeps what comes, for the next)
            return 0
        if not self._out.ok:
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
                self._quarantine.failed(e)
            except _NoSpace:
                raise  # nothing was written: the ring holds it all
            except JetStreamError:
                self._out.abandon()  # the source failed, not the file: its own error
                raise
            except (OSError, RuntimeError) as e:
                # h5py reports failed writes (disk full, EFBIG, EIO) as RuntimeError or OSError.
                self._out.abandon()
                if self._space.shrink(e):
                    # The disk took less than the estimate: retry with a smaller share of it.
                    log.warning(
                        "%s: %s; retrying with fewer records", self.path, os.strerror(errno_of(e) or 0)
                    )
                    self._reattach()
                    continue
                raise io_error(self.path, e) from e
            # Abandon this pass before its marker: the retry reads the ring again from its tail.
            self._out.abandon()
            self._reattach()
        # Each attempt found one more record to quarantine: the next flush goes on from there.
        log.warning(
            "%s: %d records quarantined so far; this flush goes on at the next",
            self.path,
            len(self._quarantine.condemned),
        )
        self._unfinished = True
        return 0

    def _reattach(self) -> None:
        """After a failed pass (its file handle abandoned): nothing was committed to the ring
        past the last good marker, so the file is reopened, trimmed to that marker, and the
        ring read again from its tail."""
        self._books.clear()
        self._open()
        self._new_reader()

    def _new_reader(self) -> None:
        """A cursor at the ring's read_tail. Losses are counted from sequence gaps after the
        file's last record and this starting point, not from the reader's own count: a new
        reader at the tail would count again what was lost (or written) before."""
        seek = getattr(self._ring, "seek", None)
        if seek is not None:  # (a source that delivers from where the file ends)
            seek(self._held)
        self._reader = self._ring.reader("tail")
        self._reader_from = self._ring.read_tail_seq

    def _flush(self, copy: bool = False) -> int:
        written = 0
        quarantined = 0
        committed_seq = last_seq = self._held
        limit = 64  # records per read until their size is known
        budget, code = self._space.available()
        full = False  # the disk holds no more this pass: the rest stays in the ring
        pass_rows: dict[str, int] = {}  # rows of each stream this pass has taken so far
        # The next record, unless lost.
        expected = max(last_seq + 1, self._reader_from, self._floor)
        lost = 0
        skipped_before = self.records_skipped
        until = self._until
        reached = False  # rotating: a record of the next file was read; this pass ends here
        while not (full or reached):
            with gc_paused():  # (this read's records held until written: see rust_daq._gc)
                # Zero-copy: HDF5 reads the columns straight from the ring. Every record used is
                # validated after the write; a torn one aborts the flush.
                records = self._reader.read(max_records=limit, copy=copy)
                pending: dict[str, list[Item]] = {}
                bad: list[Bad] = []
                taken = 0
                for rec in records:
                    if rec.seq <= last_seq or rec.seq < self._floor:
                        # Already in the file (a restart after its marker, before its commit), or
                        # before this file's start (another file's, or a run before start="now").
                        taken += 1
                        continue
                    if until is not None and rec.seq >= until:
                        reached = True  # the next file's: left in the ring
                        break
                    sorted_ = self._sort(rec)
                    if budget is not None and sorted_ is not None:
                        cost = self._cost(rec, sorted_, pass_rows)
                        if cost + MARGIN > budget:
                            full = True  # whole records only, in ring order: the marker stays exact
                            break
                        budget -= cost
                    if rec.seq > expected and self._dense:  # overwritten before the writer read them
                        lost += rec.seq - expected
                    expected = rec.seq + 1
                    taken += 1
                    gap = self._take(rec, sorted_, pending, bad, pass_rows)
                    if not self._dense:  # (a source's losses: its streams' sequence gaps)
                        lost += gap
                records = records[:taken]
                if full and not pending and not bad and written == 0 and quarantined == 0:
                    self._new_reader()  # (our cursor read past what it wrote)
                    self.records_skipped = skipped_before  # counted again when read again
                    raise _NoSpace(
                        code,
                        f"{self.path}: no room for the next record ({budget or 0} bytes left after a "
                        f"{MARGIN}-byte margin); nothing was written, the ring still holds it",
                    )
                for name, items in pending.items():
                    written += self._write_stream(self._books[name], items)
                if bad:
                    self._quarantine.write(self._out.file, bad, self._book)
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
                if len(records) < limit or reached:
                    break
                average = sum(len(r.data) for r in records) / len(records)
                limit = int(min(max(_READ_BYTES // max(average, 1), 1), _READ_CHUNK))
        if lost:
            log.warning("%d record(s) were overwritten in the ring before the writer read them", lost)
            self.records_lost += lost
        if written == 0 and not quarantined and not lost and last_seq == committed_seq:
            if reached:
                self._new_reader()  # (our cursor read the next file's records)
            return 0
        self._layout.flushed(written)
        self.records_written += written
        self.records_unwritable += quarantined
        self._create_books()
        # 1. the data and the books in the slot of the next marker (a slot no marker names
        # yet), one flush; 2. the marker naming that slot, flush; 3. the ring's read_tail.
        # HDF5 writes each small dataset with its own pwrite at a flush, so a kill can fall
        # between any two of them: the marker must not go out with what it names.
        marker = self._marker + 1
        progress.write_slots(self._out.file, self._books, marker, self._handles)
        self._out.file.flush()
        progress.commit(
            self._out.file,  # (new objects may have reopened it)
            self._books,
            [
                last_seq,
                self.records_written,
                self.records_lost,
                self.batch_count,
                self.records_unwritable,
                self.records_skipped,
            ],
            marker,
            self._handles,
        )
        self._marker = marker
        self._held = last_seq
        self._commits += 1
        self._committed = (self._commits, {b.name: b.rows for b in self._books.values()})
        self._out.enter_swmr()
        if reached:
            # Our cursor read records of the next file: read_tail stays where it is, and the
            # next file reads again from it (skipping what is this file's by its floor).
            self._new_reader()
        elif full:
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
            self._space.reset()
        return written

    def _sort(self, rec: Any) -> Item | tuple[StreamInfo | None, str] | None:
        """What a record is, with no side effect on the writer's books: None (not Arrow, or a
        stream not selected: skipped), an Item to write, or (stream, reason) to quarantine."""
        reason = self._quarantine.condemned.get(rec.seq)
        if reason is not None:  # (HDF5 refused it: an Arrow record of a selected stream)
            return self._decoder.info(rec), reason
        try:
            d = self._decoder.decode(rec, wanted=self._wanted)
        except RustDaqError as e:
            known = self._decoder.schemas.by_id.get(rec.schema_id)
            if known is not None:  # (its schema is known: the payload is what failed)
                return known, f"does not decode: {e}"
            log.error("the ring's schema table does not decode: %s", e)
            return None, f"schema id {rec.schema_id} is not in the ring's schema table"
        if d is None:
            return None
        info, batch = d.info, d.batch
        if batch is None or info is None:  # (its schema is unknown, or it does not decode)
            return info, d.error or "does not decode"
        try:
            return Item(pieces_of(batch, self._plan(info)), batch.num_rows, rec, info)
        except Exception as e:  # a batch that contradicts its schema
            return info, f"cannot be converted for HDF5: {type(e).__name__}: {e}"

    def _plan(self, info: StreamInfo) -> Plan:
        """What the pieces of `info`'s batches are, as far as its schema decides (once per
        schema-table entry: the entry kept with it, so that its id names it alone)."""
        hit = self._plans.get(id(info))
        if hit is None or hit[0] is not info:
            hit = self._plans[id(info)] = (info, plan_of(info.schema))
        return hit[1]

    def _cost(
        self, rec: Any, sorted_: Item | tuple[StreamInfo | None, str], pass_rows: dict[str, int]
    ) -> int:
        """Bytes of file a record may take: its payload (an upper bound of its columns), and
        the chunks its rows open (HDF5 allocates a chunk whole at its first write)."""
        chunks = 0
        if isinstance(sorted_, Item):
            name = sorted_.info.name
            book = self._books.get(name) or StreamBook(name, "")
            chunks = self._layout.new_chunk_bytes(book, sorted_, book.rows + pass_rows.get(name, 0))
        return self._space.cost(rec, chunks)

    def _take(
        self,
        rec: Any,
        sorted_: Item | tuple[StreamInfo | None, str] | None,
        pending: dict[str, list[Item]],
        bad: list[Bad],
        pass_rows: dict[str, int],
    ) -> int:
        """Takes a sorted record into this pass: counted as skipped, to be written, or to be
        quarantined; its stream's sequence accounted. Returns the stream's records lost
        just before it."""
        if sorted_ is None:
            self.records_skipped += 1
            if rec.schema_id == 0:
                self._warn_once("plain", "plain (non-Arrow) records are counted as skipped, not written")
            return 0
        info = sorted_.info if isinstance(sorted_, Item) else sorted_[0]
        gap = self._count(self._book(info.name), rec.stream_seq) if info is not None else 0
        if isinstance(sorted_, Item):
            name = sorted_.info.name
            pending.setdefault(name, []).append(sorted_)
            pass_rows[name] = pass_rows.get(name, 0) + sorted_.rows
        else:
            bad.append((rec, info, sorted_[1]))
        return gap

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _write_stream(self, book: StreamBook, items: list[Item]) -> int:
        """Writes one stream's records of this pass; a failure that is not the disk's names
        the records (all of them, or the one, when they are written one by one)."""
        for group in self._quarantine.groups(items, lambda it: int(it.record.seq)):
            try:
                self._layout.write(self._out.file, self._out.structural, book, list(group))
            except Exception as e:
                if isinstance(e, OSError | RuntimeError) and disk_trouble(self.path, e):
                    raise
                raise _Unwritable([it.record.seq for it in group], e) from e
        book.records += len(items)
        return len(items)

    def _count(self, book: StreamBook, stream_seq: int | None) -> int:
        """Per-stream accounting: a gap in the stream's sequence numbers is its records lost."""
        if stream_seq is None:
            return 0
        if book.loss.next_seq is None and not self._dense:
            # A source's stream numbering starts at 0 at its publisher (rust_daq.nats): what
            # came before the stream's first record here never reached the source, lost.
            book.loss.next_seq = 0
        elif book.loss.next_seq is None and self._reader.lost > 0 and self._floor == 0:
            # First record of this stream in this file. If the reader lost nothing so far, the
            # stream's earlier records went to another file: this one is the baseline (the
            # account's own rule for a first record). If it did (the ring lapped the tail
            # before this file got it), they count as lost: from 0. (A file that starts at
            # a given record, start="now" or a rotation, starts its streams' books there.)
            book.loss.next_seq = 0
        gap = self._losses.observe(book.name, stream_seq)
        if gap:
            log.warning("stream %r: %d record(s) lost to ring overwrite", book.name, gap)
        return gap

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
        if self._idle:
            return max(int(self._ring.records_written) - self._floor, 0)
        try:
            last = progress.last_seq(self._out.file) if self._out.ok else None
        except (OSError, ValueError, KeyError):
            last = None
        if last is None:  # the ring's own count: after what was committed
            return max(int(self._ring.records_written) - int(self._ring.read_tail_seq), 0)
        return max(int(self._ring.records_written) - max(last + 1, self._floor), 0)

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """A final drain and flush, then the file is closed (idempotent). If the final flush
        fails, what it could not write stays in the ring (its read_tail was not advanced)."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self._idle:
                    self._finish(None)
            finally:
                self._closed = True
                if self._owns_ring:
                    self._ring.close()
        if not self._in_run:
            self._notify_here()

    def _finish(self, final_metadata: dict[str, Any] | None) -> None:
        """The current file's final drain and flush (up to ``_until``, if set), its final
        metadata, then it is closed. (Under the lock.)"""
        try:
            self._flush_retrying()
            while self._unfinished:  # (many records to quarantine: each pass finds one)
                self._flush_retrying()
            if final_metadata:
                self._out.finish(final_metadata)
        finally:
            # What the final flush could not write (a nearly full disk: the rest of a partial
            # pass, or all of it when it failed) stays in the ring: say how much.
            self._left_in_ring = self.records_pending
            self.last_file_records = self.records_written
            try:  # where the next file starts: after the last record this one covers
                self._end_seq = max(progress.last_seq(self._out.file) + 1, self._floor)
            except Exception:  # (a file that failed: its last marker is what it holds)
                self._end_seq = self._floor
            self._out.close()

    def rotate(
        self,
        path: str | os.PathLike[str] | None,
        metadata: dict[str, Any] | None = None,
        *,
        at: int | None = None,
        final_metadata: dict[str, Any] | None = None,
    ) -> None:
        """One run, one file: the records before sequence number `at` (default: all the ring
        holds now) go to the current file, which then gets `final_metadata` (under
        ``measurements/metadata``, as ``final_json`` and one dataset per scalar) and is
        closed; `path` is opened (with `metadata`) and takes the records from `at` on. (An
        `at` beyond what the ring holds closes the file with what it holds: the next file
        takes the rest; one the file has already flushed past is a ValueError, and nothing
        changes.) With
        ``path=None`` the writer holds no file until the next ``rotate``: the ring keeps what
        is written meanwhile, and the next file takes it, unless that ``rotate`` gives `at`
        (then the next file starts there). Blocking (a final flush and a file
        open; in async code ``await anyio.to_thread.run_sync(writer.rotate, ...)``); the
        flushes of ``run()`` wait for it. Raises what the constructor raises for `path`: the
        old file is closed by then, and the writer holds no file."""
        with self._lock:
            if self._closed:
                raise ValueError("rotate() on a closed HDF5Writer")
            boundary = self._ring.records_written if at is None else int(at)
            if boundary < 0:
                raise ValueError(f"at must be a sequence number (>= 0), got {at!r}")
            if not self._idle:
                held = progress.last_seq(self._out.file) if self._out.ok else -1
                if held >= boundary:
                    raise ValueError(
                        f"rotate(at={boundary}): {self.path} already holds the records up to {held}; "
                        "a boundary must come before the writer flushes past it"
                    )
                self._until = boundary
                try:
                    self._finish(final_metadata)
                finally:
                    self._idle = True
                    self._floor = self._end_seq
            else:
                self.last_file_records = 0  # (no file was open: none was closed)
                if at is not None:  # (what came meanwhile is no file's)
                    self._floor = max(self._floor, boundary)
                if final_metadata:
                    log.warning("rotate(): no file is open to take final_metadata %s", final_metadata)
            if path is not None:
                self._begin(path, metadata, at=self._floor)
                self._idle = False
        if not self._in_run:
            self._notify_here()

    def datasets(self, stream: str) -> list[DatasetInfo]:
        """The datasets of `stream` in the current file (append layout): one per column (the
        newest generation of each), the time axis (``time``) included. They exist from the
        file's open on for the streams in the ring's schema table and in ``schemas``; for
        others once their first record is written. Raises KeyError for a stream the file
        has no datasets of yet, ValueError for the batches layout or without a file."""
        if self.layout != "append":
            raise ValueError(
                "datasets() describes the append layout; the batches layout has a group per flush"
            )
        with self._lock:
            if self._closed or self._idle:
                raise ValueError("datasets(): the writer has no open file")
            book = self._books.get(stream)
            group = self._out.file["measurements"].get(book.group) if book is not None else None
            if book is None or group is None:
                raise KeyError(f"stream {stream!r} has no datasets in {self.path} yet")
            newest: dict[str, tuple[int, DatasetInfo]] = {}
            for (key, _), t in book.targets.items():
                ds = group[t.name]
                column = str(ds.attrs.get("long_name", t.name)) if key != "axis" else "time"
                generation = int(ds.attrs.get("generation", 1))
                info = DatasetInfo(
                    column,
                    ds.name,
                    ds.dtype,
                    tuple(ds.shape[1:]),
                    tuple(ds.chunks or ds.shape),
                    None if t.mask is None else group[t.mask].name,
                )
                if column not in newest or newest[column][0] < generation:
                    newest[column] = (generation, info)
            return [info for _, info in newest.values()]

    # -- on_flush -------------------------------------------------------------------------------

    def _news(self) -> dict[str, int] | None:
        """The rows per stream of the last marker, if on_flush has not been told of it."""
        commits, rows = self._committed
        if self._on_flush is None or self._notified == commits:
            return None
        self._notified = commits
        return dict(rows)

    def _notify_here(self) -> None:
        """on_flush, from a synchronous call (flush_to_disk, close, rotate outside run())."""
        rows = self._news()
        if rows is None:
            return
        assert self._on_flush is not None
        out = self._on_flush(rows)
        if inspect.isawaitable(out):
            if inspect.iscoroutine(out):
                out.close()
            self._warn_once(
                "on_flush", "on_flush returned an awaitable outside run(): it is awaited only by run()"
            )

    async def _notify(self) -> None:
        rows = self._news()
        if rows is not None:
            assert self._on_flush is not None
            out = self._on_flush(rows)
            if inspect.isawaitable(out):
                await out

    async def flush(self, *, in_thread: bool = True) -> int:
        """A flush now, awaited, then ``on_flush`` (awaited too); returns the records written.
        In a worker thread by default; ``in_thread=False`` runs it in the calling thread: a
        millisecond or two on the event loop, less than the thread handoff costs (a step
        scan's point, which waits for its flush anyway), unless another flush is under way
        (then it waits for that one in a worker thread, not on the loop)."""
        # (the flush itself tells no one: on_flush is called here, on the caller's loop; a
        # flush already under way in run()'s thread would make the loop wait for it: then in
        # a worker thread too)
        if in_thread or self._lock.locked():
            written = await anyio.to_thread.run_sync(self._flush_locked)
        else:
            written = self._flush_locked()
        await self._notify()
        return written

    def flush_soon(self) -> None:
        """Wakes ``run()`` for a flush now instead of at the end of its interval (call it from
        the event loop that runs ``run()``): a step scan's point is committed when its rows
        are, not a flush interval later."""
        if self._wake is not None:
            self._wake.set()

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
        """Flushes every ``flush_interval`` seconds (or at once after :meth:`flush_soon`) until
        cancelled or ``stop()``; HDF5 work runs in a worker thread so the event loop never
        blocks, and ``on_flush`` is called (and awaited) on the loop after each flush that
        committed records. Then a final drain and flush, and the file is closed."""
        self._stop_event = anyio.Event()
        self._done_event = anyio.Event()
        self._wake = anyio.Event()
        self._in_run = True
        limiter = anyio.CapacityLimiter(1)
        try:
            while not self._stop_event.is_set():
                try:
                    await anyio.to_thread.run_sync(self.flush_to_disk, limiter=limiter)
                except JetStreamError:
                    raise  # the source is gone, not the disk: retrying would wait for ever
                except OSError as e:  # disk full, I/O error: nothing was committed; retry
                    log.error("flush failed, will retry: %s", e)
                await self._notify()
                with anyio.move_on_after(self.flush_interval):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(self.close, limiter=limiter)
                    await self._notify()
                finally:
                    self._in_run = False
                    self._wake = None
                    self._done_event.set()

    async def stop(self) -> None:
        """Stops ``run()`` (waiting for its final flush), or closes the writer if it is not running."""
        stop, done = getattr(self, "_stop_event", None), getattr(self, "_done_event", None)
        if stop is not None and done is not None and not done.is_set():
            stop.set()
            if self._wake is not None:
                self._wake.set()
            await done.wait()
        else:
            await anyio.to_thread.run_sync(self.close)
