"""rust-daq on NATS JetStream: the durable path between machines. :mod:`.publisher` sends a
ring's records to a JetStream stream (``rust-daq publish``), :mod:`.source` is the HDF5
writer's input from it (``rust-daq write --from nats://...``), :mod:`.reader` the live
readers (:func:`connect`); :mod:`.protocol` is what goes on the wire, :mod:`.connection`
URLs, credentials and errors. nats-py is imported only here (``pip install 'rust-daq[nats]'``)."""

from __future__ import annotations

from .connection import Credentials, parse_url
from .protocol import DEFAULT_PREFIX
from .reader import JetStreamBatch, JetStreamDaq, JetStreamReader, connect

__all__ = [
    "DEFAULT_PREFIX",
    "Credentials",
    "JetStreamBatch",
    "JetStreamDaq",
    "JetStreamReader",
    "connect",
    "parse_url",
]
