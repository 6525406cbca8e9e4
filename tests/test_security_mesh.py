"""The whole mesh with security on: ingest → Redis (TLS, each service its own ACL user from
deploy/redis/users.acl.in) → mirror → Kafka (TLS + SASL SCRAM-SHA-512) → shadow bars, then the
reconciler (over the same secured connections) proves parity. Every log line, at DEBUG, and
every ``--help`` is searched for the passwords."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from devstack.localstack import LocalStackError
from devstack.mesh import Mesh, MeshOptions
from devstack.secure import AclUser, Pki, SecureKafka, TlsRedisServer, deploy_acl_users, make_pki
from libs.common.io.redis_io import connect_redis
from libs.common.runtime.settings import CommonSettings, Secret
from tests.helpers import run_reconcile

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "lean-equity-2013-10"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

KAFKA_PASSWORD = f"kafka-{uuid.uuid4().hex}"
ADMIN = AclUser("admin", f"admin-{uuid.uuid4().hex}")
PREFIXES = {"ingest": "INGEST_", "bars": "BARS_", "engine_bridge": "BRIDGE_", "mirror": "MIRROR_"}


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    pki = make_pki(tmp_path_factory.mktemp("mesh-pki"))
    users = deploy_acl_users()
    try:
        redis = TlsRedisServer(pki, [*users, ADMIN], client_certs="yes")
    except LocalStackError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the TLS tests: {error}")
        pytest.skip(str(error))
    redis.start()
    kafka = SecureKafka(pki, {"mesh": KAFKA_PASSWORD})
    try:
        kafka.start()
        yield SimpleNamespace(redis=redis, kafka=kafka, pki=pki, users=users)
    finally:
        kafka.stop()
        redis.stop()


def secure_env(pki: Pki, users: list[AclUser]) -> dict[str, str]:
    """Shared TLS and SASL settings, and each service's own Redis user and client
    certificate (Redis here requires one)."""
    env = {
        "TICKMESH_LOG_LEVEL": "debug",
        "TICKMESH_REDIS_SSL_CAFILE": str(pki.ca),
        "TICKMESH_REDIS_SSL_CERTFILE": str(pki.client_cert),
        "TICKMESH_REDIS_SSL_KEYFILE": str(pki.client_key),
        "TICKMESH_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "TICKMESH_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "TICKMESH_KAFKA_SASL_USERNAME": "mesh",
        "TICKMESH_KAFKA_SASL_PASSWORD": KAFKA_PASSWORD,
        "TICKMESH_KAFKA_SSL_CAFILE": str(pki.ca),
    }
    for user in users:
        if user.name not in PREFIXES:
            continue
        prefix = PREFIXES[user.name]
        env[f"{prefix}REDIS_USERNAME"] = user.name
        env[f"{prefix}REDIS_PASSWORD"] = user.password
    return env


async def acl_denials(stack: SimpleNamespace) -> list[dict[str, object]]:
    """Redis's ACL LOG: every command, key or channel a user was refused."""
    client = await connect_redis(
        CommonSettings(
            redis_url=stack.redis.url,
            redis_username=ADMIN.name,
            redis_password=Secret(ADMIN.password),
            redis_ssl_cafile=str(stack.pki.ca),
            redis_ssl_certfile=str(stack.pki.client_cert),
            redis_ssl_keyfile=str(stack.pki.client_key),
        ),
        max_wait_s=5,
    )
    try:
        entries = await client.execute_command("ACL", "LOG")
    finally:
        await client.aclose()
    return [
        {
            key.decode() if isinstance(key, bytes) else key: value
            for key, value in (
                entry.items()
                if isinstance(entry, dict)
                else zip(entry[::2], entry[1::2], strict=False)
            )
        }
        for entry in entries
    ]


