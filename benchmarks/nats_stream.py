"""Case 10: a ring's records to NATS JetStream and on into HDF5, beside a plain nats-py loop,
the daemon's Flight path and the local ring reader, in one run.

    python -m benchmarks --cases nats        (or: python -m benchmarks.nats_stream [--quick])

The case starts its own ``nats-server -js`` (file storage in a scratch directory of the
storage cases' place, ``max_payload: 8MB`` so that a 2 MiB frame is one message) on a free
loopback port, and stops it at the end; without nats-server or nats-py it is skipped, saying
so. Two kinds of data, each its own ring, filled once before measuring:

- ``voltmeter``: 1,000-row float64 batches (8 kB Arrow records);
- ``camera``: one 1024x1024 uint16 frame per record (a fixed_shape_tensor, 2 MiB) and its
  int64 frame_id.

Each repetition, for each kind, the paths interleaved so that all see the same machine state
(the three publishing ones in turn, in the opposite order every other repetition):

- ``publisher``: ``rust_daq.nats.Publisher`` reads the ring and publishes every record to a
  fresh JetStream stream until all are acknowledged (timed from its ``on_ready``: connected,
  stream and buckets made);
- ``plain``: the peer, what a user writes by hand with nats-py: ``await js.publish(subject,
  payload)`` per message, the same payloads (the ring's Arrow messages, already in memory);
- ``plain_async``: the same with ``publish_async`` and one ``publish_async_completed()`` at
  the end (nats-py's pipelining, up to 4,000 in flight);
- ``hdf5``: end to end, ``JetStreamSource`` + ``HDF5Writer`` (``flush_to_disk`` in a loop)
  from the stream the publisher filled into an HDF5 file, timed from the source's
  construction to the flush that holds the last record;
- ``flight``: the same data in a daemon's ring (``rust_daq.daemon``, filled through its
  ``put``) read from the oldest record to the end over Flight on loopback, by the
  ``rust_daq.remote`` reader and by pyarrow's ``do_get`` (case 8's helpers);
- ``ring``: the local ring reader, ``read_batches(copy=True)``, over the publisher's ring.

Every path checks that it got or stored every record (counts, acknowledgements, rows in the
file; the readers the order too) and reports rows/s; MB/s of Arrow payload beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from . import flight
from ._common import Goal, MiB, Table, fmt_rate, median_of, scratch_dir, shm_path, storage_dir

VOLT_ROWS = 1000
HOST = "bench"

KINDS = {
    "voltmeter": f"{VOLT_ROWS:,}-row float64 batches (8 kB)",
    "camera": "1024x1024 uint16 frames (2 MiB)",
}

PATHS = {
    "publisher": "ring -> `rust_daq.nats.Publisher` -> JetStream, until all acknowledged",
    "plain": "plain nats-py loop, `await js.publish()` per message",
    "plain_async": "nats-py `publish_async` + `publish_async_completed()` (pipelined)",
    "hdf5": "end to end: JetStream -> `JetStreamSource` + `HDF5Writer` -> HDF5 file",
    "flight_remote": "Flight on loopback, `rust_daq.remote` reader (daemon's ring)",
    "flight_doget": "Flight on loopback, pyarrow `do_get` (daemon's ring)",
    "ring": "local ring reader, `read_batches(copy=True)`",
}


def _volt(k: int) -> pa.RecordBatch:
    """Batch k: 1,000 float64 values from k * 1,000 (case 8's check reads batch k from it)."""
    return pa.record_batch([np.arange(k * VOLT_ROWS, (k + 1) * VOLT_ROWS, dtype=np.float64)], names=["value"])


def _counts(quick: bool) -> dict[str, int]:
    return {"voltmeter": 3000 if quick else 20000, "camera": 60 if quick else 300}


def why_not() -> str | None:
    """Why the case cannot run here (None: it can)."""
    if _server_binary() is None:
        return "nats-server is not installed (apt-get install nats-server)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (pip install nats-py)"
    return None


def _server_binary() -> str | None:
    return shutil.which("nats-server")


class _Server:
    """A nats-server with JetStream on a free loopback port, its store in a scratch directory."""

    def __init__(self, base: str) -> None:
        exe = _server_binary()
        assert exe is not None
        self.dir = scratch_dir(base)
        conf = os.path.join(self.dir, "nats.conf")
        with open(conf, "w") as f:
            f.write("max_payload: 8MB\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = os.path.join(self.dir, "nats.log")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    exe,
                    "-c",
                    conf,
                    "-js",
                    "-sd",
                    os.path.join(self.dir, "js"),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.url = f"nats://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"nats-server exited ({self.proc.returncode}): {self._tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError("nats-server did not listen within 15 s") from None
                time.sleep(0.05)

    def _tail(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-500:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _fill(kind: str, n: int) -> tuple[Any, str, list[bytes], int]:
    """A ring holding `n` records of `kind`; its path, the records' payloads, bytes of Arrow."""
    from rust_daq import RingBuffer

    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 4096, (1, *flight.FRAME), dtype=np.uint16) for _ in range(4)]
    make: Callable[[int], pa.RecordBatch] = (
        _volt if kind == "voltmeter" else (lambda k: flight._frame(k, pool))
    )
    size = make(0).nbytes + 1024
    path = shm_path(f"nats-{kind}")
    ring = RingBuffer.create(path, capacity_bytes=int(n * size * 1.1) + 16 * MiB)
    nbytes = 0
    for k in range(n):
        b = make(k)
        nbytes += b.nbytes
        ring.write_arrow_batch(b, kind)
    payloads = [bytes(r.data) for r in ring.reader("oldest").read(copy=True)]
    if len(payloads) != n or ring.records_lost:
        raise RuntimeError(f"the {kind} ring holds {len(payloads)} of {n} records")
    return ring, path, payloads, nbytes


# -- the JetStream paths ----------------------------------------------------------------------


async def _publisher(ring: Any, url: str, prefix: str, n: int) -> float:
    """Seconds from the publisher's on_ready to the acknowledgement of its n-th record."""
    from rust_daq.nats.publisher import Publisher

    ready: list[float] = []
    pub = Publisher(ring, url, host=HOST, prefix=prefix, on_ready=lambda: ready.append(time.perf_counter()))
    stop = asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    try:
        while pub.stats.records < n:
            if task.done():
                task.result()
                raise RuntimeError(f"the publisher ended after {pub.stats.records} of {n} records")
            await asyncio.sleep(0.0005)
        t1 = time.perf_counter()
    finally:
        stop.set()
        stats = await task
    if stats.records != n or stats.lost_records or stats.objects:
        raise RuntimeError(f"publisher: {stats}")
    return t1 - ready[0]


async def _plain(url: str, stream: str, payloads: list[bytes], pipelined: bool) -> float:
    """Seconds to publish every payload to a fresh stream and have each acknowledged."""
    import nats
    import nats.js.api as api

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"], storage=api.StorageType.FILE)
        subject = f"{stream}.{HOST}.data"
        t0 = time.perf_counter()
        if pipelined:
            futures = [await js.publish_async(subject, p) for p in payloads]
            await js.publish_async_completed()
            acks = [f.result() for f in futures]
        else:
            acks = [await js.publish(subject, p) for p in payloads]
        dt = time.perf_counter() - t0
        if [a.seq for a in acks] != list(range(1, len(payloads) + 1)):
            raise RuntimeError(f"{stream}: acknowledgements out of order or missing")
        await js.delete_stream(stream)
        return dt
    finally:
        await nc.close()


async def _delete_stream(url: str, prefix: str) -> None:
    import nats

    from rust_daq.nats import protocol

    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(protocol.stream_name(prefix))
    finally:
        await nc.close()


def _to_hdf5(url: str, prefix: str, kind: str, n: int, rows: int, where: str) -> float:
    """Seconds from JetStreamSource() to the flush that wrote the n-th record into the file."""
    import h5py

    from rust_daq.hdf5.writer import HDF5Writer
    from rust_daq.nats.source import JetStreamSource

    directory = scratch_dir(where)
    path = os.path.join(directory, "out.h5")
    try:
        t0 = time.perf_counter()
        source = JetStreamSource(url, output=path, prefix=prefix)
        try:
            writer = HDF5Writer(path, source)
            written = 0
            deadline = time.monotonic() + 120
            while written < n:
                got = writer.flush_to_disk()
                written += got
                if not got:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"hdf5: {written} of {n} records after 120 s")
                    time.sleep(0.001)
            dt = time.perf_counter() - t0
            writer.close()
        finally:
            source.close()
        with h5py.File(path, "r") as f:  # every row, in order
            group = f[f"measurements/{HOST}.{kind}"]
            col = group["value" if kind == "voltmeter" else "frame_id"][()]
            if not np.array_equal(col, np.arange(rows, dtype=col.dtype)):
                raise RuntimeError(
                    f"hdf5: {len(col)} rows of {kind} in the file, not the {rows} sent in order"
                )
        return dt
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the case ---------------------------------------------------------------------------------


def run(quick: bool, reps: int) -> dict[str, Any]:
    why = why_not()
    if why is not None:
        return {"skipped": why}
    counts = _counts(quick)
    where = storage_dir()
    seconds: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PATHS} for k in KINDS}
    rings: dict[str, tuple[Any, str, list[bytes], int]] = {}
    server: _Server | None = None
    daemon = None
    done = flight.CTX.Event()
    try:
        # The daemon fills its ring first, alone (two shared cores: nothing measured meanwhile).
        flight_ring = shm_path("nats-flight")
        ready = flight.CTX.Queue()
        daemon = flight.CTX.Process(
            target=flight._serve, args=(flight_ring, counts, ready, done, _volt), daemon=True
        )
        daemon.start()
        daemon_url = flight._wait_for(ready, daemon, 300)
        for kind in KINDS:
            rings[kind] = _fill(kind, counts[kind])
        server = _Server(where)
        url = server.url
        _warm_up(url, where)
        import pyarrow.flight as fl

        import rust_daq.remote
        from rust_daq._access import local_token

        client = fl.connect(daemon_url)
        token = local_token(daemon_url)
        options = fl.FlightCallOptions(
            headers=[(b"authorization", f"Bearer {token}".encode())] if token else []
        )
        daq = rust_daq.remote.connect(daemon_url)
        try:
            for rep in range(reps):
                for kind in KINDS:
                    ring, _, payloads, _ = rings[kind]
                    n = counts[kind]
                    rows = n * (VOLT_ROWS if kind == "voltmeter" else 1)
                    by = seconds[kind]
                    prefix = f"bench.r{rep}.{kind}"
                    # The publishers in turn, first and last alternately (no order favours one).
                    order = ["publisher", "plain", "plain_async"]
                    for name in order if rep % 2 == 0 else order[::-1]:
                        if name == "publisher":
                            dt = asyncio.run(_publisher(ring, url, prefix, n))
                        else:
                            pipelined = name == "plain_async"
                            dt = asyncio.run(_plain(url, f"{name.upper()}_{rep}_{kind}", payloads, pipelined))
                        by[name].append(dt)
                    by["hdf5"].append(_to_hdf5(url, prefix, kind, n, rows, where))
                    asyncio.run(_delete_stream(url, prefix))
                    for name in ("flight_remote", "flight_doget", "ring"):
                        t0 = time.perf_counter()
                        if name == "flight_remote":
                            check = flight._remote(daq, kind)
                        elif name == "flight_doget":
                            check = flight._flight(client, options, kind)
                        else:
                            check = flight._local(ring, kind, copy=True)
                        by[name].append(time.perf_counter() - t0)
                        if check.k != n:
                            raise RuntimeError(f"{name}: {check.k} of {n} {kind} batches")
        finally:
            client.close()
            daq.close()
    finally:
        done.set()
        if daemon is not None:
            daemon.join(timeout=60)
            if daemon.is_alive():
                daemon.kill()
        if server is not None:
            server.stop()
        for ring, path, _, _ in rings.values():
            ring.close()
            os.unlink(path)
    out: dict[str, Any] = {"counts": counts, "reps": reps, "seconds": seconds, "rates": {}}
    for kind, by in seconds.items():
        rows = counts[kind] * (VOLT_ROWS if kind == "voltmeter" else 1)
        nbytes = rings[kind][3]
        out["rates"][kind] = {
            p: {
                "rows_per_s": median_of([rows / s for s in v]),
                "bytes_per_s": median_of([nbytes / s for s in v]),
            }
            for p, v in by.items()
        }
    return out


