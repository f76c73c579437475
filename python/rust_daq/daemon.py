"""``rust-daq daemon``: the acquisition, its ring and the HDF5 writer, headless, controlled and
read over Arrow Flight (:mod:`rust_daq.flight`) from other machines.

This process runs the acquisition loop (the ring's only producer) and serves puts and
actions on a Unix socket; the Flight process (:mod:`rust_daq.flight.process`) listens on the
daemon's URL, serves subscriptions from the ring itself and forwards the rest here, so that no
number of subscribers takes the loop's GIL; it is started again if it dies. The HDF5 writer
runs in its own process, started and stopped by the config or over the wire
(``start_recording`` / ``stop_recording``). Remote instruments (``do_put``) write through the
same producer handle, under one lock, as the acquisition does. SIGTERM/SIGINT: the
acquisition stops, subscribers receive what was written and their streams end, the writer
makes its final flush, the servers shut down, exit 0.

While nothing records, the daemon keeps the ring's ``read_tail`` at the write head: nothing
counts as lost and a ring with policy ``"block"`` never waits for a writer that does not
exist. ``start_recording`` starts the file at that moment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa

from . import _access
from ._access import is_loopback
from ._errors import DaemonConfigError, RustDaqError
from ._session import Session
from ._supervisor import file_progress
from .flight import DaqFlightServer
from .flight.process import FlightProcess, socket_dir, socket_location
from .hdf5.options import WriterOptions
from .runner import Runner, noting_signals

__all__ = ["Daemon", "DaemonConfigError", "is_loopback"]

log = logging.getLogger("rust_daq.daemon")

_IDLE_TAIL = 0.05  # seconds between read_tail moves while nothing records
_RATE_WINDOW = 1.0  # seconds over which status reports rows/s
_FLIGHT_WATCH = 0.5  # seconds between checks that the Flight process lives
_FLIGHT_RETRY = 5.0  # seconds before starting it again when a start failed


class Daemon:
    """Runs a :class:`~rust_daq.config.Session` headless behind a Flight server, its ring,
    acquisition and recordings those of a :class:`~rust_daq.runner.Runner`.

    ``host``/``port``: where the server listens (port 0: any free port; :attr:`url` says
    which). Off loopback a ``token`` is required; ``tls`` is a (certificate, key) pair of
    PEM files for ``grpc+tls``. Without a token the daemon makes one and writes it where
    only its own user can read it (:attr:`token_file`, removed at exit): local clients of
    that user read it, everyone else is refused. ``data_dir``: where ``start_recording``
    over the wire creates its files (None: the working directory), resolved once, here.
    ``own_ring``: remove the ring at the end (None: if the session owns it and the daemon
    creates it).
    """

    def __init__(
        self,
        session: Session,
        *,
        host: str = "127.0.0.1",
        port: int = 8815,
        token: str | None = None,
        tls: tuple[Path, Path] | None = None,
        own_ring: bool | None = False,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not is_loopback(host) and not token:
            raise DaemonConfigError(
                f"binding to {host} (beyond this machine) needs a token: set RUST_DAQ_TOKEN or --token; "
                "clients then send it (Authorization: Bearer <token>)"
            )
        certs: list[tuple[bytes, bytes]] = []
        if tls is not None:
            try:
                certs = [(Path(tls[0]).read_bytes(), Path(tls[1]).read_bytes())]
            except OSError as e:
                raise DaemonConfigError(f"TLS: cannot read {e.filename}: {e.strerror}") from e
        try:
            #: Where recordings asked for over the wire go: an absolute real path, fixed now.
            self.data_dir = _access.resolve_data_dir(data_dir)
        except _access.RecordingNameError as e:
            raise DaemonConfigError(str(e)) from None
        # A token always: without one given, a random one for this user's local clients.
        self._own_token = not token
        token = token or _access.new_token()
        #: The file holding the generated token (None if the token was given).
        self.token_file: Path | None = None
        self._token = token
        server: DaqFlightServer | None = None  # to shut down if the start fails after it
        flight: FlightProcess | None = None
        self.session = session
        # No instruments: a daemon that only receives (remote instruments, do_put): no acq.
        self.runner = Runner(session, own_ring=own_ring, row_index=True)
        self.ring, self.acq = self.runner.ring, self.runner.acq
        assert self.runner.row_index is not None
        self.row_index = self.runner.row_index
        self._socket_dir: str | None = None
        self._cpus_allowed = sorted(os.sched_getaffinity(0))  # (before any real-time pin)
        try:
            self.stopping = threading.Event()
            self.recording_failed: str | None = None  # why the final recording did not end well
            # Recording transitions (start/stop: seconds, for a final flush) take _rec_lock in
            # Flight threads; the acquisition's event loop never waits for it. Put counters
            # have their own lock. _recording is replaced whole, never mutated: read freely.
            # The recording's writer is the runner's (runner.writer).
            self._rec_lock = threading.Lock()
            self._stats_lock = threading.Lock()
            self._recording: dict[str, Any] | None = None
            self._puts: dict[str, list[int]] = {}  # stream -> [rows, records, bytes]
            self._rates: dict[str, float] = {}
            # This process serves puts and actions (they need the producer) on a Unix socket
            # only this user can reach; the Flight process serves clients, subscriptions
            # itself, and forwards the rest here.
            self._socket_dir = socket_dir()
            internal = socket_location(self._socket_dir)
            internal_token = _access.new_token()
            self.server = server = DaqFlightServer(internal, self, token=internal_token)
            scheme = "grpc+tls" if certs else "grpc"
            shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
            self.flight = flight = FlightProcess(
                ring_fd=self.ring._data_file()[0],  # (the producer's: the file it writes)
                shown=f"{shown}:{port}",
                rows_fd=self.row_index.fd,
                location=f"{scheme}://{shown}:{port}",
                token=token,
                tls_certificates=certs,
                daemon_location=internal,
                daemon_token=internal_token,
                socket_dir=self._socket_dir,
                cpus=self.flight_cpus,
            )
            if self._own_token:
                try:
                    self.token_file = _access.write_token_file(flight.port, token)
                except OSError as e:
                    raise DaemonConfigError(f"{e}; or give a token (RUST_DAQ_TOKEN or --token)") from None
                log.info("token for this user's local clients: %s", self.token_file)
        except BaseException:  # nothing runs yet: leave no ring behind
            if flight is not None:
                flight.stop()
            if server is not None:
                server.shutdown()
            self._remove_socket_dir()
            self.runner.close()
            raise
        self.url = f"{scheme}://{shown}:{flight.port}"

    def _flight_affinity(self) -> list[int]:
        """The CPUs the Flight process runs on now (those it was started on, if it is gone)."""
        try:
            return sorted(os.sched_getaffinity(self.flight.pid))
        except OSError:
            return list(self.flight.cpus)

    def flight_cpus(self) -> list[int]:
        """The CPUs the Flight process is started on: those this process could use when it
        was made, but the one the acquisition's loop keeps busy
        (:meth:`Acquisition.loop_cpu`), if it keeps one and another is left. (The same from
        any thread, also one a real-time loop pinned.)"""
        cpu = self.acq.loop_cpu(self._cpus_allowed) if self.acq is not None else None
        return [c for c in self._cpus_allowed if c != cpu] or list(self._cpus_allowed)

    # -- what the Flight service calls ------------------------------------------------------------

    def put(self, stream: str, batch: pa.RecordBatch) -> int:
        """Writes a remote instrument's batch into the ring as `stream`; returns its seq."""
        if self.stopping.is_set():
            raise ValueError("the daemon is stopping; nothing more is accepted")
        if stream in {i.name for i in self.session.instruments}:
            raise ValueError(
                f"stream {stream!r} belongs to an instrument of this daemon; put to another name"
            )
        seq = self.row_index.write(batch, stream)
        with self._stats_lock:
            st = self._puts.setdefault(stream, [0, 0, 0])
            st[0] += batch.num_rows
            st[1] += 1
            st[2] += batch.nbytes
        return seq

    def status(self) -> dict[str, Any]:
        acq = self.acq.stats() if self.acq is not None else {"streams": {}}
        streams: dict[str, dict[str, Any]] = {}
        for name, st in acq["streams"].items():
            streams[name] = {
                "source": "instrument",
                "rows": st["rows"],
                "records": st["records"],
                "bytes": st["bytes"],
            }
        with self._stats_lock:
            for name, (rows, records, nbytes) in self._puts.items():
                streams[name] = {"source": "do_put", "rows": rows, "records": records, "bytes": nbytes}
        recording = dict(self._recording) if self._recording else None
        for name, st in streams.items():
            st["rows_per_s"] = self._rates.get(name, 0.0)
        rs = self.ring.status()
        head, tail, oldest = rs["write_head"], rs["read_tail"], rs["oldest_position"]
        sup = self.runner.writer
        writer: dict[str, Any] = {"recording": False}
        if recording is not None:
            writer.update(recording)
            if sup is not None:  # state (running, restarting, failed), restarts, reason, pid
                writer.update(sup.status())
            # Recording means a writer process is alive, not that a recording was asked for.
            writer["recording"] = writer.get("state") == "running"
            writer["lag_bytes"] = head - tail
            writer["lag_records"] = rs["records_written"] - rs["read_tail_seq"]
        return {
            "url": self.url,
            "uptime_s": time.time() - self.runner.started,
            "flight": {
                "pid": self.flight.pid,
                "restarts": self.flight.restarts,
                "cpus": self._flight_affinity(),
            },
            "streams": streams,
            "ring": {
                "path": rs["path"],
                "capacity": rs["capacity"],
                "policy": rs["policy"],
                "records_written": rs["records_written"],
                "records_lost": rs["records_lost"],
                "fill": (head - max(tail, oldest)) / rs["capacity"],
            },
            "writer": writer,
            "acquisition": None
            if self.acq is None
            else {
                "write_latency_us": acq["write_latency_us"],
                "deadlines_missed": {n: s["deadlines_missed"] for n, s in acq["streams"].items()},
            },
        }

    def start_recording_from_wire(self, params: dict[str, Any]) -> dict[str, Any]:
        """:meth:`start_recording` as a Flight client asks for it: ``file`` is a file name,
        created directly in :attr:`data_dir` (no directories, no ``..``, no absolute path, no
        control characters, no existing name or symlink; .h5/.hdf5/.nxs: see
        :func:`rust_daq._access.recording_path`); metadata keys and the compression name are
        checked, metadata values are kept as data. In-process callers (the config's
        ``[writer] output``, the operator's own choice) call :meth:`start_recording`."""
        params = dict(params)
        params["file"] = _access.recording_path(self.data_dir, params.get("file"))
        _access.check_metadata(params.get("metadata", {}))
        _access.check_compression(params.get("compression"))
        log.info("start_recording over the wire: %r", params["file"])
        return self.start_recording(params)

    def start_recording(self, params: dict[str, Any]) -> dict[str, Any]:
        allowed = {"file", "layout", "compression", "metadata", "flush_interval"}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        file = params.get("file")
        if not isinstance(file, str) or not file:
            raise ValueError('needs "file": the HDF5 file to write, a path on the daemon\'s host')
        path = os.path.abspath(file)
        options = WriterOptions(  # ValueError naming the option and what is allowed
            ring=self.ring.path,
            output=path,
            layout=params.get("layout", "append"),
            flush_interval=params.get("flush_interval", self.session.flush_interval),
            compression=params.get("compression"),
            metadata=params.get("metadata", {}),
        )
        with self._rec_lock:
            if self.stopping.is_set():
                raise ValueError("the daemon is stopping")
            if self._recording is not None:
                raise ValueError(f"already recording to {self._recording['file']}; stop_recording first")
            if os.path.exists(path):
                raise ValueError(f"{path} already exists; choose another file")
            # The file starts now: the writer begins at read_tail, which goes to the head.
            self.ring.reader("latest").commit()
            # Supervised: a writer that dies is restarted (status says so meanwhile); one that
            # cannot be kept alive leaves the recording "failed", with the reason.
            try:
                self.runner.start_writer(
                    options, on_event=lambda line: log.warning("recording %s: %s", path, line)
                )
            except RustDaqError as e:
                raise ValueError(str(e)) from e
            self._recording = {"file": path, "layout": options.layout, "started": time.time()}
            log.info("recording to %s", path)
            return dict(self._recording)

    def stop_recording(self) -> dict[str, Any]:
        with self._rec_lock:
            if self.runner.writer is None or self._recording is None:
                raise ValueError("not recording")
            sup = self.runner.stop_writer()  # the final flush; a dead writer is started once more for it
            assert sup is not None
            state = sup.state
            rec, self._recording = self._recording, None
        progress = file_progress(rec["file"])
        if state == "failed":
            held = "no progress marker" if progress is None else f"{progress['records']:,} records"
            raise RuntimeError(
                f"the writer failed after {sup.restarts} restart(s): {sup.reason}; {rec['file']} holds {held}"
            )
        if progress is None:
            raise RuntimeError(f"{rec['file']} has no progress marker after the writer's final flush")
        result: dict[str, Any] = {"file": rec["file"], "layout": rec["layout"], "streams": {}}
        result.update(
            records_written=progress["records"],
            records_lost=progress["lost"],
            flushes=progress["flushes"],
            restarts=sup.restarts,
        )
        result["streams"] = progress["streams"]
        log.info(
            "stopped recording %s: %d records, %d lost, %d writer restart(s)",
            rec["file"],
            progress["records"],
            progress["lost"],
            sup.restarts,
        )
        return result

    # -- running ----------------------------------------------------------------------------

    def run(self, on_ready: Callable[[Daemon], None] | None = None) -> dict[str, Any]:
        """Acquires until the session's duration or SIGINT/SIGTERM, then stops in order (see the
        module documentation). Returns the acquisition's stats (rows per stream, elapsed_s,
        stopped_by), with the streams received through do_put."""

        async def started() -> None:
            if self.session.output is not None:
                await anyio.to_thread.run_sync(
                    self.start_recording,
                    {
                        "file": self.session.output,
                        "layout": self.session.layout,
                        "compression": self.session.compression,
                        "metadata": self.session.metadata,
                    },
                )
            if on_ready is not None:
                on_ready(self)

        with noting_signals(self.runner.stopped_by):
            try:
                # A recording given up on does not stop the daemon: status says so.
                stats = self.runner.acquire(
                    tasks=[self._idle_tail, self._sample_rates, self._watch_flight],
                    on_started=started,
                    stop_on_writer_failure=False,
                )
            finally:
                self._shutdown()
        with self._stats_lock:
            for name, (rows, records, nbytes) in self._puts.items():
                stats["streams"][name] = {"rows": rows, "records": records, "bytes": nbytes}
        if self.recording_failed is not None:
            stats["recording_failed"] = self.recording_failed
        return stats

    def end_subscriptions(self) -> None:
        """Refuses puts from now on; subscriptions send what is written and end (new ones
        too). The daemon does this when it stops."""
        self.stopping.set()
        self.flight.drain()

    def close(self) -> None:
        """Stops in order without running (what :meth:`run` does at its end): subscriptions
        end at the last record, the recording's final flush, the servers stop, the ring is
        released. For a daemon fed through :meth:`put` alone."""
        self._shutdown()

    def _shutdown(self) -> None:
        self.recording_failed = None
        self.end_subscriptions()  # subscriptions send what is left and end; puts are refused
        try:
            if self._recording is not None:
                try:
                    result = self.stop_recording()
                    log.info("final flush: %s", json.dumps(result))
                except (ValueError, RuntimeError, OSError) as e:
                    log.error("stopping the writer: %s", e)
                    self.recording_failed = str(e)
            self.flight.stop()  # its calls in progress get 15 s
            # shutdown() waits for every call in progress; a client that holds a do_put open
            # without sending would hold it forever: give up on it after a while.
            t = threading.Thread(target=self.server.shutdown, daemon=True)
            t.start()
            t.join(timeout=15)
            if t.is_alive():
                log.warning("Flight calls still open after 15 s; exiting without them")
        finally:
            if self.token_file is not None:
                _access.remove_token_file(self.token_file, self._token)
            self._remove_socket_dir()
            self.runner.close()

    def _remove_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    async def _watch_flight(self) -> None:
        """Starts the Flight process again if it dies (its subscriptions break with an error;
        clients connect again): clients are not left without a server while the
        acquisition runs."""
        while True:
            await anyio.sleep(_FLIGHT_WATCH)
            if self.flight.alive() or self.stopping.is_set():
                continue
            log.error(
                "the Flight process (pid %d) exited with status %s; starting it again",
                self.flight.pid,
                self.flight.proc.returncode,
            )
            try:
                await anyio.to_thread.run_sync(self.flight.restart)  # (not on the loop's thread)
            except Exception as e:  # (never the acquisition's end: it runs in its task group)
                log.error("%s; trying again in %.0f s", e, _FLIGHT_RETRY)
                await anyio.sleep(_FLIGHT_RETRY)

    async def _idle_tail(self) -> None:
        while True:
            await anyio.sleep(_IDLE_TAIL)
            # Never wait here: this is the acquisition's thread. A recording starting or
            # stopping holds the lock; the tail is theirs meanwhile.
            if not self._rec_lock.acquire(blocking=False):
                continue
            try:
                # A failed writer (given up on) will not move the tail: a ring with policy
                # "block" must not wait for it.
                sup = self.runner.writer
                if self._recording is None or (sup is not None and sup.state == "failed"):
                    self.ring.reader("latest").commit()
            finally:
                self._rec_lock.release()

    async def _sample_rates(self) -> None:
        last: dict[str, int] = {}
        t_last = time.perf_counter()
        while True:
            await anyio.sleep(_RATE_WINDOW)
            now = time.perf_counter()
            rows = self.acq.rows() if self.acq is not None else {}
            with self._stats_lock:
                rows.update({n: s[0] for n, s in self._puts.items()})
            dt = now - t_last
            self._rates = {n: (r - last.get(n, 0)) / dt for n, r in rows.items()}
            last, t_last = rows, now
