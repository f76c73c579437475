"""HDF5 helpers of the writer: file repair after a crash (the superblock's consistency flags),
valid and unique HDF5 names for Arrow stream and column names, timestamps, schema JSON,
compression filters.
How Arrow columns become HDF5 arrays is in ``columns.py``.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import struct
from collections.abc import Container
from typing import Any

import h5py
import numpy as np
import pyarrow as pa

__all__ = [
    "allocate",
    "arrow_name",
    "attr_text",
    "set_arrow_name",
    "chunk_rows",
    "clear_consistency_flags",
    "compression_filters",
    "hdf5_name",
    "open_for_writing",
    "iso_now",
    "schema_json",
]

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


def consistency_flags(path: str) -> int:
    """The superblock's "open for write / SWMR write" flags (0 for none, or for superblock
    versions 0 and 1, which do not carry them). Reads only."""
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 12 or head[:8] != _SIGNATURE or head[8] not in (2, 3):
        return 0
    return head[11]


#: Byte of the OFD lock a writer holds on its output, far past any real data: HDF5's own
#: locks are flock(2), a separate mechanism, so the two never meet.
_LOCK_OFFSET = 1 << 62


def lock_output(fd: int) -> bool:
    """Takes the writer's exclusive lock on its output file (an open-file-description lock:
    held by this open file, not released when HDF5 closes its own descriptors of the file).
    Returns False if another writer holds it."""
    lk = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, _LOCK_OFFSET, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lk)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def held_by_another_hdf5(path: str) -> bool:
    """Whether another HDF5 program has `path` open for writing: HDF5 writers hold an exclusive
    flock, readers (SWMR readers following a run included) a shared one. Probes with a
    non-blocking shared flock; writes nothing."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def open_for_writing(path: str, **kwargs: Any) -> h5py.File:
    """``h5py.File(path, "a")`` for a writer that holds its own lock on `path`: when readers
    (their shared flock) keep HDF5 from taking its exclusive one, and no other writer holds
    the file, it opens without HDF5's locking, under the readers. Raises BlockingIOError when
    another program writes the file."""
    try:
        return h5py.File(path, "a", **kwargs)
    except BlockingIOError:
        if held_by_another_hdf5(path):
            raise
        return h5py.File(path, "a", locking=False, **kwargs)


def looks_like_run(path: str, session: str) -> bool:
    """Whether `path` is a rust-daq file of ring session `session`, read without HDF5 (which
    refuses a file whose writer was killed until its flags are cleared): the root group's
    attributes, with the session id, sit in the first blocks of every file the writer makes."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return b"rust_daq_layout" in head and session.encode() in head


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


def compression_filters(spec: str | None) -> dict[str, Any]:
    """The dataset-creation options of a ``--compression`` spec: none, gzip, gzip:LEVEL, lzf,
    or blosc, lz4, zstd, bitshuffle (hdf5plugin). Raises ValueError naming what is allowed."""
    if spec is None or spec == "none":
        return {}
    if spec in ("gzip", "lzf"):
        return {"compression": spec, **({"compression_opts": 4} if spec == "gzip" else {})}
    name, _, level = spec.partition(":")
    if name == "gzip" and level:
        if not (level.isdigit() and 0 <= int(level) <= 9):
            raise ValueError(f"compression {spec!r}: a gzip level is 0 (none) to 9 (smallest), got {level!r}")
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


def iso_now() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="microseconds")


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


_ESCAPE = {"%", "/"}


def hdf5_name(name: str, reserved: frozenset[str] = frozenset()) -> str:
    """A valid HDF5 link name for an Arrow stream or column name: ``%``, ``/`` and control
    characters (NUL included) are percent-encoded (``x/a`` -> ``x%2Fa``), a name of dots only
    is encoded whole (``.`` -> ``%2E``), the empty name is ``%``, and a name in `reserved`
    (the writer's own entries, e.g. ``metadata``) gets its first character encoded
    (``metadata`` -> ``%6Detadata``). The original name is kept in the ``arrow_name``
    attribute; names still taken get ``__2``, ``__3``... (:func:`allocate`)."""
    if name == "":
        return "%"
    if set(name) == {"."}:
        return "".join(f"%{ord(c):02X}" for c in name)
    out = "".join(f"%{ord(c):02X}" if c in _ESCAPE or ord(c) < 0x20 or ord(c) == 0x7F else c for c in name)
    if out in reserved:
        out = f"%{ord(out[0]):02X}{out[1:]}"
    return out


def allocate(base: str, taken: Container[str]) -> str:
    """`base`, or the first of ``base__2``, ``base__3``... that is not taken."""
    if base not in taken:
        return base
    k = 2
    while f"{base}__{k}" in taken:
        k += 1
    return f"{base}__{k}"


def attr_text(value: str) -> str:
    """Text safe for an HDF5 string attribute (which ends at NUL): NULs as U+2400."""
    return value.replace("\0", "\u2400")


def set_arrow_name(attrs: h5py.AttributeManager, name: str) -> None:
    """Stores an Arrow name in ``arrow_name``; one with a NUL (which HDF5 strings cannot hold)
    also whole, as UTF-8 bytes, in ``arrow_name_utf8``."""
    attrs["arrow_name"] = attr_text(name)
    if "\0" in name:
        attrs["arrow_name_utf8"] = np.frombuffer(name.encode("utf-8"), np.uint8)


def arrow_name(attrs: h5py.AttributeManager, default: str) -> str:
    """The Arrow name stored by :func:`set_arrow_name`."""
    if "arrow_name_utf8" in attrs:
        return bytes(np.asarray(attrs["arrow_name_utf8"], np.uint8)).decode("utf-8")
    value = attrs.get("arrow_name")
    return default if value is None else str(value)
