"""The writer from JetStream writes what a local writer writes (the same datasets for the
same data: every Arrow type with nulls, odd stream names, a schema change, 8 MiB frames
through the object store), resumes exactly once, and every way of getting the server wrong
gives a clear error, never a traceback."""

from __future__ import annotations

import asyncio
import decimal
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pytest

from rust_daq import JetStreamError, RingBuffer
from rust_daq.hdf5.progress import read_progress
from rust_daq.hdf5.writer import HDF5Writer
from rust_daq.nats.connection import Credentials, parse_url
from rust_daq.nats.publisher import Publisher
from rust_daq.nats.source import JetStreamSource

from h5stream import columns, stream_group

CLI = [sys.executable, "-m", "rust_daq.cli"]


@pytest.fixture
def ring() -> Iterator[RingBuffer]:
    path = f"/dev/shm/rdaq-natsw-{uuid.uuid4().hex[:10]}"
    r = RingBuffer.create(path, capacity_mb=64)
    yield r
    r.close()
    Path(path).unlink(missing_ok=True)


def publish_all(ring: RingBuffer, url: str, **kw: Any) -> Publisher:
    """Publishes everything the ring holds now, until acknowledged."""

    async def main() -> Publisher:
        stop = asyncio.Event()
        p = Publisher(ring, url, host=kw.pop("host", "h1"), **kw)
        task = asyncio.create_task(p.run(stop))
        while p.stats.next_seq < ring.records_written and not task.done():  # noqa: ASYNC110 (a counter)
            await asyncio.sleep(0.02)
        stop.set()
        await task
        return p

    return asyncio.run(main())


def write_all(url: str, output: Path, records: int, **kw: Any) -> HDF5Writer:
    source = JetStreamSource(url, output=str(output))
    try:
        w = HDF5Writer(output, source, **kw)
    except BaseException:
        source.close()
        raise
    try:
        deadline = time.monotonic() + 60
        while w.records_written + w.records_unwritable < records and time.monotonic() < deadline:
            w.flush_to_disk()
            time.sleep(0.05)
    finally:
        w.close()
        source.close()
    return w


def every_type(k: int) -> pa.RecordBatch:
    cols = {
        "f64": pa.array([1.5 + k, None, -0.0]),
        "i8": pa.array([-1, None, k % 100], pa.int8()),
        "u64": pa.array([2**64 - 1, None, k], pa.uint64()),
        "bool": pa.array([True, None, False]),
        "str": pa.array(["a", None, f"ünï{k}"]),
        "bin": pa.array([b"\x00\x01", None, b""]),
        "dec": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("-2.25")], pa.decimal128(6, 2)),
        "ts": pa.array([1, None, 3], pa.timestamp("s", tz="Europe/Berlin")),
        "fsl": pa.array([[1.0, 2.0], None, [7.0, 8.0]], pa.list_(pa.float64(), 2)),
        "list": pa.array([[1.0], None, []], pa.list_(pa.float64())),
        "list_str": pa.array([["a"], None, []], pa.list_(pa.string())),
        "struct": pa.array(
            [{"x": 1.0, "y": "a"}, None, {"x": None, "y": "c"}],
            pa.struct([("x", pa.float64()), ("y", pa.string())]),
        ),
        "tensor": pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.arange(12, dtype=np.uint16).reshape(3, 2, 2) + k
        ),
    }
    return pa.record_batch(list(cols.values()), names=list(cols))


ODD = ["all types", "x/a", "cam.roi*1>", "ünï", "%2E", "."]


def fill(ring: RingBuffer) -> int:
    for k in range(20):
        for name in ODD:
            ring.write_arrow_batch(every_type(k), name)
    # A schema change mid-stream: a new dataset generation in both files.
    ring.write_arrow_batch(pa.record_batch({"f64": pa.array(["now a string", None, "x"])}), "all types")
    # A frame larger than the server's max_payload (1 MiB): through the object store, whole.
    big = np.arange(2048 * 2048, dtype=np.uint16).reshape(1, 2048, 2048)
    ring.write_arrow_batch(
        pa.record_batch({"frame": pa.FixedShapeTensorArray.from_numpy_ndarray(big)}), "cam"
    )
    ring.write_arrow_batch(
        pa.record_batch(
            {"frame": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(big[:, ::-1]))}
        ),
        "cam",
    )
    return int(ring.records_written)


