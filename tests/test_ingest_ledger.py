"""The source book: one identity per trade, the ledger per symbol-minute, the feed's clock."""

from __future__ import annotations

from libs.common.market.identity import TradeIds
from libs.common.market.sessions import MINUTE_MS, ny_epoch_ms, parse_day
from libs.common.schemas import LedgerEntry
from services.ingest.ledger import SourceBook
from services.ingest.protocol import TradeEvent

DAY = parse_day("2013-10-07")
T0 = ny_epoch_ms(DAY, 10, 0)


def trade(i: str, t: int, *, s: int = 100, x: int = 4, q: int = 0, trfi: int | None = None):
    return TradeEvent("SPY", 100.0, s, t, x, (), i, 1, q, False, trfi)


def test_a_trade_is_admitted_once_whatever_the_batch_that_carries_it() -> None:
    book = SourceBook()
    first = book.admit("SPY", [trade("1", T0), trade("2", T0 + 1)])
    again = book.admit("SPY", [trade("2", T0 + 1), trade("3", T0 + 2), trade("1", T0)])
    assert [t.i for t in first] == ["1", "2"] and [t.i for t in again] == ["3"]
    ledger = book.ledger(0)
    assert ledger is not None and ledger.duplicates == 2
    assert ledger.entries == [LedgerEntry("SPY", T0, 3, 300)]
    assert book.ledger(0) is None  # nothing since


def test_identity_is_per_exchange_and_trf_and_trades_without_an_id_always_pass() -> None:
    book = SourceBook()
    admitted = book.admit(
        "SPY",
        [
            trade("7", T0, x=4, trfi=201),
            trade("7", T0, x=4, trfi=202),  # another TRF: another trade
            trade("7", T0, x=11),  # another exchange
            trade("", T0),
            trade("", T0),  # no id: cannot be told apart, kept
            trade("7", T0, x=11),  # the same as the third
        ],
    )
    assert len(admitted) == 5


def test_the_ledger_counts_per_minute_with_the_vendor_sequence_range() -> None:
    book = SourceBook()
    book.admit("SPY", [trade("1", T0, q=10), trade("2", T0 + 59_999, s=50, q=12)])
    book.admit("SPY", [trade("3", T0 + MINUTE_MS, q=13)])
    ledger = book.ledger(5)
    assert ledger is not None and ledger.tsMs == 5
    assert sorted(ledger.entries, key=lambda entry: entry.minuteMs) == [
        LedgerEntry("SPY", T0, 2, 150, 10, 12),
        LedgerEntry("SPY", T0 + MINUTE_MS, 1, 100, 13, 13),
    ]
    assert book.feed_time_ms == T0 + MINUTE_MS


def test_ids_reset_with_the_day_and_old_days_are_forgotten() -> None:
    book = SourceBook(keep_days=2)
    next_day = ny_epoch_ms(parse_day("2013-10-08"), 10, 0)
    assert book.admit("SPY", [trade("1", T0)])
    assert book.admit("SPY", [trade("1", next_day)])  # ids start again each day
    assert not book.admit("SPY", [trade("1", T0)])  # still remembered
    later = ny_epoch_ms(parse_day("2013-10-09"), 10, 0)
    book.admit("SPY", [trade("1", later)])
    assert book.admit("SPY", [trade("1", T0)])  # 2013-10-07 forgotten (two days kept)


def test_identities_stay_per_symbol_and_day_when_symbols_and_days_interleave() -> None:
    """The day a symbol's last trade fell in is remembered per symbol and the last day worked
    out is shared: neither may leak a trade's identity to another symbol or day."""
    ids = TradeIds()
    next_day = ny_epoch_ms(parse_day("2013-10-08"), 10, 0)

    def kept(sym: str, *trades: TradeEvent) -> list[str]:
        return [f"{t.i}@{t.t}" for t in ids.fresh(sym, list(trades))]

    assert kept("SPY", trade("1", T0)) == [f"1@{T0}"]
    assert kept("IBM", trade("1", next_day)) == [f"1@{next_day}"]  # another symbol, day
    assert kept("SPY", trade("1", T0), trade("1", next_day)) == [f"1@{next_day}"]
    assert kept("IBM", trade("1", T0), trade("1", next_day)) == [f"1@{T0}"]
    assert kept("SPY", trade("1", next_day), trade("1", T0)) == []
    assert ids.duplicates == 4


def test_progress_names_each_tick_channel_sequence_and_the_feed_time() -> None:
    book = SourceBook("ingest-a")
    book.admit("SPY", [trade("1", T0 + 5)])
    book.published([("ticks.SPY", 4), ("ticks.IBM", 2), ("ticks.SPY", 3)], T0 + 5)
    mark = book.progress(99, idle=True)
    assert mark.ticks == {"ticks.SPY": 4, "ticks.IBM": 2}
    assert (mark.feedTimeMs, mark.idle, mark.live, mark.source) == (T0 + 5, True, False, "ingest-a")
    live = book.progress(99, live_time_ms=T0 + 60_000)
    assert live.feedTimeMs == T0 + 60_000 and live.live
