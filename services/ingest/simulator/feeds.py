"""What the simulator sends: synthetic trades, a day of tick files, malformed frames, each as
an async source of frames."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import date
from pathlib import Path

import msgspec
import structlog

from libs.common.market.sessions import MINUTE_MS
from services.ingest import protocol
from services.ingest.framing import frames_of
from services.ingest.protocol import (
    Event,
    MinuteAggEvent,
    TradeEvent,
)
from services.ingest.simulator.minutes import MinuteAggregator, VendorMinutes
from services.ingest.simulator.settings import (
    INTERMARKET_SWEEP,
    ODD_LOT,
    SYNTHETIC_EXCHANGES,
    FileFeed,
    ReplayDay,
    SyntheticFeed,
)

log = structlog.get_logger("ingest.simulator")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_NOISE_TABLE = 4096
"""Normal deviates drawn once per market; a trade's price step picks one at random."""
_ROUND_LOTS = (1, 1, 1, 2, 3, 5, 10)


class SyntheticMarket:
    """Deterministic synthetic trades for ``settings.symbols`` symbols (see ``SyntheticFeed``).

    A load generator must cost far less than what it loads: every draw of a trade is one
    ``random()`` scaled to its range (``randint``, ``choice`` and ``gauss`` cost a microsecond
    or so each, about 9 us a trade in all, a fifth of a core at 20 k trades/s)."""

    def __init__(self, settings: SyntheticFeed) -> None:
        self.settings = settings
        width = max(4, len(str(settings.symbols)))
        self.symbols = [f"S{index:0{width}d}" for index in range(1, settings.symbols + 1)]
        self._rng = random.Random(settings.seed)
        rng = self._rng
        self._prices = {sym: round(rng.uniform(10.0, 500.0), 2) for sym in self.symbols}
        self._tapes = {sym: 1 + index % 3 for index, sym in enumerate(self.symbols)}
        self._seqs = dict.fromkeys(self.symbols, 0)
        weights = [1.0 / (rank + 1) for rank in range(len(self.symbols))]
        self._cum_weights = list(itertools.accumulate(weights))
        self._steps = [1.0 + rng.gauss(0.0, 0.0005) for _ in range(_NOISE_TABLE)]
        self._trade_ids = itertools.count(1)

    def trades(self, count: int, t_ms: int) -> list[TradeEvent]:
        """The next ``count`` trades, all stamped ``t_ms``."""
        random_ = self._rng.random
        settings = self.settings
        odd = settings.odd_lot_ratio
        sweep = odd + settings.sweep_ratio
        prices = self._prices
        seqs = self._seqs
        tapes = self._tapes
        steps = self._steps
        ids = self._trade_ids
        exchanges = SYNTHETIC_EXCHANGES
        n_exchanges = len(exchanges)
        out = []
        conditions: tuple[int, ...]
        for sym in self._rng.choices(self.symbols, cum_weights=self._cum_weights, k=count):
            price = round(prices[sym] * steps[int(random_() * _NOISE_TABLE)], 2)
            if price < 0.01:
                price = 0.01
            prices[sym] = price
            seq = seqs[sym] = seqs[sym] + 1 + int(random_() * 4)
            draw = random_()
            if draw < odd:
                size, conditions = 1 + int(random_() * 99), (ODD_LOT,)
            elif draw < sweep:
                size, conditions = 100 * (1 + int(random_() * 20)), (INTERMARKET_SWEEP,)
            else:
                size, conditions = 100 * _ROUND_LOTS[int(random_() * 7)], ()
            out.append(
                TradeEvent(
                    sym,
                    price,
                    size,
                    t_ms,
                    exchanges[int(random_() * n_exchanges)],
                    conditions,
                    str(next(ids)),
                    tapes[sym],
                    seq,
                )
            )
        return out


def find_tick_file(data_dir: Path, symbol: str, day: date) -> Path:
    """The tick file of ``symbol`` on ``day``: ``<data_dir>/**/tick/<sym>/<yyyymmdd>_trade.zip``."""
    name = f"{day:%Y%m%d}_trade.zip"
    direct = data_dir / "tick" / symbol.lower() / name
    if direct.is_file():
        return direct
    found = sorted(data_dir.glob(f"**/tick/{symbol.lower()}/{name}"))
    if not found:
        raise FileNotFoundError(
            f"no tick file for {symbol} on {day} under {data_dir} (looked for tick/"
            f"{symbol.lower()}/{name})"
        )
    return found[0]


