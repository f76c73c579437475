"""The ``rust-daq`` command: run acquisitions, write, inspect and follow rings and files."""

from __future__ import annotations

import math
import os
import secrets
import signal
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import anyio
import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from . import __version__
from ._access import control_char
from ._errors import ConfigError, RustDaqError
from ._ring import RingBuffer, resolve_ring_path
from ._supervisor import WriterSupervisor, check_writer_options, file_progress
from .acquisition import Acquisition
from .adapters import Instrument, ScpiInstrument, SimulatedCamera, SimulatedVoltmeter

if TYPE_CHECKING:
    from .remote import RemoteDaq

app = typer.Typer(
    name="rust-daq",
    help="rust-daq: a lossless data plane for laboratory acquisition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


# -- configuration ----------------------------------------------------------------------------

_INSTRUMENT_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "voltmeter": {
        "name": str,
        "rate_hz": (int, float),
        "amplitude": (int, float),
        "frequency_hz": (int, float),
        "noise": (int, float),
        "seed": int,
    },
    "camera": {"name": str, "fps": (int, float), "shape": list, "seed": int},
    "scpi": {
        "name": str,
        "resource": str,
        "query": str,
        "column": str,
        "units": str,
        "rate_hz": (int, float),
        "backend": str,
    },
}
_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "ring": {"path": str, "capacity_mb": (int, float), "policy": str, "keep": bool},
    "writer": {
        "output": str,
        "layout": str,
        "compression": str,
        "flush_interval": (int, float),
        "enabled": bool,
    },
    "daemon": {"data_dir": str},
}
_TOP: dict[str, type | tuple[type, ...]] = {
    "duration": (int, float),
    "ring": dict,
    "writer": dict,
    "daemon": dict,
    "metadata": dict,
    "instruments": list,
}


@dataclass
class Session:
    """What to run: from a config file, or the demo's built-in one."""

    instruments: list[Instrument]
    ring_path: str
    capacity_mb: float = 256
    policy: str = "overwrite"
    output: str | None = "experiment_data.h5"
    layout: str = "append"
    compression: str | None = None
    flush_interval: float = 1.0
    duration: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Remove the ring at the end, if this run created it (everything but ``[ring] keep = true``).
    own_ring: bool = False
    #: ``[daemon] data_dir``: where the daemon creates recordings asked for over the wire.
    data_dir: str | None = None


def default_ring_name(kind: str) -> str:
    """A ring name for one process: ``rust-daq-<kind>-<pid>-<random>``. Not predictable, so
    that nobody can plant a file at the path before the run creates it."""
    return f"rust-daq-{kind}{'-' if kind else ''}{os.getpid()}-{secrets.token_hex(4)}"


