"""The writer's append layout, the interface both layouts implement (:class:`FileLayout`;
the batches layout is in ``batches.py``), and what the writer knows of each stream.

Both layouts take a stream's decoded records of one pass (:class:`Item`: the record and its
columns as :class:`~rust_daq.hdf5.columns.Piece` objects) and write them; neither commits
anything: the writer flushes, records its progress marker and only then moves the ring's
``read_tail``. Names are mapped by :func:`~rust_daq.hdf5.file.hdf5_name` and made unique by
:func:`~rust_daq.hdf5.file.allocate`; the Arrow names stay in ``arrow_name`` attributes.

Append layout: per stream a group ``measurements/<stream>`` whose datasets all have one row
per row of the stream, in order. A column's dataset has one HDF5 type and row shape (its
``rust_daq_signature``); a batch whose column does not match any dataset of that column
(a type or tensor-shape change) goes to a new dataset, ``<column>__2``, ``__3``..., the
*generations* of the column (``generation`` attribute). A dataset with rows that hold no
value of its own (the column was null, absent from that batch, added later, or in another
generation there) has a validity dataset, ``<column>__valid`` (uint8, 1 where the row holds
a value), named by its ``validity`` attribute; float datasets also hold NaN there.

(Over 500 lines: the append layout's write path, with the dataset handles it keeps open and
the low-level writes that make a one-row flush cheap, reads best beside what it writes.)
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections import Counter
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import h5py
import numpy as np

from .._arrow import StreamInfo, empty_batch
from .._records import StreamLoss
from .columns import Piece, pieces_of
from .file import allocate, arrow_name, attr_text, chunk_rows, hdf5_name, schema_json, set_arrow_name

__all__ = ["AppendLayout", "FileLayout", "Item", "StreamBook", "Target"]

#: Children of ``/measurements`` that are not streams.
ENTRY_NAMES = frozenset({"metadata", "start_time", "end_time"})
#: Attributes of a stream group the writer sets itself (never taken from schema metadata).
_GROUP_ATTRS = frozenset(
    {"NX_class", "signal", "axes", "arrow_name", "arrow_name_utf8", "arrow_schema_json", "rust_daq_time_key"}
)
#: Datasets of a stream group that are not columns.
GROUP_NAMES = frozenset({"arrow_schema"})
#: rust_daq_key of the time axis dataset: seconds since the file's start_time, from the
#: stream's first timestamp column (not a JSON list, so no column's key).
AXIS_KEY = "axis"
AXIS_SIGNATURE = "axis<f8()"


@dataclass
class Item:
    """One decoded record of a stream, ready to be written."""

    pieces: list[Piece]
    rows: int
    record: Any  # _native.Record
    info: StreamInfo


@dataclass
class Target:
    """One dataset of a stream group (append layout)."""

    name: str
    first_row: int
    mask: str | None
    chunk_rows: int = 1
    chunk_bytes: int = 1 << 20


def _chunk_of(ds: h5py.Dataset) -> tuple[int, int]:
    """Rows per chunk and bytes per chunk of a dataset (variable-length: its 16-byte handles)."""
    chunks = ds.chunks or ds.shape or (1,)
    item = 16 if ds.dtype.kind == "O" else ds.dtype.itemsize
    return max(chunks[0], 1), item * int(np.prod(chunks, dtype=np.int64))


def _new_chunks(rows: int, n: int, per: int) -> int:
    """Chunks of `per` rows that rows [rows, rows + n) touch beyond those of [0, rows)."""
    return -(-(rows + n) // per) - -(-rows // per)


class StreamBook:
    """What the writer knows of one stream, persisted in ``rust_daq/streams/<group>``. Its
    losses are a :class:`~rust_daq._records.StreamLoss` (``loss``), the one account every
    reader keeps; ``next_seq`` -1 in the file is its None (nothing of the stream seen yet)."""

    def __init__(
        self,
        name: str,
        group: str,
        rows: int = 0,
        records: int = 0,
        lost: int = 0,
        next_seq: int = 0,
        unwritable: int = 0,
    ) -> None:
        self.name = name  # the Arrow stream name
        self.group = group  # its HDF5 name
        self.rows = rows
        self.records = records
        self.loss = StreamLoss(None if next_seq < 0 else next_seq, lost)
        self.unwritable = unwritable
        self.targets: dict[tuple[str, str], Target] = {}
        #: Extendable datasets of the group that are no target (from an older writer).
        self.untracked: list[str] = []
        #: The key of the timestamp column the stream's time axis is made from, if any.
        self.time_key: str | None = None
        #: The stream's group and datasets, opened in the file handle they belong to (an
        #: h5py lookup costs ~65 µs: a flush of one row would spend most of its time there).
        self.open: tuple[h5py.File, h5py.Group, dict[str, Appender]] | None = None

    def group_in(self, f: h5py.File) -> h5py.Group | None:
        """The stream's group in `f` (None: not made yet)."""
        if self.open is not None and self.open[0] is f:
            return self.open[1]
        m = f["measurements"]
        if self.group not in m:
            return None
        g = m[self.group]
        self.open = (f, g, {})
        return g

    def dataset(self, f: h5py.File, name: str) -> h5py.Dataset:
        """One dataset of the stream's group in `f` (which exists)."""
        return self.appender(f, name).ds

    def appender(self, f: h5py.File, name: str) -> Appender:
        """One dataset of the stream's group in `f` (which exists), to append to."""
        g = self.group_in(f)
        assert g is not None and self.open is not None
        a = self.open[2].get(name)
        if a is None:
            a = self.open[2][name] = Appender(g[name])
        return a

    @property
    def lost(self) -> int:
        return self.loss.records

    @property
    def next_seq(self) -> int:
        return -1 if self.loss.next_seq is None else self.loss.next_seq

    def values(self) -> list[int]:
        return [self.rows, self.records, self.lost, self.next_seq, self.unwritable]


