"""Real ``nats-server`` processes for the JetStream tests: a single node, a 3-node JetStream
cluster, and a throwaway CA + server certificate for TLS.

Each server listens on 127.0.0.1 only, on free ports, with a config file and a log file in a
temporary directory of its own; ``close()`` (or leaving the ``with`` block) stops the process and
removes that directory. ``stop()`` and ``kill()`` keep it, so ``restart()`` comes back on the same
ports with the same JetStream store: what was stored on file survives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 30.0


def find_nats_server() -> str:
    """Path of ``nats-server``; skips the test when it is missing, fails it on CI."""
    path = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server") if os.access(p, os.X_OK)),
        None,
    )
    if path is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("nats-server not found: apt-get install nats-server", pytrace=False)
        pytest.skip("nats-server not found; install it: apt-get install nats-server")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def make_tls(directory: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate it signed for 127.0.0.1 and localhost, made with
    the ``openssl`` CLI in *directory*; returns ``(ca, cert, key)`` (PEM files)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found; install it: apt-get install openssl")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = d / "ca.pem", d / "ca-key.pem"
    cert, key, csr, ext = d / "server.pem", d / "server-key.pem", d / "server.csr", d / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    steps = [
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-sha256", "-days", "2"]
        + ["-keyout", ca_key, "-out", ca, "-subj", "/CN=rust-daq test CA"]
        + ["-addext", "basicConstraints=critical,CA:TRUE"]
        + ["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-sha256"]
        + ["-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", "1"]
        + ["-days", "2", "-sha256", "-extfile", ext, "-out", cert],
    ]
    for cmd in steps:
        r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr}")
    return ca, cert, key


# Servers are started from this one long-lived thread: PR_SET_PDEATHSIG fires when the thread
# that forked the child ends, and this one lasts as long as the test process.
_LAUNCHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nats-server-launcher")


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGKILL the server when the test process dies (killed by a
    CI timeout, SIGKILL...), so that no nats-server outlives the run; None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _q(value: object) -> str:
    """A value quoted for the nats-server config (JSON string syntax is accepted)."""
    return json.dumps(str(value))


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    """HTTP status of GET *url*, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code
    except (OSError, ValueError):
        return None


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


