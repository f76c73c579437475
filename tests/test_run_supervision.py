"""`rust-daq run` tells the truth and keeps its writer alive: real `rust-daq` processes, real
signals, files read back with h5py (issue 15, item 2)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np
import pytest

T = TypeVar("T")


def test_the_writer_module_runs_without_a_runpy_warning() -> None:
    """`rust_daq/__init__` imported the writer, so `python -m rust_daq.writer` found itself
    already in sys.modules and runpy warned; under -W error that warning is fatal."""
    r = subprocess.run(
        [sys.executable, "-W", "error", "-m", "rust_daq.writer", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "usage:" in r.stdout.lower()
    # The package still offers the writer's names, imported on first use.
    code = (
        "import sys, rust_daq; assert 'rust_daq.writer' not in sys.modules; "
        "assert 'h5py' not in sys.modules; "
        "from rust_daq import HDF5Writer, IncompatibleFileError; "
        "assert HDF5Writer.__module__ == 'rust_daq.hdf5.writer' and rust_daq.IncompatibleFileError"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _writer_on_a_ring(tmp_path: Path, *args: str) -> tuple[str, Path, subprocess.Popen[str]]:
    """A writer process with its parent pipe (standard input) open, on a fresh ring holding
    7 batches of 100 rows."""
    import pyarrow as pa

    from rust_daq import RingBuffer

    ring_path = f"/dev/shm/rust-daq-test-{secrets.token_hex(6)}"
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        for i in range(7):
            ring.write_arrow_batch(pa.record_batch({"i": np.arange(i * 100, (i + 1) * 100)}), "v")
    out = tmp_path / "w.h5"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rust_daq.writer",
            "--ring",
            ring_path,
            "--output",
            str(out),
            "--parent-pipe",
            *args,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.communicate()[1]
    return ring_path, out, p


def _rows(out: Path) -> list[int]:
    with h5py.File(out, "r") as f:
        return [int(x) for x in f["measurements/v/i"][()]]


def test_sigterm_with_the_parent_pipe_open_is_a_clean_stop_not_sigabrt(tmp_path: Path) -> None:
    """The parent-pipe watcher blocked in sys.stdin's buffered reader held its lock, so every
    writer stopped by SIGTERM with its pipe open died in interpreter shutdown with SIGABRT
    ("could not acquire lock for <stdin>") after a good final flush, and its supervisor
    reported a failed recording."""
    ring_path, out, p = _writer_on_a_ring(tmp_path)
    try:
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0, p.communicate()[1]
        assert _rows(out) == list(range(700))
    finally:
        p.kill()
        p.communicate()
        os.unlink(ring_path)


def test_a_pipe_closed_by_a_living_parent_stops_the_writer_without_orphaning_it(tmp_path: Path) -> None:
    """Closing standard input is a stop request; only a parent that died makes the writer an
    orphan that removes the ring (stop_process sends SIGTERM and then closes the pipe: the
    pipe could win the race and the writer removed a ring its living parent still used)."""
    ring_path, out, p = _writer_on_a_ring(tmp_path, "--remove-ring-if-orphaned")
    try:
        assert p.stdin is not None
        p.stdin.close()
        p.stdin = None  # (communicate() would flush it)
        err = p.communicate(timeout=60)[1]
        assert p.returncode == 0, err
        assert "is gone" not in err and "removed the ring" not in err, err
        assert os.path.exists(ring_path), "the writer removed the ring of a living parent"
        assert _rows(out) == list(range(700))
    finally:
        p.kill()
        with contextlib.suppress(OSError, ValueError):
            p.communicate()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ring_path)


_DIES_AT_ONCE = """
import os, sys, threading, time
from rust_daq.hdf5.process import start_process
ring, out = sys.argv[1], sys.argv[2]
threading.Thread(target=start_process, args=(ring, out), kwargs={"remove_ring_if_orphaned": True}, daemon=True).start()
time.sleep(0.05)  # the writer is still starting: its watcher does not run yet
os._exit(0)
"""


def test_a_parent_that_dies_while_its_writer_starts_still_orphans_it(tmp_path: Path) -> None:
    """The watcher took its parent from getppid() when it started, a second after the fork: a
    parent dead by then had already handed the writer to another process, the EOF looked like
    a stop request and the orphan's ring was never removed (nor was a "ready" to a dead pipe
    survived)."""
    import pyarrow as pa

    from rust_daq import RingBuffer

    ring_path = f"/dev/shm/rust-daq-test-{secrets.token_hex(6)}"
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        for i in range(7):
            ring.write_arrow_batch(pa.record_batch({"i": np.arange(i * 100, (i + 1) * 100)}), "v")
    out = tmp_path / "w.h5"
    try:
        parent = subprocess.run([sys.executable, "-c", _DIES_AT_ONCE, ring_path, str(out)], timeout=60)
        assert parent.returncode == 0

        def writers() -> list[int]:
            return [
                int(p.name)
                for p in Path("/proc").iterdir()
                if p.name.isdigit() and ring_path in _cmdline(int(p.name))
            ]

        wait_for("the orphaned writer to exit", lambda: not writers(), timeout=90)
        assert not os.path.exists(ring_path), "the orphan left its dead parent's ring behind"
        assert _rows(out) == list(range(700))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ring_path)


# -- helpers ------------------------------------------------------------------------------------

RUST_DAQ = shutil.which("rust-daq") or "rust-daq"


def write_config(tmp_path: Path, body: str, *, duration: float | None = None, rate_hz: int = 200) -> Path:
    cfg = tmp_path / "run.toml"
    head = f"duration = {duration}\n" if duration is not None else ""
    cfg.write_text(
        head
        + textwrap.dedent(f"""
        [writer]
        output = "{tmp_path / "run.h5"}"
        flush_interval = 0.3
        [[instruments]]
        type = "voltmeter"
        rate_hz = {rate_hz}
        """)
        + body
    )
    return cfg


def start_run(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [RUST_DAQ, "run", str(cfg), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def writer_pids(parent: int) -> list[int]:
    """The `python -m rust_daq.writer` children of `parent`, alive (not zombies)."""
    pids = []
    for children in Path(f"/proc/{parent}/task").glob("*/children"):
        try:
            pids += [int(c) for c in children.read_text().split()]
        except OSError:
            pass
    return [p for p in pids if _alive(p) and "rust_daq.writer" in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status and "\nState:\tX" not in status


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def book_rows(output: Path, stream: str = "voltmeter") -> int:
    """The rows the file's book says it holds (an SWMR read beside the writer), 0 before any."""
    try:
        with h5py.File(output, "r", libver="latest", swmr=True) as f:
            return int(f[f"rust_daq/streams/{stream}"][0])
    except (OSError, KeyError):
        return 0


