"""What the feed gave ingest: one identity per trade, the source ledger and the feed's clock.

``SourceBook`` is pure (no I/O, no clock of its own) and sits on the frame path:

- ``admit`` drops a trade whose identity (``Trade.identity``: Polygon's ``i`` qualified by
  exchange and TRF, unique per symbol and day) was already published, so a reconnect overlap,
  a re-read or a backfill over live data never publishes a trade twice; what it admits is
  counted per symbol-minute for the ledger;
- ``ledger`` returns (and resets) the counts since the previous call, as the ``Ledger`` record
  that goes out in the same Redis round trip as the ticks it counts;
- ``published`` notes each tick channel's newest sequence once Redis has it, and ``progress``
  builds the ``Progress`` mark: the feed's time (the newest event time published) and every
  tick channel's sequence at that time.

Identities (``libs.common.market.identity.TradeIds``) are kept for ``horizon_ms`` of the
feed's time after they arrived (0: for the last ``keep_days`` New York days). A backfill or a
re-read of files checks its trades first against what the tick streams hold (read back into
an identity set of its own, ``known``), so its duplicates are dropped however long ago their
first copies were published.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from libs.common.market.identity import TradeIds
from libs.common.market.sessions import MINUTE_MS
from libs.common.schemas import Ledger, LedgerEntry, Progress, Trade

TradeT = TypeVar("TradeT", bound=Trade)


class _Minute:
    __slots__ = ("first_q", "last_q", "trades", "volume")

    def __init__(self) -> None:
        self.trades = 0
        self.volume = 0
        self.first_q = 0
        self.last_q = 0


class SourceBook:
    """Identity, ledger and progress of one ingest process; see the module docstring."""

    def __init__(self, source: str = "ingest", *, keep_days: int = 2, horizon_ms: int = 0) -> None:
        self.source = source
        self.ids = TradeIds(keep_days, horizon_ms)
        self._pending: dict[tuple[str, int], _Minute] = {}
        self._duplicates_reported = 0
        self.admitted_total = 0
        self.feed_time_ms = 0
        """The newest event time of a trade admitted (the feed's own clock)."""
        self.published_time_ms = 0
        """The newest event time of a trade Redis has (what progress marks may claim)."""
        self.channels: dict[str, int] = {}
        """Each tick channel's newest sequence on Redis."""

    @property
    def duplicates_total(self) -> int:
        """Trades dropped as already published, since start."""
        return self.ids.duplicates

    def seen(self, trade: Trade) -> bool:
        """True when a trade with this identity was already admitted."""
        return self.ids.seen(trade)

    def admit(
        self, sym: str, trades: Sequence[TradeT], known: TradeIds | None = None
    ) -> Sequence[TradeT]:
        """The trades of ``trades`` (one symbol, feed order) not published before; counted.
        A trade without an id (``i`` empty) cannot be told apart and is always admitted.
        ``known``: identities read back from the tick streams, checked first (and the
        trades it lets through noted in it)."""
        if known is not None:
            checked = known.fresh(sym, trades)
            self.ids.duplicates += len(trades) - len(checked)
            trades = checked
        fresh = self.ids.fresh(sym, trades)
        pending = self._pending
        minute_start = minute_end = 0
        acc: _Minute | None = None
        newest = self.feed_time_ms
        for trade in fresh:
            t = trade.t
            if t < minute_start or t >= minute_end:
                minute_start = t - t % MINUTE_MS
                minute_end = minute_start + MINUTE_MS
                acc = pending.get((sym, minute_start))
                if acc is None:
                    acc = pending[(sym, minute_start)] = _Minute()
            assert acc is not None
            acc.trades += 1
            acc.volume += trade.s
            q = trade.q
            if q:
                if not acc.first_q or q < acc.first_q:
                    acc.first_q = q
                if q > acc.last_q:
                    acc.last_q = q
            if t > newest:
                newest = t
        self.feed_time_ms = newest
        self.admitted_total += len(fresh)
        return fresh

    def ledger(self, now_ms: int) -> Ledger | None:
        """The counts since the previous call (None when there are none), then reset."""
        duplicates = self.ids.duplicates - self._duplicates_reported
        if not self._pending and not duplicates:
            return None
        entries = [
            LedgerEntry(sym, minute, acc.trades, acc.volume, acc.first_q, acc.last_q)
            for (sym, minute), acc in self._pending.items()
        ]
        self._pending = {}
        self._duplicates_reported = self.ids.duplicates
        return Ledger(0, self.source, entries, duplicates, now_ms)

    # -- progress ------------------------------------------------------------------------------

    def published(self, channels: Iterable[tuple[str, int]], newest_ms: int = 0) -> None:
        """Redis has these (channel, sequence) pairs, and the trades up to ``newest_ms``."""
        if newest_ms > self.published_time_ms:
            self.published_time_ms = newest_ms
        known = self.channels
        for channel, seq in channels:
            if seq > known.get(channel, 0):
                known[channel] = seq

    def progress(
        self, now_ms: int, *, idle: bool = False, live_time_ms: int = 0, connected: bool = True
    ) -> Progress:
        """The progress mark of what is published now. ``live_time_ms``: a connected live
        feed's clock (the wall clock), which moves the feed's time on when trades are few."""
        feed_time = max(self.published_time_ms, live_time_ms)
        return Progress(
            0,
            self.source,
            feed_time,
            dict(self.channels),
            idle=idle,
            live=live_time_ms > 0,
            connected=connected,
            tsMs=now_ms,
        )
