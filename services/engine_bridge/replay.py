"""The replay engine: plays an engine's historical outputs, one minute bucket at a time.

Input files (``docs/replay_format.md``):

- ``results.json``: run metadata (``run``), an optional ``summary`` and the minute bars the
  engine saw (``price_data``, per symbol);
- ``trades.jsonl``: one executed trade per line (and optionally ``"type": "signal"`` lines).

Each minute bucket publishes, in one pipelined round trip: the bars (as ``Bar`` records on
``bars.<SYM>.1m``, which the mirror maps to Kafka ``sentio.prices.minute.v1``), the signals,
the trades, the positions and the portfolio snapshot (the trades are booked on a paper
portfolio exactly as given: no slippage, their own commission, no stops), and a heartbeat.
Bucket *i* goes out ``i × REPLAY_SPEED_MS`` after the first, on an absolute schedule so that
slow publishing does not add up; 0 means as fast as possible.

``export_replay`` writes the two files from a run of the bridge core, which is how the sample
in ``services/engine_bridge/samples/`` and the test-time real-data replay are made.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
from msgspec import Struct
from prometheus_client import CollectorRegistry

from libs.common import names
from libs.common.io.redis_io import Publisher
from libs.common.market.sessions import MINUTE_MS, bar_id, floor_minute, ts_et, ts_et_minute
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component
from libs.common.schemas import Bar, ExecutedTrade, Heartbeat, Signal
from services.engine_bridge.broker import BrokerConfig, PaperBroker
from services.engine_bridge.core import (
    Channels,
    Outputs,
    money,
    portfolio_record,
    position_records,
    price4,
)

DEFAULT_CHANNELS = Channels()
RESULTS_FORMAT = "tickmesh.engine-results"
RESULTS_VERSION = 1


class PriceBar(Struct, frozen=True, omit_defaults=True):
    """One minute bar of ``price_data``."""

    startMs: int
    open: float
    high: float
    low: float
    close: float
    volume: int = 0
    vwap: float | None = None
    trades: int = 0


class RunInfo(Struct, frozen=True, omit_defaults=True):
    """``run`` of results.json: what produced the outputs."""

    runId: str = ""
    engine: str = ""
    strategy: str = ""
    portfolioId: str = "paper"
    symbols: list[str] = []
    initialCash: float = 100_000.0
    start: str = ""
    end: str = ""
    params: dict[str, Any] = {}
    source: str = ""
    createdBy: str = ""


class Summary(Struct, frozen=True, omit_defaults=True):
    """``summary`` of results.json (informative; replay does not need it)."""

    signals: int = 0
    trades: int = 0
    realizedPnl: float = 0.0
    commissions: float = 0.0
    endEquity: float = 0.0


class Results(Struct, frozen=True):
    """results.json."""

    run: RunInfo
    price_data: dict[str, list[PriceBar]]
    format: str = RESULTS_FORMAT
    version: int = RESULTS_VERSION
    summary: Summary | None = None


class ReplayLine(Struct, frozen=True, omit_defaults=True):
    """One line of trades.jsonl: a trade (the default) or a signal.

    The time is ``timeMs`` (epoch ms) or ``tsET`` (ISO-8601 with offset); the line belongs
    to the minute bucket containing it.
    """

    symbol: str
    type: Literal["trade", "signal"] = "trade"
    timeMs: int | None = None
    tsET: str | None = None
    action: Literal["BUY", "SELL"] | None = None
    shares: int | None = None
    price: float | None = None
    stopPrice: float | None = None
    targetPrice: float | None = None
    reason: str = ""
    tradeId: str = ""
    commission: float = 0.0
    realizedPnl: float | None = None
    signal: Literal["BULLISH", "BEARISH", "NEUTRAL"] | None = None
    confidence: float | None = None
    strategy: str = ""


class ReplayFormatError(ValueError):
    """A replay file does not follow ``docs/replay_format.md``; the message says where."""


class ReplayMinute(Struct, frozen=True):
    """Everything of one minute bucket."""

    minuteMs: int
    bars: list[Bar]
    lines: list[ReplayLine]


_RESULTS_DECODER = msgspec.json.Decoder(Results)
_LINE_DECODER = msgspec.json.Decoder(ReplayLine)
_ENCODER = msgspec.json.Encoder()


def line_time_ms(line: ReplayLine) -> int:
    """Epoch ms of a line from ``timeMs`` or ``tsET``."""
    if line.timeMs is not None:
        return line.timeMs
    if line.tsET:
        moment = datetime.fromisoformat(line.tsET)
        if moment.tzinfo is None:
            raise ValueError(f"tsET {line.tsET!r} has no UTC offset")
        return int(moment.timestamp() * 1000)
    raise ValueError("a line needs timeMs or tsET")


def price_bar_to_bar(symbol: str, price: PriceBar) -> Bar:
    """A ``price_data`` entry as the contract's bar (vwap defaults to the typical price)."""
    typical = price4((price.high + price.low + price.close) / 3)
    vwap = price.vwap if price.vwap is not None else typical
    return Bar(
        seq=0,
        symbol=symbol,
        tsET=ts_et_minute(price.startMs),
        barId=bar_id(price.startMs),
        open=price.open,
        high=price.high,
        low=price.low,
        close=price.close,
        volume=price.volume,
        vwap=vwap,
        trades=price.trades,
        startMs=price.startMs,
        endMs=price.startMs + MINUTE_MS,
        revision=0,
    )


