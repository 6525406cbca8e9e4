"""Secured connections to Kafka and Redis, built once from the shared settings.

Every aiokafka producer, consumer and admin client of tickmesh takes ``kafka_options``; every
Redis client is made by ``redis_client``. Both read the settings every service shares
(``CommonSettings``: ``*_KAFKA_SECURITY_PROTOCOL``, ``*_KAFKA_SASL_*``, ``*_KAFKA_SSL_*``,
``*_REDIS_USERNAME``, ``*_REDIS_PASSWORD``, ``*_REDIS_SSL_*``, a ``rediss://`` URL for TLS).

A refused password or an untrusted certificate is a configuration error, not an outage: it
is raised as ``ConnectionSettingError``, one line naming the variable to fix, and never
retried. The clients hide the cause (aiokafka's ``start`` says only "Unable to bootstrap"),
so ``diagnose_kafka`` opens one bare connection to learn it, and ``redis_setting_error``
reads it from the error's chain.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import ssl
import struct
from typing import Any

import msgspec
import redis.asyncio as aioredis
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.common.io.redis_packing import lean_packing
from libs.common.runtime.settings import CommonSettings, SettingsError, env_name, load_settings


class _SaslRedactor(logging.Filter):
    """aiokafka logs every request at DEBUG, the SASL ones too: a PLAIN login's token *is*
    the password. Those arguments are replaced before any handler sees the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            type(arg).__name__.startswith("SaslAuthenticate") for arg in record.args
        ):
            record.args = tuple(
                f"{type(arg).__name__}(<redacted>)"
                if type(arg).__name__.startswith("SaslAuthenticate")
                else arg
                for arg in record.args
            )
        return True


# Installed once, on import: every Kafka client of tickmesh is built by this module's options.
logging.getLogger("aiokafka.conn").addFilter(_SaslRedactor())


class ConnectionSettingError(SettingsError):
    """Kafka or Redis refused our credentials or we refused its certificate: a setting is
    wrong, and retrying cannot help. The message is one line naming the variable."""


def _name(settings: CommonSettings, *fields: str) -> str:
    names = [env_name(type(settings), field) for field in fields]
    return " / ".join(names)


def _text(error: BaseException) -> str:
    """``error``'s message on one line (no client puts a secret in its errors)."""
    return " ".join((str(error) or type(error).__name__).split())[:300]


def _chain(error: BaseException) -> list[BaseException]:
    seen: set[int] = set()
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


# -- Kafka -----------------------------------------------------------------------------------


