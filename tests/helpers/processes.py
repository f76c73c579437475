"""Helper scripts of this directory started as real processes by the cross-process tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
