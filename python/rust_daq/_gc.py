"""The cyclic garbage collector around the data plane's loops, process-wide and nestable:
acquisitions and writers may run in one process, in several threads, each asking.

- :func:`frozen`: ``gc.freeze()`` of what is alive when an acquisition starts, so that its
  loop's collections do not walk the whole heap (see :mod:`rust_daq.acquisition`).
- :func:`paused`: no collection while a writer's pass works on what it read (one read of
  the ring at a time: at most 16,384 records or 64 MiB). The pass holds those records until
  they are written (tens of thousands of small objects), which the collector keeps promoting
  and walking: with 1,000 streams of ten records each, a third of the pass went to it
  (13.7 k records/s, 20.1 k without). Each record's objects are freed by their reference
  counts when the pass drops them (the writer's own make no cycles); others' cycles wait for
  the next collection. Pauses of several writers that keep overlapping never let the last
  holder leave: then a holder that leaves after the collector was off for
  :data:`MAX_PAUSE` seconds collects (outside any lock), so that garbage never piles up for
  longer.

Each undoes its change when the last of its holders leaves, and only if it made it: a
collector that someone else disabled or froze stays so. The two have locks of their own,
held only for their counts (a collection runs finalizers, which may start a writer's pass).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MAX_PAUSE", "frozen", "paused"]

#: Seconds the collector may stay off while pauses overlap, before a leaving holder collects.
MAX_PAUSE = 1.0

_frozen_lock = threading.Lock()
_frozen_holders = 0  # acquisitions running with freeze_gc
_froze = False  # whether the first of them froze (nothing was frozen before it)
_paused_lock = threading.Lock()
_paused_holders = 0  # writers' passes in progress
_disabled = False  # whether the first of them disabled the collector (it was enabled)
_off_since = 0.0  # when it did, or when a holder last collected


@contextmanager
def frozen(collect: bool) -> Iterator[None]:
    """gc.freeze() for the outermost of nested or concurrent acquisitions, undone by the last
    to end, and only if nothing was frozen before (`collect`: a gc.collect() first)."""
    global _frozen_holders, _froze
    if collect and _frozen_holders == 0 and gc.get_freeze_count() == 0:
        gc.collect()  # (before the lock: finalizers may take it)
    with _frozen_lock:
        if _frozen_holders == 0:
            _froze = gc.get_freeze_count() == 0
            if _froze:
                gc.freeze()
        _frozen_holders += 1
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_holders -= 1
            if _frozen_holders == 0 and _froze:
                gc.unfreeze()
                _froze = False


@contextmanager
def paused() -> Iterator[None]:
    """gc.disable() while any writer's pass works on a read, enabled again after the last,
    if it was enabled before the first; a collection by a leaving holder when the collector
    was off for MAX_PAUSE seconds meanwhile."""
    global _paused_holders, _disabled, _off_since
    with _paused_lock:
        if _paused_holders == 0:
            _disabled = gc.isenabled()
            if _disabled:
                gc.disable()
                _off_since = time.monotonic()
        _paused_holders += 1
    try:
        yield
    finally:
        collect = False
        with _paused_lock:
            _paused_holders -= 1
            if _disabled:
                if _paused_holders == 0:
                    gc.enable()
                    _disabled = False
                elif time.monotonic() - _off_since > MAX_PAUSE:
                    collect, _off_since = True, time.monotonic()
        if collect:
            gc.collect()