def kafka_ssl_context(settings: CommonSettings) -> ssl.SSLContext | None:
    """The TLS context of the Kafka clients (None for PLAINTEXT/SASL_PLAINTEXT)."""
    if "SSL" not in settings.kafka_security_protocol:
        return None
    try:
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionSettingError(
            f"{_name(settings, 'kafka_ssl_cafile')}: cannot load the CA file "
            f"{settings.kafka_ssl_cafile!r}: {_text(exc)}"
        ) from None
    context.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_certfile:
        try:
            context.load_cert_chain(
                settings.kafka_ssl_certfile,
                settings.kafka_ssl_keyfile or None,
                settings.kafka_ssl_key_password.reveal() or None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionSettingError(
                f"{_name(settings, 'kafka_ssl_certfile', 'kafka_ssl_keyfile')}: cannot load "
                f"the client certificate and key: {_text(exc)}"
            ) from None
    return context


def kafka_options(settings: CommonSettings) -> dict[str, Any]:
    """The keyword arguments every aiokafka client gets: bootstrap servers, security
    protocol, TLS context, SASL mechanism and credentials, request timeout."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
    }
    context = kafka_ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.reveal()
    return options


def kafka_setting_error(settings: CommonSettings, error: BaseException) -> str | None:
    """The one-line message when ``error`` says a Kafka setting is wrong; None when it is
    an outage (refused, unreachable, timed out) or something else."""
    for item in _chain(error):
        if isinstance(item, (SaslAuthenticationFailed, UnsupportedSaslMechanismError)):
            return (
                f"{_name(settings, 'kafka_sasl_username', 'kafka_sasl_password')}: the Kafka "
                f"broker refused the SASL {settings.kafka_sasl_mechanism} login "
                f"({_text(item)})"
            )
        if isinstance(item, ssl.SSLCertVerificationError):
            return (
                f"{_name(settings, 'kafka_ssl_cafile')}: the Kafka broker's certificate is not "
                f"trusted ({_text(item)}); check the CA file, the bootstrap host name "
                f"or {_name(settings, 'kafka_ssl_check_hostname')}"
            )
        if isinstance(item, ssl.SSLError):
            return (
                f"{_name(settings, 'kafka_security_protocol', 'kafka_ssl_certfile')}: the TLS "
                f"handshake with the Kafka broker failed ({_text(item)})"
            )
    return None


async def diagnose_kafka(settings: CommonSettings, timeout_ms: int | None = None) -> None:
    """Talk to each bootstrap server as the clients would (connect, TLS, SASL, one Metadata
    request) and raise ``ConnectionSettingError`` when a setting is wrong: refused
    credentials, an untrusted certificate, or a security protocol the listener does not
    speak. An unreachable or stalled broker is an outage, not a setting: nothing is raised
    and the clients' retries deal with it."""
    options = kafka_options(settings)
    protocol = settings.kafka_security_protocol
    # connect, TLS and the login take milliseconds; a listener that never answers our TLS
    # hello (a plaintext one) should not hold the start for a whole request timeout
    timeout = timeout_ms or min(settings.kafka_request_timeout_ms, 10_000)
    for server in settings.kafka_bootstrap.split(","):
        host, _, port_text = server.strip().rpartition(":")
        if not host or not port_text.isdigit():
            raise ConnectionSettingError(
                f"{_name(settings, 'kafka_bootstrap')}: {server.strip()!r} is not host:port"
            )
        host, port = host.strip("[]"), int(port_text)
        try:
            connection = await create_conn(
                host,
                port,
                client_id="tickmesh-check",
                request_timeout_ms=timeout,
                ssl_context=options.get("ssl_context"),
                security_protocol=protocol,
                sasl_mechanism=options.get("sasl_mechanism"),
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
            )
        except (TimeoutError, KafkaConnectionError, OSError, SaslAuthenticationFailed) as exc:
            message = kafka_setting_error(settings, exc)
            if message is None:
                message = await _protocol_mismatch(settings, host, port, exc)
            if message is not None:
                raise ConnectionSettingError(message) from None
            continue
        try:
            await connection.send(MetadataRequest([]))
        except KafkaConnectionError:
            if not protocol.startswith("SASL"):
                raise ConnectionSettingError(
                    f"{_name(settings, 'kafka_security_protocol')}: the Kafka broker at "
                    f"{host}:{port} closed the connection at our first request with {protocol}:"
                    " it requires SASL (set SASL_PLAINTEXT or SASL_SSL and the SASL settings)"
                ) from None
        except Exception:  # an outage or a broker quirk: the clients' retries decide
            pass
        finally:
            connection.close()
        return


async def _protocol_mismatch(
    settings: CommonSettings, host: str, port: int, error: BaseException
) -> str | None:
    """Whether the listener speaks the other protocol: TLS when we spoke plaintext (it
    closes at once), plaintext Kafka when we spoke TLS (the handshake gets no answer)."""
    protocol = settings.kafka_security_protocol
    name = _name(settings, "kafka_security_protocol")
    if "SSL" in protocol:
        if not isinstance(error, TimeoutError) and "closed" not in str(error):
            return None
        if await _answers_plain_kafka(host, port):
            return (
                f"{name}: {protocol}, but the Kafka listener at {host}:{port} speaks plaintext "
                "(no TLS)"
            )
        return None
    if await _speaks_tls(host, port):
        return f"{name}: {protocol}, but the Kafka listener at {host}:{port} speaks TLS"
    return None


async def _answers_plain_kafka(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """True when ``host:port`` answers a plaintext ApiVersions request."""
    request = struct.pack(">hhih", 18, 0, 1, 14) + b"tickmesh-check"
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(struct.pack(">i", len(request)) + request)
                await writer.drain()
                size, correlation = struct.unpack(">ii", await reader.readexactly(8))
                return correlation == 1 and 0 < size < 1_048_576
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


async def _speaks_tls(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """True when a TLS handshake (certificate not checked) with ``host:port`` succeeds."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(timeout_s):
            _reader, writer = await asyncio.open_connection(host, port, ssl=context)
            writer.close()
            return True
    except (OSError, TimeoutError, ssl.SSLError):
        return False


# -- Redis -----------------------------------------------------------------------------------


# No CLIENT SETINFO on connect, so an ACL user need not be granted it (redis-py 7.1+ takes
# ``driver_info=None``; older ones ``lib_name=None, lib_version=None``).
_NO_CLIENT_SETINFO: dict[str, Any] = (
    {"driver_info": None}
    if importlib.util.find_spec("redis.driver_info") is not None
    else {"lib_name": None, "lib_version": None}
)


def redis_options(settings: CommonSettings) -> dict[str, Any]:
    """The keyword arguments of ``redis.asyncio.Redis.from_url`` for the shared settings."""
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        **_NO_CLIENT_SETINFO,
    }
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password:
        options["password"] = settings.redis_password.reveal()
    if settings.redis_url.startswith("rediss://"):
        options["ssl_check_hostname"] = settings.redis_ssl_check_hostname
        if settings.redis_ssl_cafile:
            options["ssl_ca_certs"] = settings.redis_ssl_cafile
        if settings.redis_ssl_certfile:
            options["ssl_certfile"] = settings.redis_ssl_certfile
            options["ssl_keyfile"] = settings.redis_ssl_keyfile or None
    return options


def redis_client(settings: CommonSettings, *, name: str, **extra: Any) -> aioredis.Redis:
    """A Redis client (not yet connected) with the shared security settings and timeouts,
    packing its commands by hiredis (``redis_packing``)."""
    return lean_packing(
        aioredis.Redis.from_url(
            settings.redis_url, client_name=name, **{**redis_options(settings), **extra}
        )
    )


def redis_setting_error(settings: CommonSettings, error: BaseException) -> str | None:
    """The one-line message when ``error`` says a Redis setting is wrong; None when it is an
    outage or something else."""
    for item in _chain(error):
        text = str(item)
        if isinstance(item, AuthenticationError) or (
            isinstance(item, ResponseError) and text.startswith(("NOAUTH", "WRONGPASS"))
        ):
            return (
                f"{_name(settings, 'redis_username', 'redis_password')}: Redis refused the "
                f"login ({_text(item)})"
            )
        if isinstance(item, NoPermissionError):
            return (
                f"{_name(settings, 'redis_username')}: the Redis ACL user may not do what "
                f"this service needs ({_text(item)})"
            )
        if isinstance(item, ssl.SSLCertVerificationError) or (
            isinstance(item, RedisConnectionError) and "CERTIFICATE_VERIFY_FAILED" in text
        ):
            return (
                f"{_name(settings, 'redis_ssl_cafile')}: Redis's certificate is not trusted "
                f"({_text(item)}); check the CA file, the host in the URL or "
                f"{_name(settings, 'redis_ssl_check_hostname')}"
            )
        if isinstance(item, (ssl.SSLError, RedisConnectionError)) and (
            "alert" in text.lower() and ("unknown ca" in text.lower() or "certificate" in text)
        ):
            return (
                f"{_name(settings, 'redis_ssl_certfile', 'redis_ssl_keyfile')}: Redis refused "
                f"our client certificate ({_text(item)})"
            )
    return None


def tool_settings(**overrides: Any) -> CommonSettings:
    """The shared settings of a command-line tool (a load generator, a baseline forwarder):
    ``TICKMESH_*`` from the environment, as every service reads them, with ``overrides``
    (the URL and bootstrap servers its flags name)."""
    settings = load_settings(CommonSettings)
    given = {name: value for name, value in overrides.items() if value is not None}
    return msgspec.structs.replace(settings, **given) if given else settings
