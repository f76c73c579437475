"""Helper scripts of this directory started as real processes by the cross-process tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

HELPERS = Path(__file__).parent


def spawn(script: str, *args: object) -> subprocess.Popen[str]:
    """`python HELPERS/script args...`, with text pipes for stdout and stderr."""
    return subprocess.Popen(
        [sys.executable, str(HELPERS / script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HELPERS,
    )


def writer_process(
    ring: str, output: object, *args: str, flush_interval: float | None = None, **popen: Any
) -> subprocess.Popen[str]:
    """``python -m rust_daq.writer --ring RING --output OUTPUT [args]``, once it said "ready"
    (its file is open); fails with the writer's own error when it does not start."""
    cmd = [sys.executable, "-m", "rust_daq.writer", "--ring", ring, "--output", str(output), *args]
    if flush_interval is not None:
        cmd += ["--flush-interval", str(flush_interval)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise AssertionError(f"the writer did not start: {p.communicate()[1]}")
    return p
