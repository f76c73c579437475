"""Connecting to NATS JetStream: URLs, credentials (never on a command line), the errors a
user can act on, and the stream and buckets of a prefix (protocol.py says what they hold)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .._errors import JetStreamError
from . import protocol

__all__ = ["Credentials", "NatsUrl", "connect_js", "ensure_stream", "parse_url", "patiently", "transient"]

log = logging.getLogger("rust_daq.nats")

#: Environment variables read by :meth:`Credentials.from_env` (the config's ``[nats]`` keys
#: of the same meaning override them).
ENV = {
    "user": "RUST_DAQ_NATS_USER",
    "password": "RUST_DAQ_NATS_PASSWORD",
    "token": "RUST_DAQ_NATS_TOKEN",
    "creds": "RUST_DAQ_NATS_CREDS",
    "tls_ca": "RUST_DAQ_NATS_TLS_CA",
    "tls_cert": "RUST_DAQ_NATS_TLS_CERT",
    "tls_key": "RUST_DAQ_NATS_TLS_KEY",
}


@dataclass(frozen=True)
class NatsUrl:
    """``nats://host:port[,nats://host2:port...][/prefix]``: the servers, and the subject
    prefix its path names (None: none given)."""

    servers: tuple[str, ...]
    prefix: str | None
    tls: bool
    #: ``?domain=acq1``: the JetStream domain to use (a leaf node's, reached through its hub).
    domain: str | None = None

    def __str__(self) -> str:
        path = f"/{self.prefix}" if self.prefix else ""
        return ",".join(self.servers) + path + (f"?domain={self.domain}" if self.domain else "")


def parse_url(url: str) -> NatsUrl:
    """Parses a NATS URL (several servers comma-separated; the last may carry a path, the
    prefix, and ``?domain=NAME``, a JetStream domain). Raises JetStreamError for another scheme, a missing host or port, or
    credentials in the URL (they would show in ``ps`` and in logs)."""
    if not isinstance(url, str) or not url.strip():
        raise JetStreamError(f"bad NATS URL {url!r}: expected nats://HOST:PORT")
    servers, prefix, tls, domain = [], None, False, None
    for part in url.split(","):
        try:
            u = urlsplit(part.strip())
            port = u.port
        except ValueError as e:
            raise JetStreamError(f"bad NATS URL {part!r}: {e}") from None
        if u.scheme not in ("nats", "tls"):
            raise JetStreamError(f"bad NATS URL {part!r}: the scheme must be nats:// or tls://")
        if u.username is not None or u.password is not None:
            raise JetStreamError(
                f"the NATS URL {u.scheme}://***@{u.hostname}... holds credentials; they would show in "
                f"ps and in logs: set {ENV['user']}/{ENV['password']} or {ENV['token']} in the environment "
                "(or user/password/token in the config's [nats] section) instead"
            )
        if not u.hostname:
            raise JetStreamError(f"bad NATS URL {part!r}: no host (expected {u.scheme}://HOST:PORT)")
        path = u.path.strip("/")
        if path:
            if prefix is not None:
                raise JetStreamError(f"bad NATS URL {url!r}: give the prefix once, after the last server")
            try:
                prefix = protocol.check_prefix(path)
            except ValueError as e:
                raise JetStreamError(str(e)) from None
        if u.query:
            query = parse_qs(u.query, keep_blank_values=True)
            if set(query) != {"domain"} or not re.fullmatch(r"[A-Za-z0-9_-]+", query["domain"][-1]):
                raise JetStreamError(
                    f"bad NATS URL {part!r}: the only query is ?domain=NAME (letters, digits, _ -)"
                )
            domain = query["domain"][-1]
        tls = tls or u.scheme == "tls"
        servers.append(f"{u.scheme}://{u.hostname}:{port or 4222}")
    return NatsUrl(tuple(servers), prefix, tls, domain)


@dataclass(frozen=True)
class Credentials:
    """How to authenticate: user and password, a token, or a ``.creds`` file (NKey/JWT),
    and TLS (a CA to trust, a client certificate and key). From the environment
    (:data:`ENV`) or the config's ``[nats]`` section; never from the command line."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Credentials:
        env = os.environ if environ is None else environ
        values = {k: env.get(v) or None for k, v in ENV.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def merged(self, **overrides: Any) -> Credentials:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def ssl_context(self, tls: bool) -> ssl.SSLContext | None:
        if not (tls or self.tls_ca or self.tls_cert):
            return None
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise JetStreamError(f"NATS TLS files: {e}") from None
        return ctx

    def options(self, tls: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.user is not None:
            out["user"], out["password"] = self.user, self.password or ""
        if self.token is not None:
            out["token"] = self.token
        if self.creds is not None:
            out["user_credentials"] = self.creds
        ctx = self.ssl_context(tls)
        if ctx is not None:
            out["tls"] = ctx
        return out


def _explain(url: NatsUrl, errors: list[BaseException], e: BaseException) -> JetStreamError:
    text = " ".join(str(x) for x in [*errors, e]).lower()
    where = ",".join(url.servers)
    if "authorization" in text or "authentication" in text or "permissions" in text:
        return JetStreamError(
            f"the NATS server at {where} refused the credentials (authorization violation): check "
            f"{ENV['user']}/{ENV['password']}, {ENV['token']} or {ENV['creds']}, or the [nats] section"
        )
    if "ssl" in text or "certificate" in text or "tls" in text:
        return JetStreamError(f"TLS with the NATS server at {where} failed: {errors[-1] if errors else e}")
    detail = f"{type(errors[-1]).__name__}: {errors[-1]}" if errors else f"{type(e).__name__}: {e}"
    return JetStreamError(f"cannot reach a NATS server at {where} ({detail}); is nats-server running there?")


async def connect_js(
    url: NatsUrl,
    credentials: Credentials | None = None,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 (the client's connect and request timeouts, not ours)
    reconnect: bool = True,
    name: str = "rust-daq",
    on_disconnect: Any = None,
    on_reconnect: Any = None,
) -> tuple[Any, Any]:
    """Connects and checks that the server has JetStream; returns ``(nc, js)``. Once
    connected, a client reconnects for ever (``reconnect``): a publisher or writer keeps its
    place through an outage. Raises JetStreamError saying what is wrong."""
    import nats
    import nats.errors
    import nats.js.errors

    creds = credentials or Credentials.from_env()
    errors: list[BaseException] = []

    async def error_cb(e: Exception) -> None:
        errors.append(e)
        if len(errors) > 20:
            del errors[:10]
        log.debug("NATS: %s", e)

    async def disconnected() -> None:
        if on_disconnect is not None:
            on_disconnect()

    async def reconnected() -> None:
        if on_reconnect is not None:
            on_reconnect()

    # (An unbounded reconnect also retries the first connect for ever: bounded here, and the
    # errors seen meanwhile say why it failed.)
    try:
        nc = await asyncio.wait_for(
            _connect(nats, url, creds, timeout, reconnect, name, error_cb, disconnected, reconnected),
            timeout + 1,
        )
    except (nats.errors.Error, OSError, TimeoutError, ssl.SSLError) as e:
        raise _explain(url, errors, e) from None
    if reconnect:
        nc.options["max_reconnect_attempts"] = -1  # once connected: for ever (read at each outage)
    js = nc.jetstream(timeout=timeout, domain=url.domain)
    try:
        await _jetstream_answers(js, nats, max(3 * timeout, 15.0))
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as e:
        await nc.close()
        raise JetStreamError(
            f"the NATS server at {','.join(url.servers)} has no JetStream ({type(e).__name__}); start "
            "it with `nats-server -js` (or a jetstream {} block in its config)"
        ) from None
    except (TimeoutError, nats.errors.Error) as e:
        await nc.close()
        raise JetStreamError(f"JetStream at {','.join(url.servers)} does not answer: {e!r}") from None
    return nc, js


async def _jetstream_answers(js: Any, nats: Any, patience: float) -> None:
    """JetStream's account info. A server without JetStream says so at once (no responders);
    a cluster that lost a node answers again once it elected a new leader: timeouts and 503s
    with a description are retried for `patience` seconds."""
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        try:
            await js.account_info()
            return
        except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.APIError) as e:
            retry = not isinstance(e, nats.js.errors.APIError) or (e.code == 503 and e.description)
            if not retry or asyncio.get_running_loop().time() > deadline:
                raise
            log.info("JetStream does not answer yet (%r); retrying", e)
            await asyncio.sleep(0.5)


async def _connect(
    nats: Any, url: NatsUrl, creds: Credentials, wait: float, reconnect: bool, name: str, *callbacks: Any
) -> Any:
    error_cb, disconnected, reconnected = callbacks
    return await nats.connect(
        servers=list(url.servers),
        name=name,
        connect_timeout=min(wait, 2.0),
        allow_reconnect=reconnect,
        # Each server twice, then NoServersError: nats-py retries the first connection for
        # ever when this is <= 0 (connect_js sets it to -1 once connected).
        max_reconnect_attempts=1,
        reconnect_time_wait=0.25,
        error_cb=error_cb,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        **creds.options(url.tls),
    )


async def ensure_stream(js: Any, prefix: str, *, replicas: int = 1, max_bytes: int = -1) -> Any:
    """The prefix's JetStream stream (file storage, subjects ``<prefix>.>``, a 2-minute
    duplicate window), made if missing; returns its info."""
    import nats.js.api as api
    import nats.js.errors

    found = await find_stream(js, prefix)
    if found is not None:
        return found
    name = protocol.stream_name(prefix)
    config = api.StreamConfig(
        name=name,
        subjects=[f"{prefix}.>"],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        num_replicas=replicas,
        duplicate_window=120.0,
        max_bytes=max_bytes,
        max_msg_size=-1,
    )
    try:
        return await js.add_stream(config)
    except nats.js.errors.BadRequestError as e:
        if "already in use" in str(e):  # (another publisher made it meanwhile)
            return await js.stream_info(name)
        raise JetStreamError(f"JetStream refused the stream {name}: {e.description or e}") from None


async def find_stream(js: Any, prefix: str) -> Any:
    """The info of the stream that holds the prefix's subjects (``RDAQ_<prefix>``, or one an
    operator made, or that of a shorter prefix: ``rdaq.>`` holds ``rdaq.cam1.>``); None."""
    import nats.js.errors

    try:
        name = await js.find_stream_name_by_subject(f"{prefix}.>")
    except nats.js.errors.NotFoundError:
        return None
    return await js.stream_info(name)


async def stream_of(js: Any, prefix: str, url: NatsUrl) -> Any:
    """The info of the stream holding the prefix's subjects; JetStreamError naming the streams
    there if none."""
    found = await find_stream(js, prefix)
    if found is not None:
        return found
    names = [s.config.name for s in await js.streams_info()]
    raise JetStreamError(
        f"no JetStream stream holds the subjects {prefix}.> (prefix {prefix!r}) at {','.join(url.servers)}: "
        f"nothing was published there yet; the server's streams: {', '.join(names) or 'none'}"
    )


async def buckets(js: Any, *, replicas: int = 1, create: bool = True) -> tuple[Any, Any]:
    """The schema and position key-value buckets (made if missing and `create`)."""
    import nats.js.api as api
    import nats.js.errors

    out = []
    for bucket in (protocol.SCHEMAS_BUCKET, protocol.POSITIONS_BUCKET):
        try:
            out.append(await js.key_value(bucket))
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            if not create:
                raise
            out.append(
                await js.create_key_value(
                    api.KeyValueConfig(
                        bucket=bucket, history=1, storage=api.StorageType.FILE, replicas=replicas
                    )
                )
            )
    return out[0], out[1]


async def object_store(js: Any, prefix: str, *, replicas: int = 1, create: bool = True) -> Any:
    import nats.js.api as api
    import nats.js.errors

    bucket = protocol.object_bucket(prefix)
    try:
        return await js.object_store(bucket)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        if not create:
            raise
        return await js.create_object_store(
            bucket, config=api.ObjectStoreConfig(storage=api.StorageType.FILE, replicas=replicas)
        )


def transient(e: BaseException) -> bool:
    """A failure the server's return cures: connection lost, timeouts, no responders (a
    JetStream leader being elected), a 503."""
    import nats.errors
    import nats.js.errors

    return isinstance(
        e,
        asyncio.TimeoutError
        | TimeoutError
        | ConnectionError
        | nats.errors.TimeoutError
        | nats.errors.NoRespondersError
        | nats.errors.ConnectionClosedError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.OutboundBufferLimitError
        | nats.errors.StaleConnectionError
        | nats.js.errors.ServiceUnavailableError
        | nats.js.errors.NoStreamResponseError,
    ) or (isinstance(e, nats.js.errors.APIError) and getattr(e, "code", None) in (503, 408))


async def patiently(call: Any, patience: float = 30.0) -> Any:
    """``await call()``, retried for `patience` seconds while the failure is :func:`transient`
    (a cluster electing a leader after losing a node answers again within seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            return await call()
        except Exception as e:
            if not transient(e) or loop.time() > deadline:
                raise
            log.info("JetStream is not ready (%s: %s); retrying", type(e).__name__, e)
            await asyncio.sleep(0.5)
