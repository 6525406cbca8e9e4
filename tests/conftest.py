"""Shared fixtures: real redis-server and Tansu (Kafka protocol), started lazily per session.

A test asks for ``redis_url``/``redis_client`` or ``kafka_bootstrap`` and gets a server that
lives for the whole session; a test that asks for neither starts nothing. Every test makes
its own channel/topic/group names with ``unique_name`` so tests never see each other's data.
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from uuid import uuid4

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# `from tests.helpers import eventually` must work wherever pytest is started from.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devstack.localstack import RedisServer, TansuBroker

SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "lean-equity-2013-10"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server (no persistence, default limits) for the session, on loopback.

    A test that needs other settings (e.g. a tiny ``client-output-buffer-limit`` to force a
    slow subscriber off) starts its own ``RedisServer(extra_args=[...])`` instead of
    changing this shared one.
    """
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[TansuBroker]:
    """One Tansu broker (memory storage) for the session; only started when a test asks.

    Do not stop or restart it from a test (others share it); ``pause()`` must be paired with
    ``resume()`` in a ``finally``.
    """
    broker = TansuBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of the session's redis-server."""
    return redis_server.url


@pytest.fixture
def kafka_bootstrap(kafka_broker: TansuBroker) -> str:
    """``127.0.0.1:PORT`` of the session's broker, for ``bootstrap_servers``."""
    if kafka_broker.paused:  # a previous test failed between pause() and resume()
        kafka_broker.resume()
    return kafka_broker.bootstrap


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[object]:
    """A ``redis.asyncio.Redis`` on the session server (bytes replies); closed afterwards.

    Nothing is flushed: tests isolate themselves with ``unique_name`` keys and channels.
    """
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of names unique to this test: ``unique_name("grp")`` -> ``grp-test_x-1a2b3c4d``.

    Only ``[A-Za-z0-9_-]`` after the prefix, short enough for a Kafka topic or group, so the
    result works as a Redis channel, a Kafka topic or group, or a symbol-ish suffix.
    """
    test_name = re.sub(r"[^A-Za-z0-9_-]+", "_", request.node.name).strip("_")[:60]

    def make(prefix: str = "t") -> str:
        suffix = f"{test_name}-{uuid4().hex[:8]}"
        return f"{prefix}-{suffix}" if prefix else suffix

    return make


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real LEAN equity tick/minute data for October 2013, or skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real data not found at {SHARED_DATA}: the tests that replay real ticks need the "
            "shared LEAN sample (../shared/data/lean-equity-2013-10 next to the repo)"
        )
    return SHARED_DATA
