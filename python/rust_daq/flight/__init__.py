"""Arrow Flight: the daemon's server (:mod:`.server`) and the client (:mod:`.client`, public as
:mod:`rust_daq.remote`). Everything pyarrow.flight-dependent lives here."""

from .server import DaqFlightServer, Ticket, parse_ticket, ticket

__all__ = ["DaqFlightServer", "Ticket", "parse_ticket", "ticket"]
