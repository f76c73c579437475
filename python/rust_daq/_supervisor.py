"""Keeps the HDF5 writer process of a run (``rust-daq run``) or of a daemon's recording alive.

A writer process that dies (SIGKILL, a crash, the OOM killer) is started again on the same
ring and file, after a back-off; it resumes exactly once from the file's progress marker and
the ring's ``read_tail`` (see :mod:`rust_daq.writer`). A writer that cannot be kept alive (it
does not start, or it dies again and again within ``min_uptime`` of starting: a bad config,
a file it refuses) is given up on: the supervisor's state becomes ``"failed"`` with the
reason, and whoever runs it (the run, the daemon) says so instead of reporting success.

Everything about the process happens in one long-lived thread per supervisor: starts,
restarts, the final stop. (A child that watches for its parent's death with
``PR_SET_PDEATHSIG`` is signalled when the *thread* that started it ends; a writer started
from a short-lived worker thread would be killed with it.)

States: ``"starting"``, ``"running"`` (a writer process is alive), ``"restarting"`` (it died;
another starts after the back-off), ``"failed"`` (given up; :attr:`reason` says why),
``"stopped"`` (:meth:`stop` made its final flush).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from ._errors import RustDaqError
from .hdf5.options import WriterOptions
from .hdf5.process import start_process, stop_process
from .hdf5.progress import read_progress

__all__ = ["WriterSupervisor", "file_progress"]

log = logging.getLogger("rust_daq.supervisor")

_POLL = 0.1  # seconds between checks that the writer lives
_STDERR_LINES = 40  # the last lines of each writer's log kept (for the death message)


def file_progress(path: str) -> dict[str, Any] | None:
    """What a writer's file holds by its progress marker: records, lost, flushes and, per
    stream, rows/records/lost. None if the file has no marker (or cannot be read)."""
    try:
        p = read_progress(path)
    except (OSError, RustDaqError):
        return None
    streams = {name: {"rows": s.rows, "records": s.records, "lost": s.lost} for name, s in p.streams.items()}
    return {"records": p.records, "lost": p.lost, "flushes": p.flushes, "streams": streams}


def _exited(p: subprocess.Popen[str]) -> bool:
    """Whether `p` has ended, without reaping it. (Popen.poll() answers None, "running", when
    another thread is in waitpid for it: the supervisor's thread always may be.)"""
    if p.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped meanwhile, by the supervisor's thread
        return True


def _describe(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


class WriterSupervisor:
    """One writer process with `options` (:class:`~rust_daq.hdf5.options.WriterOptions`; or
    `options` the ring, `output` the file and the other options as keywords), kept alive;
    see the module documentation.

    ``backoff``: seconds before each restart, the n-th of a row of quick deaths waiting the
    n-th entry (the last repeats); ``min_uptime``: a writer that lived less than this (default
    2 s plus two flush intervals) died "at once"; ``max_quick_deaths``: after this many in a
    row, the next is given up on. ``on_event``: called with a line per death and restart
    (default: the ``rust_daq.supervisor`` logger), from the supervisor's thread.
    """

    def __init__(
        self,
        options: WriterOptions | str,
        output: str | None = None,
        *,
        backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0),
        min_uptime: float | None = None,
        max_quick_deaths: int = 3,
        stop_timeout: float = 120.0,
        on_event: Callable[[str], None] | None = None,
        **writer_options: Any,
    ) -> None:
        if not isinstance(options, WriterOptions):
            assert output is not None, "WriterSupervisor(ring, output, ...) needs the output"
            options = WriterOptions(ring=options, output=output, **writer_options)
        self.options = options
        self.ring, self.output = options.ring, options.output
        self.backoff = backoff
        self.min_uptime = 2.0 + 2 * options.flush_interval if min_uptime is None else min_uptime
        self.max_quick_deaths = max_quick_deaths
        self.stop_timeout = stop_timeout
        self._emit = on_event or log.warning
        self._lock = threading.Lock()
        self._state = "starting"
        self._reason: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._started_at = 0.0
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._drainer: threading.Thread | None = None
        self.restarts = 0
        #: Exit status of every writer process that ended (deaths, then the final stop).
        self.exit_codes: list[int] = []
        self._stopping = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._main, name="rust-daq-writer-supervisor", daemon=True)

    # -- what callers use -------------------------------------------------------------------

    def start(self) -> None:
        """Starts the writer and waits until it is ready (its file is open). Raises
        RustDaqError with the writer's own message if it does not start."""
        self._thread.start()
        self._first.wait()
        if self._state == "failed":
            self._thread.join()
            raise RustDaqError(self._reason or "the writer process did not start")

    @property
    def state(self) -> str:
        """As the module documentation says; ``"running"`` only while a writer process lives."""
        with self._lock:
            state, p = self._state, self._proc
        if state == "running" and p is not None and _exited(p):
            return "restarting"  # dead: the supervisor's thread notices within _POLL
        return state

    @property
    def reason(self) -> str | None:
        """Why the supervisor gave up (state ``"failed"``), else None."""
        return self._reason

    @property
    def pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and not _exited(p) else None

    def status(self) -> dict[str, Any]:
        """state, restarts, reason (failed), pid (running), for status reports."""
        st: dict[str, Any] = {"state": self.state, "restarts": self.restarts}
        if self._reason is not None:
            st["reason"] = self._reason
        if self.pid is not None:
            st["pid"] = self.pid
        return st

    def stop(self) -> str:
        """The final flush: SIGTERM to the writer, waits for it to exit. A writer that was dead
        (restarting) is started once more first, so that what the ring holds reaches the file.
        Returns the final state: ``"stopped"`` (the last writer exited 0) or ``"failed"``."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        return self._state

    # -- the supervisor's thread --------------------------------------------------------------

    def _spawn(self) -> str | None:
        """Starts a writer; None when it is ready, else why it did not start."""
        try:
            p = start_process(self.options)
        except RustDaqError as e:
            return str(e)
        except (OSError, subprocess.SubprocessError) as e:
            return f"the writer process did not start: {e}"
        # Its log goes to a pipe that nobody read until the end: a writer that logs a lot
        # (a flush failing every second for minutes) filled it and blocked. Drain it here;
        # stop_process then reads only stdout.
        err_pipe, p.stderr = p.stderr, None
        self._stderr.clear()
        self._drainer = threading.Thread(target=self._drain, args=(err_pipe,), daemon=True)
        self._drainer.start()
        with self._lock:
            self._proc, self._started_at, self._state = p, time.monotonic(), "running"
        return None

    def _drain(self, pipe: IO[str] | None) -> None:
        if pipe is None:
            return
        with pipe:
            for line in pipe:
                self._stderr.append(line.rstrip("\n"))

    def _last_words(self) -> str:
        if self._drainer is not None:
            self._drainer.join(timeout=5)
        for line in reversed(self._stderr):
            if line.strip():
                return line.strip()
        return ""

    def _fail(self, reason: str) -> None:
        with self._lock:
            self._state, self._reason = "failed", reason
        self._emit(f"writer: giving up: {reason}")

    def _main(self) -> None:
        try:
            self._supervise()
        except BaseException as e:  # the thread must never end silently: callers wait on it
            self._fail(f"the supervisor failed: {type(e).__name__}: {e}")
            with self._lock:
                p = self._proc
            if p is not None and p.poll() is None:
                with contextlib.suppress(Exception):
                    self._final_stop(p)
                with self._lock:
                    self._state = "failed"
        finally:
            self._first.set()

    def _supervise(self) -> None:
        err = self._spawn()
        if err is not None:
            self._fail(err)
            self._first.set()
            return
        self._first.set()
        quick = 0  # deaths in a row, each within min_uptime of its start
        while True:
            p = self._proc
            assert p is not None
            while p.poll() is None and not self._stopping.is_set():
                self._stopping.wait(_POLL)
            if p.poll() is None:
                self._final_stop(p)
                return
            code = p.wait()
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self.exit_codes.append(code)
            uptime = time.monotonic() - self._started_at
            words = self._last_words()
            cause = f"writer process {p.pid} ended ({_describe(code)}) after {uptime:.1f} s" + (
                f": {words}" if words else ""
            )
            self._emit(cause)
            quick = quick + 1 if uptime < self.min_uptime else 1
            while True:
                if quick > self.max_quick_deaths:
                    self._fail(
                        f"the writer died {quick} times in a row, each within {self.min_uptime:.1f} s "
                        f"of starting; last: {cause}"
                    )
                    return
                delay = self.backoff[min(quick, len(self.backoff)) - 1]
                with self._lock:
                    self._state = "restarting"
                if self._stopping.is_set():
                    self._emit("restarting the writer for the final flush")
                else:
                    self._emit(f"restarting the writer in {delay:g} s (restart {self.restarts + 1})")
                    self._stopping.wait(delay)
                err = self._spawn()
                if err is None:
                    self.restarts += 1
                    self._emit(
                        f"writer restarted (pid {self.pid}, restart {self.restarts}); it resumes "
                        "from the file's progress marker"
                    )
                    break
                cause = err
                self._emit(f"the writer did not start again: {err}")
                quick += 1

    def _final_stop(self, p: subprocess.Popen[str]) -> None:
        try:
            code, _ = stop_process(p, timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
            self._emit(f"the writer did not finish its final flush within {self.stop_timeout:g} s; killed")
        self.exit_codes.append(code)
        words = self._last_words()
        if code != 0:
            self._fail(
                f"the writer's final flush failed ({_describe(code)})" + (f": {words}" if words else "")
            )
        else:
            with self._lock:
                self._state = "stopped"
