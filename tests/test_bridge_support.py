"""Helpers shared by the engine-bridge tests (``tests/test_bridge_*.py``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import date
from pathlib import Path

import msgspec

from libs.common.clock import MINUTE_MS, bar_id, ny_epoch_ms, ts_et_minute
from libs.common.redis_io import Keys, Publisher, StreamReader
from libs.common.schemas import Bar, decode
from services.engine_bridge.config import BridgeSettings
from services.engine_bridge.datasets import read_vendor_minute_bars
from services.engine_bridge.model import EngineGap

DAY = date(2013, 10, 7)
SPY_MINUTE_ZIP = Path("minute/spy/20131007_trade.zip")
SPY_TICK_ZIP = Path("tick/spy/20131007_trade.zip")

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


def spy_day_bars(shared_data: Path) -> list[Bar]:
    """SPY 2013-10-07 as minute bars: the bar core's backfill when it exists, else the
    vendor's own minute bars (see ``test_bridge_golden``)."""
    return read_vendor_minute_bars(shared_data / SPY_MINUTE_ZIP, "SPY", DAY)


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


@contextlib.asynccontextmanager
async def running(actor_or_supervisor: object) -> AsyncIterator[None]:
    """Run a supervisor in a task for the duration of the block, then stop it."""
    task = asyncio.create_task(actor_or_supervisor.run())  # type: ignore[attr-defined]
    try:
        yield
    finally:
        actor_or_supervisor.stop()  # type: ignore[attr-defined]
        await asyncio.wait_for(task, 15)
