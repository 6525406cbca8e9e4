"""Sequenced publishing against a real redis-server: seq, stream, pub/sub, recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

from libs.common.io.barstore import BarStore
from libs.common.io.redis_io import (
    Publisher,
    StreamReader,
    Subscriber,
    connect_redis,
    next_message,
    record_tail,
    redact_url,
)
from libs.common.names import Keys
from libs.common.schemas import Bar, TickBatch, Trade, decode, seq_of

pytestmark = pytest.mark.integration


@pytest.fixture
def keys(unique_name) -> Keys:  # type: ignore[no-untyped-def]
    """Key names of this test only."""
    return Keys(unique_name("k") + ":")


@pytest.fixture
def publisher(redis_client, keys: Keys) -> Publisher:  # type: ignore[no-untyped-def]
    """A publisher into this test's keys, with metrics of its own."""
    return Publisher(redis_client, keys=keys, registry=CollectorRegistry())


def batch(sym: str, price: float = 1.0) -> TickBatch:
    return TickBatch(0, sym, [Trade(sym, price, 100, 1_381_152_600_000)])


async def test_publish_assigns_gapless_per_channel_sequences_in_one_round_trip(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
    keys: Keys,
    publisher: Publisher,
) -> None:
    a, b = f"ticks.{unique_name('A')}", f"ticks.{unique_name('B')}"
    seqs = await publisher.publish_many([(a, batch("A")), (b, batch("B")), (a, batch("A"))])
    assert seqs == [1, 1, 2]
    reader = StreamReader(redis_client, keys)
    records = await reader.read(a)
    assert [seq for seq, _ in records] == [1, 2]
    assert [seq_of(payload) for _, payload in records] == [1, 2]
    assert decode(records[1][1], TickBatch).sym == "A"
    assert await reader.last_seq(a) == 2 and await reader.first_seq(a) == 1
    assert await reader.read(a, after_seq=1) == records[1:]


async def script_commands(redis_client) -> int:  # type: ignore[no-untyped-def]
    """SCRIPT EXISTS / LOAD calls the server has run so far."""
    stats = await redis_client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k.startswith("cmdstat_script"))


async def test_the_script_is_loaded_once_not_checked_at_every_publish(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
) -> None:
    publisher = Publisher(
        redis_client, keys=Keys(unique_name("k") + ":"), registry=CollectorRegistry()
    )
    channel = f"ticks.{unique_name('S')}"
    await publisher.publish(channel, batch("S"))
    before = await script_commands(redis_client)
    for _ in range(3):
        await publisher.publish(channel, batch("S"))
    assert await script_commands(redis_client) == before


async def test_a_flushed_script_cache_is_reloaded_and_nothing_is_applied_twice(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
    keys: Keys,
    publisher: Publisher,
) -> None:
    channel = f"ticks.{unique_name('F')}"
    assert await publisher.publish_many([(channel, batch("F"))]) == [1]
    await redis_client.script_flush()  # as after a server restart, or by an operator
    assert await publisher.publish_many([(channel, batch("F")), (channel, batch("F"))]) == [2, 3]
    await redis_client.script_flush()
    assert await publisher.publish_many([(channel, batch("F"))], transaction=True) == [4]
    records = await StreamReader(redis_client, keys).read(channel)
    assert [seq for seq, _ in records] == [1, 2, 3, 4]


async def test_interleaved_channels_get_their_own_sequences(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
    keys: Keys,
    publisher: Publisher,
) -> None:
    channels = [f"ticks.{unique_name('C')}" for _ in range(3)]
    items = [(channels[i % 3], batch(f"C{i}")) for i in range(10)]
    assert await publisher.publish_many(items) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    reader = StreamReader(redis_client, keys)
    first = await reader.read(channels[0])
    assert [decode(payload, TickBatch).sym for _, payload in first] == ["C0", "C3", "C6", "C9"]


