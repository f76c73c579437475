"""JetStream's promise, tried for real: a producer at 1,000 rows/s plus a camera, the publisher
(``rust-daq publish``) and the writer (``rust-daq write --from nats://``) as processes, real
nats-servers (one node, and a 3-node cluster with replicas 3). Every row must be in the file
exactly once after SIGKILLs of both at random moments, a server restart, the loss of a
cluster node, and a 10 s outage; the file must hold what a local writer writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from rust_daq import RingBuffer
from rust_daq.hdf5.progress import read_progress

from processes import HELPERS

CLI = [sys.executable, "-m", "rust_daq.cli"]


@pytest.fixture
def ring() -> Iterator[str]:
    path = f"/dev/shm/rdaq-nats-{uuid.uuid4().hex[:10]}"
    RingBuffer.create(path, capacity_mb=128).close()
    yield path
    Path(path).unlink(missing_ok=True)


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A CLI process (stdout to `log`, appended), once it printed "ready"."""
    with open(log, "a") as out:  # (the child keeps its own descriptor)
        p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=out, text=True, env=env)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        rest = p.communicate()[0]
        raise AssertionError(
            f"{args[0]} did not start (exit {p.returncode}, {line!r} {rest!r}): {log.read_text()[-2000:]}"
        )
    return p


def publisher(ring: str, url: str, log: Path, *extra: str) -> subprocess.Popen[str]:
    args = ["publish", "--ring", ring, "--nats", url, "--host-name", "h1", *extra]
    return start(args, log.with_name("publisher.log"))


def writer(url: str, output: Path, log: Path) -> subprocess.Popen[str]:
    args = ["write", "--from", url, "--output", str(output), "--flush-interval", "0.2"]
    return start(args, log.with_name("writer.log"))


