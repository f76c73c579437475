"""The README's examples run as written (and leave no ring behind)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code: str) -> None:
    names = re.findall(r'RingBuffer\.create\("([^"/]+)"', code)
    assert names, "each example creates a ring by bare name"
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        for name in names:
            path = f"/dev/shm/{name}"
            if os.path.exists(path):
                os.unlink(path)


def test_readme_has_both_examples() -> None:
    assert len(BLOCKS) >= 2


def test_readme_config_example_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    (toml,) = re.findall(r"```toml\n(.*?)```", README, re.S)
    ring = f"rdaq-readme-{os.getpid()}"
    toml = toml.replace("duration = 60", "duration = 1").replace('path = "lab"', f'path = "{ring}"')
    toml = toml.replace('output = "run.h5"', f'output = "{tmp_path / "run.h5"}"')
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "rust_daq.cli", "run", str(cfg), "--no-progress"],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        assert "│ voltmeter │" in r.stdout and "│ camera" in r.stdout
        assert (tmp_path / "run.h5").exists()
    finally:
        if os.path.exists(f"/dev/shm/{ring}"):
            os.unlink(f"/dev/shm/{ring}")
