"""SequencedConsumer: order, gap backfill, restart, rewind, pause-when-behind, resubscribe."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Self

import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from devstack.localstack import RedisServer
from libs.common.io.redis_io import Publisher
from libs.common.io.reliable import Record, SequencedConsumer
from libs.common.names import Keys
from libs.common.schemas import TickBatch, Trade
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def tick_record(symbol: str, count: int = 1) -> TickBatch:
    """A small TickBatch with ``count`` trades."""
    return TickBatch(
        seq=0,
        sym=symbol,
        ticks=[
            Trade(sym=symbol, p=100.0 + i / 100, s=100, t=1_381_152_600_000 + i)
            for i in range(count)
        ],
    )


async def write_without_doorbell(
    client: aioredis.Redis, keys: Keys, channel: str, seq: int, symbol: str
) -> bytes:
    """What the publish script does for record ``seq`` of ``channel`` but its PUBLISH: the
    counter and the stream have it, its pub/sub message is still on the way (or lost)."""
    payload = msgspec.json.encode(msgspec.structs.replace(tick_record(symbol), seq=seq))
    await client.incr(keys.seq(channel))
    await client.xadd(keys.stream(channel), {"d": payload}, id=f"0-{seq}")
    return payload


class Collector:
    """Runs ``batches()`` in a task and keeps what it delivered."""

    def __init__(self, consumer: SequencedConsumer, *, commit: bool = True) -> None:
        self.consumer = consumer
        self.commit = commit
        self.records: list[Record] = []
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        self.gen = self.consumer.batches()
        async for batch in self.gen:
            self.records.extend(batch)
            if self.commit:
                await self.consumer.commit(batch)

    async def __aenter__(self) -> Self:
        await self.consumer.open()
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.close()

    def seqs(self, channel: str) -> list[int]:
        return [r.seq for r in self.records if r.channel == channel]


@pytest.fixture
async def keys(unique_name) -> Keys:  # type: ignore[no-untyped-def]
    return Keys(unique_name("tm") + ":")


@pytest.fixture
def publisher(redis_client: aioredis.Redis, keys: Keys) -> Publisher:
    """A publisher into this test's keys."""
    return Publisher(redis_client, keys=keys)


