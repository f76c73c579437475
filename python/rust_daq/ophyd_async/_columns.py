"""ophyd-async data keys as Arrow columns: the type mapping shared by the instruments.

A :class:`Column` is made from one ``describe()`` entry (a DataKey) and turns the values of
that key's Readings into one Arrow array, one row per reading, or raises
:class:`~rust_daq.SignalTypeError` saying why it cannot. The mapping:

=========================================  ====================================================
DataKey (dtype, dtype_numpy, shape)        Arrow column
=========================================  ====================================================
number / integer / boolean, shape []       the numpy dtype's type (``<f8`` float64, ``<i8``
                                           int64, ``|b1`` bool...; without dtype_numpy:
                                           float64, int64, bool)
string, shape [] (str, enums)              string (an enum's value)
array of numbers or bool, shape [n, ...]   ``arrow.fixed_shape_tensor(type, shape)``, one
                                           frame per row (DataKey ``dims`` as dim names)
array of strings, shape [n]                list<string> (any length)
array, structured (an ophyd-async Table)   struct of list<type> per table column, one table
                                           per row (the writer: ``<col>.<field>``)
=========================================  ====================================================

Refused (``SignalTypeError``): external data keys, a dimension of unknown length (None), an
empty dimension (Arrow has no zero-size tensor), complex, datetime and object dtypes,
structured dtypes nested deeper than a Table. At read time: a frame of another shape than
described, a value that does not convert without loss (a float into an integer column, an
int16 column given float32), a non-finite timestamp.

Field metadata: ``units``, ``source``, ``precision``, ``limits`` (JSON) and ``choices``
(JSON) from the DataKey, on a table's fields too; the writer turns them into dataset
attributes.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from ophyd_async.core import Table

from .._errors import SignalTypeError

__all__ = ["Column", "field_metadata", "needs_sample", "timestamps_ns"]

Kind = Literal["scalar", "string", "tensor", "strings", "table"]

_DEFAULT_SCALAR = {"number": np.dtype(np.float64), "integer": np.dtype(np.int64), "boolean": np.dtype(bool)}
_SCALAR_KINDS = {"number": "fiu", "integer": "iu", "boolean": "b"}


def field_metadata(dk: Mapping[str, Any]) -> dict[str, str]:
    """What of a DataKey goes into its column's field metadata."""
    md: dict[str, str] = {}
    for key in ("units", "source"):
        if dk.get(key) is not None:
            md[key] = str(dk[key])
    if dk.get("precision") is not None:
        md["precision"] = str(dk["precision"])
    for key in ("limits", "choices"):
        if dk.get(key) is not None:
            md[key] = json.dumps(dk[key], default=str, sort_keys=True)
    return md


def needs_sample(dk: Mapping[str, Any]) -> bool:
    """Whether the key's type can only be known from a value: ophyd-async describes a Table
    of one column as a void dtype (``|V8``) without its field."""
    dtn = dk.get("dtype_numpy")
    return isinstance(dtn, str) and dtn.lstrip("<>|=")[:1] == "V"