def load_replay(
    results_path: str | Path, trades_path: str | Path
) -> tuple[RunInfo, list[ReplayMinute]]:
    """Read both files into minute buckets, in time order (bars by symbol, lines in file order)."""
    results_path, trades_path = Path(results_path), Path(trades_path)
    try:
        results = _RESULTS_DECODER.decode(results_path.read_bytes())
    except (msgspec.DecodeError, OSError) as exc:
        raise ReplayFormatError(f"{results_path}: {exc}") from None
    if results.format != RESULTS_FORMAT or results.version != RESULTS_VERSION:
        raise ReplayFormatError(
            f"{results_path}: format {results.format!r} v{results.version}, "
            f"want {RESULTS_FORMAT!r} v{RESULTS_VERSION}"
        )
    bars: dict[int, list[Bar]] = {}
    for symbol in sorted(results.price_data):
        for price in results.price_data[symbol]:
            if price.startMs % MINUTE_MS:
                raise ReplayFormatError(
                    f"{results_path}: price_data[{symbol}] startMs {price.startMs} "
                    "is not on a minute"
                )
            bars.setdefault(price.startMs, []).append(price_bar_to_bar(symbol, price))
    lines: dict[int, list[ReplayLine]] = {}
    try:
        text = trades_path.read_bytes().splitlines()
    except OSError as exc:
        raise ReplayFormatError(f"{trades_path}: {exc}") from None
    for number, raw in enumerate(text, 1):
        if not raw.strip():
            continue
        try:
            line = _LINE_DECODER.decode(raw)
            minute = floor_minute(line_time_ms(line))
        except (msgspec.DecodeError, ValueError) as exc:
            raise ReplayFormatError(f"{trades_path}:{number}: {exc}") from None
        if line.type == "trade" and (
            line.action is None or not line.shares or line.shares < 0 or line.price is None
        ):
            raise ReplayFormatError(f"{trades_path}:{number}: a trade needs action, shares, price")
        if line.type == "signal" and line.signal is None:
            raise ReplayFormatError(f"{trades_path}:{number}: a signal line needs signal")
        lines.setdefault(minute, []).append(line)
    minutes = [
        ReplayMinute(
            minute, sorted(bars.get(minute, []), key=lambda b: b.symbol), lines.get(minute, [])
        )
        for minute in sorted(set(bars) | set(lines))
    ]
    return results.run, minutes


