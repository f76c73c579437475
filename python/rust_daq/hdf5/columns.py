"""Arrow columns as HDF5 arrays: every type the ring carries, nulls included.

One Arrow column becomes one or more :class:`Piece` objects (a struct becomes one per leaf
field, ``<col>.<field>``). A piece is a numpy array of one row per Arrow row, a per-row
validity mask when some rows are null, and a *signature*: the HDF5 type and row shape. The
writer appends a piece to the dataset of the same column and signature, so a column whose
type changes mid-run gets a new dataset generation instead of a failed write.

The mapping, per Arrow type (docs/reliability.md has the same table):

===============================================  ==========================================
Arrow                                            HDF5 (null rows: fill value + validity)
===============================================  ==========================================
bool, int8..int64, uint8..uint64                 the same numpy type (fill False / 0)
float16, float32, float64                        the same (fill NaN)
timestamp[s|ms|us|ns, tz]                        int64 ns since the epoch, ``units="ns"``,
                                                 ``epoch``, ``timezone``; the source unit
                                                 where ns would overflow (fill 0)
date32 / date64                                  int32 days / int64 ms since 1970-01-01
time32 / time64                                  int64 ns since midnight
duration                                         int64 ns (the source unit on overflow)
string, large_string, string_view                variable-length UTF-8 (fill ""); a batch
                                                 with a NUL inside a value: UTF-8 bytes
binary, large_binary, binary_view                variable-length uint8 (fill empty)
fixed_size_binary[n]                             uint8 ``(N, n)``
decimal128 / decimal256                          variable-length UTF-8, the exact decimal
fixed_size_list<number>[k] (nested too)          ``(N, k, ...)`` of the number type
arrow.fixed_shape_tensor (of numbers or bool)    ``(N, *shape)`` (one frame per chunk)
list / large_list / list_view <number or bool>   variable-length arrays of the number type
struct                                           one piece per field, ``<col>.<field>``
null                                             float64 NaN, every row invalid
everything else (map, union, list of strings,    variable-length UTF-8, one JSON document
lists with null elements of integers, intervals) per row, ``encoding="json"``
dictionary                                       refused by ``write_arrow_batch``
===============================================  ==========================================

Field metadata: ``units`` (or ``unit``) becomes the ``units`` attribute of the column's
datasets; ``source``, ``precision``, ``limits`` and ``choices`` (what an ophyd-async DataKey
describes; :mod:`rust_daq.ophyd_async` puts them there) become attributes of the same name,
as text.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["Piece", "Plan", "pieces_of", "plan_of"]

_STR = h5py.string_dtype("utf-8")
_BYTES = h5py.vlen_dtype(np.dtype(np.uint8))


@dataclass
class Piece:
    """One HDF5 array made from (part of) one Arrow column."""

    #: Field names from the top-level column down to this leaf (a struct's fields).
    path: tuple[str, ...]
    data: np.ndarray[Any, Any]
    #: One bool per row, or None when every row holds a value.
    valid: np.ndarray[Any, Any] | None
    #: HDF5 type and row shape, e.g. "<f8()", "str()", "vlen<i4()": what a dataset must have
    #: for this piece to be appended to it.
    signature: str
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> np.dtype[Any]:
        dtype: np.dtype[Any] = self.data.dtype
        return dtype


#: Field metadata copied to the datasets' attributes as they are (see the module documentation).
_DESCRIPTIVE = ("source", "precision", "limits", "choices")


_DESCRIPTIVE_KEYS = tuple((k, k.encode()) for k in _DESCRIPTIVE)


def _descriptive(md: dict[bytes, bytes]) -> dict[str, str]:
    """`md`: a field's metadata (``f.metadata`` builds a new dict at every call: fetched once)."""
    return {k: md[b].decode("utf-8", "replace") for k, b in _DESCRIPTIVE_KEYS if b in md}


def _units(md: dict[bytes, bytes]) -> str | None:
    for key in (b"units", b"unit"):
        if key in md:
            return str(md[key].decode("utf-8", "replace"))
    return None