def settled(output: Path, rows: int = 200) -> None:
    """Waits until the writer has committed `rows` voltmeter rows to the file (a few flushes):
    a fixed sleep was not enough on a loaded CI machine, where the start alone can take it."""
    wait_for(f"{rows} rows in {output}", lambda: book_rows(output) >= rows, timeout=90)


def table_rows(stdout: str, stream: str = "voltmeter") -> tuple[int, int]:
    """(rows acquired, rows in the file) from the summary table."""
    cells = stdout.split(f"│ {stream} │")[1].split("│")
    return int(cells[0].replace(",", "")), int(cells[1].replace(",", ""))


def file_rows(path: Path, stream: str = "voltmeter") -> np.ndarray:
    """The stream's timestamps, from a plain h5py open (no SWMR, no repair)."""
    with h5py.File(path, "r") as f:
        ts = f[f"measurements/{stream}/timestamp"][()]
        volts = f[f"measurements/{stream}/voltage"][()]
        assert volts.shape == ts.shape and np.all(np.isfinite(volts))
        assert f[f"rust_daq/streams/{stream}"][0] == len(ts), "the file's book says what it holds"
    return np.asarray(ts)


def rings_of(pid: int) -> list[Path]:
    return list(Path("/dev/shm").glob(f"rust-daq-{pid}*"))


