"""One HDF5 file per run: :class:`RunFileWriter`, a RunEngine subscriber that writes the
documents into a ring (a :class:`~rust_daq.bluesky.RingCallback` of its own, ``per_run=False``)
and keeps a writer process (``python -m rust_daq.writer``) rotating from one run's file to
the next.

- At a start document: the file name from the template (formatted with the start document),
  and the writer's rotation into it from the ring's next record on. Its
  ``measurements/metadata`` holds the start document as JSON (``bluesky_start``) and each of
  its scalars as ``start.<key>`` (nested mappings dotted: ``start.plan_args.num``).
- At the stop document: the rotation out of it at the ring's next record (everything written
  during the run is in it), with the stop document (``bluesky_stop``), ``exit_status``,
  ``reason``, ``num_events.<stream>`` and the run's descriptors (``bluesky_descriptors``)
  added to its metadata; the file is closed, complete.
- Between runs the writer holds no file; what the ring receives then is in no run's file.

The file holds every stream the ring receives during the run, the run's own (``primary``,
``baseline``...) and those of other producers on the ring (a rust-daq detector's); so do not
also subscribe a RingCallback to the same ring (its streams would be in the file twice).
A writer process that dies is an error (:class:`~rust_daq.WriterProcessError`, with its log)
at the next document; the next run starts a new one.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import re
import signal
import string
import subprocess
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import numpy as np
from event_model import DocumentRouter
from event_model.documents import Event, EventDescriptor, EventPage, RunStart, RunStop

from .._errors import DocumentError, RustDaqError, WriterProcessError
from .._ring import RingBuffer
from ..hdf5.options import WriterOptions
from ..hdf5.process import rotate_process, start_process
from ._callback import RingCallback, document_json

__all__ = ["DEFAULT_TEMPLATE", "RunFileWriter", "start_metadata", "stop_metadata"]

log = logging.getLogger("rust_daq.bluesky")

DEFAULT_TEMPLATE = "{scan_id}_{uid:.8}.h5"
#: WriterOptions that RunFileWriter sets itself.
_OWN_OPTIONS = frozenset({"ring", "output", "metadata", "start", "parent_pipe"})
#: A start document as the template check formats it at construction.
_SAMPLE = {"uid": "0123abcd-0000-4000-8000-000000000000", "scan_id": 1, "time": 0.0}


def _flatten(prefix: str, doc: Mapping[str, Any], out: dict[str, Any]) -> None:
    for key, value in doc.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            _flatten(name, value, out)
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool | int | float | str):
            out[name] = value


def start_metadata(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A run file's opening metadata: the start document as JSON (``bluesky_start``) and each
    scalar as ``start.<key>`` (nested mappings dotted; lists are in the JSON only)."""
    out: dict[str, Any] = {"bluesky_start": document_json(doc)}
    _flatten("start", doc, out)
    return out


