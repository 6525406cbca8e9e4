"""Helpers shared by the engine-bridge tests (``tests/test_bridge_*.py``), and the tests of
the real-day bars they use.

Real-day bars are built at test time from ``../shared/data`` by the bar service's backfill
(the bar core with the ``algoseek`` policy), the same bars ``services/bars`` publishes live;
nothing of the vendor's data is committed.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import msgspec

from libs.common.io.redis_io import Publisher, StreamReader
from libs.common.market.sessions import MINUTE_MS, bar_id, ny_epoch_ms, ts_et_minute
from libs.common.names import Keys
from libs.common.schemas import Bar, decode
from services.engine_bridge.config import BridgeSettings
from services.engine_bridge.datasets import read_bars_jsonl, read_vendor_minute_bars
from services.engine_bridge.model import EngineGap

DAY = date(2013, 10, 7)

OUTPUT_CHANNELS = (
    "sentio.signals.minute.v1",
    "sentio.trades.executed.v1",
    "sentio.positions.state.v1",
    "sentio.portfolio.minute.v1",
)


def make_bar(
    symbol: str,
    minute: int,
    close: float,
    *,
    day: date = DAY,
    high: float | None = None,
    low: float | None = None,
    open_: float | None = None,
    revision: int = 0,
    volume: int = 1_000,
) -> Bar:
    """A bar of ``symbol`` for regular-session minute ``minute`` (1 = 09:30 ET)."""
    start = ny_epoch_ms(day, 9, 30) + (minute - 1) * MINUTE_MS
    open_ = close if open_ is None else open_
    high = max(open_, close) if high is None else high
    low = min(open_, close) if low is None else low
    return Bar(
        seq=0,
        symbol=symbol,
        tsET=ts_et_minute(start),
        barId=bar_id(start),
        open=open_,
        high=high,
        low=low,
        close=close,
        volume=volume,
        vwap=round((high + low + close) / 3, 4),
        trades=10,
        startMs=start,
        endMs=start + MINUTE_MS,
        revision=revision,
    )


def series(
    symbol: str, closes: Sequence[float], *, first_minute: int = 1, day: date = DAY
) -> list[Bar]:
    """Consecutive bars with the given closes (each opens at the previous close)."""
    bars = []
    previous = closes[0]
    for index, close in enumerate(closes):
        bars.append(make_bar(symbol, first_minute + index, close, open_=previous, day=day))
        previous = close
    return bars


_BACKFILL_DIR = tempfile.TemporaryDirectory(prefix="tickmesh-bridge-bars-")


@functools.cache
def backfilled_day(tick_zip: Path) -> tuple[Bar, ...]:
    """One day of one symbol's bars built at test time by the bar service's backfill (the
    bar core, ``algoseek`` policy) from a real tick file; cached for the session."""
    from services.bars.backfill import run_backfill

    out = Path(_BACKFILL_DIR.name) / f"{tick_zip.parent.name}-{tick_zip.stem}.jsonl"
    run_backfill([tick_zip], "algoseek", out, grace_ms=0)
    return tuple(read_bars_jsonl(out))


def day_bars(shared_data: Path, symbol: str) -> list[Bar]:
    """``symbol`` on 2013-10-07 as the bar service would publish it (backfilled from ticks)."""
    return list(backfilled_day(shared_data / "tick" / symbol.lower() / "20131007_trade.zip"))


def spy_day_bars(shared_data: Path) -> list[Bar]:
    """SPY 2013-10-07, backfilled from the tick file by the bar core."""
    return day_bars(shared_data, "SPY")


def vendor_day_bars(shared_data: Path, symbol: str = "SPY") -> list[Bar]:
    """The vendor's own minute bars of ``symbol`` on 2013-10-07 (for comparison)."""
    return read_vendor_minute_bars(
        shared_data / "minute" / symbol.lower() / "20131007_trade.zip", symbol, DAY
    )


def test_backfilled_bars_are_contract_bars_of_the_whole_day(shared_data: Path) -> None:
    bars = spy_day_bars(shared_data)
    regular = [bar for bar in bars if 1 <= bar.barId <= 390]
    assert len(regular) == 390 and regular[0].tsET == "2013-10-07T09:30:00-04:00"
    assert all(bar.symbol == "SPY" and bar.seq == 0 and bar.revision == 0 for bar in bars)
    assert bars == sorted(bars, key=lambda bar: bar.startMs)


def test_vendor_minute_bars_read_as_contract_bars(shared_data: Path) -> None:
    bars = vendor_day_bars(shared_data)
    ten = [bar for bar in bars if bar.tsET == "2013-10-07T10:00:00-04:00"]
    assert ten and ten[0].barId == 31 and ten[0].volume == 337_771
    assert ten[0].endMs - ten[0].startMs == MINUTE_MS


def settings_for(prefix: str, **overrides: object) -> BridgeSettings:
    """Bridge settings on a key prefix of their own, SPY only, reading from the start."""
    values: dict[str, object] = {
        "key_prefix": prefix,
        "symbols": ["SPY"],
        "input_start": "earliest",
        "bucket_timeout_ms": 500,
        "portfolio_id": "paper",
    }
    values.update(overrides)
    return msgspec.convert(values, BridgeSettings)


async def publish_bars(publisher: Publisher, bars: Sequence[Bar], chunk: int = 50) -> None:
    """Publish bars on ``bars.<SYM>.1m`` in order, a pipeline per ``chunk``."""
    for start in range(0, len(bars), chunk):
        await publisher.publish_many(
            [(f"bars.{bar.symbol}.1m", bar) for bar in bars[start : start + chunk]]
        )


async def read_channel(client: object, prefix: str, channel: str) -> list[bytes]:
    """Every record of ``channel``'s stream under ``prefix``, in order."""
    reader = StreamReader(client, Keys(prefix))  # type: ignore[arg-type]
    out: list[bytes] = []
    after = 0
    while True:
        entries = await reader.read(channel, after, 5_000)
        if not entries:
            return out
        out.extend(payload for _, payload in entries)
        after = entries[-1][0]


def strip_seq(payload: bytes) -> bytes:
    """A record's bytes without its ``seq`` (which depends on the channel's history)."""
    assert payload.startswith(b'{"seq":')
    return b"{" + payload[payload.index(b",") + 1 :]


def decode_output(channel: str, payload: bytes) -> msgspec.Struct:
    """Decode a bridge output with the contract's Struct for its channel."""
    from libs.common.schemas import ExecutedTrade, Portfolio, Position, Signal

    types = {
        "sentio.signals.minute.v1": Signal,
        "sentio.trades.executed.v1": ExecutedTrade,
        "sentio.positions.state.v1": Position,
        "sentio.portfolio.minute.v1": Portfolio,
    }
    if channel == "sentio.engine.gaps.v1":
        return msgspec.json.decode(payload, type=EngineGap)
    if channel.startswith("bars."):
        return decode(payload, Bar)
    return decode(payload, types[channel])