def load_day_trades(feed: FileFeed, day: ReplayDay | None = None) -> list[TradeEvent]:
    """Read ``feed``'s symbols for ``day`` (default: ``feed.day`` as itself) and merge them in
    time order (stable by symbol); a day replayed under another date has its times shifted to
    that date, each keeping its New York time of day."""
    from libs.common.market.tickfiles import read_lean_trades

    day = day or ReplayDay(feed.day, feed.day)
    shift = day.shift_ms
    per_symbol = []
    for symbol in feed.symbols:
        path = find_tick_file(feed.data_dir, symbol, day.source)
        trades = [protocol.as_trade_event(trade) for trade in read_lean_trades(path)]
        if shift:
            trades = [_shifted(trade, shift) for trade in trades]
        per_symbol.append(trades)
    if len(per_symbol) == 1:
        return per_symbol[0]
    return list(heapq.merge(*per_symbol, key=lambda trade: trade.t))


def _shifted(trade: TradeEvent, shift_ms: int) -> TradeEvent:
    if trade.trft:
        return msgspec.structs.replace(trade, t=trade.t + shift_ms, trft=trade.trft + shift_ms)
    return msgspec.structs.replace(trade, t=trade.t + shift_ms)


def load_vendor_minutes(
    feed: FileFeed, day: ReplayDay | None = None
) -> list[MinuteAggEvent] | None:
    """The vendor's minute bars of ``feed``'s symbols and ``day`` as ``AM`` events (shifted as
    the trades are), or None when a symbol has no ``minute/<sym>/<yyyymmdd>_trade.zip`` beside
    its tick file."""
    from libs.common.market.tickfiles import read_lean_minute_bars

    day = day or ReplayDay(feed.day, feed.day)
    shift = day.shift_ms
    events: list[MinuteAggEvent] = []
    for symbol in feed.symbols:
        tick_path = find_tick_file(feed.data_dir, symbol, day.source)
        minute_path = tick_path.parents[2] / "minute" / tick_path.parent.name / tick_path.name
        if not minute_path.is_file():
            return None
        for bar in read_lean_minute_bars(minute_path, day.source):
            start = bar.start_ms + shift
            events.append(
                MinuteAggEvent(
                    sym=symbol,
                    v=bar.volume,
                    o=bar.open,
                    c=bar.close,
                    h=bar.high,
                    l=bar.low,
                    s=start,
                    e=start + MINUTE_MS,
                )
            )
    return events


_ROUNDS = itertools.count(1)
"""Each good trade of a malformed round gets an id of its own (a trade id is unique)."""


def malformed_frames(symbol: str, t_ms: int) -> list[bytes]:
    """The frames of one ``malformed`` round, in order.

    1. truncated JSON; 2. a trade object not wrapped in an array; 3. an array with an unknown
    ``ev``; 4. an array of five trades where the 2nd lacks ``p`` and the 4th has ``p`` as a
    string — the 1st, 3rd and 5th are good.
    """
    good = [
        TradeEvent(symbol, 100.0 + n, 100, t_ms, 4, (), f"malformed-good-{n}-{next(_ROUNDS)}", 3, n)
        for n in (1, 3, 5)
    ]
    encoded = [protocol.encode_events([event])[1:-1] for event in good]
    missing = b'{"ev":"T","sym":"%s","s":100,"t":%d,"i":"malformed-bad-2"}' % (
        symbol.encode(),
        t_ms,
    )
    ill_typed = b'{"ev":"T","sym":"%s","p":"abc","s":100,"t":%d,"i":"malformed-bad-4"}' % (
        symbol.encode(),
        t_ms,
    )
    mixed = b"[" + b",".join([encoded[0], missing, encoded[1], ill_typed, encoded[2]]) + b"]"
    return [
        b'[{"ev":"T","sym":"%s","p":1' % symbol.encode(),
        b'{"ev":"T","sym":"%s","p":1.0,"s":100,"t":%d}' % (symbol.encode(), t_ms),
        b'[{"ev":"XYZ","sym":"%s","t":%d}]' % (symbol.encode(), t_ms),
        mixed,
    ]