def stop_metadata(doc: Mapping[str, Any], descriptors: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A run file's final metadata: the stop document as JSON (``bluesky_stop``), its
    ``exit_status``, ``reason`` and ``num_events.<stream>``, the run's descriptors as JSON."""
    out: dict[str, Any] = {
        "bluesky_stop": document_json(doc),
        "exit_status": str(doc.get("exit_status")),
        "reason": str(doc.get("reason") or ""),
        "bluesky_descriptors": document_json({"descriptors": descriptors}),
    }
    for stream, n in (doc.get("num_events") or {}).items():
        out[f"num_events.{stream}"] = int(n)
    return out


def _template_fields(template: str) -> list[str]:
    """The names a file name template takes from the start document. Raises ValueError."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"template must be a non-empty str, got {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(
                f"template {template!r}: fields are named after start document keys ({{uid}}, {{scan_id}}), "
                "not positional ({} or {0})"
            )
        names.append(re.split(r"[.\[]", name, maxsplit=1)[0])
    if not names:
        raise ValueError(
            f"template {template!r} has no field: every run would get the same file name; "
            "use the start document's keys, e.g. {scan_id}_{uid:.8}.h5"
        )
    return names


class RunFileWriter(DocumentRouter):
    """One HDF5 file per run (see the module documentation): subscribe it,
    ``RE.subscribe(RunFileWriter(ring, "data/"))``, and ``close()`` it (or use it as a context
    manager) when done: the writer process makes its final flush and exits.

    ``template`` is formatted with the start document (``str.format``; its keys are the
    fields): a field the start document lacks is a DocumentError at that run's start (pass it
    as metadata, ``RE(plan, sample="Si")``); a name that exists already is one too (a run never
    continues another's file). `writer_options` are those of
    :class:`~rust_daq.hdf5.options.WriterOptions` (``flush_interval``, ``compression``,
    ``layout``, ``swmr``, ``streams``...); ``timeout`` bounds each wait for the writer process
    (its start, each rotation, its final flush).

    Raises (here) TypeError (not a producer handle, an unknown or a reserved writer option),
    ValueError (a bad template or option), FileNotFoundError (no such directory).
    """

    def __init__(
        self,
        ring: RingBuffer,
        directory: str | os.PathLike[str],
        template: str = DEFAULT_TEMPLATE,
        *,
        timeout: float = 120.0,
        **writer_options: Any,
    ) -> None:
        super().__init__()
        self._callback = RingCallback(ring, per_run=False, schema_metadata="minimal")
        self.ring = ring
        path = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, f"the directory for run files {path} does not exist", path)
        self.directory = path
        fields = _template_fields(template)
        if set(fields) <= set(_SAMPLE):
            try:
                template.format_map(_SAMPLE)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                raise ValueError(f"template {template!r} does not format a start document: {e}") from None
        self.template = template
        self.timeout = float(timeout)
        reserved = sorted(set(writer_options) & _OWN_OPTIONS)
        if reserved:
            raise TypeError(f"RunFileWriter sets the writer option(s) {', '.join(reserved)} itself")
        known = {f.name for f in dataclasses.fields(WriterOptions)} - _OWN_OPTIONS
        unknown = sorted(set(writer_options) - known)
        if unknown:
            raise TypeError(
                f"unknown writer option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}"
            )
        # (validated now: a bad option is an error here, not at the first run)
        self._options = WriterOptions(
            ring=ring.path, output=os.path.join(path, "run.h5"), start="now", **writer_options
        )
        self._process: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=50)  # the writer's stderr
        self._drain: threading.Thread | None = None
        self._run: str | None = None  # the run whose file is open
        self._failed: dict[str, str] = {}  # run uid -> why it has no (complete) file
        self._descriptors: list[Mapping[str, Any]] = []
        self._runs: dict[str, str] = {}  # descriptor uid -> run uid
        #: The file of the open run (None between runs).
        self.path: str | None = None
        #: Every run file opened, in order.
        self.paths: list[str] = []

    @property
    def writer_pid(self) -> int | None:
        """The pid of the writer process (None when none runs: before the first run, after
        ``close()`` or a crash)."""
        return None if self._process is None else self._process.pid

    # -- documents ---------------------------------------------------------------------------

    def start(self, doc: RunStart) -> RunStart | None:
        uid = doc["uid"]
        self._failed.clear()  # (runs before this one are over, stopped or not)
        try:
            if self._run is not None:
                raise DocumentError(
                    f"run {uid} started while run {self._run} is open: RunFileWriter writes one run at a "
                    "time (one file each); for plans with several runs at once use a RingCallback"
                )
            self._check_writer()
            path = self._path_for(doc)
            self._callback.start(doc)
            metadata = start_metadata(doc)
            if self._process is None:
                self._start_writer(path, metadata)
            else:
                self._rotate(path, metadata, at=self.ring.records_written)
        except BaseException as e:
            self._failed[uid] = f"its file was not opened ({type(e).__name__}: {e})"
            raise
        self._run, self.path = uid, path
        self.paths.append(path)
        self._descriptors = []
        return None

    def descriptor(self, doc: EventDescriptor) -> EventDescriptor | None:
        run = doc.get("run_start")
        self._check_run(run)
        self._callback.descriptor(doc)
        self._runs[str(doc.get("uid"))] = str(run)
        self._descriptors.append(doc)
        return None

    def event(self, doc: Event) -> Event:
        self._check_run(self._runs.get(doc.get("descriptor", "")))
        return self._callback.event(doc)

    def event_page(self, doc: EventPage) -> EventPage:
        self._check_run(self._runs.get(doc.get("descriptor", "")))
        return self._callback.event_page(doc)

    def stop(self, doc: RunStop) -> RunStop | None:
        run = doc.get("run_start")
        self._callback.stop(doc)
        self._runs = {d: r for d, r in self._runs.items() if r != run}
        if self._failed.pop(str(run), None) is not None or run != self._run:
            return None  # (its error was raised already; or a run this writer never had)
        self._check_writer()
        at = self.ring.records_written  # every record of the run (and of the run's time)
        self._run, self.path = None, None
        self._rotate(None, None, at=at, final=stop_metadata(doc, self._descriptors))
        return None

    # -- the writer process -----------------------------------------------------------------

    def _path_for(self, doc: RunStart) -> str:
        uid = doc.get("uid")
        try:
            name = self.template.format_map(doc)
        except KeyError as e:
            raise DocumentError(
                f"the file name template {self.template!r} needs {e.args[0]!r}, which the start document "
                f"of run {uid} does not have (its keys: {', '.join(sorted(doc))}); give it as metadata, "
                f"RE(plan, {e.args[0]}=...) or RE.md[{e.args[0]!r}]"
            ) from None
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            raise DocumentError(
                f"the file name template {self.template!r} does not format the start document of run {uid}: {e}"
            ) from None
        path = os.path.normpath(os.path.join(self.directory, name))
        if "\0" in name or os.path.isabs(name) or not path.startswith(self.directory + os.sep):
            raise DocumentError(
                f"the file name template {self.template!r} gives run {uid} the name {name!r}, which is not a "
                f"file inside {self.directory}"
            )
        if os.path.lexists(path):
            raise DocumentError(
                f"{path} exists: the template {self.template!r} gave run {uid} the name of another file; a "
                "run never continues another's file (put {uid} in the template)"
            )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def _start_writer(self, path: str, metadata: dict[str, Any]) -> None:
        options = dataclasses.replace(self._options, output=path, metadata=metadata)
        try:
            p = start_process(options, ready_timeout=self.timeout)
        except OSError as e:
            if e.errno == errno.E2BIG:  # (the metadata travels on the command line)
                raise DocumentError(
                    f"the start document is too large to open a writer process with "
                    f"({len(metadata['bluesky_start'])} bytes of JSON)"
                ) from None
            raise
        except RustDaqError as e:
            raise WriterProcessError(f"{path}: {e}") from None
        self._log.clear()
        assert p.stderr is not None
        stderr = p.stderr
        # The writer logs to stderr: read it all the time (a full pipe would stop the writer).
        self._drain = threading.Thread(
            target=lambda: self._log.extend(line.rstrip() for line in stderr),
            name="rust-daq-run-writer-log",
            daemon=True,
        )
        self._drain.start()
        self._process = p

    def _log_tail(self, lines: int = 5) -> str:
        if self._drain is not None:
            self._drain.join(timeout=5)
        tail = [line for line in self._log if line][-lines:]
        return ("; its log ends: " + " | ".join(tail)) if tail else ""

    def _reap(self, p: subprocess.Popen[str]) -> None:
        """Closes the pipes of a writer process that has exited (its log read to the end)."""
        if self._drain is not None:
            self._drain.join(timeout=5)
        for pipe in (p.stdin, p.stdout, p.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:  # (BrokenPipeError flushing stdin: the reader is gone)
                    pass

    def _died(self, p: subprocess.Popen[str]) -> str:
        """Forgets a dead writer process; says what became of the open run."""
        self._process = None
        why = f"the writer process (pid {p.pid}) exited with status {p.returncode}{self._log_tail()}"
        self._reap(p)
        if self._run is not None:
            why += (
                f"; {self.path} holds run {self._run} up to its last flush, the rest stays in the ring "
                f"{self.ring.path}"
            )
            self._failed[self._run] = why
            self._run, self.path = None, None
        return why

    def _check_writer(self) -> None:
        p = self._process
        if p is not None and p.poll() is not None:
            raise WriterProcessError(self._died(p))

    def _check_run(self, run: str | None) -> None:
        """Before a document of `run`: it has a file, and its writer is alive."""
        why = self._failed.get(str(run))
        if why is not None:
            raise WriterProcessError(f"run {run} has no file: {why}")
        if run == self._run:
            self._check_writer()

    def _rotate(
        self,
        path: str | None,
        metadata: dict[str, Any] | None,
        *,
        at: int,
        final: dict[str, Any] | None = None,
    ) -> None:
        p = self._process
        assert p is not None
        try:
            rotate_process(p, path, metadata, at=at, final_metadata=final, timeout=self.timeout)
        except RustDaqError as e:
            if p.poll() is not None:
                raise WriterProcessError(self._died(p)) from None
            raise WriterProcessError(f"{path or 'closing the run file'}: {e}{self._log_tail()}") from None

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the writer process after its final flush (idempotent). A run still open (no
        stop document) keeps its file without a stop's metadata. Raises WriterProcessError
        if the final flush failed."""
        p, self._process = self._process, None
        if p is None:
            return
        if self._run is not None:
            log.warning(
                "closing %s with run %s open: it gets no stop document's metadata", self.path, self._run
            )
            self._run, self.path = None, None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                tail = self._log_tail()
                self._reap(p)
                raise WriterProcessError(
                    f"the writer process did not finish its final flush within {self.timeout:g} s; killed{tail}"
                ) from None
        tail = self._log_tail()
        self._reap(p)
        if p.returncode != 0:
            raise WriterProcessError(f"the writer process ended with status {p.returncode}{tail}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