class ReplayBook:
    """Turns replay minutes into records: bars, signals, trades, positions, portfolio (pure)."""

    def __init__(
        self,
        run: RunInfo,
        channels: Channels = DEFAULT_CHANNELS,
        bars_channel: str = names.BARS,
        portfolio_id: str | None = None,
    ) -> None:
        self.run = run
        self.channels = channels
        self.bars_channel = bars_channel
        self.portfolio_id = portfolio_id or run.portfolioId or "paper"
        self.broker = PaperBroker(
            BrokerConfig(
                initial_cash=run.initialCash,
                slippage_bps=0.0,
                commission_per_share=0.0,
                stop_pct=0.0,
                target_pct=0.0,
                allow_short=True,
            )
        )
        self.last_price: dict[str, float] = {}
        self.trades = 0

    def step(self, minute: ReplayMinute) -> Outputs:
        """The records of one minute bucket."""
        records: Outputs = []
        broker = self.broker
        by_symbol = {bar.symbol: bar for bar in minute.bars}
        held = set(broker.state.positions)
        for bar in minute.bars:
            records.append((self.bars_channel.format(symbol=bar.symbol), bar))
            broker.mark(bar)
            self.last_price[bar.symbol] = bar.close
        touched = set(held)
        for line in minute.lines:
            start = floor_minute(line_time_ms(line))
            if line.type == "signal":
                assert line.signal is not None
                records.append(
                    (
                        self.channels.signals,
                        Signal(
                            seq=0,
                            symbol=line.symbol,
                            tsET=ts_et_minute(start),
                            barId=bar_id(start),
                            signal=line.signal,
                            confidence=round(min(100.0, max(0.0, line.confidence or 0.0)), 1),
                            strategy=line.strategy
                            or self.run.strategy
                            or self.run.engine
                            or "replay",
                        ),
                    )
                )
                continue
            assert line.action is not None and line.shares is not None and line.price is not None
            minute_bar = by_symbol.get(line.symbol)
            mark = minute_bar.close if minute_bar is not None else line.price
            fill = broker.book(
                line.symbol,
                start,
                line.action,
                line.shares,
                line.price,
                mark,
                line.reason,
                line.stopPrice,
                line.targetPrice,
                line.commission,
            )
            self.trades += 1
            touched.add(line.symbol)
            trade_id = line.tradeId or f"{self.portfolio_id}-replay-{line.symbol}-{self.trades}"
            records.append(
                (
                    self.channels.trades,
                    ExecutedTrade(
                        seq=0,
                        symbol=line.symbol,
                        tsET=ts_et_minute(start),
                        barId=bar_id(start),
                        action=line.action,
                        shares=line.shares,
                        price=price4(line.price),
                        stopPrice=line.stopPrice,
                        targetPrice=line.targetPrice,
                        reason=line.reason,
                        tradeId=trade_id,
                        realizedPnl=money(fill.realizedPnl),
                        commission=price4(line.commission),
                    ),
                )
            )
        records.extend(
            position_records(broker, touched, minute.minuteMs, by_symbol, self.channels.positions)
        )
        records.append(
            (self.channels.portfolio, portfolio_record(broker, self.portfolio_id, minute.minuteMs))
        )
        return records


