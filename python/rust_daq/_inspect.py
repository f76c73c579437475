"""What ``rust-daq inspect`` and ``rust-daq tail`` show: an HDF5 file's tree, a ring's state,
the latest values of a ring's or a daemon's streams."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from ._ring import RingBuffer

if TYPE_CHECKING:
    from .remote import RemoteDaq

__all__ = ["RemoteTail", "RingTail", "TailSource", "latest_table", "print_h5", "print_ring"]


def print_h5(out: Console, path: Path) -> None:
    """An HDF5 file's tree: groups (NX_class), datasets (shape, dtype, units, rows)."""
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


def print_ring(out: Console, path: str) -> None:
    """A ring's live state (its header's fields) and its streams' schemas."""
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


class TailSource(Protocol):
    """What `tail` shows: a local ring (RingTail) or a daemon's (RemoteTail)."""

    def title(self) -> str: ...
    def streams(self) -> dict[str, Any]: ...
    def latest(self, name: str) -> dict[str, Any]: ...
    def close(self) -> None: ...


class RingTail:
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


class RemoteTail:
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


def latest_table(source: TailSource, stream: str | None) -> Table:
    """The latest value of every column of `stream` (None: of every stream)."""
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
