"""The batches layout: the original system's ``measurements/batch_NNNNNN/<column>``, one
group per stream per flush, numbered from 000001, metadata as attributes (the stream name,
sequence range, ring positions, flush time, the Arrow schema as JSON). It implements
:class:`~rust_daq.hdf5.layouts.FileLayout`.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import h5py
import numpy as np

from .._arrow import StreamInfo
from .file import allocate, attr_text, iso_now, schema_json
from .layouts import Item, StreamBook, base_name, create_mask, piece_keys, set_attrs, write_rows

__all__ = ["BatchesLayout"]


class BatchesLayout:
    """``measurements/batch_NNNNNN/<column>``: the original system's layout, one group per
    stream per flush (per schema, if it changed within the flush). No SWMR (new groups every
    flush), no objects before a stream's first records."""

    swmr = False

    def __init__(self, filters: dict[str, Any]) -> None:
        self.filters = filters
        self.flushes = 0  # batch groups written: the last one's number

    def ready(self, f: h5py.File) -> None:
        pass

    def resume(self, f: h5py.File, books: MutableMapping[str, StreamBook], flushes: int) -> None:
        self.flushes = flushes
        for key in list(f["measurements"]):
            if key.startswith("batch_") and int(key[6:]) > flushes:
                del f["measurements"][key]

    def prepare(
        self, f: h5py.File, structural: Callable[[], h5py.File], book: StreamBook, info: StreamInfo
    ) -> None:
        pass

    def new_chunk_bytes(self, book: StreamBook, item: Item, rows: int) -> int:
        return 0  # (no chunks: a group's datasets are written whole)

    def flushed(self, written: int) -> None:
        pass

    def write(
        self, f: h5py.File, structural: Callable[[], h5py.File], book: StreamBook, items: list[Item]
    ) -> int:
        f = structural()
        start = 0
        while start < len(items):
            first = items[start]
            shape = [p.signature for p in first.pieces]
            end = start + 1
            while (
                end < len(items)
                and items[end].info.schema_id == first.info.schema_id
                and [p.signature for p in items[end].pieces] == shape
            ):
                end += 1
            self.flushes += 1
            self._group(f, self.flushes, book, items[start:end])
            start = end
        rows = sum(it.rows for it in items)
        book.rows += rows
        return rows

    def _group(self, f: h5py.File, index: int, book: StreamBook, items: list[Item]) -> None:
        g = f["measurements"].create_group(f"batch_{index:06d}")
        g.attrs["NX_class"] = "NXdata"
        rows = sum(it.rows for it in items)
        first = items[0]
        for col, key in enumerate(piece_keys(first.pieces)):
            parts = [it.pieces[col] for it in items]
            p = parts[0]
            data = p.data if len(parts) == 1 else np.concatenate([q.data for q in parts])
            if p.dtype.kind == "O":
                data = data.astype(p.dtype, copy=False)
            name = allocate(base_name(p), set(g.keys()))
            ds = g.create_dataset(name, shape=data.shape, dtype=p.dtype, **self.filters)
            write_rows(ds, 0, data)
            set_attrs(ds, p, rust_daq_key=key)
            if any(q.valid is not None for q in parts):
                present = np.concatenate(
                    [
                        np.ones(len(q.data), np.uint8) if q.valid is None else q.valid.astype(np.uint8)
                        for q in parts
                    ]
                )
                mask = create_mask(g, name, 0)
                g[mask].resize(rows, axis=0)
                g[mask][:] = present
        recs = [it.record for it in items]
        g.attrs.update(
            stream=attr_text(book.name),
            **({"stream_utf8": np.frombuffer(book.name.encode(), np.uint8)} if "\0" in book.name else {}),
            seq_first=recs[0].seq,
            seq_last=recs[-1].seq,
            position_first=recs[0].position,
            position_last=recs[-1].position,
            records=len(recs),
            rows=rows,
            flush_time=iso_now(),
            arrow_schema_json=schema_json(first.info.schema),
        )
