"""Reads a stream of the writer's append layout back by its Arrow names, the way a user
following docs/reliability.md would: groups and datasets found by their ``arrow_name`` /
``rust_daq_key`` attributes, column generations merged row by row through their validity
datasets. Independent of the writer's own code."""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np


def _name(attrs: h5py.AttributeManager) -> str | None:
    if "arrow_name_utf8" in attrs:
        return bytes(attrs["arrow_name_utf8"]).decode()
    value = attrs.get("arrow_name")
    return None if value is None else str(value)


def _index(f: h5py.File) -> dict[str, Any]:
    """Arrow name -> stream group and book, made once per open file."""
    cached = getattr(f, "_rdaq_index", None)
    if cached is None or cached["id"] != f.id.id:
        groups: dict[str, list[h5py.Group]] = {}
        for g in f["measurements"].values():
            if isinstance(g, h5py.Group) and (n := _name(g.attrs)) is not None:
                groups.setdefault(n, []).append(g)
        books: dict[str, list[h5py.Dataset]] = {}
        for ds in f["rust_daq/streams"].values():
            books.setdefault(_name(ds.attrs) or "", []).append(ds)
        cached = {"id": f.id.id, "groups": groups, "books": books}
        f._rdaq_index = cached  # type: ignore[attr-defined]
    return cached


def stream_group(f: h5py.File, name: str) -> h5py.Group:
    """The group of Arrow stream `name` (its HDF5 name may differ)."""
    matches = _index(f)["groups"].get(name, [])
    assert len(matches) == 1, f"stream {name!r}: {len(matches)} groups"
    return matches[0]


def book(f: h5py.File, name: str) -> list[int]:
    """rows, records, lost, next_stream_seq, unwritable of Arrow stream `name`."""
    matches = _index(f)["books"].get(name, [])
    assert len(matches) == 1, f"stream {name!r}: {len(matches)} books"
    return [int(v) for v in matches[0][()]]


def _value(ds: h5py.Dataset, v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def columns(g: h5py.Group) -> dict[tuple[tuple[str, ...], int], list[Any]]:
    """Per column key (field path, occurrence): one value per row of the group, None where the
    row holds no value (null, absent, or written before the column existed)."""
    rows = None
    by_key: dict[tuple[tuple[str, ...], int], list[h5py.Dataset]] = {}
    for ds in g.values():
        if not isinstance(ds, h5py.Dataset) or not str(ds.attrs.get("rust_daq_key", "")).startswith("["):
            continue  # (not a column: the schema, a validity dataset, the time axis)
        path, occ = json.loads(ds.attrs["rust_daq_key"])
        by_key.setdefault((tuple(path), occ), []).append(ds)
        rows = ds.shape[0] if rows is None else rows
        assert ds.shape[0] == rows, "every dataset of a stream has one row per row of the stream"
    out: dict[tuple[tuple[str, ...], int], list[Any]] = {}
    for key, datasets in by_key.items():
        values: list[Any] = [None] * (rows or 0)
        for ds in datasets:
            first = int(ds.attrs.get("first_row", 0))
            mask = g[ds.attrs["validity"]][:] if "validity" in ds.attrs else None
            encoding = ds.attrs.get("encoding")
            data = ds[:]
            for r in range(first, rows or 0):
                if mask is not None and not mask[r]:
                    continue
                assert values[r] is None, f"{key}: row {r} holds a value in two generations"
                v = _value(ds, data[r])
                values[r] = json.loads(v) if encoding == "json" else v
        out[key] = values
    return out