def piece_keys(items: Iterable[Piece]) -> list[str]:
    """Identity of each piece's column: its field path, and which of equal names it is."""
    return list(_keys(tuple(p.path for p in items)))


@functools.lru_cache(maxsize=1 << 16)
def _keys(paths: tuple[tuple[str, ...], ...]) -> tuple[str, ...]:
    # (once per schema: a logger of 1,000 streams asked for them 8,000 times a pass)
    seen: Counter[tuple[str, ...]] = Counter()
    keys = []
    for path in paths:
        keys.append(json.dumps([list(path), seen[path]]))
        seen[path] += 1
    return tuple(keys)


def _is_time(p: Piece) -> bool:
    return p.attrs.get("units") == "ns" and "epoch" in p.attrs and p.data.ndim == 1


def base_name(p: Piece) -> str:
    return ".".join(hdf5_name(part) for part in p.path)


#: Chunk size of a dataset made before any of its rows are seen (SWMR's precreated streams).
UNKNOWN_RATE_CHUNK = 16 << 10
#: Smallest and largest chunk of a dataset made from rows: HDF5 allocates a chunk whole at its
#: first write, so a slow stream (a process variable logged 10 rows a second) with 1 MiB
#: chunks made a 1,000-stream file of 3 GB for 0.64 MB of data; 16 passes' worth of rows,
#: within these bounds, keeps a slow stream's file small and a fast stream's chunks large.
MIN_CHUNK, MAX_CHUNK = 4 << 10, 1 << 20


def chunk_target(row_bytes: int, rows_hint: int | None) -> int:
    """Bytes per chunk for a column of `row_bytes` rows that gets about `rows_hint` rows a
    pass (None: not known yet)."""
    if not rows_hint or rows_hint <= 0:
        return UNKNOWN_RATE_CHUNK
    want = min(max(rows_hint * max(row_bytes, 1) * 16, MIN_CHUNK), MAX_CHUNK)
    return 1 << (int(want) - 1).bit_length()  # a power of two (MAX_CHUNK is one)


