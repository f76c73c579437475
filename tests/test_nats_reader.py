"""The live JetStream reader (rust_daq.nats.connect) against a real nats-server: everything a
publisher sent comes back equal (values, dtypes, nulls, sequence numbers), from "oldest",
"latest" or a JetStream sequence, to several readers at once and to one that starts late;
8 MiB frames come whole through the object store; a publisher that its ring lapped makes
readers count exactly the records and rows lost, once; a slow reader pauses without losing
anything; each way of failing to connect says what is wrong."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from nats_servers import NatsServer, free_port

pytest.importorskip("nats", reason="pip install 'rust-daq[nats]'")

from rust_daq import JetStreamError, RingBuffer, UnknownStreamError  # noqa: E402
from rust_daq.acquisition import RowIndex  # noqa: E402
from rust_daq.nats import Credentials, JetStreamBatch, JetStreamReader, _consumer, connect  # noqa: E402
from rust_daq.nats._consumer import Losses  # noqa: E402
from rust_daq.nats.publisher import PublisherStats  # noqa: E402
from rust_daq.nats.thread import PublisherThread  # noqa: E402

# -- servers: tests/helpers/nats_servers.py through conftest's fixtures -----------------------


@pytest.fixture
def nats_url(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for var in ("USER", "PASSWORD", "TOKEN", "CREDS", "TLS_CA", "TLS_CERT", "TLS_KEY"):
        monkeypatch.delenv(f"RUST_DAQ_NATS_{var}", raising=False)
    yield nats_server.url


@pytest.fixture
def ring(ring_path: str) -> Iterator[RingBuffer]:
    r = RingBuffer.create(ring_path, 64)
    yield r
    r.close()


# -- helpers --------------------------------------------------------------------------------------


def volt(i: int, rows: int = 1000) -> pa.RecordBatch:
    """1000 float64 rows, an int64 and an int32 column with nulls, a string column with nulls."""
    j = np.arange(rows)
    return pa.record_batch(
        {
            "x": np.arange(rows, dtype=np.float64) + i * rows,
            "n": pa.array(j.astype(np.int64) + i, mask=j % 7 == 0),
            "k": pa.array((j * 3).astype(np.int32), mask=j % 11 == 3),
            "s": pa.array([None if m % 5 == 0 else f"r{i}-{m}" for m in range(rows)], pa.string()),
        }
    )


def publish(ring: RingBuffer, url: str, **options: Any) -> PublisherStats:
    """Publishes what the ring holds (start, then stop: stop() publishes it all first)."""
    pub = PublisherThread(ring, url, **{"host": "h1", **options})
    pub.start()
    stats = pub.stop()
    assert pub.error is None and stats is not None
    return stats


def read_n(reader: JetStreamReader, n: int, timeout: float = 60.0) -> list[JetStreamBatch]:
    """Exactly `n` batches (and then nothing more for 0.3 s)."""
    got: list[JetStreamBatch] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += reader.read(timeout=0.5)
    got += reader.read(timeout=0.3)
    assert len(got) == n, f"{len(got)} batches, expected {n}"
    return got


def check_equal(got: list[JetStreamBatch], sent: list[pa.RecordBatch], stream: str = "h1.volt") -> None:
    assert len(got) == len(sent)
    for b, s in zip(got, sent, strict=True):
        assert b.stream == stream
        assert b.batch.schema == s.schema
        assert b.batch.equals(s)
        assert [c.null_count for c in b.batch.columns] == [c.null_count for c in s.columns]


# -- the loss account (no server) ------------------------------------------------------------------


def test_loss_marker_first_then_record_counts_once() -> None:
    acc = Losses()
    acc.marker("s", 0, 5, 500)  # a publisher that started lapped: records 0..4 lost
    acc.record("s", 5, 100, 500)
    acc.record("s", 6, 100, 600)
    assert (acc.records("s"), acc.rows("s")) == (5, 500)


def test_loss_marker_after_records_counts_once() -> None:
    acc = Losses()
    acc.record("s", 0, 100, 0)
    acc.marker("s", 1, 3, 300)  # records 1..3 lost
    assert (acc.records("s"), acc.rows("s")) == (3, 300)  # (known at the marker already)
    acc.record("s", 4, 100, 400)
    acc.record("s", 5, 100, 500)
    assert (acc.records("s"), acc.rows("s")) == (3, 300)


def test_loss_marker_without_rows_then_record_with_rows_before_is_exact() -> None:
    acc = Losses()
    acc.record("s", 0, 100, 0)
    acc.marker("s", 1, 3, None)
    acc.record("s", 4, 100, 370)
    assert (acc.records("s"), acc.rows("s")) == (3, 270)


def test_loss_marker_without_rows_then_record_without_rows_before_is_unknown() -> None:
    acc = Losses()
    acc.record("s", 0, 100, 0)
    acc.marker("s", 1, 3, None)
    acc.record("s", 4, 100, None)
    assert (acc.records("s"), acc.rows("s")) == (3, None)


def test_loss_gap_before_a_marker_counts_both_once() -> None:
    acc = Losses()
    acc.record("s", 0, 100, 0)
    # records 1..2 never arrived (removed from JetStream), then a marker for 3..5
    acc.marker("s", 3, 3, 300)
    acc.record("s", 6, 100, 600)
    assert (acc.records("s"), acc.rows("s")) == (5, 500)


def test_loss_marker_where_rows_were_unknown_adds_its_rows() -> None:
    acc = Losses()
    acc.record("s", 0, 100, None)
    acc.marker("s", 1, 2, 200)
    acc.record("s", 3, 100, 300)
    assert (acc.records("s"), acc.rows("s")) == (2, 200)
    acc.record("s", 5, 100, 500)  # a plain gap: stream_seq and rows_before say it
    assert (acc.records("s"), acc.rows("s")) == (3, 300)


def test_loss_unreadable_record_counts_as_lost() -> None:
    acc = Losses()
    acc.record("s", 0, 100, 0)
    acc.unreadable("s", 1, 100, 100)
    acc.record("s", 2, 100, 200)
    assert (acc.records("s"), acc.rows("s")) == (1, 100)


# -- reading back ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_live_reader_from_oldest_gets_everything_equal(nats_url: str, ring: RingBuffer) -> None:
    sent = [volt(i) for i in range(200)]
    pub = PublisherThread(ring, nats_url, host="h1")
    pub.start()
    try:
        with connect(nats_url) as daq, daq.reader(start="oldest") as reader:
            for b in sent:
                ring.write_arrow_batch(b, "volt")
            got = read_n(reader, 200)
            assert (reader.lost_records, reader.lost_rows) == (0, 0)
            assert reader.lost_by_stream() == {"h1.volt": (0, 0)}
    finally:
        stats = pub.stop()
    assert stats is not None and stats.records == 200
    check_equal(got, sent)
    assert [b.seq for b in got] == list(range(1, 201))  # (the stream held nothing else)
    assert [b.stream_seq for b in got] == list(range(200))
    assert [b.timestamp_ns for b in got] == [r.timestamp_ns for r in ring.reader("oldest").read()]
    assert {(b.host, b.lost_records, b.lost_rows) for b in got} == {("h1", 0, 0)}
    t = got[0].batch.schema
    assert [t.field(c).type for c in "xnks"] == [pa.float64(), pa.int64(), pa.int32(), pa.string()]


@pytest.mark.timeout(120)
def test_late_reader_decodes_everything(nats_url: str, ring: RingBuffer) -> None:
    sent = [volt(i, rows=10 + i) for i in range(50)]
    for b in sent:
        ring.write_arrow_batch(b, "volt")
    assert publish(ring, nats_url).records == 50  # (and the publisher is gone)
    with connect(nats_url) as daq:  # a new connection: schemas from the bucket
        assert daq.streams() == {"h1.volt": sent[0].schema}
        with daq.reader() as reader:
            got = read_n(reader, 50)
            assert reader.lost_records == 0
        with daq.reader("h1.volt") as reader:
            table = reader.read_table("h1.volt", timeout=5.0)
            while table.num_rows < sum(b.num_rows for b in sent):
                more = reader.read_table("h1.volt", timeout=1.0)
                assert more.num_rows, "the rest of the table never came"
                table = pa.concat_tables([table, more])
            assert table.equals(pa.Table.from_batches(sent))
            empty = reader.read_table("h1.volt", timeout=0.2)  # nothing new: the stream's schema
            assert empty.num_rows == 0 and empty.schema == sent[0].schema
    check_equal(got, sent)
    assert [b.seq for b in got] == list(range(1, 51))


@pytest.mark.timeout(120)
def test_publisher_stop_publishes_what_the_ring_holds(nats_url: str, ring: RingBuffer) -> None:
    pub = PublisherThread(ring, nats_url, host="h1")
    pub.start()
    for i in range(300):  # written while it runs; stop() at once
        ring.write_arrow_batch(volt(i, rows=100), "volt")
    stats = pub.stop()
    assert stats is not None and (stats.records, stats.next_seq, stats.lost_records) == (300, 300, 0)
    with connect(nats_url) as daq, daq.reader() as reader:
        assert [b.stream_seq for b in read_n(reader, 300)] == list(range(300))


@pytest.mark.timeout(120)
def test_start_latest_sees_only_what_comes_after(nats_url: str, ring: RingBuffer) -> None:
    pub = PublisherThread(ring, nats_url, host="h1")
    pub.start()
    try:
        for i in range(10):
            ring.write_arrow_batch(volt(i, rows=100), "volt")
        with connect(nats_url) as daq:
            with daq.reader(start="oldest") as everything:
                read_n(everything, 10)  # (all 10 are in JetStream now)
            with daq.reader(start="latest") as reader:
                assert reader.read(timeout=0.5) == []
                sent = [volt(i, rows=100) for i in range(10, 15)]
                for b in sent:
                    ring.write_arrow_batch(b, "volt")
                got = read_n(reader, 5)
    finally:
        pub.stop()
    check_equal(got, sent)
    assert [b.stream_seq for b in got] == list(range(10, 15))
    assert [b.seq for b in got] == list(range(11, 16))
    assert reader.lost_records == 0


@pytest.mark.timeout(120)
def test_start_at_a_sequence(nats_url: str, ring: RingBuffer) -> None:
    sent = [volt(i, rows=100) for i in range(20)]
    for b in sent:
        ring.write_arrow_batch(b, "volt")
    publish(ring, nats_url)
    with connect(nats_url) as daq:
        with daq.reader() as reader:
            seqs = [b.seq for b in read_n(reader, 20)]
        with daq.reader(start=seqs[7]) as reader:
            got = read_n(reader, 13)
        with pytest.raises(ValueError, match="starts at 1"):
            daq.reader(start=0)
        with pytest.raises(ValueError, match="start must be"):
            daq.reader(start="tail")  # type: ignore[arg-type]
    assert [b.seq for b in got] == seqs[7:]
    assert [b.stream_seq for b in got] == list(range(7, 20))
    check_equal(got, sent[7:])


@pytest.mark.timeout(120)
def test_an_8_mib_frame_arrives_whole(nats_url: str, ring: RingBuffer) -> None:
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 65535, size=(1, 2048, 2048), dtype=np.uint16) for _ in range(3)]
    sent = [
        pa.record_batch(
            {"k": pa.array([k], pa.int64()), "frame": pa.FixedShapeTensorArray.from_numpy_ndarray(f)}
        )
        for k, f in enumerate(frames)
    ]
    for b in sent:
        ring.write_arrow_batch(b, "cam")
    stats = publish(ring, nats_url)
    assert (stats.records, stats.objects) == (3, 3)  # (each larger than the 1 MiB max_payload)
    with connect(nats_url) as daq, daq.reader(start="oldest") as reader:
        got = read_n(reader, 3)
    check_equal(got, sent, "h1.cam")
    for b, f in zip(got, frames, strict=True):
        col = b.batch.column("frame")
        assert isinstance(col.type, pa.FixedShapeTensorType)
        assert (col.type.value_type, col.type.shape) == (pa.uint16(), [2048, 2048])
        assert np.array_equal(col.to_numpy_ndarray(), f)
        assert b.batch.nbytes >= 8 << 20


@pytest.mark.timeout(120)
def test_two_readers_each_get_everything(nats_url: str, ring: RingBuffer) -> None:
    sent = [volt(i, rows=100) for i in range(100)]
    pub = PublisherThread(ring, nats_url, host="h1")
    pub.start()
    try:
        with connect(nats_url) as a, connect(nats_url) as b:
            ra, rb, rc = a.reader(), b.reader(), b.reader()
            for batch in sent:
                ring.write_arrow_batch(batch, "volt")
            got = [read_n(r, 100) for r in (ra, rb, rc)]
    finally:
        pub.stop()
    for g in got:
        check_equal(g, sent)
        assert [x.seq for x in g] == list(range(1, 101))


# -- losses upstream -------------------------------------------------------------------------------


def _lapping_writer(ring: RingBuffer, index: RowIndex | None) -> tuple[list[int], Any]:
    rows: list[int] = []

    def write(i: int) -> None:
        n = 100 + (i * 37) % 400
        rows.append(n)
        b = pa.record_batch({"i": np.full(n, i, np.int64), "x": np.arange(n, dtype=np.float64)})
        if index is not None:
            index.write(b, "volt")
        else:
            ring.write_arrow_batch(b, "volt")

    return rows, write


def _held(ring: RingBuffer) -> list[int]:
    return [r.seq for r in ring.reader("oldest").read()]


@pytest.mark.timeout(120)
def test_a_lapped_publisher_makes_readers_count_exact_losses(nats_url: str, ring_path: str) -> None:
    ring = RingBuffer.create(ring_path, capacity_mb=1)
    index = RowIndex(ring)
    rows, write = _lapping_writer(ring, index)
    try:
        for i in range(600):  # before any publisher: the ring keeps the last ones only
            write(i)
        held1 = _held(ring)
        f1 = held1[0]
        assert f1 > 0 and held1 == list(range(f1, 600))
        stats = publish(ring, nats_url, rows=index)
        assert (stats.records, stats.lost_records) == (600 - f1, f1)
        with connect(nats_url) as daq:
            first = daq.reader()
            got1 = read_n(first, 600 - f1)
            assert (first.lost_records, first.lost_rows) == (f1, sum(rows[:f1]))
            latest = daq.reader(start="latest")
            for i in range(600, 1200):  # with no publisher running: the ring laps it again
                write(i)
            held2 = _held(ring)
            f2 = held2[0]
            assert f2 > 600 and held2 == list(range(f2, 1200))
            stats = publish(ring, nats_url, rows=index)  # (resumes at 600: its stored position)
            assert (stats.records, stats.lost_records) == (1200 - f2, f2 - 600)
            from_seq = daq.reader(start=got1[-1].seq)  # from the last record before the loss
            oldest = daq.reader()
            got_first = got1 + read_n(first, 1200 - f2)
            got_latest = read_n(latest, 1200 - f2)
            got_from_seq = read_n(from_seq, 1200 - f2 + 1)
            got_oldest = read_n(oldest, 1200 - f1 - (f2 - 600))
            lost, lost_rows = f1 + f2 - 600, sum(rows[:f1]) + sum(rows[600:f2])
            for r in (first, oldest):
                assert (r.lost_records, r.lost_rows) == (lost, lost_rows)
                assert r.lost_by_stream() == {"h1.volt": (lost, lost_rows)}
            for r in (latest, from_seq):  # the second loss only, seen from its marker
                assert (r.lost_records, r.lost_rows) == (f2 - 600, sum(rows[600:f2]))
    finally:
        ring.close()
    for got in (got_first, got_oldest):
        assert [b.stream_seq for b in got] == held1 + held2
        assert [int(b.batch.column("i")[0].as_py()) for b in got] == held1 + held2
        assert [b.batch.num_rows for b in got] == [rows[s] for s in held1 + held2]
        assert sum(b.batch.num_rows for b in got) == sum(rows) - lost_rows
        assert {(b.lost_records, b.lost_rows) for b in got[: len(held1)]} == {(f1, sum(rows[:f1]))}
        assert {(b.lost_records, b.lost_rows) for b in got[len(held1) :]} == {(lost, lost_rows)}
    assert [b.stream_seq for b in got_latest] == held2
    assert [b.stream_seq for b in got_from_seq] == [held1[-1], *held2]


@pytest.mark.timeout(120)
def test_without_a_row_index_lost_rows_are_unknown(nats_url: str, ring_path: str) -> None:
    ring = RingBuffer.create(ring_path, capacity_mb=1)
    _, write = _lapping_writer(ring, None)
    try:
        for i in range(600):
            write(i)
        f1 = _held(ring)[0]
        publish(ring, nats_url)
    finally:
        ring.close()
    with connect(nats_url) as daq, daq.reader() as reader:
        got = read_n(reader, 600 - f1)
        assert (reader.lost_records, reader.lost_rows) == (f1, None)
    assert [b.stream_seq for b in got] == list(range(f1, 600))


# -- streams, filters, errors --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_streams_and_the_streams_filter(nats_url: str, ring: RingBuffer) -> None:
    volts = [volt(i, rows=50) for i in range(20)]
    rois = [pa.record_batch({"roi": np.full(3, i, np.uint8)}) for i in range(10)]
    for i in range(20):
        ring.write_arrow_batch(volts[i], "volt")
        if i % 2:
            ring.write_arrow_batch(rois[i // 2], "cam.roi 1")  # (dots and a space in names)
    publish(ring, nats_url, host="daq.lab")
    with connect(nats_url) as daq:
        assert daq.streams() == {"daq%2Elab.cam.roi 1": rois[0].schema, "daq%2Elab.volt": volts[0].schema}
        with daq.reader(streams="daq%2Elab.volt") as r:
            check_equal(read_n(r, 20), volts, "daq%2Elab.volt")
        with daq.reader(streams=["daq%2Elab.cam.roi 1"]) as r:
            got = read_n(r, 10)
            check_equal(got, rois, "daq%2Elab.cam.roi 1")
            assert {b.host for b in got} == {"daq.lab"}
        with daq.reader(streams=["daq%2Elab.cam.roi 1", "daq%2Elab.volt"]) as r:
            got = read_n(r, 30)
            assert sorted(b.seq for b in got) == list(range(1, 31))
        with daq.reader(streams=["daq%2Elab.elsewhere"]) as r:  # (not published, maybe later)
            assert r.read(timeout=0.5) == []
            with pytest.raises(UnknownStreamError, match="daq%2Elab.elsewhere"):
                r.read_table("daq%2Elab.elsewhere")
        with pytest.raises(UnknownStreamError, match="<host>.<stream>"):
            daq.reader(streams="volt")


@pytest.mark.timeout(120)
def test_a_reader_carries_on_through_a_server_restart(nats_server: NatsServer, ring: RingBuffer) -> None:
    sent = [volt(i, rows=100) for i in range(40)]
    url = nats_server.url
    for b in sent[:20]:
        ring.write_arrow_batch(b, "volt")
    publish(ring, url)
    daq = connect(url)
    try:
        reader = daq.reader()
        got = read_n(reader, 20)
        assert daq.connected
        nats_server.stop()
        time.sleep(1.5)  # (the client has tried to reconnect several times meanwhile)
        assert not daq.connected and reader.read(timeout=0.2) == []
        nats_server.start()  # the same port and store
        for b in sent[20:]:
            ring.write_arrow_batch(b, "volt")
        assert publish(ring, url).records == 20  # (resumed at its stored position)
        got += read_n(reader, 20)
        assert reader.lost_records == 0 and daq.connected
    finally:
        daq.close()
    check_equal(got, sent)
    assert [b.seq for b in got] == list(range(1, 41))


@pytest.mark.timeout(120)
def test_read_table_of_an_unknown_stream_raises(nats_url: str, ring: RingBuffer) -> None:
    ring.write_arrow_batch(volt(0, rows=10), "volt")
    publish(ring, nats_url)
    with connect(nats_url) as daq, daq.reader() as reader:
        with pytest.raises(UnknownStreamError, match="h1.volt"):
            reader.read_table("h1.nope")
        table = reader.read_table("h1.volt", timeout=5.0)
        assert table.equals(pa.Table.from_batches([volt(0, rows=10)]))
    with pytest.raises(JetStreamError, match="closed"):
        daq.streams()


@pytest.mark.timeout(120)
def test_a_slow_reader_pauses_and_loses_nothing(
    nats_url: str, ring: RingBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_consumer, "_INACTIVE", 1.0)  # (the server drops a paused consumer soon)
    monkeypatch.setattr(_consumer, "_CHECK", 0.3)
    sent = [volt(i, rows=100) for i in range(40)]
    for b in sent:
        ring.write_arrow_batch(b, "volt")
    publish(ring, nats_url)
    with connect(nats_url) as daq:
        with daq.reader(max_buffered_bytes=1) as one:  # (at least one batch)
            time.sleep(0.5)
            assert len(one.read()) == 1
        with daq.reader(max_buffered=4) as reader:
            time.sleep(0.5)
            got = reader.read()
            assert len(got) == 4
            name = reader._consumers[0].name
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # the buffer is full: no pull requests
                names = daq._call(daq._js.consumers_info(daq.stream))
                if name not in [c.name for c in names]:
                    break
                time.sleep(0.2)
            else:
                pytest.fail("the server kept the paused consumer")
            got += read_n(reader, 36)
            assert reader._consumers[0].name != name  # (made again, after the last received)
    check_equal(got, sent)
    assert [b.seq for b in got] == list(range(1, 41))


@pytest.mark.timeout(120)
def test_connect_errors_say_what_is_wrong(
    nats_url: str, nats_server_factory: Callable[..., NatsServer]
) -> None:
    t = time.monotonic()
    with pytest.raises(JetStreamError, match="cannot reach a NATS server"):
        connect(f"nats://127.0.0.1:{free_port()}")
    assert time.monotonic() - t < 3.0
    with pytest.raises(JetStreamError, match="scheme"):
        connect("http://127.0.0.1:4222")
    with pytest.raises(JetStreamError, match="holds credentials"):
        connect("nats://me:secret@127.0.0.1:4222")
    with pytest.raises(JetStreamError, match=r"no JetStream stream .*prefix 'nope'"):
        connect(f"{nats_url}/nope")
    with pytest.raises(JetStreamError, match=r"prefix 'run\.cam1'"):
        connect(nats_url, prefix="run.cam1")
    plain = nats_server_factory(jetstream=False).url
    with pytest.raises(JetStreamError, match="has no JetStream"):
        connect(plain)
    locked = nats_server_factory(user="rdaq", password="s3cret").url
    t = time.monotonic()
    with pytest.raises(JetStreamError, match="refused the credentials"):
        connect(locked, credentials=Credentials(user="rdaq", password="wrong"))
    assert time.monotonic() - t < 5.0
    with pytest.raises(JetStreamError, match="no JetStream stream"):  # (let in: no stream yet)
        connect(locked, credentials=Credentials(user="rdaq", password="s3cret"))


@pytest.mark.timeout(120)
def test_read_rate(nats_url: str, ring: RingBuffer, capsys: pytest.CaptureFixture[str]) -> None:
    n = 2000
    batch = pa.record_batch({"x": np.arange(1000, dtype=np.float64)})
    for _ in range(n):
        ring.write_arrow_batch(batch, "volt")
    publish(ring, nats_url)
    with connect(nats_url) as daq:
        t = time.perf_counter()
        with daq.reader() as reader:
            got = read_n(reader, n)
        rate = n / (time.perf_counter() - t - 0.3)  # (read_n waits 0.3 s for nothing more)
    assert all(b.batch.equals(batch) for b in got)
    with capsys.disabled():
        print(f"\nJetStream reader: {rate:.0f} records/s (1000-row float64 batches)")
    assert rate > 200
