"""Real-time settings for the thread that runs an acquisition's loop (``Acquisition(realtime=
True)``, ``[acquisition] realtime = true``), each applied if the system permits it and reported
either way, and undone when the acquisition's run ends:

- ``sched_fifo``: the thread's scheduling policy SCHED_FIFO (priority 50 unless told), with
  SCHED_RESET_ON_FORK so that processes it starts (the writer) are not real-time. No task of
  normal priority then delays its wake-ups: on this project's 2-core machine those were the
  missed deadlines of case 6 (the writer process, the benchmark's parent, the system).
- ``timer_slack``: 1 ns instead of 50 µs (what a normal thread's sleeps may overrun by).
- ``affinity``: the thread pinned to one CPU (the last unless told), so it keeps its caches.
- ``mlockall``: the pages the process has when the run starts locked in memory (MCL_CURRENT):
  none of them is paged out and read back in the loop. Not MCL_FUTURE: with it every later
  allocation faults all its pages in at once, and the 1 kHz loop missed 243 deadlines in 5 s
  (2 to 9 without).

What a run's thread starts inherits its CPU (threads, and processes forked from it; the
writer, started before the run, does not): start worker threads before a realtime run.
Under SCHED_FIFO the precise schedule sleeps in the kernel (``_native.sleep_until``) instead
of spinning: the kernel throttles real-time tasks to 95 % of each second, and a thread
spinning towards every 1 ms deadline lost 50 ms a second to it (900 missed deadlines in 20 s
in case 6's loop); it spins only the last part of each period, as much as :class:`SpinBudget`
leaves once its own work is counted. Refused settings (no CAP_SYS_NICE, a container's limits, RLIMIT_MEMLOCK)
are reported with the reason; nothing is silently skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

__all__ = ["RealtimeSettings", "SpinBudget", "apply", "budget_for", "restore", "thread_budget"]

_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30
_MCL_CURRENT = 1


@dataclass
class RealtimeSettings:
    """What was asked for, what was applied, and what to undo."""

    priority: int = 50
    cpu: int | None = None  # None: the last CPU this process may use
    lock_memory: bool = True
    #: setting -> "applied (...)" or "refused: why"
    report: dict[str, str] = field(default_factory=dict)
    _previous: dict[str, object] = field(default_factory=dict)

    def allowed(self) -> list[int]:
        """The CPUs the thread may use: those it had before :func:`apply` pinned it."""
        prev = cast("set[int] | None", self._previous.get("affinity"))
        return sorted(prev if prev is not None else os.sched_getaffinity(0))

    @property
    def fifo(self) -> bool:
        """Whether the thread runs under SCHED_FIFO now."""
        return self.report.get("sched_fifo", "").startswith("applied")


class SpinBudget:
    """How long a SCHED_FIFO thread may spin before its next deadline, so that all it does
    (its work, measured, and its spinning) stays below the kernel's real-time throttle.

    The kernel lets real-time tasks run 95 % of each second by default (``sched_rt_runtime_us``
    of ``sched_rt_period_us``; :func:`thread_budget` reads them, :func:`budget_for`) and stops them for the rest of that second once they have: a
    1 kHz loop spinning 800 µs of each period with 180 µs of work lost 29-34 ms once a second
    (95 of 4,000 deadlines; 300 µs of work, 50 ms a second), and with the budget none. (The
    one write that "took" 17.9 ms in case 6's realtime run of 2026-12-04, 17 deadlines
    missed, has that shape.) The thread earns `share` of wall time as credit, up to `cap_ns` (a burst of
    work is paid back over the next periods); its CPU time (``CLOCK_THREAD_CPUTIME_ID``),
    whatever it spent it on, is taken off, at each call (a loop asks once a period, so the
    cap holds to within one period's earnings). Over any window of T seconds it therefore
    uses at most ``share * T + cap`` of CPU: 0.85 s + 50 ms < 0.95 s a second. `clock` and
    `cpu_clock` are injectable for tests."""

    __slots__ = ("share", "cap_ns", "_credit", "_wall", "_cpu", "_clock", "_cpu_clock")

    def __init__(
        self,
        share: float = 0.85,
        cap_ns: int = 50_000_000,
        clock: Callable[[], int] = time.perf_counter_ns,
        cpu_clock: Callable[[], int] = time.thread_time_ns,
    ) -> None:
        self.share, self.cap_ns = share, cap_ns
        self._clock, self._cpu_clock = clock, cpu_clock
        self._credit = float(cap_ns)
        self._wall, self._cpu = clock(), cpu_clock()

    def allowed(self, want_ns: int) -> int:
        """How much of `want_ns` of spinning the thread may do now (0: sleep to the deadline)."""
        wall, cpu = self._clock(), self._cpu_clock()
        earned = self.share * (wall - self._wall) - (cpu - self._cpu)
        # (a debt is forgotten beyond one cap: the kernel forgets each second's use, and a
        # long burst of work must not cost the loop its spinning for seconds after)
        self._credit = max(-float(self.cap_ns), min(float(self.cap_ns), self._credit + earned))
        self._wall, self._cpu = wall, cpu
        return max(0, min(want_ns, int(self._credit)))


_budgets = threading.local()
_RT_FILES = ("/proc/sys/kernel/sched_rt_runtime_us", "/proc/sys/kernel/sched_rt_period_us")


def budget_for(runtime_us: int, period_us: int) -> tuple[float, int]:
    """SpinBudget's (share, cap_ns) under a real-time throttle of `runtime_us` in each
    `period_us` (the kernel's ``sched_rt_runtime_us``, ``sched_rt_period_us``; runtime -1: no
    throttle). The share leaves a tenth of the period, and the cap a twentieth, so that
    share * period + cap stays a twentieth below the throttle; never more than 85 %, so that
    an unthrottled (or barely throttled) thread still leaves its CPU to the rest now and then.
    A throttle of a tenth or less: no spinning at all."""
    if period_us <= 0:
        raise ValueError(f"sched_rt_period_us must be > 0, got {period_us}")
    fraction = 1.0 if runtime_us < 0 else min(1.0, runtime_us / period_us)
    share = max(0.0, min(0.85, fraction - 0.10))
    return share, int(min(50_000_000, 0.05 * period_us * 1_000))


def kernel_budget() -> tuple[float, int]:
    """`budget_for` this kernel's throttle; the default's (95 % of 1 s) if it cannot be read."""
    try:
        runtime, period = (int(Path(f).read_text()) for f in _RT_FILES)
    except (OSError, ValueError):
        runtime, period = 950_000, 1_000_000
    return budget_for(runtime, period)


def thread_budget() -> SpinBudget:
    """The calling thread's SpinBudget, kept across runs (a detector's short runs one after
    another must not each start with a full credit): its CPU clock is this thread's; its
    share and cap follow this kernel's real-time throttle (`kernel_budget`)."""
    b: SpinBudget | None = getattr(_budgets, "budget", None)
    if b is None:
        share, cap_ns = kernel_budget()
        b = _budgets.budget = SpinBudget(share=share, cap_ns=cap_ns)
    return b


