"""What every case shares: repetitions and medians, the machine's description, scratch paths."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20


def median_rate(fn: Callable[[int], None], n: int, reps: int) -> float:
    """Median over ``reps`` runs of n / seconds for fn(n), after one warm-up run of n // 10."""
    fn(max(n // 10, 1))  # page faults, caches, branch predictors
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(n)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def shm_path(tag: str) -> str:
    """A fresh path for a ring file in /dev/shm (or the temporary directory)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"rdaq-bench-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def storage_dir() -> str:
    """Where the storage cases write files: RDAQ_BENCH_DIR, else /dev/shm. tmpfs measures the
    software path; on this shared machine disk writeback made repeated writes of the same
    150 MB vary 5x. Set RDAQ_BENCH_DIR to a disk directory to include the disk."""
    env = os.environ.get("RDAQ_BENCH_DIR")
    if env:
        return env
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def scratch_dir(base: str) -> str:
    """A new directory in `base`, removed by the caller."""
    return tempfile.mkdtemp(prefix="rdaq-bench-", dir=base)


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def fmt_rate(v: float) -> str:
    if v != v:  # NaN: not measured
        return "n/a"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{v:.0f}"


@dataclass
class Table:
    """One table of a case's results, rendered as markdown for the terminal and the report."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(self.header) - 1)) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines.append("")
            lines += self.notes
        return "\n".join(lines)


@dataclass
class Goal:
    """A target from the issue: met or not, and by how much it is missed."""

    case: str
    text: str
    measured: float
    target: float
    unit: str
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        if self.measured != self.measured:
            return False
        return self.measured >= self.target if self.higher_is_better else self.measured <= self.target

    def line(self) -> str:
        m = f"{self.measured:.3g}{self.unit}"
        if self.met:
            return f"{self.case}: {self.text}: {m} (met)"
        if self.measured != self.measured:
            return f"{self.case}: {self.text}: not measured (MISSED)"
        if self.higher_is_better:
            by = f"{self.target / self.measured:.2f}x short"
        else:
            by = f"{self.measured / self.target:.2f}x over"
        return f"{self.case}: {self.text}: {m} (MISSED, {by})"
