"""A synthetic trading day: the synthetic market's trades stamped through one New York day's
session, as the exchange calendar has it (``--synthetic-day YYYY-MM-DD``).

The day runs from 04:00 to 20:00 New York time, ``rate_per_s`` trades per second of event
time (so a whole day holds ``57,600 × rate`` trades). The regular session is the calendar's:
09:30 to 16:00, or to 13:00 on an early close (the day after Thanksgiving, Christmas Eve);
trades outside it carry Form T (12), as on the tape. Each symbol's listing exchange (NYSE for
tape A, NYSE Arca for tape B, Nasdaq for tape C, the simulator's convention, which its ticker
reference serves too) prints an opening cross (25) a second after the open and a closing
cross (8) a second after the close. A day the exchange does not trade (a weekend, a holiday)
has no trades at all: the feed publishes nothing.
"""

from __future__ import annotations

import msgspec

from libs.common.market.calendar import is_trading_day
from libs.common.market.sessions import session_for
from services.ingest.protocol import TradeEvent
from services.ingest.simulator.feeds import SyntheticMarket
from services.ingest.simulator.settings import SyntheticFeed

FORM_T = 12
OPENING_PRINTS = 25
CLOSING_PRINTS = 8
CROSS_SIZE = 10_000
LISTING_OF_TAPE = {1: 10, 2: 11, 3: 12}
"""Tape -> Polygon id of the synthetic symbol's listing exchange: NYSE, NYSE Arca, Nasdaq."""


class SyntheticSession(SyntheticMarket):
    """The synthetic market with its listing exchanges' auction prints."""

    def auction(self, condition: int, t_ms: int) -> list[TradeEvent]:
        """One cross print per symbol at its last price, from its listing exchange."""
        out = []
        for index, sym in enumerate(self.symbols):
            self._seqs[sym] += 1
            tape = self._tapes[sym]
            out.append(
                TradeEvent(
                    sym,
                    self._prices[sym],
                    CROSS_SIZE,
                    t_ms + index,
                    LISTING_OF_TAPE[tape],
                    (condition,),
                    str(next(self._trade_ids)),
                    tape,
                    self._seqs[sym],
                )
            )
        return out


def synthetic_day_trades(feed: SyntheticFeed) -> list[TradeEvent]:
    """Every trade of ``feed``'s day, in time order (none when the exchange is closed)."""
    day = feed.day
    if day is None:
        raise ValueError("a synthetic day needs its day")
    if not is_trading_day(day):
        return []
    session = session_for(day)
    market = SyntheticSession(feed)
    step = 1_000.0 / feed.rate_per_s
    auctions = [
        (session.open_ms + 1_000, OPENING_PRINTS),
        (session.close_ms + 1_000, CLOSING_PRINTS),
    ]
    trades: list[TradeEvent] = []
    clock = float(session.premarket_ms)
    while clock < session.end_ms:
        t_ms = int(clock)
        while auctions and auctions[0][0] <= t_ms:
            when, condition = auctions.pop(0)
            trades.extend(market.auction(condition, when))
        for trade in market.trades(1, t_ms):
            if not session.open_ms <= t_ms < session.close_ms:
                trade = msgspec.structs.replace(trade, c=(*trade.c, FORM_T))
            trades.append(trade)
        clock += step
    for when, condition in auctions:  # a rate too low to reach them
        trades.extend(market.auction(condition, when))
    trades.sort(key=lambda trade: trade.t)  # stable: an auction keeps its place among ties
    return trades
