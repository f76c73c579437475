"""The cyclic garbage collector around the data plane's loops, process-wide and nestable:
acquisitions and writers may run in one process, in several threads, each asking.

- :func:`frozen`: ``gc.freeze()`` of what is alive when an acquisition starts, so that its
  loop's collections do not walk the whole heap (see :mod:`rust_daq.acquisition`).
- :func:`paused`: no collection during a writer's pass. A pass holds every record it read
  until its flush (tens of thousands of small objects), which the collector keeps promoting
  and walking: with 1,000 streams of ten records each, a third of the pass went to it
  (13.7 k records/s, 20.1 k without). Each record's objects are freed by their reference
  counts when the pass drops them; cycles, if any, wait for the next collection after it.

Each undoes its change when the last of its holders leaves, and only if it made it: a
collector that someone else disabled or froze stays so.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["frozen", "paused"]

_lock = threading.Lock()
_frozen_holders = 0  # acquisitions running with freeze_gc
_froze = False  # whether the first of them froze (nothing was frozen before it)
_paused_holders = 0  # writers' passes in progress
_disabled = False  # whether the first of them disabled the collector (it was enabled)


@contextmanager
def frozen(collect: bool) -> Iterator[None]:
    """gc.freeze() for the outermost of nested or concurrent acquisitions, undone by the last
    to end, and only if nothing was frozen before (`collect`: a gc.collect() first)."""
    global _frozen_holders, _froze
    with _lock:
        if _frozen_holders == 0:
            _froze = gc.get_freeze_count() == 0
            if _froze:
                if collect:
                    gc.collect()
                gc.freeze()
        _frozen_holders += 1
    try:
        yield
    finally:
        with _lock:
            _frozen_holders -= 1
            if _frozen_holders == 0 and _froze:
                gc.unfreeze()
                _froze = False


@contextmanager
def paused() -> Iterator[None]:
    """gc.disable() while any writer's pass runs, enabled again after the last, if it was
    enabled before the first."""
    global _paused_holders, _disabled
    with _lock:
        if _paused_holders == 0:
            _disabled = gc.isenabled()
            if _disabled:
                gc.disable()
        _paused_holders += 1
    try:
        yield
    finally:
        with _lock:
            _paused_holders -= 1
            if _paused_holders == 0 and _disabled:
                gc.enable()
                _disabled = False
