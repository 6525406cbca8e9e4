"""Properties of the bar core, checked on generated trade sequences (hypothesis).

1. Every trade's size lands in exactly one bar or one counted drop (shares and trades).
2. The same trades in any batch split give the same bars.
3. Delivering a trade twice changes nothing (the identity filter the builders put before the
   core, ``TradeIds``, then the core).
4. Within a minute, open, high, low, close, volume and trades do not depend on arrival order
   beyond what the policy states: open and close go by event time, ties by arrival order.

The trades are drawn from what the shared data holds (conditions, venues, the auction prints
of the primary listing and of others, official reports, suspicious prints) on a normal day
and on an early close, bunched into a few minutes around the open and the closes so that
minutes fill up, tie and arrive late. By default each property runs 200 derandomized
examples (the same every run, so the suite and CI stay deterministic: a few seconds each);
``TICKMESH_HYPOTHESIS_EXAMPLES=N`` runs N examples that explore anew each time (a search; a
case it finds becomes a plain test here, like the first one below).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import date
from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common.market.aggregator import BarAggregator, BarCounters
from libs.common.market.identity import TradeIds
from libs.common.market.policies import OPEN_CLOSE, get_policy
from libs.common.market.sessions import MINUTE_MS, ny_date, ny_epoch_ms, session_for
from libs.common.runtime.clock import ManualClock
from libs.common.schemas import Bar, Trade

SEARCH = os.environ.get("TICKMESH_HYPOTHESIS_EXAMPLES")
EXAMPLES = int(SEARCH) if SEARCH else 200
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not SEARCH,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SYMBOL = "IBM"  # NYSE-listed: NYSE's opening and closing prints are the auction's
NYSE = 10
DAYS = (date(2013, 10, 8), date(2013, 11, 29))  # a normal day and an early close (13:00)
MINUTES = (
    (4, 0),
    (9, 29),
    (9, 30),
    (9, 31),
    (11, 0),
    (12, 59),
    (13, 0),
    (15, 59),
    (16, 0),
    (16, 1),
    (19, 59),
)
CONDITIONS = (
    (),
    (0,),
    (14, 41),
    (14,),
    (41,),
    (12,),
    (12, 41),
    (14, 12, 41),
    (2,),
    (2, 41),
    (10, 2, 41),
    (29, 41),
    (7, 41),
    (20, 41),
    (37,),
    (22,),
    (25, 41),
    (25,),
    (8, 41),
    (8,),
    (16,),
    (15,),
    (0, 15),
    (25, 9, 41),
)
VENUES = (10, 10, 11, 12, 4)  # NYSE (the primary) twice as likely
POLICIES = ("algoseek", "polygon", "none")


@st.composite
def trade_lists(draw: st.DrawFn, max_size: int = 60) -> list[Trade]:
    """Trades of one symbol on one day, in an arbitrary arrival order, each with its own id."""
    day = draw(st.sampled_from(DAYS))
    count = draw(st.integers(min_value=1, max_value=max_size))
    trades = []
    for number in range(count):
        hour, minute = draw(st.sampled_from(MINUTES))
        offset = draw(st.sampled_from((0, 1, 500, 30_000, 59_999)) | st.integers(0, 59_999))
        trades.append(
            Trade(
                SYMBOL,
                draw(st.integers(min_value=400, max_value=440)) / 4,  # $100.00 .. $110.00
                draw(st.sampled_from((1, 100, 200, 500, 1_000, 25_000))),
                ny_epoch_ms(day, hour, minute) + offset,
                draw(st.sampled_from(VENUES)),
                draw(st.sampled_from(CONDITIONS)),
                str(number + 1),
                1,
                number + 1,
                draw(st.integers(0, 9)) == 0,  # about one print in ten suspicious
            )
        )
    return trades


def split(data: st.DataObject, trades: Sequence[Trade], most: int = 8) -> list[Sequence[Trade]]:
    """``trades`` cut into batches at drawn places (one batch when none is drawn)."""
    size = len(trades)
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=max(1, size - 1)), max_size=most))
    edges = [0, *sorted({cut for cut in cuts if 0 < cut < size}), size]
    return [trades[a:b] for a, b in pairwise(edges) if b > a]


def run(
    trades_batches: Sequence[Sequence[Trade]],
    policy: str,
    *,
    grace_ms: int = 2_000,
    late: str = "revise",
    dedupe: bool = False,
) -> tuple[dict[int, Bar], BarCounters, int]:
    """Feed the batches to one aggregator with event time as the clock; return the latest
    version of every bar it emitted, its counters and the duplicates dropped before it."""
    manual = ManualClock(0)
    aggregator = BarAggregator(SYMBOL, policy, grace_ms=grace_ms, late_policy=late, clock=manual)
    ids = TradeIds()
    bars: dict[int, Bar] = {}

    def keep(out: list[Bar]) -> None:
        for bar in out:
            held = bars.get(bar.startMs)
            if held is None or bar.revision > held.revision:
                bars[bar.startMs] = bar

    for batch in trades_batches:
        fresh = ids.fresh(SYMBOL, batch) if dedupe else batch
        if fresh:
            keep(aggregator.add(fresh, 0, symbol=SYMBOL))
    keep(aggregator.flush())
    return bars, aggregator.counters, ids.duplicates


def values(bars: dict[int, Bar]) -> dict[int, tuple[float, float, float, float, int, int]]:
    """What a bar says, without its revision number (and without the float vwap)."""
    return {
        start: (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.trades)
        for start, bar in sorted(bars.items())
    }


def vwaps(bars: dict[int, Bar]) -> dict[int, float]:
    return {start: bar.vwap for start, bar in sorted(bars.items())}


# --- 1. conservation ---------------------------------------------------------------------------


@PROPERTY
@given(st.data(), trade_lists(), st.sampled_from(POLICIES), st.sampled_from((0, 2_000, 90_000)))
def test_every_trade_lands_in_one_bar_or_one_counted_drop(
    data: st.DataObject, trades: list[Trade], policy: str, grace_ms: int
) -> None:
    bars, counters, _ = run(split(data, trades), policy, grace_ms=grace_ms)
    shares = sum(bar.volume for bar in bars.values())
    dropped = counters.volume_excluded + counters.volume_dropped + counters.unpriced_volume_dropped
    assert shares + dropped == sum(trade.s for trade in trades), counters
    placed = sum(bar.trades for bar in bars.values())
    counted = (
        counters.trades_ignored_by_policy
        + counters.auction_prints_ignored
        + counters.late_dropped
        + counters.too_old_dropped
        + counters.unpriced_trades_dropped
    )
    assert placed + counted == len(trades) == counters.trades_in, counters
    assert counters.late_dropped == counters.too_old_dropped == 0  # one day, late revised


def test_the_days_first_priced_minute_takes_back_the_shares_counted_as_dropped() -> None:
    """A price-less minute before any priced one is counted as dropped when it closes; when
    the day's first priced minute closes and folds those shares in, the drop is taken back."""
    day = DAYS[0]
    unpriced = Trade(SYMBOL, 100.0, 1, ny_epoch_ms(day, 4, 0), NYSE, (), "1", 1, 1, True)
    priced = Trade(SYMBOL, 100.0, 1, ny_epoch_ms(day, 9, 29), NYSE, (), "2", 1, 2, False)
    for batches in ([[unpriced, priced]], [[unpriced], [priced]]):
        bars, counters, _ = run(batches, "algoseek", grace_ms=0)
        assert [bar.volume for bar in bars.values()] == [2]
        assert counters.unpriced_volume_dropped == counters.unpriced_trades_dropped == 0


