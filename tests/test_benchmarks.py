"""The benchmark suite's own machinery: a run that lost or reordered a message is an error,
not a figure; goals say met or by how much they are missed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import ipc, transports  # noqa: E402
from benchmarks._common import Goal, Table  # noqa: E402


@pytest.mark.parametrize("name", transports.ALL)
def test_every_message_arrives_in_order(name: str) -> None:
    if why := transports.available(name):
        pytest.skip(why)
    blocking = ipc.mode_for(name, prefer_blocking=True)
    r = ipc.run_once(name, 256, readers=2, blocking=bool(blocking), seconds=0.1)
    assert r["sent"] > 100
    for reader in r["readers"][:1] if name == "ring" else r["readers"]:
        assert reader["received"] == r["sent"]
        assert reader["gaps"] == 0 and reader["disorder"] == 0


def test_a_lost_message_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    real = transports.RingTransport.receiver

    def dropping(self: transports.RingTransport, i: int) -> transports.Receiver:
        rx = real(self, i)
        poll = rx.poll
        dropped = []

        def lossy(blocking: bool) -> list[tuple[int, int]]:
            out = poll(blocking)
            if not dropped and len(out) > 1:
                dropped.append(out.pop(0))
            return out

        rx.poll = lossy  # type: ignore[method-assign]
        return rx

    monkeypatch.setattr(transports.RingTransport, "receiver", dropping)
    with pytest.raises(RuntimeError, match="lost 1 messages on a lossless path"):
        ipc.run_once("ring", 64, readers=1, seconds=0.1)


def test_goals_and_tables() -> None:
    assert Goal("c", "x", 12.0, 10.0, "x").line() == "c: x: 12x (met)"
    assert Goal("c", "x", 5.0, 10.0, "x").line() == "c: x: 5x (MISSED, 2.00x short)"
    assert (
        Goal("c", "p99", 100.0, 50.0, " µs", higher_is_better=False).line()
        == "c: p99: 100 µs (MISSED, 2.00x over)"
    )
    md = Table("T", ["", "a"], [["r", "1"]], ["note"]).markdown()
    assert md.splitlines() == ["**T**", "", "|  | a |", "|---|---:|", "| r | 1 |", "", "note"]


def test_the_suite_runs_and_writes_its_results(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--reps",
            "1",
            "--cases",
            "limits,rate",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    (js,) = tmp_path.glob("*-quick.json")
    data = json.loads(js.read_text())
    rows = {row["transport"]: row for row in data["results"]["rate"]["rows"]}
    assert rows["ring"]["rate"] > 0 and rows["ring_bulk"]["rate"] > 0 and rows["mp_queue"]["rate"] > 0
    limits = data["results"]["limits"]
    assert limits["noop_call"] > limits["ring_write_64B"] and limits["ring_read_into_64B"] > 0
    assert any(g.startswith("case 1: ring (bulk) vs multiprocessing.Queue") for g in data["goals"])
    md = (tmp_path / js.name.replace(".json", ".md")).read_text()
    assert "| rust-daq ring | wait=adaptive |" in md
    assert "| rust-daq ring, bulk: write_many + read_into | wait=adaptive |" in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cases", "rate,warp"], "unknown case(s) warp"),
        (["--reps", "0"], "--reps must be at least 1, got 0"),
        (["--out", "/proc/rdaq-nowhere"], "--out /proc/rdaq-nowhere: No such file or directory"),
        (["--plot", "/rdaq-nowhere/plot.png"], "--plot /rdaq-nowhere/plot.png: its directory does not exist"),
    ],
)
def test_bad_arguments_are_refused_before_measuring(args: list[str], message: str, tmp_path: Path) -> None:
    out = [] if "--out" in args else ["--out", str(tmp_path)]
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, *out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "[rate]" not in r.stdout and not list(tmp_path.iterdir())


def test_the_nats_case_without_a_server_says_so_and_goes_on(tmp_path: Path) -> None:
    """Case 10 starts its own nats-server; where there is none it is skipped, saying why, and
    the suite still writes its results (no figure, no goal)."""
    from benchmarks import nats_stream

    env = {**os.environ, "PATH": str(tmp_path)}  # (no nats-server on it)
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--cases", "nats", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "case 10 skipped: nats-server is not installed" in r.stdout
    (js,) = tmp_path.glob("*-quick.json")
    data = json.loads(js.read_text())
    assert data["results"]["nats"]["skipped"] and data["goals"] == []
    assert nats_stream.tables({"skipped": "x"}) == [] and nats_stream.goals({"skipped": "x"}) == []