class OutputReplay(Component):
    """Publishes replay minutes on a fixed pace; see the module docstring."""

    def __init__(
        self,
        run: RunInfo,
        minutes: Sequence[ReplayMinute],
        publisher: Publisher,
        *,
        speed_ms: int,
        channels: Channels = DEFAULT_CHANNELS,
        bars_channel: str = names.BARS,
        portfolio_id: str | None = None,
        run_id: str = "replay",
        heartbeat_channel: str = names.HEARTBEAT,
        clock: Clock = SYSTEM_CLOCK,
        on_done: Callable[[], None] | None = None,
        on_minute: Callable[[int], None] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__("engine_bridge.replay", registry=registry)
        self.book = ReplayBook(run, channels, bars_channel, portfolio_id)
        self.minutes = list(minutes)
        self.publisher = publisher
        self.speed_ms = speed_ms
        self.run_id = run_id
        self.heartbeat_channel = heartbeat_channel
        self.clock = clock
        self.on_done = on_done
        self.on_minute = on_minute
        self.position = 0
        """Minutes published so far."""
        self.lag_ms = 0
        """How late the newest minute went out against its schedule."""
        self.done = False
        self.publish_times: list[float] = []
        self._ready: tuple[int, Outputs] | None = None
        self.spawn(self._play, name="engine_bridge.replay.play")

    def status(self) -> str:
        """``replaying``, then ``done``."""
        return "done" if self.done else "replaying"

    async def _play(self) -> None:
        started = time.monotonic()
        first = self.position
        while self.position < len(self.minutes):
            index = self.position
            due = started + (index - first) * self.speed_ms / 1000.0
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._ready is None or self._ready[0] != index:
                self._ready = (index, self.book.step(self.minutes[index]))
            records = list(self._ready[1])
            now_ms = self.clock.now_ms()
            self.lag_ms = max(0, int((time.monotonic() - due) * 1000))
            records.append(
                (
                    self.heartbeat_channel,
                    Heartbeat(
                        seq=0,
                        runId=self.run_id,
                        service="engine_bridge",
                        tsET=ts_et(now_ms),
                        mode="replay",
                        status="replaying",
                        lagMs=self.lag_ms,
                        tsMs=now_ms,
                    ),
                )
            )
            await self.publisher.publish_many(records)
            self.publish_times.append(time.monotonic())
            self.position = index + 1
            self._ready = None
            if self.on_minute is not None:
                self.on_minute(index)
        if not self.done:
            self.done = True
            self.log.info("replay.done", minutes=len(self.minutes), trades=self.book.trades)
            if self.on_done is not None:
                self.on_done()


def format_results(results: Results) -> bytes:
    """results.json, readable: metadata indented, one ``price_data`` bar per line."""

    def indented(value: object) -> bytes:
        return msgspec.json.format(_ENCODER.encode(value), indent=2).replace(b"\n", b"\n  ")

    parts = [
        b'{\n  "format": ' + _ENCODER.encode(results.format),
        b',\n  "version": ' + _ENCODER.encode(results.version),
        b',\n  "run": ' + indented(results.run),
    ]
    if results.summary is not None:
        parts.append(b',\n  "summary": ' + indented(results.summary))
    symbols = []
    for symbol in sorted(results.price_data):
        bars = b",\n      ".join(_ENCODER.encode(bar) for bar in results.price_data[symbol])
        symbols.append(b"    " + _ENCODER.encode(symbol) + b": [\n      " + bars + b"\n    ]")
    parts.append(b',\n  "price_data": {\n' + b",\n".join(symbols) + b"\n  }\n}\n")
    return b"".join(parts)


def export_replay(
    out_dir: str | Path,
    run: RunInfo,
    bars: Iterable[Bar],
    outputs: Outputs,
    *,
    include_signals: bool = True,
) -> tuple[Path, Path]:
    """Write results.json and trades.jsonl of a bridge run (``outputs`` of the core)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    price_data: dict[str, list[PriceBar]] = {}
    for bar in sorted(bars, key=lambda b: (b.symbol, b.startMs)):
        price_data.setdefault(bar.symbol, []).append(
            PriceBar(
                startMs=bar.startMs,
                open=bar.open,
                high=bar.high,
                low=bar.low,
                close=bar.close,
                volume=bar.volume,
                vwap=bar.vwap,
                trades=bar.trades,
            )
        )
    lines: list[bytes] = []
    signals = trades = 0
    realized = commissions = 0.0
    end_equity = run.initialCash
    for _, record in outputs:
        if isinstance(record, ExecutedTrade):
            trades += 1
            realized += record.realizedPnl
            commissions += record.commission
            lines.append(
                _ENCODER.encode(
                    ReplayLine(
                        symbol=record.symbol,
                        tsET=record.tsET,
                        action=record.action,
                        shares=record.shares,
                        price=record.price,
                        stopPrice=record.stopPrice,
                        targetPrice=record.targetPrice,
                        reason=record.reason,
                        tradeId=record.tradeId,
                        commission=record.commission,
                        realizedPnl=record.realizedPnl,
                    )
                )
            )
        elif isinstance(record, Signal):
            signals += 1
            if include_signals:
                lines.append(
                    _ENCODER.encode(
                        ReplayLine(
                            symbol=record.symbol,
                            type="signal",
                            tsET=record.tsET,
                            signal=record.signal,
                            confidence=record.confidence,
                            strategy=record.strategy,
                        )
                    )
                )
        elif type(record).__name__ == "Portfolio":
            end_equity = record.equity  # type: ignore[attr-defined]
    results = Results(
        run=run,
        price_data=price_data,
        summary=Summary(
            signals=signals,
            trades=trades,
            realizedPnl=money(realized),
            commissions=price4(commissions),
            endEquity=money(end_equity),
        ),
    )
    results_path = out / "results.json"
    trades_path = out / "trades.jsonl"
    results_path.write_bytes(format_results(results))
    trades_path.write_bytes(b"".join(line + b"\n" for line in lines))
    return results_path, trades_path
