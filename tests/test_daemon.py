"""The headless daemon over Arrow Flight, with real processes on loopback: the daemon, remote
writers and subscribers are what users run; files are read back with h5py."""

from __future__ import annotations

import glob
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pytest

import rust_daq.remote
from rust_daq import UnknownStreamError
from rust_daq._access import local_token, token_dirs
from rust_daq.flight import ticket
from rust_daq.remote import RemoteError

CLI = [sys.executable, "-m", "rust_daq.cli"]


def _first_line(p: subprocess.Popen[str], timeout: float = 30) -> str:
    """The process's first line of stdout, or a failure with its stderr."""
    assert p.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        p.kill()
        pytest.fail(f"no output within {timeout} s: {p.communicate()[1]}")
    line = p.stdout.readline().strip()
    if not line:
        pytest.fail(f"exited with {p.wait()}: {p.communicate()[1]}")
    return line


def stock_client(url: str) -> tuple[fl.FlightClient, fl.FlightCallOptions]:
    """A plain pyarrow Flight client of a loopback daemon started without a token, and the
    call options carrying the token the daemon wrote for this user."""
    token = local_token(url)
    assert token, f"no token file for {url}"
    return fl.connect(url), fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def token_files(url: str) -> list[Path]:
    port = url.rsplit(":", 1)[-1]
    return [d / f"daemon-{port}.token" for d in token_dirs() if (d / f"daemon-{port}.token").exists()]


def _wait_for_streams(url: str, token: str | None, args: tuple[str, ...], streams: int) -> None:
    """Streams appear with their first record: wait for the voltmeter's and the camera's."""
    tls = args[args.index("--tls-cert") + 1] if "--tls-cert" in args else None
    with rust_daq.remote.connect(url, token=token, tls_root_certs=tls) as daq:
        deadline = time.monotonic() + 30
        while len(daq.streams()) < streams:
            assert time.monotonic() < deadline, "the daemon's streams did not appear"
            time.sleep(0.05)


