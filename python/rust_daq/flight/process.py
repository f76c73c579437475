"""The daemon's Flight service in a process of its own, so that no number of subscribers
costs the acquisition's loop a deadline: each subscription reads the ring like any reader,
decodes and sends in this process, on its own GIL, never in the producer's.

- Subscriptions (``do_get``), discovery and ``list_streams``: served here from the ring
  and the producer's row index (a :class:`~rust_daq.acquisition.RowIndex` shared as an
  anonymous file), both through read-only descriptors inherited from the daemon.
- ``do_put`` and the other actions: forwarded to the daemon's own service
  (:class:`~.server.DaqFlightServer`) on a Unix socket in a directory only the daemon's user
  can enter, with a token of its own; errors reach the client as the daemon raised them
  (code, details, message), a daemon that does not answer as ``internal``.

The daemon starts it with :class:`FlightProcess`: one JSON line of configuration on its
stdin, one JSON line back on its stdout (``{"port": N}`` once it serves, or ``{"error":
"..."}``). Then stdin carries commands: ``drain`` (the daemon stops: subscriptions send what
is written and end), and ``exit`` or end of file (the daemon gone, however it went):
subscriptions end, calls in progress get up to 15 s, the process exits. Ctrl-C and SIGTERM
are the daemon's to handle (it stops in order, then says ``exit``): this process ignores them.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as fl

from .._errors import DaemonConfigError
from .._ring import RingBuffer
from ..acquisition import RowIndex, RowTableReader
from .protocol import INTERNAL, STATUS, error, error_info, read_action_result
from .server import RingFlightService

__all__ = ["FlightProcess", "ForwardingFlightServer", "socket_dir", "socket_location"]

log = logging.getLogger("rust_daq.flight")

_T = TypeVar("_T")

_START_TIMEOUT = 60.0  # seconds for the process to import, open the ring and listen
_CALLS_GRACE = 15.0  # seconds calls in progress get when the process exits
# Subscribers are best effort (a slow one is lapped); the acquisition is not: on a machine
# with few cores, the scheduler gives the loop's process the CPU first. (Not lower: this
# process also forwards remote instruments' puts, which are acquisition.)
_NICE = 10

# CPUs and nice set before the imports start pyarrow's and gRPC's threads, which inherit
# them (per thread in Linux: set after, two threads kept nice 0 and every CPU).
_LAUNCH = """
import os, sys
try:
    os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(",") if c])
except (AttributeError, OSError, ValueError) as e:
    print(f"rust-daq Flight process: cannot keep to CPUs {sys.argv[1]} ({e}); on those it inherited",
          file=sys.stderr)
try:
    os.setpriority(os.PRIO_PROCESS, 0, max(int(sys.argv[2]), os.getpriority(os.PRIO_PROCESS, 0)))
except (AttributeError, OSError):
    pass
