"""The daemon's Flight service runs in a process of its own (rust_daq.flight.process): real
daemons on loopback, a real Flight process, killed at will; the acquisition's file read back
with h5py shows the acquisition never noticed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pytest

import rust_daq.remote
from rust_daq import RingBuffer, _native
from rust_daq.remote import RemoteError
from test_daemon import CLI, _first_line, config, daemon


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # (a zombie of ours: reap it)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


def _voltmeter(batches: list[rust_daq.remote.RemoteBatch]) -> list[int]:
    return [b.stream_seq for b in batches if b.stream == "voltmeter"]


def _after_restart(
    url: str, start: str, n: int
) -> tuple[dict[str, Any], dict[str, Any], list[rust_daq.remote.RemoteBatch]]:
    """Once the Flight process serves again (within 30 s): the daemon's status, its streams
    and `n` voltmeter batches from `start`."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with rust_daq.remote.connect(url) as daq:
                status, streams = daq.status(), daq.streams()
                with daq.reader("voltmeter", start=start) as r:
                    got: list[rust_daq.remote.RemoteBatch] = []
                    while len(got) < n:
                        got += r.read(timeout=0.2)
            return status, streams, got
        except RemoteError:
            assert time.monotonic() < deadline, "the Flight process was not started again"
            time.sleep(0.2)