def _valid(col: pa.Array) -> np.ndarray[Any, Any] | None:
    if col.null_count == 0:
        return None
    return np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _fill_value(dtype: np.dtype[Any]) -> Any:
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return False
    return 0


def _numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))


def _to_numpy(col: pa.Array) -> np.ndarray[Any, Any]:
    """A numeric or boolean column as numpy, nulls as NaN / 0 / False (zero-copy when it can)."""
    t = col.type
    if col.null_count and not pa.types.is_floating(t):
        col = col.fill_null(pa.scalar(False if pa.types.is_boolean(t) else 0, t))
    return np.asarray(col.to_numpy(zero_copy_only=False))


def _fixed_shape(t: pa.DataType) -> tuple[list[int], pa.DataType] | None:
    """(shape, value type) of nested fixed-size lists of numbers, or None."""
    shape: list[int] = []
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return (shape, t) if shape and _numeric(t) else None


def _fixed_values(col: pa.Array) -> pa.Array:
    """The flat values of nested fixed-size lists, null rows' slots included (``flatten()``
    drops them, which is what made a nullable fixed-size list fail to reshape)."""
    while pa.types.is_fixed_size_list(col.type):
        k = col.type.list_size
        col = col.values.slice(col.offset * k, len(col) * k)
    return col


def _null_elements(values: pa.Array, valid: np.ndarray[Any, Any] | None) -> bool:
    """Whether any row that is not null itself holds a null element (`values`: the flat
    values of fixed-size rows, `valid`: the rows' validity)."""
    missing = ~np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    if valid is None or not missing.any():
        return bool(missing.any())
    return bool(missing.reshape(len(valid), -1)[valid].any())


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"base64": base64.b64encode(v).decode("ascii")}
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return str(v)


def _json(col: pa.Array) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any] | None]:
    values = col.to_pylist()
    docs = [
        "" if v is None else json.dumps(v, default=_json_default, ensure_ascii=False, allow_nan=True)
        for v in values
    ]
    # From the values: a union has no validity of its own, its children's nulls are its nulls.
    valid = np.array([v is not None for v in values], dtype=bool)
    return np.array(docs, dtype=_STR), None if valid.all() else valid


def _strings(col: pa.Array) -> tuple[np.ndarray[Any, Any], str]:
    values = ["" if v is None else v for v in col.to_pylist()]
    if any("\0" in v for v in values):  # HDF5 strings end at NUL: keep the bytes instead
        return _bytes_array([v.encode("utf-8") for v in values]), "utf8-bytes"
    return np.array(values, dtype=_STR), "str"


def _bytes_array(values: list[bytes]) -> np.ndarray[Any, Any]:
    out = np.empty(len(values), dtype=_BYTES)
    for i, v in enumerate(values):
        out[i] = np.frombuffer(v, dtype=np.uint8)
    return out


def _timelike(col: pa.Array, t: pa.DataType, attrs: dict[str, Any]) -> np.ndarray[Any, Any]:
    """Timestamps, durations and times as int64, in ns where that does not overflow."""
    if pa.types.is_timestamp(t):
        attrs.update(epoch="1970-01-01T00:00:00Z")
        if t.tz:
            attrs["timezone"] = t.tz
        target: pa.DataType = pa.timestamp("ns", tz=t.tz)
    elif pa.types.is_duration(t):
        target = pa.duration("ns")
    else:  # time32 / time64
        target = pa.time64("ns")
    unit = "ns"
    if t != target:  # (already in ns: nothing to convert, the common case)
        try:
            col = col.cast(target)  # safe cast: raises on overflow instead of wrapping
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            unit = t.unit
    attrs["units"] = unit
    if pa.types.is_time32(col.type):
        return _to_numpy(col.cast(pa.int32()).cast(pa.int64()))
    return _to_numpy(col.view(pa.int64()))  # (the same 64-bit values: a view, no cast)


