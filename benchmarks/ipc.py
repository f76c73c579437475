"""Cross-process cases: message rate (1), large frames (2), latency (3), scaling (7).

Each measurement forks one producer and N consumer processes over one transport
(benchmarks/transports.py); all wait on a barrier, then the producer sends for a fixed time
(throughput) or a fixed number of spaced messages (latency) and ends with a stop message.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from ._common import Goal, MiB, Table, fmt_rate, median_of
from .transports import ALL, RING_WAITS, STOP, TRANSPORTS, Transport, available, make, now_ns

CTX = mp.get_context("fork")


def _child(
    role: str, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], barrier: Any, results: Any
) -> None:
    """A benchmark process: fn(*args, barrier) reports a dict, or its traceback (and breaks
    the barrier so that nobody waits for it)."""
    try:
        results.put((role, fn(*args, barrier)))
    except BaseException:
        results.put((role, {"error": traceback.format_exc()}))
        barrier.abort()


def run_processes(
    label: str,
    roles: dict[str, tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]],
    timeout: float,
    started: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Forks one process per role; each gets the shared barrier as its last argument and
    returns a dict. `started` runs in the parent once all are started (to close its ends of
    pipes the children inherited). Raises with the child's traceback when one fails, TimeoutError when one
    does not report within `timeout` seconds of the start."""
    barrier = CTX.Barrier(len(roles) + 1)
    results = CTX.Queue()
    procs = [
        CTX.Process(target=_child, args=(role, fn, args, barrier, results), daemon=True)
        for role, (fn, args) in roles.items()
    ]
    try:
        for p in procs:
            p.start()
        if started is not None:
            started()
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            who, res = results.get(timeout=10)
            raise RuntimeError(f"{label} {who} failed to start:\n{res.get('error')}") from None
        got: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(procs):
            try:
                who, res = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{label}: no result after {timeout:.0f} s") from None
            if "error" in res:
                raise RuntimeError(f"{label} {who} failed:\n{res['error']}")
            got[who] = res
        for p in procs:
            p.join(timeout=30)
        return got
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def _producer(t: Transport, seconds: float, count: int, interval: float, barrier: Any) -> dict[str, Any]:
    tx = t.sender()
    msg = np.zeros(t.size, np.uint8)
    msg[16:] = np.arange(t.size - 16, dtype=np.uint64).astype(np.uint8)
    hdr = msg[:16].view(np.int64)
    send = tx.send
    barrier.wait()
    tx.connect()
    t0 = time.monotonic()
    i = 0
    if count:  # latency: spaced messages, each stamped just before it is sent
        nxt = t0
        for i in range(count):
            nxt += interval
            while time.monotonic() < nxt:
                pass
            hdr[0] = i
            hdr[1] = now_ns()
            send(msg)
        i = count
    elif t.bulk:  # throughput, 64 messages per call
        end = t0 + seconds
        block = np.repeat(msg[None, :], 64, axis=0)
        idx = block[:, :8].view(np.int64)[:, 0]
        step = np.arange(64, dtype=np.int64)
        send_block = tx.send_block
        while True:
            np.add(step, i, out=idx)
            send_block(block)
            i += 64
            if time.monotonic() >= end:
                break
    else:  # throughput: as many as it can for `seconds`
        end = t0 + seconds
        while True:
            for _ in range(64):
                hdr[0] = i
                send(msg)
                i += 1
            if time.monotonic() >= end:
                break
    hdr[0] = STOP
    send(msg)
    tx.close()
    return {"sent": i, "t0": t0}


