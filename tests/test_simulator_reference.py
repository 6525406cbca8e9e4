"""The simulator's ticker reference (``/v3/reference/tickers/{ticker}``): what the bars ask
for a symbol's listing exchange on a live feed, answered as Polygon does."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from libs.common.market.listings import Listings, ReferenceUnavailable, TickerReference
from libs.common.runtime.settings import Secret
from services.ingest.simulator import FileFeed, PolygonSimulator, SimulatorSettings, SyntheticFeed
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

KEY = "reference-key-5"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lean-equity-2013-10"
DAY = date(2013, 10, 7)
SETTINGS = SimulatorSettings(api_key=Secret(KEY), port=0, feed=SyntheticFeed(symbols=3, seed=3))


def reference(sim: PolygonSimulator, key: str = KEY) -> TickerReference:
    return TickerReference(f"http://127.0.0.1:{sim.port}", key, timeout_s=5)


async def test_synthetic_symbols_are_listed_where_their_tape_says() -> None:
    async with PolygonSimulator(SETTINGS) as sim:
        sim._start_feed()
        await eventually(lambda: len(sim.history.symbols()) == 3)
        ref = reference(sim)
        found = await asyncio.to_thread(
            lambda: [ref.lookup(symbol, DAY) for symbol in ("S0001", "S0002", "S0003", "NOPE")]
        )
        assert [(f.exchange, f.tape) if f else None for f in found] == [
            (10, 1),  # tape A: NYSE
            (11, 2),  # tape B: NYSE Arca, the simulator's convention
            (12, 3),  # tape C: Nasdaq
            None,  # never sent: not found
        ]
        listings = Listings(reference=ref, packaged=False)
        assert await asyncio.to_thread(listings.primary, "S0003", DAY) == 12
        assert sim.tickers.requests == 5
        listings.close()


@pytest.mark.skipif(not (DATA / "tick" / "spy").is_dir(), reason=f"no tick data under {DATA}")
async def test_a_tick_file_feed_answers_from_the_data_sets_listings() -> None:
    feed = FileFeed(DATA, DAY, ("SPY", "IBM"), speed=0)
    async with PolygonSimulator(replace(SETTINGS, feed=feed)) as sim:
        ref = reference(sim)
        spy, ibm, other = await asyncio.to_thread(
            lambda: [ref.lookup(symbol, DAY) for symbol in ("SPY", "IBM", "ZZZZ")]
        )
        assert spy is not None and spy.exchange == 11
        assert ibm is not None and ibm.exchange == 10
        assert other is None
        wrong = reference(sim, "wrong")
        with pytest.raises(ReferenceUnavailable, match="401"):  # logged, asked again later
            await asyncio.to_thread(wrong.lookup, "SPY", DAY)
        ref.close()
        wrong.close()


async def test_the_official_client_reads_the_ticker_details() -> None:
    rest = pytest.importorskip("massive.rest")
    exceptions = pytest.importorskip("massive.exceptions")
    async with PolygonSimulator(SETTINGS) as sim:
        sim._start_feed()
        await eventually(lambda: "S0002" in sim.history.symbols())
        base = f"http://127.0.0.1:{sim.port}"

        def details(key: str, ticker: str) -> Any:
            client = rest.RESTClient(api_key=key, base=base, retries=0)
            return client.get_ticker_details(ticker, date="2013-10-07")

        found = await asyncio.to_thread(details, KEY, "S0002")
        assert (found.ticker, found.primary_exchange, found.market) == ("S0002", "ARCX", "stocks")
        with pytest.raises(exceptions.BadResponse, match="Unknown API Key"):
            await asyncio.to_thread(details, "wrong-key", "S0002")
        with pytest.raises(exceptions.BadResponse):
            await asyncio.to_thread(details, KEY, "NOPE")