def _chunks(p: Piece, rows_hint: int | None = None) -> tuple[int, ...]:
    tail = tuple(max(d, 1) for d in p.data.shape[1:])  # (a chunk has no zero-size dimension)
    if len(tail) >= 2:  # frames: one per chunk (readers take whole frames)
        return (1, *tail)
    row_bytes = (64 if p.dtype.kind == "O" else p.dtype.itemsize) * int(np.prod(tail, dtype=np.int64))
    return (chunk_rows(row_bytes, chunk_target(row_bytes, rows_hint)), *tail)


def _create(
    g: h5py.Group,
    name: str,
    p: Piece,
    rows: int,
    filters: dict[str, Any],
    rows_hint: int | None = None,
    **attrs: Any,
) -> h5py.Dataset:
    tail = p.data.shape[1:]
    extra: dict[str, Any] = {}
    if p.dtype.kind == "f":
        extra["fillvalue"] = np.nan
    ds = g.create_dataset(
        name,
        shape=(rows, *tail),
        # A zero-size row dimension (fixed_size_list[0]) may not be smaller than its chunk's.
        maxshape=(None, *(d if d else None for d in tail)),
        dtype=p.dtype,
        chunks=_chunks(p, rows_hint),
        **extra,
        **filters,
    )
    set_attrs(ds, p, **attrs)
    return ds


def set_attrs(ds: h5py.Dataset, p: Piece, **attrs: Any) -> None:
    set_arrow_name(ds.attrs, p.path[0])
    ds.attrs["long_name"] = attr_text(".".join(p.path))
    if len(p.path) > 1:
        ds.attrs["arrow_path"] = json.dumps(list(p.path))
    for key, value in {**p.attrs, **attrs}.items():
        ds.attrs[key] = attr_text(value) if isinstance(value, str) else value


def create_mask(g: h5py.Group, of: str, rows: int) -> str:
    name = allocate(f"{of}__valid", set(g.keys()) | GROUP_NAMES)
    per = max((g[of].chunks or (chunk_rows(1),))[0], MIN_CHUNK)  # the rows of its column's chunks
    m = g.create_dataset(name, shape=(rows,), maxshape=(None,), dtype=np.uint8, chunks=(per,))
    m.attrs["validity_of"] = of
    m.attrs["long_name"] = f"1 where {of} holds a value, 0 where the row has none (null or absent)"
    g[of].attrs["validity"] = name
    return name


class Appender:
    """Appends to one extendable dataset through HDF5's low-level calls, keeping what h5py
    would fetch again for every call: the extent (``ds.id.shape`` makes a dataspace object
    each time), the dtype, a file dataspace whose extent is updated in place, and memory
    dataspaces by shape. A 10-row append of a slow stream's column cost 50 µs through
    ``grow`` and ``write_rows``, most of it in h5py's object bookkeeping; a logger of 1,000
    such streams spent most of its pass there."""

    __slots__ = ("ds", "id", "rows", "tail", "dtype", "_space", "_max")

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds, self.id = ds, ds.id
        shape = ds.id.shape
        self.rows, self.tail = int(shape[0]), tuple(shape[1:])
        self.dtype = ds.dtype
        self._space: Any = None
        self._max = tuple(h5py.h5s.UNLIMITED if m is None else m for m in (ds.maxshape or shape))

    def grow(self, rows: int) -> None:
        if rows != self.rows:
            self.id.set_extent((rows, *self.tail))
            self.rows = rows
            if self._space is not None:
                self._space.set_extent_simple((rows, *self.tail), self._max)

    def write(self, start: int, data: np.ndarray[Any, Any]) -> None:
        """``write_rows(ds, start, data)``, the fixed-size case without new objects."""
        kind = self.dtype.kind
        if (
            kind == "O"
            or kind == "V"
            or data.dtype != self.dtype
            or data.shape[1:] != self.tail
            or 0 in data.shape
        ):
            write_rows(self.ds, start, data)
            return
        if self._space is None:
            self._space = self.id.get_space()
        self._space.select_hyperslab((start,) + (0,) * (data.ndim - 1), data.shape)
        self.id.write(_memory_space(data.shape), self._space, np.ascontiguousarray(data))