def _consumer(t: Transport, i: int, blocking: bool, latency: bool, barrier: Any) -> dict[str, Any]:
    rx = t.receiver(i)
    poll = rx.poll
    lat: list[int] = []
    expected = gaps = disorder = 0
    barrier.wait()
    done = False
    if t.bulk:  # whole arrays at a time: check a batch at once, message by message if it is off
        poll_array = rx.poll_array
        while not done:
            got = poll_array(blocking)
            if not len(got):
                continue
            idx = got[:, 0]
            if idx[-1] == STOP:
                done, idx = True, idx[:-1]
            if (
                len(idx)
                and idx[0] == expected
                and idx[-1] == expected + len(idx) - 1
                and (np.diff(idx) == 1).all()
            ):
                expected += len(idx)
                continue
            for k in idx.tolist():
                if k != expected:
                    gaps, disorder = (gaps + k - expected, disorder) if k > expected else (gaps, disorder + 1)
                expected = k + 1
    while not done:
        for idx, sent_ns in poll(blocking):
            if idx == STOP:
                done = True
                break
            if latency:
                lat.append(now_ns() - sent_ns)
            if idx != expected:
                if idx > expected:
                    gaps += idx - expected
                else:
                    disorder += 1
            expected = idx + 1
    t_end = time.monotonic()
    res: dict[str, Any] = {
        "received": expected - gaps,
        "last": expected - 1,
        "gaps": gaps,
        "disorder": disorder,
        "lost": rx.lost,
        "t_end": t_end,
    }
    if latency:
        v = np.array(lat, dtype=np.float64) / 1e3
        pct = [*np.percentile(v, [50, 99, 99.9]), v.max()]
        res["latency_us"] = dict(zip(["p50", "p99", "p99.9", "max"], pct, strict=True))
    rx.close()
    return res


def run_once(
    name: str,
    size: int,
    readers: int = 1,
    blocking: bool = True,
    seconds: float = 0.5,
    count: int = 0,
    interval: float = 100e-6,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """One measurement: a producer and `readers` consumers over transport `name`."""
    t = make(name, size, readers, CTX)
    roles: dict[str, tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]] = {
        f"reader{i}": (_consumer, (t, i, blocking, count > 0)) for i in range(readers)
    }
    roles["producer"] = (_producer, (t, seconds, count, interval))
    try:
        got = run_processes(name, roles, seconds + timeout, t.after_start)
    finally:
        t.cleanup()
    prod = got["producer"]
    out: dict[str, Any] = {"sent": prod["sent"], "readers": []}
    for i in range(readers):
        r = got[f"reader{i}"]
        r["seconds"] = r["t_end"] - prod["t0"]
        r["rate"] = r["received"] / r["seconds"]
        if r["disorder"] or r["last"] != prod["sent"] - 1:
            raise RuntimeError(f"{name} reader {i}: out of order or incomplete: {r} (sent {prod['sent']})")
        lossless = not (name == "ring" and i > 0)
        if lossless and r["gaps"]:
            raise RuntimeError(f"{name} reader {i} lost {r['gaps']} messages on a lossless path")
        out["readers"].append(r)
    out["rate"] = out["readers"][0]["rate"]
    out["bandwidth"] = out["rate"] * size
    return out


def mode_for(name: str, prefer_blocking: bool) -> bool | None:
    """The wait mode to use for a transport (True: blocking), None when it has neither."""
    t = TRANSPORTS[name]
    if prefer_blocking:
        return True if t.blocking else (False if t.busy_poll else None)
    return False if t.busy_poll else None


def throughput(name: str, size: int, readers: int, reps: int, seconds: float) -> dict[str, Any]:
    blocking = mode_for(name, prefer_blocking=True)
    runs = [run_once(name, size, readers, blocking=bool(blocking), seconds=seconds) for _ in range(reps)]
    per_reader = [median_of([r["readers"][k]["rate"] for r in runs]) for k in range(readers)]
    lost = [max(r["readers"][k]["gaps"] for r in runs) for k in range(readers)]
    return {
        "transport": name,
        "size": size,
        "readers": readers,
        "wait": TRANSPORTS[name].wait_label(bool(blocking)),
        "rate": median_of([r["rate"] for r in runs]),
        "bandwidth": median_of([r["bandwidth"] for r in runs]),
        "per_reader_rate": per_reader,
        "delivered_rate": sum(per_reader),
        "lost_max": lost,
        "runs": [r["rate"] for r in runs],
    }


def latency(name: str, blocking: bool, count: int, reps: int) -> dict[str, Any] | None:
    if mode_for(name, blocking) != blocking:
        return None
    runs = [
        run_once(name, 64, 1, blocking=blocking, count=count)["readers"][0]["latency_us"] for _ in range(reps)
    ]
    return {
        "transport": name,
        "wait": TRANSPORTS[name].wait_label(blocking),
        "blocking": blocking,
        **{k: median_of([r[k] for r in runs]) for k in ("p50", "p99", "p99.9", "max")},
    }