def _locked_kb() -> int:
    """Memory this process has locked (VmLck, KiB; 0 if unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def apply(s: RealtimeSettings) -> RealtimeSettings:
    """Applies the settings to the calling thread (and, for mlockall, its process)."""
    if not sys.platform.startswith("linux"):
        for key in ("sched_fifo", "timer_slack", "affinity", "mlockall"):
            s.report[key] = f"refused: not supported on {sys.platform}"
        return s
    libc = _libc()
    try:
        s._previous["sched"] = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
        lo, hi = os.sched_get_priority_min(os.SCHED_FIFO), os.sched_get_priority_max(os.SCHED_FIFO)
        prio = min(max(s.priority, lo), hi)
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(prio))
        s.report["sched_fifo"] = f"applied (priority {prio})"
    except OSError as e:
        s._previous.pop("sched", None)
        s.report["sched_fifo"] = f"refused: {e.strerror or e} (needs CAP_SYS_NICE or an RLIMIT_RTPRIO)"
    if libc is not None:
        old = libc.prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0)
        if libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0:
            s._previous["slack"] = old
            s.report["timer_slack"] = "applied (1 ns)"
        else:
            s.report["timer_slack"] = f"refused: {os.strerror(ctypes.get_errno())}"
    else:
        s.report["timer_slack"] = "refused: libc not found"
    try:
        allowed = sorted(os.sched_getaffinity(0))
        cpu = allowed[-1] if s.cpu is None else s.cpu
        if cpu not in allowed:
            raise OSError(0, f"CPU {cpu} is not one this process may use ({allowed})")
        s._previous["affinity"] = set(allowed)
        os.sched_setaffinity(0, {cpu})
        s.report["affinity"] = f"applied (CPU {cpu})"
    except OSError as e:
        s._previous.pop("affinity", None)
        s.report["affinity"] = f"refused: {e.strerror or e}"
    if not s.lock_memory:
        s.report["mlockall"] = "not asked for"
    elif _locked_kb() > 0:
        # (somebody locked memory already: this process, or another realtime acquisition in
        # it; leave it to them, and do not unlock theirs at the end)
        s.report["mlockall"] = "not applied: this process has locked memory already"
    elif libc is None:
        s.report["mlockall"] = "refused: libc not found"
    elif libc.mlockall(_MCL_CURRENT) == 0:
        s._previous["mlock"] = True
        s.report["mlockall"] = "applied"
    else:
        err = ctypes.get_errno()
        s.report["mlockall"] = f"refused: {os.strerror(err)} (RLIMIT_MEMLOCK, or CAP_IPC_LOCK)"
    return s


def restore(s: RealtimeSettings) -> None:
    """Undoes what :func:`apply` applied (the report stays)."""
    prev = s._previous
    if "sched" in prev:
        policy, prio = cast("tuple[int, int]", prev.pop("sched"))
        try:
            try:
                os.sched_setscheduler(0, policy, os.sched_param(prio))
            except PermissionError:
                # A user allowed SCHED_FIFO by RLIMIT_RTPRIO alone may not clear the
                # RESET_ON_FORK flag: keep it, or the thread would stay real-time.
                os.sched_setscheduler(0, policy | os.SCHED_RESET_ON_FORK, os.sched_param(prio))
        except OSError as e:
            s.report["sched_fifo"] += f"; not undone: {e.strerror or e}"
    libc = _libc()
    if "slack" in prev and libc is not None:
        libc.prctl(_PR_SET_TIMERSLACK, cast(int, prev.pop("slack")), 0, 0, 0)
    if "affinity" in prev:
        try:
            os.sched_setaffinity(0, cast("set[int]", prev.pop("affinity")))
        except OSError as e:
            s.report["affinity"] += f"; not undone: {e.strerror or e}"
    if prev.pop("mlock", False) and libc is not None:
        libc.munlockall()
