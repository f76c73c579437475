"""A :class:`~rust_daq.nats.publisher.Publisher` on an event loop of its own, in a thread:
what a run's ``[nats]`` section starts beside the acquisition (runner.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from .._errors import JetStreamError
from .._ring import RingBuffer
from .publisher import Publisher, PublisherStats

__all__ = ["PublisherThread"]

log = logging.getLogger("rust_daq.nats")


class PublisherThread:
    """A :class:`Publisher` on its own event loop in a thread: a run's ``[nats]`` section
    (the acquisition's loop never does its work). ``start()`` returns once it is connected
    (JetStreamError if it cannot be); ``stop()`` publishes what the ring holds, waits for the
    acknowledgements, stores the position and returns the stats."""

    def __init__(self, ring: RingBuffer, url: str, **options: Any) -> None:
        self._ring, self._url, self._options = ring, url, options
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.stats: PublisherStats | None = None
        self.publisher: Publisher | None = None
        self._thread = threading.Thread(target=self._main, name="rust-daq-publish", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise JetStreamError(f"the publisher did not connect to {self._url} in {timeout:g} s")
        if self.error is not None:
            self._thread.join(5)
            raise self.error

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.publisher = Publisher(self._ring, self._url, on_ready=self._ready.set, **self._options)
            self.stats = await self.publisher.run(self._stop)
        except BaseException as e:  # (said by start(), or by stop() once running)
            self.error = e
            if self._ready.is_set():
                log.error("the publisher stopped: %s: %s", type(e).__name__, e)
        finally:
            self._ready.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 120.0) -> PublisherStats | None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # (its loop already closed)
                pass
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the publisher did not finish in %g s", timeout)
        return self.stats
