"""The examples run as written and leave what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart(tmp_path: Path) -> None:
    try:
        r = subprocess.run(
            [sys.executable, str(EXAMPLES / "quickstart.py")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        rows = int(r.stdout.split()[0])
        assert rows > 2000
        with h5py.File(tmp_path / "quickstart.h5", "r") as f:
            assert f["measurements/voltmeter/voltage"].shape == (rows,)
    finally:
        if os.path.exists("/dev/shm/quickstart"):
            os.unlink("/dev/shm/quickstart")


def test_two_process_demo() -> None:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "two_process_demo.py"), "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: every block arrived intact" in r.stdout and "0 lost, 0 with wrong values" in r.stdout


def test_live_view_notebook_against_a_running_acquisition(tmp_path: Path) -> None:
    """The notebook, executed headless with nbclient, attached to a live `rust-daq run`."""
    import nbclient
    import nbformat

    ring = f"rdaq-notebook-{os.getpid()}"
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'duration = 60\n[ring]\npath = "{ring}"\ncapacity_mb = 64\n[writer]\nenabled = false\n'
        '[[instruments]]\ntype = "voltmeter"\nrate_hz = 1000\n[[instruments]]\ntype = "camera"\nfps = 5\nshape = [64, 64]\n'
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "rust_daq.cli", "run", str(cfg), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        import time

        deadline = time.time() + 30
        while time.time() < deadline:
            if os.path.exists(f"/dev/shm/{ring}"):
                from rust_daq import RingBuffer

                with RingBuffer.open(ring) as r:
                    # Both streams there, and a full 2000-row window of the voltmeter.
                    if {"voltmeter", "camera"} <= set(r.streams()) and len(
                        r.latest("voltmeter", 2000)["voltage"]
                    ) == 2000:
                        break
            time.sleep(0.2)
        nb = nbformat.read(EXAMPLES / "live_view.ipynb", as_version=4)
        os.environ["RUST_DAQ_RING"] = ring
        os.environ["MPLBACKEND"] = "Agg"
        nbclient.NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
        text = "".join(
            o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
        )
        assert "producer alive: True" in text
        assert "zero-copy view still intact: True" in text
        assert "frame (1, 64, 64) uint16" in text
        rows = int(text.split("rows; zero-copy")[0].split()[-1])
        assert rows == 2000
    finally:
        os.environ.pop("RUST_DAQ_RING", None)
        run.send_signal(__import__("signal").SIGTERM)
        run.communicate(timeout=60)
        if os.path.exists(f"/dev/shm/{ring}"):
            os.unlink(f"/dev/shm/{ring}")