def test_the_mesh_runs_over_tls_acl_users_and_sasl_and_parity_holds(
    secure_stack: SimpleNamespace, tmp_path: Path
) -> None:
    """A real day of IBM (hundreds of minutes) when the shared data is there, else a few
    seconds of synthetic trades."""
    env = secure_env(secure_stack.pki, secure_stack.users)
    feed: dict[str, Any] = (
        {"data_dir": SHARED_DATA, "day": "2013-10-07", "symbols": ["IBM"], "speed": 0.0}
        if SHARED_DATA.is_dir()
        else {"synthetic_symbols": 4, "synthetic_rate": 1_000, "duration_s": 6.0}
    )
    options = MeshOptions(
        workdir=tmp_path,
        grace_ms=500,
        run_id=f"secure-{uuid.uuid4().hex[:6]}",
        env=env,
        **feed,
    )
    mesh = Mesh(secure_stack, options)  # type: ignore[arg-type]
    try:
        mesh.start()
        mesh.wait_feed_done(timeout_s=300)
        mesh.wait_last_minute_closed()
        mesh.wait_settled(quiet_s=4, timeout_s=240)
        ticks = mesh.services["ingest"].metric_sum("tickmesh_ingest_events_total", type="T")
        redis_bars = mesh.services["bars"].metric_sum("tickmesh_bars_published_total")
        kafka_bars = mesh.services["bars-shadow"].metric_sum("tickmesh_bars_published_total")
        dead = sum(s.metric_sum("tickmesh_dead_letters_total") for s in mesh.services.values())
        counts = mesh.kafka_counts()
        denied = asyncio.run(acl_denials(secure_stack))
    finally:
        mesh.stop()
    assert not denied, f"a service was refused by its ACL: {denied}"
    assert ticks > 0 and redis_bars > 0, (ticks, redis_bars)
    assert kafka_bars == redis_bars, (kafka_bars, redis_bars)
    assert dead == 0
    assert sum(n for topic, (n, _) in counts.items() if topic.startswith("ticks.")) > 0, counts

    # the reconciler, over TLS as the mirror's ACL user and over SASL_SSL
    result = run_reconcile(
        *("--format", "json", "--no-vendor"),
        env={
            **env,
            "TICKMESH_LOG_LEVEL": "warning",
            "TICKMESH_REDIS_URL": secure_stack.redis.url,
            "TICKMESH_KAFKA_BOOTSTRAP": secure_stack.kafka.bootstrap,
            "MIRROR_RECONCILE_MIN_AGE_S": "0",
        },
        timeout=180,
    )
    denied = asyncio.run(acl_denials(secure_stack))
    assert not denied, f"the reconciler was refused by the mirror's ACL: {denied}"
    report = msgspec.json.decode(result.stdout)
    totals = report["parity"]["totals"]
    assert totals["compared"] == redis_bars and totals["matched"] == redis_bars, totals
    assert totals["parityPct"] == 100.0, totals
    print(
        f"\nsecure mesh: {ticks:.0f} ticks, {redis_bars:.0f} bars on Redis, {kafka_bars:.0f} "
        f"rebuilt from Kafka, parity {totals['parityPct']} % ({totals['matched']} of "
        f"{totals['compared']})"
    )

    # no secret in any log line (DEBUG), nor in the reconciler's output
    secrets = [KAFKA_PASSWORD, *(user.password for user in secure_stack.users)]
    logs = {path.name: path.read_text(errors="replace") for path in tmp_path.glob("*.log")}
    assert set(logs) >= {"ingest.log", "bars.log", "bars-shadow.log", "mirror.log"}
    assert any('"level": "debug"' in text for text in logs.values()), "DEBUG was not on"
    for name, text in [*logs.items(), ("reconcile", result.stdout + result.stderr)]:
        for secret in secrets:
            assert secret not in text, f"a password is in {name}"


def test_help_shows_no_secret_set_in_the_environment() -> None:
    values = {
        "TICKMESH_REDIS_PASSWORD": f"r-{uuid.uuid4().hex}",
        "TICKMESH_KAFKA_SASL_PASSWORD": f"k-{uuid.uuid4().hex}",
        "TICKMESH_KAFKA_SSL_KEY_PASSWORD": f"p-{uuid.uuid4().hex}",
        "MIRROR_REDIS_PASSWORD": f"m-{uuid.uuid4().hex}",
        "POLYGON_API_KEY": f"key-{uuid.uuid4().hex}",
    }
    for service in PREFIXES:
        result = subprocess.run(
            [sys.executable, "-m", f"services.{service}", "--help"],
            env={**os.environ, **values},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "REDIS_PASSWORD" in result.stdout and "KAFKA_SASL_PASSWORD" in result.stdout
        for value in values.values():
            assert value not in result.stdout + result.stderr, service
