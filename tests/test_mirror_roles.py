"""``MIRROR_ROLE``: the forwarder and the timed reconciler as two processes of the mirror.

Both run as ``python -m services.mirror run`` against the real Redis and Kafka-protocol
broker, with the same settings but the role: the forwarder forwards and never reconciles; the
reconciler reconciles on its timer, forwards nothing and heartbeats under its own name, so
that the dashboard's mirror lag stays the forwarder's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from devstack.localstack import free_port
from libs.common.io.redis_io import Publisher
from libs.common.names import HEARTBEAT, Keys
from libs.common.runtime.service import EXIT_CONFIG
from libs.common.runtime.settings import load_settings
from libs.common.schemas import Heartbeat, TickBatch, Trade
from services.mirror.config import MirrorSettings
from tests.helpers import eventually
from tests.test_mirror_noloss import REPO, mirror_env, mirror_process

pytestmark = [pytest.mark.integration]

TIMED_RUN_EVENTS = {"reconcile.report", "reconcile.not_a_trading_day", "reconcile.failed"}
"""What a timed run of the reconciler logs: a report, a day the exchange does not trade (the
test runs on any date), or a failure it retries."""


def log_events(path: Path) -> list[str]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line).get("event", ""))
    return events


async def heartbeat_services(client: aioredis.Redis, keys: Keys) -> set[str]:
    entries = await client.xrange(keys.stream(HEARTBEAT))
    services = set()
    for _id, fields in entries:
        for value in fields.values():
            try:
                services.add(msgspec.json.decode(value, type=Heartbeat).service)
            except msgspec.DecodeError:
                continue
    return services


@pytest.mark.timeout(180)
async def test_forwarder_and_reconciler_run_as_two_processes_each_doing_only_its_part(
    redis_client: aioredis.Redis,
    redis_url: str,
    kafka_bootstrap: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    name = unique_name("R").replace("-", "")[-36:]
    common = {**mirror_env(redis_url, kafka_bootstrap, name), "MIRROR_RECONCILE_INTERVAL_S": "0.5"}
    forward_env = {**common, "MIRROR_ROLE": "forward"}
    reconcile_env = {**common, "MIRROR_ROLE": "reconcile", "MIRROR_HTTP_PORT": str(free_port())}
    keys = Keys(load_settings(MirrorSettings, forward_env).key_prefix)
    forwarder = mirror_process(forward_env, tmp_path / "mirror.log").start()
    reconciler = mirror_process(reconcile_env, tmp_path / "mirror-reconciler.log").start()
    try:
        await eventually(forwarder.ready, timeout=60, message=forwarder.log_tail)
        await eventually(reconciler.ready, timeout=60, message=reconciler.log_tail)
        symbol = f"{name}X"
        records = [
            (
                f"ticks.{symbol}",
                TickBatch(seq=0, sym=symbol, ticks=[Trade(symbol, 10.0, k, 1_000 + k)]),
            )
            for k in range(1, 21)
        ]
        await Publisher(redis_client, keys=keys, stream_maxlen=1_000).publish_many(records)

        await eventually(
            lambda: forwarder.metric_sum("tickmesh_mirror_records_total") >= len(records),
            timeout=60,
            message=forwarder.log_tail,
        )
        await eventually(
            lambda: TIMED_RUN_EVENTS & set(log_events(reconciler.log_path)),
            timeout=60,
            message=reconciler.log_tail,
        )

        async def both_beating() -> set[str] | None:
            found = await heartbeat_services(redis_client, keys)
            return found if {"mirror", "mirror-reconciler"} <= found else None

        await eventually(both_beating, timeout=30)
        assert reconciler.metric_sum("tickmesh_mirror_records_total") == 0
        assert not TIMED_RUN_EVENTS & set(log_events(forwarder.log_path))
    finally:
        forwarder.stop()
        reconciler.stop()


def test_a_reconciler_without_a_timer_is_refused_with_the_variable_named(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.mirror", "run"],
        cwd=REPO,
        env={
            "PATH": "/usr/bin:/bin",
            "MIRROR_ROLE": "reconcile",
            "MIRROR_RECONCILE_INTERVAL_S": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "MIRROR_RECONCILE_INTERVAL_S" in result.stderr
    assert "MIRROR_ROLE=reconcile" in result.stderr
