"""Shared fixtures: ring paths in /dev/shm that are removed afterwards, and self-checking
payloads (index + CRC) for tests that must detect torn or reordered records."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "helpers"))

from payloads import check_payload, make_payload  # noqa: E402

__all__ = ["check_payload", "make_payload"]


def _shm_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--torture-seconds",
        type=float,
        default=float(os.environ.get("RDAQ_TORTURE_SECONDS", "20")),
        help="duration of the reliability torture run (CI: 20 s; a soak: 600)",
    )


@pytest.fixture
def torture_seconds(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--torture-seconds"))


@pytest.fixture
def ring_path() -> Iterator[str]:
    """A fresh path for a ring file; removed (with any leftover temp files) after the test."""
    path = _shm_dir() / f"rdaq-test-{uuid.uuid4().hex[:12]}"
    yield str(path)
    for p in path.parent.glob(f"*{path.name}*"):
        p.unlink(missing_ok=True)
