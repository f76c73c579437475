"""The Python client of a rust-daq daemon: :func:`connect` returns a :class:`RemoteDaq`. It
lives in :mod:`rust_daq.flight.client` (and :func:`relay` in :mod:`rust_daq.flight.relay`);
this module is their public import path."""

from .flight.client import RemoteBatch, RemoteDaq, RemoteError, RemotePut, RemoteReader, connect
from .flight.relay import relay

__all__ = ["RemoteBatch", "RemoteDaq", "RemoteError", "RemotePut", "RemoteReader", "connect", "relay"]
