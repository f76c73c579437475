"""The public ring API: :class:`RingBuffer` and :class:`RingReader` over the native core."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Literal, Self

import numpy as np

from . import _native
from ._errors import RingConfigError

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["RingBuffer", "RingReader", "resolve_ring_path"]

Policy = Literal["overwrite", "block"]
StartAt = Literal["oldest", "latest", "tail"]

_MB = 1024 * 1024


def resolve_ring_path(path: str | os.PathLike[str]) -> str:
    """A bare name (no directory part) names a ring in ``/dev/shm`` on Linux; anything else
    is used as given."""
    p = os.fspath(path)
    if sys.platform.startswith("linux") and "/" not in p and p not in ("", ".", ".."):
        return "/dev/shm/" + p
    return p


class RingBuffer(_native.RingBuffer):
    """A memory-mapped ring buffer file shared between processes.

    Make one with :meth:`create` (you become its producer) or attach with :meth:`open`.
    Records written with :meth:`write` are read by any number of :class:`RingReader`\\ s, in
    this or other processes.
    """

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        capacity_mb: float = 100,
        *,
        capacity_bytes: int | None = None,
        policy: Policy = "overwrite",
        replace: bool = False,
        block_timeout: float = 10.0,
    ) -> Self:
        """Create a ring of ``capacity_mb`` MiB (or exactly ``capacity_bytes``) and attach as its
        producer. An existing ring of the same capacity and policy is reopened with its data
        (a restarted producer continues the sequence); one of another capacity or policy is
        an error unless ``replace=True``.

        Raises RingConfigError (bad capacity, policy, or a mismatch with the existing ring),
        ProducerActiveError (another live producer), FileNotFoundError (missing directory),
        PermissionError, RingFormatError (a non-ring file is in the way).
        """
        if capacity_bytes is None:
            if isinstance(capacity_mb, bool) or not isinstance(capacity_mb, int | float):
                raise RingConfigError(f"capacity_mb must be a number, got {type(capacity_mb).__name__}")
            capacity_bytes = int(capacity_mb * _MB)
        elif isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise RingConfigError(f"capacity_bytes must be an int, got {type(capacity_bytes).__name__}")
        if capacity_bytes <= 0:
            raise RingConfigError(f"ring capacity must be greater than 0 bytes, got {capacity_bytes}")
        return cls(
            resolve_ring_path(path),
            create=True,
            capacity_bytes=capacity_bytes,
            policy=policy,
            replace=replace,
            block_timeout=block_timeout,
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False) -> Self:
        """Attach to an existing ring: read-only, or as its producer with ``writable=True``.

        Raises FileNotFoundError, PermissionError, RingFormatError (not a ring, unsupported
        version, truncated), ProducerActiveError (``writable=True`` while a producer lives).
        """
        return cls(resolve_ring_path(path), writable=writable)

    def reader(self, start: StartAt = "oldest") -> RingReader:
        """A new reader with its own cursor: from the ``"oldest"`` record still in the ring, the
        ``"latest"`` (only records committed from now on), or the primary consumer's ``"tail"``."""
        return RingReader(self, start)

    def data_view(self) -> npt.NDArray[np.uint8]:
        """A read-only numpy ``uint8`` array over the whole data region, zero-copy. It keeps the
        mapping alive; its contents change as the producer writes."""
        return np.frombuffer(memoryview(self._data_buffer()), dtype=np.uint8)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("producer" if self.writable else "read-only")
        return f"<RingBuffer {self.path!r} {self.capacity} bytes policy={self.policy!r} {state}>"


class RingReader(_native.RingReader):
    """A cursor over a ring with its own position and loss count (:attr:`lost`).

    ``reader.read()`` returns the records available now (``timeout > 0`` waits for one);
    every record carries ``seq``, ``timestamp_ns``, ``stream`` and ``data``.
    """

    def __repr__(self) -> str:
        return f"<RingReader of {self.ring.path!r} at {self.position} lost={self.lost}>"
