"""The ``rust-daq`` command: run acquisitions, write, publish, inspect and follow rings and
files. (Over 500 lines: one function per command with its options and help, and the run's
summary; the work of each command lives in its module: runner, hdf5.process, flight.relay,
nats.publisher, _inspect.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from ._errors import RustDaqError
from ._inspect import RemoteTail, RingTail, TailSource, latest_table, print_h5, print_ring
from ._ring import RingBuffer, resolve_ring_path
from ._session import Session, default_ring_name
from .adapters import SimulatedCamera, SimulatedVoltmeter
from .runner import Runner, run_session

__all__ = ["Session", "app", "default_ring_name", "main", "run_session"]

app = typer.Typer(
    name="rust-daq",
    help="rust-daq: a lossless data plane for laboratory acquisition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


async def _progress(run: Runner) -> None:
    s, acq, ring = run.session, run.acq, run.ring
    assert acq is not None
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("acquiring", total=s.duration or None, info="")
        t0 = time.perf_counter()
        while True:
            await anyio.sleep(0.25)
            st = acq.stats()
            rows = sum(x["rows"] for x in st["streams"].values())
            mb = sum(x["bytes"] for x in st["streams"].values()) / 1e6
            elapsed = time.perf_counter() - t0
            size = await anyio.to_thread.run_sync(_file_mb, s.output)
            info = f"{rows:,} rows  {mb / max(elapsed, 1e-9):.2f} MB/s  lost {ring.records_lost}  file {size:.1f} MB"
            sup = run.writer
            if sup is not None and (sup.state != "running" or sup.restarts):
                info += f"  writer {sup.state}, {sup.restarts} restart(s)"
            progress.update(task, completed=min(elapsed, s.duration or elapsed), info=info)


def _file_mb(path: str | None) -> float:
    return os.path.getsize(path) / 1e6 if path and os.path.exists(path) else 0.0


def _summary(stats: dict[str, Any]) -> bool:
    """Prints what was acquired, what the file holds and what did not reach it. Returns
    whether the run succeeded (False: the writer could not be kept alive, or its final flush
    failed)."""
    book = (stats.get("file") or {}).get("streams", {})
    table = Table(title=f"acquisition ({stats['elapsed_s']:.1f} s, stopped by {stats['stopped_by']})")
    columns = ["stream", "rows"] + (["in file"] if stats.get("output") else [])
    for col in (*columns, "records", "MB", "missed", "jitter p99 µs", "write p99.9 µs"):
        # (a stream's name folds onto more lines rather than lose its end to an ellipsis)
        table.add_column(col, justify="right" if col != "stream" else "left", overflow="fold")
    for name, st in stats["streams"].items():
        in_file = [f"{book[name]['rows']:,}" if name in book else "0"] if stats.get("output") else []
        table.add_row(
            escape(name),
            f"{st['rows']:,}",
            *in_file,
            f"{st['records']:,}",
            f"{st['bytes'] / 1e6:.2f}",
            str(st["deadlines_missed"]),
            f"{st['jitter_us']['p99']:.0f}",
            f"{st['write_latency_us']['p99.9']:.0f}",
        )
    out.print(table)
    lat = stats["write_latency_us"]
    out.print(
        f"ring write latency, all streams ({lat['n']:,} writes): p50 {lat['p50']:.1f} µs, p99 {lat['p99']:.1f} µs, "
        f"p99.9 {lat['p99.9']:.1f} µs, max {lat['max']:.0f} µs; records lost: {stats['records_lost']}"
    )
    if stats.get("realtime"):
        out.print("realtime: " + "; ".join(f"{k} {v}" for k, v in stats["realtime"].items()))
    published_ok = True
    if "published" in stats:
        pub = stats["published"] or {"records": 0, "lost_records": 0, "outages": 0}
        out.print(
            f"published to JetStream: {pub['records']:,} records; {pub['lost_records']} lost in the ring "
            f"before publishing; {pub['outages']} outage(s)",
            markup=False,
        )
        if stats.get("published_error"):
            out.print(
                f"\nRUN FAILED: the JetStream publisher stopped: {stats['published_error']}", markup=False
            )
            published_ok = False
    if not stats.get("output"):
        return published_ok
    writer = stats.get("writer") or {"state": "failed", "restarts": 0, "reason": "not started"}
    out.print(f"writer: {writer['restarts']} restart(s)", markup=False)
    output = stats["output"]
    if writer["state"] == "failed":
        out.print(f"\nRUN FAILED: the writer could not be kept alive: {writer['reason']}", markup=False)
        file = stats.get("file")
        if file is None:
            out.print(f"{output}: no progress marker: nothing in it is known to be complete", markup=False)
        else:
            held = ", ".join(f"{n} {b['rows']:,} rows" for n, b in file["streams"].items()) or "no rows"
            out.print(
                f"{output} holds {file['records']:,} records ({held}); {file['lost']} lost to ring overwrite",
                markup=False,
            )
        missing = {
            n: st["rows"] - book.get(n, {}).get("rows", 0)
            for n, st in stats["streams"].items()
            if st["rows"] > book.get(n, {}).get("rows", 0)
        }
        if missing:
            out.print(
                "not in the file: " + ", ".join(f"{n} {r:,} rows" for n, r in missing.items()),
                markup=False,
            )
        left = stats.get("ring_left")
        if left is not None:
            where = (
                "the ring was removed"
                if left["removed"]
                else f"they are in the ring, kept: rust-daq write --ring {left['path']} --output {output}"
            )
            out.print(f"{left['records']:,} records the writer did not commit; {where}", markup=False)
        return False
    first = next(iter(stats["streams"]), None)
    out.print(f"\nwrote {output} ({stats['file_bytes'] / 1e6:.1f} MB). Read it with:\n")
    out.print("    import h5py", markup=False)
    out.print(f"    f = h5py.File({output!r})", markup=False)
    if first is not None:
        column = "voltage" if first == "voltmeter" else "frame"
        out.print(f"    f['measurements/{first}/{column}'][:]", markup=False)
    return published_ok


def _fail(e: BaseException) -> typer.Exit:
    # Escaped (messages name TOML sections like [ring]) and unwrapped (tests and logs grep them).
    console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
    return typer.Exit(2)


# -- commands ---------------------------------------------------------------------------------


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="seconds to acquire", min=0.1)] = 10.0,
    output: Annotated[Path, typer.Option(help="HDF5 file to write")] = Path("experiment_data.h5"),
    rate: Annotated[float, typer.Option(help="voltmeter readings per second", min=0.1, max=100_000)] = 1000.0,
    fps: Annotated[float, typer.Option(help="camera frames per second", min=0.1, max=1000)] = 10.0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """The main job on simulated instruments: a voltmeter and a camera into a ring in shared
    memory, the HDF5 writer in its own process; Ctrl-C stops early (nothing is lost)."""
    s = Session(
        instruments=[SimulatedVoltmeter(rate_hz=rate), SimulatedCamera(fps=fps)],
        ring_path=resolve_ring_path(default_ring_name("demo")),
        capacity_mb=64,
        output=str(output),
        flush_interval=0.5,
        duration=duration,
        metadata={"run": "rust-daq demo", "instruments": "simulated voltmeter and camera"},
        own_ring=True,
        batch_rows=1,  # every reading written at once: the write latency it prints is case 6's
    )
    _run(s, progress)


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="run configuration (TOML)")],
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    r"""Runs the acquisition a configuration file describes, until its duration or Ctrl-C/SIGTERM
    (either way the final flush happens).

    The writer runs in its own process, supervised: one that dies is restarted (it resumes
    where the file's progress says; each restart is logged and counted in the summary). One
    that cannot be kept alive (it dies again at once) ends the run with exit status 1 and a
    summary of what the file holds and what did not reach it. The ring is removed at the
    end, whatever happens, unless [ring] names it and says keep = true.

    duration = 10                 # seconds (omit: until Ctrl-C)
    \[ring]    path = "lab", capacity_mb = 256, policy = "overwrite" | "block", keep = false
    \[writer]  output = "run.h5", layout = "append" | "batches", compression = "gzip", flush_interval = 1.0
    \[metadata] any keys: stored in the file
    \[\[instruments]]  type = "voltmeter" | "camera" | "scpi", name, rate_hz (fps), ...
    """
    from .config import load_config  # (pydantic: imported by the commands that read a config)

    try:
        s = load_config(config)
    except RustDaqError as e:
        raise _fail(e) from e
    _run(s, progress)


def _run(s: Session, progress: bool) -> None:
    def said(line: str) -> None:
        console.print(f"[yellow]{escape(line)}[/yellow]", soft_wrap=True)

    try:
        stats = run_session(s, on_event=said, progress=_progress if progress else None)
    except (RustDaqError, OSError) as e:
        raise _fail(e) from e
    if not _summary(stats):
        raise typer.Exit(1)


@app.command()
def write(
    output: Annotated[Path, typer.Option(help="HDF5 file")],
    ring: Annotated[str | None, typer.Option(help="ring path (a bare name lives in /dev/shm)")] = None,
    from_url: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="a daemon's URL (grpc://host:port), or JetStream's (nats://host:4222/PREFIX; credentials "
            "from RUST_DAQ_NATS_*): write its streams here",
        ),
    ] = None,
    token: Annotated[str | None, typer.Option(envvar="RUST_DAQ_TOKEN", help="the daemon's token")] = None,
    tls_root_cert: Annotated[
        Path | None, typer.Option(help="certificate (PEM) to trust for grpc+tls")
    ] = None,
    layout: Annotated[str, typer.Option(help="append or batches")] = "append",
    flush_interval: Annotated[float, typer.Option(help="seconds between flushes")] = 1.0,
    compression: Annotated[
        str | None, typer.Option(help="gzip, gzip:LEVEL, lzf, blosc, lz4, zstd, bitshuffle")
    ] = None,
) -> None:
    """The HDF5 writer as its own process (SIGINT/SIGTERM: final flush, exit 0): of a ring on
    this machine (--ring), or of a daemon's streams over the network (--from), until the
    daemon stops."""
    from .hdf5.options import WriterOptions
    from .hdf5.process import run

    if (ring is None) == (from_url is None):
        raise _fail(RustDaqError("give exactly one of --ring (a local ring) and --from (a daemon's URL)"))
    if from_url is not None and from_url.startswith(("nats://", "tls://")):
        ring, from_url = from_url, None  # JetStream: the writer process reads it as its input
    if from_url is not None:
        raise typer.Exit(
            _write_remote(from_url, str(output), token, tls_root_cert, layout, compression, flush_interval)
        )
    assert ring is not None
    try:
        options = WriterOptions(
            ring=ring,
            output=str(output),
            layout=layout,
            flush_interval=flush_interval,
            compression=compression,
        )
    except ValueError as e:
        raise _fail(e) from e
    raise typer.Exit(run(options))


def _write_remote(
    url: str,
    output: str,
    token: str | None,
    tls_root_cert: Path | None,
    layout: str,
    compression: str | None,
    flush_interval: float,
) -> int:
    import threading

    from .remote import relay

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # (from a thread: the handler runs in the main thread, which may hold stop's lock
        # inside stop.wait(); setting it there could deadlock)
        signal.signal(sig, lambda *_: threading.Thread(target=stop.set, daemon=True).start())
    try:
        stats = relay(
            url,
            output,
            token=token,
            tls_root_certs=tls_root_cert,
            layout=layout,
            compression=compression,
            flush_interval=flush_interval,
            stop=stop,
            on_ready=lambda: print("ready", flush=True),
        )
    except (RustDaqError, OSError, ValueError) as e:
        raise _fail(e) from e
    for name, st in stats.items():
        console.print(
            f"{escape(name)}: {st['records']:,} records, {st['rows']:,} rows; lost upstream "
            f"{st.get('lost_records', 0)} records, "
            f"{'an unknown number of' if st.get('lost_rows', 0) is None else st.get('lost_rows', 0)} rows"
        )
    return 0


@app.command()
def publish(
    ring: Annotated[str, typer.Option(help="ring path (a bare name lives in /dev/shm)")],
    nats_url: Annotated[
        str, typer.Option("--nats", help="JetStream server(s): nats://host:4222[,nats://host2:4222]")
    ],
    prefix: Annotated[str, typer.Option(help="subject prefix: subjects are PREFIX.HOST.STREAM")] = "rdaq",
    host_name: Annotated[
        str | None, typer.Option(help="this host's name in the subjects (default: the machine's)")
    ] = None,
    replicas: Annotated[
        int, typer.Option(help="replicas of the stream it creates (a cluster: 3)", min=1)
    ] = 1,
    start: Annotated[
        str, typer.Option(help="with no stored position: oldest (what the ring holds) or latest")
    ] = "oldest",
) -> None:
    """Publish every record of a ring to NATS JetStream, durably (SIGINT/SIGTERM: what was
    sent is acknowledged, the position stored, exit 0). Credentials come from the
    environment (RUST_DAQ_NATS_USER/_PASSWORD, _TOKEN, _CREDS, _TLS_CA/_CERT/_KEY), never
    from the command line."""
    import asyncio

    from .nats.publisher import Publisher

    if start not in ("oldest", "latest"):
        raise _fail(RustDaqError(f"--start must be oldest or latest, got {start!r}"))
    try:
        publisher = Publisher(
            ring,
            nats_url,
            prefix=prefix,
            host=host_name,
            replicas=replicas,
            start=start,  # type: ignore[arg-type]
            on_ready=lambda: print("ready", flush=True),
        )
    except (RustDaqError, OSError, ValueError) as e:
        raise _fail(e) from e

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await publisher.run(stop)

    try:
        asyncio.run(main())
    except (RustDaqError, OSError, ValueError) as e:
        raise _fail(e) from e
    except Exception as e:  # nats-py's own errors: said, not a traceback
        if not type(e).__module__.startswith("nats"):
            raise
        raise _fail(RustDaqError(f"JetStream failed the publisher: {type(e).__name__}: {e}")) from e
    st = publisher.stats
    console.print(
        f"published {st.records:,} records ({st.bytes / 1e6:,.1f} MB, {st.objects} through the object "
        f"store); {st.lost_records} lost in the ring before publishing; {st.outages} outage(s)"
    )


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="an HDF5 file or a ring")]) -> None:
    """An HDF5 file's tree (shapes, dtypes, units, rows), or a ring's live state."""
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError:
        magic = b""
        path = Path(resolve_ring_path(str(path)))
    try:
        if magic == b"\x89HDF\r\n\x1a\n":
            print_h5(out, path)
        else:
            print_ring(out, str(path))
    except (RustDaqError, OSError) as e:
        raise _fail(e) from e


@app.command()
def tail(
    ring_path: Annotated[
        str, typer.Argument(metavar="RING", help="ring path or bare name, or a daemon's grpc://host:port")
    ],
    stream: Annotated[str | None, typer.Option(help="only this stream")] = None,
    once: Annotated[bool, typer.Option(help="print the latest values once and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between updates", min=0.05)] = 0.5,
    token: Annotated[
        str | None, typer.Option(envvar="RUST_DAQ_TOKEN", help="a daemon's token (grpc://)")
    ] = None,
    tls_root_cert: Annotated[
        Path | None, typer.Option(help="certificate (PEM) to trust for grpc+tls")
    ] = None,
) -> None:
    """The latest values of a running acquisition, on this machine or a daemon's, updating in
    place (Ctrl-C to quit)."""
    source: TailSource
    try:
        if ring_path.startswith("grpc"):
            from .remote import connect

            source = RemoteTail(connect(ring_path, token=token, tls_root_certs=tls_root_cert))
        else:
            source = RingTail(RingBuffer.open(resolve_ring_path(ring_path)))
    except (RustDaqError, OSError, ValueError) as e:
        raise _fail(e) from e
    try:
        schemas = source.streams()
        if stream and stream not in schemas:
            raise _fail(
                RustDaqError(f"unknown stream {stream!r}; the streams: {', '.join(schemas) or 'none'}")
            )
        if once:
            out.print(latest_table(source, stream))
            return
        try:
            with Live(latest_table(source, stream), console=out, refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    live.update(latest_table(source, stream))
        except KeyboardInterrupt:
            pass
        except RustDaqError as e:
            raise _fail(e) from e
    finally:
        source.close()


@app.command()
def daemon(
    config: Annotated[
        Path | None,
        typer.Argument(
            help="run configuration (TOML); one without instruments only receives (do_put); "
            "none: the demo's simulated instruments"
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="address to listen on (beyond loopback needs a token)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: any free port)", min=0, max=65535)] = 8815,
    token: Annotated[
        str | None, typer.Option(envvar="RUST_DAQ_TOKEN", help="clients must send it (Bearer token)")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM): serve grpc+tls")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM) of --tls-cert")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="directory of the recordings clients start (start_recording names a file in it); "
            "default: the config's [daemon] data_dir, else the working directory"
        ),
    ] = None,
) -> None:
    """Runs the acquisition (and the writer, if the config records) headless, serving its
    streams, remote instruments and control over Arrow Flight. Prints the URL to listen on
    when ready; SIGTERM/SIGINT: stop, final flush, exit 0. Without a token, it makes one
    for its own user's local clients (a file only they can read). See docs/distributed.md."""
    import logging

    from .daemon import Daemon

    if (tls_cert is None) != (tls_key is None):
        raise _fail(RustDaqError("TLS needs both --tls-cert and --tls-key"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if config is not None:
            from .config import load_config

            s = load_config(config, need_instruments=False)
        else:
            s = Session(
                instruments=[SimulatedVoltmeter(rate_hz=100.0), SimulatedCamera(fps=10.0)],
                ring_path=resolve_ring_path(default_ring_name("daemon")),
                capacity_mb=64,
                output=None,
                flush_interval=0.5,
                own_ring=True,
            )
        if s.output is not None and os.path.exists(s.output):
            raise RustDaqError(f"{s.output} already exists; choose another output file (or delete it)")
        d = Daemon(
            s,
            host=host,
            port=port,
            token=token,
            tls=(tls_cert, tls_key) if tls_cert and tls_key else None,
            own_ring=None,  # the session's: removed if it owns it and the daemon creates it
            data_dir=data_dir if data_dir is not None else s.data_dir,
        )
    except (RustDaqError, OSError, ValueError) as e:
        raise _fail(e) from e

    def ready(d: Daemon) -> None:
        print(f"listening on {d.url}", flush=True)

    stats = d.run(on_ready=ready)
    console.print(
        f"daemon stopped by {stats['stopped_by']} after {stats['elapsed_s']:.1f} s: "
        + ", ".join(f"{name} {st['rows']:,} rows" for name, st in stats["streams"].items())
    )
    if "recording_failed" in stats:  # the file does not hold what the run acquired: say so
        console.print(f"[red]RECORDING FAILED: {escape(stats['recording_failed'])}[/red]")
        raise typer.Exit(1)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"rust-daq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version")
    ] = False,
) -> None:
    pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