def timestamps_ns(what: str, seconds: Sequence[Any]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Reading timestamps (float seconds since the epoch) as int64 nanoseconds."""
    try:
        ts = np.asarray(seconds, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SignalTypeError(f"{what}: a reading's timestamp is not a number of seconds ({e})") from e
    if not np.isfinite(ts).all():
        bad = ts[~np.isfinite(ts)][0]
        raise SignalTypeError(f"{what}: a reading has timestamp {bad}, which is not a time")
    return np.round(ts * 1e9).astype(np.int64)


def _plain(v: Any) -> Any:
    """An enum member as its value (ophyd-async's StrictEnum is a str enum)."""
    return v.value if isinstance(v, enum.Enum) else v


def _text(what: str, v: Any) -> str | None:
    v = _plain(v)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bytes | np.bytes_):
        return bytes(v).decode("utf-8")
    if isinstance(v, np.str_):
        return str(v)
    raise SignalTypeError(
        f"{what}: a reading holds {v!r} ({type(v).__name__}) where describe() said a string"
    )


class Column:
    """One data key as one Arrow column (see the module documentation).

    `what` names the key in messages ("signal 'x'"); `sample` is a value of the key when
    :func:`needs_sample` says the DataKey alone does not tell its type.
    """

    def __init__(self, what: str, name: str, dk: Mapping[str, Any], sample: Any = None) -> None:
        self.what = what
        self.described = (
            f"dtype {dk.get('dtype')!r}, dtype_numpy {dk.get('dtype_numpy')!r}, shape {dk.get('shape')!r}"
        )
        self.np_dtype: np.dtype[Any] | None = None
        self.shape: tuple[int, ...] = ()
        #: A table's columns: (name, numpy dtype or None for strings).
        self.fields: list[tuple[str, np.dtype[Any] | None]] = []
        self.kind: Kind
        self._metadata = field_metadata(dk) or None
        arrow_type = self._resolve(dk, sample)
        self.field = pa.field(name, arrow_type, metadata=self._metadata)

    def _refuse(self, why: str) -> SignalTypeError:
        return SignalTypeError(f"{self.what} ({self.described}) has no Arrow column: {why}")

    def _numpy(self, spec: Any) -> np.dtype[Any]:
        try:
            dt: np.dtype[Any] = np.dtype(spec).newbyteorder("=")
            return dt
        except (TypeError, ValueError) as e:
            raise self._refuse(f"dtype_numpy {spec!r} is not a numpy dtype ({e})") from e

    def _number_type(self, dt: np.dtype[Any]) -> pa.DataType:
        if dt.kind not in "biuf":
            raise self._refuse(f"{dt} values (numpy kind {dt.kind!r}) are not numbers Arrow can hold")
        return pa.from_numpy_dtype(dt)

    def _resolve(self, dk: Mapping[str, Any], sample: Any) -> pa.DataType:
        if dk.get("external"):
            raise self._refuse(
                f"its data is external ({dk['external']!r}), not in read(); record the detector's "
                "own files, or read the signals it writes"
            )
        dtype = dk.get("dtype")
        shape = list(dk.get("shape") or [])
        dtn = dk.get("dtype_numpy")
        if any(not isinstance(d, int) or isinstance(d, bool) for d in shape):
            raise self._refuse("a dimension of unknown length; a column needs every frame's shape")
        if dtype == "string" and not shape:
            self.kind = "string"
            return pa.string()
        if dtype in _DEFAULT_SCALAR and not shape:
            dt = self._numpy(dtn) if isinstance(dtn, str) and dtn else _DEFAULT_SCALAR[dtype]
            if dt.kind not in _SCALAR_KINDS[dtype]:
                raise self._refuse(f"dtype {dtype!r} with numpy type {dt} contradicts itself")
            self.kind, self.np_dtype = "scalar", dt
            return self._number_type(dt)
        if dtype == "string" or dtype in _DEFAULT_SCALAR:
            raise self._refuse(f"a {dtype!r} of shape {shape}: only dtype 'array' has dimensions")
        if dtype != "array":
            raise self._refuse(
                f"dtype {dtype!r} is not one of event-model's (string, number, integer, boolean, array)"
            )
        if isinstance(dtn, list) or needs_sample(dk):
            return self._table(dtn, shape, sample)
        if not isinstance(dtn, str) or not dtn:
            raise self._refuse("an array without dtype_numpy: its element type is unknown")
        dt = self._numpy(dtn)
        if dt.kind in "SUO":
            if len(shape) != 1:
                raise self._refuse("strings in more than one dimension")
            self.kind = "strings"
            return pa.list_(pa.string())
        value_type = self._number_type(dt)
        self.np_dtype = dt
        if not shape:
            self.kind = "scalar"
            return value_type
        if 0 in shape:
            raise self._refuse(
                "an empty dimension: the frame shape is not known yet (Arrow has no zero-size "
                "tensor); give the signal its first value before connect()"
            )
        self.kind, self.shape = "tensor", tuple(shape)
        dims = dk.get("dims")
        names = [str(d) for d in dims] if isinstance(dims, list) and len(dims) == len(shape) else None
        return pa.fixed_shape_tensor(value_type, list(shape), dim_names=names)

    def _table(self, dtn: Any, shape: list[int], sample: Any) -> pa.DataType:
        if len(shape) != 1:
            raise self._refuse("a structured dtype of more than one dimension")
        if isinstance(dtn, list):
            items = list(dtn)
        elif isinstance(sample, Table):
            items = list(sample.numpy_dtype().descr)
        elif isinstance(sample, np.ndarray) and sample.dtype.names:
            items = list(sample.dtype.descr)
        else:
            raise self._refuse(
                "a structured (void) dtype whose fields describe() does not list, and no value to take them from"
            )
        fields = []
        for item in items:
            if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], str)):
                raise self._refuse(
                    f"table column {item!r}: only (name, dtype) columns of scalars are supported"
                )
            name, dt = str(item[0]), self._numpy(item[1])
            if dt.kind in "SU":
                self.fields.append((name, None))
                fields.append(pa.field(name, pa.list_(pa.string()), metadata=self._metadata))
            else:
                self.fields.append((name, dt))
                fields.append(pa.field(name, pa.list_(self._number_type(dt)), metadata=self._metadata))
        if not fields:
            raise self._refuse("a table without columns")
        self.kind = "table"
        return pa.struct(fields)

    # -- values to Arrow ---------------------------------------------------------------------

    def array(self, values: Sequence[Any]) -> pa.Array:
        """The values of `len(values)` readings as one Arrow array, one row each (None: a null
        row). Raises SignalTypeError for a value that does not fit the described column."""
        if self.kind == "tensor":
            return self._tensors(values)
        try:
            if self.kind == "string":
                return pa.array([_text(self.what, v) for v in values], pa.string())
            if self.kind == "strings":
                return pa.array([self._strings(v) for v in values], self.field.type)
            if self.kind == "table":
                return self._tables(values)
            return pa.array([self._scalar(v) for v in values], self.field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
            if isinstance(e, SignalTypeError):
                raise
            raise SignalTypeError(
                f"{self.what}: a reading does not fit its column {self.field.type} ({self.described}): {e}"
            ) from e

    def _scalar(self, v: Any) -> Any:
        v = _plain(v)
        if isinstance(v, np.ndarray):
            if v.shape != ():
                raise SignalTypeError(
                    f"{self.what}: a reading of shape {list(v.shape)} where describe() said a scalar ({self.described})"
                )
            v = v.item()
        elif isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and self.np_dtype is not None and self.np_dtype.kind in "iu":
            raise SignalTypeError(f"{self.what}: a reading holds {v!r} where describe() said {self.np_dtype}")
        return v

    def _strings(self, v: Any) -> list[str | None] | None:
        if v is None:
            return None
        if isinstance(v, str | bytes):
            raise SignalTypeError(
                f"{self.what}: a reading holds {v!r} where describe() said an array of strings"
            )
        return [_text(self.what, x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]

    def _conform(self, v: Any) -> np.ndarray[Any, Any]:
        """A frame as an array of the described shape and dtype, or SignalTypeError."""
        assert self.np_dtype is not None
        a = np.asarray(v)
        if a.shape != self.shape:
            raise SignalTypeError(
                f"{self.what}: a reading of shape {list(a.shape)} where describe() said {list(self.shape)} "
                f"({self.described}); a column holds frames of one shape (reconnect to describe the new one)"
            )
        if a.dtype != self.np_dtype:
            if not np.can_cast(a.dtype, self.np_dtype, "safe"):
                raise SignalTypeError(
                    f"{self.what}: a reading of dtype {a.dtype} where describe() said {self.np_dtype} "
                    f"({self.described}); {a.dtype} does not convert to {self.np_dtype} without loss"
                )
            a = a.astype(self.np_dtype)
        return a

    def _tensors(self, values: Sequence[Any]) -> pa.Array:
        assert self.np_dtype is not None
        out = np.zeros((len(values), *self.shape), dtype=self.np_dtype)
        valid = np.ones(len(values), dtype=bool)
        for i, v in enumerate(values):
            if v is None:
                valid[i] = False
            else:
                out[i] = self._conform(v)
        t = self.field.type
        size = math.prod(self.shape)
        mask = None if valid.all() else pa.array(~valid)
        storage = pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1), t.value_type), size, mask=mask)
        return pa.ExtensionArray.from_storage(t, storage)

    def _tables(self, values: Sequence[Any]) -> pa.Array:
        columns: list[list[Any]] = [[] for _ in self.fields]
        valid = []
        for v in values:
            valid.append(v is not None)
            cols = self._table_columns(v) if v is not None else {}
            for j, (name, dt) in enumerate(self.fields):
                if v is None:
                    columns[j].append(None)
                    continue
                if name not in cols:
                    raise SignalTypeError(
                        f"{self.what}: a reading's table has no column {name!r} ({self.described})"
                    )
                col = cols[name]
                if dt is None:
                    columns[j].append(self._strings(col))
                else:
                    columns[j].append(self._table_numbers(name, col, dt))
        t = self.field.type
        arrays = [pa.array(c, t.field(j).type) for j, c in enumerate(columns)]
        mask = None if all(valid) else pa.array([not x for x in valid])
        return pa.StructArray.from_arrays(arrays, fields=list(t), mask=mask)

    def _table_numbers(self, name: str, col: Any, dt: np.dtype[Any]) -> np.ndarray[Any, Any]:
        a = np.asarray(col)
        if a.ndim != 1:
            raise SignalTypeError(f"{self.what}: table column {name!r} of shape {list(a.shape)}, not 1-D")
        if a.dtype != dt and not np.can_cast(a.dtype, dt, "safe"):
            raise SignalTypeError(
                f"{self.what}: table column {name!r} of dtype {a.dtype} where describe() said {dt}"
            )
        return a.astype(dt, copy=False)

    def _table_columns(self, v: Any) -> Mapping[str, Any]:
        if isinstance(v, Mapping):
            return v
        if isinstance(v, np.ndarray) and v.dtype.names:
            return {n: v[n] for n in v.dtype.names}
        if isinstance(v, Table):
            return dict(iter(v))
        raise SignalTypeError(
            f"{self.what}: a reading of type {type(v).__name__} where describe() said a table ({self.described})"
        )