async def test_channels_of_several_patterns_come_from_one_scan(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
    keys: Keys,
    publisher: Publisher,
) -> None:
    tag = unique_name("P")
    wanted = [f"ticks.{tag}", f"bars.{tag}.1m"]
    for channel in [*wanted, f"signals.{tag}"]:
        await publisher.publish(channel, batch(tag))
    reader = StreamReader(redis_client, keys)
    first = await scan_calls(redis_client)
    assert await reader.channels("ticks.*") == [f"ticks.{tag}"]
    one_pass = await scan_calls(redis_client) - first
    assert await reader.channels(["ticks.*", "bars.*"]) == sorted(wanted)
    assert await scan_calls(redis_client) - first == 2 * one_pass  # one pass, not one a pattern
    assert await reader.channels(["nothing.*"]) == []


async def scan_calls(redis_client) -> int:  # type: ignore[no-untyped-def]
    stats = await redis_client.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


async def test_pubsub_carries_the_same_bytes_as_the_stream(
    redis_client, unique_name, keys: Keys, publisher: Publisher
) -> None:  # type: ignore[no-untyped-def]
    channel = f"ticks.{unique_name('S')}"
    async with Subscriber(redis_client, [channel]) as subscriber:
        await asyncio.sleep(0.05)
        await publisher.publish(channel, batch("S"))
        async for message in subscriber.messages(timeout_s=2):
            if message is None:  # a subscribe confirmation or a quiet second
                continue
            assert message[0] == channel
            assert message[1] == (await StreamReader(redis_client, keys).read(channel))[0][1]
            break


async def test_sequence_survives_a_lost_counter_key(
    redis_client, unique_name, keys: Keys, publisher: Publisher
) -> None:  # type: ignore[no-untyped-def]
    channel = f"ticks.{unique_name('S')}"
    await publisher.publish_many([(channel, batch("S"))] * 3)
    await redis_client.delete(keys.seq(channel))
    assert await publisher.publish(channel, batch("S")) == 4
    await redis_client.delete(keys.seq(channel))
    assert await publisher.publish_many([(channel, batch("S"))] * 3) == [5, 6, 7]
    assert await publisher.publish(channel, batch("S")) == 8
    assert [seq for seq, _ in await StreamReader(redis_client, keys).read(channel)] == list(
        range(1, 9)
    )


async def test_stream_is_trimmed_to_its_bound(redis_client, unique_name) -> None:  # type: ignore[no-untyped-def]
    keys = Keys(unique_name("k") + ":")
    publisher = Publisher(redis_client, keys=keys, stream_maxlen=10, registry=CollectorRegistry())
    channel = f"ticks.{unique_name('S')}"
    for _ in range(20):
        await publisher.publish_many([(channel, batch("S"))] * 50)
    length = await redis_client.xlen(keys.stream(channel))
    assert 10 <= length < 1000
    assert await StreamReader(redis_client, keys).last_seq(channel) == 1000


def test_records_must_start_with_a_zero_seq() -> None:
    with pytest.raises(ValueError, match="seq"):
        record_tail(b'{"sym":"SPY"}')
    assert record_tail(batch("S")).startswith(b',"sym"')


async def test_connect_gives_up_with_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match="unreachable"):
        await connect_redis("redis://:secret@127.0.0.1:1/0", max_wait_s=0.3)


def test_passwords_are_redacted_from_urls() -> None:
    assert redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"


async def test_bar_store_keeps_the_newest_revision(redis_client, unique_name) -> None:  # type: ignore[no-untyped-def]
    store = BarStore(redis_client, Keys(unique_name("k") + ":"))
    start = 1_381_154_400_000
    first = Bar(
        0,
        "SPY",
        "2013-10-07T10:00:00-04:00",
        31,
        1,
        2,
        0.5,
        1.5,
        100,
        1.2,
        3,
        start,
        start + 60_000,
        0,
    )
    revised = Bar(0, "SPY", first.tsET, 31, 1, 2, 0.5, 1.5, 200, 1.2, 4, start, start + 60_000, 1)
    await store.put_many([revised])
    await store.put_many([first])  # an older revision arriving late does not win
    day = await store.day("SPY", __import__("datetime").date(2013, 10, 7))
    assert day[start].volume == 200 and day[start].revision == 1
    assert await store.symbols(__import__("datetime").date(2013, 10, 7)) == ["SPY"]


