"""The writer's disk-space accounting: how many bytes a pass may still write, what a record
costs, and how a failed HDF5 write is told apart from a record HDF5 refuses.

HDF5 cannot undo a half-done write, so on a nearly full disk (or under ``RLIMIT_FSIZE``) a
pass takes only the whole records that fit, in ring order; a write that fails anyway makes the
estimate more cautious (:attr:`SpaceBudget.factor`) and is retried with fewer records.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

__all__ = ["FULL", "MARGIN", "_NoSpace", "SpaceBudget", "disk_trouble", "errno_of", "io_error"]

# What a pass may write when the disk is nearly full: payload * factor + margin per record must
# fit. HDF5 adds chunk rounding and metadata; a write that still fails is retried, smaller.
_PLENTY = 1 << 30
MARGIN = 256 << 10
_FACTOR = 1.25
_FACTOR_MAX = 1 << 12
#: The errnos of a disk that took less than the estimate: the pass is retried, smaller.
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class _NoSpace(OSError):
    """Not one more record fits on the disk (or under RLIMIT_FSIZE); nothing was written."""


def errno_of(e: BaseException) -> int | None:
    """The errno HDF5 reports in the message of a failed call, or the exception's own."""
    match = re.search(r"errno = (\d+)", str(e))
    if match:
        return int(match.group(1))
    code = getattr(e, "errno", None)
    return code if isinstance(code, int) else None


def io_error(path: str, e: BaseException) -> OSError:
    """An OSError with the errno HDF5 reports (e.g. 28 no space, 27 file too large)."""
    code = errno_of(e) or errno.EIO
    return OSError(
        code,
        f"writing {path} failed ({os.strerror(code)}); nothing past the last flush was committed "
        "to the ring, which still holds it: the next flush retries",
        path,
    )


def disk_trouble(path: str, e: BaseException) -> bool:
    """Whether a failed HDF5 call was the disk's doing (HDF5 reports the errno of a failed
    write), or looks like it (almost no space left)."""
    if errno_of(e) is not None:
        return True
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return True
    return st.f_bavail * st.f_frsize < (16 << 20)


class SpaceBudget:
    """What the writer's file at `path` may still take, and what a record costs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.factor = _FACTOR  # bytes of file per byte of payload, as estimated

    def available(self) -> tuple[int | None, int]:
        """Bytes this flush may still write (free space, or what RLIMIT_FSIZE leaves), None when
        that is plenty; and the errno to report when it runs out (ENOSPC, EFBIG)."""
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return None, errno.ENOSPC
        free, code = st.f_bavail * st.f_frsize, errno.ENOSPC
        try:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY and limit - os.path.getsize(self.path) < free:
                free, code = limit - os.path.getsize(self.path), errno.EFBIG
        except (ImportError, OSError):
            pass
        return (None if free > _PLENTY else max(free - MARGIN, 0)), code

    def cost(self, rec: Any, chunk_bytes: int) -> int:
        """Bytes of file a record may take: its payload (an upper bound of its columns), and
        `chunk_bytes`, the chunks its rows open (HDF5 allocates a chunk whole at its first write)."""
        return int(len(rec.data) * self.factor) + chunk_bytes

    def shrink(self, e: BaseException) -> bool:
        """After a write failed with `e`: True (and a more cautious estimate) if the disk took
        less than estimated and a retry with fewer records may succeed."""
        if errno_of(e) in FULL and self.factor < _FACTOR_MAX:
            self.factor *= 4
            return True
        return False

    def reset(self) -> None:
        """After a pass that wrote all it read: the estimate back to its default."""
        self.factor = _FACTOR
