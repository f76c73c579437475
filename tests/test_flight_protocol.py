"""The Flight protocol that the daemon's server and the client share (rust_daq.flight.protocol):
tickets and batch metadata as they are on the wire, and error codes in each Flight error's
extra_info, by which the client tells errors apart (never by their message). An in-process
daemon on a free loopback port, stock pyarrow.flight clients and rust_daq.remote."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as fl
import pytest

import rust_daq.remote
from rust_daq import UnknownStreamError
from rust_daq.flight import protocol
from rust_daq.flight.protocol import BatchMeta, RecordMeta, Ticket, error, error_info, parse_ticket, ticket
from rust_daq.remote import RemoteError

# -- the wire, without a daemon ------------------------------------------------------------------


def test_tickets_of_todays_clients_still_parse_and_round_trip() -> None:
    assert parse_ticket(b"camera") == Ticket("camera")
    assert parse_ticket(b'{"stream": "camera", "start": "oldest"}') == Ticket("camera", "oldest")
    assert parse_ticket(b'{"stream": "camera", "after_seq": 41}') == Ticket("camera", after_seq=41)
    assert parse_ticket(b'{"stream": "v", "last_rows": 1000}') == Ticket("v", last_rows=1000)
    assert ticket("camera").ticket == b"camera", "a bare name when that says it all"
    assert parse_ticket(b'{"stream": "v", "coalesce_ms": 20}') == Ticket("v", coalesce_ms=20)
    for t in [
        Ticket("c", "oldest"),
        Ticket("c", "latest", 41),
        Ticket("c", last_rows=5),
        Ticket("c"),
        Ticket("c", coalesce_ms=0),
        Ticket("c", "oldest", 3, coalesce_ms=12.5),
    ]:
        assert parse_ticket(t.encode()) == t
        assert set(json.loads(t.encode()) if t.encode().startswith(b"{") else {}) <= set(protocol.TICKET_KEYS)


def test_a_coalescing_ticket_is_refused_with_last_rows() -> None:
    with pytest.raises(fl.FlightServerError, match="coalesce_ms is for live subscriptions"):
        parse_ticket(b'{"stream": "v", "last_rows": 5, "coalesce_ms": 0}')


def test_batches_are_concatenated_without_pa_concat_batches_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow before 19 has no concat_batches: the same batch through a table."""
    from rust_daq.flight.subscription import concat

    a = pa.record_batch({"x": [1, 2], "s": ["a", None]})
    b = pa.record_batch({"x": [3], "s": ["c"]})
    want = pa.concat_batches([a, b])
    monkeypatch.delattr(pa, "concat_batches")
    got = concat([a, b])
    assert got.equals(want) and got.to_pydict() == {"x": [1, 2, 3], "s": ["a", None, "c"]}
    assert concat([a.slice(0, 0), b.slice(0, 0)]).num_rows == 0


def test_a_coalescing_ticket_is_refused_outside_0_to_1000_ms() -> None:
    for bad in [b"-1", b"1000.5", b"NaN", b"Infinity", b"true", b'"20"', b"[]", b"null"]:
        raw = b'{"stream": "v", "coalesce_ms": ' + bad + b"}"
        if bad == b"null":
            assert parse_ticket(raw) == Ticket("v"), "null: not given"
            continue
        with pytest.raises(fl.FlightServerError, match="coalesce_ms must be a number from 0 to 1000") as e:
            parse_ticket(raw)
        assert error_info(e.value).code == protocol.BAD_REQUEST


