"""Wiring every service repeats: Redis connection with readiness, publisher, heartbeat."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from libs.common.io.heartbeat import HeartbeatSender
from libs.common.io.outages import dependency_of
from libs.common.io.redis_io import Publisher, connect_redis
from libs.common.names import Keys
from libs.common.runtime.service import ServiceRuntime


async def connect_runtime_redis(runtime: ServiceRuntime) -> aioredis.Redis:
    """Connect to the service's Redis, register readiness and cleanup."""
    settings = runtime.settings
    # Redis or Kafka unreachable is an outage the supervisor rides out, not a failure
    runtime.supervisor.classify_outage = dependency_of
    client = await connect_redis(settings, name=f"tickmesh-{runtime.service}")

    async def redis_ready() -> bool:
        return bool(await client.ping())

    runtime.http.add_readiness("redis", redis_ready)
    runtime.on_cleanup(client.aclose)
    return client


def make_publisher(runtime: ServiceRuntime, client: aioredis.Redis) -> Publisher:
    """The service's sequenced publisher, on the runtime's registry."""
    settings = runtime.settings
    return Publisher(
        client,
        keys=Keys(settings.key_prefix),
        stream_maxlen=settings.stream_maxlen,
        channels_per_call=settings.publish_channels_per_call,
        registry=runtime.registry,
    )


def add_heartbeat(
    runtime: ServiceRuntime,
    publisher: Publisher,
    *,
    lag_ms: Callable[[], int] = lambda: 0,
    status: Callable[[], str] = lambda: "ok",
) -> HeartbeatSender:
    """Add the heartbeat actor every service runs."""
    settings = runtime.settings
    actor = HeartbeatSender(
        runtime.service,
        settings.effective_run_id(),
        settings.mode,
        publisher,
        interval_ms=settings.heartbeat_interval_ms,
        lag_ms=lag_ms,
        status=status,
        registry=runtime.registry,
    )
    runtime.supervisor.add(actor)
    return actor