class NatsServer:
    """One ``nats-server`` process on 127.0.0.1 (see the module docstring).

    ``tls`` is ``(ca, cert, key)`` as returned by :func:`make_tls`; ``user``/``password`` and
    ``token`` are exclusive. ``cluster_name``/``cluster_port``/``routes`` (``nats-route://`` URLs)
    make it a cluster member; ``leafnodes=True`` opens a leafnode listener (``leafnode_url``) and
    ``leafnode_remotes`` connects to other servers' leafnode listeners."""

    def __init__(
        self,
        *,
        jetstream: bool = True,
        port: int | None = None,
        max_payload: int | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        leafnodes: bool = False,
        leafnode_remotes: Sequence[str] = (),
        max_memory_store: int = 64 * 1024**2,
        max_file_store: int = 512 * 1024**2,
        extra_config: str = "",
        tmp_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        if token is not None and (user is not None or password is not None):
            raise ValueError("token and user/password are exclusive")
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        self.executable = find_nats_server()
        self.jetstream = jetstream
        self.port = port if port is not None else free_port()
        self.monitor_port = free_port()
        self.max_payload = max_payload
        self.user, self.password, self.token = user, password, token
        self.tls = tuple(Path(p) for p in tls) if tls is not None else None
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        if cluster_name is not None and cluster_port is None:
            self.cluster_port = free_port()
        self.routes = list(routes)
        self.leafnode_port = free_port() if leafnodes else None
        self.leafnode_remotes = list(leafnode_remotes)
        self.max_memory_store, self.max_file_store = max_memory_store, max_file_store
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self._owns_dir = tmp_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="rdaq-nats-")) if tmp_dir is None else Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store_dir = self.dir / "jetstream"
        self.config_path = self.dir / "nats-server.conf"
        self.log_path = self.dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.config_path.write_text(self.config())

    # -- configuration -------------------------------------------------------------------
    def config(self) -> str:
        lines = [f"host: {HOST}", f"port: {self.port}", f"http: {_q(f'{HOST}:{self.monitor_port}')}"]
        if self.server_name is not None:
            lines.append(f"server_name: {_q(self.server_name)}")
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.jetstream:
            lines.append(
                f"jetstream {{ store_dir: {_q(self.store_dir)}, "
                f"max_memory_store: {self.max_memory_store}, max_file_store: {self.max_file_store} }}"
            )
        if self.token is not None:
            lines.append(f"authorization {{ token: {_q(self.token)} }}")
        elif self.user is not None:
            lines.append(f"authorization {{ user: {_q(self.user)}, password: {_q(self.password)} }}")
        if self.tls is not None:
            ca, cert, key = self.tls
            lines.append(
                f"tls {{ cert_file: {_q(cert)}, key_file: {_q(key)}, ca_file: {_q(ca)}, timeout: 5 }}"
            )
        if self.cluster_name is not None:
            routes = ", ".join(_q(r) for r in self.routes)
            lines.append(
                f"cluster {{ name: {_q(self.cluster_name)}, "
                f"listen: {_q(f'{HOST}:{self.cluster_port}')}, routes: [{routes}] }}"
            )
        if self.leafnode_port is not None or self.leafnode_remotes:
            parts = []
            if self.leafnode_port is not None:
                parts.append(f"listen: {_q(f'{HOST}:{self.leafnode_port}')}")
            if self.leafnode_remotes:
                parts.append(
                    "remotes: [" + ", ".join(f"{{ url: {_q(u)} }}" for u in self.leafnode_remotes) + "]"
                )
            lines.append("leafnodes { " + ", ".join(parts) + " }")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    # -- addresses -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'tls' if self.tls is not None else 'nats'}://{HOST}:{self.port}"

    @property
    def route_url(self) -> str:
        if self.cluster_port is None:
            raise ValueError("not a cluster member")
        return f"nats-route://{HOST}:{self.cluster_port}"

    @property
    def leafnode_url(self) -> str:
        if self.leafnode_port is None:
            raise ValueError("no leafnode listener (leafnodes=False)")
        return f"nats-leaf://{HOST}:{self.leafnode_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.monitor_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, wait: bool = True) -> NatsServer:
        """Start the process; with *wait*, until it accepts clients (and JetStream is enabled)."""
        if self.running:
            raise RuntimeError(f"nats-server {self.url} is already running")
        self._close_log()
        self.config_path.write_text(self.config())
        log = open(self.log_path, "ab")  # closed by stop()/kill()
        self._log = log
        self.proc = _LAUNCHER.submit(
            subprocess.Popen,
            [self.executable, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,  # a Ctrl-C reaches pytest, whose teardown stops the server
            preexec_fn=_die_with_parent(),
        ).result()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None, healthz: str | None = None) -> None:
        """Until the client port accepts and ``/healthz`` answers 200 (by default
        ``?js-enabled-only=true`` with JetStream, plain ``/healthz`` without); fails with the tail
        of the log when the process exits or the deadline passes."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        query = healthz if healthz is not None else ("?js-enabled-only=true" if self.jetstream else "")
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self._fail(f"nats-server exited with status {code} while starting")
            if _port_accepts(self.port) and _http_status(f"{self.monitor_url}/healthz{query}") == 200:
                return
            if time.monotonic() > deadline:
                self._fail(f"nats-server {self.url} not ready (/healthz{query}) after the deadline")
            time.sleep(0.05)

    def healthz(self, query: str = "") -> int | None:
        """Status of ``GET /healthz<query>`` on the monitor port (None: no answer)."""
        return _http_status(f"{self.monitor_url}/healthz{query}")

    def varz(self, endpoint: str = "varz") -> dict[str, object]:
        """JSON of a monitor endpoint (``varz``, ``jsz``, ``routez``...)."""
        with urllib.request.urlopen(f"{self.monitor_url}/{endpoint}", timeout=2) as r:
            data: dict[str, object] = json.load(r)
            return data

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, message: str) -> None:
        self.kill()
        raise RuntimeError(f"{message}; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM and wait (JetStream flushes its store); SIGKILL if it takes too long."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown; the store is what was already on disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def restart(self, wait: bool = True) -> NatsServer:
        """Stop (if running) and start again on the same ports with the same store dir."""
        self.stop()
        return self.start(wait=wait)

    def close(self) -> None:
        """Stop and remove the temporary directory (when this server made it)."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def __enter__(self) -> NatsServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsServer {self.server_name or ''} {self.url} {state} dir={self.dir}>"