@pytest.mark.timeout(180)
def test_a_killed_flight_process_is_started_again_on_its_port_and_the_acquisition_never_notices(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run.h5"
    with daemon(str(config(tmp_path, output=str(out)))) as (url, p):
        with rust_daq.remote.connect(url) as daq:
            status = daq.status()
            flight = status["flight"]["pid"]
            assert flight not in (p.pid, os.getpid()) and status["flight"]["restarts"] == 0
            with daq.reader("voltmeter", start="oldest") as r:
                got: list[rust_daq.remote.RemoteBatch] = []
                while len(got) < 20:
                    got += r.read(timeout=0.2)
                seqs = _voltmeter(got)
                assert seqs == list(range(len(seqs))), "served from the Flight process, in order"
                os.kill(flight, signal.SIGKILL)
                with pytest.raises(RemoteError):  # the subscription breaks; it does not hang
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        r.read(timeout=0.2)
        # Started again, on the same URL, with the same token for this user's clients.
        status, _, again = _after_restart(url, "oldest", 20)
        assert status["flight"]["restarts"] == 1 and status["flight"]["pid"] != flight
        seqs = _voltmeter(again)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # The acquisition and its recording went on throughout: every voltmeter row, none lost.
    with h5py.File(out) as f:
        ts = f["measurements/voltmeter/timestamp"][()].view(np.int64)
        book = f["rust_daq/streams/voltmeter"][()]
    assert len(ts) > 500 and np.all(np.diff(ts) > 0)
    assert book[2] == 0, "nothing lost"


@pytest.mark.timeout(120)
def test_a_daemon_killed_leaves_no_flight_process_and_no_socket_behind(tmp_path: Path) -> None:
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("rust-daq-flight-*"))
    p = subprocess.Popen(
        [*CLI, "daemon", str(config(tmp_path)), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = _first_line(p).split()[-1]
        daq = rust_daq.remote.connect(url)
        flight = daq.status()["flight"]["pid"]
        ours = set(tmp.glob("rust-daq-flight-*")) - before
        assert len(ours) == 1 and (next(iter(ours)) / "daemon.sock").exists()
        deadline = time.monotonic() + 30
        while "voltmeter" not in daq.streams():  # (a stream exists from its first record on)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = daq.reader("voltmeter", start="oldest")
        got = []
        while not got:
            got += r.read(timeout=0.2)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        # A subscriber learns that the daemon died: an error, never the end a stop sends.
        with pytest.raises(RemoteError, match="died|cannot be reached"):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r.read(timeout=0.2)
        daq.close()
        assert _gone(flight, 30), "the Flight process outlived its daemon"
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as s:  # nobody listens on the daemon's port any more
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (past TIME_WAIT, not a listener)
            s.bind(("127.0.0.1", port))
        assert not any(d.exists() for d in ours), "the daemon's socket directory was removed"
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_a_row_table_is_shared_through_its_descriptor_only() -> None:
    t = _native.RowTable(1024)
    t.note(5, 50)
    other = _native.RowTable.from_fd(t.fd)
    assert (other.slots, other.rows_before(5), other.rows_before(4)) == (1024, 50, None)
    # Through a read-only descriptor (what the Flight process gets): read, never changed.
    ro = os.open(f"/proc/self/fd/{t.fd}", os.O_RDONLY)
    try:
        reader = _native.RowTable.from_fd(ro)
    finally:
        os.close(ro)  # (the table keeps a duplicate)
    assert (reader.writable, t.writable, reader.rows_before(5)) == (False, True, 50)
    with pytest.raises(PermissionError, match="attached read-only"):
        reader.note(6, 60)
    with pytest.raises(PermissionError, match="attached read-only"):
        reader.clear(5)
    assert (t.rows_before(5), t.rows_before(6)) == (50, None), "nothing changed"
    t.note(5 + 1024, 7)  # the same entry, another record
    assert (other.rows_before(5), other.rows_before(5 + 1024)) == (None, 7)
    t.clear(5 + 1024)
    assert other.rows_before(5 + 1024) is None
    with open(__file__, "rb") as f, pytest.raises(ValueError, match="not a row table"):
        _native.RowTable.from_fd(f.fileno())  # a file that could shrink under a mapping
    with pytest.raises(OSError):
        _native.RowTable.from_fd(1 << 20)
    with pytest.raises(ValueError):
        _native.RowTable(0)


def _fd_targets(pid: int) -> dict[int, tuple[str, int]]:
    """The process's descriptors: number -> (what it opens, its access mode)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        out[int(fd)] = (target, flags & os.O_ACCMODE)
    return out


@pytest.mark.timeout(180)
def test_a_restarted_flight_process_serves_the_daemons_ring_not_what_its_path_names_now(
    tmp_path: Path,
) -> None:
    """The ring's path is unlinked and another ring (another user's, say) put there: the Flight
    process, killed and started again, still serves the daemon's own ring, which it holds by
    descriptor; it holds the row index only read-only, and its stdout is no pipe to fill."""
    cfg = config(tmp_path)
    ring_path = "/dev/shm/" + cfg.read_text().split('path = "')[1].split('"')[0]
    with daemon(str(cfg)) as (url, p):
        with rust_daq.remote.connect(url) as daq:
            flight = daq.status()["flight"]["pid"]
        fds = _fd_targets(flight)
        rows = [mode for target, mode in fds.values() if "rust-daq-rows" in target]
        assert rows and all(mode == os.O_RDONLY for mode in rows), f"the row index, read-only only: {fds}"
        assert [t for t, _ in fds.values() if t == ring_path], "the ring, by descriptor"
        assert os.readlink(f"/proc/{flight}/fd/1") == "/dev/null"
        os.unlink(ring_path)
        decoy = RingBuffer.create(ring_path, capacity_mb=1)
        try:
            decoy.write_arrow_batch(pa.record_batch({"x": [1]}), "decoy")
            os.kill(flight, signal.SIGKILL)
            assert _gone(flight, 30)
            status, streams, got = _after_restart(url, "latest", 5)
            assert status["flight"]["restarts"] == 1
            assert set(streams) == {"voltmeter", "camera"}, "the daemon's streams, not the decoy's"
            assert all(b.batch.num_rows > 0 and "voltage" in b.batch.schema.names for b in got)
        finally:
            decoy.close()
            os.unlink(ring_path)


def test_the_daemons_socket_directory_fits_a_unix_socket_path_and_stale_ones_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rust_daq.flight import process

    base = tmp_path / "t"
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, starting = (base / f"rust-daq-flight-{n}" for n in ("stale123", "live1234", "start123"))
    for d, pid in ((stale, dead.pid), (live, os.getpid()), (starting, None)):
        d.mkdir(mode=0o700)
        (d / "daemon.sock").touch()
        if pid is not None:
            (d / "daemon.pid").write_text(f"{pid}\n")
    # A dead pid whose socket still answers (a daemon in another pid namespace): kept.
    answering = base / "rust-daq-flight-answer1"
    answering.mkdir(mode=0o700)
    (answering / "daemon.pid").write_text(f"{dead.pid}\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(answering / "daemon.sock"))
    listener.listen(1)
    try:
        made = Path(process.socket_dir())
    finally:
        listener.close()
    assert answering.exists(), "a socket that answers is a live daemon's"
    try:
        assert made.parent == base and (made / "daemon.pid").read_text() == f"{os.getpid()}\n"
        assert made.stat().st_mode & 0o777 == 0o700
        assert not stale.exists(), "a killed daemon's directory is removed"
        assert live.exists() and starting.exists(), "a live daemon's, or one without a pid yet, stays"
    finally:
        shutil.rmtree(made)
    # A TMPDIR so long that the socket's path would not fit sockaddr_un: /tmp instead.
    long = tmp_path / ("d" * 100)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    made = Path(process.socket_dir())
    try:
        assert made.parent == Path("/tmp")
        assert len(os.fsencode(process.socket_location(str(made)).split("://")[1])) <= 107
    finally:
        shutil.rmtree(made)


def test_a_transport_error_forwarded_to_a_client_does_not_say_where_the_daemon_listens() -> None:
    import pyarrow.flight as fl

    from rust_daq.flight import process
    from rust_daq.flight.protocol import INTERNAL, error_info

    # (the method alone: a server would need a daemon to forward to)
    server = types.SimpleNamespace(_hidden="/tmp/rust-daq-flight-abcdefgh/daemon.sock")

    def unreachable() -> None:
        raise fl.FlightUnavailableError(
            "failed to connect to all addresses; last error: UNKNOWN: "
            "unix:/tmp/rust-daq-flight-abcdefgh/daemon.sock: No such file or directory"
        )

    with pytest.raises(fl.FlightError) as e:
        process.ForwardingFlightServer._forwarded(server, "status", unreachable)  # type: ignore[arg-type]
    said = error_info(e.value)
    assert said.code == INTERNAL and "rust-daq-flight-" not in str(e.value) and "/tmp" not in str(e.value)
    assert said.message.startswith("status: the daemon's acquisition process did not answer (")
    assert "<the daemon's socket>" in said.message


def _threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def _scheduling(pid: int) -> dict[int, tuple[tuple[int, ...], int]]:
    """CPUs and nice of every thread of `pid` (those that exit meanwhile left out)."""
    out = {}
    for tid in _threads(pid):
        try:
            out[tid] = (tuple(sorted(os.sched_getaffinity(tid))), os.getpriority(os.PRIO_PROCESS, tid))
        except (ProcessLookupError, FileNotFoundError):
            pass
    return out


_NICE = max(10, os.getpriority(os.PRIO_PROCESS, 0))  # (the Flight process's: 10, or ours if higher)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("instruments", [True, False], ids=["a 500 Hz loop", "no acquisition"])
def test_the_flight_process_runs_niced_and_off_the_cpu_the_loop_keeps_busy(
    tmp_path: Path, instruments: bool
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    # The daemon's voltmeter (500 Hz) spins to its deadlines on the last CPU: the Flight
    # process keeps off it. Without an acquisition it may use every CPU.
    expected = allowed[:-1] if instruments and len(allowed) > 1 else allowed
    with daemon(str(config(tmp_path, instruments=instruments)), streams=2 if instruments else 0) as (url, p):
        with rust_daq.remote.connect(url) as daq:
            flight = daq.status()["flight"]
        assert flight["cpus"] == expected
        pid = flight["pid"]
        # Every thread of it, gRPC's and pyarrow's included (started by its imports).
        threads = _scheduling(pid)
        assert len(threads) > 1
        assert set(threads.values()) == {(tuple(expected), _NICE)}, threads
        # The daemon's own threads are left as they were.
        assert {n for _, n in _scheduling(p.pid).values()} == {os.getpriority(os.PRIO_PROCESS, 0)}
        # Started again after a crash: the same.
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with rust_daq.remote.connect(url) as daq:
                    again = daq.status()["flight"]
                if again["pid"] != pid:
                    break
            except RemoteError:
                pass
            assert time.monotonic() < deadline, "the Flight process was not started again"
            time.sleep(0.2)
        assert again["cpus"] == expected
        assert set(_scheduling(again["pid"]).values()) == {(tuple(expected), _NICE)}


@pytest.mark.timeout(120)
def test_a_flight_process_started_again_from_a_thread_on_the_loops_cpu_keeps_off_it(ring_path: str) -> None:
    from rust_daq.adapters import SimulatedVoltmeter
    from rust_daq.cli import Session
    from rust_daq.daemon import Daemon

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("one CPU: the loop keeps none to itself")
    session = Session(
        instruments=[SimulatedVoltmeter(rate_hz=1000)], ring_path=ring_path, capacity_mb=8, output=None
    )
    d = Daemon(session, host="127.0.0.1", port=0, own_ring=True)
    try:
        assert d.flight_cpus() == allowed[:-1]
        seen: list[list[int]] = []

        def on_the_loops_cpu() -> None:  # (as a worker thread of a pinned real-time loop is)
            os.sched_setaffinity(0, {allowed[-1]})
            seen.append(d.flight_cpus())
            d.flight.proc.kill()
            d.flight.proc.wait()
            d.flight.restart()

        t = threading.Thread(target=on_the_loops_cpu)
        t.start()
        t.join()
        assert seen == [allowed[:-1]], "the same CPUs from a pinned thread"
        assert d.flight.restarts == 1
        assert set(_scheduling(d.flight.pid).values()) == {(tuple(allowed[:-1]), _NICE)}
        assert d.status()["flight"]["cpus"] == allowed[:-1]
    finally:
        d.close()
