"""A rust-daq daemon on another machine, through Arrow Flight: live streams with the reader
API, the latest rows, remote instruments, and control. ::

    import rust_daq.remote
    daq = rust_daq.remote.connect("grpc://daq-host:8815", token="...")
    daq.streams()                                   # {name: pyarrow.Schema}
    with daq.reader() as reader:                    # every stream, from now on
        for stream, batch in reader.read_batches(timeout=1.0):
            ...
    daq.latest("voltmeter", rows=1000)              # {column: numpy array}
    daq.start_recording("run.h5"); daq.stop_recording()   # a file in the daemon's data_dir

What goes over the wire is :mod:`.protocol`'s; the client tells the daemon's errors apart by
their code, never by their message. The remote HDF5 writer built on it is :mod:`.relay`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from .._access import local_token
from .._arrow import _to_numpy
from .._errors import RemoteError, RustDaqError, UnknownStreamError
from . import protocol
from .protocol import error_info, ticket
from .subscriber import RemoteBatch, RemoteReader, remote_error

__all__ = ["RemoteBatch", "RemoteDaq", "RemoteError", "RemotePut", "RemoteReader", "connect"]

log = logging.getLogger("rust_daq.remote")


def connect(
    url: str,
    *,
    token: str | None = None,
    tls_root_certs: bytes | str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> RemoteDaq:
    """A client of the daemon at `url` (``grpc://host:port``, ``grpc+tls://host:port``).
    ``token``: the daemon's token (default: the RUST_DAQ_TOKEN environment variable, else,
    for a daemon on this machine's loopback, the token file its daemon wrote for this user:
    see :mod:`rust_daq._access`; ``""``: send none); ``tls_root_certs``: PEM bytes or a file of the certificates to trust (a self-signed
    daemon's own certificate). Raises RemoteError if the daemon does not answer within
    `timeout` seconds or refuses the token."""
    return RemoteDaq(url, token=token, tls_root_certs=tls_root_certs, timeout=timeout)


class RemoteDaq:
    """A connection to a daemon; see :func:`connect`."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        tls_root_certs: bytes | str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not url.startswith(("grpc://", "grpc+tcp://", "grpc+tls://")):
            raise ValueError(f"a daemon URL looks like grpc://host:port or grpc+tls://host:port, got {url!r}")
        certs = tls_root_certs
        if certs is not None and not isinstance(certs, bytes):
            certs = Path(certs).read_bytes()
        if token is None:
            token = os.environ.get("RUST_DAQ_TOKEN") or local_token(url)
        self.url = url
        self._headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._timeout = timeout
        kwargs: dict[str, Any] = {"tls_root_certs": certs} if certs is not None else {}
        self._client = fl.connect(url, **kwargs)
        try:
            self.streams()  # fails now, with a clear message, if the daemon is not there
        except BaseException:
            self._client.close()
            raise

    def options(self, timeout: float | None = None) -> fl.FlightCallOptions:
        """Call options with the token; `timeout` None: no deadline (streams)."""
        return fl.FlightCallOptions(headers=self._headers, timeout=timeout)

    # -- discovery and control ------------------------------------------------------------------

    def streams(self) -> dict[str, pa.Schema]:
        """Every stream of the daemon and its schema."""
        try:
            return {
                f.descriptor.path[0].decode(): f.schema
                for f in self._client.list_flights(options=self.options(self._timeout))
            }
        except fl.FlightError as e:
            raise remote_error(e, f"listing the streams of {self.url}") from None

    def action(self, kind: str, body: dict[str, Any] | None = None) -> Any:
        """Runs a ``do_action`` (see :data:`rust_daq.flight.ACTIONS`); its JSON result."""
        try:
            results = list(self._client.do_action(protocol.action(kind, body), options=self.options(120)))
        except fl.FlightError as e:
            raise remote_error(e, kind) from None
        return protocol.read_action_result(results)

    def status(self) -> dict[str, Any]:
        """Streams (rows, records, rows/s), ring (fill, records written and lost), writer
        (recording, file, lag), subscribers."""
        result: dict[str, Any] = self.action(protocol.STATUS)
        return result

    def list_streams(self) -> dict[str, dict[str, str]]:
        """Every stream with its columns (name: Arrow type)."""
        result: dict[str, dict[str, str]] = self.action(protocol.LIST_STREAMS)
        return result

    def start_recording(
        self,
        file: str,
        *,
        layout: str = "append",
        compression: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Starts the daemon's HDF5 writer into `file`: a file name (.h5, .hdf5, .nxs, no
        directories), created in the daemon's data directory; the result names its path."""
        body = protocol.start_recording_body(file, layout=layout, compression=compression, metadata=metadata)
        result: dict[str, Any] = self.action(protocol.START_RECORDING, body)
        return result

    def stop_recording(self) -> dict[str, Any]:
        """Stops the writer after its final flush; what the file holds (records, rows, lost)."""
        result: dict[str, Any] = self.action(protocol.STOP_RECORDING)
        return result

    # -- data ----------------------------------------------------------------------------------

    def reader(
        self,
        streams: list[str] | str | None = None,
        start: str = "latest",
        *,
        max_buffered: int = 1024,
        max_buffered_bytes: int = 64 << 20,
        coalesce_ms: float | None = 0.0,
    ) -> RemoteReader:
        """A live subscription to `streams` (None: all, including streams that appear later),
        from the ``"latest"`` record or the ``"oldest"`` still in the daemon's ring.
        `coalesce_ms`: the daemon sends the records that piled up together, and with more
        than 0 also holds records back that long to send them with those that follow (fewer
        messages for many subscribers of fast streams: see ``Ticket``); they are read here
        one record at a time, with their own sequence numbers, either way. None: each record
        a message of its own (as clients that do not know ``coalesce_ms`` get them)."""
        return RemoteReader(
            self,
            streams,
            start,
            max_buffered=max_buffered,
            max_buffered_bytes=max_buffered_bytes,
            coalesce_ms=coalesce_ms,
        )

    def latest_table(self, stream: str, rows: int = 1000) -> pa.Table:
        """The latest `rows` rows of `stream` as a table."""
        try:
            return self._client.do_get(
                ticket(stream, last_rows=rows), options=self.options(self._timeout)
            ).read_all()
        except fl.FlightError as e:
            raise _stream_error(e, stream, f"latest rows of {stream!r}") from None

    def latest(self, stream: str, rows: int = 1000) -> dict[str, np.ndarray[Any, Any]]:
        """The latest `rows` rows of `stream` as numpy arrays (tensor columns as (N, ...)),
        like ``RingBuffer.latest``."""
        table = self.latest_table(stream, rows).combine_chunks()
        return {name: _to_numpy(table.column(name).combine_chunks()) for name in table.schema.names}

    def put(self, stream: str, data: pa.RecordBatch | pa.Table) -> int:
        """Writes `data` into the daemon's ring as `stream` (a remote instrument); returns the
        ring sequence number of the last record."""
        batches = [data] if isinstance(data, pa.RecordBatch) else data.to_batches()
        if not batches:
            return -1
        with self.put_stream(stream, batches[0].schema) as put:
            for b in batches:
                seq = put.write(b)
        return seq

    def put_stream(self, stream: str, schema: pa.Schema) -> RemotePut:
        """An open ``do_put`` for sending many batches of `schema` to `stream`."""
        return RemotePut(self, stream, schema)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteDaq {self.url}>"


def _stream_error(e: BaseException, stream: str, what: str) -> RustDaqError:
    said = error_info(e)
    if said.code == protocol.UNKNOWN_STREAM:
        return UnknownStreamError(said.message)
    return remote_error(e, what)


class RemotePut:
    """An open ``do_put`` to one stream: :meth:`write` each batch, then :meth:`close`."""

    def __init__(self, daq: RemoteDaq, stream: str, schema: pa.Schema) -> None:
        self.stream = stream
        self.schema = schema
        try:
            self._writer, self._acks = daq._client.do_put(
                fl.FlightDescriptor.for_path(stream), schema, options=daq.options()
            )
        except fl.FlightError as e:
            raise remote_error(e, f"do_put to {stream!r}") from None

    def write(self, batch: pa.RecordBatch) -> int:
        """Sends `batch`; returns its sequence number in the daemon's ring once it is there.
        Raises ValueError if its schema is not the one this put was opened with."""
        if not batch.schema.equals(self.schema):
            raise ValueError(
                f"do_put to {self.stream!r} was opened for schema ({self.schema}), got a batch of "
                f"({batch.schema}); open another put_stream for the new schema"
            )
        try:
            self._writer.write_batch(batch)
            ack = self._acks.read()
        except fl.FlightError as e:
            raise remote_error(e, f"do_put to {self.stream!r}") from None
        if ack is None:
            raise RemoteError(f"do_put to {self.stream!r}: the daemon closed the stream")
        return protocol.read_put_ack(ack)

    def close(self) -> None:
        try:
            self._writer.done_writing()
            self._writer.close()
        except fl.FlightError as e:
            raise remote_error(e, f"do_put to {self.stream!r}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
