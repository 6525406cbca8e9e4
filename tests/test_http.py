"""The health endpoint: /metrics, /healthz and /readyz that follows its checks."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter

from libs.common.runtime.http import HealthServer


async def get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_health_and_readiness() -> None:
    registry = CollectorRegistry()
    Counter("demo_events", "demo", registry=registry).inc(3)
    server = HealthServer(registry, "127.0.0.1", 0)
    redis_up = {"value": False}
    server.add_readiness("redis", lambda: redis_up["value"])

    async def kafka() -> bool:
        return True

    server.add_readiness("kafka", kafka)
    port = await server.start()
    try:
        status, body = await get(port, "/metrics")
        assert status == 200 and b"demo_events_total 3.0" in body
        assert (await get(port, "/healthz"))[0] == 200
        status, body = await get(port, "/readyz")
        assert status == 503 and b'"redis":false' in body
        redis_up["value"] = True
        assert (await get(port, "/readyz"))[0] == 200
        server.healthy = False
        assert (await get(port, "/healthz"))[0] == 503
        assert (await get(port, "/nope"))[0] == 404
    finally:
        await server.stop()
