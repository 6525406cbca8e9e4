"""The ingest client against the in-process simulator and the session's real redis-server.

The reader and processor are built as ``services.ingest.__main__.build`` builds them, on an
injected registry, with Redis keys under a prefix of the test's own (so streams never mix).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from websockets.asyncio.client import connect

from libs.common import names
from libs.common.io.deadletter import DeadLetters
from libs.common.io.redis_io import Publisher, StreamReader
from libs.common.io.security import redis_client as secured_redis_client
from libs.common.names import Keys
from libs.common.runtime.logs import configure_logging
from libs.common.runtime.service import EXIT_CONFIG
from libs.common.runtime.settings import (
    Secret,
    SettingsError,
    describe_settings,
    load_settings,
    public_view,
)
from libs.common.schemas import DeadLetter, FeedGap, Ledger, TickBatch, decode
from services.ingest import protocol
from services.ingest.client import (
    CLOSED,
    CONNECT_FAILED,
    CONNECTION_LOST,
    FeedReader,
    Frame,
    FrameProcessor,
    IngestMetrics,
    subscription_topics,
)
from services.ingest.config import IngestSettings
from services.ingest.protocol import Event, TradeEvent
from services.ingest.publishing import FeedPublisher
from services.ingest.simulator import PolygonSimulator, SimulatorSettings, SyntheticFeed
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
KEY = "ingest-client-test-key-3c9e51"
SIM = SimulatorSettings(
    api_key=Secret(KEY),
    port=0,
    feed=SyntheticFeed(symbols=5, rate_per_s=2_000, seed=11),
    minute_aggregates=False,
    auth_timeout_s=5.0,
    close_timeout_s=1.0,
)
DEAD_LETTER_SOURCE = "polygon.ws"


@dataclass
class Ingest:
    """One reader + processor on their own registry and Redis key prefix."""

    reader: FeedReader
    processor: FrameProcessor
    registry: CollectorRegistry
    keys: Keys
    streams: StreamReader
    fatal: list[str] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def status(self, status: str) -> float:
        return self.metric("tickmesh_ingest_statuses_total", status=status)

    def reconnects(self, reason: str | None = None) -> float:
        if reason is not None:
            return self.metric("tickmesh_ingest_reconnects_total", reason=reason)
        return sum(
            sample.value
            for metric in self.registry.collect()
            if metric.name == "tickmesh_ingest_reconnects"
            for sample in metric.samples
            if sample.name.endswith("_total")
        )

    @property
    def ticks(self) -> int:
        return self.processor.ticks_published


@asynccontextmanager
async def simulator(**overrides: Any) -> AsyncIterator[PolygonSimulator]:
    feed = overrides.pop("custom_feed", None)
    async with PolygonSimulator(replace(SIM, **overrides), feed=feed) as sim:
        yield sim


@asynccontextmanager
async def running_ingest(
    url: str,
    redis_client: Any,
    prefix: str,
    *,
    key: str = KEY,
    topics: tuple[str, ...] = ("T.*",),
    queue_size: int = 1_000,
    batch_frames: int = 64,
    publisher: Callable[[Publisher], Any] | None = None,
    lag_warning_ms: int = 60_000,
    queue_warning_ratio: float = 0.5,
    **reader_options: Any,
) -> AsyncIterator[Ingest]:
    registry = CollectorRegistry()
    keys = Keys(f"{prefix}:")
    real = Publisher(redis_client, keys=keys, registry=registry)
    used = publisher(real) if publisher is not None else real
    metrics = IngestMetrics(registry)
    processor = FrameProcessor(
        FeedPublisher(used, registry=registry),
        DeadLetters(real, "ingest", registry=registry),
        metrics,
        queue_size=queue_size,
        batch_frames=batch_frames,
        source=DEAD_LETTER_SOURCE,
        lag_warning_ms=lag_warning_ms,
        registry=registry,
    )
    fatal: list[str] = []
    options: dict[str, Any] = {
        "initial_delay_s": 0.05,
        "max_delay_s": 1.0,
        "max_connections_delay_s": 0.5,
        "auth_timeout_s": 3.0,
    }
    options.update(reader_options)
    reader = FeedReader(
        url,
        Secret(key),
        list(topics),
        processor,
        metrics,
        on_fatal=fatal.append,
        queue_warning_ratio=queue_warning_ratio,
        registry=registry,
        rng=random.Random(5),
        **options,
    )
    await processor.start()
    await reader.start()
    try:
        yield Ingest(reader, processor, registry, keys, StreamReader(redis_client, keys), fatal)
    finally:
        await reader.stop(2.0)
        await processor.stop(5.0)


async def idle_feed() -> AsyncIterator[list[Event]]:
    """A feed that never sends anything (for fault-only tests)."""
    await asyncio.Event().wait()
    yield []


async def test_trades_flow_to_ticks_channels_with_gapless_seqs_and_the_stream_holds_them(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    total = 1_500
    pubsub = redis_client.pubsub()
    await pubsub.psubscribe("ticks.*")
    assert (await pubsub.get_message(timeout=2))["type"] == "psubscribe"
    received: dict[str, list[bytes]] = {}

    async def listen() -> None:
        while sum(len(TickBatch_ticks(p)) for ps in received.values() for p in ps) < total:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                received.setdefault(message["channel"].decode(), []).append(message["data"])

    try:
        async with (
            simulator(max_events=total) as sim,
            running_ingest(sim.url, redis_client, unique_name("tm")) as ingest,
        ):
            async with asyncio.timeout(20):
                await listen()
            await eventually(lambda: ingest.ticks == total)
            channels = await ingest.streams.channels("ticks.*")
            assert set(channels) == set(received) and len(channels) == 5
            seen = 0
            for channel in channels:
                stored = await ingest.streams.read(channel, count=10_000)
                assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
                assert [payload for _, payload in stored] == received[channel]
                for seq, payload in stored:
                    batch = msgspec.json.decode(payload, type=TickBatch)
                    assert batch.seq == seq and channel == f"ticks.{batch.sym}"
                    assert batch.ticks and all(tick.sym == batch.sym for tick in batch.ticks)
                    seen += len(batch.ticks)
            assert seen == total
            assert ingest.metric("tickmesh_ingest_events_total", type="T") == total
            assert ingest.metric("tickmesh_ingest_frames_total") > 0
            assert ingest.metric("tickmesh_ingest_publish_latency_seconds_count") > 0
    finally:
        await pubsub.aclose()


def TickBatch_ticks(payload: bytes) -> list[Any]:
    return msgspec.json.decode(payload, type=TickBatch).ticks


async def test_statuses_are_logged_and_counted_by_kind_and_only_subscribed_symbols_arrive(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    topics = ("T.S0001", "T.S0002", "Q.S0001")
    with structlog.testing.capture_logs() as logs:
        async with (
            simulator() as sim,
            running_ingest(sim.url, redis_client, unique_name("tm"), topics=topics) as ingest,
        ):
            await eventually(lambda: ingest.ticks >= 100)
            assert ingest.status("connected") == 1
            assert ingest.status("auth_success") == 1
            assert ingest.status("success") == len(topics)
            assert ingest.metric("tickmesh_ingest_connected") == 1
            assert ingest.reader.connected
            assert set(await ingest.streams.channels("ticks.*")) == {"ticks.S0001", "ticks.S0002"}
    lines = [entry for entry in logs if entry["event"] == "ingest.status"]
    assert {(entry["status"], entry["count"]) for entry in lines} == {
        ("connected", 1),
        ("auth_success", 1),
        ("success", 3),
    }


async def test_an_error_status_is_counted_and_logged_and_the_session_goes_on(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with (
            simulator() as sim,
            running_ingest(
                sim.url, redis_client, unique_name("tm"), topics=("T.S0001", "LULD.S0001")
            ) as ingest,
        ):
            await eventually(lambda: ingest.status("error") == 1 and ingest.ticks >= 50)
            assert ingest.status("success") == 1 and ingest.reconnects() == 0
    error = next(
        entry for entry in logs if entry["event"] == "ingest.status" and entry["status"] == "error"
    )
    assert error["log_level"] == "warning" and "LULD.S0001" in error["message"]


async def test_auth_failed_is_fatal_once_with_a_clear_message_and_never_retried(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    async with (
        simulator() as sim,
        running_ingest(sim.url, redis_client, unique_name("tm"), key="not-the-key-8812") as ingest,
    ):
        await eventually(lambda: ingest.fatal)
        # No hot loop: well past several initial delays, still one attempt and no reconnect.
        await asyncio.sleep(0.5)
        assert len(ingest.fatal) == 1
        assert "auth_failed" in ingest.fatal[0] and "POLYGON_API_KEY" in ingest.fatal[0]
        assert "not retrying" in ingest.fatal[0]
        assert ingest.reader.fatal == ingest.fatal[0]
        assert sim.stats.connections_total == 1 and ingest.reader.sessions == 1
        assert ingest.reader.delays == [] and ingest.reconnects() == 0
        assert ingest.status("auth_failed") == 1
        assert not ingest.reader.connected


async def test_auth_timeout_reconnects_with_growing_delays_until_auth_succeeds(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    # auth_timeout_s=0: the simulator answers every connection with auth_timeout at once.
    async with (
        simulator(auth_timeout_s=0.0) as sim,
        running_ingest(sim.url, redis_client, unique_name("tm")) as ingest,
    ):
        await eventually(lambda: ingest.reconnects("auth_timeout") >= 3)
        assert ingest.status("auth_timeout") >= 3 and not ingest.fatal
        delays = ingest.reader.delays[:3]
        assert delays[0] < delays[1] < delays[2], delays
        sim.settings = replace(sim.settings, auth_timeout_s=5.0)
        await eventually(lambda: ingest.ticks >= 100)
        assert ingest.status("auth_success") == 1


async def test_max_connections_backs_off_longer_and_says_why(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    async with simulator() as sim:
        # Another session holds the key's only connection.
        async with connect(sim.url) as other:
            await other.recv()
            await other.send(protocol.encode_auth(KEY), text=True)
            assert b"auth_success" in await other.recv(decode=False)
            with structlog.testing.capture_logs() as logs:
                async with running_ingest(
                    sim.url,
                    redis_client,
                    unique_name("tm"),
                    initial_delay_s=0.05,
                    max_connections_delay_s=0.5,
                ) as ingest:
                    await eventually(lambda: ingest.reconnects("max_connections") >= 1)
                    assert 0.4 <= ingest.reader.delays[0] <= 0.6, ingest.reader.delays
                    await other.close()
                    await eventually(lambda: ingest.ticks >= 100)
        assert ingest.status("max_connections") >= 1
        why = [
            entry
            for entry in logs
            if entry["event"] == "ingest.reconnecting" and entry["reason"] == "max_connections"
        ]
        assert why and "another connection already uses this API key" in why[0]["why"]
        assert why[0]["log_level"] == "warning"


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("slow_consumer", "slow_consumer"),
        ("force_disconnect", "force_disconnect"),
        ("drop", CONNECTION_LOST),
    ],
)
async def test_a_disconnect_reconnects_reauthenticates_resubscribes_and_data_resumes(
    fault: str, reason: str, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    async with (
        simulator() as sim,
        running_ingest(
            sim.url, redis_client, unique_name("tm"), topics=("T.S0001", "T.S0002")
        ) as ingest,
    ):
        await eventually(lambda: ingest.ticks >= 50)
        assert sim.inject(fault) == 1
        await eventually(lambda: ingest.reconnects(reason) == 1)
        before = ingest.ticks
        await eventually(lambda: ingest.ticks >= before + 50)
        assert ingest.reader.sessions == 2 and ingest.reconnects() == 1
        assert ingest.status("auth_success") == 2 and ingest.status("success") == 4
        if fault != "drop":
            assert ingest.status(fault) == 1
        # Data had flowed, so the first attempt waits the initial delay (within jitter).
        assert 0.04 <= ingest.reader.delays[0] <= 0.06, ingest.reader.delays
        channels = await ingest.streams.channels("ticks.*")
        for channel in channels:  # one publisher across both sessions: still gapless
            seqs = [seq for seq, _ in await ingest.streams.read(channel, count=100_000)]
            assert seqs == list(range(1, len(seqs) + 1))
        # the time the socket was down is a gap: opened with the feed's time at the
        # disconnect, closed at the first trade after it
        gaps = [decode(p, FeedGap) for _, p in await ingest.streams.read(names.FEED_GAPS)]
        assert [g.status for g in gaps] == ["open", "closed"], gaps
        opened, closed = gaps
        assert opened.gapId == closed.gapId and opened.cause == closed.cause == reason
        assert 0 < closed.startMs <= closed.endMs
        assert ingest.metric("tickmesh_ingest_gaps_total", cause=reason) == 1


async def test_delays_grow_while_every_session_is_dropped_before_data_flows(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    async with (
        simulator(custom_feed=idle_feed()) as sim,
        running_ingest(
            sim.url, redis_client, unique_name("tm"), initial_delay_s=0.05, max_delay_s=2.0
        ) as ingest,
    ):

        async def drop_every_subscribed_session() -> None:
            while True:
                if ingest.reader.connected:
                    sim.inject("drop", count=0)
                await asyncio.sleep(0.005)

        dropper = asyncio.create_task(drop_every_subscribed_session())
        try:
            await eventually(lambda: len(ingest.reader.delays) >= 4, timeout=15)
        finally:
            dropper.cancel()
        delays = ingest.reader.delays[:4]
        # 0.05, 0.1, 0.2, 0.4 s, each within [0.8, 1.2] of that: strictly growing.
        assert all(a < b for a, b in itertools.pairwise(delays)), delays
        assert 0.04 <= delays[0] <= 0.06 and 0.32 <= delays[3] <= 0.48, delays
        assert ingest.reconnects(CONNECTION_LOST) >= 4 and ingest.reader.sessions >= 4
        assert ingest.status("auth_success") >= 4  # every session authenticated again


async def test_reconnect_delays_grow_while_the_server_is_down_and_data_resumes_after(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    first = PolygonSimulator(SIM)
    await first.start()
    port = first.port
    second: PolygonSimulator | None = None
    try:
        async with running_ingest(
            first.url, redis_client, unique_name("tm"), initial_delay_s=0.05, max_delay_s=2.0
        ) as ingest:
            await eventually(lambda: ingest.ticks >= 50)
            await first.stop()
            await eventually(lambda: len(ingest.reader.delays) >= 5, timeout=15)
            assert ingest.reconnects(CLOSED) == 1
            assert ingest.reconnects(CONNECT_FAILED) >= 4
            delays = ingest.reader.delays[:5]
            # 0.05, 0.1, 0.2, 0.4, 0.8 s, each within [0.8, 1.2] of that: strictly growing.
            assert all(a < b for a, b in itertools.pairwise(delays)), delays
            assert 0.04 <= delays[0] <= 0.06 and 0.6 <= delays[4] <= 1.0, delays
            before = ingest.ticks
            second = PolygonSimulator(replace(SIM, port=port))
            await second.start()
            await eventually(lambda: ingest.ticks >= before + 50, timeout=15)
            assert ingest.reader.connected and ingest.status("auth_success") == 2
    finally:
        if second is not None:
            await second.stop()
        await first.stop()


async def test_malformed_frames_go_to_the_dead_letter_with_raw_bytes_and_good_trades_flow(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    async with (
        simulator(custom_feed=idle_feed()) as sim,
        running_ingest(sim.url, redis_client, unique_name("tm"), topics=("T.ZMAL",)) as ingest,
    ):
        await eventually(lambda: ingest.status("success") == 1)
        assert sim.inject("malformed") == 1
        await eventually(lambda: ingest.ticks == 3)
        await eventually(lambda: ingest.metric("tickmesh_ingest_decode_errors_total") == 5)
        assert (
            ingest.metric("tickmesh_dead_letters_total", service="ingest", source_kind="polygon")
            == 5
        )
        stored = await ingest.streams.read(names.DEAD_LETTERS)
        letters = [msgspec.json.decode(payload, type=DeadLetter) for _, payload in stored]
        assert [seq for seq, _ in stored] == [1, 2, 3, 4, 5]
        assert {letter.source for letter in letters} == {DEAD_LETTER_SOURCE}
        assert all(letter.error and letter.service == "ingest" for letter in letters)
        raws = [letter.raw for letter in letters]
        assert raws[0] == b'[{"ev":"T","sym":"ZMAL","p":1'  # truncated: the whole frame
        assert raws[1].startswith(b'{"ev":"T","sym":"ZMAL"')  # not an array: the whole frame
        assert raws[2].startswith(b'{"ev":"XYZ"')  # the unknown event alone
        assert b'"malformed-bad-2"' in raws[3] and b'"p":"abc"' in raws[4]
        ((_, payload),) = await ingest.streams.read("ticks.ZMAL")
        batch = msgspec.json.decode(payload, type=TickBatch)
        assert [tick.i.rsplit("-", 1)[0] for tick in batch.ticks] == [
            "malformed-good-1",
            "malformed-good-3",
            "malformed-good-5",
        ]
        assert ingest.reader.connected and ingest.reconnects() == 0


class GatedPublisher:
    """A publisher whose round trips wait for ``gate`` (a processor made slow on purpose)."""

    def __init__(self, real: Publisher) -> None:
        self.real = real
        self.gate = asyncio.Event()
        self.waiting = 0

    async def publish_many(self, items: Any, **options: Any) -> list[int]:
        self.waiting += 1
        await self.gate.wait()
        return await self.real.publish_many(items, **options)

    async def publish(self, channel: str, record: Any) -> int:
        return await self.real.publish(channel, record)


@pytest.mark.timeout(120)
async def test_a_slow_processor_fills_the_queue_with_a_warning_while_the_reader_keeps_reading(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    gated: list[GatedPublisher] = []

    def wrap(real: Publisher) -> GatedPublisher:
        gated.append(GatedPublisher(real))
        return gated[0]

    queue_size = 8
    with structlog.testing.capture_logs() as logs:
        async with (
            simulator() as sim,
            running_ingest(
                sim.url,
                redis_client,
                unique_name("tm"),
                queue_size=queue_size,
                batch_frames=1,
                publisher=wrap,
                queue_warning_ratio=0.5,
                lag_warning_ms=100,
            ) as ingest,
        ):
            publisher = gated[0]
            mailbox = ingest.processor.mailbox
            # The processor holds one frame, stuck in its first round trip; the reader goes
            # on reading and queues frames up to the bound, then waits (nothing dropped).
            await eventually(lambda: len(mailbox) == queue_size)
            assert publisher.waiting == 1 and ingest.ticks == 0
            assert ingest.metric("tickmesh_ingest_queue_depth") == queue_size
            assert ingest.metric("tickmesh_ingest_queue_capacity") == queue_size
            assert ingest.metric("tickmesh_ingest_frames_received_total") >= queue_size + 1 + 3
            assert ingest.metric("tickmesh_ingest_warnings_total", kind="queue") == 1
            await eventually(lambda: ingest.metric("tickmesh_ingest_queue_full_total") >= 1)
            assert ingest.reader.connected and ingest.reconnects() == 0
            await asyncio.sleep(0.3)  # let the oldest queued events age past the lag threshold
            before_release = [entry["event"] for entry in logs]
            publisher.gate.set()
            await eventually(lambda: ingest.ticks >= 500, timeout=30)
            # the lag of the frames that waited (the gauge's value then; by now ingest may have
            # caught up, and a frame published in the millisecond it was sent reads 0)
            (lag,) = [e["lag_ms"] for e in logs if e["event"] == "ingest.feed_lag_high"]
            assert lag >= 300
            assert ingest.metric("tickmesh_ingest_warnings_total", kind="lag") == 1
            await eventually(lambda: len(mailbox) < queue_size // 4, timeout=30)
    # One warning for the episode (once it drains, falling behind again is a new episode).
    assert before_release.count("ingest.queue_filling") == 1
    assert before_release.count("ingest.reader_paused") == 1
    assert "ingest.feed_lag_high" in [entry["event"] for entry in logs]
    filling = next(entry for entry in logs if entry["event"] == "ingest.queue_filling")
    assert filling["log_level"] == "warning" and filling["threshold"] == queue_size // 2
    assert filling["depth"] >= queue_size // 2


class FlakyPublisher:
    """Fails the first ``failures`` round trips with a retriable Redis error."""

    def __init__(self, real: Publisher, failures: int) -> None:
        self.real = real
        self.failures = failures
        self.calls = 0

    async def publish_many(self, items: Any, **options: Any) -> list[int]:
        self.calls += 1
        if self.calls <= self.failures:
            raise RedisConnectionError("connection reset (injected)")
        return await self.real.publish_many(items, **options)


def flaky_processor(
    redis_client: Any, keys: Keys, failures: int, registry: CollectorRegistry, retry_s: float = 30.0
) -> tuple[FrameProcessor, FlakyPublisher]:
    """A frame processor whose publishes fail ``failures`` times first (real Redis after)."""
    real = Publisher(redis_client, keys=keys, registry=registry)
    flaky = FlakyPublisher(real, failures=failures)
    processor = FrameProcessor(
        FeedPublisher(flaky, retry_s=retry_s, registry=registry),  # type: ignore[arg-type]
        DeadLetters(real, "ingest", registry=registry),
        IngestMetrics(registry),
        queue_size=10,
        registry=registry,
    )
    return processor, flaky


async def test_a_retriable_redis_error_is_retried_and_the_frames_are_published_once(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    keys = Keys(f"{unique_name('tm')}:")
    processor, flaky = flaky_processor(redis_client, keys, 2, CollectorRegistry())
    trades = [
        TradeEvent("ZRTY", 10.0 + n, 100, 1_700_000_000_000 + n, 4, (), str(n), 3, n)
        for n in range(5)
    ]
    await processor.start()
    try:
        for trade in trades:
            await processor.tell(Frame(protocol.encode_events([trade]), 1))
        await eventually(lambda: processor.ticks_published == 5)
    finally:
        await processor.stop()
    stored = await StreamReader(redis_client, keys).read("ticks.ZRTY")
    assert [seq for seq, _ in stored] == [1, 2, 3, 4, 5] and flaky.calls == 3  # one batch


async def test_a_batch_that_failed_past_the_retry_budget_is_sent_first_after_the_restart(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    registry = CollectorRegistry()
    keys = Keys(f"{unique_name('tm')}:")
    # Redis unreachable until told otherwise, past a 0.3 s retry budget
    processor, flaky = flaky_processor(redis_client, keys, 10**9, registry, retry_s=0.3)
    first, second = (
        TradeEvent("KEPT", 10.0 + n, 100, 1_700_000_000_000 + n, 4, (), str(n), 3, n)
        for n in (1, 2)
    )
    stream = StreamReader(redis_client, keys)
    unsent = "tickmesh_ingest_unsent_batches"
    await processor.start()
    try:
        failed = processor.failure
        await processor.tell(Frame(protocol.encode_events([first]), 1))
        assert isinstance(await asyncio.wait_for(failed, 10), RedisConnectionError)
        assert registry.get_sample_value(unsent) == 1
        flaky.failures = flaky.calls  # Redis is back
        await processor.stop()  # and started again, as the supervisor does
        await processor.start()
        await processor.tell(Frame(protocol.encode_events([second]), 2))

        async def published() -> list[str]:
            return [
                trade.i
                for _, payload in await stream.read("ticks.KEPT")
                for trade in decode(payload, TickBatch).ticks
            ]

        for _ in range(100):
            if len(await published()) == 2:
                break
            await asyncio.sleep(0.05)
    finally:
        await processor.stop()
    assert await published() == ["1", "2"]  # the kept batch first, each once
    ledgers = [decode(payload, Ledger) for _, payload in await stream.read(names.LEDGER)]
    assert sum(entry.trades for ledger in ledgers for entry in ledger.entries) == 2
    assert registry.get_sample_value(unsent) == 0


async def test_batch_records_admit_a_round_trips_trades_once_each_and_close_the_gap_at_the_first(
    redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    registry = CollectorRegistry()
    keys = Keys(f"{unique_name('tm')}:")
    real = Publisher(redis_client, keys=keys, registry=registry)
    feed = FeedPublisher(real, registry=registry)
    processor = FrameProcessor(
        feed,
        DeadLetters(real, "ingest", registry=registry),
        IngestMetrics(registry),
        queue_size=10,
        one_record_per_batch=True,
        registry=registry,
    )
    base = 1_700_000_000_000

    def trade(sym: str, dt: int, i: int) -> TradeEvent:
        return TradeEvent(sym, 10.0 + i, 100, base + dt, 4, (), str(i), 3, i)

    frames = [
        [trade("AAA", 10, 1), trade("BBB", 12, 1)],
        [trade("AAA", 11, 2), trade("AAA", 10, 1)],  # the second: a copy of the first frame's
        [trade("BBB", 13, 2)],
    ]
    feed.open_gap("test")
    await processor.start()
    try:
        for n, events in enumerate(frames):  # queued together: one round trip
            assert processor.tell_nowait(Frame(protocol.encode_events(events), n))
        await eventually(lambda: processor.ticks_published == 4)
    finally:
        await processor.stop()
    stream = StreamReader(redis_client, keys)
    records = {sym: await stream.read(f"ticks.{sym}") for sym in ("AAA", "BBB")}
    assert {sym: len(found) for sym, found in records.items()} == {"AAA": 1, "BBB": 1}
    ids = {
        sym: [tick.i for _, payload in found for tick in decode(payload, TickBatch).ticks]
        for sym, found in records.items()
    }
    assert ids == {"AAA": ["1", "2"], "BBB": ["1", "2"]}
    (ledger,) = [decode(payload, Ledger) for _, payload in await stream.read(names.LEDGER)]
    assert sum(entry.trades for entry in ledger.entries) == 4 and ledger.duplicates == 1
    (closed,) = [decode(payload, FeedGap) for _, payload in await stream.read(names.FEED_GAPS)]
    assert closed.status == "closed" and closed.endMs == base + 10  # the first trade's time


def test_topics_cover_a_symbol_list_or_everything_for_the_configured_event_types() -> None:
    assert subscription_topics(["*"], ["T"]) == ["T.*"]
    assert subscription_topics(["spy", "*", "IBM"], ["T", "AM"]) == ["T.*", "AM.*"]
    assert subscription_topics(["spy", "IBM", "SPY"], ["T", "AM"]) == [
        "T.SPY",
        "T.IBM",
        "AM.SPY",
        "AM.IBM",
    ]
    with pytest.raises(ValueError, match="unknown Polygon event types"):
        subscription_topics(["SPY"], ["T", "LULD"])
    settings = load_settings(IngestSettings, {"INGEST_SYMBOLS": "*", "INGEST_EVENT_TYPES": "T,Q"})
    assert subscription_topics(settings.symbols, settings.event_types) == ["T.*", "Q.*"]
    with pytest.raises(SettingsError, match="INGEST_EVENT_TYPES"):
        load_settings(IngestSettings, {"INGEST_EVENT_TYPES": "T,LULD"})
    with pytest.raises(SettingsError, match="INGEST_SOURCE"):
        load_settings(IngestSettings, {"INGEST_SOURCE": "kafka"})
    with pytest.raises(SettingsError, match="INGEST_FILES"):
        load_settings(IngestSettings, {"INGEST_SOURCE": "files"})


def test_the_help_lists_the_run_simulate_and_replay_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.ingest", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for command in ("run", "simulate", "replay", "POLYGON_API_KEY", "INGEST_SPEED"):
        assert command in result.stdout, command


# ---- the key never leaks -----------------------------------------------------------------

LEAK_KEY = "LEAKCHECK-a8f3e2d1c0b9"
WRONG_KEY = "WRONGKEY-77d6c5b4a3f2"
LEAK_REDIS = "LEAKREDIS-5e4d3c2b1a09"
LEAK_KAFKA = "LEAKKAFKA-0a1b2c3d4e5f"
LEAK_KEY_PASSWORD = "LEAKKEYPW-9f8e7d6c5b4a"
SECRET_ENV = {
    "POLYGON_API_KEY": LEAK_KEY,
    "INGEST_REDIS_USERNAME": "ingest",
    "INGEST_REDIS_PASSWORD": LEAK_REDIS,
    "TICKMESH_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "TICKMESH_KAFKA_SASL_USERNAME": "ingest",
    "TICKMESH_KAFKA_SASL_PASSWORD": LEAK_KAFKA,
    "TICKMESH_KAFKA_SSL_KEY_PASSWORD": LEAK_KEY_PASSWORD,
}
ALL_LEAKS = (LEAK_KEY, WRONG_KEY, LEAK_REDIS, LEAK_KAFKA, LEAK_KEY_PASSWORD)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Everything logged, as the service logs it (structlog JSON through stdlib), at DEBUG
    for every logger, websockets and redis included, into a buffer; restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    noisy = ("websockets", "redis", "asyncio")
    saved_levels = {name: logging.getLogger(name).level for name in noisy}
    configure_logging("ingest", "debug", "json")
    # Not cached, so every logger (and later tests' capture_logs) sees today's configuration.
    structlog.configure(cache_logger_on_first_use=False)
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
    for name in noisy:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


async def test_the_api_key_never_appears_in_logs_metrics_reprs_or_errors(
    redis_client: Any,
    unique_name: Callable[[str], str],
    json_logs: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = load_settings(IngestSettings, SECRET_ENV)
    assert settings.polygon_api_key.reveal() == LEAK_KEY
    assert settings.redis_password.reveal() == LEAK_REDIS
    assert settings.kafka_sasl_password.reveal() == LEAK_KAFKA
    shown = [
        repr(settings),
        str(settings),
        str(public_view(settings)),
        repr(settings.polygon_api_key),
        f"{settings.polygon_api_key}",
        f"{settings.redis_password} {settings.kafka_sasl_password!r}",
        describe_settings(IngestSettings),
        repr(secured_redis_client(settings, name="leak-check")),
        repr(protocol.ClientAction("auth", LEAK_KEY)),
        str(protocol.ClientAction("auth", LEAK_KEY)),
    ]
    async with simulator(api_key=Secret(LEAK_KEY)) as sim:
        async with running_ingest(sim.url, redis_client, unique_name("tm"), key=LEAK_KEY) as ingest:
            await eventually(lambda: ingest.ticks >= 50)
            sim.inject("drop")  # a reconnect authenticates again
            await eventually(lambda: ingest.status("auth_success") == 2)
            shown += [
                repr(ingest.reader),
                repr(vars(ingest.reader)),
                repr(ingest.processor),
                generate_latest(ingest.registry).decode(),
            ]
        async with running_ingest(
            sim.url, redis_client, unique_name("tm"), key=WRONG_KEY
        ) as refused:
            await eventually(lambda: refused.fatal)
            shown += [
                *refused.fatal,
                repr(refused.reader),
                generate_latest(refused.registry).decode(),
            ]
    captured = capsys.readouterr()
    logged = json_logs.getvalue()
    # The capture is real: websockets' own frame logs and ours are in it.
    assert "> TEXT" in logged and "< TEXT" in logged
    assert "ingest.subscribed" in logged and "auth_failed" in logged
    for text in [logged, captured.out, captured.err, *shown]:
        for secret in ALL_LEAKS:
            assert secret not in text
    # Not even a piece of it (websockets elides long frames to their head and tail).
    for piece in (LEAK_KEY[:8], LEAK_KEY[-8:], WRONG_KEY[:8], WRONG_KEY[-8:]):
        assert piece not in logged
    assert "auth message redacted" in logged


async def test_the_service_exits_non_zero_on_a_refused_key_with_a_clear_line_and_no_key(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    async with simulator(api_key=Secret(LEAK_KEY)) as sim:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "INGEST_REDIS_URL": redis_url,
            "INGEST_POLYGON_URL": sim.url,
            "POLYGON_API_KEY": WRONG_KEY,
            "INGEST_HTTP_PORT": "0",
            "INGEST_HTTP_HOST": "127.0.0.1",
            "INGEST_KEY_PREFIX": f"{unique_name('tm')}:",
            "INGEST_LOG_LEVEL": "debug",
            "INGEST_LOG_FORMAT": "json",
            "INGEST_RECONNECT_INITIAL_S": "0.05",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.ingest",
            "run",
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(40):
            out, err = await process.communicate()
        assert sim.stats.connections_total == 1  # one try, no retry
    text = out.decode() + err.decode()
    assert process.returncode == EXIT_CONFIG, text[-3_000:]
    fatal = [line for line in text.splitlines() if "service.fatal" in line]
    assert len(fatal) == 1, text[-3_000:]
    assert "auth_failed" in fatal[0] and "POLYGON_API_KEY" in fatal[0]
    assert WRONG_KEY not in text and LEAK_KEY not in text