async def test_delivers_in_order_and_reads_what_was_published_before_it_started(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    channel = f"ticks.{unique_name('A')}"
    for _ in range(5):
        await publisher.publish(channel, tick_record("A"))
    consumer = SequencedConsumer(
        redis_client,
        "c1",
        ["ticks.*"],
        keys=keys,
        sweep_interval_s=0.1,
        registry=CollectorRegistry(),
    )
    async with Collector(consumer) as collector:
        for _ in range(5):
            await publisher.publish(channel, tick_record("A"))
        await eventually(lambda: len(collector.seqs(channel)) == 10, timeout=10)
    assert collector.seqs(channel) == list(range(1, 11))


async def test_a_shard_subscribes_to_its_own_channels_only_and_finds_new_ones(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    mine, other, later = (f"ticks.{unique_name(name)}" for name in ("OWN", "OTHER", "LATER"))
    owned = {mine, later}
    for channel in (mine, other):  # before it starts: read from the streams
        await publisher.publish(channel, tick_record("A"))
    registry = CollectorRegistry()
    consumer = SequencedConsumer(
        redis_client,
        "c-own",
        ["ticks.*"],
        keys=keys,
        accept=owned.__contains__,
        subscribe_own=True,
        sweep_interval_s=0.1,
        discover_interval_s=0.2,
        registry=registry,
    )

    async def subscribers() -> dict[str, int]:
        counts = await redis_client.pubsub_numsub(mine, other, later)
        return {(c.decode() if isinstance(c, bytes) else c): n for c, n in counts}

    def from_stream() -> float:
        value = registry.get_sample_value(
            "tickmesh_consumer_backfilled_records_total", {"consumer": "c-own"}
        )
        return value or 0.0

    async with Collector(consumer) as collector:
        for _ in range(4):
            for channel in (mine, other):
                await publisher.publish(channel, tick_record("A"))
        await eventually(lambda: len(collector.seqs(mine)) == 5, timeout=10)
        for _ in range(3):  # a channel that appears while it runs
            await publisher.publish(later, tick_record("A"))
        await eventually(lambda: len(collector.seqs(later)) == 3, timeout=10)
        for _ in range(50):
            if await subscribers() == {mine: 1, other: 0, later: 1}:
                break
            await asyncio.sleep(0.1)
        assert await subscribers() == {mine: 1, other: 0, later: 1}
        await asyncio.sleep(0.3)  # let a sweep pass: nothing is left to read from the streams
        read_from_streams = from_stream()
        for _ in range(5):  # subscribed now: delivered by pub/sub, not read from the stream
            await publisher.publish(mine, tick_record("A"))
        await eventually(lambda: len(collector.seqs(mine)) == 10, timeout=10)
        assert from_stream() == read_from_streams
    assert collector.seqs(mine) == list(range(1, 11))
    assert collector.seqs(later) == [1, 2, 3]
    assert collector.seqs(other) == []


async def test_starting_at_latest_skips_old_records_not_a_channel_that_appears_later(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    old, new = f"ticks.{unique_name('OLD')}", f"ticks.{unique_name('NEW')}"
    for _ in range(3):
        await publisher.publish(old, tick_record("A"))
    consumer = SequencedConsumer(
        redis_client,
        "c-latest",
        ["ticks.*"],
        keys=keys,
        start="latest",
        sweep_interval_s=0.1,
        discover_interval_s=0.1,
        discover_healthy_interval_s=0.1,  # the doorbell never comes: a discovery finds it
        registry=CollectorRegistry(),
    )
    async with Collector(consumer) as collector:
        # a new channel's first record, found in its stream before its doorbell arrives
        # (here it never does): it was published after the start, so it is delivered
        await write_without_doorbell(redis_client, keys, new, 1, "B")
        await eventually(lambda: collector.seqs(new) == [1], timeout=10)
        await publisher.publish(old, tick_record("A"))
        await eventually(lambda: collector.seqs(old) == [4], timeout=10)
    assert collector.seqs(old) == [4]  # the three published before the start are skipped


async def test_a_healthy_pattern_subscription_scans_rarely_and_soon_after_a_lost_connection(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    first, quiet = f"ticks.{unique_name('FIRST')}", f"ticks.{unique_name('QUIET')}"
    await publisher.publish(first, tick_record("A"))
    consumer = SequencedConsumer(
        redis_client,
        "c-rare-scan",
        ["ticks.*"],
        keys=keys,
        sweep_interval_s=0.05,
        discover_interval_s=0.1,
        discover_healthy_interval_s=60.0,
        registry=CollectorRegistry(),
    )
    scans = 0
    scan = consumer.reader.channels

    async def counted(pattern: str | list[str] = "*") -> list[str]:
        nonlocal scans
        scans += 1
        return await scan(pattern)

    consumer.reader.channels = counted  # type: ignore[method-assign]
    async with Collector(consumer) as collector:
        await eventually(lambda: collector.seqs(first) == [1], timeout=10)
        for _ in range(10):  # a new channel's first record comes by pub/sub, not a scan
            await publisher.publish(first, tick_record("A"))
            await asyncio.sleep(0.1)
        await eventually(lambda: len(collector.seqs(first)) == 11, timeout=10)
        # the opening's discovery and one soon after subscribing; not one every 0.1 s
        assert scans == 2
        # a channel whose only record came while the connection was down: no doorbell
        await write_without_doorbell(redis_client, keys, quiet, 1, "B")
        consumer._note_resubscribed(None)  # what redis-py calls when it reconnected
        await eventually(lambda: collector.seqs(quiet) == [1], timeout=10)
        assert scans == 3


async def test_delivery_does_not_wait_for_a_slow_discovery_and_its_error_surfaces(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    channel, found_later = f"ticks.{unique_name('D')}", f"ticks.{unique_name('DL')}"
    await publisher.publish(channel, tick_record("A"))
    consumer = SequencedConsumer(
        redis_client,
        "c-slow-discovery",
        ["ticks.*", "bars.*"],
        keys=keys,
        subscribe_own=True,  # a new channel is found by the discovery alone
        sweep_interval_s=0.05,
        discover_interval_s=0.05,
        registry=CollectorRegistry(),
    )
    scan = consumer.reader.channels
    scanning, release = asyncio.Event(), asyncio.Event()
    failure: list[BaseException] = []

    async def slow_scan(patterns: object = "*") -> list[str]:
        # the keyspace scan of a busy Redis, held here as long as the test wants
        scanning.set()
        await release.wait()
        if failure:
            raise failure[0]
        return await scan(patterns)  # type: ignore[arg-type]

    async with Collector(consumer) as collector:
        await eventually(lambda: collector.seqs(channel) == [1], timeout=10)
        consumer.reader.channels = slow_scan  # type: ignore[method-assign]
        await asyncio.wait_for(scanning.wait(), 5)
        await write_without_doorbell(redis_client, keys, found_later, 1, "B")
        for _ in range(3):  # delivered while the discovery is stuck
            await publisher.publish(channel, tick_record("A"))
        await eventually(lambda: collector.seqs(channel) == [1, 2, 3, 4], timeout=5)
        assert collector.seqs(found_later) == []
        release.set()  # the scan ends: the channel it found is read from its stream
        await eventually(lambda: collector.seqs(found_later) == [1], timeout=10)

        scanning.clear()
        release.clear()
        failure.append(ConnectionError("Redis went away during the scan"))
        await asyncio.wait_for(scanning.wait(), 5)
        release.set()
        assert collector.task is not None
        with pytest.raises(ConnectionError, match="during the scan"):
            await asyncio.wait_for(collector.task, 5)


async def test_records_the_counter_has_and_the_stream_lost_are_counted_and_skipped(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    channel = f"ticks.{unique_name('GONE')}"
    for _ in range(2):
        await publisher.publish(channel, tick_record("A"))
    await redis_client.set(keys.seq(channel), 5)  # 3, 4, 5 counted and never in the stream
    registry = CollectorRegistry()
    consumer = SequencedConsumer(
        redis_client, "c-gone", ["ticks.*"], keys=keys, sweep_interval_s=0.1, registry=registry
    )
    async with Collector(consumer) as collector:
        await eventually(lambda: collector.seqs(channel) == [1, 2], timeout=10)
        # past the gone records at once, not sweeping for them again and again
        await eventually(lambda: consumer.positions[channel] == 5, timeout=10)
        await publisher.publish(channel, tick_record("A"))
        await eventually(lambda: collector.seqs(channel) == [1, 2, 6], timeout=10)
    lost = registry.get_sample_value("tickmesh_consumer_lost_records_total", {"consumer": "c-gone"})
    assert lost == 3
    assert consumer.positions[channel] == 6


async def test_restart_resumes_after_the_committed_position(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    channel = f"ticks.{unique_name('B')}"
    consumer = SequencedConsumer(
        redis_client,
        "c2",
        ["ticks.*"],
        keys=keys,
        sweep_interval_s=0.1,
        registry=CollectorRegistry(),
    )
    async with Collector(consumer) as collector:
        for _ in range(3):
            await publisher.publish(channel, tick_record("B"))
        await eventually(lambda: len(collector.seqs(channel)) == 3)
    for _ in range(4):  # while nobody listens
        await publisher.publish(channel, tick_record("B"))
    again = SequencedConsumer(
        redis_client,
        "c2",
        ["ticks.*"],
        keys=keys,
        sweep_interval_s=0.1,
        registry=CollectorRegistry(),
    )
    async with Collector(again) as collector:
        await eventually(lambda: len(collector.seqs(channel)) == 4)
    assert collector.seqs(channel) == [4, 5, 6, 7]


async def test_rewind_delivers_again_what_was_not_committed(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    channel = f"ticks.{unique_name('C')}"
    consumer = SequencedConsumer(
        redis_client,
        "c3",
        ["ticks.*"],
        keys=keys,
        sweep_interval_s=0.1,
        registry=CollectorRegistry(),
    )
    await consumer.open()
    batches = consumer.batches()
    try:
        for _ in range(3):
            await publisher.publish(channel, tick_record("C"))
        first: list[Record] = []
        while len(first) < 3:
            first += await asyncio.wait_for(anext(batches), 5)
        await consumer.commit(first[:1])  # the downstream took only seq 1
        consumer.rewind()
        again: list[Record] = []
        while len(again) < 2:
            again += await asyncio.wait_for(anext(batches), 5)
        assert [r.seq for r in again] == [2, 3]
    finally:
        await batches.aclose()
        await consumer.close()


async def test_a_full_queue_pauses_pubsub_and_the_streams_catch_up_without_loss(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    channel = f"ticks.{unique_name('D')}"
    registry = CollectorRegistry()
    consumer = SequencedConsumer(
        redis_client,
        "c4",
        ["ticks.*"],
        keys=keys,
        queue_max=10,
        batch_max=50,
        sweep_interval_s=0.2,
        registry=registry,
    )
    delivered: list[Record] = []
    slow = asyncio.Event()

    async def run() -> None:
        async for batch in consumer.batches():
            delivered.extend(batch)
            await consumer.commit(batch)
            if not slow.is_set():
                await asyncio.sleep(0.5)  # a slow downstream at first: the queue overflows

    await consumer.open()
    task = asyncio.create_task(run())
    try:
        for _ in range(20):
            await publisher.publish_many([(channel, tick_record("D"))] * 50)
        await eventually(lambda: consumer.falling_behind, timeout=10)
        slow.set()
        await eventually(lambda: len(delivered) >= 1000 and not consumer.falling_behind, timeout=30)
        await eventually(
            lambda: (
                registry.get_sample_value("tickmesh_consumer_pubsub_paused", {"consumer": "c4"})
                == 0
            )
        )
        # pub/sub is back: a new record arrives without waiting for a sweep
        await publisher.publish(channel, tick_record("D"))
        await eventually(lambda: len(delivered) == 1001, timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.close()
    seqs = [r.seq for r in delivered]
    assert seqs == list(range(1, 1002))
    assert (
        registry.get_sample_value("tickmesh_consumer_doorbells_dropped_total", {"consumer": "c4"})
        >= 1
    )


@pytest.fixture
def tiny_buffer_redis() -> AsyncIterator[RedisServer]:
    """A Redis that cuts a pub/sub client past 64 kB of unread output."""
    server = RedisServer(extra_args=["--client-output-buffer-limit", "pubsub", "64kb", "32kb", "1"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def publish_from_thread(
    url: str, keys: Keys, channel: str, record: TickBatch, count: int
) -> threading.Thread:
    """Publish ``count`` copies of ``record`` from another thread (its own event loop)."""

    async def publish() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            publisher = Publisher(client, keys=keys)
            for start in range(0, count, 500):
                await publisher.publish_many([(channel, record)] * min(500, count - start))
        finally:
            await client.aclose()

    thread = threading.Thread(target=asyncio.run, args=(publish(),))
    thread.start()
    return thread


async def test_a_subscriber_cut_by_redis_is_noticed_and_nothing_is_lost(
    tiny_buffer_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(tiny_buffer_redis.url)
    keys = Keys("tm:")
    registry = CollectorRegistry()
    consumer = SequencedConsumer(
        client,
        "c5",
        ["ticks.*"],
        keys=keys,
        queue_max=1_000_000,
        sweep_interval_s=0.2,
        pause_pubsub_when_behind=False,
        registry=registry,
    )
    sent = 5_000
    try:
        async with Collector(consumer) as collector:
            thread = publish_from_thread(
                tiny_buffer_redis.url, keys, "ticks.E", tick_record("E", 40), sent
            )
            # the reader's event loop is blocked while megabytes are published to it: Redis
            # cuts the subscriber at its 64 kB limit; the read fails (a subscriber error) or a
            # command's retry reconnects and re-subscribes (a resubscribe): either is counted
            thread.join(timeout=60)
            await eventually(lambda: len(collector.seqs("ticks.E")) == sent, timeout=30)
            await eventually(
                lambda: (
                    consumer.resubscribes
                    + (
                        registry.get_sample_value(
                            "tickmesh_consumer_subscriber_errors_total", {"consumer": "c5"}
                        )
                        or 0
                    )
                    >= 1
                ),
                timeout=5,
            )
        assert collector.seqs("ticks.E") == list(range(1, sent + 1))
        assert (
            registry.get_sample_value(
                "tickmesh_consumer_backfilled_records_total", {"consumer": "c5"}
            )
            or 0
        ) > 0
    finally:
        await client.aclose()


async def test_a_sweep_leaves_to_pubsub_what_pubsub_is_still_delivering(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    quiet, busy = f"ticks.{unique_name('Q')}", f"ticks.{unique_name('B')}"
    for channel in (quiet, busy):
        await publisher.publish(channel, tick_record("A"))
    registry = CollectorRegistry()
    consumer = SequencedConsumer(
        redis_client,
        "c-flight",
        ["ticks.*"],
        keys=keys,
        batch_max=2,
        sweep_interval_s=30,  # no periodic sweep after the opening one
        registry=registry,
    )
    async with Collector(consumer) as collector:
        await eventually(lambda: collector.seqs(quiet) == collector.seqs(busy) == [1], timeout=10)
        # quiet's record 2 is published, its message not yet arrived
        in_flight = await write_without_doorbell(redis_client, keys, quiet, 2, "A")
        # busy jumps from 1 to 5: longer than a batch's room, so a sweep runs at once
        for seq in (2, 3, 4):
            await write_without_doorbell(redis_client, keys, busy, seq, "A")
        await publisher.publish(busy, tick_record("A"))
        await eventually(lambda: collector.seqs(busy) == [1, 2, 3, 4, 5], timeout=10)
        assert collector.seqs(quiet) == [1]  # the sweep left it to pub/sub
        await redis_client.publish(quiet, in_flight)  # the message arrives
        await eventually(lambda: collector.seqs(quiet) == [1, 2], timeout=10)
    # read once, from pub/sub: not from the stream as well (then its message is a duplicate)
    duplicates = registry.get_sample_value(
        "tickmesh_consumer_duplicates_total", {"consumer": "c-flight"}
    )
    assert duplicates == 0


async def test_a_record_pubsub_never_delivered_is_read_from_its_stream(
    redis_client: aioredis.Redis, keys: Keys, unique_name, publisher: Publisher
) -> None:
    channel = f"ticks.{unique_name('MISS')}"
    registry = CollectorRegistry()
    consumer = SequencedConsumer(
        redis_client, "c-miss", ["ticks.*"], keys=keys, sweep_interval_s=0.1, registry=registry
    )
    async with Collector(consumer) as collector:
        await publisher.publish(channel, tick_record("A"))
        await eventually(lambda: collector.seqs(channel) == [1], timeout=10)
        # the channel's last record, its message lost (no later message reveals the gap)
        await write_without_doorbell(redis_client, keys, channel, 2, "A")
        await eventually(lambda: collector.seqs(channel) == [1, 2], timeout=10)
    assert (
        registry.get_sample_value(
            "tickmesh_consumer_backfilled_records_total", {"consumer": "c-miss"}
        )
        == 1
    )
