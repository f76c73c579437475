"""rust-daq beside the peers a user would pick instead, and the physical limits, in one run.

    python -m benchmarks [--quick] [--cases rate,frames,...] [--reps N] [--out DIR] [--plot PNG]

Cases: limits (copy bandwidth, native call, file write), rate (1: 64 B messages), frames
(2: 1 and 4 MiB), latency (3), arrow (4: Arrow batches), storage (5: ring to HDF5, 6: the
1 kHz loop's jitter), scaling (7: payload size and reader count; the plot), flight (8), bluesky (9: a step scan's
time per point in a RunEngine beside ophyd-async's sim detector), nats (10: a ring to JetStream
and on into HDF5 beside a plain nats-py loop, Flight and the ring reader; it starts its own
nats-server, and is skipped, saying why, without one), streams (11: 1,000 streams of 10-row
batches into HDF5 beside a plain h5py loop; 10,000 streams in one ring). Every case runs
ours and the peers in the same run, several times, and reports medians. Results go to
DIR/<date>.json and DIR/<date>.md (with ``-quick`` in the name for a quick run); the plot to
DIR/<date>.png unless --plot says where. Install the peers with ``pip install '.[bench]'``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

from . import arrow_batches, bluesky_run, flight, ipc, limits, many_streams, nats_stream, storage
from ._common import Goal, Table, machine, storage_dir

CASES = [
    "limits",
    "rate",
    "frames",
    "latency",
    "arrow",
    "storage",
    "streams",
    "scaling",
    "flight",
    "bluesky",
    "nats",
]


def plot(scaling: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(dict.fromkeys(r["transport"] for r in scaling["by_size"]))
    for n in names:
        rows = sorted((r for r in scaling["by_size"] if r["transport"] == n), key=lambda r: r["size"])
        a.plot([r["size"] for r in rows], [r["bandwidth"] / 1e9 for r in rows], "o-", label=ipc.label(n))
        rows = sorted((r for r in scaling["by_readers"] if r["transport"] == n), key=lambda r: r["readers"])
        b.plot(
            [r["readers"] for r in rows],
            [min(r["per_reader_rate"]) / 1e6 for r in rows],
            "o-",
            label=ipc.label(n),
        )
    a.set(xscale="log", yscale="log", xlabel="payload size (bytes)", ylabel="GB/s, producer to consumer")
    a.set_title("Bandwidth by payload size, one consumer")
    b.set(yscale="log", xlabel="reader processes", ylabel="M messages/s to each reader")
    b.set_xticks(sorted({r["readers"] for r in scaling["by_readers"]}))
    b.set_title("64 B messages by number of readers")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short runs, fewer repetitions (a smoke run)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    ap.add_argument("--reps", type=int, help="repetitions per measurement (default 5, quick 2)")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results"), help="results directory"
    )
    ap.add_argument(
        "--plot", metavar="PNG", help="where the scaling plot goes (default: next to the results)"
    )
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.reps is not None and args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    # Refuse an unusable destination now, not after minutes of measuring.
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        ap.error(f"--out {args.out}: {e.strerror}")
    if not os.access(args.out, os.W_OK):
        ap.error(f"--out {args.out}: not writable")
    if args.plot and not os.access(os.path.dirname(os.path.abspath(args.plot)), os.W_OK):
        ap.error(f"--plot {args.plot}: its directory does not exist or is not writable")
    reps = args.reps or (2 if args.quick else 5)
    quick = args.quick
    where = storage_dir()
    mach = machine()
    started = time.monotonic()
    stamp = datetime.date.today().isoformat() + ("-quick" if quick else "")
    header = (
        f"rust-daq benchmarks, {stamp}: {mach['cpu']}, {mach['cpus']} cores, "
        f"{(mach['memory_bytes'] or 0) / 2**30:.0f} GiB, Linux {mach['kernel']}, Python {mach['python']}; "
        f"medians of {reps} runs{' (quick)' if quick else ''}"
    )
    print(header, flush=True)

    res: dict[str, Any] = {}
    tables: list[Table] = []
    goals: list[Goal] = []

    def show(new: list[Table]) -> None:
        for t in new:
            print("\n" + t.markdown(), flush=True)
        tables.extend(new)

    for case in cases:
        t0 = time.monotonic()
        print(f"\n[{case}]", flush=True)
        if case == "limits":
            res[case] = limits.run(quick, reps, where)
            show(limits.tables(res[case]))
        elif case == "rate":
            res[case] = ipc.case_rate(quick, reps)
            show([ipc.table_rate(res[case], res.get("limits"))])
        elif case == "frames":
            res[case] = ipc.case_frames(quick, reps)
            if "limits" not in res:
                res["limits"] = limits.run(quick, reps, where)
            show([ipc.table_frames(res[case], res["limits"])])
        elif case == "latency":
            res[case] = ipc.case_latency(quick, reps)
            show([ipc.table_latency(res[case])])
        elif case == "arrow":
            res[case] = arrow_batches.run(quick, reps)
            show(arrow_batches.tables(res[case]))
        elif case == "storage":
            res[case] = storage.run(quick, reps, where)
            show(storage.tables(res[case]))
            goals += storage.goals(res[case])
        elif case == "streams":
            res[case] = many_streams.run(quick, reps, where)
            show(many_streams.tables(res[case]))
            goals += many_streams.goals(res[case])
        elif case == "scaling":
            res[case] = ipc.case_scaling(quick, reps)
            show(ipc.tables_scaling(res[case]))
        elif case == "flight":
            res[case] = flight.run(quick, reps)
            show(flight.tables(res[case]))
        elif case == "bluesky":
            res[case] = bluesky_run.run(quick, reps)
            show(bluesky_run.tables(res[case]))
            goals += bluesky_run.goals(res[case])
        elif case == "nats":
            res[case] = nats_stream.run(quick, reps)
            if res[case].get("skipped"):
                print(f"case 10 skipped: {res[case]['skipped']}", flush=True)
            show(nats_stream.tables(res[case]))
            goals += nats_stream.goals(res[case])
        res.setdefault("seconds", {})[case] = round(time.monotonic() - t0, 1)
    goals = ipc.goals(res.get("rate"), res.get("frames"), res.get("latency"), res.get("limits")) + goals

    lines = [g.line() for g in goals]
    print("\nGoals (issue 6; this machine has 2 cores):" if lines else "", flush=True)
    for line in lines:
        print("  " + line)
    base = os.path.join(args.out, stamp)
    png = args.plot or base + ".png"
    if "scaling" in res:
        plot(res["scaling"], png, header)
    with open(base + ".json", "w") as f:
        json.dump(
            {
                "machine": mach,
                "quick": quick,
                "reps": reps,
                "storage_dir": where,
                "results": res,
                "goals": lines,
            },
            f,
            indent=1,
        )
    with open(base + ".md", "w") as f:
        f.write(f"# {header}\n\nReproduce: `python -m benchmarks{' --quick' if quick else ''}`\n")
        for t in tables:
            f.write("\n" + t.markdown() + "\n")
        if lines:
            f.write(
                "\n**Goals** (this machine has 2 cores)\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
            )
        if "scaling" in res:
            f.write(f"\n![scaling]({os.path.relpath(png, args.out)})\n")
    print(f"\nresults: {base}.json, {base}.md{', ' + png if 'scaling' in res else ''}")
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
