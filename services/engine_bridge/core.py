"""The bridge core: a pure, synchronous, clock-free state machine fed bars.

``BridgeCore`` assembles closed bars into minute buckets, runs the paper broker around an
engine's decisions and returns the records to publish. It does no I/O and reads no clock:
callers pass ``now_ms`` where a wall-time timeout matters, and the same bars in the same
order give the same records, byte for byte. Its whole state is one ``BridgeState`` (see
``snapshot``), which the bridge actor saves to Redis together with the records.

One minute bucket goes through two calls around the engine:

1. ``begin(bucket)``: corrections are applied, stops and targets of earlier entries are
   checked against the bars, positions are marked, and the engine's input is returned;
2. ``finish(output)``: signals become records, orders are filled at the close, positions are
   flattened at the session close, and the positions and the portfolio snapshot are built.

``finish(None, gap_reason=...)`` records a minute the engine did not decide (crash,
timeout); the gap is published as one report when the engine answers again.

Bucket assembly: bars of one minute are held until every expected symbol (``symbols`` or,
when empty, every symbol seen) has either its bar for that minute or a bar of a later minute
(bars of one symbol arrive in order), so buckets do not depend on arrival timing. When a
symbol stays quiet, ``bucket_timeout_ms`` of wall time releases the bucket. Minutes go out
in order of their start, bars within one sorted by symbol.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Annotated, ClassVar

from msgspec import Meta, Struct

from libs.common import names
from libs.common.market.sessions import bar_id, last_bar_id, ny_date, ts_et_minute
from libs.common.runtime.settings import SettingsGroup
from libs.common.schemas import Bar, ExecutedTrade, Portfolio, Position, Signal
from services.engine_bridge.broker import BrokerConfig, Fill, PaperBroker
from services.engine_bridge.model import (
    STATE_VERSION,
    BridgeState,
    BrokerState,
    EngineGap,
    EngineInput,
    EngineOutput,
    GapState,
    PositionView,
)

LAST_REGULAR_BAR = 390
"""barId of 15:59 ET, the last regular-session minute of a full day; the day's own is
``sessions.last_bar_id`` (210 on an early close, from the exchange calendar)."""


def regular(ts_ms: int) -> bool:
    """Whether the minute holding ``ts_ms`` is in its day's regular session (the exchange
    calendar's: none on a holiday, to 12:59 on an early close)."""
    return 1 <= bar_id(ts_ms) <= last_bar_id(ts_ms)