def _check(where: str, table: dict[str, Any], allowed: dict[str, type | tuple[type, ...]]) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")
        kind = allowed[key]
        if (
            isinstance(value, bool)
            and kind is not bool
            and bool not in (kind if isinstance(kind, tuple) else (kind,))
        ):
            raise ConfigError(f"{where}: {key} must be {_kind(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"{where}: {key} must be {_kind(kind)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf
            raise ConfigError(f"{where}: {key} must be a finite number, got {value}")


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {
            "int": "an integer",
            "float": "a number",
            "str": "a string",
            "list": "a list",
            "bool": "true/false",
            "dict": "a table",
        }[k.__name__]
        for k in kinds
    )


def load_config(path: Path, *, need_instruments: bool = True) -> Session:
    """Parses and validates a run configuration (TOML); see ``rust-daq run --help``. A
    daemon's config may have no instruments (``need_instruments=False``): it then only
    receives remote instruments' batches (Flight ``do_put``)."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    _check(str(path), raw, _TOP)
    for section, allowed in _SECTIONS.items():
        _check(f"{path} [{section}]", raw.get(section, {}), allowed)
    ring, writer = raw.get("ring", {}), raw.get("writer", {})
    if ring.get("policy", "overwrite") not in ("overwrite", "block"):
        raise ConfigError(f"{path} [ring]: policy must be 'overwrite' or 'block', got {ring['policy']!r}")
    capacity_mb = ring.get("capacity_mb", 256)
    if not capacity_mb > 0:
        raise ConfigError(f"{path} [ring]: capacity_mb must be a positive number of MiB, got {capacity_mb}")
    if ring.get("keep") and "path" not in ring:
        raise ConfigError(
            f"{path} [ring]: keep = true needs a path (a ring kept under a random name cannot be found)"
        )
    try:
        check_writer_options(
            layout=writer.get("layout", "append"),
            compression=writer.get("compression"),
            flush_interval=writer.get("flush_interval", 1.0),
        )
    except ValueError as e:
        raise ConfigError(f"{path} [writer]: {e}") from None
    if not raw.get("instruments") and need_instruments:
        raise ConfigError(
            f"{path}: no [[instruments]]; add at least one (type = {', '.join(_INSTRUMENT_KEYS)})"
        )
    instruments: list[Instrument] = []
    for i, spec in enumerate(raw.get("instruments", [])):
        where = f"{path} [[instruments]] #{i + 1}"
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{where}: needs a type ({', '.join(_INSTRUMENT_KEYS)})")
        kind = spec.pop("type")
        if kind not in _INSTRUMENT_KEYS:
            raise ConfigError(
                f"{where}: unknown instrument type {kind!r}; allowed: {', '.join(_INSTRUMENT_KEYS)}"
            )
        _check(where, spec, _INSTRUMENT_KEYS[kind])
        if "name" in spec:
            _check_name(where, spec["name"])
        if kind == "camera" and "shape" in spec:
            _check_shape(where, spec["shape"], capacity_mb)
        for rate_key in ("rate_hz", "fps"):
            if rate_key in spec and not 0 < spec[rate_key] <= 100_000:
                raise ConfigError(f"{where}: {rate_key} must be between 0 and 100000, got {spec[rate_key]}")
        try:
            if kind == "voltmeter":
                instruments.append(SimulatedVoltmeter(**spec))
            elif kind == "camera":
                if "shape" in spec:
                    spec["shape"] = tuple(spec["shape"])
                instruments.append(SimulatedCamera(**spec))
            else:
                if "resource" not in spec:
                    raise ConfigError(
                        f"{where}: an scpi instrument needs a resource (a VISA resource string)"
                    )
                instruments.append(ScpiInstrument(spec.pop("resource"), **spec))
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: {e}") from e
    names = [inst.name for inst in instruments]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: instrument names must be unique (they name the streams): {names}")
    duration = raw.get("duration")
    if duration is not None and not duration > 0:
        raise ConfigError(
            f"{path}: duration must be a positive number of seconds (omit it to run until Ctrl-C), got {duration}"
        )
    return Session(
        instruments=instruments,
        ring_path=resolve_ring_path(ring.get("path") or default_ring_name("")),
        capacity_mb=capacity_mb,
        policy=ring.get("policy", "overwrite"),
        output=writer.get("output", "experiment_data.h5") if writer.get("enabled", True) else None,
        layout=writer.get("layout", "append"),
        compression=writer.get("compression"),
        flush_interval=float(writer.get("flush_interval", 1.0)),
        duration=duration,
        metadata=raw.get("metadata", {}),
        own_ring=not ring.get("keep", False),
        data_dir=raw.get("daemon", {}).get("data_dir"),
    )


def _check_name(where: str, name: str) -> None:
    """An instrument's name names its stream: it must be a name at all. (The writer maps any
    other name to a valid HDF5 name.)"""
    if not name.strip():
        raise ConfigError(f"{where}: name must be a non-empty string (it names the stream), got {name!r}")
    bad = control_char(name)
    if bad is not None:
        raise ConfigError(
            f"{where}: name {name!r} contains the control or unassigned character {bad!r}; "
            "use printable characters"
        )


def _check_shape(where: str, shape: list[Any], capacity_mb: float) -> None:
    """A camera's frame: two positive integers, a frame (uint16) that fits in a ring record."""
    if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ConfigError(f"{where}: shape must be [height, width], two positive integers, got {shape!r}")
    frame = shape[0] * shape[1] * 2
    room = int(capacity_mb * (1 << 20)) - (64 << 10)
    if frame > room:
        raise ConfigError(
            f"{where}: shape {shape!r} makes frames of {frame / 1e6:,.1f} MB, more than a record of "
            f"the ring ([ring] capacity_mb = {capacity_mb:g}) holds ({max(room, 0) / 1e6:,.1f} MB); "
            "use a smaller shape or a larger capacity_mb"
        )


# -- running ----------------------------------------------------------------------------------


