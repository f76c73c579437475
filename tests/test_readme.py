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