class NatsCluster:
    """Three JetStream nodes ``n1..n3`` in cluster ``name``, routed to each other on loopback."""

    def __init__(self, size: int = 3, *, name: str = "rdaq", **options: object) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        find_nats_server()  # skip (or fail on CI) before making anything
        self.name = name
        cluster_ports = [free_port() for _ in range(size)]
        routes = [f"nats-route://{HOST}:{p}" for p in cluster_ports]
        self.dir = Path(tempfile.mkdtemp(prefix="rdaq-nats-cluster-"))
        self.nodes: list[NatsServer] = [
            NatsServer(
                jetstream=True,
                server_name=f"n{i + 1}",
                cluster_name=name,
                cluster_port=port,
                routes=[r for j, r in enumerate(routes) if j != i],
                tmp_dir=self.dir / f"n{i + 1}",
                **options,  # type: ignore[arg-type]
            )
            for i, port in enumerate(cluster_ports)
        ]
        self.ready_seconds: float | None = None

    @property
    def urls(self) -> list[str]:
        """Client URLs of all nodes, for ``nats.connect(servers=cluster.urls)``."""
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """The client URLs comma-joined (for clients that take ``a,b,c``; nats-py wants a list)."""
        return ",".join(self.urls)

    def urls_except(self, i: int) -> list[str]:
        return [n.url for j, n in enumerate(self.nodes) if j != i]

    def start(self, timeout: float = CLUSTER_TIMEOUT) -> NatsCluster:
        """Start all nodes, then wait until each is healthy and an R3 stream can be created
        (a JetStream meta leader exists and every node takes part)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        try:
            for n in self.nodes:
                n.start(wait=False)
            for n in self.nodes:
                n.wait_ready(timeout=max(0.1, deadline - time.monotonic()))
            for n in self.nodes:
                n.wait_ready(timeout=max(0.1, deadline - time.monotonic()), healthz="")
            # In a thread of its own: start() may be called from a coroutine (a running loop).
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, self._probe_stream(deadline)).result()
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - t0
        return self

    async def _probe_stream(self, deadline: float) -> None:
        import nats
        from nats.js.api import StorageType, StreamConfig

        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(servers=self.urls, connect_timeout=2, max_reconnect_attempts=2)
            except Exception as e:  # retried until the deadline
                last = e
                await asyncio.sleep(0.2)
                continue
            try:
                js = nc.jetstream(timeout=2)
                await js.add_stream(
                    StreamConfig(
                        name="RDAQ_CLUSTER_PROBE",
                        subjects=["rdaq.cluster.probe"],
                        num_replicas=len(self.nodes),
                        storage=StorageType.MEMORY,
                    )
                )
                await js.delete_stream("RDAQ_CLUSTER_PROBE")
                return
            except Exception as e:  # no meta leader yet, peers not current...
                last = e
                await asyncio.sleep(0.2)
            finally:
                await nc.close()
        tails = "\n".join(f"--- {n.server_name}:\n{n.log_tail(15)}" for n in self.nodes)
        raise RuntimeError(f"JetStream cluster not ready before the deadline ({last!r})\n{tails}")

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def stop_node(self, i: int) -> None:
        self.nodes[i].stop()

    def restart(self, i: int, timeout: float = CLUSTER_TIMEOUT) -> None:
        """Restart node *i* (same ports and store) and wait until it is healthy again: JetStream
        enabled, and ``/healthz`` saying its meta, streams and consumers are current."""
        node = self.nodes[i]
        node.restart(wait=False)
        node.wait_ready(timeout=timeout)
        node.wait_ready(timeout=timeout, healthz="")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