def run_session(s: Session, show_progress: bool) -> dict[str, Any]:
    """Ring, supervised writer process, acquisition until the duration, SIGINT/SIGTERM or a
    writer that cannot be kept alive; final flush; the ring removed unless kept. The stats
    say what the file holds (``file``), the writer's fate (``writer``) and what the ring
    still held at the end (``ring_left``)."""
    if s.output is not None and os.path.exists(s.output):
        raise RustDaqError(f"{s.output} already exists; choose another output file (or delete it)")
    # Plain handlers for the whole run, not an event-loop signal receiver: a second Ctrl-C
    # (during the final flush, or 1 ms after the first) is noted, never a KeyboardInterrupt
    # through the shutdown (no summary, coroutines never awaited).
    stopped_by: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopped_by.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_in_ring(s, show_progress, stopped_by)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_in_ring(s: Session, show_progress: bool, stopped_by: list[str]) -> dict[str, Any]:
    created = not os.path.exists(s.ring_path)
    ring = RingBuffer.create(s.ring_path, capacity_mb=s.capacity_mb, policy=s.policy)  # type: ignore[arg-type]
    sup: WriterSupervisor | None = None
    stats: dict[str, Any] = {}
    try:
        if s.output is not None:
            sup = WriterSupervisor(
                s.ring_path,
                s.output,
                layout=s.layout,
                flush_interval=s.flush_interval,
                compression=s.compression,
                metadata=s.metadata,
                remove_ring_if_orphaned=created and s.own_ring,
                on_event=lambda line: console.print(f"[yellow]{escape(line)}[/yellow]", soft_wrap=True),
            )
            sup.start()
        acq = Acquisition(ring, s.instruments)

        async def main() -> None:
            async with acq:
                async with anyio.create_task_group() as tg:

                    async def watch() -> None:
                        # Until cancelled: acq.stop() before acq.run() began would be lost.
                        while True:
                            if stopped_by or (sup is not None and sup.state == "failed"):
                                acq.stop()
                            await anyio.sleep(0.05)

                    tg.start_soon(watch)
                    if show_progress:
                        tg.start_soon(_progress, acq, s, ring, sup)
                    await acq.run(duration=s.duration)
                    tg.cancel_scope.cancel()

        anyio.run(main)
        stats = acq.stats()
        writer_failed = sup is not None and sup.state == "failed"
        stats["stopped_by"] = (
            stopped_by[0]
            if stopped_by
            else "writer failure"
            if writer_failed
            else ("duration" if s.duration else "end")
        )
    finally:
        try:
            if sup is not None:
                sup.stop()  # the final flush (a dead writer is started once more for it)
                stats["writer"] = {"state": sup.state, "restarts": sup.restarts, "reason": sup.reason}
            if not ring.closed:
                rs = ring.status()
                stats["ring_left"] = {
                    "path": ring.path,
                    "records": rs["records_written"] - rs["read_tail_seq"],
                }
        finally:
            ring.close()
            # A ring holding records the given-up writer never committed is the only copy of
            # them: keep it (the summary says how to write them), whatever own_ring says.
            unwritten = stats.get("writer", {}).get("state") == "failed" and stats.get("ring_left", {}).get(
                "records", 0
            )
            removed = created and s.own_ring and not unwritten
            if removed:
                _unlink(s.ring_path)
            if "ring_left" in stats:
                stats["ring_left"]["removed"] = removed
    stats["output"] = s.output
    stats["file"] = file_progress(s.output) if s.output and os.path.exists(s.output) else None
    stats["file_bytes"] = os.path.getsize(s.output) if s.output and os.path.exists(s.output) else 0
    return stats


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def _progress(acq: Acquisition, s: Session, ring: RingBuffer, sup: WriterSupervisor | None) -> None:
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
    for col in (*columns, "records", "MB", "missed deadlines", "jitter p99 (µs)"):
        table.add_column(col, justify="right" if col != "stream" else "left")
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
        )
    out.print(table)
    lat = stats["write_latency_us"]
    out.print(
        f"ring write latency: p50 {lat['p50']:.1f} µs, p99 {lat['p99']:.1f} µs, p99.9 {lat['p99.9']:.1f} µs; records lost: {stats['records_lost']}"
    )
    if not stats.get("output"):
        return True
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
    return True


def _fail(e: BaseException) -> typer.Exit:
    # Escaped (messages name TOML sections like [ring]) and unwrapped (tests and logs grep them).
    console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
    return typer.Exit(2)


# -- commands ---------------------------------------------------------------------------------


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="seconds to acquire", min=0.1)] = 10.0,
    output: Annotated[Path, typer.Option(help="HDF5 file to write")] = Path("experiment_data.h5"),
    rate: Annotated[float, typer.Option(help="voltmeter readings per second", min=0.1, max=100_000)] = 100.0,
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
    )
    try:
        stats = run_session(s, progress)
    except (RustDaqError, OSError) as e:
        raise _fail(e) from e
    if not _summary(stats):
        raise typer.Exit(1)


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
    try:
        s = load_config(config)
        stats = run_session(s, progress)
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
        typer.Option("--from", help="a daemon's URL (grpc://host:port): write its streams here"),
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
    from .hdf5.process import main as writer_main

    if (ring is None) == (from_url is None):
        raise _fail(RustDaqError("give exactly one of --ring (a local ring) and --from (a daemon's URL)"))
    if from_url is not None:
        raise typer.Exit(
            _write_remote(from_url, str(output), token, tls_root_cert, layout, compression, flush_interval)
        )
    assert ring is not None

    argv = [
        "--ring",
        ring,
        "--output",
        str(output),
        "--layout",
        layout,
        "--flush-interval",
        str(flush_interval),
    ]
    if compression:
        argv += ["--compression", compression]
    raise typer.Exit(writer_main(argv))


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
        signal.signal(sig, lambda *_: stop.set())
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
            _inspect_h5(path)
        else:
            _inspect_ring(str(path))
    except (RustDaqError, OSError) as e:
        raise _fail(e) from e