import runpy
runpy.run_module("rust_daq.flight.process", run_name="__main__", alter_sys=True)
"""


class _Side:
    """The ring side of the service, in this process."""

    def __init__(self, ring: RingBuffer, row_index: RowTableReader) -> None:
        self.ring = ring
        self.row_index = row_index
        self.stopping = threading.Event()
        self.daemon_gone = threading.Event()


class ForwardingFlightServer(RingFlightService):
    """Serves subscriptions itself and forwards puts and actions to the daemon at
    `daemon_location` (see the module documentation)."""

    def __init__(
        self,
        location: str,
        side: _Side,
        *,
        daemon_location: str,
        daemon_token: str,
        token: str | None = None,
        tls_certificates: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self._daemon = fl.connect(daemon_location)  # (before serving starts, in the base's constructor)
        # Where the daemon listens is nobody else's business: never in a client's message.
        self._hidden = daemon_location.split("://", 1)[-1]
        self._options = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {daemon_token}".encode())])
        super().__init__(location, side, token=token, tls_certificates=tls_certificates)

    side: _Side

    def _daemon_gone(self) -> bool:
        return self.side.daemon_gone.is_set()

    def _forwarded(self, what: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except fl.FlightError as e:
            info = error_info(e)
            if info.code is None:  # the transport's, not the daemon's
                said = info.message.replace(self._hidden, "<the daemon's socket>")
                raise error(
                    INTERNAL, f"{what}: the daemon's acquisition process did not answer ({said})"
                ) from None
            raise error(info.code, info.message, **info.details) from None

    def _act(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        action = fl.Action(kind, json.dumps(params).encode())
        results = self._forwarded(kind, lambda: list(self._daemon.do_action(action, self._options)))
        result = read_action_result(results)
        if not isinstance(result, dict):
            raise error(
                INTERNAL, f"{kind}: the daemon's acquisition process answered {type(result).__name__}"
            )
        if kind == STATUS:
            result["flight_pid"] = os.getpid()
        return result

    def _put(self, stream: str, batches: Iterator[pa.RecordBatch], writer: fl.FlightMetadataWriter) -> None:
        first = next(batches, None)
        if first is None:
            return
        descriptor = fl.FlightDescriptor.for_path(stream)
        put, acks = self._forwarded(
            "do_put", lambda: self._daemon.do_put(descriptor, first.schema, self._options)
        )
        try:
            batch: pa.RecordBatch | None = first
            while batch is not None:
                self._forwarded("do_put", lambda b=batch: put.write_batch(b))  # type: ignore[misc]
                ack = self._forwarded("do_put", acks.read)
                if ack is None:  # the daemon refused: closing raises its error, with its code
                    self._forwarded("do_put", put.close)
                    raise error(INTERNAL, "do_put: the daemon's acquisition process ended the put")
                writer.write(ack)
                batch = next(batches, None)
            self._forwarded("do_put", put.done_writing)
        except BaseException:
            try:  # (the first error is the client's; closing the forwarded put must not mask it)
                put.close()
            except Exception as e:
                log.debug("closing a forwarded do_put after an error: %s", e)
            raise
        self._forwarded("do_put", put.close)


# -- the daemon's side ---------------------------------------------------------------------------


class FlightProcess:
    """Starts the Flight process and talks to it (see the module documentation): it listens at
    `location` (`shown`: host:port for messages) with `token` (and TLS), serves the ring file
    behind `ring_fd` and the row index behind `rows_fd`, and forwards to `daemon_location`
    (its socket in `socket_dir`, which the process removes if the daemon dies without telling
    it), on the CPUs `cpus()` gives at each start (None: those this process may use now). Raises
    DaemonConfigError if it cannot listen, or does not start.

    The process gets both files as read-only descriptors of their own, never by name: a
    process started again after a crash serves the very ring the daemon writes, even if its
    path was unlinked and another user's file put there, and it cannot change the daemon's
    row index."""

    def __init__(
        self,
        *,
        ring_fd: int,
        shown: str,
        rows_fd: int,
        location: str,
        token: str,
        tls_certificates: list[tuple[bytes, bytes]],
        daemon_location: str,
        daemon_token: str,
        socket_dir: str | None = None,
        cpus: Callable[[], list[int]] | None = None,
    ) -> None:
        self._fds = [_read_only(ring_fd), _read_only(rows_fd)]
        config: dict[str, Any] = {
            "socket_dir": socket_dir,
            "ring": f"/proc/self/fd/{self._fds[0]}",  # (the same number in the process)
            "rows_fd": self._fds[1],
            "location": location,
            "shown": shown,
            "token": token,
            "tls": [
                [base64.b64encode(c).decode(), base64.b64encode(k).decode()] for c, k in tls_certificates
            ],
            "daemon_location": daemon_location,
            "daemon_token": daemon_token,
            "log_level": logging.getLogger("rust_daq").getEffectiveLevel(),
        }
        # (now, before a real-time loop pins its thread: a restart from a thread started
        # later would pass that pin on)
        allowed = sorted(os.sched_getaffinity(0))
        self._cpus: Callable[[], list[int]] = cpus if cpus is not None else lambda: allowed
        #: The CPUs it was started on (asked for: ``status`` reports those it has).
        self.cpus: list[int] = []
        self.restarts = 0
        self._config = config
        self._lock = threading.Lock()
        try:
            self.port = self._start()
        except BaseException:
            self._close_fds()
            raise

    def _close_fds(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def _start(self) -> int:
        self.cpus = self._cpus()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, ",".join(map(str, self.cpus)), str(_NICE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=self._fds,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(self._config).encode() + b"\n")
            self.proc.stdin.flush()
            line = _line(self.proc.stdout, _START_TIMEOUT)
        except BrokenPipeError:
            line = b""
        try:
            said = json.loads(line) if line else {}
        except ValueError:
            said = {}
        if "listen" in said:
            self.proc.wait(_START_TIMEOUT)
            raise DaemonConfigError(f"cannot listen on {self._config['shown']}: {said['listen']}")
        if "port" in said:
            log.info(
                "Flight served by process %d on port %d (CPUs %s)",
                self.proc.pid,
                said["port"],
                ",".join(map(str, self.cpus)),
            )
            return int(said["port"])
        self.proc.kill()
        code = self.proc.wait()
        why = said.get("error") or (
            f"it exited with status {code} before serving" if line or code else "it did not start in time"
        )
        raise DaemonConfigError(f"the Flight process did not start: {why}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def restart(self) -> None:
        """Starts it again on the same port (after it died): clients connect again (their
        subscriptions broke with an error; a new one can resume with ``after_seq``)."""
        with self._lock:
            self._close_pipes()  # (the dead one's)
            self._config["location"] = _with_port(self._config["location"], self.port)
            self.restarts += 1
            self.port = self._start()

    def drain(self) -> None:
        """Subscriptions send what is written and end; new ones get it and end too."""
        self._say(b"drain\n")

    def stop(self) -> None:
        """Ends it: subscriptions end, calls in progress get up to 15 s."""
        with self._lock:
            self._say(b"exit\n")
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(_CALLS_GRACE + 10)
            except subprocess.TimeoutExpired:
                log.warning("the Flight process did not exit; killing it")
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._close_fds()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:  # (a write the dead process never read)
                    pass

    def _say(self, line: bytes) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (OSError, ValueError):  # (it is gone: nothing to tell)
            pass


_SOCKET_PREFIX = "rust-daq-flight-"
_SUN_PATH = 107  # bytes a Unix socket's path may have (sockaddr_un.sun_path, less its NUL)
_SOCKET_NAME = "daemon.sock"
_PID_NAME = "daemon.pid"


def socket_dir() -> str:
    """A new directory only this user can enter, for the daemon's socket (``daemon.sock``)
    and its pid (``daemon.pid``): in the temporary directory, or in /tmp where a long TMPDIR
    would make the socket's path too long to bind. Those a daemon left when it was killed
    with its Flight process (nobody removed them) are removed first, once their pid is gone."""
    bases = [tempfile.gettempdir(), "/tmp"]
    for base in bases:
        if len(os.fsencode(os.path.join(base, _SOCKET_PREFIX + "x" * 8, _SOCKET_NAME))) <= _SUN_PATH:
            break
    else:
        raise DaemonConfigError(f"no directory for the daemon's socket: {bases[0]} makes its path too long")
    _remove_stale(base)
    path = tempfile.mkdtemp(prefix=_SOCKET_PREFIX, dir=base)
    with open(os.path.join(path, _PID_NAME), "w") as f:
        f.write(f"{os.getpid()}\n")
    return path


def socket_location(directory: str) -> str:
    return f"grpc+unix://{os.path.join(directory, _SOCKET_NAME)}"


def _remove_stale(base: str) -> None:
    uid = os.getuid()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(_SOCKET_PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != uid:
                continue  # (another user's, or not ours to judge)
            with open(os.path.join(entry.path, _PID_NAME)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue  # no pid yet (a daemon starting now), or not ours
        if pid <= 0 or _alive(pid) or _listening(os.path.join(entry.path, _SOCKET_NAME)):
            continue  # (a daemon whose pid this namespace does not see still answers)
        shutil.rmtree(entry.path, ignore_errors=True)
        log.info("removed %s, left by daemon %d (killed)", entry.path, pid)


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_only(fd: int) -> int:
    """A new read-only descriptor of the file behind `fd` (its own open file description:
    the process it goes to cannot write the file through it, nor map it writable)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def _line(stream: Any, timeout: float) -> bytes:
    """One line from `stream` (a pipe), or b"" at its end or after `timeout` s."""
    fd = stream.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b""
        chunk = os.read(fd, 4096)
        if not chunk:
            return buf
        buf += chunk
    return buf