class Channels(SettingsGroup, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where each kind of record goes (``BRIDGE_<KIND>_CHANNEL``)."""

    ENV_TEMPLATE: ClassVar[str] = "{field}_channel"

    signals: Annotated[str, Meta(description="channel of signals")] = names.SIGNALS
    trades: Annotated[str, Meta(description="channel of executed trades")] = names.TRADES
    positions: Annotated[str, Meta(description="channel of positions")] = names.POSITIONS
    portfolio: Annotated[str, Meta(description="channel of portfolio snapshots")] = names.PORTFOLIO
    gaps: Annotated[str, Meta(description="channel of engine gap reports")] = names.ENGINE_GAPS


class CoreConfig(Struct, frozen=True, kw_only=True):
    """Everything the core needs from the settings."""

    portfolio_id: str = "paper"
    engine_name: str = "builtin"
    symbols: tuple[str, ...] = ()
    bucket_timeout_ms: int = 3_000
    extended_hours: bool = False
    flatten_at_close: bool = True
    broker: BrokerConfig = BrokerConfig()
    channels: Channels = Channels()


class Bucket(Struct, frozen=True):
    """The bars of one minute, sorted by symbol; ``late`` when the minute was already done."""

    minuteMs: int
    bars: list[Bar]
    late: bool = False
    timedOut: bool = False


Outputs = list[tuple[str, Struct]]
"""Records to publish, in order, with their channels (``seq`` still 0)."""


@dataclass(slots=True)
class CoreStats:
    """Counters of what the core did since it was built (metrics read the differences)."""

    bars: int = 0
    buckets: int = 0
    corrections: int = 0
    duplicates: int = 0
    gaps: int = 0
    ignored: int = 0
    late: int = 0
    outside: int = 0
    rejected: int = 0
    signals: int = 0
    timed_out: int = 0
    trades: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)


def money(value: float) -> float:
    """Money, rounded to cents (``+ 0.0`` turns ``-0.0`` into ``0.0``)."""
    return round(value, 2) + 0.0


def price4(value: float) -> float:
    """Prices, rounded to 1/10000."""
    return round(value, 4) + 0.0


def position_records(
    broker: PaperBroker,
    touched: Iterable[str],
    minute_ms: int,
    by_symbol: dict[str, Bar],
    channel: str,
) -> Outputs:
    """Position records of one minute: every open position, and a flat record for each
    symbol in ``touched`` that has none (it was closed this minute)."""
    positions = broker.state.positions
    minute_ts = ts_et_minute(minute_ms)
    minute_bar_id = bar_id(minute_ms)
    records: Outputs = []
    for symbol in sorted(set(touched) | set(positions)):
        position = positions.get(symbol)
        if position is None:
            bar = by_symbol.get(symbol)
            records.append(
                (
                    channel,
                    Position(
                        seq=0,
                        symbol=symbol,
                        tsET=minute_ts,
                        barId=minute_bar_id,
                        barsHeld=0,
                        shares=0,
                        entryPrice=0.0,
                        lastPrice=price4(bar.close) if bar is not None else None,
                        unrealizedPnl=0.0,
                    ),
                )
            )
            continue
        records.append(
            (
                channel,
                Position(
                    seq=0,
                    symbol=symbol,
                    tsET=minute_ts,
                    barId=minute_bar_id,
                    barsHeld=position.barsHeld,
                    shares=position.shares,
                    entryPrice=price4(position.entryPrice),
                    lastPrice=price4(position.lastPrice),
                    unrealizedPnl=money(
                        (position.lastPrice - position.entryPrice) * position.shares
                    ),
                    stopPrice=None if position.stopPrice is None else price4(position.stopPrice),
                    targetPrice=None
                    if position.targetPrice is None
                    else price4(position.targetPrice),
                ),
            )
        )
    return records


def portfolio_record(broker: PaperBroker, portfolio_id: str, minute_ms: int) -> Portfolio:
    """The portfolio snapshot at the end of one minute."""
    state = broker.state
    return Portfolio(
        seq=0,
        portfolioId=portfolio_id,
        tsET=ts_et_minute(minute_ms),
        barId=bar_id(minute_ms),
        equity=money(broker.equity()),
        cash=money(state.cash),
        realizedPnl=money(state.realizedPnl),
        unrealizedPnl=money(broker.unrealized()),
        exposure=money(broker.exposure()),
        openPositions=len(state.positions),
    )


def trade_record(fill: Fill, minute_ms: int, trade_id: str) -> ExecutedTrade:
    """The executed-trade record of one fill in the minute starting at ``minute_ms``."""
    return ExecutedTrade(
        seq=0,
        symbol=fill.symbol,
        tsET=ts_et_minute(minute_ms),
        barId=bar_id(minute_ms),
        action=fill.action,  # type: ignore[arg-type]
        shares=fill.shares,
        price=price4(fill.price),
        stopPrice=None if fill.stopPrice is None else price4(fill.stopPrice),
        targetPrice=None if fill.targetPrice is None else price4(fill.targetPrice),
        reason=fill.reason,
        tradeId=trade_id,
        realizedPnl=money(fill.realizedPnl),
        commission=price4(fill.commission),
    )


def initial_state(config: CoreConfig) -> BridgeState:
    """The state of a fresh portfolio."""
    return BridgeState(
        version=STATE_VERSION,
        portfolioId=config.portfolio_id,
        broker=BrokerState(cash=config.broker.initial_cash),
    )


class BridgeCore:
    """Bars in, records out; see the module docstring."""

    def __init__(self, config: CoreConfig, state: BridgeState | None = None) -> None:
        self.config = config
        self.state = state if state is not None else initial_state(config)
        if self.state.version != STATE_VERSION:
            raise ValueError(
                f"state version {self.state.version}, this bridge reads {STATE_VERSION}"
            )
        self.broker = PaperBroker(config.broker, self.state.broker)
        self.stats = CoreStats()
        self._symbols = frozenset(config.symbols)
        self._known = set(self.state.knownSymbols)
        self._pending: dict[int, dict[str, Bar]] = {}
        self._arrived: dict[int, int] = {}
        for bar in self.state.pending:
            self._pending.setdefault(bar.startMs, {})[bar.symbol] = bar
        self._corrections: list[Bar] = list(self.state.pendingCorrections)
        self._in_flight: tuple[Bucket, list[Fill], set[str]] | None = None
        self.rejections: list[tuple[str, str, str]] = []
        """Orders of the last minute that were rejected: (symbol, action, why)."""

    # -- input -------------------------------------------------------------------------------

    def offer(self, bar: Bar, now_ms: int) -> str:
        """Take one bar; returns what became of it: ``pending``, ``correction``,
        ``duplicate``, ``late``, ``outside`` (session) or ``ignored`` (symbol)."""
        state = self.state
        symbol = bar.symbol
        if self._symbols and symbol not in self._symbols:
            self.stats.ignored += 1
            return "ignored"
        if not self.config.extended_hours and not regular(bar.startMs):
            self.stats.outside += 1
            state.lastBarEndMs = max(state.lastBarEndMs, bar.endMs)
            return "outside"
        self.stats.bars += 1
        if symbol not in self._known:
            self._known.add(symbol)
            state.knownSymbols = sorted(self._known)
        minute = bar.startMs
        if minute <= state.lastMs.get(symbol, 0):
            key = f"{symbol}:{minute}"
            if bar.revision > 0 and bar.revision > state.correctionsSeen.get(key, 0):
                state.correctionsSeen[key] = bar.revision
                self._corrections.append(bar)
                self.stats.corrections += 1
                return "correction"
            self.stats.duplicates += 1
            return "duplicate"
        waiting = self._pending.setdefault(minute, {})
        held = waiting.get(symbol)
        if held is not None:
            if bar.revision > held.revision:
                waiting[symbol] = bar
                self.stats.corrections += 1
                return "correction"
            self.stats.duplicates += 1
            return "duplicate"
        waiting[symbol] = bar
        self._arrived.setdefault(minute, now_ms)
        if minute <= state.lastBucketMs:
            self.stats.late += 1
            return "late"
        return "pending"

    def ready(self, now_ms: int) -> Bucket | None:
        """The next minute bucket that may be processed now, taken off the pending set."""
        if not self._pending:
            return None
        minute = min(self._pending)
        if minute <= self.state.lastBucketMs:
            return self._take(minute, late=True)
        expected = self._symbols or self._known
        waiting = self._pending[minute]
        later: set[str] = set()
        for other, bars in self._pending.items():
            if other > minute:
                later.update(bars)
        if all(symbol in waiting or symbol in later for symbol in expected):
            return self._take(minute)
        # a minute restored from a saved state starts its wait when first looked at
        if now_ms - self._arrived.setdefault(minute, now_ms) >= self.config.bucket_timeout_ms:
            self.stats.timed_out += 1
            return self._take(minute, timed_out=True)
        return None

    def flush(self) -> Bucket | None:
        """The earliest pending bucket regardless of missing symbols (end of the input)."""
        if not self._pending:
            return None
        minute = min(self._pending)
        return self._take(minute, late=minute <= self.state.lastBucketMs)

    @property
    def in_flight(self) -> bool:
        """True between ``begin`` and ``finish`` (the state is then not one to save)."""
        return self._in_flight is not None

    def pending_minutes(self) -> int:
        """How many minutes are waiting for bars."""
        return len(self._pending)

    def _take(self, minute: int, *, late: bool = False, timed_out: bool = False) -> Bucket:
        bars = self._pending.pop(minute)
        self._arrived.pop(minute, None)
        return Bucket(minute, [bars[s] for s in sorted(bars)], late, timed_out)

    # -- one bucket --------------------------------------------------------------------------

    def begin(self, bucket: Bucket) -> EngineInput:
        """Apply corrections, stop/target exits and marks; returns the engine's input."""
        if self._in_flight is not None:
            raise RuntimeError("begin() called twice without finish()")
        state = self.state
        broker = self.broker
        corrections = sorted(self._corrections, key=lambda b: (b.startMs, b.symbol, b.revision))
        self._corrections = []
        for correction in corrections:
            if state.lastMs.get(correction.symbol) == correction.startMs:
                broker.remark(correction.symbol, correction.close)
        held = set(state.broker.positions)
        fills: list[Fill] = []
        for bar in bucket.bars:
            fills.extend(broker.check_exits(bar))
            broker.mark(bar)
            if bar.startMs > state.lastMs.get(bar.symbol, 0):
                state.lastMs[bar.symbol] = bar.startMs
            state.lastBarEndMs = max(state.lastBarEndMs, bar.endMs)
        if not bucket.late:
            state.lastBucketMs = max(state.lastBucketMs, bucket.minuteMs)
        self._in_flight = (bucket, fills, held)
        return EngineInput(
            minuteMs=bucket.minuteMs,
            tsET=ts_et_minute(bucket.minuteMs),
            barId=bar_id(bucket.minuteMs),
            bars=bucket.bars,
            corrections=corrections,
            positions=self.position_views(),
        )

    def position_views(self) -> list[PositionView]:
        """Open positions as engines see them, by symbol."""
        return [
            PositionView(p.symbol, p.shares, p.entryPrice, p.barsHeld, p.stopPrice, p.targetPrice)
            for _, p in sorted(self.state.broker.positions.items())
        ]

    def finish(
        self,
        output: EngineOutput | None,
        *,
        gap_reason: str = "",
        engine_restarts: int = 0,
    ) -> Outputs:
        """Fill the engine's orders and build this minute's records.

        ``output`` None means the engine gave no decision (``gap_reason`` says why); the
        minute joins the open gap. ``engine_restarts`` is the engine's running restart count,
        so the gap report can say how many restarts it spanned.
        """
        if self._in_flight is None:
            raise RuntimeError("finish() called without begin()")
        bucket, fills, held = self._in_flight
        self._in_flight = None
        state = self.state
        broker = self.broker
        channels = self.config.channels
        minute = bucket.minuteMs
        minute_bar_id = bar_id(minute)
        by_symbol = {bar.symbol: bar for bar in bucket.bars}
        records: Outputs = []

        if output is None:
            self._extend_gap(bucket, gap_reason or "no decision", engine_restarts)
            output = EngineOutput()
        elif state.gap is not None:
            records.append((channels.gaps, self._gap_record(engine_restarts)))
            state.gap = None

        for signal in output.signals:
            if signal.symbol not in by_symbol and signal.symbol not in self._known:
                continue  # a symbol this bridge does not trade
            bar = by_symbol.get(signal.symbol)
            start = bar.startMs if bar is not None else minute
            records.append(
                (
                    channels.signals,
                    Signal(
                        seq=0,
                        symbol=signal.symbol,
                        tsET=ts_et_minute(start),
                        barId=bar_id(start),
                        signal=signal.signal,
                        confidence=round(min(100.0, max(0.0, signal.confidence)), 1),
                        strategy=signal.strategy or self.config.engine_name,
                    ),
                )
            )
            self.stats.signals += 1

        closing = self.config.flatten_at_close and minute_bar_id >= last_bar_id(minute)
        rejections: list[tuple[str, str, str]] = []
        for order in output.orders:
            bar = by_symbol.get(order.symbol)
            if bar is None or closing:
                note = "no bar of the symbol this minute" if bar is None else "session close"
                rejections.append((order.symbol, order.action, note))
                continue
            done, note, rejected = broker.execute(order, bar)
            if rejected:
                rejections.append((order.symbol, order.action, note))
            fills.extend(done)

        if closing:
            for symbol in sorted(state.broker.positions):
                fills.extend(broker.close(symbol, minute, "eod", by_symbol.get(symbol)))

        self.stats.rejected += len(rejections)
        self.rejections = rejections
        touched = set(held)
        day = ny_date(minute).strftime("%Y%m%d")
        first_fill = state.broker.fills - len(fills)
        for index, fill in enumerate(fills):
            touched.add(fill.symbol)
            bar = by_symbol.get(fill.symbol)
            start = bar.startMs if bar is not None else minute
            fill_bar_id = bar_id(start)
            number = first_fill + index + 1
            trade_id = f"{self.config.portfolio_id}-{day}-{fill.symbol}-{fill_bar_id}-{number}"
            records.append((channels.trades, trade_record(fill, start, trade_id)))
            self.stats.trades += 1

        records.extend(position_records(broker, touched, minute, by_symbol, channels.positions))
        records.append(
            (channels.portfolio, portfolio_record(broker, self.config.portfolio_id, minute))
        )
        state.buckets += 1
        self.stats.buckets += 1
        return records

    def process(self, bucket: Bucket, decide: object) -> Outputs:
        """``begin``, a synchronous ``decide(input) -> EngineOutput``, ``finish``."""
        engine_input = self.begin(bucket)
        return self.finish(decide(engine_input))  # type: ignore[operator]

    # -- gaps --------------------------------------------------------------------------------

    def _extend_gap(self, bucket: Bucket, reason: str, engine_restarts: int) -> None:
        gap = self.state.gap
        symbols = [bar.symbol for bar in bucket.bars]
        if gap is None:
            self.state.gap = GapState(
                reason=reason,
                fromMs=bucket.minuteMs,
                toMs=bucket.minuteMs,
                minutes=1,
                symbols=sorted(set(symbols)),
                restarts=engine_restarts,
                timeouts=1 if reason == "timeout" else 0,
            )
            return
        gap.toMs = max(gap.toMs, bucket.minuteMs)
        gap.minutes += 1
        gap.symbols = sorted(set(gap.symbols) | set(symbols))
        if reason not in gap.reason.split("+"):
            gap.reason = "+".join(sorted({*gap.reason.split("+"), reason}))
        if reason == "timeout":
            gap.timeouts += 1

    def _gap_record(self, engine_restarts: int) -> EngineGap:
        gap = self.state.gap
        assert gap is not None
        self.stats.gaps += 1
        return EngineGap(
            seq=0,
            portfolioId=self.config.portfolio_id,
            engine=self.config.engine_name,
            reason=gap.reason,
            fromTsET=ts_et_minute(gap.fromMs),
            toTsET=ts_et_minute(gap.toMs),
            fromBarId=bar_id(gap.fromMs),
            toBarId=bar_id(gap.toMs),
            minutes=gap.minutes,
            symbols=gap.symbols,
            restarts=max(0, engine_restarts - gap.restarts),
            timeouts=gap.timeouts,
        )

    def close_gap(self, engine_restarts: int = 0) -> Outputs:
        """The report of a gap still open (at shutdown), closing it."""
        if self.state.gap is None:
            return []
        record = self._gap_record(engine_restarts)
        self.state.gap = None
        return [(self.config.channels.gaps, record)]

    # -- state -------------------------------------------------------------------------------

    def snapshot(self, engine_state: object = None) -> BridgeState:
        """The whole state, pending bars included, ready to encode."""
        state = self.state
        state.pending = [
            bar
            for minute in sorted(self._pending)
            for _, bar in sorted(self._pending[minute].items())
        ]
        state.pendingCorrections = list(self._corrections)
        self._prune_corrections()
        state.engine = engine_state
        return state

    def _prune_corrections(self) -> None:
        seen = self.state.correctionsSeen
        if len(seen) > 5_000:
            newest = sorted(seen, key=lambda key: int(key.rsplit(":", 1)[1]))[-2_000:]
            self.state.correctionsSeen = {key: seen[key] for key in newest}


def run_bars(
    core: BridgeCore,
    engine: object,
    bars: Iterable[Bar],
    *,
    now_ms: int = 0,
    flush: bool = True,
) -> Outputs:
    """Feed ``bars`` through ``core`` with a synchronous engine (``engine.decide``); for tests,
    exports and backtests. ``flush`` processes what is still pending at the end."""
    decide = engine.decide  # type: ignore[attr-defined]
    outputs: Outputs = []
    for bar in bars:
        core.offer(bar, now_ms)
        while (bucket := core.ready(now_ms)) is not None:
            outputs.extend(core.process(bucket, decide))
    if flush:
        while (bucket := core.flush()) is not None:
            outputs.extend(core.process(bucket, decide))
    return outputs
