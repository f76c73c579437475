"""The structure docs/architecture.md describes, checked: which module may import which,
where exceptions live, and how long a module may grow without saying why.

Each rule here was broken once (issue 16): `_arrow` and `_ring` called each other, the
Flight client imported the server for its tickets, errors were defined in five modules."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import rust_daq

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "rust_daq"
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The rust_daq modules `path` imports at run time (imports under TYPE_CHECKING excluded)."""
    tree = ast.parse(path.read_text())
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            out.update(n for n in names if n.startswith("rust_daq"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("rust_daq"))
    return out


def _depends_on(path: Path, module: str) -> bool:
    return any(i == module or i.startswith(module + ".") for i in _imports(path))


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        # The write side and Arrow helpers sit on the native core only.
        (
            "_arrow.py",
            ["rust_daq._ring", "rust_daq._records", "rust_daq._live", "rust_daq.hdf5", "rust_daq.flight"],
        ),
        # The read path knows nothing of its consumers.
        ("_records.py", ["rust_daq._ring", "rust_daq._live", "rust_daq.hdf5", "rust_daq.flight"]),
        # Live views sit above the ring API, not inside it.
        ("_ring.py", ["rust_daq._live", "rust_daq.hdf5", "rust_daq.flight"]),
        # The client speaks the protocol, it does not borrow the server's code.
        ("flight/client.py", ["rust_daq.flight.server", "rust_daq.flight.subscription"]),
        ("flight/subscriber.py", ["rust_daq.flight.server", "rust_daq.flight.subscription"]),
        # A subscription is served without the service around it, and knows no client.
        (
            "flight/subscription.py",
            ["rust_daq.flight.server", "rust_daq.flight.client", "rust_daq.flight.subscriber"],
        ),
        # The HDF5 writer knows no transport: JetStream reaches it as a RecordSource.
        ("hdf5/writer.py", ["rust_daq.nats", "rust_daq.flight"]),
        # JetStream's consumers speak its protocol; none borrows the publisher's code.
        ("nats/source.py", ["rust_daq.nats.publisher", "rust_daq.nats.reader"]),
        ("nats/reader.py", ["rust_daq.nats.publisher", "rust_daq.nats.source"]),
    ],
)
def test_layering(module: str, forbidden: list[str]) -> None:
    path = PACKAGE / module
    bad = [f for f in forbidden if _depends_on(path, f)]
    assert not bad, f"{module} imports {bad}"


def test_h5py_and_flight_stay_in_their_subpackages() -> None:
    """h5py is imported only under rust_daq/hdf5/ (and by the CLI's `inspect`), pyarrow.flight
    only under rust_daq/flight/, nats-py only under rust_daq/nats/: a user of the ring pays for
    none of them."""
    for path in _modules():
        text = path.read_text()
        rel = path.relative_to(PACKAGE).as_posix()
        if re.search(r"^\s*import h5py", text, re.M):
            assert rel.startswith("hdf5/") or rel in ("cli.py", "_inspect.py"), rel
        if re.search(r"^\s*import pyarrow\.flight", text, re.M):
            assert rel.startswith("flight/"), rel
        if re.search(r"^\s*(import|from) nats\b", text, re.M):
            assert rel.startswith("nats/"), rel


def test_every_exception_is_defined_in_errors_and_exported() -> None:
    defined = []
    for info in pkgutil.walk_packages(rust_daq.__path__, "rust_daq."):
        if info.name in ("rust_daq.writer", "rust_daq.__main__") or info.name.endswith(".__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
                and not name.startswith("_")
            ):
                defined.append(f"{info.name}.{name}")
    outside = [d for d in defined if not d.startswith("rust_daq._errors.")]
    assert not outside, f"exceptions defined outside rust_daq/_errors.py: {outside}"
    from rust_daq import _errors

    missing = [n for n in _errors.__all__ if getattr(rust_daq, n, None) is not getattr(_errors, n)]
    assert not missing, f"not exported from rust_daq: {missing}"
    assert set(_errors.__all__) <= set(rust_daq.__all__)


def _doc(path: Path) -> str:
    if path.suffix == ".py":
        return ast.get_docstring(ast.parse(path.read_text())) or ""
    return "\n".join(line[3:] for line in path.read_text().splitlines() if line.startswith("//!"))


def test_no_module_grows_past_500_lines_without_saying_why() -> None:
    sources = _modules() + sorted((ROOT / "rust").glob("*/src/**/*.rs"))
    long = {p: len(p.read_text().splitlines()) for p in sources}
    unexplained = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p, n in long.items()
        if n > MAX_LINES and not re.search(r"over 500 lines", _doc(p), re.I)
    ]
    assert not unexplained, f"modules over {MAX_LINES} lines whose docstring does not say why: {unexplained}"