def datasets(f: h5py.File, group: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    f[group].visititems(lambda n, obj: out.setdefault(n, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.mark.timeout(120)
def test_the_file_holds_what_a_local_writer_writes(
    nats_server: Any, ring: RingBuffer, tmp_path: Path
) -> None:
    records = fill(ring)
    local, remote = tmp_path / "local.h5", tmp_path / "remote.h5"
    with HDF5Writer(local, ring) as w:
        w.flush_to_disk()
    p = publish_all(ring, nats_server.url)
    assert p.stats.records == records and p.stats.objects == 2 and p.stats.lost_records == 0
    w2 = write_all(nats_server.url, remote, records)
    assert w2.records_written == records and w2.records_unwritable == 0 and w2.records_lost == 0
    with h5py.File(local) as a, h5py.File(remote) as b:
        for name in [*ODD, "cam"]:
            ga, gb = stream_group(a, name), stream_group(b, f"h1.{name}")
            assert columns(ga) == columns(gb), name
            da, db = datasets(a, ga.name), datasets(b, gb.name)
            assert sorted(da) == sorted(db), name
            for key in da:
                if key == "time":  # seconds since the file's start_time: another file, another start
                    continue
                if key == "arrow_schema":
                    # The schema the group was made with: the local writer, opened on a ring that
                    # already holds everything, makes it from the schema table's current entry;
                    # the JetStream writer from the stream's first record. Both are the stream's.
                    schemas = {pa.ipc.read_schema(pa.py_buffer(d[key].tobytes())) for d in (da, db)}
                    assert all(s.names for s in schemas)
                    continue
                np.testing.assert_array_equal(da[key], db[key], err_msg=f"{name}/{key}")
                assert da[key].dtype == db[key].dtype
            if "time" in da:
                assert da["time"].shape == db["time"].shape
        frame = stream_group(b, "h1.cam")["frame"]
        assert frame.shape == (2, 2048, 2048)
        np.testing.assert_array_equal(
            frame[1], np.arange(2048 * 2048, dtype=np.uint16).reshape(2048, 2048)[::-1]
        )
    books_a, books_b = read_progress(local).streams, read_progress(remote).streams
    for name in [*ODD, "cam"]:
        assert books_a[name].rows == books_b[f"h1.{name}"].rows
        assert books_a[name].records == books_b[f"h1.{name}"].records


@pytest.mark.timeout(120)
def test_a_restarted_writer_adds_only_what_is_new(nats_server: Any, ring: RingBuffer, tmp_path: Path) -> None:
    for k in range(10):
        ring.write_arrow_batch(pa.record_batch({"i": np.arange(k * 100, k * 100 + 100)}), "v")
    publish_all(ring, nats_server.url)
    out = tmp_path / "run.h5"
    assert write_all(nats_server.url, out, 10).records_written == 10
    # Again on the same file: nothing new, nothing twice.
    again = write_all(nats_server.url, out, 0)
    assert again.records_written == 10
    for k in range(10, 15):
        ring.write_arrow_batch(pa.record_batch({"i": np.arange(k * 100, k * 100 + 100)}), "v")
    publish_all(ring, nats_server.url)  # the stored position: only the five new ones
    assert write_all(nats_server.url, out, 15).records_written == 15
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["measurements/h1.v/i"][()], np.arange(1500))
    assert read_progress(out).streams["h1.v"].lost == 0


@pytest.mark.timeout(120)
def test_a_publisher_killed_mid_run_resends_nothing_twice(
    nats_server: Any, ring: RingBuffer, tmp_path: Path
) -> None:
    """Publishers that stop without storing their position (a SIGKILL) are the server's
    dedup window's job: the same Nats-Msg-Id twice is stored once."""
    import nats

    from rust_daq.nats import protocol

    for k in range(50):
        ring.write_arrow_batch(pa.record_batch({"i": np.arange(k * 10, k * 10 + 10)}), "v")
    publish_all(ring, nats_server.url)

    async def forget_and_count() -> int:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        kv = await js.key_value(protocol.POSITIONS_BUCKET)
        await kv.delete(protocol.position_key("rdaq", "h1"))  # as if killed before its first save
        n = (await js.stream_info("RDAQ_rdaq")).state.messages
        await nc.close()
        return int(n)

    assert asyncio.run(forget_and_count()) == 50
    p = publish_all(ring, nats_server.url, host="h1")
    assert p.stats.records == 50  # all sent again, and acknowledged...
    assert asyncio.run(forget_and_count()) == 50  # ...as duplicates: the stream holds each once
    out = tmp_path / "run.h5"
    w = write_all(nats_server.url, out, 50)
    assert w.records_written == 50
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["measurements/h1.v/i"][()], np.arange(500))


@pytest.mark.timeout(120)
def test_names_never_collide_and_a_prefix_holds_only_its_own(nats_server: Any, tmp_path: Path) -> None:
    """Host ``a.b`` with stream ``c`` and host ``a`` with stream ``b.c`` are two streams in the
    file (the host's dots are encoded: ``a%2Eb.c``, ``a.b.c``); a writer of prefix ``rdaq``
    does not take the records of prefix ``rdaq.run1``, which its stream also holds."""
    rings = []
    try:
        for i, (host, stream, prefix) in enumerate(
            [("a.b", "c", "rdaq"), ("a", "b.c", "rdaq"), ("h1", "v", "rdaq.run1")]
        ):
            r = RingBuffer.create(f"/dev/shm/rdaq-natsn-{uuid.uuid4().hex[:8]}", capacity_mb=4)
            rings.append(r)
            r.write_arrow_batch(pa.record_batch({"i": np.arange(5) + 100 * i}), stream)
            publish_all(r, nats_server.url, host=host, prefix=prefix)
        out, sub = tmp_path / "rdaq.h5", tmp_path / "run1.h5"
        assert write_all(nats_server.url + "/rdaq", out, 2).records_written == 2
        assert write_all(nats_server.url + "/rdaq.run1", sub, 1).records_written == 1
    finally:
        for r in rings:
            r.close()
            Path(r.path).unlink(missing_ok=True)
    with h5py.File(out) as f:
        assert columns(stream_group(f, "a%2Eb.c"))[(("i",), 0)] == [0, 1, 2, 3, 4]
        assert columns(stream_group(f, "a.b.c"))[(("i",), 0)] == [100, 101, 102, 103, 104]
    assert set(read_progress(out).streams) == {"a%2Eb.c", "a.b.c"}
    assert set(read_progress(sub).streams) == {"h1.v"}
    with h5py.File(sub) as f:
        np.testing.assert_array_equal(f["measurements/h1.v/i"][()], np.arange(200, 205))


# -- errors ---------------------------------------------------------------------------------


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def no_traceback(r: subprocess.CompletedProcess[str]) -> str:
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text
    assert r.returncode != 0
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1:4222", "scheme must be nats:// or tls://"),
        ("nats://user:secret@127.0.0.1:4222", "holds credentials"),
        ("nats://127.0.0.1:notaport", "bad NATS URL"),
        ("nats://", "no host"),
    ],
)
def test_bad_urls_are_said(url: str, said: str, tmp_path: Path) -> None:
    with pytest.raises(JetStreamError, match=said):
        parse_url(url)
    r = cli("write", "--from", url, "--output", str(tmp_path / "x.h5"))
    # (not nats:// or tls://: the CLI takes it for a daemon's URL, and says what those look like)
    assert (said if url.startswith("nats") else "a daemon URL looks like") in no_traceback(r)
    assert "secret" not in r.stdout + r.stderr
    assert not (tmp_path / "x.h5").exists()


