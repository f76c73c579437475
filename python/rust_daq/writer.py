"""The background HDF5 writer: drains a ring into an HDF5 file that h5py, MATLAB, Igor, silx
and HDFView open, while the acquisition loop never waits for it.

Run it in its own process (the default deployment: h5py holds the GIL between calls and a
writer thread beside a hardware loop shows up as jitter)::

    python -m rust_daq.writer --ring RING --output run.h5 [--layout append|batches]
    python -m rust_daq.writer --repair run.h5     # after a crash, for plain h5py opens

or in-process, from async code (asyncio or trio, through anyio)::

    async with HDF5Writer("run.h5", ring) as writer:
        await writer.run()          # until cancelled, or `await writer.stop()`

Durability: after every flush the writer records, in the file, the last ring sequence number
and the rows of every stream it holds, flushes again, and only then commits the ring's
``read_tail``. A writer killed at any moment and started again on the same ring and file trims
what came after its last marker and skips what the file already holds: every record ends up
in the file exactly once, as long as the ring did not overwrite it meanwhile (then it is
counted as lost, in the file and the log).

Layouts:

- ``"append"`` (default): ``measurements/<stream>/<column>``, one chunked dataset per column,
  extended at each flush; NeXus attributes so silx/NeXpy plot the default stream with no code;
  SWMR, so ``h5py.File(path, "r", libver="latest", swmr=True)`` and ``refresh()`` follow a
  running acquisition. SWMR forbids creating objects, so when a new stream appears mid-run
  the writer leaves SWMR mode, creates its group, and re-enters it (readers re-open the file to
  see the new stream; no data is lost, it is still in the ring).
- ``"batches"``: the original system's layout, ``measurements/batch_000001/<column>``, one
  group per stream per flush with the stream name, sequence range, ring positions, flush time
  and the Arrow schema (JSON) as attributes. No SWMR (new groups every flush).

Errors are raised before anything is consumed: the ring's ``read_tail`` never moves past data
that did not reach the file, so a failed flush (disk full, say) loses nothing the ring still
holds; the next flush retries from the same place.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import h5py
import numpy as np
import pyarrow as pa

from ._arrow import DECODE_ERRORS, ArrowState, StreamInfo, decode
from ._errors import RustDaqError
from ._hdf5 import Column, chunk_rows, clear_consistency_flags, columns_of, iso_now, schema_json
from ._native import __version__
from ._ring import RingBuffer

__all__ = ["HDF5Writer", "IncompatibleFileError", "main", "repair", "start_process", "stop_process"]

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


class IncompatibleFileError(RustDaqError, ValueError):
    """The output file exists but cannot be continued: another layout, another ring session,
    or not written by rust-daq."""


def _compression(spec: str | None) -> dict[str, Any]:
    if spec is None or spec == "none":
        return {}
    if spec in ("gzip", "lzf"):
        return {"compression": spec, **({"compression_opts": 4} if spec == "gzip" else {})}
    name, _, level = spec.partition(":")
    if name == "gzip" and level.isdigit():
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


def _runs(
    arrays: list[np.ndarray[Any, Any]], target: int = 4 << 20, large: int = 256 << 10
) -> list[np.ndarray[Any, Any]]:
    """Consecutive small arrays joined into runs of about `target` bytes (HDF5 writes a few
    large slices much faster than many small ones); arrays of `large` bytes or more (frames)
    are written as they are, never copied."""
    out: list[np.ndarray[Any, Any]] = []
    run: list[np.ndarray[Any, Any]] = []
    size = 0
    for a in arrays:
        if a.nbytes >= large:
            if run:
                out.append(run[0] if len(run) == 1 else np.concatenate(run))
                run, size = [], 0
            out.append(a)
            continue
        run.append(a)
        size += a.nbytes
        if size >= target:
            out.append(np.concatenate(run) if len(run) > 1 else run[0])
            run, size = [], 0
    if run:
        out.append(run[0] if len(run) == 1 else np.concatenate(run))
    return out


def repair(path: str | os.PathLike[str]) -> bool:
    """Lets plain ``h5py.File(path)`` open a file whose writer was killed: clears the "open for
    (SWMR) write" flags HDF5 leaves in the superblock, like ``h5clear -s``. A writer restarted
    on the file does this itself, and SWMR readers (``swmr=True``) need no repair. Returns True
    if the file needed it."""
    return clear_consistency_flags(os.fspath(path))


class _TornRead(Exception):
    """Records were overwritten in the ring while the writer copied them into the file."""


def _io_error(path: str, e: BaseException) -> OSError:
    """An OSError with the errno HDF5 reports (e.g. 28 no space, 27 file too large)."""
    match = re.search(r"errno = (\d+)", str(e))
    code = int(match.group(1)) if match else getattr(e, "errno", None) or errno.EIO
    return OSError(
        code,
        f"writing {path} failed ({os.strerror(code)}); nothing past the last flush was committed "
        "to the ring, which still holds it: the next flush retries",
        path,
    )


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
        self._swmr_wanted = swmr and layout == "append"
        self._metadata = dict(metadata or {})
        self._only = set(streams) if streams is not None else None
        self._ring = ring_buffer if isinstance(ring_buffer, RingBuffer) else RingBuffer.open(ring_buffer)
        self._owns_ring = not isinstance(ring_buffer, RingBuffer)
        self._state = ArrowState(self._ring)
        self._lock = threading.Lock()  # one flush at a time (run() and flush_to_disk())
        self._closed = False
        self.batch_count = 0
        self.records_written = 0
        self.records_lost = 0
        self.records_skipped = 0  # not Arrow, undecodable, or a stream not selected
        self._rows: dict[str, int] = {}
        # Per stream: records written, records lost (stream_seq gaps), next expected stream_seq.
        self._stream_stats: dict[str, list[int]] = {}
        self._file: h5py.File = self._open()
        self._file_ok = True  # False after an I/O error: reopened on the next flush
        self._reader = self._ring.reader("tail")
        self._lost_base = 0

    # -- the file -----------------------------------------------------------------------------

    def _open(self) -> h5py.File:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(2, f"output directory {directory} does not exist", self.path)
        if not os.access(directory, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            raise PermissionError(13, f"output directory {directory} is not writable", self.path)
        session = str(self._ring.session_id)
        if os.path.exists(self.path):
            if clear_consistency_flags(self.path):
                log.warning("%s: cleared the consistency flags a killed writer left behind", self.path)
            try:
                f = self._open_existing()
            except BlockingIOError as e:
                raise BlockingIOError(
                    e.errno, f"{self.path} is open for writing by another process", self.path
                ) from e
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
            self._resume(f)
            return f
        try:
            f = h5py.File(self.path, "w-", libver=_LIBVER, rdcc_nbytes=_CHUNK_CACHE, rdcc_w0=1.0)
        except BlockingIOError as e:
            raise BlockingIOError(e.errno, f"{self.path} is open by another process", self.path) from e
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
        now = iso_now()
        m.create_dataset("start_time", data=now, dtype=h5py.string_dtype())
        m.create_dataset("end_time", data=now.ljust(40), dtype="S40")
        meta = m.create_group("metadata")
        meta.attrs["NX_class"] = "NXcollection"
        meta.create_dataset("json", data=json.dumps(self._metadata, default=str), dtype=h5py.string_dtype())
        for key, value in self._metadata.items():
            if isinstance(value, bool | int | float | str):
                meta.create_dataset(str(key), data=value)
        book = f.create_group("rust_daq")
        book.attrs["NX_class"] = "NXcollection"
        book.create_dataset("progress", data=np.array([-1, 0, 0, 0], dtype=np.int64))
        book.create_group("streams")
        f.flush()
        return f

    def _open_existing(self) -> h5py.File:
        try:
            return h5py.File(self.path, "a", libver=_LIBVER)
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
            os.truncate(self.path, int(m.group(2)))
            return h5py.File(self.path, "a", libver=_LIBVER)

    def _resume(self, f: h5py.File) -> None:
        """Back to the state of the last completed flush: trim what came after it."""
        last_seq, written, lost, flushes = (int(v) for v in f[_PROGRESS][()])
        self.records_written, self.records_lost, self.batch_count = written, lost, flushes
        if self.layout == "append":
            for name, book in f["rust_daq/streams"].items():
                committed, records, lost, next_seq = (int(v) for v in book[()])
                self._rows[name] = committed
                self._stream_stats[name] = [records, lost, next_seq]
                group = f["measurements"].get(name)
                if group is None:
                    continue
                for ds in group.values():
                    if (
                        isinstance(ds, h5py.Dataset)
                        and ds.maxshape
                        and ds.maxshape[0] is None
                        and ds.shape[0] != committed
                    ):
                        ds.resize(committed, axis=0)
        else:
            for key in list(f["measurements"]):
                if key.startswith("batch_") and int(key[6:]) > flushes:
                    del f["measurements"][key]
        f.flush()

    def _stream_group(
        self, name: str, columns: list[Column], skipped: list[str], info: StreamInfo
    ) -> h5py.Group:
        f = self._file
        if self._file.swmr_mode:
            self._reopen_without_swmr()
            f = self._file
        m = f["measurements"]
        g = m.create_group(name)
        g.attrs["NX_class"] = "NXdata"
        for col in columns:
            self._create_column(g, col, rows=0)
        times = [c.name for c in columns if c.attrs.get("units") == "ns" and "epoch" in c.attrs]
        # The default plot: frames first, then measured values (floats), then counts.
        candidates = [c for c in columns if c.name not in times and c.data.dtype.kind in "fiu"]
        candidates.sort(key=lambda c: (c.data.ndim == 1, c.data.dtype.kind != "f"))
        signal_col = candidates[0].name if candidates else (columns[0].name if columns else None)
        if signal_col is not None:
            g.attrs["signal"] = signal_col
            ndim = next(c.data.ndim for c in columns if c.name == signal_col)
            g.attrs["axes"] = [times[0] if times else "."] + ["."] * (ndim - 1)
        g.attrs["arrow_schema_json"] = schema_json(info.schema)
        g.create_dataset("arrow_schema", data=np.frombuffer(info.schema.serialize().to_pybytes(), np.uint8))
        g.attrs["skipped_columns"] = skipped
        if "default" not in m.attrs:
            m.attrs["default"] = name
        f["rust_daq/streams"].create_dataset(name, data=np.zeros(4, dtype=np.int64))
        self._rows[name] = 0
        return g

    def _create_column(self, g: h5py.Group, col: Column, rows: int) -> h5py.Dataset:
        """An extendable dataset for `col`, `rows` long (fill values): chunks of ~1 MiB of rows,
        one frame per chunk for n-D columns."""
        tail = col.data.shape[1:]
        if tail:
            chunks = (1, *tail)
        else:
            chunks = (chunk_rows(64 if col.data.dtype.kind == "O" else col.data.dtype.itemsize),)
        ds = g.create_dataset(
            col.name,
            shape=(rows, *tail),
            maxshape=(None, *tail),
            dtype=col.data.dtype,
            chunks=chunks,
            **self._filters,
        )
        ds.attrs.update(col.attrs)
        return ds

    def _reopen_without_swmr(self) -> None:
        self._file.close()
        self._file = h5py.File(self.path, "a", libver=_LIBVER, rdcc_nbytes=_CHUNK_CACHE, rdcc_w0=1.0)

    def _enter_swmr(self) -> None:
        if self._swmr_wanted and not self._file.swmr_mode:
            self._file.swmr_mode = True

    # -- draining -------------------------------------------------------------------------------

    def flush_to_disk(self) -> int:
        """One synchronous pass: drain what the ring holds, write it, flush, record progress,
        commit the ring's read_tail. Returns the number of records written."""
        with self._lock:
            if self._closed:
                raise ValueError("flush_to_disk() on a closed HDF5Writer")
            if not self._file_ok:
                self._reattach()
            try:
                return self._flush()
            except _TornRead as e:
                # Retry with private copies (copy, then validate): a producer that keeps lapping
                # the writer costs it records, counted as lost, never another torn pass.
                log.warning("%s; retrying from the ring's tail with copies", e)
                self._abandon()
                self._reattach()
                return self._flush(copy=True)
            except (OSError, RuntimeError) as e:
                # h5py reports failed writes (disk full, EFBIG, EIO) as RuntimeError.
                self._abandon()
                raise _io_error(self.path, e) from e

    def _abandon(self) -> None:
        """After an I/O error (disk full...), HDF5's in-memory state cannot be trusted: drop the
        handle. Nothing was committed to the ring past the last good marker, so the next flush
        reopens the file, trims it to that marker and reads the ring again from its tail."""
        self._file_ok = False
        try:
            self._file.close()
        except Exception as e:  # the file is being abandoned either way
            log.debug("closing after an I/O error failed: %s", e)

    def _reattach(self) -> None:
        self._rows.clear()
        self._stream_stats.clear()
        self._file = self._open()
        self._file_ok = True
        self._reader = self._ring.reader("tail")
        self._lost_base = 0

    def _flush(self, copy: bool = False) -> int:
        written = 0
        pending: dict[str, list[tuple[pa.RecordBatch, Any]]] = {}
        order: list[str] = []
        committed_seq = last_seq = int(self._file[_PROGRESS][0])
        limit = 64  # records per read until their size is known
        while True:
            # Zero-copy: HDF5 reads the columns straight from the ring. Every record used is
            # validated after the write (_write_stream); a torn one aborts the flush.
            records = self._reader.read(max_records=limit, copy=copy)
            for rec in records:
                if rec.seq <= last_seq:
                    continue  # already in the file (a restart after its marker, before its commit)
                info = self._state.info(rec.schema_id) if rec.schema_id else None
                if info is None or (self._only is not None and info.name not in self._only):
                    self.records_skipped += 1
                    continue
                try:
                    batch = decode(rec, info)
                except DECODE_ERRORS:
                    self.records_skipped += 1
                    log.error("record %d of stream %r does not decode; skipped", rec.seq, info.name)
                    continue
                self._count(info.name, rec.stream_seq)
                if info.name not in pending:
                    pending[info.name] = []
                    order.append(info.name)
                pending[info.name].append((batch, rec))
            self._check_space(sum(len(r.data) for items in pending.values() for _, r in items))
            for name in order:
                written += self._write_stream(name, pending[name])
            torn = [r.seq for items in pending.values() for _, r in items if not r.valid()]
            if torn:
                # The producer lapped the writer while HDF5 copied these records: what reached
                # the file may be torn. Abandon this flush before its marker; the retry reads
                # the ring again from its tail (the lapped records are then counted as lost).
                raise _TornRead(f"records {torn[0]}..{torn[-1]} were overwritten while being written")
            if records:
                last_seq = max(last_seq, records[-1].seq)
            pending.clear()
            order.clear()
            if len(records) < limit:
                break
            average = sum(len(r.data) for r in records) / len(records)
            limit = int(min(max(_READ_BYTES // max(average, 1), 1), _READ_CHUNK))
        lost = self._reader.lost - self._lost_base
        if lost:
            log.warning("%d record(s) were overwritten in the ring before the writer read them", lost)
            self._lost_base = self._reader.lost
            self.records_lost += lost
        if written == 0 and not lost and last_seq == committed_seq:
            return 0
        # 1. the data, 2. the marker that says it is there, 3. the ring's read_tail.
        self._file.flush()
        if written and self.layout == "append":
            self.batch_count += 1
        self.records_written += written
        f = self._file  # (a new stream may have reopened it)
        f[_PROGRESS][...] = [last_seq, self.records_written, self.records_lost, self.batch_count]
        for name, rows in self._rows.items():
            n_records, n_lost, next_seq = self._stream_stats[name]
            f[f"rust_daq/streams/{name}"][...] = [rows, n_records, n_lost, next_seq]
        f["measurements/end_time"][()] = iso_now().ljust(40).encode()
        f.flush()
        self._enter_swmr()
        self._reader.commit()
        return written

    def _check_space(self, payload_bytes: int) -> None:
        """Refuses to start writing what would not fit (free space, RLIMIT_FSIZE): HDF5 cannot
        undo a half-done write, and one that fails midway leaves the file unopenable until
        repaired. Arrow payloads are an upper bound of what their columns take in HDF5, plus
        room for metadata and chunk rounding."""
        if payload_bytes == 0:
            return
        need = payload_bytes + (4 << 20)
        st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        free = st.f_bavail * st.f_frsize
        code = errno.ENOSPC
        try:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY and limit - os.path.getsize(self.path) < free:
                free, code = limit - os.path.getsize(self.path), errno.EFBIG
        except (ImportError, OSError):
            pass
        if need > free:
            raise OSError(code, f"{free} bytes left for {self.path}, a flush needs about {need}")

    def _count(self, name: str, stream_seq: int | None) -> None:
        """Per-stream accounting: a gap in the stream's sequence numbers is its records lost."""
        stats = self._stream_stats.get(name)
        if stats is None:
            # First record of this stream in this file. If the reader lost nothing so far, the
            # stream's earlier records went to another file: this one is the baseline. If it
            # did (the ring lapped the tail before this file got it), they count as lost.
            baseline = 0 if self._reader.lost > 0 else (stream_seq or 0)
            stats = self._stream_stats[name] = [0, 0, baseline]
        stats[0] += 1
        if stream_seq is not None:
            if stream_seq > stats[2]:
                stats[1] += stream_seq - stats[2]
                log.warning("stream %r: %d record(s) lost to ring overwrite", name, stream_seq - stats[2])
            stats[2] = stream_seq + 1

    def stream_stats(self) -> dict[str, dict[str, int]]:
        """Per stream: records written, records lost (overwritten in the ring before the writer
        read them) and rows in the file. The same figures are in the file, under
        ``rust_daq/streams/<stream>`` as ``[rows, records, lost, next_stream_seq]``."""
        return {
            name: {"records": s[0], "lost": s[1], "rows": self._rows.get(name, 0)}
            for name, s in self._stream_stats.items()
        }

    def _write_stream(self, name: str, items: list[tuple[pa.RecordBatch, Any]]) -> int:
        # Consecutive batches of one schema are written together.
        done = 0
        start = 0
        while start < len(items):
            schema = items[start][0].schema
            end = start
            while end < len(items) and items[end][0].schema.equals(schema):
                end += 1
            group = items[start:end]
            info = self._state.info(group[0][1].schema_id)
            assert info is not None
            if self.layout == "append":
                self._append(name, [columns_of([b]) for b, _ in group], info)
            else:
                columns, skipped = columns_of([b for b, _ in group])
                self._batch_group(name, columns, skipped, info, [r for _, r in group])
            done += len(group)
            start = end
        return done

    def _append(self, name: str, per_batch: list[tuple[list[Column], list[str]]], info: StreamInfo) -> None:
        """Appends batches of one schema: each dataset is resized once, then every batch's
        column is written into its slice (no concatenated copy of the batches)."""
        columns, skipped = per_batch[0]
        m = self._file["measurements"]
        g = m[name] if name in m else self._stream_group(name, columns, skipped, info)
        rows = self._rows[name]
        n = sum(len(cols[0].data) for cols, _ in per_batch if cols)
        for col in columns:
            if col.name not in g:
                if self._file.swmr_mode:
                    self._reopen_without_swmr()
                    g = self._file["measurements"][name]
                self._create_column(g, col, rows)
        for i, col in enumerate(columns):
            ds = g[col.name]
            ds.resize(rows + n, axis=0)
            at = rows
            for run in _runs([cols[i].data for cols, _ in per_batch]):
                ds[at : at + len(run)] = run
                at += len(run)
        # Columns this schema lacks (a schema change): extend them with their fill value.
        present = {c.name for c in columns}
        for key, ds in g.items():
            if (
                key not in present
                and isinstance(ds, h5py.Dataset)
                and ds.maxshape[0] is None
                and ds.shape[0] == rows
            ):
                ds.resize(rows + n, axis=0)
        self._rows[name] = rows + n

    def _batch_group(
        self, name: str, columns: list[Column], skipped: list[str], info: StreamInfo, records: list[Any]
    ) -> None:
        m = self._file["measurements"]
        index = self.batch_count + 1
        g = m.create_group(f"batch_{index:06d}")
        for col in columns:
            ds = g.create_dataset(col.name, data=col.data, **self._filters)
            ds.attrs.update(col.attrs)
        g.attrs.update(
            stream=name,
            seq_first=records[0].seq,
            seq_last=records[-1].seq,
            position_first=records[0].position,
            position_last=records[-1].position,
            records=len(records),
            rows=len(columns[0].data) if columns else 0,
            flush_time=iso_now(),
            arrow_schema_json=schema_json(info.schema),
            skipped_columns=skipped,
        )
        self.batch_count = index

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """A final drain and flush, then the file is closed (idempotent). If the final flush
        fails, what it could not write stays in the ring (its read_tail was not advanced)."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self._file_ok:
                    self._reattach()
                self._flush()
            finally:
                self._closed = True
                if self._file_ok:
                    self._file.close()
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


def start_process(
    ring: str,
    output: str,
    *,
    layout: str = "append",
    flush_interval: float = 1.0,
    compression: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> subprocess.Popen[str]:
    """Starts ``python -m rust_daq.writer`` on `ring` and waits until it is ready (its file is
    open). It runs in its own session: a Ctrl-C in the terminal reaches only its parent, which
    stops it (:func:`stop_process`) after the producer has written its last rows, so the final
    flush holds them. Raises RustDaqError with the writer's own message if it does not start."""
    cmd = [
        sys.executable,
        "-m",
        "rust_daq.writer",
        "--ring",
        ring,
        "--output",
        output,
        "--layout",
        layout,
        "--flush-interval",
        str(flush_interval),
        "--metadata",
        json.dumps(metadata or {}, default=str),
    ]
    if compression:
        cmd += ["--compression", compression]
    # --parent-pipe: the child watches its stdin, whose only write end is ours, so our death
    # (even by SIGKILL) reaches it as EOF and it writes, flushes and closes its file.
    cmd.append("--parent-pipe")
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        err = p.communicate(timeout=30)[1].strip()
        raise RustDaqError(
            f"the writer process did not start: {err.splitlines()[-1] if err else p.returncode}"
        )
    return p


def stop_process(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    """SIGTERM to a writer process from :func:`start_process`; waits for its final flush.
    Returns its exit code and what it wrote to stderr (its log)."""
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def _watch_parent(stop: threading.Event) -> None:
    """Blocks on standard input until EOF: the parent closed it (stop_process) or died. Either
    way the writer stops as on SIGTERM. (PR_SET_PDEATHSIG would fire when the parent's *thread*
    that started us ends, which in the daemon is any Flight worker thread.)"""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    if not stop.is_set():
        log.warning("standard input closed: the process that started this writer is gone; stopping")
        stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rust_daq.writer``: the writer as its own process. SIGINT/SIGTERM stop it
    cleanly (final flush, exit 0)."""
    ap = argparse.ArgumentParser(
        prog="python -m rust_daq.writer", description="Drain a rust-daq ring into HDF5."
    )
    ap.add_argument("--ring", help="ring path (a bare name lives in /dev/shm)")
    ap.add_argument("--output", help="HDF5 file to write (continued if it exists)")
    ap.add_argument(
        "--repair", metavar="FILE", help="clear the flags a killed writer left in FILE, then exit"
    )
    ap.add_argument("--layout", choices=["append", "batches"], default="append")
    ap.add_argument("--flush-interval", type=float, default=1.0, metavar="SECONDS")
    ap.add_argument("--compression", default=None, help="gzip, gzip:LEVEL, lzf, blosc, lz4, zstd, bitshuffle")
    ap.add_argument("--no-swmr", action="store_true", help="do not enable SWMR (append layout)")
    ap.add_argument("--stream", action="append", dest="streams", help="only this stream (repeatable)")
    ap.add_argument("--metadata", default=None, help="run metadata as a JSON object")
    ap.add_argument(
        "--parent-pipe",
        action="store_true",
        help="stop (final flush, exit 0) when standard input closes: the parent that started us died",
    )
    args = ap.parse_args(argv)
    if args.repair:
        print(f"{args.repair}: {'repaired' if repair(args.repair) else 'nothing to repair'}")
        return 0
    if not args.ring or not args.output:
        ap.error("--ring and --output are required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.parent_pipe:
        threading.Thread(target=_watch_parent, args=(stop,), name="parent-watch", daemon=True).start()
    try:
        metadata = json.loads(args.metadata) if args.metadata else None
        writer = HDF5Writer(
            args.output,
            args.ring,
            flush_interval=args.flush_interval,
            layout=args.layout,
            compression=args.compression,
            swmr=not args.no_swmr,
            metadata=metadata,
            streams=args.streams,
        )
    except (OSError, ValueError, RustDaqError) as e:
        print(f"rust_daq.writer: {e}", file=sys.stderr)
        return 2
    log.info("writing %s -> %s (layout %s)", args.ring, args.output, args.layout)
    print("ready", flush=True)
    with writer:
        while not stop.is_set():
            try:
                writer.flush_to_disk()
            except OSError as e:  # disk full, I/O error: nothing was committed; retry
                log.error("flush failed, will retry: %s", e)
            stop.wait(writer.flush_interval)
    log.info(
        "stopped: %d records in %d batches, %d lost",
        writer.records_written,
        writer.batch_count,
        writer.records_lost,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
