"""The Flight protocol that the daemon's server and the client share (rust_daq.flight.protocol):
tickets and batch metadata as they are on the wire, and error codes in each Flight error's
extra_info, by which the client tells errors apart (never by their message). An in-process
daemon on a free loopback port, stock pyarrow.flight clients and rust_daq.remote."""

from __future__ import annotations

import json
import os
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
from rust_daq.flight.protocol import BatchMeta, Ticket, error, error_info, parse_ticket, ticket
from rust_daq.remote import RemoteError

# -- the wire, without a daemon ------------------------------------------------------------------


def test_tickets_of_todays_clients_still_parse_and_round_trip() -> None:
    assert parse_ticket(b"camera") == Ticket("camera")
    assert parse_ticket(b'{"stream": "camera", "start": "oldest"}') == Ticket("camera", "oldest")
    assert parse_ticket(b'{"stream": "camera", "after_seq": 41}') == Ticket("camera", after_seq=41)
    assert parse_ticket(b'{"stream": "v", "last_rows": 1000}') == Ticket("v", last_rows=1000)
    assert ticket("camera").ticket == b"camera", "a bare name when that says it all"
    for t in [Ticket("c", "oldest"), Ticket("c", "latest", 41), Ticket("c", last_rows=5), Ticket("c")]:
        assert parse_ticket(t.encode()) == t
        assert set(json.loads(t.encode()) if t.encode().startswith(b"{") else {}) <= set(protocol.TICKET_KEYS)


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
    assert tuple(wire) == protocol.BATCH_KEYS
    assert BatchMeta.decode(meta.encode()) == meta
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