def test_batch_metadata_keeps_todays_keys_and_reads_an_older_daemons() -> None:
    meta = BatchMeta(seq=7, stream_seq=3, timestamp_ns=99, lost_records=2, lost_rows=None, rows_before=40)
    wire = json.loads(meta.encode().to_pybytes())
    assert wire == {
        "seq": 7,
        "stream_seq": 3,
        "timestamp_ns": 99,
        "lost_records": 2,
        "lost_rows": None,
        "rows_before": 40,
    }
    assert tuple(wire) == protocol.BATCH_KEYS[:-1], "one record: no records key (as for older clients)"
    assert BatchMeta.decode(meta.encode()) == meta
    assert meta.each(5) == [RecordMeta(7, 3, 99, 5, 40)]
    # A coalesced batch: each record's numbers and rows, in order.
    each = [RecordMeta(7, 3, 99, 2, 40), RecordMeta(9, 4, 120, 1, 42)]
    both = BatchMeta(7, 3, 99, 2, None, 40, each)
    wire = json.loads(both.encode().to_pybytes())
    assert tuple(wire) == protocol.BATCH_KEYS and wire["records"] == [[7, 3, 99, 2, 40], [9, 4, 120, 1, 42]]
    assert BatchMeta.decode(both.encode()) == both and both.each(3) == each
    old = pa.py_buffer(b'{"seq":1,"stream_seq":0,"timestamp_ns":5,"lost_records":0,"lost_rows":0}')
    assert BatchMeta.decode(old) == BatchMeta(1, 0, 5, 0, 0, None)


def test_an_error_carries_its_code_and_details_beside_a_one_line_message() -> None:
    e = error(protocol.SCHEMA_CHANGED, "stream 'v' changed\nits schema", stream="v", after_seq=4)
    assert type(e) is fl.FlightServerError and str(e) == "stream 'v' changed its schema"
    said = error_info(e)
    assert (said.code, said.message, said.details) == (
        protocol.SCHEMA_CHANGED,
        str(e),
        {"stream": "v", "after_seq": 4},
    )
    assert type(error(protocol.UNAUTHENTICATED, "x")) is fl.FlightUnauthenticatedError
    assert type(error(protocol.INTERNAL, "x")) is fl.FlightInternalError
    assert len(str(error(protocol.BAD_REQUEST, "y" * 10_000))) == protocol.MESSAGE_MAX
    # No code (an older daemon, the transport, garbage): a plain failure, whatever it says.
    for extra in [None, b"", b"not json", b'["code"]', b'{"code": 1}']:
        plain = fl.FlightServerError("unknown stream 'v'. Detail: Failed", extra_info=extra)
        assert error_info(plain).code is None and error_info(plain).message == "unknown stream 'v'"


# -- a daemon ------------------------------------------------------------------------------------


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """An in-process daemon without instruments (streams come by do_put)."""
    from rust_daq.cli import Session
    from rust_daq.daemon import Daemon

    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.delenv("RUST_DAQ_TOKEN", raising=False)
    name = f"/dev/shm/rdaq-test-protocol-{uuid.uuid4().hex[:8]}"
    d = Daemon(
        Session(instruments=[], ring_path=name, capacity_mb=1, output=None),
        port=0,
        own_ring=True,
        data_dir=tmp_path,
    )
    try:
        yield d
    finally:
        d._shutdown()
    assert not os.path.exists(name)


def _options(d: object) -> fl.FlightCallOptions:
    token = d.token_file.read_text().split()[0]  # type: ignore[attr-defined]
    return fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def _raised(call: Callable[[], object]) -> fl.FlightError:
    with pytest.raises(fl.FlightError) as e:
        r = call()
        if hasattr(r, "read_all"):
            r.read_all()
        elif r is not None:
            list(r)  # type: ignore[call-overload]
    return e.value


def _no_traceback(e: BaseException) -> str:
    text = str(e)
    assert "Traceback" not in text and 'File "' not in text and '", line ' not in text, text[:2000]
    said = error_info(e).message
    assert "\n" not in said and len(said) <= protocol.MESSAGE_MAX
    return said