@PROPERTY
@given(st.data(), trade_lists(), st.sampled_from(POLICIES))
def test_a_late_trade_dropped_is_counted_with_its_shares(
    data: st.DataObject, trades: list[Trade], policy: str
) -> None:
    """Under ``drop`` a late trade reaches no bar; its shares are counted as dropped."""
    _, counters, _ = run(split(data, trades), policy, grace_ms=0, late="drop")
    assert counters.late_revised == 0
    assert (counters.late_dropped == 0) == (counters.volume_dropped == 0)
    revised, _, _ = run(split(data, trades), policy, grace_ms=0)
    assert sum(bar.volume for bar in revised.values()) <= sum(trade.s for trade in trades)


# --- 2. batch splits -----------------------------------------------------------------------------


@PROPERTY
@given(st.data(), trade_lists(), st.sampled_from(POLICIES), st.sampled_from((0, 2_000)))
def test_any_batch_split_gives_the_same_bars(
    data: st.DataObject, trades: list[Trade], policy: str, grace_ms: int
) -> None:
    whole, _, _ = run([trades], policy, grace_ms=grace_ms)
    pieces, _, _ = run(split(data, trades, most=12), policy, grace_ms=grace_ms)
    assert values(pieces) == values(whole)
    assert vwaps(pieces) == vwaps(whole)  # the same arrival order: the same sums


# --- 3. duplicates -------------------------------------------------------------------------------


@PROPERTY
@given(st.data(), trade_lists(max_size=40), st.sampled_from(POLICIES))
def test_delivering_a_trade_twice_changes_nothing(
    data: st.DataObject, trades: list[Trade], policy: str
) -> None:
    once, _, _ = run([trades], policy)
    # copies of some trades arrive again later (a reconnect overlap, a backfill, a re-read)
    stream = list(trades)
    copies = data.draw(st.lists(st.integers(0, len(trades) - 1), min_size=1, max_size=20))
    for original in copies:
        # after the original wherever earlier copies moved it: a copy never arrives first
        first = next(k for k, trade in enumerate(stream) if trade is trades[original])
        stream.insert(data.draw(st.integers(first + 1, len(stream))), trades[original])
    twice, counters, duplicates = run(split(data, stream), policy, dedupe=True)
    assert duplicates == len(copies)
    assert values(twice) == values(once)
    assert vwaps(twice) == vwaps(once)
    assert counters.trades_in == len(trades)


