"""Type stub of the native module (rust/python). Use the classes re-exported by
``rust_daq``; these are their native bases. ``mypy.stubtest`` checks this file against the
built extension in CI."""

import os
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self, final

from typing_extensions import Buffer, disjoint_base

__all__ = [
    "FORMAT_VERSION",
    "MAX_CAPACITY",
    "RECORD_ALIGN",
    "RECORD_HEADER_SIZE",
    "MapView",
    "MappingGuard",
    "Record",
    "Reservation",
    "RingBuffer",
    "RingReader",
    "RowTable",
    "__version__",
    "sleep_until",
]

__version__: str
RECORD_HEADER_SIZE: int
RECORD_ALIGN: int
FORMAT_VERSION: int
MAX_CAPACITY: int

@disjoint_base
class RingBuffer:
    """A ring buffer file: the producer's handle, or a read-only one."""

    def __new__(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        capacity_bytes: int = 0,
        policy: str = "overwrite",
        writable: bool = False,
        replace: bool = False,
        block_timeout: float = 10.0,
        wait: str = "adaptive",
        schema_bytes: int | None = None,
    ) -> Self:
        """Opens (or with ``create=True`` creates) the ring at ``path``. ``wait``: how a
        blocked write waits ("adaptive", "busy", "park").

        Raises RingConfigError, RingFormatError, ProducerActiveError, FileNotFoundError,
        PermissionError, OSError.
        """

    def write(
        self,
        data: Buffer,
        /,
        *,
        stream: int = 0,
        timestamp_ns: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Writes one record (any C-contiguous buffer); returns its sequence number.

        Raises ReadOnlyRingError, RingClosedError, RecordTooLargeError, RingFullError (policy
        "block", after ``timeout`` or ``block_timeout`` seconds), TypeError (not a buffer),
        BufferError (not C-contiguous).
        """

    def write_many(
        self, items: Iterable[Buffer] | Buffer, /, *, stream: int = 0, timeout: float | None = None
    ) -> int:
        """Writes each item as one record (a C-contiguous array of ndim >= 2: one record per
        row); returns the last sequence number (-1 if none). Records written before an error
        stay written. Raises as ``write``. An array's rows (below 64 KiB each) go in runs of
        up to 1,024 that share one timestamp, the time the run was written (each record of
        ``write`` reads the clock; here that was a sixth of a 64-byte record's cost)."""

    def close(self) -> None:
        """Releases the producer lock. Readers and views made earlier keep working."""

    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *_args: type[BaseException] | BaseException | TracebackType | None) -> bool: ...
    def read_snapshot(self) -> bytes:
        """Copy of the committed, unconsumed bytes (framed records). Raises RingClosedError."""

    def advance_tail(self, nbytes: int) -> int:
        """Consumes ``nbytes`` (whole records) of the snapshot; returns the new read_tail.
        Raises RingUsageError (past the data, or inside a record), RingClosedError."""

    def data_address(self) -> int:
        """Address of the data region in this process. Raises RingClosedError."""

    def _data_buffer(self) -> MapView: ...
    def _data_file(self) -> tuple[int, int]:
        """(fd, data offset) of the producer's ring file. Raises ReadOnlyRingError."""

    def _guard_mapping(self, address: int, length: int) -> MappingGuard:
        """Registers another mapping of the ring file with the SIGBUS guard. Raises
        ReadOnlyRingError, RingConfigError (too many mappings)."""

    def status(self) -> dict[str, Any]:
        """Positions, counters and producer state. Raises RingClosedError."""

    @property
    def read_tail(self) -> int: ...
    @property
    def read_tail_seq(self) -> int: ...
    @property
    def write_head(self) -> int: ...
    @property
    def oldest_position(self) -> int: ...
    @property
    def records_written(self) -> int: ...
    @property
    def records_lost(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def max_record_size(self) -> int: ...
    @property
    def path(self) -> str: ...
    @property
    def policy(self) -> str: ...
    @property
    def session_id(self) -> int: ...
    @property
    def writable(self) -> bool: ...
    @property
    def producer_pid(self) -> int | None: ...
    @property
    def producer_alive(self) -> bool: ...
    @property
    def heartbeat_ns(self) -> int: ...
    @property
    def schema_capacity(self) -> int:
        """Bytes of the schema region (the stream table), fixed at creation."""
    @property
    def block_timeout(self) -> float: ...
    @block_timeout.setter
    def block_timeout(self, seconds: float) -> None: ...
    @property
    def wait(self) -> str:
        """How a write blocked for room waits: "adaptive", "busy" or "park"."""
    @wait.setter
    def wait(self, wait: str) -> None: ...
    @property
    def hot_bytes(self) -> int:
        """Policy "block": how far into the ring (bytes) the producer goes before it returns
        to the start early, once the consumer has taken every record (and at least twice the
        record's size); 0: every lap the whole ring. Default 1 MiB. For records of 64 KiB to
        8 MiB, a write there whose consumer is a record or two behind waits for it, once a lap,
        at most as long as those bytes take at 8 GB/s (2 ms at most), having copied its
        payload ahead to the start meanwhile; if the consumer does not drain in time, the
        write goes on through the ring (no room is lost). A drained ring then keeps
        about that much history, and a ``read_snapshot()`` across such a lap's end copies its
        padding: a producer whose readers want history (``latest``, ``LiveView``, readers from
        the oldest record) or snapshots sets 0."""
    @hot_bytes.setter
    def hot_bytes(self, nbytes: int) -> None: ...
    def reserve(
        self,
        nbytes: int,
        *,
        stream: int = 0,
        schema_id: int = 0,
        timestamp_ns: int | None = None,
        timeout: float | None = None,
    ) -> Reservation:
        """Reserves space for one record of ``nbytes`` payload bytes; fill it, then commit it.
        Raises RecordTooLargeError, RingFullError, ReadOnlyRingError, RingClosedError,
        RingUsageError (another reservation is pending)."""

    def _advance_stream_seq(self, stream: int, next: int) -> int:
        """Moves stream id `stream`'s next sequence number forward to `next` (never back); the
        records skipped count as lost for readers. Returns the stream's next sequence number."""

    def _register_schema(self, name: str, schema: bytes) -> tuple[int, int]:
        """Registers an Arrow IPC schema for a stream: (stream_id, schema_id). Raises
        RingConfigError (schema region full), RingUsageError (bad name), ReadOnlyRingError."""

    def _schemas(self, first_id: int = 1) -> list[tuple[int, int, str, bytes, int]]:
        """(schema_id, stream_id, name, schema bytes, activation) of every registered schema
        from ``first_id`` on; a stream's current schema is its entry with the highest
        activation. Raises RingCorruptError, RingClosedError."""
    def _schema_activations(self) -> list[int]:
        """Every schema's activation, by schema_id - 1. Raises RingCorruptError."""

    def _noop(self) -> None: ...

@final
class Reservation:
    """Ring space for one record: fill with ``write()`` or the (writable) buffer protocol, then
    ``commit()``; ``abort()``, an exception in ``with``, or collection without commit abandons it."""

    def write(self, data: Buffer) -> int:
        """Copies at the write cursor. Raises RingUsageError (overflow, or already finished)."""

    def commit(self) -> int:
        """Publishes the record; returns its seq. Raises BufferError (views still alive),
        RingUsageError (already committed or aborted), RingClosedError."""

    def abort(self) -> None:
        """Abandons the record (readers skip it; its seq is reused). Raises as ``commit``."""

    @property
    def nbytes(self) -> int: ...
    @property
    def written(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def address(self) -> int: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

def sleep_until(deadline_ns: int, spin_ns: int = 50000) -> int:
    """Sleeps (GIL released) until ``deadline_ns`` of CLOCK_MONOTONIC (``time.perf_counter_ns``):
    in the kernel until ``spin_ns`` before it, then spinning. Returns how late it returned
    (ns, >= 0). Raises ValueError (negative spin), KeyboardInterrupt."""

@disjoint_base
class RingReader:
    """A cursor over a ring with its own position and loss count."""

    def __new__(cls, ring: RingBuffer, start: str = "oldest", wait: str = "adaptive") -> Self:
        """Raises RingConfigError (unknown start or wait), RingClosedError, RingCorruptError."""

    def read(self, max_records: int | None = None, timeout: float = 0.0, copy: bool = True) -> list[Record]:
        """Records available now (waits up to ``timeout`` s for one). Raises RingCorruptError,
        ValueError (bad timeout), KeyboardInterrupt while waiting."""

    def read_into(
        self,
        out: Buffer,
        /,
        *,
        seq: Buffer | None = None,
        timestamp_ns: Buffer | None = None,
        streams: Buffer | None = None,
        stream: int | None = None,
        timeout: float = 0.0,
    ) -> int:
        """Bulk read into a writable C-contiguous buffer: one record per row (its first
        dimension), each exactly a row long; seq (uint64), timestamp_ns (int64) and streams
        (uint32) get one item per row. Returns the rows filled. Stops at a record of another
        size or stream; raises ValueError (nothing consumed) if the next record's size is not
        a row's, BufferError for a read-only or non-contiguous buffer."""

    def _read_array(
        self, max_records: int, stream: int | None, item: int, timeout: float
    ) -> tuple[bytearray, bytearray, bytearray, bytearray, int]: ...
    def commit(self) -> None:
        """Stores this reader's position as the ring's read_tail: the producer (policy "block")
        may then reuse everything before it. A reader past the committed position (it skipped
        end-of-lap padding written with a record still being filled) stores the committed
        position instead; its next commit moves on. Raises RingUsageError (header read-only
        for this user)."""

    @property
    def wait(self) -> str:
        """How a read with a timeout waits for data: "adaptive", "busy" or "park"."""
    @wait.setter
    def wait(self, wait: str) -> None: ...
    @property
    def lost(self) -> int: ...
    @property
    def delivered(self) -> int: ...
    @property
    def position(self) -> int: ...
    @property
    def next_seq(self) -> int: ...
    def _position_valid(self, position: int) -> bool: ...
    @property
    def ring(self) -> RingBuffer: ...

@final
class Record:
    """One record: ``data`` is bytes (copy) or a read-only memoryview into the ring."""

    @property
    def seq(self) -> int: ...
    @property
    def timestamp_ns(self) -> int: ...
    @property
    def stream(self) -> int: ...
    @property
    def position(self) -> int: ...
    @property
    def schema_id(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def stream_seq(self) -> int | None:
        """Sequence number within the stream: a gap is records of this stream lost."""
    @property
    def data(self) -> bytes | memoryview: ...
    @property
    def zero_copy(self) -> bool: ...
    def valid(self) -> bool:
        """False once a zero-copy record's space was reclaimed by the producer."""

    def __len__(self) -> int: ...

@final
class MappingGuard:
    """Another mapping of a ring file registered with the SIGBUS guard; dropping it
    unregisters the mapping."""

@final
class MapView:
    """Read-only buffer over ring memory; keeps the mapping alive."""

    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __len__(self) -> int: ...
    @property
    def address(self) -> int: ...

@final
class RowTable:
    """Rows of its stream before each record, in shared memory (an anonymous sealed file):
    written by the producer, read in other processes through :attr:`fd`."""

    def __new__(cls, slots: int) -> Self:
        """A new, empty table. Raises ValueError (slots not in 1..2^24), OSError."""

    @staticmethod
    def from_fd(fd: int) -> RowTable:
        """The table behind another table's descriptor (read-only if the descriptor is).
        Raises ValueError (not a row table), OSError (no such descriptor)."""

    @property
    def slots(self) -> int: ...
    @property
    def fd(self) -> int: ...
    @property
    def writable(self) -> bool: ...
    def note(self, seq: int, rows: int) -> None:
        """Raises PermissionError on a table attached read-only."""
    def clear(self, seq: int) -> None:
        """Raises PermissionError on a table attached read-only."""
    def rows_before(self, seq: int) -> int | None: ...
