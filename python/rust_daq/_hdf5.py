"""HDF5 side of the writer: file repair after a crash, Arrow-to-HDF5 conversion, the two
layouts, and the progress marker that makes restarts exactly-once.

Strings are stored as variable-length UTF-8 (``h5py.string_dtype()``), which MATLAB's
``h5read``/``h5readatt``, Igor and silx read; timestamps as int64 nanoseconds since the Unix
epoch with ``units="ns"``. Arrow nulls: NaN in float columns, 0/""/False elsewhere (each
column's ``null_count`` attribute says how many). Column types HDF5 cannot hold as plain
arrays (variable-length lists, structs, maps, decimals, binary) are skipped and named in the
group's ``skipped_columns`` attribute.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import pyarrow as pa

__all__ = ["Column", "clear_consistency_flags", "columns_of", "iso_now"]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 `hashlittle` (initval 0): HDF5's metadata checksum."""
    m = 0xFFFFFFFF
    a = b = c = (0xDEADBEEF + len(data)) & m
    i, n = 0, len(data)
    while n > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & m
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & m
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & m
        a = (a - c) & m ^ _rot(c, 4)
        c = (c + b) & m
        b = (b - a) & m ^ _rot(a, 6)
        a = (a + c) & m
        c = (c - b) & m ^ _rot(b, 8)
        b = (b + a) & m
        a = (a - c) & m ^ _rot(c, 16)
        c = (c + b) & m
        b = (b - a) & m ^ _rot(a, 19)
        a = (a + c) & m
        c = (c - b) & m ^ _rot(b, 4)
        b = (b + a) & m
        i, n = i + 12, n - 12
    if n == 0:
        return c
    tail = data[i:] + b"\0" * (12 - n)
    a = (a + int.from_bytes(tail[0:4], "little")) & m
    b = (b + int.from_bytes(tail[4:8], "little")) & m
    c = (c + int.from_bytes(tail[8:12], "little")) & m
    c = (c ^ b) - _rot(b, 14) & m
    a = (a ^ c) - _rot(c, 11) & m
    b = (b ^ a) - _rot(a, 25) & m
    c = (c ^ b) - _rot(b, 16) & m
    a = (a ^ c) - _rot(c, 4) & m
    b = (b ^ a) - _rot(a, 14) & m
    c = (c ^ b) - _rot(b, 24) & m
    return c


def clear_consistency_flags(path: str) -> bool:
    """Clears the "open for write / SWMR write" flags a killed writer leaves in the superblock
    (what ``h5clear -s`` does), so the file opens normally again. Returns True if it changed
    anything. Only version 2/3 superblocks carry these flags (files made with libver="latest")."""
    with open(path, "r+b") as f:
        head = f.read(48)
        if len(head) < 12 or head[:8] != _SIGNATURE or head[8] not in (2, 3):
            return False
        size_of_offsets = head[9]
        end = 12 + 4 * size_of_offsets
        f.seek(0)
        sb = bytearray(f.read(end + 4))
        if sb[11] == 0:
            return False
        (stored,) = struct.unpack_from("<I", sb, end)
        if stored != _lookup3(bytes(sb[:end])):
            return False  # not a superblock we understand: leave it to HDF5 to complain
        sb[11] = 0
        struct.pack_into("<I", sb, end, _lookup3(bytes(sb[:end])))
        f.seek(0)
        f.write(sb)
    return True


def iso_now() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="microseconds")


@dataclass
class Column:
    """One Arrow column converted for HDF5."""

    name: str
    data: np.ndarray[Any, Any]
    attrs: dict[str, Any] = field(default_factory=dict)


def _units(f: pa.Field) -> str | None:
    md = f.metadata or {}
    for key in (b"units", b"unit"):
        if key in md:
            return str(md[key].decode("utf-8", "replace"))
    return None


def _convert(f: pa.Field, col: pa.Array) -> Column | None:
    """The HDF5 form of one column, or None if HDF5 cannot hold it as an array."""
    t = f.type
    attrs: dict[str, Any] = {"long_name": f.name}
    units = _units(f)
    if col.null_count:
        attrs["null_count"] = col.null_count
    if isinstance(col, pa.FixedShapeTensorArray):
        data = col.to_numpy_ndarray()
    elif pa.types.is_timestamp(t):
        attrs.update(units="ns", epoch="1970-01-01T00:00:00Z")
        if t.tz:
            attrs["timezone"] = t.tz
        data = col.cast(pa.timestamp("ns", tz=t.tz)).cast(pa.int64()).fill_null(0).to_numpy()
        units = "ns"
    elif pa.types.is_duration(t):
        data = col.cast(pa.duration("ns")).cast(pa.int64()).fill_null(0).to_numpy()
        units = "ns"
    elif pa.types.is_date32(t):
        data = col.cast(pa.int32()).fill_null(0).to_numpy()
        units = "days since 1970-01-01"
    elif pa.types.is_floating(t):
        data = col.to_numpy(zero_copy_only=False)  # nulls become NaN
    elif pa.types.is_integer(t) or pa.types.is_boolean(t):
        data = col.fill_null(False if pa.types.is_boolean(t) else 0).to_numpy(zero_copy_only=False)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        data = np.array(col.fill_null("").to_pylist(), dtype=h5py.string_dtype("utf-8"))
    elif pa.types.is_fixed_size_list(t) and (
        pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)
    ):
        flat = col.flatten().fill_null(0).to_numpy(zero_copy_only=False)
        data = flat.reshape(len(col), t.list_size)
    else:
        return None
    if units is not None:
        attrs["units"] = units
    return Column(f.name, np.ascontiguousarray(data), attrs)


def columns_of(batches: Sequence[pa.RecordBatch]) -> tuple[list[Column], list[str]]:
    """The HDF5 columns of consecutive batches of one schema, and the names skipped."""
    if len(batches) == 1:  # no concatenation: numeric columns stay views of the batch
        schema, column = batches[0].schema, batches[0].column
    else:
        table = pa.Table.from_batches(batches)
        schema, column = table.schema, (lambda i: table.column(i).combine_chunks())
    out, skipped = [], []
    for i, f in enumerate(schema):
        converted = _convert(f, column(i))
        if converted is None:
            skipped.append(f.name)
        else:
            out.append(converted)
    return out, skipped


def schema_json(schema: pa.Schema) -> str:
    """The Arrow schema as readable JSON (names, types, metadata)."""

    def md(m: dict[bytes, bytes] | None) -> dict[str, str]:
        return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in (m or {}).items()}

    return json.dumps(
        {
            "fields": [
                {"name": f.name, "type": str(f.type), "nullable": f.nullable, "metadata": md(f.metadata)}
                for f in schema
            ],
            "metadata": md(schema.metadata),
        }
    )


def chunk_rows(row_bytes: int, target: int = 1 << 20) -> int:
    """Rows per chunk: about `target` bytes, at least one row (one frame per chunk)."""
    return max(1, target // max(row_bytes, 1))
