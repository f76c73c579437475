"""An asyncio event loop of its own, in a daemon thread: how the synchronous sides of
``rust_daq.nats`` (the HDF5 writer's source, the live readers) run nats-py, which is async."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

log = logging.getLogger("rust_daq.nats")
_T = TypeVar("_T")


class LoopThread:
    """``call(coro)`` runs a coroutine on the loop and waits for it; ``submit(coro)`` does not
    wait; ``close(shutdown)`` runs `shutdown()` on the loop (at most `timeout` s), then stops
    the loop and its thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def running(self) -> bool:
        return self.loop.is_running()

    def close(
        self, shutdown: Callable[[], Coroutine[Any, Any, Any]] | None = None, timeout: float = 10.0
    ) -> None:
        if self.loop.is_running():
            if shutdown is not None:
                try:
                    self.call(shutdown(), timeout)
                except Exception as e:  # (a client that was reconnecting, a server gone)
                    log.debug("closing the NATS connection: %s", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
