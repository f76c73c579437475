"""The writer's quarantine: records that cannot be written for a reason of their own (they do
not decode, or HDF5 refuses their data) keep their Arrow bytes, stream and reason in
``rust_daq/quarantine`` (one row per record), count as ``unwritable`` for their stream, and the
pass goes on.

Which record of a failed write it was is found by writing the suspects one at a time: a write
of several records that fails makes them all suspects; a write of one that fails condemns it,
and the next pass quarantines it instead of writing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import h5py
import numpy as np

from .._arrow import StreamInfo
from .file import attr_text
from .layouts import StreamBook

__all__ = ["QUARANTINE", "QUARANTINE_FIELDS", "Quarantine", "_Unwritable"]

log = logging.getLogger("rust_daq.writer")

QUARANTINE = "rust_daq/quarantine"
#: The quarantine's datasets (one row per record that could not be written) and their types.
QUARANTINE_FIELDS: dict[str, Any] = {
    "seq": np.int64,
    "stream": h5py.string_dtype(),
    "timestamp_ns": np.int64,
    "reason": h5py.string_dtype(),
    "payload": h5py.vlen_dtype(np.dtype(np.uint8)),  # the record's Arrow IPC message, as in the ring
    "schema": h5py.vlen_dtype(np.dtype(np.uint8)),  # its stream's Arrow schema message (or empty)
}
_LOGGED_PER_STREAM = 10  # quarantined records logged one by one per stream, then every 1000th

#: A record to quarantine: the record, its stream (None: its schema is unknown), the reason.
Bad = tuple[Any, StreamInfo | None, str]
_T = TypeVar("_T")


class _Unwritable(Exception):
    """Writing these records failed for a reason of their own, not the disk's."""

    def __init__(self, seqs: list[int], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.seqs = seqs


def create(f: h5py.File) -> None:
    """The quarantine's datasets, if the file lacks them."""
    q = f.require_group(QUARANTINE)
    for name, dtype in QUARANTINE_FIELDS.items():
        if name not in q:
            q.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))


def trim(f: h5py.File, unwritable: int) -> None:
    """Back to the `unwritable` rows the last progress marker counts (a killed pass may have
    quarantined more)."""
    create(f)
    for name in QUARANTINE_FIELDS:
        ds = f[QUARANTINE][name]
        if ds.shape[0] > unwritable:
            ds.resize(unwritable, axis=0)


class Quarantine:
    """The records a writer found unwritable and the suspects it is writing one by one."""

    def __init__(self) -> None:
        # Records whose write failed for a reason of their own (seq -> reason): quarantined on
        # the retry. Suspects are written one record at a time, to find which one it was.
        self.condemned: dict[int, str] = {}
        self._suspects: set[int] = set()

    def reason(self, seq: int) -> str | None:
        """Why record `seq` is to be quarantined, if it was condemned."""
        return self.condemned.get(seq)

    def groups(self, items: Sequence[_T], seq: Callable[[_T], int]) -> list[Sequence[_T]]:
        """How to write one stream's records of a pass: all at once, or one by one when a
        suspect is among them."""
        if self._suspects and any(seq(it) in self._suspects for it in items):
            return [[it] for it in items]
        return [items]

    def failed(self, e: _Unwritable) -> None:
        """A write failed for a reason of its own: its one record condemned, or its records
        made suspects."""
        if len(e.seqs) == 1:
            self.condemned[e.seqs[0]] = f"HDF5 refused it: {e}"
        else:
            log.warning("writing records %d..%d failed (%s); finding the record", e.seqs[0], e.seqs[-1], e)
            self._suspects.update(e.seqs)

    def write(self, f: h5py.File, bad: list[Bad], book: Callable[[str], StreamBook]) -> None:
        """Records that cannot be written: their Arrow bytes, stream and reason go to
        rust_daq/quarantine and they count as unwritable in their stream's `book`."""
        q = f[QUARANTINE]
        n = q["seq"].shape[0]
        for ds in q.values():
            ds.resize(n + len(bad), axis=0)
        for i, (rec, info, reason) in enumerate(bad):
            name = info.name if info is not None else ""
            q["seq"][n + i] = rec.seq
            q["stream"][n + i] = attr_text(name)
            q["timestamp_ns"][n + i] = rec.timestamp_ns
            q["reason"][n + i] = attr_text(reason)
            q["payload"][n + i] = np.frombuffer(bytes(rec.data), np.uint8)
            schema = info.schema.serialize().to_pybytes() if info is not None else b""
            q["schema"][n + i] = np.frombuffer(schema, np.uint8)
            count = 0
            if info is not None:
                b = book(info.name)
                b.unwritable += 1
                count = b.unwritable
            if count <= _LOGGED_PER_STREAM or count % 1000 == 0:
                log.error(
                    "record %d of stream %r quarantined (%s): %s; its bytes are in %s",
                    rec.seq,
                    name,
                    f"{count} so far" if count else "no stream",
                    reason,
                    QUARANTINE,
                )