async def test_bar_store_writes_many_bars_a_call_and_rides_out_a_lost_script_cache(  # type: ignore[no-untyped-def]
    redis_client, unique_name
) -> None:
    """Bars of several symbols and days go in calls of ``bars_per_call``; a revision and the
    bar it replaces in one call keep the newest; a server that lost its scripts (a restart)
    gets the script again and nothing is lost."""
    from datetime import date

    store = BarStore(redis_client, Keys(unique_name("k") + ":"), ttl_s=3_600, bars_per_call=3)
    day1, day2 = 1_381_154_400_000, 1_381_240_800_000  # 2013-10-07 and -08, 10:00 New York

    def bar(symbol: str, start: int, volume: int, revision: int = 0) -> Bar:
        return Bar(
            0, symbol, "", 31, 1, 2, 0.5, 1.5, volume, 1.2, 3, start, start + 60_000, revision
        )

    bars = [
        bar(sym, start + k * 60_000, 100 + k)
        for sym in ("A", "B")
        for start in (day1, day2)
        for k in range(2)
    ]
    bars += [bar("A", day1, 500, revision=2), bar("A", day1, 400, revision=1)]  # same call
    await store.put_many(bars)
    await redis_client.script_flush()
    await store.put_many([bar("C", day1, 7)])
    for sym in ("A", "B"):
        for start, day in ((day1, date(2013, 10, 7)), (day2, date(2013, 10, 8))):
            held = await store.day(sym, day)
            expected = {start: 100, start + 60_000: 101}
            if (sym, start) == ("A", day1):
                expected[start] = 500  # revision 2, not the later-sent revision 1
            assert {k: b.volume for k, b in held.items()} == expected
            assert 0 < await redis_client.ttl(store.key(sym, day)) <= 3_600
    assert [b.volume for b in (await store.day("C", date(2013, 10, 7))).values()] == [7]


async def test_a_batch_published_again_with_its_token_is_applied_once(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
) -> None:
    """A retry after a lost reply sends the same batch again: nothing is added twice, and the
    retry gets the sequences of the first attempt."""
    prefix = unique_name("tok") + ":"
    publisher = Publisher(redis_client, keys=Keys(prefix))
    records = [("ticks.A", b'{"seq":0,"n":1}'), ("ticks.B", b'{"seq":0,"n":2}')]
    records.append(("ticks.A", b'{"seq":0,"n":3}'))
    first = await publisher.publish_many(records, token="batch-1")
    again = await publisher.publish_many(records, token="batch-1")
    other = await publisher.publish_many(records[:1], token="batch-2")
    assert first == again == [1, 1, 2] and other == [3]
    reader = StreamReader(redis_client, Keys(prefix))
    assert [seq for seq, _ in await reader.read("ticks.A")] == [1, 2, 3]
    assert [seq for seq, _ in await reader.read("ticks.B")] == [1]


async def test_a_retry_of_a_batch_some_of_whose_calls_applied_applies_the_rest_once(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
) -> None:
    """A batch over five channels, two channels a script call: the first call applied before
    the reply was lost (a connection cut mid-pipeline), the retry sends the whole batch. The
    applied call returns its sequences as they were, the others apply once. The token is kept
    once a call (a GET and a SET), not once a channel."""
    prefix = unique_name("part") + ":"
    keys = Keys(prefix)
    publisher = Publisher(redis_client, keys=keys, channels_per_call=2)
    channels = [f"ticks.{name}" for name in "ABCDE"]
    records = [(channel, b'{"seq":0,"n":%d}' % i) for i, channel in enumerate(channels)]
    records.append(("ticks.A", b'{"seq":0,"n":9}'))  # A's second record, in the first call
    await publisher.publish_many([("ticks.A", b'{"seq":0,"n":0}')])  # A is at 1 already
    first_call = [records[0], records[1], records[5]]
    assert await publisher.publish_many(first_call, token="t-1") == [2, 1, 3]
    gets, sets = await command_calls(redis_client, "get"), await command_calls(redis_client, "set")
    assert await publisher.publish_many(records, token="t-1") == [2, 1, 1, 1, 1, 3]
    assert await command_calls(redis_client, "get") - gets == 3  # one a call: AB, CD, E
    assert await command_calls(redis_client, "set") - sets == 2  # the two calls applied now
    reader = StreamReader(redis_client, keys)
    for channel, seqs in {"ticks.A": [1, 2, 3], "ticks.B": [1], "ticks.E": [1]}.items():
        assert [seq for seq, _ in await reader.read(channel)] == seqs


