"""Arrow Flight: the protocol both sides share (:mod:`.protocol`), the daemon's server
(:mod:`.server`), the client (:mod:`.client`, public as :mod:`rust_daq.remote`) and the
remote writer (:mod:`.relay`). Everything pyarrow.flight-dependent lives here. The server is
imported only when asked for, so that a client does not load the daemon's side."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .protocol import ACTIONS, Ticket, parse_ticket, ticket

if TYPE_CHECKING:
    from .server import DaqFlightServer

__all__ = ["ACTIONS", "DaqFlightServer", "Ticket", "parse_ticket", "ticket"]


def __getattr__(name: str) -> Any:
    if name == "DaqFlightServer":
        from .server import DaqFlightServer

        return DaqFlightServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
