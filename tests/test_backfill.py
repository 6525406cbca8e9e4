"""Feed gaps filled from REST: what the socket missed is fetched, published once, and the
day's bars equal an uninterrupted run's."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from libs.common import names
from libs.common.io.redis_io import Publisher, StreamReader
from libs.common.market.build import build_bars
from libs.common.market.sessions import ny_epoch_ms
from libs.common.market.tickfiles import read_lean_trades
from libs.common.names import Keys
from libs.common.runtime.settings import Secret
from libs.common.schemas import TICK_BATCH_DECODER, FeedGap, Trade, decode
from services.ingest import protocol
from services.ingest.backfill import Backfiller, BackfillRefused, RestTrades
from services.ingest.publishing import FeedPublisher
from services.ingest.simulator import (
    Fault,
    FileFeed,
    PolygonSimulator,
    SimulatorSettings,
    SyntheticFeed,
)
from services.ingest.simulator.rest import TradeHistory
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

KEY = "backfill-test-key"
REPO = Path(__file__).resolve().parent.parent


async def stream_trades(client: aioredis.Redis, keys: Keys, symbol: str) -> list[Trade]:
    reader = StreamReader(client, keys)
    out: list[Trade] = []
    for _, payload in await reader.read(names.channel(names.TICKS, symbol), 0, 10_000_000):
        out.extend(TICK_BATCH_DECODER.decode(payload).ticks)
    return out


async def gaps(client: aioredis.Redis, keys: Keys) -> dict[str, FeedGap]:
    latest: dict[str, FeedGap] = {}
    for _, payload in await StreamReader(client, keys).read(names.FEED_GAPS, 0, 10_000):
        gap = decode(payload, FeedGap)
        latest[gap.gapId] = gap
    return latest


async def test_the_rest_client_pages_retries_a_throttle_and_stops_on_a_refused_key() -> None:
    settings = SimulatorSettings(
        api_key=Secret(KEY), port=0, feed=SyntheticFeed(symbols=2, rate_per_s=3_000, seed=9)
    )
    async with PolygonSimulator(settings) as sim:
        sim._start_feed()
        await eventually(lambda: sim.history.count("S0001") >= 300)
        produced = sim.history.trades("S0001")
        base = f"http://127.0.0.1:{sim.port}"
        rest = RestTrades(base, Secret(KEY), page_limit=50)
        try:
            sim.inject(Fault.REST_THROTTLE, 2)  # two 429s with Retry-After: 1
            got = await rest.trades("S0001", produced[0].t, produced[-1].t)
            assert {t.i for t in produced} <= {t.i for t in got}  # every page, in order
            assert [t.t for t in got] == sorted(t.t for t in got)
            assert rest.metrics.requests.labels("429")._value.get() >= 2
        finally:
            await rest.close()
        refused = RestTrades(base, Secret("wrong"))
        try:
            with pytest.raises(BackfillRefused, match="401"):
                await refused.trades("S0001", produced[0].t, produced[-1].t)
        finally:
            await refused.close()


def test_the_simulators_history_keeps_its_newest_trades_and_knows_what_went() -> None:
    history = TradeHistory(max_trades=1_000)
    sent: list[protocol.TradeEvent] = []
    for frame in range(300):  # ten trades a frame, a millisecond apart, over two symbols
        trades = [
            protocol.TradeEvent(sym=f"S{n % 2}", p=1.0, s=1, t=1_000 + frame * 10 + n, i=str(n))
            for n in range(10)
        ]
        history.add(trades)
        sent += trades
        assert history.kept <= 1_000
    assert history.kept + history.dropped == len(sent) == 3_000
    assert history.kept >= 900  # a tenth goes at a time
    kept = [t for t in sent if t.t >= history.kept_from_ms]
    assert len(kept) == history.kept
    for symbol in ("S0", "S1"):
        mine = [t for t in kept if t.sym == symbol]
        assert history.trades(symbol) == mine
        assert history.count(symbol) == len(mine)
        assert history.between(symbol, 0, 1 << 62) == mine
    with pytest.raises(ValueError, match="at least 1"):
        TradeHistory(max_trades=0)


async def test_the_simulator_answers_410_for_trades_it_no_longer_keeps() -> None:
    """Past ``--history-max-trades`` the oldest trades go; ingest's REST client gets 410 Gone
    for a range that reaches before the kept ones (``BackfillRefused``, which the backfiller
    records as an unfilled gap with its reason), and every trade of a range still kept."""
    settings = SimulatorSettings(
        api_key=Secret(KEY),
        port=0,
        feed=SyntheticFeed(symbols=2, rate_per_s=3_000, seed=9),
        history_max_trades=500,
        max_events=2_000,
        minute_aggregates=False,
    )
    async with PolygonSimulator(settings) as sim:
        sim._start_feed()
        await asyncio.wait_for(sim.feed_done.wait(), 30)
        assert sim.history.dropped >= 1_000
        history = sim.history
        assert history.kept <= 500 + settings.frame_max_events
        status = sim.stats_dict()
        assert status["historyTrades"] == history.kept
        assert status["historyDropped"] == history.dropped >= 1_000
        assert status["historyKeptFromMs"] == history.kept_from_ms > 0
        kept = history.trades("S0001")
        rest = RestTrades(f"http://127.0.0.1:{sim.port}", Secret(KEY), page_limit=50)
        try:
            with pytest.raises(BackfillRefused, match=r"410.*history-max-trades"):
                await rest.trades("S0001", history.kept_from_ms - 1_000, kept[-1].t)
            got = await rest.trades("S0001", kept[0].t, kept[-1].t)
            assert {t.i for t in kept} <= {t.i for t in got}
            assert min(t.t for t in got) >= history.kept_from_ms
        finally:
            await rest.close()


async def start_ingest(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    handle = log.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.ingest",
            "run",
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=handle,
        )
    finally:
        handle.close()


async def test_ingest_killed_and_the_socket_dropped_twice_loses_nothing_after_backfill(
    redis_client: aioredis.Redis,
    redis_url: str,
    unique_name: Callable[[str], str],
    shared_data: Path,
    tmp_path: Path,
) -> None:
    """IBM's 2013-10-07 replayed at 1,500x (about 40 s): the socket is dropped twice and
    ingest is SIGKILLed and restarted mid-day. The trades the simulator sent meanwhile are
    fetched from its REST API; at the end Redis holds every trade of the day exactly once, and
    the bars built from them equal the bars of the whole day's file."""
    day_trades = read_lean_trades(shared_data / "tick" / "ibm" / "20131007_trade.zip")
    prefix = f"{unique_name('bf')}:"
    keys = Keys(prefix)
    settings = SimulatorSettings(
        api_key=Secret(KEY),
        port=0,
        feed=FileFeed(shared_data, date(2013, 10, 7), ("IBM",), 1_500.0),
        minute_aggregates=False,
    )
    log = tmp_path / "ingest.log"
    async with PolygonSimulator(settings) as sim:
        env = {
            **os.environ,
            "INGEST_REDIS_URL": redis_url,
            "INGEST_KEY_PREFIX": prefix,
            "INGEST_POLYGON_URL": sim.url,
            "POLYGON_API_KEY": KEY,
            "INGEST_REST_URL": f"http://127.0.0.1:{sim.port}",
            "INGEST_SYMBOLS": "IBM",
            "INGEST_HTTP_HOST": "127.0.0.1",
            "INGEST_HTTP_PORT": "0",
            "INGEST_LOG_FORMAT": "json",
            "INGEST_RECONNECT_INITIAL_S": "0.2",
            "INGEST_RECONNECT_MAX_S": "1",
        }
        ingest = await start_ingest(env, log)
        try:
            total = len(day_trades)
            await eventually(lambda: sim.history.count("IBM") > total // 5, timeout=60)
            assert sim.inject(Fault.DROP) == 1
            await eventually(lambda: sim.history.count("IBM") > total * 2 // 5, timeout=60)
            assert sim.inject(Fault.DROP) == 1
            await eventually(lambda: sim.history.count("IBM") > total * 3 // 5, timeout=60)
            ingest.send_signal(signal.SIGKILL)  # mid-day, frames in the air
            await ingest.wait()
            await asyncio.sleep(1.0)  # the feed goes on without us
            ingest = await start_ingest(env, log)
            await eventually(sim.feed_done.is_set, timeout=120)

            async def all_filled() -> bool:
                found = await gaps(redis_client, keys)
                return len(found) >= 3 and all(g.status == "backfilled" for g in found.values())

            await eventually(
                all_filled, timeout=60, message=lambda: log.read_text(errors="replace")[-3000:]
            )
        finally:
            if ingest.returncode is None:
                ingest.send_signal(signal.SIGTERM)
                await asyncio.wait_for(ingest.wait(), 20)
    held = await stream_trades(redis_client, keys, "IBM")
    ids = [t.i for t in held]
    assert len(ids) == len(set(ids)), "a trade was published twice"
    assert set(ids) == {t.i for t in day_trades}, (
        f"{len(set(t.i for t in day_trades) - set(ids))} trades missing"
    )
    found = await gaps(redis_client, keys)
    causes = sorted(g.cause for g in found.values())
    assert causes.count("connection_lost") == 2 and "ingest_start" in causes, causes
    assert sum(g.backfilled for g in found.values()) > 0
    assert build_bars(held, "algoseek") == build_bars(day_trades, "algoseek")


async def test_fill_republishes_a_lost_hour_from_the_flat_file_and_marks_its_gap(
    redis_client: aioredis.Redis,
    redis_url: str,
    unique_name: Callable[[str], str],
    shared_data: Path,
    tmp_path: Path,
) -> None:
    """An hour of IBM's day never reached Redis (a gap nothing filled). ``python -m
    services.ingest fill <file>`` publishes exactly the missing trades, and the gap is then
    recorded as filled."""
    path = shared_data / "tick" / "ibm" / "20131007_trade.zip"
    day_trades = read_lean_trades(path)
    prefix = f"{unique_name('fill')}:"
    keys = Keys(prefix)
    lost_from, lost_to = ny_epoch_ms(date(2013, 10, 7), 10), ny_epoch_ms(date(2013, 10, 7), 11)
    kept = [t for t in day_trades if not lost_from <= t.t < lost_to]
    feed = FeedPublisher(Publisher(redis_client, keys=keys), symbols=["IBM"])
    for start in range(0, len(kept), 500):
        split = {
            protocol.TRADES: {
                "IBM": [protocol.as_trade_event(t) for t in kept[start : start + 500]]
            }
        }
        feed.admit(split)  # type: ignore[arg-type]
        await feed.publish(protocol.build_records(split, 0))  # type: ignore[arg-type]
    feed.open_gap("connection_lost", start_ms=lost_from)
    await feed.publish_gap()
    env = {
        **os.environ,
        "INGEST_REDIS_URL": redis_url,
        "INGEST_KEY_PREFIX": prefix,
        "INGEST_HTTP_HOST": "127.0.0.1",
        "INGEST_HTTP_PORT": "0",
        "INGEST_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.ingest",
        "fill",
        str(path),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    held = await stream_trades(redis_client, keys, "IBM")
    assert sorted(t.i for t in held) == sorted(t.i for t in day_trades)  # each once
    (gap,) = (await gaps(redis_client, keys)).values()
    assert gap.status == "backfilled" and "20131007_trade.zip" in gap.detail


class SlowRest:
    """The REST answer of a gap, given only after the live feed has moved on (a fill of many
    symbols can take longer than ingest's identity horizon)."""

    def __init__(self, trades: list[Trade], meanwhile: Callable[[], Awaitable[None]]) -> None:
        self._trades = trades
        self._meanwhile = meanwhile

    async def trades(self, symbol: str, start_ms: int, end_ms: int) -> list[protocol.TradeEvent]:
        await self._meanwhile()
        return [
            protocol.as_trade_event(t)
            for t in self._trades
            if t.sym == symbol and start_ms <= t.t <= end_ms
        ]

    async def close(self) -> None:
        return None


async def test_a_fill_slower_than_the_identity_horizon_still_publishes_nothing_twice(
    redis_client: aioredis.Redis, unique_name: Callable[[str], str]
) -> None:
    keys = Keys(f"{unique_name('bfh')}:")
    feed = FeedPublisher(
        Publisher(redis_client, keys=keys), symbols=["IBM"], identity_horizon_ms=1_000
    )
    base = ny_epoch_ms(date(2013, 10, 7), 10)

    def trade(i: int, t_ms: int) -> Trade:
        return Trade("IBM", 180.0, 100, base + t_ms, 4, (), str(i), 1)

    async def live(trades: list[Trade]) -> None:
        split = {protocol.TRADES: {"IBM": [protocol.as_trade_event(t) for t in trades]}}
        feed.admit(split)  # type: ignore[arg-type]
        if split:
            await feed.publish(protocol.build_records(split, 0))  # type: ignore[arg-type]

    await live([trade(1, 0), trade(2, 1), trade(3, 2)])  # then the socket drops
    gap = FeedGap(0, "g1", "ingest", "connection_lost", ["IBM"], base + 2, base + 5_000, "closed")
    # while REST answers, ten seconds of live feed go by: ten horizons
    await live([trade(100, 5_000)])

    async def feed_moves_on() -> None:
        await live([trade(100 + n, 5_000 + n * 1_000) for n in range(1, 11)])

    # the gap's REST answer: trade 3 (published before the gap, at its start) and two new ones
    rest = SlowRest([trade(3, 2), trade(4, 1_000), trade(5, 4_000)], feed_moves_on)
    filler = Backfiller(feed, rest)  # type: ignore[arg-type]
    done = await filler.fill(gap)
    assert done.status == "backfilled" and done.backfilled == 2, done
    held = [t.i for t in await stream_trades(redis_client, keys, "IBM")]
    assert sorted(held, key=int) == ["1", "2", "3", "4", "5", *map(str, range(100, 111))]
    assert not feed.book.seen(trade(3, 2))  # the book itself had forgotten trade 3