def test_every_error_of_the_daemon_has_its_code_and_no_traceback(running: object) -> None:
    d = running
    client = fl.connect(d.url)  # type: ignore[attr-defined]
    opts = _options(d)
    cases: dict[str, list[Callable[[], object]]] = {
        protocol.UNKNOWN_STREAM: [
            lambda: client.do_get(fl.Ticket(b"nope"), opts),
            lambda: client.do_get(fl.Ticket(b"x" * 100_000), opts),
            lambda: client.get_flight_info(fl.FlightDescriptor.for_path("nope"), opts),
        ],
        protocol.BAD_REQUEST: [
            lambda: client.do_get(fl.Ticket(b"\xff"), opts),
            lambda: client.do_get(fl.Ticket(b'{"stream": "v", "speed": 1}'), opts),
            lambda: client.do_get(fl.Ticket(b'{"stream": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), opts),
            lambda: client.do_action(fl.Action("reboot", b""), opts),
            lambda: client.do_action(fl.Action("start_recording", b"{"), opts),
            lambda: client.get_flight_info(fl.FlightDescriptor.for_command(b"x"), opts),
            lambda: client.do_exchange(fl.FlightDescriptor.for_path("v"), opts)[1].read_all(),
        ],
        protocol.REFUSED: [
            lambda: client.do_action(fl.Action("stop_recording", b""), opts),
            lambda: client.do_action(fl.Action("start_recording", b'{"file": "../x.h5"}'), opts),
        ],
        protocol.UNAUTHENTICATED: [
            lambda: client.list_flights(),
            lambda: client.do_get(
                fl.Ticket(b"v"), fl.FlightCallOptions(headers=[(b"authorization", b"Bearer x")])
            ),
        ],
    }
    for code, calls in cases.items():
        for call in calls:
            e = _raised(call)
            _no_traceback(e)
            assert error_info(e).code == code, (code, str(e)[:300])

    def broken() -> dict[str, object]:
        return {}["no such key"]  # type: ignore[return-value]

    d.status = broken  # type: ignore[attr-defined]
    e = _raised(lambda: client.do_action(fl.Action("status", b""), opts))
    assert isinstance(e, fl.FlightInternalError) and error_info(e).code == protocol.INTERNAL
    assert _no_traceback(e) == "do_action: internal error in the daemon (KeyError); its log has the details"


def test_get_schema_errors_carry_no_traceback(running: object) -> None:
    """pyarrow's get_schema callback appends a formatted traceback to whatever the service
    raises (server._RequestError's comment): the daemon's exception cannot be formatted, so
    only its type name follows the message."""
    client = fl.connect(running.url)  # type: ignore[attr-defined]
    opts = _options(running)
    for descriptor in [fl.FlightDescriptor.for_path("nope"), fl.FlightDescriptor.for_command(b"x")]:
        with pytest.raises(pa.ArrowException) as e:
            client.get_schema(descriptor, opts)
        _no_traceback(e.value)
        assert "pyarrow/_flight.pyx" not in str(e.value) and "Python exception: _RequestError" in str(e.value)
    assert "unknown stream 'nope'" in str(e.value) or "a path of one element" in str(e.value)


def test_the_client_tells_errors_apart_by_code(running: object) -> None:
    d = running
    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        with pytest.raises(
            UnknownStreamError, match=r"^unknown stream 'nope'; the daemon's streams: none yet$"
        ):
            daq.latest("nope")
        # A bad ticket: a RemoteError with the daemon's message as it is.
        daq.put("v", pa.table({"a": [1, 2, 3]}))
        with pytest.raises(RemoteError) as e:
            daq.latest_table("v", rows=0)
        assert str(e.value) == "bad ticket: last_rows must be at least 1"
        assert type(e.value) is RemoteError and e.value.code == "bad_request"
        with pytest.raises(RemoteError) as e:
            daq.stop_recording()
        assert str(e.value) == "stop_recording: not recording"
        assert e.value.code == "refused"
        with pytest.raises(RemoteError) as e:
            daq.action("reboot")
        assert str(e.value).startswith("unknown action 'reboot'; the actions: status, ")


def test_the_client_does_not_mistake_a_message_for_a_code(running: object) -> None:
    """A refusal whose message reads like another error is still that refusal."""
    d = running

    def refuse(stream: str, batch: pa.RecordBatch) -> int:
        raise ValueError("unknown stream 'x' changed its schema")

    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        daq.put("v", pa.table({"a": [1]}))
        d.put = refuse  # type: ignore[attr-defined]
        with pytest.raises(RemoteError) as e:
            daq.put("v", pa.table({"a": [2]}))
        assert type(e.value) is RemoteError and "unknown stream 'x' changed its schema" in str(e.value)
        assert e.value.code == "refused"


def test_a_schema_change_resubscribes_the_reader_right_after_its_last_record(running: object) -> None:
    d = running
    a, b = pa.table({"x": [1, 2]}), pa.table({"x": [0.5], "y": ["new"]})
    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        daq.put("s", a)
        with daq.reader("s", start="oldest") as reader:
            got = reader.read(timeout=10)
            assert [g.batch.num_rows for g in got] == [2]
            daq.put("s", b)
            daq.put("s", b)
            deadline = time.monotonic() + 10
            while len(got) < 3 and time.monotonic() < deadline:
                got += reader.read(timeout=0.5)  # a schema_changed error would be raised here
            assert [g.batch.schema for g in got] == [a.schema, b.schema, b.schema]
            assert [g.stream_seq for g in got] == [0, 1, 2], "nothing skipped, nothing twice"
            assert (reader.lost_records, reader.lost_rows) == (0, 0)


def test_a_reader_from_the_oldest_record_gets_a_stream_whose_schema_changed_in_the_ring(
    running: object,
) -> None:
    """The ring holds records of the stream's old schema, then of its new one: a reader from
    the oldest gets both, in order (today it got an error at once: the subscription had the
    current schema and ended at the first record, with nothing to resume after)."""
    d = running
    a, b = pa.table({"x": [1, 2]}), pa.table({"x": [0.5], "y": ["new"]})
    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        for _ in range(3):
            daq.put("s", a)
        for _ in range(2):
            daq.put("s", b)
        for start_coalescing in (None, 0):
            with daq.reader("s", start="oldest", coalesce_ms=start_coalescing) as reader:
                got: list[rust_daq.remote.RemoteBatch] = []
                deadline = time.monotonic() + 10
                while len(got) < 5 and time.monotonic() < deadline:
                    got += reader.read(timeout=0.5)
            assert [g.batch.schema for g in got] == [a.schema] * 3 + [b.schema] * 2
            assert [g.stream_seq for g in got] == [0, 1, 2, 3, 4]
            assert [g.batch.column("x").to_pylist() for g in got] == [[1, 2]] * 3 + [[0.5]] * 2


class _Resubscribing(fl.FlightServerBase):  # type: ignore[misc]
    """A daemon's side of the protocol only: stream "s" sends stream_seq 0 and 1 (2 rows each),
    then its schema changes; the resubscription (after_seq 1) starts at stream_seq 5, rows 10:
    records 2 to 4 and their 6 rows were overwritten in between."""

    schema = pa.schema([("x", pa.int64())])

    def list_flights(self, context: fl.ServerCallContext, criteria: bytes) -> Iterator[fl.FlightInfo]:
        yield fl.FlightInfo(self.schema, fl.FlightDescriptor.for_path("s"), [], -1, -1)

    def do_get(self, context: fl.ServerCallContext, t: fl.Ticket) -> fl.FlightDataStream:
        after = parse_ticket(t.ticket).after_seq
        batch = pa.record_batch([pa.array([1, 2])], schema=self.schema)
        sent = [(seq, seq, 2 * seq) for seq in (0, 1)] if after is None else [(5, 5, 10)]

        def batches() -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
            for seq, stream_seq, rows_before in sent:  # lost_*: this subscription's own, none
                yield batch, BatchMeta(seq, stream_seq, 0, 0, 0, rows_before).encode()
            if after is None:
                raise error(protocol.SCHEMA_CHANGED, "stream 's' changed its schema", stream="s", after_seq=1)

        return fl.GeneratorStream(self.schema, batches())


def test_the_client_counts_what_it_lost_between_two_subscriptions() -> None:
    server = _Resubscribing("grpc://127.0.0.1:0")
    try:
        with rust_daq.remote.connect(f"grpc://127.0.0.1:{server.port}", token="") as daq:
            with daq.reader("s", start="oldest") as reader:
                got = list(reader)
        assert [(b.stream_seq, b.lost_records, b.lost_rows) for b in got] == [(0, 0, 0), (1, 0, 0), (5, 3, 6)]
        assert reader.lost_by_stream() == {"s": (3, 6)}
    finally:
        server.shutdown()


def _put_rows(daq: rust_daq.remote.RemoteDaq, stream: str, values: range) -> None:
    """One record of one row per value, in order."""
    schema = pa.schema([("x", pa.int64())])
    with daq.put_stream(stream, schema) as put:
        for v in values:
            put.write(pa.record_batch([pa.array([v])], schema=schema))


def _chunks(
    client: fl.FlightClient, opts: fl.FlightCallOptions, raw: bytes, n_rows: int
) -> list[fl.FlightStreamChunk]:
    call = client.do_get(fl.Ticket(raw), opts)
    chunks, rows = [], 0
    while rows < n_rows:
        chunk = call.read_chunk()
        chunks.append(chunk)
        rows += chunk.data.num_rows
    call.cancel()
    return chunks


def test_a_coalescing_subscription_sends_the_records_that_piled_up_as_one_batch(running: object) -> None:
    """1,000 one-row records in the ring before the subscription: a stock Flight client with
    coalesce_ms 0 gets them in a few batches (at most 256 records each), every record's
    numbers in the metadata; without coalesce_ms each record is a batch of its own, as
    clients that do not know the key expect."""
    d = running
    client = fl.connect(d.url)  # type: ignore[attr-defined]
    opts = _options(d)
    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        _put_rows(daq, "other", range(3))  # another stream's records in between are not sent
        _put_rows(daq, "v", range(500))
        _put_rows(daq, "other", range(3))
        _put_rows(daq, "v", range(500, 1000))
    chunks = _chunks(client, opts, b'{"stream": "v", "start": "oldest", "coalesce_ms": 0}', 1000)
    assert 4 <= len(chunks) <= 20, len(chunks)
    values, each = [], []
    for c in chunks:
        m = BatchMeta.decode(c.app_metadata)
        records = m.each(c.data.num_rows)
        assert len(records) <= 256 and sum(r.rows for r in records) == c.data.num_rows
        assert (m.seq, m.stream_seq, m.rows_before) == records[0][:2] + (records[0].rows_before,)
        values += c.data.column("x").to_pylist()
        each += records
    assert values == list(range(1000)), "every row once, in order"
    assert [r.stream_seq for r in each] == list(range(1000))
    assert [r.rows_before for r in each] == list(range(1000))
    seqs = [r.seq for r in each]
    assert seqs == sorted(seqs) and seqs[500] - seqs[499] == 4, "ring numbers, the other stream's between"
    assert all(r.rows == 1 for r in each)
    plain = _chunks(client, opts, b'{"stream": "v", "start": "oldest"}', 1000)
    assert len(plain) == 1000 and all(BatchMeta.decode(c.app_metadata).records is None for c in plain)


def test_a_coalescing_reader_gets_each_record_with_its_own_numbers(running: object) -> None:
    """Live: records put while it reads with coalesce_ms 200 come in fewer messages than
    records (the daemon's rows_sent counts rows), and the reader still gives them one by one."""
    d = running
    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        _put_rows(daq, "v", range(1))
        with daq.reader("v", start="oldest", coalesce_ms=200) as reader:
            got = reader.read(timeout=10)
            t0 = time.monotonic()
            _put_rows(daq, "v", range(1, 300))
            while len(got) < 300 and time.monotonic() < t0 + 20:
                got += reader.read(timeout=0.5)
        assert [g.batch.column("x").to_pylist() for g in got] == [[i] for i in range(300)]
        assert [g.stream_seq for g in got] == list(range(300))
        assert all(g.lost_records == 0 and g.lost_rows == 0 for g in got)
        seqs = [g.seq for g in got]
        assert seqs == sorted(set(seqs))
        for bad in [5000, -1, True, "20", float("nan")]:
            with pytest.raises(ValueError, match="coalesce_ms must be a number from 0 to 1000"):
                daq.reader("v", coalesce_ms=bad)  # type: ignore[arg-type]


def test_a_coalescing_reader_keeps_its_buffer_bound_record_by_record(running: object) -> None:
    """1,000 records piled up, sent in batches of 256: a reader of max_buffered=10 that does
    not read holds 10 of them, not a batch's 256; it then gets them all, in order."""
    d = running
    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        _put_rows(daq, "v", range(1000))
        with daq.reader("v", start="oldest", max_buffered=10) as reader:
            deadline = time.monotonic() + 10
            while len(reader._buf) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            assert len(reader._buf) == 10, "the bound holds within a coalesced batch"
            got: list[int] = []
            while len(got) < 1000 and time.monotonic() < deadline + 20:
                got += [v for b in reader.read(timeout=0.5) for v in b.batch.column("x").to_pylist()]
        assert got == list(range(1000))


def test_a_reader_ends_with_an_error_not_a_hang_on_metadata_it_cannot_read() -> None:
    """A daemon whose coalesced batch's records do not add up to its rows (another release, a
    bug): the reader raises saying so, after the good batch before it; it does not wait for
    ever on a receiving thread that died."""

    class Garbled(_Resubscribing):
        def do_get(self, context: fl.ServerCallContext, t: fl.Ticket) -> fl.FlightDataStream:
            batch = pa.record_batch([pa.array([1, 2])], schema=self.schema)
            bad = BatchMeta(1, 1, 0, 0, 0, 2, [RecordMeta(1, 1, 0, 5, 2)])  # 5 rows of 2
            return fl.GeneratorStream(
                self.schema, iter([(batch, BatchMeta(0, 0, 0, 0, 0, 0).encode()), (batch, bad.encode())])
            )

    server = Garbled("grpc://127.0.0.1:0")
    try:
        with rust_daq.remote.connect(f"grpc://127.0.0.1:{server.port}", token="") as daq:
            with daq.reader("s", start="oldest") as reader:
                got: list[rust_daq.remote.RemoteBatch] = []
                with pytest.raises(RemoteError, match="cannot read .*do not add up to its 2 rows"):
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:
                        got += reader.read(timeout=0.2)
                assert [b.stream_seq for b in got] == [0] and reader.ended
    finally:
        server.shutdown()


def test_a_remote_read_table_across_a_schema_change_promotes_it(running: object) -> None:
    d = running
    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        daq.put("s", pa.table({"x": [1, 2]}))
        daq.put("s", pa.table({"x": [3], "y": ["new"]}))
        with daq.reader("s", start="oldest") as reader:
            deadline = time.monotonic() + 10
            while len(reader._buf) < 2 and time.monotonic() < deadline:  # both in one read
                time.sleep(0.05)
            table = reader.read_table("s")
        assert table.schema.names == ["x", "y"]
        assert table.to_pylist() == [{"x": 1, "y": None}, {"x": 2, "y": None}, {"x": 3, "y": "new"}]
        with pytest.raises(UnknownStreamError, match="unknown stream 'nope'"):
            daq.reader("s").read_table("nope")


def test_a_reader_falls_back_to_a_record_a_message_with_a_daemon_older_than_coalescing() -> None:
    """A daemon that refuses the coalesce_ms key (as one before it did: an unknown key of the
    ticket) still serves a reader, which asks again without it."""

    class Older(_Resubscribing):
        def do_get(self, context: fl.ServerCallContext, t: fl.Ticket) -> fl.FlightDataStream:
            if b"coalesce_ms" in t.ticket:
                raise error(protocol.BAD_REQUEST, "bad ticket: unknown key(s) ['coalesce_ms']")
            return super().do_get(context, t)

    server = Older("grpc://127.0.0.1:0")
    try:
        with rust_daq.remote.connect(f"grpc://127.0.0.1:{server.port}", token="") as daq:
            with daq.reader("s", start="oldest") as reader:
                got = list(reader)
        assert [b.stream_seq for b in got] == [0, 1, 5]
    finally:
        server.shutdown()


def test_a_coalescing_subscription_holds_records_back_for_its_window(running: object) -> None:
    """100 records put 2 ms apart (each a round trip: the subscription is never behind):
    with coalesce_ms 100 they come in a handful of batches, not 100."""
    d = running
    client = fl.connect(d.url)  # type: ignore[attr-defined]
    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        _put_rows(daq, "v", range(1))
        chunks: list[fl.FlightStreamChunk] = []
        reading = threading.Thread(
            target=lambda: chunks.extend(
                _chunks(client, _options(d), b'{"stream": "v", "start": "oldest", "coalesce_ms": 100}', 101)
            )
        )
        reading.start()
        schema = pa.schema([("x", pa.int64())])
        t0 = time.monotonic()
        with daq.put_stream("v", schema) as put:
            for v in range(1, 101):
                put.write(pa.record_batch([pa.array([v])], schema=schema))
                time.sleep(0.002)
        elapsed = time.monotonic() - t0
        reading.join(timeout=30)
    assert sum(c.data.num_rows for c in chunks) == 101
    assert [v for c in chunks for v in c.data.column("x").to_pylist()] == list(range(101))
    # At most a batch per 100 ms window while they came (and the first record's own), far
    # from the 101 of a record a message.
    assert 2 <= len(chunks) <= min(elapsed / 0.1 + 3, 50), (len(chunks), elapsed)


def test_subscribers_of_one_stream_share_its_decoded_records_and_each_gets_all(running: object) -> None:
    """Six subscriptions at once (coalescing or not, from the oldest or after a record) over
    records decoded once and shared: each gets exactly its records, in order, every value
    its own; the shared copies stay within their bound."""
    from rust_daq.flight.subscription import SharedDecodes

    d = running
    with rust_daq.remote.connect(d.url) as daq:  # type: ignore[attr-defined]
        _put_rows(daq, "v", range(600))
        _put_rows(daq, "w", range(1000, 1600))
    tickets = [
        (b'{"stream": "v", "start": "oldest"}', list(range(600))),
        (b'{"stream": "v", "start": "oldest", "coalesce_ms": 0}', list(range(600))),
        (b'{"stream": "v", "start": "oldest", "coalesce_ms": 5}', list(range(600))),
        (b'{"stream": "w", "start": "oldest", "coalesce_ms": 0}', list(range(1000, 1600))),
        (b'{"stream": "w", "start": "oldest"}', list(range(1000, 1600))),
    ]
    got: dict[int, list[int]] = {}

    def read(i: int, raw: bytes, n: int) -> None:
        client = fl.connect(d.url)  # type: ignore[attr-defined]
        got[i] = [v for c in _chunks(client, _options(d), raw, n) for v in c.data.column("x").to_pylist()]

    threads = [
        threading.Thread(target=read, args=(i, raw, len(want))) for i, (raw, want) in enumerate(tickets)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert {i: got.get(i) for i in range(len(tickets))} == {i: want for i, (_, want) in enumerate(tickets)}
    # After a record: a later start, from the shared copies too.
    client = fl.connect(d.url)  # type: ignore[attr-defined]
    first = BatchMeta.decode(
        _chunks(client, _options(d), b'{"stream": "v", "start": "oldest"}', 1)[0].app_metadata
    )
    later = _chunks(
        client, _options(d), json.dumps({"stream": "v", "after_seq": first.seq + 100}).encode(), 1
    )
    assert later[0].data.column("x").to_pylist()[0] == 101, "v's records are consecutive in the ring"
    # The bound: records and bytes, the oldest dropped first.
    shared = SharedDecodes(max_records=3, max_bytes=100)
    info = object()
    batch = pa.record_batch({"x": [1]})
    for seq, size in [(1, 10), (2, 10), (3, 10), (4, 10)]:
        shared.put(seq, (info, _sent(seq, batch, size)))  # type: ignore[arg-type]
    assert shared.get(1) is None and [shared.get(s) is not None for s in (2, 3, 4)] == [True] * 3
    shared.put(5, (info, _sent(5, batch, 95)))  # type: ignore[arg-type]
    assert [shared.get(s) is not None for s in (2, 3, 4, 5)] == [False, False, False, True], "bytes bound"


def _sent(seq: int, batch: pa.RecordBatch, size: int) -> object:
    from rust_daq.flight.subscription import _Sent

    return _Sent(seq, seq, 0, batch, None, size)


@pytest.mark.timeout(180)
def test_lapped_subscribers_sharing_decoded_records_get_each_record_right_or_count_it_lost(
    running: object,
) -> None:
    """Two streams of 2 kB records through the daemon's 1 MiB ring, seven subscriptions at
    once: fast and slow (lapped), coalescing or not, all sharing decoded copies. Each gets
    its own stream's records only, every value its own, none twice, in order; what it missed
    is exactly what its lost_records says, and rows_before is each record's."""
    d = running
    n = 3000
    schema = pa.schema([("stream", pa.string()), ("v", pa.int64()), ("pad", pa.string())])

    def record(name: str, v: int) -> pa.RecordBatch:
        return pa.record_batch(
            [pa.array([name] * 2), pa.array([v, v]), pa.array(["p" * 2000, "x"])], schema=schema
        )

    for name in ("a", "b"):
        d.put(name, record(name, -1))  # type: ignore[attr-defined]
    subs = [
        ("a", None, 0.0),
        ("a", 0, 0.0),
        ("a", 5, 0.0),
        ("a", 0, 0.01),
        ("a", None, 0.002),
        ("b", 0, 0.0),
        ("b", 20, 0.05),
    ]
    results: dict[int, list[tuple[int, int, list[str], list[int], int | None, int]]] = {}

    def subscribe(i: int, name: str, coalesce: float | None, slow: float) -> None:
        body: dict[str, object] = {"stream": name, "start": "oldest"}
        if coalesce is not None:
            body["coalesce_ms"] = coalesce
        call = fl.connect(d.url).do_get(fl.Ticket(json.dumps(body).encode()), _options(d))  # type: ignore[attr-defined]
        got = results[i] = []
        while not got or got[-1][1] < n + 1:  # (the end marker's)
            chunk = call.read_chunk()
            meta, offset = BatchMeta.decode(chunk.app_metadata), 0
            for r in meta.each(chunk.data.num_rows):
                part = chunk.data.slice(offset, r.rows)
                offset += r.rows
                got.append(
                    (
                        r.seq,
                        r.stream_seq,
                        part.column("stream").to_pylist(),
                        part.column("v").to_pylist(),
                        r.rows_before,
                        meta.lost_records,
                    )
                )
            time.sleep(slow)
        call.cancel()

    readers = [threading.Thread(target=subscribe, args=(i, *s)) for i, s in enumerate(subs)]
    for t in readers:
        t.start()
    time.sleep(0.5)

    def produce(name: str) -> None:
        for v in range(n):
            d.put(name, record(name, v))  # type: ignore[attr-defined]

    producers = [threading.Thread(target=produce, args=(name,)) for name in ("a", "b")]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    # An end marker each, once nothing else is written: a subscriber lapped past a stream's
    # last record (by the other stream's) would wait for it for ever.
    for name in ("a", "b"):
        d.put(name, record(name, n))  # type: ignore[attr-defined]
    for t in readers:
        t.join(timeout=120)
    lapped = 0
    for i, (name, _, _) in enumerate(subs):
        got = results[i]
        stream_seqs = [g[1] for g in got]
        assert stream_seqs[0] == 0 and stream_seqs[-1] == n + 1, i
        assert all(g[2] == [name] * 2 and g[3] == [g[1] - 1] * 2 for g in got), f"{i}: a value not its own"
        assert stream_seqs == sorted(set(stream_seqs)), f"{i}: twice or out of order"
        assert [g[0] for g in got] == sorted({g[0] for g in got})
        missed = n + 2 - len(got)
        assert got[-1][5] == missed, f"{i}: lost_records says {got[-1][5]}, {missed} missed"
        assert all(g[4] is None or g[4] == 2 * g[1] for g in got), f"{i}: rows_before"
        lapped += missed > 0
    assert lapped >= 1, "the slow subscribers were lapped (what the test is for)"