async def command_calls(redis_client, command: str) -> int:  # type: ignore[no-untyped-def]
    stats = await redis_client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def evalsha_calls(redis_client) -> int:  # type: ignore[no-untyped-def]
    stats = await redis_client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.parametrize(("per_call", "calls"), [(1, 5), (2, 3), (64, 1)])
async def test_a_batch_over_many_channels_takes_a_script_call_per_group_of_channels(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
    per_call: int,
    calls: int,
) -> None:
    """Five channels in one batch: a call of the publish script per ``channels_per_call``
    channels, each channel's sequences gapless whatever the grouping, and a retry with the
    batch's token applies nothing twice across the groups."""
    prefix = unique_name("group") + ":"
    publisher = Publisher(redis_client, keys=Keys(prefix), channels_per_call=per_call)
    channels = [f"ticks.{letter}" for letter in "ABCDE"]
    records = [(c, b'{"seq":0,"n":%d}' % n) for n in range(3) for c in channels]
    await publisher.publish_many(records[:1])  # loads the script
    before = await evalsha_calls(redis_client)
    first = await publisher.publish_many(records, token="t-1")
    assert await evalsha_calls(redis_client) - before == calls
    again = await publisher.publish_many(records, token="t-1")
    assert first == again == [2, 1, 1, 1, 1, 3, 2, 2, 2, 2, 4, 3, 3, 3, 3]
    reader = StreamReader(redis_client, Keys(prefix))
    for channel in channels:
        stored = await reader.read(channel)
        expected = [1, 2, 3, 4] if channel == "ticks.A" else [1, 2, 3]
        assert [seq for seq, _ in stored] == [seq_of(p) for _, p in stored] == expected
    with pytest.raises(ValueError, match="channels_per_call"):
        Publisher(redis_client, channels_per_call=0)


async def test_read_many_reads_each_channel_as_asked_in_one_round_trip(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
    keys: Keys,
    publisher: Publisher,
) -> None:
    a, b, c, empty = (f"ticks.{unique_name(s)}" for s in ("A", "B", "C", "E"))
    await publisher.publish_many([(a, batch("A")) for _ in range(5)])
    await publisher.publish_many([(b, batch("B")) for _ in range(3)])
    await publisher.publish_many([(c, batch("C")) for _ in range(6)])
    reader = StreamReader(redis_client, keys)
    before = (await redis_client.info("commandstats")).get("cmdstat_xrange", {}).get("calls", 0)
    replies = await reader.read_many(
        [
            (a, 1, 4, 3),  # all it is behind up to its top (4): the 5th stays unread
            (b, 0, 3, 3),  # all of it
            (c, 2, 6, 2),  # fewer than it is behind (the batch's room): its own range
            (empty, 0, 2, 2),  # a counter ahead of its stream: nothing to read
        ]
    )
    seqs = [[seq for seq, _ in records] for records in replies]
    assert seqs == [[2, 3, 4], [1, 2, 3], [3, 4], []]
    assert all(seq_of(payload) == seq for records in replies for seq, payload in records)
    after = (await redis_client.info("commandstats")).get("cmdstat_xrange", {}).get("calls", 0)
    assert after - before == 1  # only the room-limited channel; the others in one XREAD


