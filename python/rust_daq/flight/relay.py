"""The remote HDF5 writer (``rust-daq write --from grpc://...``): :func:`relay` copies a
daemon's streams into a ring on this machine and runs the ordinary writer on it, so the file
has the local writer's layouts and guarantees; what was lost upstream stays counted."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from .._errors import RustDaqError
from .client import connect

__all__ = ["relay"]

log = logging.getLogger("rust_daq.remote")


def relay(
    url: str,
    output: str,
    *,
    token: str | None = None,
    tls_root_certs: bytes | str | os.PathLike[str] | None = None,
    layout: str = "append",
    compression: str | None = None,
    flush_interval: float = 1.0,
    capacity_mb: float = 256,
    metadata: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
    on_ready: Any = None,
) -> dict[str, Any]:
    """The remote HDF5 writer: subscribes to every stream of the daemon at `url` from the
    oldest record its ring holds, writes the batches into a ring on this machine (keeping
    their timestamps and per-stream sequence numbers, so records lost upstream are counted
    as lost in the file), and runs the ordinary writer process on that ring into `output`.
    Runs until the daemon stops (its streams end) or `stop` is set; then the writer's final
    flush. Returns records relayed and lost per stream."""
    from .._ring import RingBuffer
    from ..hdf5.options import WriterOptions
    from ..hdf5.process import start_process, stop_process

    if os.path.exists(output):
        raise RustDaqError(f"{output} already exists; choose another output file (or delete it)")
    daq = connect(url, token=token, tls_root_certs=tls_root_certs)
    path = (
        f"/dev/shm/rust-daq-relay-{os.getpid()}"
        if os.path.isdir("/dev/shm")
        else f"rust-daq-relay-{os.getpid()}"
    )
    ring = RingBuffer.create(path, capacity_mb=capacity_mb, replace=True)
    stats: dict[str, dict[str, Any]] = {}
    writer = None
    try:
        meta = {"relayed_from": url, **(metadata or {})}
        writer = start_process(
            WriterOptions(
                ring=ring.path,
                output=output,
                layout=layout,
                flush_interval=flush_interval,
                compression=compression,
                metadata=meta,
            )
        )
        with daq.reader(start="oldest") as reader:
            if on_ready is not None:
                on_ready()
            while True:
                stopping = stop is not None and stop.is_set()
                # Stopping: what was received is still written (no wait for more).
                items = reader.read(timeout=0.0 if stopping else 0.2)
                for b in items:
                    ring.write_arrow_batch(
                        b.batch, b.stream, timestamp_ns=b.timestamp_ns, stream_seq=b.stream_seq
                    )
                    st = stats.setdefault(b.stream, {"records": 0, "rows": 0})
                    st["records"] += 1
                    st["rows"] += b.batch.num_rows
                if not items and (stopping or reader.ended):
                    break
                if writer.poll() is not None:  # nothing would write the ring into the file
                    _, err = writer.communicate()
                    code, writer = writer.returncode, None
                    last = err.strip().splitlines()[-1:] or ["no message"]
                    raise RustDaqError(f"the writer process exited with {code}: {last[0]}")
            for name, (lost, rows) in reader.lost_by_stream().items():
                stats.setdefault(name, {"records": 0, "rows": 0}).update(lost_records=lost, lost_rows=rows)
    finally:
        if writer is not None:
            code, err = stop_process(writer)
            if code != 0:
                log.error("the writer exited with %d: %s", code, err.strip())
        ring.close()
        try:
            os.unlink(ring.path)
        except FileNotFoundError:
            pass
        daq.close()
    return stats