_MEMORY_SPACES: dict[tuple[int, ...], Any] = {}


def _memory_space(shape: tuple[int, ...]) -> Any:
    """A simple dataspace of `shape` (selection: all of it), made once per shape. Never
    modified, so writes may share it."""
    space = _MEMORY_SPACES.get(shape)
    if space is None:
        if len(_MEMORY_SPACES) > 4096:
            _MEMORY_SPACES.clear()
        space = _MEMORY_SPACES[shape] = h5py.h5s.create_simple(shape)
    return space


def grow(ds: h5py.Dataset, rows: int) -> None:
    """``ds.resize(rows, axis=0)``, through the low-level call (a tenth of the cost)."""
    shape = ds.id.shape
    if shape[0] != rows:
        ds.id.set_extent((rows, *shape[1:]))


def write_rows(ds: h5py.Dataset, start: int, data: np.ndarray[Any, Any]) -> None:
    """``ds[start:start + len(data)] = data``, also for arrays of variable-length arrays, which
    h5py's slicing turns into a 2-D array (and refuses) when the arrays have equal lengths.
    Fixed-size data of the dataset's own type and row shape goes through the low-level write
    (h5py's slicing costs ~100 µs a call, most of a one-row flush)."""
    kind = ds.dtype.kind
    if (
        kind != "O"
        and kind != "V"
        and data.dtype == ds.dtype
        and data.shape[1:] == ds.id.shape[1:]
        and 0 not in data.shape
    ):
        file_space = ds.id.get_space()
        file_space.select_hyperslab((start,) + (0,) * (data.ndim - 1), data.shape)
        ds.id.write(h5py.h5s.create_simple(data.shape), file_space, np.ascontiguousarray(data))
        return
    vlen = h5py.check_vlen_dtype(ds.dtype) if kind == "O" else None
    if vlen is None or vlen in (str, bytes) or not len(data):
        ds[start : start + len(data)] = data
        return
    rows = np.empty(len(data), dtype=ds.dtype)
    for i, v in enumerate(data):  # an object array of the row arrays, whatever their lengths
        rows[i] = v
    file_space = ds.id.get_space()
    file_space.select_hyperslab((start,), (len(data),))
    ds.id.write(h5py.h5s.create_simple((len(data),)), file_space, rows, h5py.h5t.py_create(ds.dtype))


def _runs(
    parts: list[tuple[int, np.ndarray[Any, Any]]], target: int = 4 << 20, large: int = 256 << 10
) -> list[tuple[int, np.ndarray[Any, Any]]]:
    """Row-contiguous small arrays joined into runs of about `target` bytes (HDF5 writes a
    few large slices much faster than many small ones); arrays of `large` bytes or more
    (frames) are written as they are, never copied."""
    out: list[tuple[int, np.ndarray[Any, Any]]] = []
    run: list[np.ndarray[Any, Any]] = []
    start = end = size = 0

    def close() -> None:
        nonlocal run, size
        if run:
            out.append((start, run[0] if len(run) == 1 else np.concatenate(run)))
        run, size = [], 0

    for row, a in parts:
        if a.nbytes >= large or (run and row != end):
            close()
        if a.nbytes >= large:
            out.append((row, a))
            end = row + len(a)
            continue
        if not run:
            start = row
        run.append(a)
        end = row + len(a)
        size += a.nbytes
        if size >= target:
            close()
    close()
    return out