class Pace:
    """How fast a file feed goes: ``speed`` times real time (0: no pacing), ``factor`` times
    that during a burst (``burst``), read at each frame so a burst takes effect at once."""

    def __init__(self, speed: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.speed = speed
        self.clock = clock
        self.burst_factor = 1.0
        self.burst_until = 0.0
        self.bursts = 0

    def burst(self, factor: float, seconds: float) -> None:
        """Go ``factor`` times faster for the next ``seconds`` (wall time)."""
        if not factor >= 1:
            raise ValueError(f"a burst's factor must be at least 1, not {factor}")
        if not 0 < seconds <= 3_600:
            raise ValueError(f"a burst lasts more than 0 and at most 3600 s, not {seconds}")
        self.burst_factor = factor
        self.burst_until = self.clock() + seconds
        self.bursts += 1

    def factor(self) -> float:
        """The burst's factor while it lasts, else 1."""
        return self.burst_factor if self.clock() < self.burst_until else 1.0

    def seconds_for(self, feed_ms: int) -> float:
        """Wall seconds that ``feed_ms`` of the feed take now (0 without pacing)."""
        if self.speed <= 0:
            return 0.0
        return feed_ms / 1000.0 / (self.speed * self.factor())

    def status(self) -> dict[str, float]:
        """The pace as JSON: speed, the burst's factor now and its seconds left."""
        left = max(0.0, self.burst_until - self.clock())
        return {"speed": self.speed, "factor": self.factor(), "burstSecondsLeft": round(left, 3)}


async def file_frames(
    trades: Sequence[TradeEvent],
    speed: float,
    frame_max_events: int,
    window_ms: int,
    minute_aggregates: bool = True,
    vendor_minutes: Sequence[MinuteAggEvent] | None = None,
    *,
    pace: Pace | None = None,
) -> AsyncIterator[list[Event]]:
    """Frames of time-ordered ``trades`` paced at ``speed`` (0: no pacing), AM frames between.

    Each frame is due the feed time since the previous frame later, at the pace of the moment
    (``pace``: ``speed``, faster during a burst). The AM events are the vendor's bars when
    given, else the simulator's own from all trades.
    """
    loop = asyncio.get_running_loop()
    pace = pace or Pace(speed)
    aggregator: MinuteAggregator | VendorMinutes | None = None
    if minute_aggregates:
        aggregator = (
            VendorMinutes(vendor_minutes) if vendor_minutes is not None else MinuteAggregator()
        )
    if not trades:
        return
    previous_t = trades[0].t
    due = loop.time()
    for frame in frames_of(trades, frame_max_events, window_ms):
        t_ms = frame[0].t
        if pace.speed > 0:
            due += pace.seconds_for(t_ms - previous_t)
            previous_t = t_ms
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if aggregator is not None:
            closed = aggregator.advance(t_ms)
            if closed:
                yield list(closed)
            aggregator.add(frame)
        yield list(frame)
    if aggregator is not None:
        closed = aggregator.flush()
        if closed:
            yield list(closed)


async def synthetic_frames(
    market: SyntheticMarket,
    rate_per_s: float,
    frame_max_events: int,
    minute_aggregates: bool = True,
    clock_ms: Callable[[], int] = _now_ms,
) -> AsyncIterator[list[Event]]:
    """Endless frames of synthetic trades at ``rate_per_s`` in total, stamped with wall time.

    When it falls behind (a slow client paused it) it catches up by at most one second's worth.
    """
    loop = asyncio.get_running_loop()
    aggregator = MinuteAggregator() if minute_aggregates else None
    start = loop.time()
    emitted = 0
    while True:
        now = loop.time()
        due = math.floor((now - start) * rate_per_s) - emitted
        if due > max(1, rate_per_s):
            skipped = due - max(1, int(rate_per_s))
            emitted += skipped
            due -= skipped
        if due <= 0:
            await asyncio.sleep(max(0.001, (emitted + 1) / rate_per_s - (now - start)))
            continue
        t_ms = clock_ms()
        if aggregator is not None:
            closed = aggregator.advance(t_ms)
            if closed:
                yield list(closed)
        while due > 0:
            count = min(due, frame_max_events)
            frame = market.trades(count, t_ms)
            if aggregator is not None:
                aggregator.add(frame)
            emitted += count
            due -= count
            yield list(frame)


def oversized_frame(size_bytes: int) -> bytes:
    """One frame of ``size_bytes`` (at least a few dozen): a JSON array of one ``status``
    event whose message is padding, harmless to a client that reads it whole."""
    head = b'[{"ev":"status","status":"padding","message":"'
    tail = b'"}]'
    return head + b"x" * max(0, size_bytes - len(head) - len(tail)) + tail