def _leaf(f: pa.Field, col: pa.Array, path: tuple[str, ...]) -> list[Piece]:
    """The pieces of one column (recursing into structs)."""
    t = col.type
    attrs: dict[str, Any] = {"arrow_type": str(t)}
    md = f.metadata or {}
    units = _units(md)
    valid = _valid(col)
    sig_shape = "()"
    if isinstance(t, pa.BaseExtensionType):
        attrs["arrow_extension"] = t.extension_name
        storage = col.storage
        if (
            isinstance(col, pa.FixedShapeTensorArray)
            and col.null_count == 0
            and not pa.types.is_boolean(t.value_type)  # (to_numpy_ndarray refuses bool tensors)
        ):
            data = col.to_numpy_ndarray()
            kind = data.dtype.str
        elif isinstance(t, pa.FixedShapeTensorType) and _fixed_shape(t.storage_type) is not None:
            flat = _to_numpy(_fixed_values(storage))
            data = flat.reshape(len(col), *t.shape)
            if t.permutation is not None and list(t.permutation) != sorted(t.permutation):
                # Logical order, as to_numpy_ndarray() gives it (the storage is physical).
                phys = [t.shape[i] for i in t.permutation]
                data = flat.reshape(len(col), *phys).transpose(0, *(1 + np.argsort(t.permutation)))
            kind = data.dtype.str
        else:
            inner = _leaf(pa.field(f.name, storage.type, metadata=f.metadata), storage, path)
            for p in inner:
                p.attrs = {**p.attrs, **attrs, "arrow_storage_type": p.attrs.get("arrow_type")}
            return inner
    elif pa.types.is_struct(t):
        if t.num_fields == 0:
            data, valid = _json(col)
            kind = "json"
            attrs["encoding"] = "json"
        else:
            out: list[Piece] = []
            for i, child in enumerate(col.flatten()):  # flatten() applies the struct's nulls
                out += _leaf(t.field(i), child, (*path, t.field(i).name))
            return out
    elif pa.types.is_run_end_encoded(t):
        decoded = pc.run_end_decode(col)
        return [
            Piece(p.path, p.data, p.valid, p.signature, {**p.attrs, "arrow_type": str(t)})
            for p in _leaf(pa.field(f.name, decoded.type, metadata=f.metadata), decoded, path)
        ]
    elif pa.types.is_null(t):
        data = np.full(len(col), np.nan)
        valid = np.zeros(len(col), dtype=bool)
        kind = data.dtype.str
    elif _numeric(t):
        data = _to_numpy(col)
        kind = data.dtype.str
    elif pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_time(t):
        data = _timelike(col, t, attrs)
        units = attrs.pop("units")
        kind = data.dtype.str + "@" + units
    elif pa.types.is_date32(t):
        data = _to_numpy(col.cast(pa.int32()))
        units, kind = "days since 1970-01-01", "<i4@days"
    elif pa.types.is_date64(t):
        data = _to_numpy(col.cast(pa.int64()))
        units, kind = "ms since 1970-01-01", "<i8@ms"
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        data, kind = _strings(col)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        data = _bytes_array([b"" if v is None else v for v in col.to_pylist()])
        kind = "bytes"
    elif pa.types.is_fixed_size_binary(t):
        n = t.byte_width
        raw = col.buffers()[1]
        flat = np.frombuffer(raw, dtype=np.uint8, count=(col.offset + len(col)) * n) if raw else np.zeros(0)
        data = flat[col.offset * n :].reshape(len(col), n).copy()
        if valid is not None:
            data[~valid] = 0
        kind, sig_shape = "|u1", f"({n},)"
    elif pa.types.is_decimal(t):
        data = np.array(["" if v is None else str(v) for v in col.to_pylist()], dtype=_STR)
        kind = "decimal-str"
    elif (fixed := _fixed_shape(t)) is not None:
        shape, value_type = fixed
        values = _fixed_values(col)
        if values.null_count and not pa.types.is_floating(value_type) and _null_elements(values, valid):
            data, valid = _json(col)  # null elements of integers: JSON keeps them null
            kind = "json"
            attrs["encoding"] = "json"
        else:
            data = _to_numpy(values).reshape(len(col), *shape)
            kind = data.dtype.str
    elif (
        (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t))
        and _numeric(t.value_type)
        and not (col.flatten().null_count and not pa.types.is_floating(t.value_type))
    ):
        np_type = np.dtype(t.value_type.to_pandas_dtype())
        data = np.empty(len(col), dtype=h5py.vlen_dtype(np_type))
        for i, v in enumerate(col):
            vals = v.values if v.is_valid else None
            data[i] = np.zeros(0, np_type) if vals is None else _to_numpy(vals).astype(np_type, copy=False)
        kind = "vlen" + np_type.str
    else:
        data, valid = _json(col)
        kind = "json"
        attrs["encoding"] = "json"
    if data.ndim > 1:
        sig_shape = str(tuple(data.shape[1:]))
    if units is not None:
        attrs["units"] = units
    attrs.update(_descriptive(md))
    if valid is not None and valid.all():
        valid = None
    if valid is not None and data.dtype.kind in "fiub":
        # Null rows hold the fill value, whatever their slots held in Arrow.
        if not data.flags.writeable:
            data = data.copy()
        data[~valid] = _fill_value(data.dtype)
    return [Piece(path, np.ascontiguousarray(data), valid, f"{kind}{sig_shape}", attrs)]