class FileLayout(Protocol):
    """What the writer asks of a layout; it knows nothing else of either."""

    #: Whether readers can follow the file with SWMR (no new objects at every flush).
    swmr: bool
    #: The progress marker's ``flushes``: flushes that wrote records (append), batch groups
    #: written (batches).
    flushes: int

    def ready(self, f: h5py.File) -> None:
        """The file is open (new or resumed): read what the layout needs of it."""

    def resume(self, f: h5py.File, books: MutableMapping[str, StreamBook], flushes: int) -> None:
        """Back to the last progress marker (`books` as it committed them, `flushes` its count):
        what came after it trimmed away."""

    def prepare(
        self, f: h5py.File, structural: Callable[[], h5py.File], book: StreamBook, info: StreamInfo
    ) -> None:
        """Objects for a stream known before its first record (made before SWMR starts)."""

    def new_chunk_bytes(self, book: StreamBook, item: Item, rows: int) -> int:
        """Bytes of the chunks `item` would open when appended at row `rows` of its stream
        (for the writer's free-space check: HDF5 allocates a chunk whole)."""

    def write(
        self, f: h5py.File, structural: Callable[[], h5py.File], book: StreamBook, items: list[Item]
    ) -> int:
        """Writes `items` (records of one stream, in order); returns the rows written.
        `structural()` gives the file ready for new objects (out of SWMR mode)."""

    def flushed(self, written: int) -> None:
        """A flush wrote `written` records (its marker is about to be written)."""


