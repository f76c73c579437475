"""Data keys as Arrow columns: the Arrow type of each key of an event descriptor, and the
values of events converted to it, checked: a value that contradicts its key (another shape,
a type that does not convert without loss) raises :class:`~rust_daq.DocumentError` naming
the key and the event; a missing value is a null.

The type comes from ``dtype_numpy`` when the key has one, else from the JSON ``dtype``:

==============================  ==========================================================
data key                        Arrow column
==============================  ==========================================================
``dtype: "string"``             string, whatever ``dtype_numpy`` says (ophyd-async gives
                                ``|S40`` for a ``str`` of any length); bytes values are
                                decoded as UTF-8
bool (``|b1``, ``"boolean"``)   bool (integer values 0 and 1 are accepted)
integers (``<i4``, ``|u1``...)  the same type; ``"integer"``: int64
floats (``<f2``, ``<f4``...)    the same type; ``"number"``: float64
datetime64 / timedelta64        timestamp / duration of the same unit
structured (a list of pairs)    a struct, one child per field, each of the key's shape
                                (an ophyd-async ``Table``: one column per field)
``shape: [n, m, ...]``          numbers: ``arrow.fixed_shape_tensor`` (one frame per row);
                                bool and strings: nested ``fixed_size_list``
a shape with ``None``           nested ``list`` (variable length)
``"array"`` w/o ``dtype_numpy``  float64 elements
complex, float128, object,      DocumentError at the descriptor: Arrow has no such type,
datetime without a unit, void   and a column that silently changed it would lie
==============================  ==========================================================

Integers from floats must be whole and in range, floats into an integer key are refused
otherwise (pyarrow's own ``pa.array([1.5], pa.int64())`` truncates silently).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import DocumentError

__all__ = ["Column", "column_for"]


class _Invalid(Exception):
    """A value that does not fit its column; `row` is its index in the values converted."""

    def __init__(self, row: int, why: str) -> None:
        super().__init__(why)
        self.row = row
        self.why = why


def _describe(v: Any) -> str:
    text = repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(v).__name__} {text}"


class Column:
    """How one data key becomes an Arrow array: its ``type`` and :meth:`convert`."""

    type: pa.DataType
    #: What the key declares, for messages: "float64", "(3,) float64", ...
    what: str

    def convert(self, values: Sequence[Any]) -> pa.Array:
        """One Arrow array of ``len(values)`` rows; None is a null. Raises _Invalid."""
        raise NotImplementedError


# -- scalars ---------------------------------------------------------------------------------


def _first(bad: np.ndarray[Any, Any]) -> int:
    return int(np.flatnonzero(bad)[0])


def _integers(flat: np.ndarray[Any, Any], target: np.dtype[Any]) -> np.ndarray[Any, Any] | None:
    """The indices of elements that are not whole numbers in the range of `target` (None: all
    convert)."""
    info = np.iinfo(target)
    if flat.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            # (as floats: int64's max is not representable, 2**63 is the first value out)
            bad = ~np.isfinite(flat) | (flat != np.trunc(flat)) | (flat < float(info.min))
            bad |= flat >= float(info.max) + 1.0
    else:
        bad = (flat < info.min) | (flat > info.max)
    return bad if bad.any() else None


def coerce(arr: np.ndarray[Any, Any], target: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """`arr` as `target`, when that loses nothing but float precision; else _Invalid with the
    flat index of the first element that does not convert."""
    kind, want = arr.dtype.kind, target.kind
    if arr.dtype == target:
        return arr
    flat = arr.reshape(-1)
    if want == "f" and kind in "biuf":
        return arr.astype(target)
    if want in "iu" and kind == "b":
        return arr.astype(target)
    if want in "iu" and kind in "iuf":
        if kind != "f" and np.can_cast(arr.dtype, target):
            return arr.astype(target)
        bad = _integers(flat, target)
        if bad is None:
            return arr.astype(target)
        i = _first(bad)
        why = "not a whole number" if kind == "f" and flat[i] != np.trunc(flat[i]) else "out of range"
        raise _Invalid(i, f"{_describe(flat[i].item())} is {why} for {target}")
    if want == "b" and kind in "iu":
        bad = (flat != 0) & (flat != 1)
        if not bad.any():
            return arr.astype(bool)
        i = _first(bad)
        raise _Invalid(i, f"{_describe(flat[i].item())} is not a boolean")
    if want in "Mm" and kind == want:
        return arr.astype(target)
    return _refuse(flat, target)


#: The numpy kinds of values each kind of column takes (then checked element by element).
_TAKES = {"f": "biuf", "i": "biuf", "u": "biuf", "b": "biu", "M": "M", "m": "m"}


def _refuse(flat: np.ndarray[Any, Any], target: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """_Invalid for the first element of `flat` of a kind `target` does not take (numpy made
    ``[1, "a"]`` an array of strings: the message must name the "a", not the 1)."""
    takes = _TAKES.get(target.kind, "")
    for i, v in enumerate(flat.tolist()):
        if np.asarray(v).dtype.kind not in takes:
            raise _Invalid(i, f"{_describe(v)} is not {_kind_name(target)}")
    raise _Invalid(0, f"{flat.dtype} values are not {_kind_name(target)}")


def coerce_values(values: Sequence[Any], target: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """:func:`coerce` of ``np.asarray(values)``; when numpy made mixed values all strings, the
    message names the first value that is one, from the values themselves."""
    arr = np.asarray(values)
    try:
        return coerce(arr, target)
    except _Invalid:
        if arr.dtype.kind in "USO":
            _refuse(np.asarray(values, dtype=object).reshape(-1), target)
        raise


def _kind_name(t: np.dtype[Any]) -> str:
    return {
        "b": "a boolean",
        "i": f"an integer ({t})",
        "u": f"an unsigned integer ({t})",
        "f": f"a number ({t})",
        "M": f"a datetime64 ({t})",
        "m": f"a timedelta64 ({t})",
    }.get(t.kind, str(t))


class Number(Column):
    """Numbers, booleans, datetimes: one numpy dtype."""

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self.type = pa.from_numpy_dtype(dtype)
        self.what = str(self.type)

    def array(self, values: Sequence[Any]) -> np.ndarray[Any, Any]:
        """Present values (none is None) as a 1-D array of this dtype. Raises _Invalid."""
        if not values:
            return np.zeros(0, self.dtype)
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError):  # ragged: some value is an array
            arr = np.asarray(values, dtype=object)
        if arr.ndim != 1 or arr.dtype.kind == "O":
            for i, v in enumerate(values):
                shape = _shape_of(v)
                if shape != ():
                    got = "a ragged array" if shape is None else f"a value of shape {shape}"
                    raise _Invalid(i, f"holds {got}; the data key declares a scalar")
        return coerce_values(values, self.dtype)

    def convert(self, values: Sequence[Any]) -> pa.Array:
        present = [i for i, v in enumerate(values) if v is not None]
        if len(present) == len(values):
            return pa.array(self.array(values), type=self.type)
        try:
            got = self.array([values[i] for i in present])
        except _Invalid as e:
            raise _Invalid(present[e.row], e.why) from None
        out = np.zeros(len(values), self.dtype)
        out[present] = got
        mask = np.ones(len(values), dtype=bool)
        mask[present] = False
        return pa.array(out, type=self.type, mask=mask)


class String(Column):
    """Text: ``str`` (subclasses too: enum members), or UTF-8 bytes."""

    type = pa.string()
    what = "string"

    @staticmethod
    def text(v: Any) -> str:
        if isinstance(v, str):
            return str.__str__(v)  # (an enum member's own text, not "E.X")
        if isinstance(v, bytes):
            return v.decode("utf-8")
        raise TypeError(v)

    def strings(self, values: Sequence[Any]) -> list[str | None]:
        out: list[str | None] = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
                continue
            try:
                out.append(self.text(v))
            except TypeError:
                raise _Invalid(i, f"{_describe(v)} is not a string") from None
            except UnicodeDecodeError as e:
                raise _Invalid(i, f"{_describe(v)} is not UTF-8 text ({e.reason})") from None
        return out

    def convert(self, values: Sequence[Any]) -> pa.Array:
        return pa.array(self.strings(values), type=pa.string())


# -- arrays ----------------------------------------------------------------------------------


def _shape_of(v: Any) -> tuple[int, ...] | None:
    try:
        return tuple(np.shape(v))
    except ValueError:  # ragged nested lists
        return None


class Fixed(Column):
    """Arrays of one fixed shape: a tensor column of numbers, nested fixed-size lists of
    booleans or strings."""

    def __init__(self, element: Number | String, shape: tuple[int, ...]) -> None:
        self.element, self.shape = element, shape
        self.size = int(np.prod(shape))
        tensor = isinstance(element, Number) and element.dtype.kind in "iuf"
        if tensor:
            self.type = pa.fixed_shape_tensor(element.type, list(shape))
        else:
            t = element.type
            for n in reversed(shape):
                t = pa.list_(t, n)
            self.type = t
        self.tensor = tensor
        self.what = f"{shape} {element.what}"

    def _rows(self, values: Sequence[Any], present: list[int]) -> list[Any]:
        out = []
        for i in present:
            v = values[i]
            shape = _shape_of(v)
            if shape != self.shape:
                got = "a ragged array" if shape is None else f"a value of shape {shape}"
                raise _Invalid(i, f"holds {got}; the data key declares shape {list(self.shape)}")
            out.append(v)
        return out

    def convert(self, values: Sequence[Any]) -> pa.Array:
        n = len(values)
        present = [i for i, v in enumerate(values) if v is not None]
        rows = self._rows(values, present)
        mask = None
        if len(present) < n:
            m = np.ones(n, dtype=bool)
            m[present] = False
            mask = pa.array(m)
        if isinstance(self.element, Number):
            try:
                got = coerce_values(rows, self.element.dtype) if rows else None
            except _Invalid as e:
                raise _Invalid(present[e.row // self.size], e.why) from None
            full = np.zeros((n, *self.shape), self.element.dtype)
            if got is not None:
                full[present] = got
            flat: pa.Array = pa.array(full.reshape(-1), type=self.element.type)
        else:
            texts: list[str | None] = [""] * (n * self.size)
            for j, i in enumerate(present):
                items = np.asarray(rows[j], dtype=object).reshape(-1).tolist()
                try:
                    texts[i * self.size : (i + 1) * self.size] = self.element.strings(items)
                except _Invalid as e:
                    raise _Invalid(i, f"element {e.row}: {e.why}") from None
            flat = pa.array(texts, type=pa.string())
        if self.tensor:
            storage = pa.FixedSizeListArray.from_arrays(flat, self.size, mask=mask)
            return pa.ExtensionArray.from_storage(self.type, storage)
        out = flat
        for k in reversed(self.shape[1:]):
            out = pa.FixedSizeListArray.from_arrays(out, k)
        return pa.FixedSizeListArray.from_arrays(out, self.shape[0], mask=mask)


class Ragged(Column):
    """Arrays with a dimension of unknown length (``None`` in the shape): nested lists."""

    def __init__(self, element: Number | String, shape: tuple[int | None, ...]) -> None:
        self.element, self.shape = element, shape
        t = element.type
        for n in reversed(shape):
            t = pa.list_(t) if n is None else pa.list_(t, n)
        self.type = t
        self.what = f"{list(shape)} {element.what}"

    def _row(self, v: Any) -> Any:
        shape = _shape_of(v)
        if shape is None or len(shape) != len(self.shape):
            got = "a ragged array" if shape is None else f"a value of shape {shape}"
            raise ValueError(f"holds {got}; the data key declares shape {list(self.shape)}")
        if any(want is not None and want != got for want, got in zip(self.shape, shape, strict=True)):
            raise ValueError(
                f"holds a value of shape {shape}; the data key declares shape {list(self.shape)}"
            )
        if isinstance(self.element, Number):
            return coerce_values(v, self.element.dtype).tolist()
        items = np.asarray(v, dtype=object)
        return (
            np.asarray(self.element.strings(items.reshape(-1).tolist()), dtype=object).reshape(shape).tolist()
        )

    def convert(self, values: Sequence[Any]) -> pa.Array:
        rows = []
        for i, v in enumerate(values):
            try:
                rows.append(None if v is None else self._row(v))
            except _Invalid as e:
                raise _Invalid(i, f"element {e.row}: {e.why}") from None
            except ValueError as e:
                raise _Invalid(i, str(e)) from None
        return pa.array(rows, type=self.type)


class Struct(Column):
    """A structured dtype: one child column per field. A value is a mapping, a numpy
    structured array or record, or an object with the fields as attributes (an ophyd-async
    ``Table``)."""

    def __init__(self, fields: list[tuple[str, Column]]) -> None:
        self.fields = fields
        self.type = pa.struct([pa.field(name, c.type) for name, c in fields])
        self.what = "struct<" + ", ".join(f"{name}: {c.what}" for name, c in fields) + ">"

    @staticmethod
    def _field(v: Any, name: str) -> Any:
        if isinstance(v, Mapping):
            return v[name]
        names = getattr(getattr(v, "dtype", None), "names", None)
        if names is not None:
            if name not in names:
                raise KeyError(name)
            return v[name]
        try:
            return getattr(v, name)
        except AttributeError:
            raise KeyError(name) from None

    def convert(self, values: Sequence[Any]) -> pa.Array:
        children = []
        for name, column in self.fields:
            parts = []
            for i, v in enumerate(values):
                try:
                    parts.append(None if v is None else self._field(v, name))
                except KeyError:
                    raise _Invalid(i, f"{_describe(v)} has no field {name!r}") from None
            try:
                children.append(column.convert(parts))
            except _Invalid as e:
                raise _Invalid(e.row, f"field {name!r}: {e.why}") from None
        mask = None
        if any(v is None for v in values):
            mask = pa.array([v is None for v in values])
        return pa.StructArray.from_arrays(
            children, fields=[pa.field(name, c.type) for name, c in self.fields], mask=mask
        )


# -- from a data key -------------------------------------------------------------------------

_JSON_TYPES: dict[str, Number | String] = {
    "number": Number(np.dtype(np.float64)),
    "integer": Number(np.dtype(np.int64)),
    "boolean": Number(np.dtype(np.bool_)),
    "string": String(),
    "array": Number(np.dtype(np.float64)),
}


def _element(where: str, dtype: Any, dtype_numpy: Any) -> Number | String:
    if dtype == "string":
        return String()
    if dtype_numpy is not None:
        try:
            np_type = np.dtype(dtype_numpy)
        except TypeError:
            raise DocumentError(f"{where}: dtype_numpy {dtype_numpy!r} is not a numpy dtype") from None
        kind = np_type.kind
        if kind in "US":
            return String()
        if kind in "biu" or (kind == "f" and np_type.itemsize <= 8):
            return Number(np_type.newbyteorder("="))
        if kind in "Mm" and np.datetime_data(np_type)[0] in ("s", "ms", "us", "ns"):
            return Number(np_type.newbyteorder("="))
        if kind != "O" or dtype is None:
            what = {
                "c": "complex numbers",
                "f": "floats wider than 64 bits",
                "V": "raw bytes",
                "O": "Python objects",
                "M": "datetimes not in s, ms, us or ns",
                "m": "durations not in s, ms, us or ns",
            }.get(kind, kind)
            raise DocumentError(
                f"{where}: dtype_numpy {dtype_numpy!r} ({what}) has no Arrow type; describe the "
                "signal with a type Arrow has (complex numbers: their real and imaginary parts as two keys)"
            )
    if dtype not in _JSON_TYPES:
        raise DocumentError(
            f"{where}: dtype {dtype!r} is not one of {sorted(_JSON_TYPES)} (and there is no dtype_numpy)"
        )
    return _JSON_TYPES[dtype]


def _shaped(where: str, element: Number | String, shape: Any) -> Column:
    if shape is None:
        shape = []
    if not isinstance(shape, list | tuple) or any(
        n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0) for n in shape
    ):
        raise DocumentError(f"{where}: shape {shape!r} is not a list of lengths (or None)")
    if not shape:
        return element
    if 0 in shape:
        raise DocumentError(f"{where}: shape {list(shape)} holds no element; a column needs at least one")
    if any(n is None for n in shape):
        return Ragged(element, tuple(shape))
    return Fixed(element, tuple(shape))


def column_for(where: str, data_key: Mapping[str, Any]) -> Column:
    """The column of one data key (`where` names it in errors). Raises DocumentError for a
    key that has no Arrow type."""
    if not isinstance(data_key, Mapping):
        raise DocumentError(f"{where}: a data key must be a mapping, got {_describe(data_key)}")
    dtype, dtype_numpy, shape = data_key.get("dtype"), data_key.get("dtype_numpy"), data_key.get("shape")
    if isinstance(dtype_numpy, list | tuple) and dtype != "string":
        fields: list[tuple[str, Column]] = []
        for item in dtype_numpy:
            if not (
                isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)
            ):
                raise DocumentError(
                    f"{where}: a structured dtype_numpy is a list of [name, dtype] pairs, got {item!r}"
                )
            name, field_type = item
            inner = f"{where}, field {name!r}"
            fields.append((name, _shaped(inner, _element(inner, None, field_type), shape)))
        if not fields:
            raise DocumentError(f"{where}: a structured dtype_numpy with no fields")
        return Struct(fields)
    return _shaped(where, _element(where, dtype, dtype_numpy), shape)