@dataclass(frozen=True, slots=True)
class _Direct:
    """A column whose piece is its values as they are: what its schema alone decides."""

    path: tuple[str, ...]
    signature: str
    attrs: dict[str, Any]
    view64: bool  # a 64-bit time type: its values viewed as int64
    numpy_view: bool  # (timestamps, durations: numpy's datetime64/timedelta64, viewed there)


#: One entry per column of a schema: how its piece is made without the general path, or
#: None (a field that needs it: structs, strings, lists, other time units, extensions...).
Plan = list["_Direct | None"]


def plan_of(schema: pa.Schema) -> Plan:
    """What :func:`pieces_of` can decide once for every batch of `schema`: the path,
    signature and attributes of each column of numbers, booleans or nanosecond times (what
    slow-controls streams hold), found by the general path itself on an empty column."""
    plan: Plan = []
    for f in schema:
        t = f.type
        ns_time = (pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_time64(t)) and (
            t.unit == "ns"
        )
        if isinstance(t, pa.BaseExtensionType) or not (_numeric(t) or ns_time):
            plan.append(None)
            continue
        (p,) = _leaf(f, pa.array([], type=t), (f.name,))
        numpy_view = ns_time and not pa.types.is_time64(t)
        plan.append(_Direct(p.path, p.signature, p.attrs, ns_time, numpy_view))
    return plan


def pieces_of(batch: pa.RecordBatch, plan: Plan | None = None) -> list[Piece]:
    """Every column of `batch` as pieces, in schema order. Raises only on a batch whose data
    contradicts its own schema (the writer quarantines that record). `plan`: the
    :func:`plan_of` of the batch's own schema (the writer's, from the schema table entry
    the batch was decoded with), for the columns without nulls that need no more than their
    values (the same pieces, in less than half the time: 11.6 µs a batch of two columns
    without it, 4.7 with it)."""
    out: list[Piece] = []
    if plan is None or len(plan) != batch.num_columns:  # (a plan of another schema: not used)
        for i, f in enumerate(batch.schema):
            out += _leaf(f, batch.column(i), (f.name,))
        return out
    for i, (direct, col) in enumerate(zip(plan, batch.columns, strict=True)):
        if direct is None or col.null_count:
            f = batch.schema.field(i)
            out += _leaf(f, col, (f.name,))
            continue
        if direct.numpy_view:  # (no second Arrow array: numpy views its datetime64 as int64)
            data = col.to_numpy(zero_copy_only=False).view(np.int64)
        else:
            data = (col.view(pa.int64()) if direct.view64 else col).to_numpy(zero_copy_only=False)
        out.append(Piece(direct.path, np.ascontiguousarray(data), None, direct.signature, dict(direct.attrs)))
    return out


def fill_value(dtype: np.dtype[Any]) -> Any:
    """What rows without a value hold in a dataset of `dtype` (the validity mask says which)."""
    return _fill_value(dtype)