@pytest.fixture
def runs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed (with their writers) and their rings removed after."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        writers = writer_pids(p.pid) if p.poll() is None else []
        if p.poll() is None:
            p.kill()
            p.communicate()
        for w in writers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
        for ring in rings_of(p.pid):
            ring.unlink(missing_ok=True)


# -- the writer is supervised ---------------------------------------------------------------------


def test_a_writer_killed_mid_run_is_restarted_and_the_file_holds_every_row_once(
    tmp_path: Path, runs: list[subprocess.Popen[str]]
) -> None:
    """Today the run went on without a writer and said "wrote ..." with half the rows missing."""
    cfg = write_config(tmp_path, "", duration=9)
    p = start_run(cfg)
    runs.append(p)
    killed = []
    for _ in range(2):
        pid = wait_for("a writer", lambda: [w for w in writer_pids(p.pid) if w not in killed])[0]
        time.sleep(3)  # longer than the supervisor's min_uptime (2 s + 2 flushes): not "at once"
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert "writer: 2 restart(s)" in stdout
    assert stderr.count("restarting the writer in") == 2 and "SIGKILL" in stderr, stderr
    assert "wrote " in stdout and "Read it with" in stdout
    acquired, in_file = table_rows(stdout)
    ts = file_rows(tmp_path / "run.h5")
    assert len(ts) == in_file == acquired > 1000, "every row acquired is in the file"
    assert np.all(np.diff(ts) > 0), "none twice, in order"
    assert not rings_of(p.pid), "the run removed its ring"