def stop(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p.stdout is not None:
        p.stdout.close()


def kill(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.wait()
    if p.stdout is not None:
        p.stdout.close()


def producer(ring: str, seconds: float, fps: float = 5.0) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, str(HELPERS / "nats_producer.py"), ring, str(seconds), "1000", str(fps)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "started"
    return p


def produced(p: subprocess.Popen[str]) -> tuple[int, int]:
    out, _ = p.communicate(timeout=120)
    _, rows, frames = out.split()
    return int(rows), int(frames)


def wait_rows(output: Path, want: dict[str, int], timeout: float = 90) -> None:
    """Until the file's committed books hold `want` rows per stream."""
    deadline = time.monotonic() + timeout
    have: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            have = {n: s.rows for n, s in read_progress(output).streams.items()}
        except (OSError, ValueError):
            pass
        if all(have.get(n, 0) >= r for n, r in want.items()):
            return
        time.sleep(0.2)
    raise AssertionError(f"the file holds {have}, expected {want}")


def check_file(output: Path, rows: int, frames: int, host: str = "h1") -> None:
    """Every row exactly once, in order, with its values; every frame whole."""
    with h5py.File(output, "r", libver="latest", swmr=True) as f:
        volt = f[f"measurements/{host}.volt"]
        i = volt["i"][()]
        np.testing.assert_array_equal(i, np.arange(rows, dtype=np.int64))
        v, valid = volt["v"][()], volt["v__valid"][()].astype(bool)
        np.testing.assert_array_equal(valid, np.arange(rows) % 13 != 0)
        np.testing.assert_allclose(v[valid], np.sin(np.arange(rows)[valid] * 1e-3))
        cam = f[f"measurements/{host}.cam"]
        np.testing.assert_array_equal(cam["k"][()], np.arange(frames))
        assert cam["frame"].shape == (frames, 256, 256) and cam["frame"].dtype == np.uint16
        for k in range(frames):
            assert (cam["frame"][k] == k).all(), f"frame {k} is not whole"
    books = read_progress(output).streams
    assert books[f"{host}.volt"].lost == 0 and books[f"{host}.cam"].lost == 0


def kill_at_random(
    rng: random.Random,
    procs: dict[str, subprocess.Popen[str]],
    restart: dict[str, Any],
    kills: dict[str, int],
) -> None:
    """SIGKILLs one of the processes that still has kills to take, and starts it again."""
    name = rng.choice([n for n, k in kills.items() if k > 0])
    kills[name] -= 1
    kill(procs[name])
    procs[name] = restart[name]()


@pytest.mark.timeout(240)
def test_every_row_once_through_kills_and_a_server_restart(
    nats_server: Any, ring: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("RDAQ_NATS_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (RDAQ_NATS_SEED reproduces the kill moments)")
    rng = random.Random(seed)
    url, out, log = nats_server.url, tmp_path / "run.h5", tmp_path / "procs.log"
    prod = producer(ring, 16)
    restart = {
        "publisher": lambda: publisher(ring, url, log),
        "writer": lambda: writer(url + "/rdaq", out, log),
    }
    procs = {"publisher": restart["publisher"](), "writer": restart["writer"]()}
    kills = {"publisher": 5, "writer": 5}
    try:
        restarted = False
        while any(kills.values()):
            time.sleep(rng.uniform(0.3, 1.5))
            kill_at_random(rng, procs, restart, kills)
            if not restarted and sum(kills.values()) == 5:
                nats_server.restart()  # one server restart, with both clients connected
                restarted = True
        rows, frames = produced(prod)
        wait_rows(out, {"h1.volt": rows, "h1.cam": frames})
    finally:
        for p in procs.values():
            stop(p)
        if prod.poll() is None:
            prod.kill()
    assert rows >= 10_000 and frames >= 50
    check_file(out, rows, frames)


@pytest.mark.timeout(240)
def test_every_row_once_when_a_cluster_node_dies(nats_cluster: Any, ring: str, tmp_path: Path) -> None:
    url, out, log = nats_cluster.url, tmp_path / "run.h5", tmp_path / "procs.log"
    prod = producer(ring, 10)
    pub = publisher(ring, url, log, "--replicas", "3")
    w = writer(url + "/rdaq", out, log)
    try:
        time.sleep(3)
        # The stream's leader if it is known, else the first node: the harder case.
        nats_cluster.kill(0)
        time.sleep(2)
        kill(w)  # and the writer, so that it starts again on the two nodes left
        w = writer(url + "/rdaq", out, log)
        rows, frames = produced(prod)
        wait_rows(out, {"h1.volt": rows, "h1.cam": frames}, timeout=120)
    finally:
        stop(pub)
        stop(w)
        if prod.poll() is None:
            prod.kill()
    check_file(out, rows, frames)


@pytest.mark.timeout(240)
def test_an_outage_of_10_s_loses_nothing_the_ring_holds(nats_server: Any, ring: str, tmp_path: Path) -> None:
    url, out, log = nats_server.url, tmp_path / "run.h5", tmp_path / "procs.log"
    prod = producer(ring, 16)
    pub = publisher(ring, url, log)
    w = writer(url + "/rdaq", out, log)
    try:
        time.sleep(2)
        nats_server.stop()
        time.sleep(10)  # the producer goes on; the publisher keeps its place in the ring
        nats_server.start()
        rows, frames = produced(prod)
        wait_rows(out, {"h1.volt": rows, "h1.cam": frames}, timeout=120)
    finally:
        stop(pub)
        stop(w)
        if prod.poll() is None:
            prod.kill()
    check_file(out, rows, frames)
    assert "does not answer" in log.with_name("publisher.log").read_text()


@pytest.mark.timeout(180)
def test_three_publishers_into_one_file(nats_server: Any, tmp_path: Path) -> None:
    url, out, log = nats_server.url, tmp_path / "run.h5", tmp_path / "procs.log"
    rings = [f"/dev/shm/rdaq-nats-{uuid.uuid4().hex[:10]}" for _ in range(3)]
    procs: list[subprocess.Popen[str]] = []
    try:
        for r in rings:
            RingBuffer.create(r, capacity_mb=32).close()
        prods = [producer(r, 4, fps=2) for r in rings]
        procs += [
            start(["publish", "--ring", r, "--nats", url, "--host-name", f"acq{i}"], log)
            for i, r in enumerate(rings)
        ]
        procs.append(writer(url + "/rdaq", out, log))
        done = [produced(p) for p in prods]
        wait_rows(
            out,
            {
                f"acq{i}.{s}": n
                for i, (rows, frames) in enumerate(done)
                for s, n in (("volt", rows), ("cam", frames))
            },
        )
    finally:
        for p in procs:
            stop(p)
        for r in rings:
            Path(r).unlink(missing_ok=True)
    for i, (rows, frames) in enumerate(done):
        check_file(out, rows, frames, host=f"acq{i}")
    with h5py.File(out, "r", libver="latest", swmr=True) as f:
        assert sorted(f["measurements"]) == sorted(
            [f"acq{i}.{s}" for i in range(3) for s in ("volt", "cam")]
            + ["end_time", "metadata", "start_time"]
        )


@pytest.mark.timeout(180)
def test_a_run_whose_publisher_the_ring_laps_counts_exactly_what_was_lost(
    nats_server: Any, tmp_path: Path
) -> None:
    """A run's [nats] publisher (with the run's RowIndex), a 2 MiB ring, the server away for
    4 s: the ring overwrites what the publisher had not sent. Downstream, every reader and
    the JetStream writer's file count the records lost exactly, and the rows too: what they
    hold plus what they lost is what the run acquired, stream by stream."""
    import threading

    from rust_daq.config import load_config
    from rust_daq.nats import connect
    from rust_daq.runner import run_session

    local = tmp_path / "local.h5"
    config = tmp_path / "run.toml"
    config.write_text(
        f"""
duration = 7
[ring]
capacity_mb = 2
[writer]
output = "{local}"
flush_interval = 0.05
[nats]
url = "{nats_server.url}"
prefix = "lapped"
host_name = "acq"
[[instruments]]
type = "voltmeter"
name = "volt"
rate_hz = 2000
[[instruments]]
type = "camera"
name = "cam"
fps = 20
shape = [128, 256]
"""
    )
    outage = threading.Timer(1.5, nats_server.stop)
    back = threading.Timer(5.5, nats_server.start)
    outage.start()
    back.start()
    try:
        stats = run_session(load_config(config))
    finally:
        outage.cancel()
        back.join()
    acquired = {name: s["rows"] for name, s in stats["streams"].items()}
    assert stats["published"]["lost_records"] > 0, (
        "the ring did not lap the publisher: the test proves nothing"
    )
    with connect(nats_server.url + "/lapped") as daq, daq.reader(start="oldest") as reader:
        got: dict[str, int] = {}
        seen: dict[str, list[int]] = {}
        while batches := reader.read(timeout=2.0):
            for b in batches:
                got[b.stream] = got.get(b.stream, 0) + b.batch.num_rows
                seen.setdefault(b.stream, []).append(b.stream_seq)
        lost = reader.lost_by_stream()
    for name, rows in acquired.items():
        records, lost_rows = lost.get(f"acq.{name}", (0, 0))
        assert lost_rows is not None, f"{name}: the run's publisher knows the rows it lost"
        assert got[f"acq.{name}"] + lost_rows == rows, (name, got, lost, acquired)
        seqs = seen[f"acq.{name}"]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert len(seqs) + records == seqs[-1] + 1, "records received plus lost are all the stream's"
    total_lost = sum(r for r, _ in lost.values())
    assert total_lost == stats["published"]["lost_records"]
    # The writer from JetStream: the same rows, the same records lost, in its books.
    out = tmp_path / "remote.h5"
    w = start(["write", "--from", nats_server.url + "/lapped", "--output", str(out)], tmp_path / "writer.log")
    try:
        wait_rows(out, {f"acq.{n}": got[f"acq.{n}"] for n in acquired})
    finally:
        stop(w)
    books = read_progress(out).streams
    for name in acquired:
        assert books[f"acq.{name}"].rows == got[f"acq.{name}"]
        assert books[f"acq.{name}"].lost == lost[f"acq.{name}"][0]


@pytest.mark.timeout(180)
def test_store_and_forward_through_a_leaf_node(nats_server_factory: Any, ring: str, tmp_path: Path) -> None:
    """The topology of docs/distributed.md: the acquisition host runs its own nats-server, a
    leaf node of the central server with a JetStream domain of its own; the publisher writes
    to it (always reachable), the storage host's writer reads it through the central server
    (``?domain=acq1``). The central server away for 5 s: nothing lost, nothing twice."""
    hub = nats_server_factory(
        jetstream=False,
        leafnodes=True,
        extra_config=f"jetstream {{ store_dir: '{tmp_path / 'hub'}', domain: hub }}",
    )
    leaf = nats_server_factory(
        jetstream=False,
        leafnode_remotes=[hub.leafnode_url],
        extra_config=f"jetstream {{ store_dir: '{tmp_path / 'leaf'}', domain: acq1 }}",
    )
    log, out = tmp_path / "procs.log", tmp_path / "run.h5"
    prod = producer(ring, 12)
    pub = publisher(ring, leaf.url, log)
    w = None
    try:
        deadline = time.monotonic() + 30  # (the leaf link comes up within a second or two)
        while w is None:
            try:
                w = writer(hub.url + "/rdaq?domain=acq1", out, log)
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        time.sleep(2)
        hub.stop()  # the storage host's side of the network goes away
        time.sleep(5)
        hub.start()
        rows, frames = produced(prod)
        wait_rows(out, {"h1.volt": rows, "h1.cam": frames}, timeout=120)
    finally:
        stop(pub)
        if w is not None:
            stop(w)
        if prod.poll() is None:
            prod.kill()
    check_file(out, rows, frames)
