"""Compatibility proof: Polygon's official Python client (PyPI ``massive``) against the simulator.

The client is pointed at the simulator through its own options: ``feed`` is the host part of its
URL (``ws{s}://{feed}/{market}``), so ``feed="127.0.0.1:<port>"``, ``market="stocks"`` and
``secure=False`` make it connect to ``ws://127.0.0.1:<port>/stocks``. It then runs its own
handshake (read ``connected``, send ``auth``, read the answer, subscribe) and parses frames
with its own models, so this proves the simulator speaks Polygon's protocol, not only ours.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from libs.common.runtime.settings import Secret
from services.ingest.protocol import Event, TradeEvent
from services.ingest.simulator import (
    PolygonSimulator,
    SimulatorSettings,
    SyntheticFeed,
    file_frames,
)
from tests.helpers import eventually

massive = pytest.importorskip("massive", reason="the official client is in the test extra")
models = pytest.importorskip("massive.websocket.models")
AuthError = pytest.importorskip("massive.exceptions").AuthError
EquityAgg, EquityTrade, Market = models.EquityAgg, models.EquityTrade, models.Market

pytestmark = pytest.mark.timeout(60)

KEY = "official-client-key-77"
SETTINGS = SimulatorSettings(
    api_key=Secret(KEY), port=0, feed=SyntheticFeed(symbols=20, rate_per_s=5_000, seed=3)
)


def official_client(sim: PolygonSimulator, subscriptions: list[str], key: str = KEY) -> Any:
    return massive.WebSocketClient(
        api_key=key,
        feed=f"127.0.0.1:{sim.port}",
        market=Market.Stocks,
        secure=False,
        subscriptions=subscriptions,
        max_reconnects=0,
    )


async def receive(client: Any, enough: int, model: type) -> list[Any]:
    """Run the client's own ``connect`` loop until ``enough`` messages of ``model`` arrived."""
    received: list[Any] = []
    done = asyncio.Event()

    async def processor(messages: list[Any]) -> None:
        received.extend(message for message in messages if isinstance(message, model))
        if len(received) >= enough:
            done.set()

    task = asyncio.create_task(client.connect(processor))
    try:
        async with asyncio.timeout(20):
            waiter = asyncio.create_task(done.wait())
            finished, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if task in finished:
                task.result()  # surface the client's own error
                raise AssertionError("the client stopped before receiving enough messages")
    finally:
        await client.close()
        async with asyncio.timeout(10):
            await task  # a normal close ends the client's loop without an error
    return received


async def test_the_official_client_authenticates_subscribes_and_parses_trades() -> None:
    async with PolygonSimulator(SETTINGS) as sim:
        client = official_client(sim, ["T.S0001"])
        trades = await receive(client, 200, EquityTrade)
    assert len(trades) >= 200
    now_ms = time.time() * 1000
    sequences = []
    for trade in trades:
        assert trade.event_type == "T" and trade.symbol == "S0001"
        assert isinstance(trade.price, float) and trade.price > 0
        assert isinstance(trade.size, int) and trade.size > 0
        assert isinstance(trade.timestamp, int) and abs(trade.timestamp - now_ms) < 60_000
        assert isinstance(trade.id, str) and trade.id
        assert trade.exchange > 0 and trade.tape in (1, 2, 3)
        assert trade.conditions in (None, [37], [14])
        sequences.append(trade.sequence_number)
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert any(trade.conditions == [37] for trade in trades)  # odd lots come through


async def test_the_official_client_with_a_wildcard_gets_every_symbol() -> None:
    async with PolygonSimulator(SETTINGS) as sim:
        trades = await receive(official_client(sim, ["T.*"]), 2_000, EquityTrade)
    assert len({trade.symbol for trade in trades}) > 10


async def test_the_official_client_parses_minute_aggregates_and_ignores_the_extension_key() -> None:
    minute = 1_381_152_600_000  # 2013-10-07 13:30 UTC
    trades = [
        TradeEvent("SPY", 168.0, 100, minute + 1, 4, (), "1", 2, 1),
        TradeEvent("SPY", 169.0, 300, minute + 2, 4, (), "2", 2, 2, suspicious=True),
        TradeEvent("SPY", 168.5, 100, minute + 60_001, 4, (), "3", 2, 3),
    ]

    async def feed() -> AsyncIterator[list[Event]]:
        async for frame in file_frames(trades, 0, 100, 1):
            yield frame

    async with PolygonSimulator(replace(SETTINGS), feed=feed()) as sim:
        received = await receive(official_client(sim, ["T.SPY", "AM.SPY"]), 5, object)
    aggs = [message for message in received if isinstance(message, EquityAgg)]
    parsed_trades = [message for message in received if isinstance(message, EquityTrade)]
    assert [trade.id for trade in parsed_trades] == ["1", "2", "3"]
    first = aggs[0]
    assert first.event_type == "AM" and first.symbol == "SPY"
    assert (first.open, first.high, first.low, first.close) == (168.0, 169.0, 168.0, 169.0)
    assert first.volume == 400 and first.vwap == 168.75
    assert first.start_timestamp == minute and first.end_timestamp == minute + 60_000


async def test_the_official_client_raises_its_auth_error_on_a_wrong_key() -> None:
    async with PolygonSimulator(SETTINGS) as sim:
        client = official_client(sim, ["T.*"], key="wrong-key")

        async def processor(_messages: list[Any]) -> None:
            raise AssertionError("no data before auth")

        with pytest.raises(AuthError, match="authentication failed"):
            async with asyncio.timeout(10):
                await client.connect(processor)


async def test_the_official_rest_client_lists_trades_from_the_simulator_page_by_page() -> None:
    """``RESTClient.list_trades`` (the official client's REST part) against the simulator's
    ``/v3/trades``: every trade the feed produced in the range, in time order, across pages
    (the client follows ``next_url``); a wrong key is refused."""
    rest = pytest.importorskip("massive.rest")
    exceptions = pytest.importorskip("massive.exceptions")
    async with PolygonSimulator(
        replace(SETTINGS, feed=SyntheticFeed(symbols=3, rate_per_s=2_000, seed=3))
    ) as sim:
        sim._start_feed()
        await eventually(lambda: sim.history.count("S0001") >= 120)
        produced = sim.history.trades("S0001")
        low_ms, high_ms = produced[10].t, produced[100].t
        expected = [t.i for t in produced if low_ms <= t.t < high_ms]
        base = f"http://127.0.0.1:{sim.port}"

        def listed(key: str) -> list[Any]:
            client = rest.RESTClient(api_key=key, base=base, retries=0)
            return list(
                client.list_trades(
                    "S0001",
                    timestamp_gte=low_ms * 1_000_000,
                    timestamp_lt=high_ms * 1_000_000,
                    order="asc",
                    sort="timestamp",
                    limit=7,
                )
            )

        trades = await asyncio.to_thread(listed, KEY)
        assert [t.id for t in trades] == expected and len(expected) > 7 * 3  # several pages
        assert all(t.sip_timestamp == t.participant_timestamp for t in trades)
        assert trades[0].sip_timestamp // 1_000_000 == low_ms
        assert sim.rest.requests >= len(expected) // 7
        with pytest.raises(exceptions.BadResponse, match="Unknown API Key"):
            await asyncio.to_thread(listed, "wrong-key")