def peers(names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    names = names or ALL
    skipped = {n: why for n in names if (why := available(n))}
    return [n for n in names if n not in skipped], skipped


def case_rate(quick: bool, reps: int) -> dict[str, Any]:
    names, skipped = peers(["ring", "ring_bulk", *ALL[1:]])
    seconds = 0.25 if quick else 1.0
    rows = [throughput(n, 64, 1, reps, seconds) for n in names]
    return {"rows": rows, "skipped": skipped, "seconds_per_run": seconds}


def case_frames(quick: bool, reps: int) -> dict[str, Any]:
    names, skipped = peers(["ring", *RING_WAITS, "ring_commit_each", "ring_whole", *ALL[1:]])
    seconds = 0.25 if quick else 1.0
    rows = [throughput(n, size, 1, reps, seconds) for size in (MiB, 4 * MiB) for n in names]
    return {"rows": rows, "skipped": skipped, "seconds_per_run": seconds}


def case_latency(quick: bool, reps: int) -> dict[str, Any]:
    names, skipped = peers(["ring", *RING_WAITS, *ALL[1:]])
    count = 2000 if quick else 20000
    rows = [r for blocking in (False, True) for n in names if (r := latency(n, blocking, count, reps))]
    return {"rows": rows, "skipped": skipped, "messages_per_run": count, "interval_us": 100}


SIZES = [64, 1024, 16 * 1024, 256 * 1024, MiB, 4 * MiB]


def case_scaling(quick: bool, reps: int) -> dict[str, Any]:
    names, skipped = peers()
    seconds = 0.2 if quick else 0.5
    sizes = [64, 16 * 1024, MiB] if quick else SIZES
    by_size = [throughput(n, s, 1, reps, seconds) for s in sizes for n in names]
    by_readers = [throughput(n, 64, k, reps, seconds) for k in range(1, 5) for n in names]
    return {"by_size": by_size, "by_readers": by_readers, "skipped": skipped, "seconds_per_run": seconds}


def label(name: str) -> str:
    return TRANSPORTS[name].label


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def _skipped(res: dict[str, Any]) -> list[str]:
    return [f"Not measured: {label(n)}: {why}." for n, why in res["skipped"].items()]


def _ring_best(rows: list[dict[str, Any]]) -> float:
    """Case 1's ring figure: the bulk path if it ran, else the per-record one."""
    r = {x["transport"]: x["rate"] for x in rows}
    return r.get("ring_bulk", r.get("ring", float("nan")))


def table_rate(res: dict[str, Any], limits: dict[str, Any] | None = None) -> Table:
    ring = _ring_best(res["rows"])
    notes = [
        "Ring rows: per record (`ring.write` per message, `reader.read` building one `Record` each) and "
        "bulk (`write_many` of 64 messages, `read_into` a (4096, 64) array). The last column: the "
        "ring's bulk path over each row."
    ]
    if limits and "ring_read_into_64B" in limits:
        c = limits
        notes.append(
            f"Each side alone, in one process (Limits): `ring.write` {fmt_rate(c['ring_write_64B'])}/s, "
            f"`write_many` {fmt_rate(c['ring_write_many_64B'])}/s per record; `reader.read` "
            f"{fmt_rate(c['ring_read_64B'])}/s, `read_into` {fmt_rate(c['ring_read_into_64B'])}/s."
        )
    return Table(
        "Case 1: 64 B messages, one producer process to one consumer process, lossless",
        ["", "wait", "messages/s", "ring (bulk) is"],
        [
            [label(r["transport"]), r["wait"], f"{fmt_rate(r['rate'])}/s", f"{ring / r['rate']:.1f}x"]
            for r in res["rows"]
        ],
        notes + _skipped(res),
    )


def table_frames(res: dict[str, Any], limits: dict[str, Any]) -> Table:
    rows = []
    for r in res["rows"]:
        limit = limits[f"copy_{r['size'] // MiB}MiB_through_buffer_Bps"]
        rows.append(
            [
                f"{label(r['transport'])}, {_size(r['size'])}",
                r["wait"],
                f"{r['rate']:,.0f}/s",
                f"{r['bandwidth'] / 1e9:.1f} GB/s",
                f"{r['bandwidth'] / limit:.0%}",
            ]
        )
    return Table(
        "Case 2: large frames, producer process to consumer process (read in place where the peer allows it)",
        ["", "wait", "frames/s", "bandwidth", "of the copy limit"],
        rows,
        [
            "The copy limit is numpy's single-core copy of the same blocks through a buffer as large as "
            "the transports' (the Limits table). Each transport buffers 16 MiB (at least 8 frames). "
            "iceoryx2 and shared_memory hand out a just-freed slot again, whose lines are still in "
            "cache; the ring goes back to its start once its consumer has caught up (hot_bytes, 1 MiB "
            "or twice the frame); with hot_bytes=0 it writes frame after frame through all of it."
        ]
        + _skipped(res),
    )


def table_latency(res: dict[str, Any]) -> Table:
    return Table(
        f"Case 3: latency of 64 B messages sent every {res['interval_us']} µs, send to receive",
        ["", "wait", "p50", "p99", "p99.9", "max"],
        [
            [label(r["transport"]), r["wait"], *[f"{r[k]:.1f} µs" for k in ("p50", "p99", "p99.9", "max")]]
            for r in res["rows"]
        ],
        [
            f"{res['messages_per_run']:,} messages per run; medians over runs of each percentile. The producer "
            "spaces messages by spinning; multiprocessing.Queue's feeder thread competes with that loop for "
            "the GIL, which is most of its latency."
        ]
        + _skipped(res),
    )


def tables_scaling(res: dict[str, Any]) -> list[Table]:
    sizes = sorted({r["size"] for r in res["by_size"]})
    names = list(dict.fromkeys(r["transport"] for r in res["by_size"]))
    by = {(r["transport"], r["size"]): r for r in res["by_size"]}
    t1 = Table(
        "Case 7: bandwidth by payload size (one consumer)",
        ["", *[_size(s) for s in sizes]],
        [[label(n), *[f"{by[n, s]['bandwidth'] / 1e9:.2f} GB/s" for s in sizes]] for n in names],
    )
    readers = sorted({r["readers"] for r in res["by_readers"]})
    byr = {(r["transport"], r["readers"]): r for r in res["by_readers"]}
    t2 = Table(
        "Case 7: 64 B messages/s delivered to each reader, by number of reader processes",
        ["", *[f"{k} reader{'s' if k > 1 else ''}" for k in readers]],
        [[label(n), *[f"{fmt_rate(min(byr[n, k]['per_reader_rate']))}/s" for k in readers]] for n in names],
        [
            "The slowest reader's rate. Ring: reader 0 commits (the producer waits for it); the others read "
            "the same ring without holding the producer back and may be lapped. Records lost by them "
            "(at most, over runs, per reader count): "
            + ", ".join(f"{k}: {max(byr['ring', k]['lost_max'])}" for k in readers if ("ring", k) in byr)
            + ". The queues copy every message once per reader."
        ],
    )
    return [t1, t2]


def goals(
    rate: dict[str, Any] | None,
    frames: dict[str, Any] | None,
    lat: dict[str, Any] | None,
    limits: dict[str, Any] | None,
) -> list[Goal]:
    out = []
    if rate:
        r = {x["transport"]: x["rate"] for x in rate["rows"]}
        best = _ring_best(rate["rows"])
        for peer, target in (("faster_fifo", 10.0), ("mp_queue", 30.0)):
            out.append(
                Goal("case 1", f"ring (bulk) vs {label(peer)}", best / r.get(peer, float("nan")), target, "x")
            )
    if frames and limits:
        for size in sorted({x["size"] for x in frames["rows"]}):
            rows = [x for x in frames["rows"] if x["size"] == size]
            peer = max(
                (x for x in rows if not x["transport"].startswith("ring")), key=lambda x: x["bandwidth"]
            )
            limit = limits[f"copy_{size // MiB}MiB_through_buffer_Bps"]
            for x in rows:
                if x["transport"].startswith("ring") and x["transport"] not in (
                    "ring_commit_each",
                    "ring_whole",
                ):
                    out.append(
                        Goal(
                            "case 2",
                            f"ring {x['wait']}, {_size(size)} frames, vs the best peer ({label(peer['transport'])}, "
                            f"{peer['bandwidth'] / 1e9:.1f} GB/s; copy limit {limit / 1e9:.1f} GB/s)",
                            x["bandwidth"] / peer["bandwidth"],
                            1.0,
                            "x",
                        )
                    )
    if lat:
        for x in lat["rows"]:
            if x["transport"] == "ring" and x["wait"] == "busy-poll":
                out.append(
                    Goal(
                        "case 3", "ring p99 latency, busy-poll", x["p99"], 50.0, " µs", higher_is_better=False
                    )
                )
    return out
