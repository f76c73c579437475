"""Case 8: a daemon's streams over Arrow Flight on loopback, beside a local ring reader.

A spawned process runs the daemon (``rust_daq.daemon.Daemon``: its ring, its row index, its
Flight server on 127.0.0.1) and fills the ring through the daemon's own ``put`` path with
two interleaved streams: ``voltmeter``, 1,000-row batches of (int64 timestamp, float64
voltage), 16 kB each; ``camera``, one 1024x1024 uint16 frame (2 MiB) per record with its
int64 frame_id. Then it marks itself stopping, so that a subscription ends at the last
record, and serves until this process is done.

This process reads each stream from the oldest record to the end, several times, the
readers interleaved so that all see the same machine state:

- local ring reader, ``read_batches(copy=True)`` and ``copy=False``: the same ring file,
  mapped here (what a process on the daemon's machine gets; the ceiling for the network);
- Flight ``do_get`` with pyarrow's client (``read_chunk`` until the end): the protocol alone;
- ``rust_daq.remote`` reader (``read_batches``): what a notebook on another machine uses, with
  its receiving thread and buffer.

Every reader checks that it got every batch of the stream, in order (the first timestamp or
frame_id of each), and reports rows/s and MB/s of Arrow payload.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

import rust_daq.remote
from rust_daq import RingBuffer
from rust_daq._access import local_token
from rust_daq.cli import Session
from rust_daq.daemon import Daemon
from rust_daq.flight import ticket

from ._common import MiB, Table, fmt_rate, median_of, shm_path

# Not fork: this process has gRPC's threads running by the time the later daemons start (the
# Flight readers of case 8), and a forked copy of their locks aborts the child
# ("Mutex::Fer with pending CondVar queueing").
CTX = mp.get_context("spawn")

VOLT_ROWS = 1000
FRAME = (1024, 1024)

STREAMS = {
    "voltmeter": f"voltmeter, {VOLT_ROWS:,}-row batches (16 kB)",
    "camera": f"camera, {FRAME[0]}x{FRAME[1]} uint16 frames (2 MiB)",
}

READERS = {
    "local_view": "local ring reader, `read_batches(copy=False)`",
    "local_copy": "local ring reader, `read_batches(copy=True)`",
    "flight": "Flight `do_get` on loopback (pyarrow client)",
    "remote": "Flight on loopback, `rust_daq.remote` reader",
}


def _volt(k: int) -> pa.RecordBatch:
    t = np.arange(k * VOLT_ROWS, (k + 1) * VOLT_ROWS, dtype=np.int64)
    return pa.record_batch([t, np.sin(t / 100.0)], names=["timestamp", "voltage"])


def _frame(k: int, pool: list[np.ndarray[Any, Any]]) -> pa.RecordBatch:
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(pool[k % len(pool)])
    return pa.record_batch([pa.array([k], pa.int64()), tensor], names=["frame_id", "frame"])


def _serve(
    ring_path: str,
    counts: dict[str, int],
    ready: Any,
    done: Any,
    volt: Callable[[int], pa.RecordBatch] = _volt,
) -> None:
    """The daemon process: fill its ring (the voltmeter's batches from `volt`), report its
    URL, serve until `done`."""
    capacity = counts["voltmeter"] * (volt(0).nbytes + 512) + counts["camera"] * (
        2 * FRAME[0] * FRAME[1] + 512
    )
    session = Session(
        instruments=[],  # a daemon fed by remote instruments (do_put) alone
        ring_path=ring_path,
        capacity_mb=capacity * 1.25 / MiB + 16,
        output=None,
    )
    try:
        d = Daemon(session, host="127.0.0.1", port=0, own_ring=True)
    except BaseException as e:
        ready.put(f"error: {e!r}")
        raise
    try:
        rng = np.random.default_rng(0)
        pool = [rng.integers(0, 4096, (1, *FRAME), dtype=np.uint16) for _ in range(4)]
        per_frame = max(counts["voltmeter"] // max(counts["camera"], 1), 1)
        f = 0
        for k in range(counts["voltmeter"]):
            d.put("voltmeter", volt(k))
            if k % per_frame == 0 and f < counts["camera"]:
                d.put("camera", _frame(f, pool))
                f += 1
        while f < counts["camera"]:
            d.put("camera", _frame(f, pool))
            f += 1
        if d.ring.records_lost:
            raise RuntimeError("the benchmark ring was lapped while filling it")
        d.end_subscriptions()  # subscriptions end at the last record
        ready.put(d.url)
        done.wait(600)
    except BaseException as e:
        ready.put(f"error: {e!r}")
        raise
    finally:
        d.close()  # (own_ring: the ring is removed)


def _wait_for(ready: Any, server: Any, timeout: float) -> str:
    """The daemon's URL, or why it did not start (the process may die before it can say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            url: str = ready.get(timeout=0.5)
        except queue.Empty:
            if not server.is_alive():
                raise RuntimeError(f"the daemon process died (exit {server.exitcode})") from None
            continue
        if url.startswith("error"):
            raise RuntimeError(f"the daemon process failed: {url}")
        return url
    raise TimeoutError(f"the daemon process was not ready after {timeout:.0f} s")


def _first(stream: str, batch: pa.RecordBatch) -> int:
    v = batch.column(0)[0].as_py()
    return int(v) // VOLT_ROWS if stream == "voltmeter" else int(v)


class _Check:
    """Every batch of the stream, in order: counts rows and bytes, raises on a gap."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.k = self.rows = self.bytes = 0

    def add(self, batch: pa.RecordBatch) -> None:
        got = _first(self.stream, batch)
        if got != self.k:
            raise RuntimeError(f"{self.stream}: batch {self.k} expected, got {got}")
        self.k += 1
        self.rows += batch.num_rows
        self.bytes += batch.nbytes


def _local(ring: RingBuffer, stream: str, copy: bool) -> _Check:
    check = _Check(stream)
    reader = ring.reader("oldest")
    end = ring.write_head
    while reader.position < end:
        got = reader.read_batches(max_records=256, copy=copy)
        for name, b in got:
            if name == stream:
                check.add(b)
        if not copy and got and not reader.batch_valid(got[-1][1]):
            raise RuntimeError("the ring was overwritten under a zero-copy read")
    return check


def _flight(client: fl.FlightClient, options: fl.FlightCallOptions, stream: str) -> _Check:
    check = _Check(stream)
    call = client.do_get(ticket(stream, "oldest"), options=options)
    while True:
        try:
            chunk = call.read_chunk()
        except StopIteration:
            return check
        check.add(chunk.data)


def _remote(daq: rust_daq.remote.RemoteDaq, stream: str) -> _Check:
    check = _Check(stream)
    with daq.reader(stream, "oldest") as r:
        while not r.ended:
            for _, b in r.read_batches(timeout=1.0):
                check.add(b)
        if r.lost_records:
            raise RuntimeError(f"the remote reader lost {r.lost_records} records")
    return check


def run(quick: bool, reps: int) -> dict[str, Any]:
    counts = {"voltmeter": 1000 if quick else 5000, "camera": 24 if quick else 120}
    ring_path = shm_path("flight")
    ready, done = CTX.Queue(), CTX.Event()
    server = CTX.Process(target=_serve, args=(ring_path, counts, ready, done), daemon=True)
    server.start()
    try:
        url = _wait_for(ready, server, 300)
        runs: dict[str, dict[str, list[tuple[float, float]]]] = {s: {r: [] for r in READERS} for s in STREAMS}
        client = fl.connect(url)
        # A stock client sends the daemon's token itself (the file it wrote for its own user).
        token = local_token(url)
        options = fl.FlightCallOptions(
            headers=[(b"authorization", f"Bearer {token}".encode())] if token else []
        )
        daq = rust_daq.remote.connect(url)
        with RingBuffer.open(ring_path) as ring:
            for _ in range(reps):
                for stream in STREAMS:
                    for r in READERS:
                        t0 = time.perf_counter()
                        if r == "local_view":
                            check = _local(ring, stream, copy=False)
                        elif r == "local_copy":
                            check = _local(ring, stream, copy=True)
                        elif r == "flight":
                            check = _flight(client, options, stream)
                        else:
                            check = _remote(daq, stream)
                        dt = time.perf_counter() - t0
                        if check.k != counts[stream]:
                            raise RuntimeError(f"{r}: {check.k} of {counts[stream]} {stream} batches")
                        runs[stream][r].append((check.rows / dt, check.bytes / dt))
        client.close()
        daq.close()
    finally:
        done.set()
        server.join(timeout=60)
        if server.is_alive():
            server.kill()
    seconds = 3.0 if quick else 10.0
    loops = [
        loop_with_subscribers(n, seconds, rt, c, cpus)
        for n, rt, c, cpus in (
            (0, False, 0, None),
            (50, False, None, None),
            (50, False, 0, None),
            (50, False, 20, None),
            (50, False, 0, off_loop_cpus()),
            (50, True, 0, None),
        )
    ]
    return {
        "loop_with_subscribers": loops,
        "loop_seconds": seconds,
        "counts": counts,
        "rates": {
            s: {
                r: {
                    "rows_per_s": median_of([x for x, _ in v]),
                    "bytes_per_s": median_of([y for _, y in v]),
                }
                for r, v in by.items()
            }
            for s, by in runs.items()
        },
    }


def tables(res: dict[str, Any]) -> list[Table]:
    rates = res["rates"]
    rows = []
    for r, label in READERS.items():
        row = [label]
        for s in STREAMS:
            x = rates[s][r]
            local = rates[s]["local_copy"]["bytes_per_s"]
            row.append(
                f"{fmt_rate(x['rows_per_s'])} rows/s, {x['bytes_per_s'] / 1e6:,.0f} MB/s "
                f"({x['bytes_per_s'] / local:.2f}x)"
            )
        rows.append(row)
    return [
        Table(
            "Case 8: a daemon's stream read from its oldest record to the end, over Flight and locally",
            ["", *STREAMS.values()],
            rows,
            notes=[
                "(x): against the local reader with copies, in the same run. The daemon and the "
                "client share this machine's cores: on loopback the network costs CPU on both "
                "ends, not bandwidth."
            ],
        ),
        Table(
            f"Case 8 and 6: the daemon's 1 kHz loop for {res['loop_seconds'] + _START_ALLOWANCE:.0f} s, with "
            f"live Flight subscribers from its first {_START_ALLOWANCE:.0f} s on",
            [
                "subscribers",
                "records a message",
                "subscribers' CPUs",
                "loop",
                "reads",
                "rows each subscriber got (min)",
                "missed deadlines",
                "read jitter p99",
                "p99.9",
                "max",
            ],
            [
                [
                    str(x["subscribers"]),
                    _per_message(x) if x["subscribers"] else "",
                    _cpus(x.get("subscriber_cpus")) if x["subscribers"] else "",
                    "SCHED_FIFO"
                    if str(x.get("sched_fifo", "")).startswith("applied")
                    else (f"normal ({x['sched_fifo']})" if x.get("asked_realtime") else "normal"),
                    f"{x['reads']:,}",
                    f"{x['rows_received_min']:,}" if x["subscribers"] else "",
                    f"{x['missed']:,}",
                    *[f"{x[k]:.1f} µs" for k in ("p99", "p99.9", "max")],
                ]
                for x in res.get("loop_with_subscribers", [])
            ],
            notes=[
                "Records a message: one (a subscription without `coalesce_ms`, as other Flight clients get "
                "them), those that piled up (`coalesce_ms=0`, the client's default), or also those within "
                "20 ms of the first (`coalesce_ms=20`, a live display's 50 Hz); the reader gives each "
                "record on its own either way. "
                "The 50 subscribers: `rust_daq.remote` readers of the voltmeter stream in one process of "
                "their own, started once the daemon serves, all subscribed "
                + _subscribed(res.get("loop_with_subscribers", []))
                + " later. The daemon serves Flight from a process of its own (`rust_daq.flight.process`): "
                "subscriptions read the ring, decode and send there, at nice 10, and off the CPU the loop "
                "keeps busy (`Acquisition.loop_cpu`: the last); the loop's process only produces. "
                "Subscribers' CPUs: any (the subscribers' process shares both cores with the loop, as it "
                "would not on a beamline, and takes CPU time from a loop at normal priority), or all but "
                "the loop's (what subscribers on other hosts leave it). `[acquisition] realtime = true` "
                "(SCHED_FIFO) gives the loop the CPU first, whatever runs beside it."
            ],
        ),
    ]


def _subscribed(loops: list[dict[str, Any]]) -> str:
    took = [x["subscribed_after_s"] for x in loops if x["subscribers"] and "subscribed_after_s" in x]
    return f"{min(took):.1f} to {max(took):.1f} s" if took else "some time"


def _cpus(cpus: list[int] | None) -> str:
    return "any" if not cpus else ",".join(map(str, cpus))


def _per_message(x: dict[str, Any]) -> str:
    c = x.get("coalesce_ms", None)
    return "one" if c is None else "piled up" if c == 0 else f"within {c:g} ms"


# -- the loop's deadlines with subscribers (case 6) ------------------------------------------------

_START_ALLOWANCE = 3.0  # seconds the loop runs before `seconds` with its subscribers


def _daemon_loop(ring_path: str, seconds: float, realtime: bool, ready: Any, result: Any) -> None:
    """A daemon acquiring a 1 kHz voltmeter for `seconds`, every read written at once (its loop
    under SCHED_FIFO if `realtime`); reports its URL when serving, then the loop's missed
    deadlines and read jitter."""
    from rust_daq.adapters import SimulatedVoltmeter

    session = Session(
        instruments=[SimulatedVoltmeter(rate_hz=1000)], ring_path=ring_path, capacity_mb=64, output=None
    )
    session = dataclasses.replace(session, duration=seconds, realtime={} if realtime else None)
    d = Daemon(session, host="127.0.0.1", port=0, own_ring=True)
    assert d.acq is not None
    d.acq.batch_rows = 1
    stats = d.run(on_ready=lambda dm: ready.put(dm.url))
    v = stats["streams"]["voltmeter"]
    sched = (stats.get("realtime") or {}).get("sched_fifo", "not asked")
    result.put(
        {
            "missed": v["deadlines_missed"],
            "reads": v["reads"],
            **v["jitter_us"],
            "sched_fifo": sched,
            "flight_cpus": d.flight.cpus,
        }
    )


@contextmanager
def _on_cpus(cpus: list[int] | None) -> Iterator[None]:
    """This thread on `cpus` (if given) meanwhile: what it starts inherits them."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _subscribe(url: str, n: int, coalesce_ms: float | None, seconds: float, ready: Any, result: Any) -> None:
    """`n` ``rust_daq.remote`` readers of the voltmeter from its latest record (says when
    all are subscribed), each read until its stream ends (`seconds` and a minute at most);
    reports the rows each got."""
    received = [0] * n
    daq = rust_daq.remote.connect(url)
    appears = time.monotonic() + 30
    while "voltmeter" not in daq.streams() and time.monotonic() < appears:
        time.sleep(0.01)  # (a stream exists from its first record on)
    readers = [daq.reader("voltmeter", "latest", coalesce_ms=coalesce_ms) for _ in range(n)]
    ready.put(True)
    deadline = time.monotonic() + seconds + 60
    live = set(range(n))
    while live and time.monotonic() < deadline:
        for i in list(live):
            try:
                received[i] += sum(b.num_rows for _, b in readers[i].read_batches(timeout=0.0))
            except rust_daq.remote.RemoteError:  # cut at the daemon's exit (behind by > 15 s)
                live.discard(i)
            if readers[i].ended:
                live.discard(i)
        time.sleep(0.01)
    for r in readers:
        r.close()
    daq.close()
    result.put(received)


def off_loop_cpus() -> list[int] | None:
    """The CPUs but the one a daemon's spinning loop keeps busy (the last: ``loop_cpu``), for
    subscribers that leave the loop's CPU alone, as those on other hosts do; None with one CPU."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[:-1] if len(allowed) > 1 else None


def loop_with_subscribers(
    subscribers: int,
    seconds: float,
    realtime: bool = False,
    coalesce_ms: float | None = 0,
    cpus: list[int] | None = None,
) -> dict[str, Any]:
    """Case 6 beside Flight: the daemon's loop with `subscribers` live subscriptions (each a
    ``rust_daq.remote`` reader of the voltmeter, receiving every record, sent as the
    subscription's `coalesce_ms` says, in a process of their own, on `cpus` if given), its
    loop under SCHED_FIFO if `realtime` (and permitted)."""
    ring_path = shm_path("subs")
    ready, result, got, subscribed = CTX.Queue(), CTX.Queue(), CTX.Queue(), CTX.Queue()
    # The loop runs _START_ALLOWANCE s longer than `seconds`: the subscribers' process starts
    # once the daemon serves, and subscribes within that (it says when; checked below).
    run = seconds + _START_ALLOWANCE
    server = CTX.Process(target=_daemon_loop, args=(ring_path, run, realtime, ready, result), daemon=True)
    server.start()
    client = None
    try:
        url = _wait_for(ready, server, 120)
        t0 = time.monotonic()
        if subscribers:
            client = CTX.Process(
                target=_subscribe, args=(url, subscribers, coalesce_ms, run, subscribed, got), daemon=True
            )
            with _on_cpus(cpus):  # (from its start: the pools it sizes at import see them)
                client.start()
            subscribed.get(timeout=120)
        took = time.monotonic() - t0
        out: dict[str, Any] = result.get(timeout=run + 120)
        received: list[int] = got.get(timeout=run + 120) if client is not None else []
    finally:
        for p in (client, server):
            if p is not None:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    out["subscribers"] = subscribers
    out["coalesce_ms"] = coalesce_ms
    out["asked_realtime"] = realtime
    out["subscriber_cpus"] = cpus
    out["rows_received_min"] = min(received) if received else 0
    out["subscribed_after_s"] = took
    out["loop_seconds"] = run
    return out