async def test_next_message_reads_messages_keeps_the_health_check_and_raises_on_a_cut(
    redis_url: str,
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
) -> None:
    channel = unique_name("nm")
    client = aioredis.Redis.from_url(redis_url, health_check_interval=1, client_name=channel)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.psubscribe(f"{channel}.*")
        assert await next_message(pubsub, 0.5) is None  # the subscription's confirmation
        await redis_client.publish(f"{channel}.a", b"one")
        assert await next_message(pubsub, 2) == (f"{channel}.a".encode(), b"one")
        pings = (await redis_client.info("commandstats"))["cmdstat_ping"]["calls"]
        await asyncio.sleep(1.2)  # past the health-check interval
        assert await next_message(pubsub, 0.5) is None  # the PING's answer, not a message
        assert (await redis_client.info("commandstats"))["cmdstat_ping"]["calls"] > pings
        await redis_client.publish(f"{channel}.b", b"two")
        assert await next_message(pubsub, 2) == (f"{channel}.b".encode(), b"two")
        listed = await redis_client.client_list()
        (mine,) = [c["id"] for c in listed if c["name"] == channel]
        await redis_client.client_kill_filter(_id=mine)
        with pytest.raises(RedisConnectionError):
            for _ in range(10):  # the cut, not a quiet read, ends the loop
                await next_message(pubsub, 0.5)
    finally:
        await pubsub.aclose()
        await client.aclose()


@pytest.fixture
async def subscribed(redis_url: str, unique_name) -> AsyncIterator[tuple[str, PubSub]]:  # type: ignore[no-untyped-def]
    """A service's kind of client (``connect_redis``) subscribed to ``<channel>.*``, its
    confirmation read: the channel prefix and the subscription."""
    channel = unique_name("sub")
    client = await connect_redis(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.psubscribe(f"{channel}.*")
        assert await next_message(pubsub, 0.5) is None  # the subscription's confirmation
        yield channel, pubsub
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_messages_already_read_from_the_socket_are_taken_without_read_response(
    redis_client,  # type: ignore[no-untyped-def]
    subscribed: tuple[str, PubSub],
) -> None:
    """A busy subscriber's socket read holds many messages: ``next_message`` hands them over
    from the parser, in order, without a ``read_response`` each; a subscription's
    confirmation between them still reaches redis-py's bookkeeping."""
    channel, pubsub = subscribed
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(200):
            pipe.publish(f"{channel}.{i % 7}", b"m%d" % i)
        await pipe.execute()
    await pubsub.subscribe(f"{channel}-other")
    await redis_client.publish(f"{channel}.x", b"last")
    connection = pubsub.connection
    assert connection is not None
    reads = 0
    read_response = connection.read_response

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        return await read_response(*args, **kwargs)  # type: ignore[arg-type]

    connection.read_response = counted  # type: ignore[method-assign]
    got: list[tuple[bytes, bytes]] = []
    nones = 0
    while len(got) < 201:
        message = await next_message(pubsub, 2)
        if message is None:
            nones += 1
            assert nones < 5
        else:
            got.append(message)
    assert got[:200] == [(f"{channel}.{i % 7}".encode(), b"m%d" % i) for i in range(200)]
    assert got[200] == (f"{channel}.x".encode(), b"last")
    assert nones == 1  # the second subscription's confirmation
    assert f"{channel}-other".encode() in pubsub.channels
    assert reads <= 20, f"{reads} read_response calls for 201 messages"


async def test_a_reply_the_parser_cannot_read_disconnects_and_a_buffered_one_moves_the_health_check(
    redis_client,  # type: ignore[no-untyped-def]
    subscribed: tuple[str, PubSub],
) -> None:
    channel, pubsub = subscribed
    connection = pubsub.connection
    assert connection is not None
    parser: Any = connection._parser
    await redis_client.publish(f"{channel}.a", b"one")
    await redis_client.publish(f"{channel}.a", b"two")
    for _ in range(500):  # both arrived: the socket read that gives "one" has "two"
        if b"two" in parser._stream._buffer:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the second message did not reach the subscriber's socket in 5 s")
    assert await next_message(pubsub, 2) == (f"{channel}.a".encode(), b"one")
    connection.next_health_check = 0  # overdue: ...
    stale = asyncio.get_running_loop().time()
    parser._reader.feed(b">3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$5\r\nthree\r\n")
    assert await next_message(pubsub, 2) == (f"{channel}.a".encode(), b"two")  # ... a PING
    # the buffered "three" came without a read_response; it set the next check as that does
    assert await next_message(pubsub, 2) == (b"x", b"three")
    assert connection.next_health_check > stale + connection.health_check_interval - 1
    parser._reader.feed(b"?not a reply\r\n")
    with pytest.raises(InvalidResponse):
        await next_message(pubsub, 2)
    assert not connection.is_connected