def _inspect_h5(path: Path) -> None:
    import h5py

    tree = Tree(f"[bold]{escape(str(path))}[/bold]")

    def add(node: Tree, group: h5py.Group) -> None:
        for key, obj in group.items():
            if isinstance(obj, h5py.Group):
                kind = obj.attrs.get("NX_class", "")
                add(node.add(f"[bold blue]{escape(key)}/[/bold blue] {escape(str(kind))}"), obj)
            else:
                units = obj.attrs.get("units")
                rows = obj.shape[0] if obj.shape else 1
                label = (
                    f"{key}  {obj.shape} {obj.dtype}" + (f" [{units}]" if units else "") + f"  rows={rows}"
                )
                node.add(escape(label))

    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        add(tree, f)
    out.print(tree)


def _inspect_ring(path: str) -> None:
    with RingBuffer.open(path) as ring:
        st = ring.status()
        table = Table(title=escape(f"ring {path}"))
        table.add_column("field")
        table.add_column("value", justify="right")
        for key in (
            "capacity",
            "policy",
            "records_written",
            "records_lost",
            "write_head",
            "read_tail",
            "oldest_position",
            "producer_pid",
            "producer_alive",
        ):
            table.add_row(key, str(st[key]))
        out.print(table)
        for name, schema in ring.streams().items():
            out.print(f"[bold]stream {escape(name)}[/bold]")
            for f in schema:
                units = (f.metadata or {}).get(b"units", b"").decode()
                out.print(
                    escape(f"    {f.name}: {f.type}" + (f" [{units}]" if units else "")), soft_wrap=True
                )


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
    source: _TailSource
    try:
        if ring_path.startswith("grpc"):
            from .remote import connect

            source = _RemoteTail(connect(ring_path, token=token, tls_root_certs=tls_root_cert))
        else:
            source = _RingTail(RingBuffer.open(resolve_ring_path(ring_path)))
    except (RustDaqError, OSError, ValueError) as e:
        raise _fail(e) from e
    try:
        schemas = source.streams()
        if stream and stream not in schemas:
            raise _fail(
                RustDaqError(f"unknown stream {stream!r}; the streams: {', '.join(schemas) or 'none'}")
            )

        def render() -> Table:
            table = Table(title=escape(source.title()))
            for col in ("stream", "column", "latest", "units"):
                table.add_column(col)
            schemas = source.streams()
            for name in [stream] if stream else list(schemas):
                latest = source.latest(name)
                for f in schemas[name]:
                    values = latest.get(f.name)
                    if values is None or len(values) == 0:
                        shown = "-"
                    elif values.ndim > 1:
                        shown = f"{values.shape[1:]} frame, mean {values[-1].mean():.1f}"
                    else:
                        shown = str(values[-1])
                    table.add_row(name, f.name, shown, (f.metadata or {}).get(b"units", b"").decode())
            return table

        if once:
            out.print(render())
            return
        try:
            with Live(render(), console=out, refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    live.update(render())
        except KeyboardInterrupt:
            pass
        except RustDaqError as e:
            raise _fail(e) from e
    finally:
        source.close()


class _TailSource(Protocol):
    """What `tail` shows: a local ring (_RingTail) or a daemon's (_RemoteTail)."""

    def title(self) -> str: ...
    def streams(self) -> dict[str, Any]: ...
    def latest(self, name: str) -> dict[str, Any]: ...
    def close(self) -> None: ...


class _RingTail:
    def __init__(self, ring: RingBuffer) -> None:
        self.ring = ring

    def title(self) -> str:
        return f"{self.ring.path}  records {self.ring.records_written:,}  lost {self.ring.records_lost}"

    def streams(self) -> dict[str, Any]:
        return self.ring.streams()

    def latest(self, name: str) -> dict[str, Any]:
        return self.ring.latest(name, rows=1)

    def close(self) -> None:
        self.ring.close()


class _RemoteTail:
    def __init__(self, daq: RemoteDaq) -> None:
        self.daq = daq

    def title(self) -> str:
        ring = self.daq.status()["ring"]
        return f"{self.daq.url}  records {ring['records_written']:,}  lost {ring['records_lost']}"

    def streams(self) -> dict[str, Any]:
        return dict(self.daq.streams())

    def latest(self, name: str) -> dict[str, Any]:
        return dict(self.daq.latest(name, rows=1))

    def close(self) -> None:
        self.daq.close()


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
            own_ring=s.own_ring and not os.path.exists(s.ring_path),
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
