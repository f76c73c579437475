"""The Python client of a rust-daq daemon: :func:`connect` returns a :class:`RemoteDaq`. It
lives in :mod:`rust_daq.flight.client`; this module is its public import path."""

from .flight.client import RemoteBatch, RemoteDaq, RemoteError, RemotePut, RemoteReader, connect, relay

__all__ = ["RemoteBatch", "RemoteDaq", "RemoteError", "RemotePut", "RemoteReader", "connect", "relay"]