def _with_port(location: str, port: int) -> str:
    return f"{location.rsplit(':', 1)[0]}:{port}"


# -- the process -------------------------------------------------------------------------------


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's to handle: it tells us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = json.loads(sys.stdin.buffer.readline() or b"{}")
    logging.basicConfig(
        level=config.get("log_level", logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )

    def gone() -> None:  # the daemon died (killed): its socket too, and at once
        if config.get("socket_dir"):
            shutil.rmtree(config["socket_dir"], ignore_errors=True)
        os._exit(1)

    def say(what: dict[str, Any]) -> None:
        try:
            sys.stdout.write(json.dumps(what) + "\n")
            sys.stdout.flush()
        except OSError:  # (BrokenPipeError) the daemon died as we started
            gone()

    if not config:
        return 1  # the daemon died before it said what to serve
    try:
        ring = RingBuffer.open(config["ring"])
        side = _Side(ring, RowIndex.attach(config["rows_fd"]))
        certs = [(base64.b64decode(c), base64.b64decode(k)) for c, k in config["tls"]]
        server = ForwardingFlightServer(
            config["location"],
            side,
            daemon_location=config["daemon_location"],
            daemon_token=config["daemon_token"],
            token=config["token"],
            tls_certificates=certs,
        )
    except pa.ArrowException as e:  # gRPC says no more than "did not start properly"
        say(
            {
                "listen": "the port is in use, or the host is not an address of this host, or the TLS "
                f"certificate and key do not match ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            }
        )
        return 1
    except Exception as e:
        say({"error": f"{type(e).__name__}: {e}"})
        return 1
    say({"port": server.port})
    # Nobody reads this pipe after the first line: whatever else would write to it (a library
    # printing) must not fill it and block.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    told = False
    for line in sys.stdin.buffer:
        if line.strip() == b"drain":
            side.stopping.set()
        elif line.strip() == b"exit":
            told = True
            break
    if not told:  # the daemon is gone (killed): subscriptions end with an error saying so
        side.daemon_gone.set()
        if config.get("socket_dir"):
            shutil.rmtree(config["socket_dir"], ignore_errors=True)
    side.stopping.set()
    t = threading.Thread(target=server.shutdown, daemon=True)
    t.start()
    t.join(timeout=_CALLS_GRACE)
    if t.is_alive():
        log.warning("Flight calls still open after %.0f s; exiting without them", _CALLS_GRACE)
        os._exit(0)  # (gRPC's threads would hold the interpreter's exit)
    ring.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