class AppendLayout:
    """``measurements/<stream>/<column>``: extendable datasets, NeXus NXdata groups."""

    swmr = True

    def __init__(self, filters: dict[str, Any]) -> None:
        self.filters = filters
        self.start_ns = 0  # the file's start_time, ns since the epoch (the time axis' zero)
        self.start_time = ""
        self.flushes = 0

    def ready(self, f: h5py.File) -> None:
        start = f["measurements/start_time"][()]
        start = start.decode() if isinstance(start, bytes) else str(start)
        self.start_time = start
        when = dt.datetime.fromisoformat(start.strip())
        self.start_ns = (int(when.timestamp()) * 1_000_000 + when.microsecond) * 1000

    def resume(self, f: h5py.File, books: MutableMapping[str, StreamBook], flushes: int) -> None:
        self.flushes = flushes
        for b in books.values():
            self._resume(f, b)
        # Groups a pass made before it was abandoned (no marker covers them): adopted empty,
        # so the stream keeps its name instead of getting a second group.
        for group, g in f["measurements"].items():
            if isinstance(g, h5py.Group) and "arrow_name" in g.attrs:
                name = arrow_name(g.attrs, group)
                if name not in books:
                    self._resume(f, books.setdefault(name, StreamBook(name, group, next_seq=-1)))

    def prepare(
        self, f: h5py.File, structural: Callable[[], h5py.File], book: StreamBook, info: StreamInfo
    ) -> None:
        """A stream's group and datasets, from its schema: SWMR forbids making them later
        without leaving it (which takes every reader's file away)."""
        self.write(f, structural, book, [Item(pieces_of(empty_batch(info.schema)), 0, None, info)])

    def flushed(self, written: int) -> None:
        if written:
            self.flushes += 1

    def _axis(self, p: Piece) -> Piece:
        """The time axis piece of an item's time column `p`: its timestamps as seconds since
        start_time."""
        seconds = (p.data.astype(np.int64, copy=False) - self.start_ns) / 1e9
        if p.valid is not None:
            seconds[~p.valid] = np.nan
        attrs = {
            "units": "s",
            "long_name": f"time since start_time (s), from {p.path[0]}",
            "start_time": self.start_time,
            "axis_of": attr_text(".".join(p.path)),
        }
        return Piece(("time",), seconds, None, AXIS_SIGNATURE, attrs)

    def _resume(self, f: h5py.File, book: StreamBook) -> None:
        """Targets from the file; every dataset trimmed back to the committed rows."""
        group = f["measurements"].get(book.group)
        if group is None:
            return
        key = group.attrs.get("rust_daq_time_key")
        book.time_key = None if key is None else str(key)
        for name, ds in group.items():
            if not isinstance(ds, h5py.Dataset) or not ds.maxshape or ds.maxshape[0] is not None:
                continue
            if ds.shape[0] != book.rows:
                ds.resize(book.rows, axis=0)
            key, sig = ds.attrs.get("rust_daq_key"), ds.attrs.get("rust_daq_signature")
            if (key is None or sig is None) and "validity_of" not in ds.attrs:
                book.untracked.append(name)
            if key is not None and sig is not None:
                mask = ds.attrs.get("validity")
                book.targets[(str(key), str(sig))] = Target(
                    name,
                    int(ds.attrs.get("first_row", 0)),
                    None if mask is None else str(mask),
                    *_chunk_of(ds),
                )

    def new_chunk_bytes(self, book: StreamBook, item: Item, rows: int) -> int:
        total = 0
        for key, p in zip(piece_keys(item.pieces), item.pieces, strict=True):
            t = book.targets.get((key, p.signature))
            if t is None:
                chunks = _chunks(p, rows_hint=1 << 40)  # (an upper bound: the largest chunk)
                item_bytes = 16 if p.dtype.kind == "O" else p.dtype.itemsize
                per, size = chunks[0], item_bytes * int(np.prod(chunks, dtype=np.int64))
                total += (_new_chunks(rows, item.rows, per) + 1) * size + (1 << 20)  # and a mask
            else:
                total += _new_chunks(rows, item.rows, t.chunk_rows) * t.chunk_bytes
                if t.mask is not None:
                    per = max(t.chunk_rows, MIN_CHUNK)
                    total += _new_chunks(rows, item.rows, per) * per
        return total

    def write(
        self, f: h5py.File, structural: Callable[[], h5py.File], book: StreamBook, items: list[Item]
    ) -> int:
        start = book.rows
        total = sum(it.rows for it in items)
        if book.time_key is None and book.group_in(f) is None:
            book.time_key = next(
                (k for k, p in zip(piece_keys(items[0].pieces), items[0].pieces, strict=True) if _is_time(p)),
                None,
            )
        writes: dict[tuple[str, str], list[tuple[int, Piece]]] = {}
        at = start
        time_key = book.time_key
        for it in items:
            time_piece = None
            for key, p in zip(piece_keys(it.pieces), it.pieces, strict=True):
                writes.setdefault((key, p.signature), []).append((at, p))
                if key == time_key and p.dtype.kind == "i" and p.data.ndim == 1:
                    time_piece = p
            if time_piece is not None:  # (after the columns: their datasets are named first)
                writes.setdefault((AXIS_KEY, AXIS_SIGNATURE), []).append((at, self._axis(time_piece)))
            at += it.rows
        # What needs new objects: the group, datasets of new (column, signature) pairs,
        # validity datasets for targets that now have rows without a value of their own.
        new = [ks for ks in writes if ks not in book.targets]

        def needs_mask(ks: tuple[str, str], t: Target | None) -> bool:
            if t is not None and t.mask is not None:
                return False
            parts = writes.get(ks, [])
            first = parts[0][0] if t is None and parts else (t.first_row if t else 0)
            covered = sum(len(p.data) for _, p in parts)
            return first > 0 or covered < total or any(p.valid is not None for _, p in parts)

        masks = [ks for ks in {*book.targets, *new} if needs_mask(ks, book.targets.get(ks))]
        if book.group_in(f) is None or new or masks:
            f = structural()
            m = f["measurements"]
            g = m[book.group] if book.group in m else self._create_group(f, book, items[0])
            names = set(g.keys()) | GROUP_NAMES  # (listed once: an h5py listing is slow)
            for ks in new:
                row, p = writes[ks][0]
                generation = 1 + sum(1 for k, _ in book.targets if k == ks[0])
                base = base_name(p)
                name = allocate(base if generation == 1 else f"{base}__{generation}", names)
                names.add(name)
                extra = {"first_row": row} if row else {}
                if generation > 1:
                    extra["generation"] = generation
                ds = _create(
                    g,
                    name,
                    p,
                    start,
                    self.filters,
                    rows_hint=total,  # (this pass's rows of the stream: its rate)
                    rust_daq_key=ks[0],
                    rust_daq_signature=ks[1],
                    **extra,
                )
                if ks[0] == AXIS_KEY:
                    del ds.attrs["arrow_name"]  # (no Arrow column: derived from one)
                book.targets[ks] = Target(name, row, None, *_chunk_of(ds))
            for ks in masks:
                t = book.targets[ks]
                t.mask = create_mask(g, t.name, start)
                if start > t.first_row:  # rows so far held a value wherever the target existed
                    g[t.mask][t.first_row : start] = 1
            self._attach_scales(g, book, new)
            if "signal" not in g.attrs:
                self._nexus(g, book, items[0])
        if total == 0:
            return 0
        end = start + total
        for t in book.targets.values():
            book.appender(f, t.name).grow(end)
            if t.mask is not None:
                book.appender(f, t.mask).grow(end)
        for ks, parts in writes.items():
            t = book.targets[ks]
            a = book.appender(f, t.name)
            if len(parts) == 1:
                a.write(parts[0][0], parts[0][1].data)
            else:
                for row, data in _runs([(row, p.data) for row, p in parts]):
                    a.write(row, data)
            if t.mask is not None:
                present = np.zeros(total, dtype=np.uint8)
                for row, p in parts:
                    present[row - start : row - start + len(p.data)] = 1 if p.valid is None else p.valid
                book.appender(f, t.mask).write(start, present)
        # Datasets of no target (an older writer's, without a signature) keep the rows aligned.
        for name in book.untracked:
            book.appender(f, name).grow(end)
        book.rows = end
        return total

    def _create_group(self, f: h5py.File, book: StreamBook, first: Item) -> h5py.Group:
        m = f["measurements"]
        g = m.create_group(book.group)
        g.attrs["NX_class"] = "NXdata"
        set_arrow_name(g.attrs, book.name)
        g.attrs["arrow_schema_json"] = schema_json(first.info.schema)
        # The stream's own metadata (a bluesky run's uid and scan id, say) as attributes too.
        for key, value in (first.info.schema.metadata or {}).items():
            k = attr_text(key.decode("utf-8", "replace"))
            if k and k not in g.attrs and k not in _GROUP_ATTRS:
                g.attrs[k] = attr_text(value.decode("utf-8", "replace"))
        g.create_dataset(
            "arrow_schema", data=np.frombuffer(first.info.schema.serialize().to_pybytes(), np.uint8)
        )
        if book.time_key is not None:
            g.attrs["rust_daq_time_key"] = book.time_key
        if "default" not in m.attrs:
            m.attrs["default"] = book.group
        return g

    def _attach_scales(self, g: h5py.Group, book: StreamBook, new: list[tuple[str, str]]) -> None:
        """The time axis as an HDF5 dimension scale of every column's first dimension, so that
        netCDF readers (xarray through h5netcdf) see one "time" dimension, not phony ones."""
        axis = book.targets.get((AXIS_KEY, AXIS_SIGNATURE))
        if axis is None:
            return
        scale = g[axis.name]
        fresh = (AXIS_KEY, AXIS_SIGNATURE) in new
        if fresh:
            scale.make_scale("time")
        for ks, t in book.targets.items():
            if ks[0] != AXIS_KEY and (fresh or ks in new):
                g[t.name].dims[0].attach_scale(scale)

    def _nexus(self, g: h5py.Group, book: StreamBook, first: Item) -> None:
        """The default plot: frames first, then measured values (floats), then counts;
        against the first timestamp column."""
        named = [
            (book.targets[(k, p.signature)].name, p)
            for k, p in zip(piece_keys(first.pieces), first.pieces, strict=True)
        ]
        times = [n for n, p in named if _is_time(p)]
        axis = book.targets.get((AXIS_KEY, AXIS_SIGNATURE))
        candidates = [(n, p) for n, p in named if n not in times and p.dtype.kind in "fiu"]
        candidates.sort(key=lambda c: (c[1].data.ndim == 1, c[1].dtype.kind != "f"))
        if candidates or named:
            signal, p = candidates[0] if candidates else named[0]
            g.attrs["signal"] = signal
            x = axis.name if axis is not None else (times[0] if times else ".")
            g.attrs["axes"] = [x] + ["."] * (p.data.ndim - 1)