def _warm_up(url: str, where: str) -> None:
    """Imports, first connections, the server's first stream files, h5py: once, untimed."""
    n = 300
    ring, path, payloads, _ = _fill("voltmeter", n)
    try:
        asyncio.run(_publisher(ring, url, "bench.warmup", n))
        asyncio.run(_plain(url, "WARMUP", payloads, False))
        _to_hdf5(url, "bench.warmup", "voltmeter", n, n * VOLT_ROWS, where)
        asyncio.run(_delete_stream(url, "bench.warmup"))
    finally:
        ring.close()
        os.unlink(path)


def tables(res: dict[str, Any]) -> list[Table]:
    if res.get("skipped"):
        return []
    rates = res["rates"]
    rows = []
    for p, label in PATHS.items():
        row = [label]
        for kind in KINDS:
            x = rates[kind][p]
            plain = rates[kind]["plain"]["rows_per_s"]
            unit = "rows/s" if kind == "voltmeter" else "frames/s"
            row.append(
                f"{fmt_rate(x['rows_per_s'])} {unit}, {x['bytes_per_s'] / 1e6:,.0f} MB/s "
                f"({x['rows_per_s'] / plain:.2f}x)"
            )
        rows.append(row)
    c = res["counts"]
    return [
        Table(
            f"Case 10: NATS JetStream (file storage, loopback), {c['voltmeter']:,} batches and "
            f"{c['camera']} frames, median of {res['reps']}",
            ["", *(f"{KINDS[k]}" for k in KINDS)],
            rows,
            notes=[
                "(x): against the plain nats-py loop (`await js.publish()` per message) in the same run. "
                "The server, the publishers and the readers share this machine's two cores. For 2 MiB "
                "frames the server's own work (about 4 ms of CPU a frame here) and the clients' copies "
                "bound every path, so pipelining gains little and the figures move by tens of percent "
                "from run to run."
            ],
        )
    ]


def goals(res: dict[str, Any]) -> list[Goal]:
    if res.get("skipped"):
        return []
    out = []
    for kind in KINDS:
        r = res["rates"][kind]
        plain = r["plain"]["rows_per_s"]
        what = "rows/s" if kind == "voltmeter" else "frames/s"
        out.append(
            Goal(
                "10",
                f"{KINDS[kind]}: Publisher >= 0.9x the plain nats-py loop ({what}, as a ratio)",
                r["publisher"]["rows_per_s"] / plain,
                0.9,
                "x",
            )
        )
        out.append(
            Goal(
                "10",
                f"{KINDS[kind]}: JetStream -> HDF5 >= 0.9x the plain nats-py loop ({what}, as a ratio)",
                r["hdf5"]["rows_per_s"] / plain,
                0.9,
                "x",
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    args = ap.parse_args()
    res = run(args.quick, args.reps or (2 if args.quick else 5))
    if res.get("skipped"):
        print(f"case 10 (nats) skipped: {res['skipped']}")
        return
    for t in tables(res):
        print(t.markdown())
        print()
    for g in goals(res):
        print(g.line())


if __name__ == "__main__":
    main()
