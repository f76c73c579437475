"""Shared fixtures: ring paths in /dev/shm that are removed afterwards, self-checking payloads
(index + CRC) for tests that must detect torn or reordered records, and real nats-server
processes (one node, a 3-node JetStream cluster, a factory, TLS files) for the JetStream tests."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "helpers"))

from nats_servers import NatsCluster, NatsServer, make_tls  # noqa: E402
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


@pytest.fixture(autouse=True)
def _no_daemon_ring_left() -> Iterator[None]:
    """The rings `test_daemon.config()` names (its daemons do not own them, and a daemon a test
    kills cannot remove what it owns): removed after every test that may have used one, in
    whichever module (test_flight_process and test_daemon_security use that config too)."""
    yield
    for p in Path("/dev/shm").glob("rdaq-test-daemon-*"):
        p.unlink(missing_ok=True)


# -- real nats-server processes (tests/helpers/nats_servers.py) ------------------------------
# Each fixture stops the servers it started and removes their temporary directories, whatever the
# test did; a test that needs nats-server is skipped where it is not installed (failed on CI).


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """One JetStream node on 127.0.0.1 (``.url``), stopped and removed after the test."""
    server = NatsServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """Three routed JetStream nodes with a meta leader (``.urls``, ``.kill(i)``, ``.restart(i)``)."""
    cluster = NatsCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def nats_server_factory() -> Iterator[Callable[..., NatsServer]]:
    """``make(start=True, **options)`` -> a NatsServer with those options (see its signature);
    every server made is stopped and removed after the test."""
    servers: list[NatsServer] = []

    def make(*, start: bool = True, **options: Any) -> NatsServer:
        server = NatsServer(**options)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in reversed(servers):
            server.close()


@pytest.fixture
def nats_tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``(ca, cert, key)``: a throwaway CA and a server certificate for 127.0.0.1/localhost."""
    return make_tls(tmp_path / "tls")
