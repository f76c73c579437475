"""The rust-daq command, through real subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from rust_daq import RingBuffer

CLI = [sys.executable, "-m", "rust_daq.cli"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_console_script_is_installed() -> None:
    exe = shutil.which("rust-daq")
    assert exe is not None
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("rust-daq ")


def test_demo_writes_the_expected_rows_on_every_stream(tmp_path: Path) -> None:
    out = tmp_path / "demo.h5"
    r = cli("demo", "--duration", "2", "--output", str(out), "--rate", "50", "--fps", "5", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "stopped by duration" in r.stdout and "f['measurements/voltmeter/voltage'][:]" in r.stdout
    # Write latency per stream (its own column) and over all writes.
    assert "write" in r.stdout and "p99.9 µs" in r.stdout and "ring write latency, all streams" in r.stdout
    with h5py.File(out, "r") as f:
        v = f["measurements/voltmeter/voltage"]
        c = f["measurements/camera/frame"]
        # 2 s at 50 Hz and 5 fps: every scheduled read, give or take the edges.
        assert 98 <= v.shape[0] <= 101 and v.attrs["units"] == "V"
        assert 9 <= c.shape[0] <= 11 and c.shape[1:] == (256, 256) and c.dtype == np.uint16
        ts = f["measurements/voltmeter/timestamp"][:]
        assert np.all(np.diff(ts) > 0)
        assert f["rust_daq/progress"][2] == 0, "nothing lost"
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("rust-daq-demo-")], "ring removed"


def test_sigterm_mid_run_exits_0_with_the_data_flushed(tmp_path: Path) -> None:
    out = tmp_path / "stopped.h5"
    p = subprocess.Popen(
        [*CLI, "demo", "--duration", "60", "--output", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.5)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    rows = int(stdout.split("│ voltmeter │")[1].split("│")[0].replace(",", ""))
    with h5py.File(out, "r") as f:
        assert f["measurements/voltmeter/voltage"].shape[0] == rows > 50, "every row acquired is in the file"


def test_run_with_a_config(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    out = tmp_path / "run.h5"
    ring = f"rdaq-cli-{os.getpid()}"
    cfg.write_text(
        textwrap.dedent(f"""
        duration = 1.5
        [ring]
        path = "{ring}"
        capacity_mb = 32
        [writer]
        output = "{out}"
        layout = "batches"
        flush_interval = 0.5
        [metadata]
        sample = "Si-42"
        [[instruments]]
        type = "voltmeter"
        name = "dmm"
        rate_hz = 200
        [[instruments]]
        type = "camera"
        fps = 4
        shape = [16, 24]
    """)
    )
    try:
        r = cli("run", str(cfg), "--no-progress")
        assert r.returncode == 0, r.stderr
    finally:
        if os.path.exists(f"/dev/shm/{ring}"):
            os.unlink(f"/dev/shm/{ring}")
    with h5py.File(out, "r") as f:
        groups = [f["measurements"][k] for k in f["measurements"] if k.startswith("batch_")]
        dmm_rows = sum(g["voltage"].shape[0] for g in groups if g.attrs["stream"] == "dmm")
        frames = [g["frame"] for g in groups if g.attrs["stream"] == "camera"]
        assert 290 <= dmm_rows <= 301
        assert frames and frames[0].shape[1:] == (16, 24)
        assert f["measurements/metadata/sample"][()] == b"Si-42"


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        (
            '[[instruments]]\ntype = "oscilloscope"\n',
            "unknown instrument type 'oscilloscope'; allowed: voltmeter, camera, scpi",
        ),
        (
            '[[instruments]]\ntype = "voltmeter"\nrate_hz = -5\n',
            "rate_hz must be between 0 and 100000, got -5",
        ),
        (
            '[[instruments]]\ntype = "voltmeter"\nspeed = 3\n',
            "unknown key 'speed'; allowed: amplitude, frequency_hz, name, noise, rate_hz, seed",
        ),
        ('colour = "red"\n[[instruments]]\ntype = "voltmeter"\n', "unknown key 'colour'"),
        (
            '[ring]\npolicy = "drop"\n[[instruments]]\ntype = "voltmeter"\n',
            "[ring]: policy must be 'overwrite' or 'block'",
        ),
        ('[writer]\nlayout = "columns"\n[[instruments]]\ntype = "voltmeter"\n', "[writer]: layout must be"),
        ("duration = 5\n", "no [[instruments]]"),
        (
            '[[instruments]]\ntype = "voltmeter"\nrate_hz = "fast"\n',
            "[[instruments]] #1: rate_hz must be a number, got 'fast'",
        ),
        ('[[instruments]]\ntype = "scpi"\n', "needs a resource"),
        ("not toml at all ===", "not valid TOML"),
    ],
)
def test_config_errors_name_the_file_key_and_what_is_allowed(tmp_path: Path, toml: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    r = cli("run", str(cfg), "--no-progress")
    assert r.returncode == 2
    assert str(cfg) in r.stderr and needle in r.stderr.replace("\n", " "), r.stderr


def test_missing_config_and_bad_arguments(tmp_path: Path) -> None:
    r = cli("run", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "no such file" in r.stderr
    # A directory, or a file that is not text: said as an error, never a traceback.
    r = cli("run", str(tmp_path))
    assert r.returncode == 2 and "cannot be read" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    r = cli("run", str(tmp_path / "binary.toml"))
    assert r.returncode == 2 and "cannot be read" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("demo", "--duration", "-1")
    assert r.returncode == 2 and "duration" in r.stderr
    r = cli("frobnicate")
    assert r.returncode == 2 and "No such command" in r.stderr
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"x")
    r = cli("demo", "--duration", "1", "--output", str(existing), "--no-progress")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert existing.read_bytes() == b"x"


def test_inspect_and_tail_on_live_and_finished_data(tmp_path: Path, ring_path: str) -> None:
    out = tmp_path / "live.h5"
    p = subprocess.Popen(
        [*CLI, "demo", "--duration", "30", "--output", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 20
        rings: list[Path] = []
        while not (rings and os.path.exists(out)) and time.time() < deadline:
            time.sleep(0.1)
            rings = list(Path("/dev/shm").glob(f"rust-daq-demo-{p.pid}-*"))
        assert len(rings) == 1, "the demo's ring: rust-daq-demo-<pid>-<random>"
        ring = str(rings[0])
        time.sleep(1.5)
        live = cli("inspect", ring)
        assert live.returncode == 0, live.stderr
        assert "producer_alive" in live.stdout and "True" in live.stdout
        assert "stream voltmeter" in live.stdout and "voltage: double [V]" in live.stdout
        t = cli("tail", ring, "--stream", "voltmeter", "--once")
        assert t.returncode == 0, t.stderr
        assert "voltage" in t.stdout and "V" in t.stdout
        during = cli("inspect", str(out))
        assert during.returncode == 0, during.stderr
        assert "voltmeter/" in during.stdout
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
    assert p.returncode == 0
    done = cli("inspect", str(out))
    assert done.returncode == 0
    assert (
        "voltage  (" in done.stdout
        and "float64 [V]" in done.stdout
        and "256, 256) uint16 [counts]" in done.stdout
    )
    assert cli("tail", "no-such-ring-anywhere", "--once").returncode == 2
    with RingBuffer.create(ring_path, capacity_mb=1) as r:
        r.write(b"raw")
        bad = cli("tail", ring_path, "--stream", "camera", "--once")
        assert bad.returncode == 2 and "unknown stream 'camera'" in bad.stderr


def test_write_command_runs_the_writer(ring_path: str, tmp_path: Path) -> None:
    r = cli("write", "--ring", ring_path, "--output", str(tmp_path / "x.h5"))
    assert r.returncode == 2 and "cannot open ring" in r.stderr


def test_help_shows_the_config_sections() -> None:
    """Square brackets are rich markup: unescaped, `[ring]` vanished from `run --help`."""
    out = cli("run", "--help", timeout=60).stdout
    for section in ("[ring]", "[writer]", "[metadata]", "[[instruments]]"):
        assert section in out, section


_VOLTMETER = '[[instruments]]\ntype = "voltmeter"\n'
_WRITER = '[writer]\noutput = "{out}"\n'


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        (
            '[writer]\noutput = "{out}"\ncompression = "gzip:99"\n' + _VOLTMETER,
            "[writer]: compression 'gzip:99': a gzip level is 0 (none) to 9",
        ),
        ('[writer]\noutput = "{out}"\ncompression = "zip"\n' + _VOLTMETER, "unknown compression 'zip'"),
        (
            _WRITER + _VOLTMETER + 'name = ""\n',
            "name must be a non-empty string (it names the stream), got ''",
        ),
        (
            _WRITER + _VOLTMETER + 'name = "dmm\\u0007"\n',
            "contains the control or unassigned character '\\x07'",
        ),
        ("duration = nan\n" + _WRITER + _VOLTMETER, "duration must be a finite number, got nan"),
        ("duration = inf\n" + _WRITER + _VOLTMETER, "duration must be a finite number, got inf"),
        ("duration = 0\n" + _WRITER + _VOLTMETER, "duration must be a positive number of seconds"),
        (
            _WRITER + '[[instruments]]\ntype = "camera"\nshape = [100000, 100000]\n',
            "shape [100000, 100000] makes frames of 20,000.0 MB",
        ),
        (
            _WRITER + '[[instruments]]\ntype = "camera"\nshape = [2.7, 3.9]\n',
            "shape must be [height, width], two positive integers, got [2.7, 3.9]",
        ),
        (
            _WRITER + '[[instruments]]\ntype = "camera"\nshape = [16]\n',
            "shape must be [height, width], two positive integers, got [16]",
        ),
        ("[ring]\ncapacity_mb = nan\n" + _WRITER + _VOLTMETER, "[ring]: capacity_mb must be a finite number"),
        ("[ring]\ncapacity_mb = -1\n" + _WRITER + _VOLTMETER, "capacity_mb must be a positive number"),
        ("[ring]\nkeep = true\n" + _WRITER + _VOLTMETER, "keep = true needs a path"),
        (
            '[writer]\noutput = "{out}"\nflush_interval = nan\n' + _VOLTMETER,
            "flush_interval must be a finite number, got nan",
        ),
    ],
)
def test_config_values_that_cannot_run_are_refused_before_acquiring(
    tmp_path: Path, toml: str, needle: str
) -> None:
    """Each of these ran before (a 0-row file and exit 0, a MemoryError, a frame shape silently
    truncated, a run that never ends): now a ConfigError naming the key, exit 2, nothing made."""
    cfg = tmp_path / "bad.toml"
    out = tmp_path / "out.h5"
    cfg.write_text(toml.replace("{out}", str(out)))
    p = subprocess.Popen(
        [*CLI, "run", str(cfg), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        for ring in Path("/dev/shm").glob(f"rust-daq-{p.pid}*"):
            ring.unlink()
    assert p.returncode == 2, stderr
    assert str(cfg) in stderr and needle in stderr.replace("\n", " "), stderr
    assert "Traceback" not in stderr
    assert not out.exists(), "refused before the writer started"
