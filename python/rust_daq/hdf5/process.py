"""The writer as its own process: ``python -m rust_daq.writer`` (:func:`main`, a typer command
like ``rust-daq``'s), started and stopped by :func:`start_process` / :func:`stop_process`,
rotated from one file to the next by :func:`rotate_process`; its options are one
:class:`~rust_daq.hdf5.options.WriterOptions`.

Its standard input (``--parent-pipe``) is the parent's pipe: EOF means the parent is gone or
done (a final flush, then exit), and each line is a command, a JSON object answered by one
JSON line on standard output::

    {"rotate": {"path": "run2.h5" | null, "metadata": {...}, "at": 1234, "final_metadata": {...}}}
    -> {"ok": true, "path": "run2.h5", "records": <records the closed file holds>}
    -> {"ok": false, "error": "<what went wrong>"}
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from .._arrow import warm_up
from .._errors import JetStreamError, RustDaqError
from .._ring import resolve_ring_path
from .options import WriterOptions
from .writer import HDF5Writer, repair

__all__ = ["WriterOptions", "main", "rotate_process", "run", "start_process", "stop_process"]

log = logging.getLogger("rust_daq.writer")


def start_process(
    options: WriterOptions | str,
    output: str | None = None,
    *,
    ready_timeout: float = 120.0,
    **kwargs: Any,
) -> subprocess.Popen[str]:
    """Starts ``python -m rust_daq.writer`` with `options` and waits until it is ready (its
    file is open). (``start_process(ring, output, layout=..., ...)``, the keywords of
    :class:`WriterOptions`, still works.) It runs in its own session: a Ctrl-C in the terminal
    reaches only its parent, which stops it (:func:`stop_process`) after the producer has
    written its last rows, so the final flush holds them. Raises RustDaqError with the
    writer's own message if it does not start."""
    if not isinstance(options, WriterOptions):
        assert output is not None, "start_process(ring, output, ...) needs the output"
        options = WriterOptions(ring=options, output=output, **kwargs)
    # --parent-pipe: the child watches its stdin, whose only write end is ours, so our death
    # (even by SIGKILL) reaches it as EOF and it writes, flushes and closes its file.
    options = dataclasses.replace(options, parent_pipe=True)
    p = subprocess.Popen(
        options.command(),
        # (the watcher compares its parent with ours: a parent that dies before the child's
        # watcher starts has already handed it to another process by then)
        env={**os.environ, _PARENT_ENV: str(os.getpid())},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert p.stdout is not None
    # A writer that hangs before its file is open (a stale NFS mount, say) must not hang its
    # parent: wait for "ready" at most ready_timeout seconds.
    ready = select.select([p.stdout], [], [], ready_timeout)[0] and p.stdout.readline().strip() == "ready"
    if not ready:
        if p.poll() is None:
            p.kill()
        try:
            err = p.communicate(timeout=30)[1].strip()
        except subprocess.TimeoutExpired:
            err = ""
        why = err.splitlines()[-1] if err else f"no 'ready' within {ready_timeout:g} s (exit {p.returncode})"
        raise RustDaqError(f"the writer process did not start: {why}")
    return p


def rotate_process(
    p: subprocess.Popen[str],
    path: str | os.PathLike[str] | None,
    metadata: dict[str, Any] | None = None,
    *,
    at: int | None = None,
    final_metadata: dict[str, Any] | None = None,
    timeout: float = 120.0,
) -> int:
    """:meth:`HDF5Writer.rotate <rust_daq.hdf5.HDF5Writer.rotate>` in a writer process from
    :func:`start_process`: records before `at` (default: all the ring holds when the writer
    gets the command) go to its current file, which gets `final_metadata` and is closed; then
    `path` (None: no file until the next rotation) takes the rest. Waits for it (at most
    `timeout` s). Returns the records the closed file holds. Raises RustDaqError with the
    writer's own message if it refused (the old file is closed then, and it holds no file),
    or if it died or did not answer."""
    if p.stdin is None or p.stdout is None:
        raise ValueError("rotate_process needs a writer from start_process (its pipes)")
    command = {
        "path": None if path is None else os.fspath(path),
        "metadata": metadata,
        "at": at,
        "final_metadata": final_metadata,
    }
    try:
        p.stdin.write(json.dumps({"rotate": command}, default=str) + "\n")
        p.stdin.flush()
    except (BrokenPipeError, ValueError):
        raise RustDaqError(f"the writer process has exited ({_exit_of(p)})") from None
    if not select.select([p.stdout], [], [], timeout)[0]:
        raise RustDaqError(f"the writer process did not answer a rotation within {timeout:g} s")
    line = p.stdout.readline()
    if not line:
        raise RustDaqError(f"the writer process has exited ({_exit_of(p)})")
    try:
        answer = json.loads(line)
    except ValueError:
        raise RustDaqError(f"the writer process answered {line.strip()!r}, not a JSON object") from None
    if not answer.get("ok"):
        raise RustDaqError(f"the writer process could not rotate: {answer.get('error')}")
    return int(answer.get("records", 0))


def _exit_of(p: subprocess.Popen[str]) -> str:
    try:
        code = p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return "still running, its pipe closed"
    return f"exit status {code}"


def stop_process(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    """SIGTERM to a writer process from :func:`start_process`; waits for its final flush.
    Returns its exit code and what it wrote to stderr (its log)."""
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err or ""  # (None when the caller reads stderr itself)


#: The environment variable in which start_process gives the writer its pid.
_PARENT_ENV = "RUST_DAQ_WRITER_PARENT"

#: Seconds a writer whose standard input closed waits to learn why: a SIGTERM that comes with
#: it (stop_process sends one, then closes the pipe), or its parent's death (it is reparented).
_EOF_GRACE = 2.0


def _watch_parent(
    stop: threading.Event,
    orphaned: threading.Event,
    commands: queue.SimpleQueue[dict[str, Any] | str] | None = None,
    wake: threading.Event | None = None,
) -> None:
    """Blocks on standard input until EOF: the parent closed it (stop_process) or died. Either
    way the writer stops as on SIGTERM; only a dead parent makes it an orphan (which may remove
    the ring). (PR_SET_PDEATHSIG would fire when the parent's *thread* that started us ends,
    which in the daemon is any Flight worker thread.) Each line before EOF is a command (a
    JSON object; anything else is answered with an error), queued for the writer's loop.

    It reads the raw descriptor, not ``sys.stdin``: a thread blocked in the buffered reader
    holds its lock, and an interpreter that finishes while it does aborts (SIGABRT, "could
    not acquire lock for <stdin> at interpreter shutdown") after a clean final flush."""
    try:
        parent = int(os.environ.get(_PARENT_ENV, ""))
    except ValueError:
        parent = os.getppid()  # (started by hand: the parent as it is now)
    pending = b""
    try:
        while chunk := os.read(0, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.strip() or commands is None:
                    continue
                try:
                    command = json.loads(line)
                    if not isinstance(command, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    commands.put(f"a command must be one JSON object per line ({e})")
                else:
                    commands.put(command)
                if wake is not None:
                    wake.set()
    except OSError:
        pass
    # A dying parent closes its descriptors before the kernel reparents its children.
    deadline = time.monotonic() + _EOF_GRACE
    while not stop.is_set() and os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.01)
    if stop.is_set():
        return
    if os.getppid() != parent:
        log.warning("standard input closed: the process that started this writer is gone; stopping")
        orphaned.set()
    else:
        log.info("standard input closed by the process that started this writer; stopping")
    stop.set()
    if wake is not None:
        wake.set()


def _serve(writer: HDF5Writer, command: dict[str, Any] | str) -> None:
    """Carries out one command from the parent; its answer is one JSON line on stdout."""
    answer: dict[str, Any]
    try:
        if isinstance(command, str):
            raise ValueError(command)
        rotate = command.get("rotate")
        if not isinstance(rotate, dict) or set(command) != {"rotate"}:
            raise ValueError(f"unknown command {sorted(command)}; the writer knows 'rotate'")
        unknown = set(rotate) - {"path", "metadata", "at", "final_metadata"}
        if unknown:
            raise ValueError(f"rotate: unknown fields {sorted(unknown)}")
        at = rotate.get("at")
        if at is not None and (isinstance(at, bool) or not isinstance(at, int)):
            raise ValueError(f"rotate: at must be a sequence number, got {at!r}")
        for key in ("metadata", "final_metadata"):
            if rotate.get(key) is not None and not isinstance(rotate[key], dict):
                raise ValueError(f"rotate: {key} must be a JSON object, got {rotate[key]!r}")
        old = writer.path
        writer.rotate(
            rotate.get("path"),
            rotate.get("metadata"),
            at=at,
            final_metadata=rotate.get("final_metadata"),
        )
        log.info("rotated %s -> %s", old, rotate.get("path"))
        answer = {"ok": True, "path": rotate.get("path"), "records": writer.last_file_records}
    except (OSError, ValueError, RustDaqError) as e:
        log.error("rotation failed: %s", e)
        answer = {"ok": False, "error": str(e)}
    try:
        print(json.dumps(answer), flush=True)
    except OSError:  # (the parent is gone: EOF on stdin stops us next)
        pass


class _Layout(enum.StrEnum):  # (an Enum: typer names the option and its choices in errors)
    append = "append"
    batches = "batches"


class _Start(enum.StrEnum):
    tail = "tail"
    now = "now"


_PROG = "python -m rust_daq.writer"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def _command(
    ring: Annotated[str | None, typer.Option(help="ring path (a bare name lives in /dev/shm)")] = None,
    output: Annotated[str | None, typer.Option(help="HDF5 file to write (continued if it exists)")] = None,
    repair_file: Annotated[
        str | None,
        typer.Option(
            "--repair", metavar="FILE", help="clear the flags a killed writer left in FILE, then exit"
        ),
    ] = None,
    layout: Annotated[_Layout, typer.Option()] = _Layout.append,
    start: Annotated[
        _Start, typer.Option(help="tail: what no file holds yet; now: only records written from now on")
    ] = _Start.tail,
    flush_interval: Annotated[float, typer.Option(metavar="SECONDS", help="seconds between flushes")] = 1.0,
    compression: Annotated[
        str | None, typer.Option(help="gzip, gzip:LEVEL, lzf, blosc, lz4, zstd, bitshuffle")
    ] = None,
    no_swmr: Annotated[bool, typer.Option("--no-swmr", help="do not enable SWMR (append layout)")] = False,
    stream: Annotated[list[str] | None, typer.Option(help="only this stream (repeatable)")] = None,
    metadata: Annotated[str | None, typer.Option(help="run metadata as a JSON object")] = None,
    parent_pipe: Annotated[
        bool,
        typer.Option(
            "--parent-pipe",
            help="stop (final flush, exit 0) when standard input closes: the parent that started us died",
        ),
    ] = False,
    remove_ring_if_orphaned: Annotated[
        bool,
        typer.Option(
            "--remove-ring-if-orphaned",
            help="with --parent-pipe: when the parent dies, remove the ring after the final flush (it "
            "created the ring, and no one else would)",
        ),
    ] = False,
) -> None:
    """Drain a rust-daq ring into HDF5 (SIGINT/SIGTERM: final flush, exit 0), or --repair a file."""
    if repair_file is not None:
        try:
            done = repair(repair_file)
        except OSError as e:
            print(f"rust_daq.writer: cannot repair {repair_file}: {e.strerror or e}", file=sys.stderr)
            raise typer.Exit(2) from None
        print(f"{repair_file}: {'repaired' if done else 'nothing to repair'}")
        raise typer.Exit(0)
    if not ring or not output:
        print(f"{_PROG}: error: --ring and --output are required", file=sys.stderr)
        raise typer.Exit(2)
    try:
        options = WriterOptions(
            ring=ring,
            output=output,
            layout=layout.value,
            flush_interval=flush_interval,
            compression=compression,
            swmr=not no_swmr,
            streams=tuple(stream) if stream else None,
            metadata=json.loads(metadata) if metadata else None,
            start=start.value,
            parent_pipe=parent_pipe,
            remove_ring_if_orphaned=remove_ring_if_orphaned,
        )
    except ValueError as e:  # (json.JSONDecodeError is one)
        print(f"rust_daq.writer: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    raise typer.Exit(run(options))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rust_daq.writer``: the writer as its own process (:func:`run`), its
    arguments those of :meth:`WriterOptions.argv`. Returns the exit status: 0, 2 (bad
    arguments, a writer that cannot start), 1 (the final flush failed)."""
    try:
        # Typer's own handling (usage errors said, exit status 2); the command raises
        # typer.Exit with its status, so every way out is a SystemExit here.
        app(list(argv) if argv is not None else None, prog_name=_PROG)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    return 0


def run(options: WriterOptions) -> int:
    """Runs a writer with `options` in this process until SIGINT/SIGTERM (or, with
    ``parent_pipe``, until standard input closes); then the final flush. Returns the exit
    status as :func:`main` does."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    wake = threading.Event()  # a stop, or a command from the parent

    def stopped(*_: object) -> None:
        # A signal handler runs in the main thread, which may be inside wake.wait() holding
        # the event's (non-reentrant) lock: setting it here could deadlock the writer for
        # good. stop is never waited on; wake is set from a thread of its own.
        stop.set()
        threading.Thread(target=wake.set, name="wake", daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopped)
    orphaned = threading.Event()
    commands: queue.SimpleQueue[dict[str, Any] | str] = queue.SimpleQueue()
    if options.parent_pipe:
        threading.Thread(
            target=_watch_parent, args=(stop, orphaned, commands, wake), name="parent-watch", daemon=True
        ).start()
    source: Any = None
    try:
        source = _source(options)
        writer = HDF5Writer(
            options.output,
            source if source is not None else options.ring,
            flush_interval=options.flush_interval,
            layout=options.layout,  # type: ignore[arg-type]
            compression=options.compression,
            swmr=options.swmr,
            metadata=dict(options.metadata) if options.metadata is not None else None,
            streams=list(options.streams) if options.streams is not None else None,
            start=options.start,  # type: ignore[arg-type]
        )
    except (OSError, ValueError, RustDaqError) as e:
        if source is not None:
            source.close()
        print(f"rust_daq.writer: {e}", file=sys.stderr)
        return 2
    try:
        return _write(writer, options, stop, wake, orphaned, commands)
    finally:
        if source is not None:
            source.close()


def _source(options: WriterOptions) -> Any:
    """The writer's input when it is not a ring: a JetStream URL (``nats://``, ``tls://``)."""
    if not options.ring.startswith(("nats://", "tls://")):
        return None
    from ..nats.source import JetStreamSource

    return JetStreamSource(options.ring, output=options.output)


def _write(
    writer: HDF5Writer,
    options: WriterOptions,
    stop: threading.Event,
    wake: threading.Event,
    orphaned: threading.Event,
    commands: queue.SimpleQueue[dict[str, Any] | str],
) -> int:
    log.info("writing %s -> %s (layout %s)", options.ring, options.output, options.layout)
    warm_up()  # (pyarrow's lazy imports: before "ready", not in the first flush)
    try:
        print("ready", flush=True)
    except OSError:  # (BrokenPipeError) nobody reads it: the parent died as we started
        log.warning("the process that started this writer is gone; writing what the ring holds")
    try:
        with writer:
            while not stop.is_set():
                while not commands.empty():
                    _serve(writer, commands.get())
                try:
                    writer.flush_to_disk()
                except JetStreamError:
                    raise  # the source is gone, not the disk: retrying would wait for ever
                except OSError as e:  # disk full, I/O error: nothing was committed; retry
                    log.error("flush failed, will retry: %s", e)
                wake.wait(writer.flush_interval)
                wake.clear()
    except JetStreamError as e:
        log.error("the JetStream source failed: %s; the file holds what was flushed before", e)
        return 1
    except RustDaqError as e:  # (IncompatibleFileError: the file was changed under us)
        log.error(
            "final flush failed: %s; %d record(s) stay in the ring %s",
            e,
            writer.records_pending,
            options.ring,
        )
        return 1
    except OSError as e:  # the final flush: what did not fit stays in the ring, and is said
        log.error(
            "final flush failed: %s; %d record(s) are not in %s and stay in the ring %s",
            e,
            writer.records_pending,
            options.output,
            options.ring,
        )
    else:
        if writer.records_pending:  # a final pass that took only what fitted
            log.warning(
                "%d record(s) are not in %s and stay in the ring %s (the disk holds no more)",
                writer.records_pending,
                options.output,
                options.ring,
            )
    if (
        orphaned.is_set()
        and options.remove_ring_if_orphaned
        and not options.ring.startswith(("nats://", "tls://"))
    ):
        left = writer.records_pending
        try:
            os.unlink(resolve_ring_path(options.ring))
            log.warning(
                "removed the ring %s its dead parent created (%d record(s) were not written)",
                options.ring,
                left,
            )
        except OSError as e:
            log.error("could not remove the ring %s: %s", options.ring, e)
    log.info(
        "stopped: %d records in %d batches, %d lost",
        writer.records_written,
        writer.batch_count,
        writer.records_lost,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