@contextmanager
def daemon(
    *args: str, env: dict[str, str] | None = None, streams: int = 2
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`rust-daq daemon ARGS --port 0` until the block ends (once its `streams` instruments'
    streams exist); then SIGTERM, which must end it with exit 0 and its ring removed (when it
    named the ring itself)."""
    p = subprocess.Popen(
        [*CLI, "daemon", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        line = _first_line(p)
        assert line.startswith("listening on grpc"), line
        url = line.split()[-1]
        _wait_for_streams(
            url.replace("0.0.0.0", "127.0.0.1"), (env or {}).get("RUST_DAQ_TOKEN"), args, streams
        )
        yield url, p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert not token_files(url), "the daemon removed its token file"
    assert not glob.glob(f"/dev/shm/rust-daq-daemon-{p.pid}-*")


def config(
    tmp_path: Path,
    *,
    output: str | None = None,
    capacity_mb: float = 16,
    fps: float = 20,
    instruments: bool = True,
) -> Path:
    ring = f"rdaq-test-daemon-{uuid.uuid4().hex[:8]}"
    writer = (
        f'[writer]\noutput = "{output}"\nflush_interval = 0.2\n' if output else "[writer]\nenabled = false\n"
    )
    specs = textwrap.dedent(
        f"""
        [[instruments]]
        type = "voltmeter"
        rate_hz = 500
        [[instruments]]
        type = "camera"
        fps = {fps}
        shape = [64, 64]
        """
    )
    path = tmp_path / "daemon.toml"
    path.write_text(
        f'[ring]\npath = "{ring}"\ncapacity_mb = {capacity_mb}\n{writer}{specs if instruments else ""}'
    )
    return path


def _start_s(path: Path) -> float:
    import datetime as dt

    with h5py.File(path, "r") as f:
        return dt.datetime.fromisoformat(f["measurements/start_time"][()].decode()).timestamp()


def datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        for stream, group in f["measurements"].items():
            if isinstance(group, h5py.Group) and stream != "metadata":
                for col, ds in group.items():
                    out[f"{stream}/{col}"] = ds[()]
        for stream, book in f["rust_daq/streams"].items():
            out[f"book/{stream}"] = book[()]
    return out


def test_remote_writer_matches_the_local_writer_with_two_subscribers_at_once(tmp_path: Path) -> None:
    local, remote = tmp_path / "local.h5", tmp_path / "remote.h5"
    with daemon(str(config(tmp_path, output=str(local)))) as (url, _):
        w = subprocess.Popen(
            [*CLI, "write", "--from", url, "--output", str(remote), "--flush-interval", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert _first_line(w) == "ready"
        daq = rust_daq.remote.connect(url)
        got: dict[str, list[rust_daq.remote.RemoteBatch]] = {"latest": [], "oldest": []}
        with daq.reader(start="latest") as r1, daq.reader("voltmeter", start="oldest") as r2:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3:
                got["latest"] += r1.read(timeout=0.1)
                got["oldest"] += r2.read(timeout=0.1)
            assert r1.lost_records == r2.lost_records == 0
            status = daq.status()
        daq.close()
    _, err = w.communicate(timeout=60)
    assert w.returncode == 0, err  # the remote writer ends when the daemon's streams end
    a, b = datasets(local), datasets(remote)
    assert a.keys() == b.keys()
    assert {"voltmeter/voltage", "camera/frame", "book/voltmeter"} <= a.keys()
    for key in a:
        if key.endswith("arrow_schema"):
            continue
        if key.endswith("/time"):  # seconds since each file's own start_time: from timestamps equal below
            start_a, start_b = _start_s(local), _start_s(remote)
            np.testing.assert_allclose(a[key] + start_a, b[key] + start_b, atol=1e-5, err_msg=key)
            continue
        assert np.array_equal(a[key], b[key]), key
    assert a["voltmeter/voltage"].shape[0] > 500 and a["camera/frame"].shape[1:] == (64, 64)
    assert a["book/voltmeter"][2] == 0 and a["book/camera"][2] == 0, "nothing lost"
    assert np.all(np.diff(a["camera/frame_id"]) == 1)
    # Both subscribers got exactly the file's rows, in order, over what they saw.
    for name, batches in got.items():
        ts = np.concatenate(
            [b.batch.column("timestamp").to_numpy() for b in batches if b.stream == "voltmeter"]
        )
        volts = np.concatenate(
            [b.batch.column("voltage").to_numpy() for b in batches if b.stream == "voltmeter"]
        )
        i = int(np.searchsorted(a["voltmeter/timestamp"].view(np.int64), ts[0].view(np.int64)))
        assert np.array_equal(a["voltmeter/voltage"][i : i + len(volts)], volts), name
        seqs = [b.stream_seq for b in batches if b.stream == "voltmeter"]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), name
    assert got["oldest"][0].stream_seq == 0
    assert {b.stream for b in got["latest"]} == {"voltmeter", "camera"}
    assert status["writer"]["recording"] and status["writer"]["file"] == str(local)
    assert status["subscribers"] == 5  # two readers (3 streams), the remote writer (2)


def test_a_slow_subscriber_is_lapped_and_told_exactly_how_many_rows_it_lost(tmp_path: Path) -> None:
    # A 1 MiB ring, 8 KiB frames at 400/s: the ring laps every ~0.3 s.
    with daemon(str(config(tmp_path, capacity_mb=1, fps=400))) as (url, _):
        daq = rust_daq.remote.connect(url)
        slow = daq.reader("camera", max_buffered=1)
        by_bytes = daq.reader("camera", max_buffered_bytes=1)  # one frame (8 KiB) at a time
        fast = daq.reader("camera")
        slow_batches, fast_batches = [], []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4:  # the slow one reads nothing: ~13 MB go by
            fast_batches += fast.read(timeout=0.05)
        assert len(by_bytes.read()) == 1, "the byte bound held reception at one frame"
        by_bytes.close()
        while time.monotonic() - t0 < 6:
            slow_batches += slow.read(timeout=0.05)
            fast_batches += fast.read(timeout=0.05)
        slow.close()
        fast_batches += fast.read(timeout=0.5)
        fast.close()
        daq.close()
    assert slow.lost_records > 0, "the slow subscriber was lapped"
    # Rows lost, from the frames' own counter: every frame_id the subscriber did not get.
    ids = np.concatenate([b.batch.column("frame_id").to_numpy() for b in slow_batches])
    assert np.all(np.diff(ids) >= 1)
    assert slow_batches[-1].lost_rows == int(ids[-1] - ids[0] + 1 - len(ids)) > 0
    for prev, cur in zip(slow_batches, slow_batches[1:], strict=False):
        gap = cur.batch.column("frame_id")[0].as_py() - prev.batch.column("frame_id")[-1].as_py() - 1
        assert cur.lost_rows - prev.lost_rows == gap
        assert cur.lost_records - prev.lost_records == cur.stream_seq - prev.stream_seq - 1
    # Meanwhile the other subscriber lost nothing: the slow one slowed nobody.
    assert fast.lost_records == 0
    ids = np.concatenate([b.batch.column("frame_id").to_numpy() for b in fast_batches])
    assert np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids)))


def test_do_put_batches_are_written_to_the_file(tmp_path: Path) -> None:
    out = tmp_path / "put.h5"
    schema = pa.schema([pa.field("t", pa.int64()), pa.field("value", pa.float64(), metadata={"units": "V"})])
    sent = [np.arange(i * 100, i * 100 + 100, dtype=np.float64) for i in range(5)]
    with daemon(str(config(tmp_path, output=str(out)))) as (url, _):
        with rust_daq.remote.connect(url) as daq:
            with daq.put_stream("remote_dmm", schema) as put:
                seqs = [
                    put.write(
                        pa.record_batch([pa.array(np.arange(len(v)) + 1000 * i), pa.array(v)], schema=schema)
                    )
                    for i, v in enumerate(sent)
                ]
            assert seqs == sorted(seqs) and len(set(seqs)) == 5
            assert daq.put("remote_dmm", pa.table({"t": [7], "value": [0.5]}, schema=schema)) > seqs[-1]
            with pytest.raises(RemoteError, match="belongs to an instrument"):
                daq.put("voltmeter", pa.table({"t": [7], "value": [0.5]}, schema=schema))
            assert "remote_dmm" in daq.streams()
            status = daq.status()
            assert status["streams"]["remote_dmm"] == {
                **status["streams"]["remote_dmm"],
                "rows": 501,
                "records": 6,
            }
            assert daq.latest("remote_dmm", rows=3)["value"].tolist() == [498.0, 499.0, 0.5]
            daq.put("remote_dmm", pa.table({"t": [8, 9], "value": [1.5, 2.5]}, schema=schema))
            # The daemon's view of the latest rows moved on with the new record.
            assert daq.latest("remote_dmm", rows=3)["value"].tolist() == [0.5, 1.5, 2.5]
    with h5py.File(out, "r") as f:
        ds = f["measurements/remote_dmm/value"]
        assert np.array_equal(ds[()], np.concatenate([*sent, [0.5, 1.5, 2.5]]))
        assert ds.attrs["units"] == "V"
        assert f["rust_daq/streams/remote_dmm"][()].tolist()[:3] == [503, 7, 0]


PUTTER = """
import sys
import numpy as np, pyarrow as pa
import rust_daq.remote
url, name = sys.argv[1], sys.argv[2]
schema = pa.schema([pa.field("t", pa.int64()), pa.field("value", pa.float64(), metadata={"units": "V"})])
with rust_daq.remote.connect(url) as daq, daq.put_stream(name, schema) as put:
    for i in range(20):
        v = np.arange(i * 50, i * 50 + 50)
        put.write(pa.record_batch([pa.array(v), pa.array(v * 0.5)], schema=schema))
print("sent", flush=True)
"""


def test_a_daemon_without_instruments_records_what_remote_instruments_send(tmp_path: Path) -> None:
    """Several acquisition hosts into one storage host: a daemon whose config has no
    instruments takes two remote instruments' batches (do_put, each its own process) into one
    file."""
    out = tmp_path / "hub.h5"
    with daemon(str(config(tmp_path, output=str(out), instruments=False)), streams=0) as (url, _):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", PUTTER, url, name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in ("dmm_a", "dmm_b")
        ]
        for c in procs:
            got, err = c.communicate(timeout=60)
            assert c.returncode == 0 and got.strip() == "sent", err
        with rust_daq.remote.connect(url) as daq:
            status = daq.status()
            assert status["acquisition"] is None
            assert {n: (s["source"], s["rows"], s["records"]) for n, s in status["streams"].items()} == {
                "dmm_a": ("do_put", 1000, 20),
                "dmm_b": ("do_put", 1000, 20),
            }
            assert status["writer"]["recording"] is True
    with h5py.File(out, "r") as f:
        for name in ("dmm_a", "dmm_b"):
            assert np.array_equal(f[f"measurements/{name}/t"][()], np.arange(1000))
            assert np.array_equal(f[f"measurements/{name}/value"][()], np.arange(1000) * 0.5)
            assert f[f"rust_daq/streams/{name}"][()].tolist()[:3] == [1000, 20, 0]


def test_start_and_stop_recording_over_the_wire(tmp_path: Path) -> None:
    out = Path(os.path.realpath(tmp_path)) / "wire.h5"
    # The embedded default: demo instruments, not recording; recordings go in --data-dir.
    with daemon("--data-dir", str(tmp_path)) as (url, _):
        daq = rust_daq.remote.connect(url)
        assert daq.status()["writer"] == {"recording": False}
        time.sleep(0.5)  # data in the ring before the recording starts: not in the file
        t_start = time.time_ns()
        started = daq.start_recording("wire.h5", metadata={"sample": "wire-1"})
        assert started["file"] == str(out) and started["layout"] == "append"
        with pytest.raises(RemoteError, match="already recording"):
            daq.start_recording("other.h5")
        time.sleep(1.5)
        assert daq.status()["writer"]["recording"]
        result = daq.stop_recording()
        t_stop = time.time_ns()
        with pytest.raises(RemoteError, match="not recording"):
            daq.stop_recording()
        with pytest.raises(RemoteError, match="already exists"):
            daq.start_recording("wire.h5")
        daq.close()
    with h5py.File(out, "r") as f:
        ts = f["measurements/voltmeter/timestamp"][()].view(np.int64)
        assert len(ts) == result["streams"]["voltmeter"]["rows"] > 50
        assert f["measurements/camera/frame"].shape[0] == result["streams"]["camera"]["rows"] > 3
        assert t_start - 200_000_000 < ts[0] and ts[-1] < t_stop  # (a row waits ≤ 0.1 s for its batch)
        assert json.loads(f["measurements/metadata/json"][()])["sample"] == "wire-1"
    assert result["records_lost"] == 0


def test_bad_requests_get_clear_flight_errors(tmp_path: Path) -> None:
    with daemon() as (url, _):
        client, opts = stock_client(url)

        def error(call: object) -> str:
            with pytest.raises(fl.FlightServerError) as e:
                r = call()  # type: ignore[operator]
                if hasattr(r, "read_all"):
                    r.read_all()
                else:
                    list(r)  # type: ignore[call-overload]
            assert "Traceback" not in str(e.value), "no server internals"
            return str(e.value)

        assert "unknown stream 'nope'" in error(lambda: client.do_get(fl.Ticket(b"nope"), opts))
        assert "neither a stream name" in error(lambda: client.do_get(fl.Ticket(b"\xff\xfe"), opts))
        assert "not valid JSON" in error(lambda: client.do_get(fl.Ticket(b"{oops"), opts))
        assert "unknown key(s) ['speed']" in error(
            lambda: client.do_get(fl.Ticket(b'{"stream": "camera", "speed": 1}'), opts)
        )
        assert 'start must be "latest"' in error(
            lambda: client.do_get(fl.Ticket(b'{"stream": "camera", "start": "x"}'), opts)
        )
        assert "unknown action 'reboot'" in error(lambda: client.do_action(fl.Action("reboot", b""), opts))
        assert "not valid JSON" in error(lambda: client.do_action(fl.Action("start_recording", b"{"), opts))
        assert 'needs "file"' in error(lambda: client.do_action(fl.Action("start_recording", b"{}"), opts))
        assert "unknown stream" in error(
            lambda: client.get_flight_info(fl.FlightDescriptor.for_path("nope"), opts)
        )
        actions = dict((a.type, a.description) for a in client.list_actions(opts))
        assert set(actions) == {"status", "start_recording", "stop_recording", "list_streams"}
        daq = rust_daq.remote.connect(url)
        with pytest.raises(UnknownStreamError, match="unknown stream 'nope'"):
            daq.latest("nope")
        with pytest.raises(UnknownStreamError):
            daq.reader("nope")
        assert daq.list_streams()["voltmeter"] == {"timestamp": "timestamp[ns]", "voltage": "double"}
        # Through the Python client: the daemon's message once, not prefixed twice.
        with pytest.raises(RemoteError) as e:
            daq.start_recording(str(tmp_path / "no-such-dir" / "x.h5"))
        assert str(e.value).startswith("start_recording: file '/")
        assert "absolute paths are refused" in str(e.value)
        dict_col = pa.table({"a": pa.array(["x"]).dictionary_encode()})
        with pytest.raises(RemoteError, match=r"^do_put to stream 'd': .*dictionary") as e:
            daq.put("d", dict_col)
        schema = pa.schema([("a", pa.int64())])
        with daq.put_stream("p", schema) as put:
            assert put.write(pa.record_batch([pa.array([1])], schema=schema)) >= 0
            with pytest.raises(ValueError, match="do_put to 'p' was opened for schema"):
                put.write(pa.record_batch([pa.array([1.5])], names=["b"]))
            assert put.write(pa.record_batch([pa.array([2])], schema=schema)) >= 0, "still open"
        assert daq.latest("p", rows=5)["a"].tolist() == [1, 2]
        assert "d" not in daq.streams(), "nothing of the refused put was written"
        daq.close()
    with pytest.raises(RemoteError, match="cannot be reached"):
        rust_daq.remote.connect(url, timeout=2)


def test_a_token_is_required_off_loopback_and_checked_on_every_call(tmp_path: Path) -> None:
    r = subprocess.run(
        [*CLI, "daemon", "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "needs a token" in r.stderr
    with daemon("--host", "0.0.0.0", env={"RUST_DAQ_TOKEN": "s3cret"}) as (url, _):
        url = url.replace("0.0.0.0", "127.0.0.1")
        assert not token_files(url), "a daemon given a token writes no token file"
        with pytest.raises(RemoteError, match="needs a token"):
            rust_daq.remote.connect(url, token="")
        with pytest.raises(RemoteError, match="wrong token"):
            rust_daq.remote.connect(url, token="guess")
        plain = fl.connect(url)
        with pytest.raises(fl.FlightUnauthenticatedError):
            plain.do_get(ticket("voltmeter")).read_chunk()
        with pytest.raises(fl.FlightUnauthenticatedError):
            list(plain.do_action(fl.Action("stop_recording", b"")))
        daq = rust_daq.remote.connect(url, token="s3cret")
        assert set(daq.streams()) == {"voltmeter", "camera"}
        tail = subprocess.run(
            [*CLI, "tail", url, "--once"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "RUST_DAQ_TOKEN": "s3cret"},
        )
        assert tail.returncode == 0 and "voltage" in tail.stdout, tail.stderr
        daq.close()


def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    with daemon("--tls-cert", str(cert), "--tls-key", str(key)) as (url, _):
        assert url.startswith("grpc+tls://127.0.0.1:")
        with rust_daq.remote.connect(url, tls_root_certs=cert) as daq:
            assert daq.latest("voltmeter", rows=5)["voltage"].shape == (5,)
        with pytest.raises(RemoteError):
            rust_daq.remote.connect(url.replace("grpc+tls", "grpc"), timeout=2)
    r = subprocess.run([*CLI, "daemon", "--tls-cert", str(cert)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "both --tls-cert and --tls-key" in r.stderr


CLIENT = """
import sys, pyarrow as pa, pyarrow.flight as fl
from rust_daq._access import local_token
from rust_daq.flight import ticket
c = fl.connect(sys.argv[1])
opts = fl.FlightCallOptions(headers=[(b"authorization", b"Bearer " + local_token(sys.argv[1]).encode())])
if sys.argv[2] == "get":
    r = c.do_get(ticket("camera", "oldest"), opts)
    r.read_chunk()
else:
    schema = pa.schema([("x", pa.int64())])
    w, _ = c.do_put(fl.FlightDescriptor.for_path("killed_put"), schema, opts)
    w.write_batch(pa.record_batch([pa.array([1, 2, 3])], schema=schema))
print("streaming", flush=True)
sys.stdin.read()
"""


def test_the_daemon_survives_clients_killed_mid_stream(tmp_path: Path) -> None:
    with daemon() as (url, p):
        for mode in ("get", "get", "put"):
            with subprocess.Popen(
                [sys.executable, "-c", CLIENT, url, mode],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ) as c:
                assert _first_line(c) == "streaming"
                c.kill()
        daq = rust_daq.remote.connect(url)
        deadline = time.monotonic() + 10
        while daq.status()["subscribers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daq.status()["subscribers"] == 0, "the killed clients' subscriptions ended"
        with daq.reader("voltmeter") as r:
            assert sum(b.num_rows for _, b in r.read_batches(timeout=2)) > 0
        assert p.poll() is None
        daq.close()


def test_a_daemon_that_cannot_listen_says_why_and_leaves_no_ring() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with subprocess.Popen(
            [*CLI, "daemon", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as p:
            _, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in err
    assert "Traceback" not in err
    assert not glob.glob(f"/dev/shm/rust-daq-daemon-{p.pid}-*"), "the ring it created was removed"


def test_a_recording_starting_or_stopping_never_stalls_the_acquisition_loop() -> None:
    """start_recording/stop_recording hold the recording lock for seconds (the writer's start,
    its final flush) in a Flight thread. The daemon's event loop, which runs the acquisition,
    must keep running meanwhile: it once waited on that lock, and 3 start/stop cycles cost a
    1 kHz voltmeter ~400 missed deadlines."""
    import anyio

    from rust_daq.cli import Session
    from rust_daq.daemon import Daemon

    name = f"/dev/shm/rdaq-test-daemon-{uuid.uuid4().hex[:8]}"
    d = Daemon(Session(instruments=[], ring_path=name, capacity_mb=1, output=None), port=0, own_ring=True)
    ticks: list[float] = []
    during: list[int] = []

    def hold() -> None:
        with d._rec_lock:  # as stop_recording does during the final flush
            before = len(ticks)
            time.sleep(0.5)
            during.append(len(ticks) - before)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(d._idle_tail)

            async def tick() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await anyio.sleep(0.005)

            tg.start_soon(tick)
            await anyio.sleep(0.1)
            t = threading.Thread(target=hold)
            t.start()
            await anyio.to_thread.run_sync(t.join)
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        d._shutdown()
    # ~100 ticks in 0.5 s when the loop runs; a loop blocked on the lock ticks until the idle
    # task's next wake-up (50 ms) and then not at all.
    assert during[0] > 30, during
    assert not os.path.exists(name)


def test_a_remote_writer_that_falls_behind_records_exactly_what_it_lost(tmp_path: Path) -> None:
    """`write --from` stopped (SIGSTOP) while the daemon's 1 MiB ring laps many times: the
    file's bookkeeping and the summary count exactly the records and frames missing."""
    out = tmp_path / "behind.h5"
    with daemon(str(config(tmp_path, capacity_mb=1, fps=400))) as (url, _):
        w = subprocess.Popen(
            [*CLI, "write", "--from", url, "--output", str(out), "--flush-interval", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert _first_line(w) == "ready"
            time.sleep(1)
            w.send_signal(signal.SIGSTOP)
            time.sleep(4)  # ~13 MB of frames go through the daemon's 1 MiB ring
        finally:
            w.send_signal(signal.SIGCONT)
        time.sleep(1)
    # The daemon stopped: the writer's streams end; it flushes and exits.
    _, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    summary = " ".join(err.split())  # the summary goes to stderr, wrapped to the terminal
    with h5py.File(out, "r") as f:
        ids = f["measurements/camera/frame_id"][()]
        rows, records, lost = (int(v) for v in f["rust_daq/streams/camera"][()][:3])
    missing = int(ids[-1] - ids[0] + 1 - len(ids))
    assert np.all(np.diff(ids) >= 1) and missing > 0, "it fell behind and the ring lapped it"
    assert rows == len(ids) and lost > 0
    # The file counts the records lost (from the stream's sequence numbers, carried over the
    # wire); the summary also the frames they held, which are exactly the missing frame_ids.
    assert (
        f"camera: {records:,} records, {rows:,} rows; lost upstream {lost} records, {missing} rows" in summary
    )


def test_a_remote_writer_whose_writer_process_dies_says_so(tmp_path: Path) -> None:
    """Without its writer process nothing would put the relayed ring into the file: `write
    --from` must stop with the reason, not relay on for nobody."""
    out = tmp_path / "dead.h5"
    with daemon() as (url, _):
        w = subprocess.Popen(
            [*CLI, "write", "--from", url, "--output", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert _first_line(w) == "ready"
        children = Path(f"/proc/{w.pid}/task/{w.pid}/children").read_text().split()
        (writer_pid,) = [int(c) for c in children]
        assert "rust_daq.writer" in Path(f"/proc/{writer_pid}/cmdline").read_text()
        os.kill(writer_pid, signal.SIGKILL)
        _, err = w.communicate(timeout=30)
    assert w.returncode == 2
    assert "the writer process exited with -9" in " ".join(err.split())
    assert not list(Path("/dev/shm").glob(f"rust-daq-relay-{w.pid}")), "its ring was removed"