def test_no_server_there(ring: RingBuffer, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = cli("publish", "--ring", ring.path, "--nats", f"nats://127.0.0.1:{port}")
    assert "cannot reach a NATS server" in no_traceback(r) and time.monotonic() - t0 < 30


def test_wrong_credentials(nats_server_factory: Any, ring: RingBuffer, tmp_path: Path) -> None:
    server = nats_server_factory(user="daq", password="right")
    ring.write_arrow_batch(pa.record_batch({"i": [1, 2]}), "v")
    env = {**os.environ, "RUST_DAQ_NATS_USER": "daq", "RUST_DAQ_NATS_PASSWORD": "wrong"}
    r = cli("publish", "--ring", ring.path, "--nats", server.url, env=env)
    assert "refused the credentials" in no_traceback(r)
    assert "wrong" not in r.stdout + r.stderr  # (no secret in what is printed)
    with pytest.raises(JetStreamError, match="refused the credentials"):
        publish_all(ring, server.url, credentials=Credentials(user="daq", password="wrong"))
    # The right ones, from the environment: published, and written.
    p = publish_all(
        ring,
        server.url,
        credentials=Credentials.from_env({"RUST_DAQ_NATS_USER": "daq", "RUST_DAQ_NATS_PASSWORD": "right"}),
    )
    assert p.stats.records == 1


def test_token_and_tls(nats_server_factory: Any, ring: RingBuffer, tmp_path: Path) -> None:
    from nats_servers import make_tls

    ca, cert, key = make_tls(tmp_path)
    server = nats_server_factory(token="s3cret", tls=(ca, cert, key))
    ring.write_arrow_batch(pa.record_batch({"i": [1, 2, 3]}), "v")
    good = Credentials(token="s3cret", tls_ca=str(ca))
    url = server.url.replace("nats://", "tls://")
    assert publish_all(ring, url, credentials=good).stats.records == 1
    with pytest.raises(JetStreamError):  # TLS without trusting its CA
        publish_all(ring, url, credentials=Credentials(token="s3cret"))
    with pytest.raises(JetStreamError, match="refused the credentials"):
        publish_all(ring, url, credentials=Credentials(token="nope", tls_ca=str(ca)))
    out = tmp_path / "t.h5"
    env = {**os.environ, "RUST_DAQ_NATS_TOKEN": "s3cret", "RUST_DAQ_NATS_TLS_CA": str(ca)}
    p = subprocess.Popen(
        [*CLI, "write", "--from", url + "/rdaq", "--output", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", (
        p.stderr.read() if p.stderr else ""
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if read_progress(out).records == 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    p.terminate()
    p.communicate(timeout=30)
    assert read_progress(out).streams["h1.v"].rows == 3


def test_a_server_without_jetstream(nats_server_factory: Any, ring: RingBuffer, tmp_path: Path) -> None:
    server = nats_server_factory(jetstream=False)
    r = cli("publish", "--ring", ring.path, "--nats", server.url)
    assert "has no JetStream" in no_traceback(r)
    r = cli("write", "--from", server.url + "/rdaq", "--output", str(tmp_path / "x.h5"))
    assert "has no JetStream" in no_traceback(r)


def test_a_stream_that_does_not_exist(nats_server: Any, tmp_path: Path) -> None:
    r = cli("write", "--from", nats_server.url + "/nothing.here", "--output", str(tmp_path / "x.h5"))
    assert "no JetStream stream holds the subjects nothing.here.>" in no_traceback(r)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.timeout(180)
def test_deliveries_lost_on_the_way_are_delivered_again(
    nats_server_factory: Any, ring: RingBuffer, tmp_path: Path
) -> None:
    """A server that disconnects slow consumers early (max_pending 6 MiB) and takes 2 MiB
    frames inline: fetches of several frames overflow it, the connection drops mid-fetch,
    and the deliveries on the way are gone until the consumer's ack_wait. The writer sees
    the gap in the consumer's sequence and delivers again from its last message: every frame
    in the file once, none counted as lost."""
    server = nats_server_factory(max_payload=3 << 20, extra_config="max_pending: 6291456")
    frames = 24  # (all in the ring: 64 MiB)
    for k in range(frames):
        frame = np.full((1, 1024, 1024), k, np.uint16)
        ring.write_arrow_batch(
            pa.record_batch({"frame": pa.FixedShapeTensorArray.from_numpy_ndarray(frame)}), "cam"
        )
    assert publish_all(ring, server.url).stats.objects == 0  # (inline: max_payload 3 MiB)
    out = tmp_path / "run.h5"
    w = write_all(server.url, out, frames)
    assert w.records_written == frames and w.records_lost == 0
    with h5py.File(out) as f:
        got = f["measurements/h1.cam/frame"]
        assert got.shape == (frames, 1024, 1024)
        assert [int(got[k, 0, 0]) for k in range(frames)] == list(range(frames))
    assert read_progress(out).streams["h1.cam"].lost == 0


@pytest.mark.timeout(120)
def test_a_full_jetstream_store_holds_the_publisher_in_place(
    nats_server_factory: Any, ring: RingBuffer, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's storage full (max_file_store 4 MiB, 8 MiB to publish): the publisher says
    so, keeps its place in the ring and goes on once there is room (here: an operator purges
    the stream); every record after the purge point arrives once."""
    import nats

    server = nats_server_factory(max_file_store=4 << 20)
    for k in range(16):
        ring.write_arrow_batch(pa.record_batch({"k": np.full(64 << 10, k, np.int64)}), "v")  # 512 KiB each

    async def main() -> tuple[Publisher, list[int]]:
        stop = asyncio.Event()
        p = Publisher(ring, server.url, host="h1", ack_timeout=1.0)
        task = asyncio.create_task(p.run(stop))
        while p.stats.storage_full == 0 and not task.done():  # noqa: ASYNC110 (a counter)
            await asyncio.sleep(0.05)
        assert not task.done(), "the publisher gave up"
        held = p.stats.records
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.purge_stream("RDAQ_rdaq")  # room again (what it held is gone: the operator's choice)
        while p.stats.next_seq < 16 and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        stop.set()
        await task
        sub = await js.pull_subscribe("rdaq.>", stream="RDAQ_rdaq")
        msgs = await sub.fetch(16, timeout=5)
        await nc.close()
        assert held < 16
        return p, [int(m.headers["Rdaq-Seq"]) for m in msgs]  # type: ignore[index]

    with caplog.at_level("ERROR", logger="rust_daq.nats"):
        p, seqs = asyncio.run(main())
    assert "storage is full" in caplog.text
    assert p.stats.storage_full >= 1
    assert seqs == list(range(seqs[0], 16)), "after the purge: the rest, in order, once"
    assert seqs[0] > 0


@pytest.mark.timeout(120)
def test_a_file_of_one_prefix_is_refused_to_another(
    nats_server: Any, ring: RingBuffer, tmp_path: Path
) -> None:
    """Prefixes rdaq and rdaq.run1 share one JetStream stream; a file written from one is
    another run's for the other (IncompatibleFileError), and nothing in it changes."""
    from rust_daq import IncompatibleFileError

    ring.write_arrow_batch(pa.record_batch({"i": np.arange(3)}), "v")
    publish_all(ring, nats_server.url)
    publish_all(ring, nats_server.url, prefix="rdaq.run1", host="h2")
    out = tmp_path / "run.h5"
    assert write_all(nats_server.url + "/rdaq", out, 1).records_written == 1
    before = out.read_bytes()
    with pytest.raises(IncompatibleFileError, match="ring session"):
        write_all(nats_server.url + "/rdaq.run1", out, 1)
    assert out.read_bytes() == before
    source = JetStreamSource(nats_server.url, output=str(out))
    try:
        with pytest.raises(ValueError, match="start='now' needs a ring"):
            HDF5Writer(tmp_path / "now.h5", source, start="now")
    finally:
        source.close()


@pytest.mark.timeout(120)
def test_a_fetch_loop_that_stops_is_the_writers_error(
    nats_server: Any, ring: RingBuffer, tmp_path: Path
) -> None:
    """The source's connection closed under it (what a client that gives up reconnecting
    does): the fetch loop ends, and the writer's next pass says so instead of waiting for
    ever; what it wrote before stays in the file."""
    for k in range(3):
        ring.write_arrow_batch(pa.record_batch({"i": [k]}), "v")
    publish_all(ring, nats_server.url)
    out = tmp_path / "run.h5"
    source = JetStreamSource(nats_server.url, output=str(out))
    w = HDF5Writer(out, source)
    try:
        deadline = time.monotonic() + 30
        while w.records_written < 3 and time.monotonic() < deadline:
            w.flush_to_disk()
            time.sleep(0.05)
        assert w.records_written == 3
        source._call(source._nc.close())
        with pytest.raises(JetStreamError, match="closed"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                w.flush_to_disk()
                time.sleep(0.05)
        with pytest.raises(JetStreamError, match="closed"):  # every pass after it too: no quiet retry
            w.flush_to_disk()
        with pytest.raises(JetStreamError, match="closed"):  # the final one too; the file is closed
            w.close()
    finally:
        w.close()
        source.close()
    with h5py.File(out) as f:
        assert list(f["measurements/h1.v/i"][:]) == [0, 1, 2]


@pytest.mark.timeout(120)
def test_stopping_a_publisher_while_the_server_is_away(nats_server: Any, ring: RingBuffer) -> None:
    """SIGTERM (stop) during an outage: the publisher gives up after its grace period with an
    error saying what is not acknowledged, instead of hanging; a publisher started again once
    the server is back sends the rest, each record once."""
    import nats

    for k in range(5):
        ring.write_arrow_batch(pa.record_batch({"i": [k]}), "v")
    publish_all(ring, nats_server.url)

    async def stopped_in_outage() -> float:
        stop = asyncio.Event()
        p = Publisher(ring, nats_server.url, host="h1", ack_timeout=0.5)
        p.stop_grace = 2.0
        task = asyncio.create_task(p.run(stop))
        await asyncio.sleep(0.5)
        nats_server.stop()
        for k in range(5, 10):
            ring.write_arrow_batch(pa.record_batch({"i": [k]}), "v")
        await asyncio.sleep(2.0)  # (it tries, and fails)
        t = time.monotonic()
        stop.set()
        with pytest.raises(JetStreamError, match="not acknowledged"):
            await task
        return time.monotonic() - t

    assert asyncio.run(stopped_in_outage()) < 15
    nats_server.start()
    assert publish_all(ring, nats_server.url).stats.next_seq == 10

    async def stored() -> list[int]:
        nc = await nats.connect(nats_server.url)
        sub = await nc.jetstream().pull_subscribe("rdaq.>", stream="RDAQ_rdaq")
        msgs = await sub.fetch(20, timeout=3)
        await nc.close()
        return [int(m.headers["Rdaq-Seq"]) for m in msgs]  # type: ignore[index]

    assert sorted(asyncio.run(stored())) == list(range(10))
