"""Strangers stay out of the daemon (issue 15, item 6): recordings only under its data
directory, a token always (a generated one only its own user can read), and errors that say
what was wrong in one line, never a server traceback. Real daemons (`rust-daq daemon`
processes, or a `Daemon` in-process on a free loopback port), stock pyarrow.flight clients,
and, as root, clients run as another user (uid 65534, with setpriv)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import pyarrow as pa
import pyarrow.flight as fl
import pytest

import rust_daq
import rust_daq.remote
import test_daemon as td  # the module, so that its tests are not collected here again
from rust_daq import _access
from rust_daq.remote import RemoteError

CLI = [sys.executable, "-m", "rust_daq.cli"]
NOBODY = 65534


@dataclass
class Running:
    url: str
    proc: subprocess.Popen[str]
    stderr: str = ""
    token_file: Path | None = None
    token: str = ""  # the token in token_file ("" if there is none)
    env: dict[str, str] = field(default_factory=dict)


@contextmanager
def daemon(*args: str, cwd: Path | None = None, xdg: Path, streams: int = 2) -> Iterator[Running]:
    """`rust-daq daemon ARGS --port 0` without any token given, its token file in `xdg`
    (XDG_RUNTIME_DIR); SIGTERM at the end, which must end it with exit 0 and its token file
    removed. `.stderr` holds its log afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "RUST_DAQ_TOKEN"}
    env["XDG_RUNTIME_DIR"] = str(xdg)
    p = subprocess.Popen(
        [*CLI, "daemon", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    run = Running("", p, env=env)
    try:
        line = td._first_line(p)
        assert line.startswith("listening on grpc"), line
        run.url = line.split()[-1]
        run.token_file = xdg / "rust-daq" / f"daemon-{run.url.rsplit(':', 1)[1]}.token"
        if run.token_file.exists():  # (asserted where it matters: each test fails on its own point)
            run.token = run.token_file.read_text().split("\n")[0]
        with rust_daq.remote.connect(run.url, token=run.token) as daq:
            t0 = time.monotonic()
            while len(daq.streams()) < streams:
                assert time.monotonic() - t0 < 30, "the daemon's streams did not appear"
                time.sleep(0.05)
        yield run
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        _, run.stderr = p.communicate(timeout=60)
    assert p.returncode == 0, run.stderr
    assert run.token_file is not None and not run.token_file.exists(), "the token file was removed at exit"


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private XDG_RUNTIME_DIR for the daemons and clients of one test."""
    d = tmp_path / "xdg"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    monkeypatch.delenv("RUST_DAQ_TOKEN", raising=False)
    return d


def options(token: str) -> fl.FlightCallOptions:
    return fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def server_part(e: BaseException) -> str:
    """What the daemon said, without what the client's gRPC appends."""
    return str(e).split(". Detail: ", 1)[0].split(". gRPC client debug context", 1)[0]


def assert_short(e: BaseException) -> str:
    text = str(e)
    assert "Traceback" not in text and 'File "' not in text, text[:2000]
    said = server_part(e)
    assert len(said) < 300 and "\n" not in said, said[:2000]
    assert "resource exhausted" not in text.lower(), "the daemon's message was too big to be received"
    return said


# -- a: recordings only under the data directory ----------------------------------------------


def test_recordings_from_the_wire_go_only_under_the_data_directory(tmp_path: Path, xdg: Path) -> None:
    """The issue's reproduction, from the daemon's own user: an absolute path, '..', a
    subdirectory, control characters, a symlink and a wrong suffix are each refused in one
    line, and nothing is created outside data_dir; a plain name goes into data_dir (not the
    working directory), its metadata kept as data and never as a line of the log."""
    data, cwd, outside = tmp_path / "data", tmp_path / "cwd", tmp_path / "outside"
    for d in (data, cwd, outside):
        d.mkdir()
    (data / "sub").mkdir()
    (data / "link.h5").symlink_to(outside / "through-link.h5")
    (data / "taken.h5").write_bytes(b"")
    refused = {
        str(outside / "abs.h5"): "absolute paths are refused",
        "../outside/dotdot.h5": "'..' is refused",
        "sub/nested.h5": "directories are refused",
        "x\x00.h5": "control character",
        "x\n.h5": "control character",
        "x\u202e.h5": "control character",
        "notes.txt": "must end in .h5, .hdf5, .nxs",
        "link.h5": "is a symbolic link",
        "taken.h5": "already exists",
        "": 'needs "file"',
        "a" * 300 + ".h5": "longer than 255 bytes",
    }
    with daemon("--data-dir", str(data), cwd=cwd, xdg=xdg) as run:
        client = fl.connect(run.url)
        opts = options(run.token)
        for name, why in refused.items():
            body = json.dumps({"file": name, "metadata": {"k": "v"}}).encode()
            with pytest.raises(fl.FlightServerError) as e:
                list(client.do_action(fl.Action("start_recording", body), opts))
            said = assert_short(e.value)
            assert said.startswith("start_recording: ") and why in said, (name[:50], said)
        for key in ("\nATTACKER-KEY", "a/b", "json", "k" * 256):
            body = json.dumps({"file": "k.h5", "metadata": {key: 1}}).encode()
            with pytest.raises(fl.FlightServerError, match="metadata key") as e:
                list(client.do_action(fl.Action("start_recording", body), opts))
            assert_short(e.value)
        metadata = {"k": "\nATTACKER-LINE\n", "sample": "Si-42"}
        body = json.dumps({"file": "ok.h5", "metadata": metadata}).encode()
        (result,) = client.do_action(fl.Action("start_recording", body), opts)
        started = json.loads(result.body.to_pybytes())
        assert started["file"] == str(Path(os.path.realpath(data)) / "ok.h5")
        list(client.do_action(fl.Action("stop_recording", b""), opts))
    assert sorted(p.name for p in outside.iterdir()) == [], "nothing was created outside data_dir"
    assert sorted(p.name for p in cwd.iterdir()) == [], "nothing in the working directory"
    assert sorted(p.name for p in data.iterdir()) == ["link.h5", "ok.h5", "sub", "taken.h5"]
    assert list((data / "sub").iterdir()) == []
    with h5py.File(data / "ok.h5", "r") as f:
        assert json.loads(f["measurements/metadata/json"][()]) == metadata  # data, as sent
    # Logged (if at all) as a repr: never a line of its own in the daemon's log.
    assert not [line for line in run.stderr.splitlines() if line.startswith("ATTACKER")], run.stderr


def test_the_data_directory_defaults_to_the_working_directory_or_the_config(
    tmp_path: Path, xdg: Path
) -> None:
    """`[daemon] data_dir` in the config, else the working directory at start; a relative
    data_dir is resolved once at start (against the working directory)."""
    cwd, cfg_dir = tmp_path / "cwd", tmp_path / "cwd" / "from-config"
    cfg_dir.mkdir(parents=True)
    config = td.config(tmp_path)
    with daemon(str(config), cwd=cwd, xdg=xdg) as run:
        with rust_daq.remote.connect(run.url) as daq:  # the token: read from its file
            assert daq.start_recording("here.h5")["file"] == str(Path(os.path.realpath(cwd)) / "here.h5")
            daq.stop_recording()
    config.write_text(config.read_text() + '\n[daemon]\ndata_dir = "from-config"\n')
    with daemon(str(config), cwd=cwd, xdg=xdg) as run:
        with rust_daq.remote.connect(run.url) as daq:
            assert daq.start_recording("there.h5")["file"] == str(
                Path(os.path.realpath(cfg_dir)) / "there.h5"
            )
            daq.stop_recording()
    assert (cwd / "here.h5").is_file() and (cfg_dir / "there.h5").is_file()
    r = subprocess.run(
        [*CLI, "daemon", "--port", "0", "--data-dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and f"the data directory {tmp_path / 'missing'} does not exist" in r.stderr


def test_recording_names_are_checked_component_by_component(tmp_path: Path) -> None:
    """The validation itself (what the daemon calls): names only, never a path."""
    data = _access.resolve_data_dir(tmp_path)
    assert _access.recording_path(data, "run-42.NXS") == str(data / "run-42.NXS")
    for bad in ("/etc/x.h5", "..", "../x.h5", "a/../x.h5", "./x.h5", ".", "x.h5/", "x\x7f.h5", 5, None):
        with pytest.raises(_access.RecordingNameError):
            _access.recording_path(data, bad)
    (tmp_path / "dangling.h5").symlink_to(tmp_path / "nowhere.h5")
    with pytest.raises(_access.RecordingNameError, match="symbolic link"):
        _access.recording_path(data, "dangling.h5")
    with pytest.raises(_access.RecordingNameError, match="64 KiB|at most"):
        _access.check_metadata({"k": "x" * 70_000})
    for c in ("gzip --output=/x", "-x", "gzip:4 lzf", "a" * 40):
        with pytest.raises(_access.RecordingNameError):
            _access.check_compression(c)
    assert _access.check_compression("gzip:4") == "gzip:4"


# -- b: a token always; another user's local client is refused ----------------------------------


def test_a_daemon_without_a_token_makes_one_only_its_user_can_read(tmp_path: Path, xdg: Path) -> None:
    with daemon(xdg=xdg) as run:
        assert run.token_file is not None
        d, f = os.lstat(run.token_file.parent), os.lstat(run.token_file)
        assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o700 and d.st_uid == os.geteuid()
        assert stat.S_ISREG(f.st_mode) and stat.S_IMODE(f.st_mode) == 0o600 and f.st_uid == os.geteuid()
        token, pid = run.token_file.read_text().split()
        assert len(token) >= 40 and int(pid) == run.proc.pid
        client = fl.connect(run.url)
        for opts in (fl.FlightCallOptions(), options("guess"), options(token[:-1])):
            with pytest.raises(fl.FlightUnauthenticatedError) as e:
                list(client.list_flights(options=opts))
            assert_short(e.value)
            with pytest.raises(fl.FlightUnauthenticatedError):
                list(client.do_action(fl.Action("start_recording", b'{"file": "x.h5"}'), opts))
        assert {i.descriptor.path[0] for i in client.list_flights(options=options(token))} == {
            b"voltmeter",
            b"camera",
        }
        with rust_daq.remote.connect(run.url) as daq:  # the token file, found by the client
            assert set(daq.streams()) == {"voltmeter", "camera"}
        with pytest.raises(RemoteError, match="needs a token"):
            rust_daq.remote.connect(run.url, token="")  # explicitly none
        tail = subprocess.run(
            [*CLI, "tail", run.url, "--once"], capture_output=True, text=True, timeout=60, env=run.env
        )
        assert tail.returncode == 0 and "voltage" in tail.stdout, tail.stderr
    assert not (xdg / "rust-daq" / run.token_file.name).exists()


def test_the_token_file_is_never_written_through_a_link_and_a_stale_one_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    victim = tmp_path / "victim"
    (xdg / "rust-daq").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    path = _access.write_token_file(4242, "t1")
    assert path == home / ".rust-daq" / "daemon-4242.token", "the symlinked directory was passed over"
    assert list((tmp_path / "elsewhere").iterdir()) == []
    (home / ".rust-daq" / "daemon-4243.token").symlink_to(victim)
    with pytest.raises(_access.AccessError):
        _access.write_token_file(4243, "t2")
    assert not victim.exists(), "nothing written through the planted link"
    assert _access.write_token_file(4242, "t3") == path, "a killed daemon's stale file is replaced"
    assert _access.read_token_file(4242) == "t3"
    os.chmod(path, 0o644)
    assert _access.read_token_file(4242) is None, "a token file others can read is not used"
    _access.remove_token_file(path, "t3")
    assert not path.exists()
    # Files that SIGKILLed daemons left: removed once their pid is gone, at the next start.
    gone = subprocess.Popen(["true"])
    gone.wait()
    (home / ".rust-daq" / "daemon-1.token").write_text(f"old\n{gone.pid}\n")
    (home / ".rust-daq" / "daemon-2.token").write_text(f"alive\n{os.getpid()}\n")
    _access.write_token_file(4244, "t4")
    names = sorted(p.name for p in (home / ".rust-daq").iterdir())
    assert names == ["daemon-2.token", "daemon-4243.token", "daemon-4244.token"], names


@pytest.fixture(scope="session")
def nobody_python() -> Iterator[tuple[list[str], dict[str, str]]]:
    """A command running this Python as uid/gid 65534 (setpriv), and its environment. This
    interpreter's prefix may sit in a directory that user cannot enter (/root): it is
    hard-linked into a world-readable temporary directory for the test's duration."""
    if os.geteuid() != 0:
        pytest.skip("running a client as another user needs root (setpriv --reuid)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    project = Path(rust_daq.__file__).resolve().parent.parent
    farm = Path(tempfile.mkdtemp(prefix="rdaq-nobody-py-", dir="/tmp"))
    try:
        os.chmod(farm, 0o755)
        prefix = Path(sys.base_prefix)
        r = subprocess.run(["cp", "-al", str(prefix), str(farm / "py")], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot hard-link {prefix} for another user: {r.stderr.strip()}")
        ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
        paths = [
            str(farm / "py" / Path(p).relative_to(prefix)) if Path(p).is_relative_to(prefix) else p
            for p in sys.path
            if p and "site-packages" in p
        ]
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONHOME": str(farm / "py"),
            "PYTHONPATH": os.pathsep.join([str(project), *paths]),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": os.environ.get("HOME", "/root"),
            "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", ""),
        }
        cmd = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            str(farm / "py" / "bin" / ver),
        ]
        check = subprocess.run(
            [*cmd, "-c", "import os, pyarrow.flight, rust_daq.remote; print(os.getuid())"],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
        )
        if check.stdout.strip() != str(NOBODY):
            pytest.skip(f"this Python cannot run as uid {NOBODY}: {check.stderr.strip()[-300:]}")
        yield cmd, env
    finally:
        shutil.rmtree(farm, ignore_errors=True)


STRANGER = """
import json, sys
import pyarrow.flight as fl
url, target = sys.argv[1], sys.argv[2]
c = fl.connect(url)
body = json.dumps({"file": target, "metadata": {"k": "\\nATTACKER-LINE\\n"}}).encode()
out = {}
for name, call in {
    "start_recording": lambda: list(c.do_action(fl.Action("start_recording", body))),
    "list_flights": lambda: list(c.list_flights()),
    "do_get": lambda: c.do_get(fl.Ticket(b"voltmeter")).read_chunk(),
}.items():
    try:
        call()
        out[name] = "accepted"
    except fl.FlightUnauthenticatedError as e:
        out[name] = "unauthenticated"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
try:
    import rust_daq.remote
    rust_daq.remote.connect(url)   # looks for a token file: it cannot read the daemon's
    out["remote.connect"] = "accepted"
except rust_daq.remote.RemoteError as e:
    out["remote.connect"] = str(e)
print(json.dumps(out))
"""


def test_another_user_on_this_machine_is_refused_and_writes_nothing(
    tmp_path: Path, nobody_python: tuple[list[str], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's reproduction as uid 65534 against a root daemon on loopback with no token
    given: start_recording into a root-only 0700 directory. Refused as unauthenticated (it
    cannot read the token file), and nothing is created; the daemon's own user is let in."""
    cmd, env = nobody_python
    xdg = Path(tempfile.mkdtemp(prefix="rdaq-xdg-", dir="/tmp"))  # one nobody could enter
    os.chmod(xdg, 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.delenv("RUST_DAQ_TOKEN", raising=False)
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    try:
        with daemon(cwd=tmp_path, xdg=xdg) as run:  # data_dir: the working directory
            assert run.token_file is not None
            got = subprocess.run(
                [*cmd, "-c", STRANGER, run.url, str(secret / "x.h5")],
                capture_output=True,
                text=True,
                timeout=60,
                env={**env, "XDG_RUNTIME_DIR": str(xdg)},
                cwd="/",
            )
            assert got.returncode == 0, got.stderr
            out = json.loads(got.stdout)
            assert out["start_recording"] == out["list_flights"] == out["do_get"] == "unauthenticated", out
            assert "needs a token" in out["remote.connect"], out
            read = subprocess.run([*cmd[:-1], "cat", str(run.token_file)], capture_output=True, text=True)
            assert read.returncode != 0 and "Permission denied" in read.stderr, "nobody cannot read it"
            tail = subprocess.run(
                [*cmd, "-m", "rust_daq.cli", "tail", run.url, "--once"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**env, "XDG_RUNTIME_DIR": str(xdg)},
                cwd="/",
            )
            assert tail.returncode != 0 and "needs a token" in " ".join(tail.stderr.split()), tail.stderr
            with rust_daq.remote.connect(run.url) as daq:  # this user: in, from its token file
                assert set(daq.streams()) == {"voltmeter", "camera"}
        assert list(secret.iterdir()) == [], "nothing was created in the root-only directory"
        assert "ATTACKER-LINE" not in run.stderr
    finally:
        shutil.rmtree(xdg, ignore_errors=True)


# -- c: errors are one line, never a traceback --------------------------------------------------


def _union_table() -> pa.Table:
    types = pa.array([0, 1, 0], type=pa.int8())
    return pa.table({"u": pa.UnionArray.from_sparse(types, [pa.array([1, 2, 3]), pa.array(["a", "b", "c"])])})


def _put(
    client: fl.FlightClient, opts: fl.FlightCallOptions, descriptor: fl.FlightDescriptor, table: pa.Table
) -> None:
    w, r = client.do_put(descriptor, table.schema, opts)
    try:
        w.write_table(table)
        w.done_writing()
        r.read()
    finally:
        w.close()


def test_each_error_a_client_can_cause_is_one_short_line(xdg: Path) -> None:
    """The cases of the issue: get_schema of an unknown stream and of a command descriptor,
    a ticket nested 50,000 deep, do_put of a union column, a 100 kB ticket (echoed whole, it
    was more than the client's gRPC accepts); and the other calls' refusals."""
    with daemon(xdg=xdg) as run:
        client = fl.connect(run.url)
        opts = options(run.token)

        def said(call: object, kind: type[BaseException] = fl.FlightServerError) -> str:
            with pytest.raises(kind) as e:
                r = call()  # type: ignore[operator]
                if hasattr(r, "read_all"):
                    r.read_all()
                elif r is not None and not isinstance(r, fl.SchemaResult | fl.FlightInfo):
                    list(r)  # type: ignore[call-overload]
            return assert_short(e.value)

        # get_schema: pyarrow's client reports its errors as plain ArrowExceptions.
        assert "unknown stream 'nope'" in said(
            lambda: client.get_schema(fl.FlightDescriptor.for_path("nope"), opts), pa.ArrowException
        )
        assert "a path of one element" in said(
            lambda: client.get_schema(fl.FlightDescriptor.for_command(b"x"), opts), pa.ArrowException
        )
        assert "a path of one element" in said(
            lambda: client.get_flight_info(fl.FlightDescriptor.for_command(b"x"), opts)
        )
        deep = b'{"stream": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
        assert "nested too deeply" in said(lambda: client.do_get(fl.Ticket(deep), opts))
        assert "nested too deeply" in said(
            lambda: client.do_action(fl.Action("start_recording", b"[" * 50_000 + b"]" * 50_000), opts)
        )
        huge = said(lambda: client.do_get(fl.Ticket(b"x" * 100_000), opts))
        assert huge.startswith("unknown stream 'xxxx") and "(100,000 chars)" in huge
        assert "(100,000 chars)" in said(lambda: client.do_action(fl.Action("y" * 100_000, b""), opts))
        try:  # the ring may carry unions now; if it refuses them, in one line
            _put(client, opts, fl.FlightDescriptor.for_path("u"), _union_table())
        except fl.FlightServerError as e:
            assert assert_short(e).startswith("do_put to stream 'u': ")
        dictionary = pa.table({"d": pa.array(["x"]).dictionary_encode()})
        assert "do_put to stream 'd': " in said(
            lambda: _put(client, opts, fl.FlightDescriptor.for_path("d"), dictionary)
        )
        for name, why in {"": "is empty", "a\nb": "control character", "n" * 300: "longer than 255"}.items():
            desc = fl.FlightDescriptor.for_path(name)
            assert why in said(lambda d=desc: _put(client, opts, d, pa.table({"a": [1]})))
        assert "do_put needs a descriptor path" in said(
            lambda: _put(client, opts, fl.FlightDescriptor.for_command(b"c"), pa.table({"a": [1]}))
        )
        keys = {f"k{i}" * 50: 1 for i in range(50)}
        assert "and 47 more" in said(
            lambda: client.do_get(fl.Ticket(json.dumps({"stream": "camera", **keys}).encode()), opts)
        )
        assert "not offered" in said(
            lambda: client.do_exchange(fl.FlightDescriptor.for_path("camera"), opts)[1].read_all()
        )
        # Still serving, for everyone.
        assert len(client.do_get(fl.Ticket(b'{"stream": "voltmeter", "last_rows": 5}'), opts).read_all()) == 5


def test_an_unexpected_error_in_the_daemon_is_a_short_internal_error_logged_with_its_traceback(
    xdg: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from rust_daq.cli import Session
    from rust_daq.daemon import Daemon

    name = f"/dev/shm/rdaq-test-daemon-{uuid.uuid4().hex[:8]}"
    d = Daemon(Session(instruments=[], ring_path=name, capacity_mb=1, output=None), port=0, own_ring=True)
    try:
        assert d.token_file is not None and d.token_file.parent == xdg / "rust-daq"
        client = fl.connect(d.url)
        opts = options(d.token_file.read_text().split()[0])

        def broken() -> dict[str, object]:
            return {}["no such key"]  # type: ignore[return-value]

        d.status = broken  # type: ignore[method-assign]
        with caplog.at_level("ERROR", logger="rust_daq.flight"):
            with pytest.raises(fl.FlightInternalError) as e:
                list(client.do_action(fl.Action("status", b""), opts))
        said = assert_short(e.value)
        assert said == "do_action: internal error in the daemon (KeyError); its log has the details"

        def refuse(stream: str, batch: pa.RecordBatch) -> int:
            raise pa.ArrowNotImplementedError("sparse_union")  # as the ring once did for unions

        d.put = refuse  # type: ignore[method-assign]
        with pytest.raises(fl.FlightServerError) as e:
            _put(client, opts, fl.FlightDescriptor.for_path("u"), _union_table())
        assert (
            assert_short(e.value)
            == "do_put to stream 'u': the ring cannot hold this Arrow type (sparse_union)"
        )
        assert "Traceback" in caplog.text and "KeyError: 'no such key'" in caplog.text, "logged here"
        assert list(client.do_action(fl.Action("list_streams", b""), opts)), "still serving"
    finally:
        d._shutdown()
    assert not d.token_file.exists()
    assert not os.path.exists(name)


def _fuzz_bytes(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:
        depth = rng.choice([100, 999, 1001, 5000, 60_000])
        return b'{"stream": ' + b"[" * depth + b"]" * rng.choice([0, depth]) + b"}"
    if kind == 2:
        return b"{" * rng.randrange(1, 80_000)
    if kind == 3:
        return ("z" * rng.randrange(1000, 200_000)).encode()
    if kind == 4:
        key = rng.choice(["stream", "start", "after_seq", "last_rows", "x" * 5000, "\x00"])
        value = rng.choice([None, -1, 2**70, 1.5, True, "oldest", "\n" * 300, [[]] * 50, {"a": {}}])
        return json.dumps({"stream": rng.choice(["nope", "", "é" * 3000]), key: value}).encode()
    if kind == 5:
        return "\u202e\u0000\ud7ff\uffff".encode() * rng.randrange(1, 3000)
    if kind == 6:
        return json.dumps([rng.random() for _ in range(rng.randrange(50))]).encode()
    return b'{"file": ' + json.dumps("../" * rng.randrange(1, 2000) + "x.h5").encode() + b"}"


def test_fuzzed_requests_get_short_errors_and_the_daemon_keeps_serving(xdg: Path) -> None:
    """400 random tickets, descriptors, actions and puts (random bytes, deep JSON, huge
    strings): every error is one short line without a traceback; the daemon serves on."""
    rng = random.Random(15)
    with daemon(xdg=xdg) as run:
        client = fl.connect(run.url)
        opts = options(run.token)
        seen: dict[str, int] = {}
        for _ in range(400):
            raw = _fuzz_bytes(rng)
            which = rng.choice(["do_get", "info", "schema", "action", "put", "cmd_info"])
            # (A path that is not UTF-8 breaks the protocol: gRPC refuses it before the daemon.)
            descriptor = (
                fl.FlightDescriptor.for_command(raw)
                if which == "cmd_info" or rng.random() < 0.2
                else fl.FlightDescriptor.for_path(raw[:60_000].decode(errors="replace"))
            )
            try:
                if which == "do_get":
                    client.do_get(fl.Ticket(raw), opts).read_all()
                elif which in ("info", "cmd_info"):
                    client.get_flight_info(descriptor, opts)
                elif which == "schema":
                    client.get_schema(descriptor, opts)
                elif which == "action":
                    kind = rng.choice(
                        ["status", "start_recording", "stop_recording", "list_streams", "x" * 3000]
                    )
                    list(client.do_action(fl.Action(kind, raw), opts))
                else:
                    table = _union_table() if rng.random() < 0.5 else pa.table({"a": [1]})
                    _put(client, opts, descriptor, table)
                outcome = "ok"
            except (pa.ArrowException, OSError) as e:  # get_schema's client raises OSError too
                said = assert_short(e)
                assert "internal error in the daemon" not in said, said
                outcome = type(e).__name__
            seen[f"{which}:{outcome}"] = seen.get(f"{which}:{outcome}", 0) + 1
        assert sum(n for k, n in seen.items() if not k.endswith(":ok")) > 300, seen
        with rust_daq.remote.connect(run.url) as daq:
            assert {"voltmeter", "camera"} <= set(daq.streams())
            assert daq.status()["writer"]["recording"] is False
            with daq.reader("voltmeter") as r:
                assert sum(b.num_rows for _, b in r.read_batches(timeout=3)) > 0
    assert run.proc.returncode == 0


def test_stream_names_sent_by_a_put_are_echoed_short(xdg: Path) -> None:
    """A remote instrument's refusal names its stream, cut short."""
    with daemon(xdg=xdg) as run:
        with rust_daq.remote.connect(run.url) as daq:
            with pytest.raises(RemoteError) as e:
                daq.put("v" * 50_000, _union_table())
        assert len(str(e.value)) < 300 and "(50,000 chars)" in str(e.value) and "\n" not in str(e.value)
