"""The nats-server fixtures (tests/helpers/nats_servers.py) against real servers, with nats-py:
JetStream round trips, a restart that keeps the file store, a 3-node cluster that loses its stream
leader, authentication, TLS, and the errors nats-py raises when something is wrong (the JetStream
tests rely on these exact types)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from nats_servers import NatsCluster, NatsServer, free_port

pytestmark = pytest.mark.timeout(60)


async def connect(servers: str | list[str], errors: list[Exception] | None = None, **options: Any) -> Client:
    """nats-py with a quick failure: one retry 0.1 s later instead of 60 retries 2 s apart (the
    defaults make a refused or unauthorised connect take two minutes); errors are collected into
    *errors* instead of being logged with a traceback."""

    async def error_cb(e: Exception) -> None:
        if errors is not None:
            errors.append(e)

    options = {"max_reconnect_attempts": 1, "reconnect_time_wait": 0.1, "connect_timeout": 2} | options
    nc = Client()
    try:
        await nc.connect(servers=servers, error_cb=error_cb, **options)
    except BaseException:
        # nats-py leaves the socket of a refused connect open (a ResourceWarning, an error here);
        # after a failed TLS handshake its close() waits forever, hence the bound.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(nc.close(), 1)
        raise
    return nc


async def round_trip(nc: Client, stream: str = "RT") -> None:
    js = nc.jetstream(timeout=5)
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
    ack = await js.publish(f"{stream.lower()}.a", b"hello")
    assert (await js.get_msg(stream, ack.seq)).data == b"hello"


def test_publish_and_read_back(nats_server: NatsServer) -> None:
    async def main() -> None:
        nc = await connect(nats_server.url)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(StreamConfig(name="EVENTS", subjects=["events.>"], storage=StorageType.FILE))
            acks = [await js.publish(f"events.{i}", f"m{i}".encode()) for i in range(10)]
            assert [a.seq for a in acks] == list(range(1, 11))
            assert all(a.stream == "EVENTS" for a in acks)
            sub = await js.pull_subscribe("events.>", durable="reader", stream="EVENTS")
            msgs = await sub.fetch(10, timeout=5)
            assert [m.data for m in msgs] == [f"m{i}".encode() for i in range(10)]
            assert [m.subject for m in msgs] == [f"events.{i}" for i in range(10)]
            for m in msgs:
                await m.ack()
        finally:
            await nc.close()

    assert nats_server.url.startswith("nats://127.0.0.1:")
    asyncio.run(main())


def test_restart_keeps_the_file_store(nats_server: NatsServer) -> None:
    async def publish() -> int:
        nc = await connect(nats_server.url)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(StreamConfig(name="KEEP", subjects=["keep"], storage=StorageType.FILE))
            await js.publish("keep", b"first")
            return (await js.publish("keep", b"second")).seq
        finally:
            await nc.close()

    async def read(seq: int) -> bytes:
        nc = await connect(nats_server.url)
        try:
            js = nc.jetstream(timeout=5)
            info = await js.stream_info("KEEP")
            assert info.state.messages == 2
            data = (await js.get_msg("KEEP", seq)).data
            assert data is not None
            return data
        finally:
            await nc.close()

    seq = asyncio.run(publish())
    port, store = nats_server.port, nats_server.store_dir
    nats_server.restart()
    assert (nats_server.port, nats_server.store_dir) == (port, store)
    assert asyncio.run(read(seq)) == b"second"
    # A crash too: what JetStream acknowledged was already written to the store.
    nats_server.kill()
    nats_server.start()
    assert asyncio.run(read(seq)) == b"second"


def test_cluster_r3_stream_survives_losing_its_leader(nats_cluster: NatsCluster) -> None:
    names = [n.server_name or "" for n in nats_cluster.nodes]

    async def publish() -> str:
        nc = await connect(nats_cluster.urls)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(
                StreamConfig(name="R3", subjects=["r3"], num_replicas=3, storage=StorageType.FILE)
            )
            acks = [await js.publish("r3", b"%d" % i) for i in range(100)]
            assert [a.seq for a in acks] == list(range(1, 101))
            info = await js.stream_info("R3")
            assert info.cluster is not None and info.cluster.leader in names
            leader = info.cluster.leader
            assert sorted(r.name or "" for r in info.cluster.replicas or []) == sorted(
                n for n in names if n != leader
            )
            return leader
        finally:
            await nc.close()

    async def read_all(urls: list[str], deadline: float) -> list[bytes]:
        nc = await connect(urls)
        try:
            js = nc.jetstream(timeout=2)
            while True:  # a new stream leader is elected in a few seconds
                try:
                    info = await js.stream_info("R3")
                    if info.cluster is not None and info.cluster.leader:
                        break
                except (nats.errors.TimeoutError, nats.js.errors.APIError):
                    pass
                assert time.monotonic() < deadline, "no new stream leader"
                await asyncio.sleep(0.1)
            assert info.state.messages == 100
            return [(await js.get_msg("R3", seq)).data or b"" for seq in range(1, 101)]
        finally:
            await nc.close()

    leader = asyncio.run(publish())
    i = names.index(leader)
    nats_cluster.kill(i)
    assert not nats_cluster.nodes[i].running
    data = asyncio.run(read_all(nats_cluster.urls_except(i), time.monotonic() + 30))
    assert data == [b"%d" % i for i in range(100)]
    nats_cluster.restart(i)  # back on the same ports, catches up
    assert nats_cluster.nodes[i].healthz() == 200


def test_user_password(nats_server_factory: Callable[..., NatsServer]) -> None:
    server = nats_server_factory(user="daq", password="s3cret")

    async def main() -> None:
        # Refused at once without reconnects: a plain nats.errors.Error (not AuthorizationError).
        with pytest.raises(nats.errors.Error, match="Authorization Violation") as refused:
            await connect(server.url, user="daq", password="wrong", allow_reconnect=False)
        assert type(refused.value) is nats.errors.Error
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(server.url, allow_reconnect=False)  # no credentials at all
        # With reconnects allowed (nats-py's default) it retries, then gives up with NoServersError.
        errors: list[Exception] = []
        with pytest.raises(nats.errors.NoServersError):
            await connect(server.url, errors, user="daq", password="wrong")
        # ...having reported each refusal (and, at times, the server's reset of the socket) to error_cb.
        assert any(type(e) is nats.errors.Error and "Authorization Violation" in str(e) for e in errors)
        assert all(isinstance(e, nats.errors.Error | ConnectionResetError) for e in errors)
        nc = await connect(server.url, user="daq", password="s3cret")
        try:
            await round_trip(nc)
        finally:
            await nc.close()

    asyncio.run(main())


def test_token(nats_server_factory: Callable[..., NatsServer]) -> None:
    server = nats_server_factory(token="t0ken")

    async def main() -> None:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(server.url, token="other", allow_reconnect=False)
        nc = await connect(server.url, token="t0ken")
        try:
            await round_trip(nc)
        finally:
            await nc.close()

    asyncio.run(main())


def test_tls(nats_server_factory: Callable[..., NatsServer], nats_tls: tuple[Path, Path, Path]) -> None:
    ca, _, _ = nats_tls
    server = nats_server_factory(tls=nats_tls)
    assert server.url.startswith("tls://127.0.0.1:")

    async def main() -> None:
        nc = await connect(server.url, tls=ssl.create_default_context(cafile=str(ca)))
        try:
            await round_trip(nc)
        finally:
            await nc.close()
        # Without the CA the server certificate does not verify. (With reconnects allowed, nats-py
        # 2.16's retry after the failed handshake hangs past connect_timeout: no reconnects here.)
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(server.url, tls=ssl.create_default_context(), allow_reconnect=False)

    asyncio.run(main())


def test_no_jetstream(nats_server_factory: Callable[..., NatsServer]) -> None:
    server = nats_server_factory(jetstream=False)
    assert not (server.dir / "jetstream").exists()

    async def main() -> None:
        nc = await connect(server.url)
        try:
            js = nc.jetstream(timeout=2)
            # No responders on $JS.API.>: ServiceUnavailableError, at once (not after the timeout).
            with pytest.raises(nats.js.errors.ServiceUnavailableError):
                await js.add_stream(StreamConfig(name="X", subjects=["x"]))
            with pytest.raises(nats.js.errors.ServiceUnavailableError):
                await js.stream_info("X")
            with pytest.raises(nats.js.errors.NoStreamResponseError):
                await js.publish("x", b"1")
            await nc.publish("x", b"core NATS still works")
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(main())


def test_stream_not_found_and_no_stream_for_subject(nats_server: NatsServer) -> None:
    async def main() -> None:
        nc = await connect(nats_server.url)
        try:
            js = nc.jetstream(timeout=2)
            with pytest.raises(nats.js.errors.NotFoundError) as missing:
                await js.stream_info("MISSING")
            assert (missing.value.code, missing.value.err_code) == (404, 10059)
            with pytest.raises(nats.js.errors.NoStreamResponseError):
                await js.publish("no.stream.here", b"1")
        finally:
            await nc.close()

    asyncio.run(main())


def test_connection_refused() -> None:
    errors: list[Exception] = []
    with pytest.raises(nats.errors.NoServersError):
        asyncio.run(connect(f"nats://127.0.0.1:{free_port()}", errors))
    assert errors and all(isinstance(e, ConnectionRefusedError) for e in errors)


def test_max_payload(nats_server_factory: Callable[..., NatsServer]) -> None:
    server = nats_server_factory(max_payload=1024)

    async def main() -> None:
        nc = await connect(server.url)
        try:
            assert nc.max_payload == 1024
            with pytest.raises(nats.errors.MaxPayloadError):
                await nc.publish("big", b"x" * 2048)
        finally:
            await nc.close()

    asyncio.run(main())


def test_start_failure_reports_the_log(nats_server: NatsServer) -> None:
    taken = NatsServer(port=nats_server.port)  # the port is in use
    try:
        with pytest.raises(RuntimeError, match="exited") as failed:
            taken.start()
        assert "127.0.0.1" in str(failed.value) and str(taken.log_path) in str(failed.value)
        assert not taken.running
    finally:
        taken.close()
    assert not taken.dir.exists()


def test_leafnode(nats_server_factory: Callable[..., NatsServer]) -> None:
    hub = nats_server_factory(jetstream=False, leafnodes=True)
    leaf = nats_server_factory(jetstream=False, leafnode_remotes=[hub.leafnode_url])
    deadline = time.monotonic() + 10
    while hub.varz("leafz").get("leafnodes") != 1:
        assert time.monotonic() < deadline, f"the leaf did not connect:\n{leaf.log_tail()}"
        time.sleep(0.05)

    async def main() -> None:
        hub_nc, leaf_nc = await connect(hub.url), await connect(leaf.url)
        try:
            sub = await hub_nc.subscribe("via.leaf")
            await hub_nc.flush()
            await asyncio.sleep(0.2)  # the subscription's interest reaches the leaf
            await leaf_nc.publish("via.leaf", b"hi")
            assert (await sub.next_msg(timeout=5)).data == b"hi"
        finally:
            await leaf_nc.close()
            await hub_nc.close()

    asyncio.run(main())