def test_a_writer_that_cannot_be_kept_alive_fails_the_run_and_says_what_is_where(
    tmp_path: Path, runs: list[subprocess.Popen[str]]
) -> None:
    """Every writer the run starts is SIGKILLed as soon as it is seen (after the first has
    flushed a little): the run must give up, exit 1 and not claim a complete file."""
    cfg = write_config(tmp_path, "", duration=120)
    p = start_run(cfg)
    runs.append(p)
    first = wait_for("a writer", lambda: writer_pids(p.pid))[0]
    settled(tmp_path / "run.h5")
    os.kill(first, signal.SIGKILL)
    kills = 1
    while p.poll() is None:
        for w in writer_pids(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
                kills += 1
        time.sleep(0.01)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 1, (stdout, stderr)
    assert "stopped by writer failure" in stdout
    assert "RUN FAILED: the writer could not be kept alive" in stdout
    assert "wrote " not in stdout and "Read it with" not in stdout
    assert kills >= 4 and "giving up" in stderr
    acquired, in_file = table_rows(stdout)
    with h5py.File(tmp_path / "run.h5", "r", libver="latest", swmr=True) as f:
        held = int(f["rust_daq/streams/voltmeter"][0])
    assert in_file == held, stdout
    assert f"(voltmeter {held:,} rows)" in stdout, "what the file holds"
    assert acquired > held, "rows acquired after the writer was given up on"
    assert f"not in the file: voltmeter {acquired - held:,} rows" in stdout
    # Those records exist only in the ring now: it is kept, and writing it finishes the file.
    assert "records the writer did not commit; they are in the ring, kept: rust-daq write --ring" in " ".join(
        stdout.split()
    )
    (ring,) = rings_of(p.pid)
    try:
        w = subprocess.Popen(
            [RUST_DAQ, "write", "--ring", str(ring), "--output", str(tmp_path / "run.h5")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        wait_for("the rest in the file", lambda: book_rows(tmp_path / "run.h5") >= acquired, timeout=60)
        w.send_signal(signal.SIGTERM)
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, err
        ts = file_rows(tmp_path / "run.h5")
        assert len(ts) == acquired and np.all(np.diff(ts) > 0), "every acquired row once: nothing was lost"
    finally:
        ring.unlink(missing_ok=True)


def test_a_daemon_whose_recording_could_not_be_kept_alive_exits_1(
    tmp_path: Path, runs: list[subprocess.Popen[str]]
) -> None:
    """The daemon gave up on its config's recording (every writer SIGKILLed) and still exited
    0 when stopped: a headless run must say, in its exit status, that its file is short."""
    cfg = write_config(tmp_path, "")
    p = subprocess.Popen(
        [RUST_DAQ, "daemon", str(cfg), "--port", "0", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs.append(p)
    first = wait_for("a writer", lambda: writer_pids(p.pid))[0]
    settled(tmp_path / "run.h5")
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every writer it starts, until it gives up
        for w in writer_pids(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
        time.sleep(0.01)
        if time.monotonic() > deadline - 45 and not writer_pids(p.pid):
            break
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1, (stdout, stderr)
    assert "RECORDING FAILED" in stderr and "giving up" in stderr, (stdout, stderr)


def test_a_run_killed_with_sigkill_leaves_no_writer_running_and_a_file_plain_h5py_opens(
    tmp_path: Path, runs: list[subprocess.Popen[str]]
) -> None:
    """The writer notices its parent's death, drains, flushes, closes the file and exits; the
    ring the run made (256 MiB of RAM) goes with it, since nobody else would remove it."""
    cfg = write_config(tmp_path, "", duration=120)
    p = start_run(cfg)
    runs.append(p)
    writer = wait_for("a writer", lambda: writer_pids(p.pid))[0]
    assert rings_of(p.pid), "the run's ring"
    settled(tmp_path / "run.h5")
    p.kill()
    p.communicate(timeout=60)
    wait_for("the orphaned writer to exit", lambda: not _alive(writer), timeout=60)
    ts = file_rows(tmp_path / "run.h5")
    assert len(ts) > 100 and np.all(np.diff(ts) > 0)
    assert not rings_of(p.pid), "the orphaned writer removed the ring its run made"


def test_two_sigints_back_to_back_still_print_the_summary(
    tmp_path: Path, runs: list[subprocess.Popen[str]]
) -> None:
    """Today the second Ctrl-C raised KeyboardInterrupt through the shutdown: no summary and
    "coroutine ... was never awaited" warnings."""
    cfg = write_config(tmp_path, "")
    p = start_run(cfg)
    runs.append(p)
    wait_for("a writer", lambda: writer_pids(p.pid))
    settled(tmp_path / "run.h5")
    os.kill(p.pid, signal.SIGINT)
    time.sleep(0.01)  # an impatient double Ctrl-C: the second lands in the shutdown
    os.kill(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert "never awaited" not in stderr and "Traceback" not in stderr, stderr
    assert "stopped by SIGINT" in stdout and "Read it with" in stdout
    acquired, in_file = table_rows(stdout)
    assert len(file_rows(tmp_path / "run.h5")) == in_file == acquired > 0
    assert not rings_of(p.pid)


# -- rings ---------------------------------------------------------------------------------------


def test_default_ring_names_are_random_and_removed_on_every_exit_path(
    tmp_path: Path, runs: list[subprocess.Popen[str]]
) -> None:
    # A run that succeeds: its ring is rust-daq-<pid>-<8 hex>, gone at the end.
    p = start_run(write_config(tmp_path, "", duration=3))
    runs.append(p)
    ring = wait_for("the ring", lambda: rings_of(p.pid))[0]
    assert re.fullmatch(rf"rust-daq-{p.pid}-[0-9a-f]{{8}}", ring.name), ring.name
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert not ring.exists()
    # A run whose writer cannot start (its output directory does not exist): exit 2, no ring.
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = bad / "run.toml"
    cfg.write_text(
        f'duration = 3\n[writer]\noutput = "{tmp_path}/no/such/dir/x.h5"\n[[instruments]]\ntype = "voltmeter"\n'
    )
    p = start_run(cfg)
    runs.append(p)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2 and "writer process did not start" in stderr, stderr
    assert not rings_of(p.pid), "a failed run removes its ring too"


def test_a_named_ring_is_removed_unless_the_config_keeps_it(
    tmp_path: Path, runs: list[subprocess.Popen[str]]
) -> None:
    name = f"rdaq-test-keep-{os.getpid()}"
    try:
        for keep, kept in (("", False), ("keep = true\n", True)):
            (tmp_path / "run.h5").unlink(missing_ok=True)
            cfg = write_config(tmp_path, f'[ring]\npath = "{name}"\ncapacity_mb = 8\n{keep}', duration=1)
            p = start_run(cfg)
            runs.append(p)
            _, stderr = p.communicate(timeout=120)
            assert p.returncode == 0, stderr
            assert os.path.exists(f"/dev/shm/{name}") == kept, keep
    finally:
        Path(f"/dev/shm/{name}").unlink(missing_ok=True)


# -- the daemon's recording ------------------------------------------------------------------------


def test_daemon_status_never_reports_recording_for_a_dead_writer(
    tmp_path: Path, runs: list[subprocess.Popen[str]]
) -> None:
    """Today status said "recording": true for as long as the daemon ran after its writer died."""
    import rust_daq.remote

    cfg = write_config(tmp_path, "")
    token = secrets.token_hex(16)
    p = subprocess.Popen(
        [RUST_DAQ, "daemon", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_DAQ_TOKEN": token},
    )
    runs.append(p)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("listening on grpc"), p.communicate()[1] if not line else line
    with rust_daq.remote.connect(line.split()[-1], token=token) as daq:
        first = wait_for("a writer", lambda: writer_pids(p.pid))[0]
        st = daq.status()["writer"]
        assert st["recording"] is True and st["state"] == "running" and st["pid"] == first, st
        os.kill(first, signal.SIGKILL)
        wait_for("the writer's death", lambda: not _alive(first))
        # /proc shows the leader a zombie while the kernel still ends its other threads; the
        # process can be waited for (and status sees it dead) a moment later, never much later.
        wait_for(
            "status to stop reporting the dead writer",
            lambda: (s := daq.status()["writer"])["recording"] is False or s.get("pid") not in (None, first),
            timeout=5,
        )
        st = wait_for(
            "a restarted writer",
            lambda: (s := daq.status()["writer"])["state"] == "running" and s["restarts"] == 1 and s,
        )
        assert st["recording"] is True and st["pid"] not in (None, first)
        # Now one that cannot be kept alive: every writer killed as soon as it is seen.
        while (st := daq.status()["writer"])["state"] != "failed":
            assert p.poll() is None
            for w in writer_pids(p.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w, signal.SIGKILL)
            time.sleep(0.01)
        assert st["recording"] is False and "died 4 times in a row" in st["reason"], st
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert "the writer failed after" in stderr, stderr
    assert not rings_of(p.pid), "the daemon removed its ring (a random name)"


def test_an_unexpected_error_in_the_supervisor_fails_it_instead_of_hanging_its_caller(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An exception the supervisor's thread did not expect (here from starting a writer)
    ended the thread silently: start() waited forever and stop() reported "restarting"."""
    import rust_daq._supervisor as supervisor
    from rust_daq import RustDaqError

    def boom(*args: object, **kwargs: object) -> None:
        raise ValueError("not a writer")

    monkeypatch.setattr(supervisor, "start_process", boom)
    sup = supervisor.WriterSupervisor("no-ring", str(tmp_path / "x.h5"))
    with pytest.raises(RustDaqError, match="supervisor failed: ValueError: not a writer"):
        sup.start()
    assert sup.state == "failed" and sup.stop() == "failed"
