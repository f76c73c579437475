"""The README's examples run as written (and leave no ring behind)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
ALL_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BLOCKS = [b for b in ALL_BLOCKS if "rust_daq.remote" not in b and "rust_daq.nats" not in b]
(REMOTE,) = [b for b in ALL_BLOCKS if "rust_daq.remote" in b]
(JETSTREAM,) = [b for b in ALL_BLOCKS if "rust_daq.nats" in b]


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


def test_readme_remote_example_runs_against_a_daemon(tmp_path: Path) -> None:
    """The "Across machines" block, against `rust-daq daemon` (the demo's instruments) on
    loopback instead of daq-host, recording into its data directory (tmp_path)."""
    import subprocess
    import sys
    import time

    import h5py

    import rust_daq.remote

    with subprocess.Popen(
        [sys.executable, "-m", "rust_daq.cli", "daemon", "--port", "0", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as p:
        try:
            assert p.stdout is not None
            url = p.stdout.readline().split()[-1]
            assert url.startswith("grpc://127.0.0.1:"), p.stderr.read() if p.stderr else url
            with rust_daq.remote.connect(url) as daq:
                deadline = time.monotonic() + 30
                while len(daq.streams()) < 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            out = tmp_path / "run42.h5"
            code = REMOTE.replace("grpc://daq-host:8815", url)
            env: dict[str, object] = {}
            exec(compile(code, "README.md", "exec"), env)
            assert len(env["volts"]["voltage"]) > 0  # type: ignore[index]
            assert env["frames"].num_rows > 0  # type: ignore[attr-defined]
            with h5py.File(out, "r") as f:
                assert "measurements/voltmeter/voltage" in f
        finally:
            p.terminate()
            p.communicate(timeout=60)
    assert p.returncode == 0


def test_readme_jetstream_example_runs(nats_server: object, tmp_path: Path) -> None:
    """The JetStream block, against a real nats-server on loopback instead of nats-host, after
    a publisher (host acq1) sent a voltmeter's batches."""
    import asyncio
    import contextlib
    import io
    import uuid

    import numpy as np
    import pyarrow as pa

    from rust_daq import RingBuffer
    from rust_daq.nats.publisher import Publisher

    url = nats_server.url  # type: ignore[attr-defined]
    path = f"/dev/shm/rdaq-readme-{uuid.uuid4().hex[:8]}"
    try:
        with RingBuffer.create(path, capacity_mb=8) as ring:
            for k in range(5):
                ring.write_arrow_batch(pa.record_batch({"voltage": np.full(100, float(k))}), "voltmeter")

            async def publish() -> None:
                stop = asyncio.Event()
                p = Publisher(ring, url, host="acq1")
                task = asyncio.create_task(p.run(stop))
                while p.stats.next_seq < 5:  # noqa: ASYNC110 (a counter)
                    await asyncio.sleep(0.02)
                stop.set()
                await task

            asyncio.run(publish())
    finally:
        os.unlink(path)
    env: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(JETSTREAM.replace("nats://nats-host:4222", url), "README.md", "exec"), env)
    assert env["table"].num_rows == 500  # type: ignore[attr-defined]
    assert "500 0 0" in printed.getvalue()
