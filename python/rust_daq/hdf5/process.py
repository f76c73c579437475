"""The writer as its own process: ``python -m rust_daq.writer`` (:func:`main`), started and
stopped by :func:`start_process` / :func:`stop_process`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .._errors import RustDaqError
from .._ring import resolve_ring_path
from .writer import HDF5Writer, repair

__all__ = ["main", "start_process", "stop_process"]

log = logging.getLogger("rust_daq.writer")


def start_process(
    ring: str,
    output: str,
    *,
    layout: str = "append",
    flush_interval: float = 1.0,
    compression: str | None = None,
    metadata: dict[str, Any] | None = None,
    remove_ring_if_orphaned: bool = False,
    ready_timeout: float = 120.0,
) -> subprocess.Popen[str]:
    """Starts ``python -m rust_daq.writer`` on `ring` and waits until it is ready (its file is
    open). It runs in its own session: a Ctrl-C in the terminal reaches only its parent, which
    stops it (:func:`stop_process`) after the producer has written its last rows, so the final
    flush holds them. Raises RustDaqError with the writer's own message if it does not start."""
    cmd = [
        sys.executable,
        "-m",
        "rust_daq.writer",
        "--ring",
        ring,
        "--output",
        output,
        "--layout",
        layout,
        "--flush-interval",
        str(flush_interval),
        "--metadata",
        json.dumps(metadata or {}, default=str),
    ]
    if compression:
        cmd += ["--compression", compression]
    # --parent-pipe: the child watches its stdin, whose only write end is ours, so our death
    # (even by SIGKILL) reaches it as EOF and it writes, flushes and closes its file.
    cmd.append("--parent-pipe")
    if remove_ring_if_orphaned:
        cmd.append("--remove-ring-if-orphaned")
    p = subprocess.Popen(
        cmd,
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


def stop_process(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    """SIGTERM to a writer process from :func:`start_process`; waits for its final flush.
    Returns its exit code and what it wrote to stderr (its log)."""
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err or ""  # (None when the caller reads stderr itself)


def _watch_parent(stop: threading.Event, orphaned: threading.Event) -> None:
    """Blocks on standard input until EOF: the parent closed it (stop_process) or died. Either
    way the writer stops as on SIGTERM. (PR_SET_PDEATHSIG would fire when the parent's *thread*
    that started us ends, which in the daemon is any Flight worker thread.)"""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    if not stop.is_set():
        log.warning("standard input closed: the process that started this writer is gone; stopping")
        orphaned.set()
        stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rust_daq.writer``: the writer as its own process. SIGINT/SIGTERM stop it
    cleanly (final flush, exit 0)."""
    ap = argparse.ArgumentParser(
        prog="python -m rust_daq.writer", description="Drain a rust-daq ring into HDF5."
    )
    ap.add_argument("--ring", help="ring path (a bare name lives in /dev/shm)")
    ap.add_argument("--output", help="HDF5 file to write (continued if it exists)")
    ap.add_argument(
        "--repair", metavar="FILE", help="clear the flags a killed writer left in FILE, then exit"
    )
    ap.add_argument("--layout", choices=["append", "batches"], default="append")
    ap.add_argument("--flush-interval", type=float, default=1.0, metavar="SECONDS")
    ap.add_argument("--compression", default=None, help="gzip, gzip:LEVEL, lzf, blosc, lz4, zstd, bitshuffle")
    ap.add_argument("--no-swmr", action="store_true", help="do not enable SWMR (append layout)")
    ap.add_argument("--stream", action="append", dest="streams", help="only this stream (repeatable)")
    ap.add_argument("--metadata", default=None, help="run metadata as a JSON object")
    ap.add_argument(
        "--parent-pipe",
        action="store_true",
        help="stop (final flush, exit 0) when standard input closes: the parent that started us died",
    )
    ap.add_argument(
        "--remove-ring-if-orphaned",
        action="store_true",
        help="with --parent-pipe: when the parent dies, remove the ring after the final flush (it "
        "created the ring, and no one else would)",
    )
    args = ap.parse_args(argv)
    if args.repair:
        try:
            done = repair(args.repair)
        except OSError as e:
            print(f"rust_daq.writer: cannot repair {args.repair}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"{args.repair}: {'repaired' if done else 'nothing to repair'}")
        return 0
    if not args.ring or not args.output:
        ap.error("--ring and --output are required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    orphaned = threading.Event()
    if args.parent_pipe:
        threading.Thread(
            target=_watch_parent, args=(stop, orphaned), name="parent-watch", daemon=True
        ).start()
    try:
        metadata = json.loads(args.metadata) if args.metadata else None
        writer = HDF5Writer(
            args.output,
            args.ring,
            flush_interval=args.flush_interval,
            layout=args.layout,
            compression=args.compression,
            swmr=not args.no_swmr,
            metadata=metadata,
            streams=args.streams,
        )
    except (OSError, ValueError, RustDaqError) as e:
        print(f"rust_daq.writer: {e}", file=sys.stderr)
        return 2
    log.info("writing %s -> %s (layout %s)", args.ring, args.output, args.layout)
    print("ready", flush=True)
    try:
        with writer:
            while not stop.is_set():
                try:
                    writer.flush_to_disk()
                except OSError as e:  # disk full, I/O error: nothing was committed; retry
                    log.error("flush failed, will retry: %s", e)
                stop.wait(writer.flush_interval)
    except RustDaqError as e:  # (IncompatibleFileError: the file was changed under us)
        log.error(
            "final flush failed: %s; %d record(s) stay in the ring %s", e, writer.records_pending, args.ring
        )
        return 1
    except OSError as e:  # the final flush: what did not fit stays in the ring, and is said
        log.error(
            "final flush failed: %s; %d record(s) are not in %s and stay in the ring %s",
            e,
            writer.records_pending,
            args.output,
            args.ring,
        )
    else:
        if writer.records_pending:  # a final pass that took only what fitted
            log.warning(
                "%d record(s) are not in %s and stay in the ring %s (the disk holds no more)",
                writer.records_pending,
                args.output,
                args.ring,
            )
    if orphaned.is_set() and args.remove_ring_if_orphaned:
        left = writer.records_pending
        try:
            os.unlink(resolve_ring_path(args.ring))
            log.warning(
                "removed the ring %s its dead parent created (%d record(s) were not written)", args.ring, left
            )
        except OSError as e:
            log.error("could not remove the ring %s: %s", args.ring, e)
    log.info(
        "stopped: %d records in %d batches, %d lost",
        writer.records_written,
        writer.batch_count,
        writer.records_lost,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