# --- 4. arrival order within a minute ------------------------------------------------------------

AUCTION_PRINTS = frozenset({(25, 41), (25,), (8, 41), (8,), (25, 9, 41)})


@PROPERTY
@given(st.data(), trade_lists(max_size=40), st.sampled_from(POLICIES))
def test_arrival_order_changes_only_what_the_policy_says(
    data: st.DataObject, trades: list[Trade], policy: str
) -> None:
    """Any arrival order gives every bar the same volume and trade count, and the same open,
    high, low and close unless the trades that set the open or the close share an event time
    (ties go by arrival order). An auction print counts only if it is the first of the day:
    which one is first is arrival order, so bars from its minute on (and the closing bar it
    goes to) are compared only when there is none."""
    shuffled = data.draw(st.permutations(trades))
    in_order, _, _ = run([trades], policy, grace_ms=90_000)
    permuted, _, _ = run([shuffled], policy, grace_ms=90_000)
    session = session_for(ny_date(trades[0].t))
    horizon = 1 << 62
    if policy == "algoseek" and any(trade.c in AUCTION_PRINTS for trade in trades):
        horizon = min(
            [trade.t - trade.t % MINUTE_MS for trade in trades if trade.c in AUCTION_PRINTS]
            + [session.close_ms - MINUTE_MS]
        )
    compared = {minute for minute in in_order if minute < horizon}
    assert compared == {minute for minute in permuted if minute < horizon}
    code = get_policy(policy).code
    priced: dict[int, list[int]] = {}
    for trade in trades:
        minute = trade.t - trade.t % MINUTE_MS
        regular = session.open_ms <= minute < session.close_ms
        if code(trade.c, trade.x, trade.suspicious, regular, NYSE) & OPEN_CLOSE:
            priced.setdefault(minute, []).append(trade.t)
    for minute in sorted(compared):
        bar, other = in_order[minute], permuted[minute]
        assert (bar.volume, bar.trades) == (other.volume, other.trades), minute
        stamps = priced[minute]
        if stamps.count(min(stamps)) == 1 and stamps.count(max(stamps)) == 1:
            assert (bar.open, bar.high, bar.low, bar.close) == (
                other.open,
                other.high,
                other.low,
                other.close,
            ), minute
        assert abs(bar.vwap - other.vwap) <= 1.5e-6, minute  # float sums in another order


# --- 5. the progress path ----------------------------------------------------------------------


@PROPERTY
@given(st.data(), trade_lists(), st.sampled_from(POLICIES), st.sampled_from((0, 2_000)))
def test_closing_on_progress_marks_agrees_with_a_frozen_wall_clock(
    data: st.DataObject, trades: list[Trade], policy: str, grace_ms: int
) -> None:
    """Without the wall clock (``wall_clock=False``: the builders' default, closing on the
    path's progress marks) ``add`` takes its own shorter way; with a clock that never moves
    the wall-clock way moves the watermark with the trades alone too. Both must give the
    same bars, revisions and counters after every batch and every mark; and ``changes``
    moves exactly when a closed minute changed."""
    progress = BarAggregator(SYMBOL, policy, grace_ms=grace_ms, wall_clock=False)
    frozen = BarAggregator(SYMBOL, policy, grace_ms=grace_ms, clock=ManualClock(0))
    seen = progress.changes

    def changes_are_told() -> None:
        """What the builder relies on to save only the symbols whose closed minutes changed."""
        nonlocal seen
        changed = [day.take_changed() for day in progress.retained_days()]
        assert any(changed) == (progress.changes != seen)
        seen = progress.changes

    for batch in split(data, trades, most=12):
        assert progress.add(batch, 0, symbol=SYMBOL) == frozen.add(batch, 0, symbol=SYMBOL)
        assert bool(progress.open_minutes) == (frozen.open_since() is not None)
        changes_are_told()
        if data.draw(st.booleans()):  # a mark a little past the newest trade, or idle
            mark = max(trade.t for trade in batch) + data.draw(st.sampled_from((0, 1_000, 61_000)))
            idle = data.draw(st.booleans())
            assert progress.advance_to(mark, idle=idle) == frozen.advance_to(mark, idle=idle)
            changes_are_told()
        assert progress.watermark_ms == frozen.watermark_ms
    assert progress.flush() == frozen.flush()
    assert progress.counters == frozen.counters
