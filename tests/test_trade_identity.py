"""Trade identities held compactly: every id packed or not, deduplicated exactly, in bounded
memory per identity."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.market import identity
from libs.common.market.identity import TradeIds
from libs.common.market.sessions import ny_epoch_ms, parse_day
from libs.common.schemas import Trade

T0 = ny_epoch_ms(parse_day("2013-10-07"), 10, 0)


def trade(i: str, *, x: int = 4, trfi: int | None = None, sym: str = "SPY") -> Trade:
    return Trade(sym, 10.0, 100, T0, x, (), i, 1, 0, False, trfi)


def kept(ids: TradeIds, *trades: Trade) -> list[str]:
    return [f"{t.x}/{t.trfi}/{t.i}" for t in ids.fresh(trades[0].sym, list(trades))]


def test_packed_identities_stay_duplicates_in_any_order_and_at_any_venue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(identity, "PACK_AT", 4)
    ids = TradeIds()
    high = [trade(str(9_000_000_000_000 + n)) for n in range(40)]  # one venue's id scale
    low = [trade(str(n + 1), x=11) for n in range(40)]  # another's, far below
    trf = [trade(str(n + 1), x=4, trfi=201) for n in range(40)]  # exchange 4 through a TRF
    for batch in zip(high, low, trf, strict=True):
        for t in batch:
            assert kept(ids, t)
    day = ids._seen["SPY"][ids._current["SPY"][0]]
    assert len(day.recent) < 4 and len(day.levels) > 1  # packed, in more than one level
    # every one again, newest first and interleaved: all dropped
    again = [t for batch in zip(high, low, trf, strict=True) for t in batch][::-1]
    assert kept(ids, *again) == []
    assert ids.duplicates == 120
    # ids between and below the packed ones are new, once
    between = [trade(str(9_000_000_000_000 + n), x=11) for n in range(5)]
    assert len(kept(ids, *between, *between)) == 5


def test_ids_that_are_not_plain_decimals_are_their_own_identities() -> None:
    ids = TradeIds()
    spellings = ["7", "07", "007", "+7", " 7", "7 ", "٧", "1_0", "10", "12345678901234567", "-"]
    assert len(kept(ids, *(trade(s) for s in spellings))) == len(spellings)
    assert kept(ids, *(trade(s) for s in spellings)) == []
    assert kept(ids, trade("12345678901234567", x=11)) != []  # a long id: per venue too


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([(4, None), (11, None), (4, 201), (4, 202)]),
            st.one_of(st.integers(0, 60).map(str), st.sampled_from(["0", "00", "x1", "01"])),
        ),
        max_size=300,
    ),
    st.integers(1, 16),
)
def test_the_packed_store_admits_exactly_what_a_plain_set_of_strings_admits(
    events: list[tuple[tuple[int, int | None], str]], pack_at: int
) -> None:
    saved = identity.PACK_AT
    identity.PACK_AT = pack_at
    try:
        ids = TradeIds()
        reference: set[tuple[int, int | None, str]] = set()
        for (x, trfi), i in events:
            expected = (x, trfi, i) not in reference
            reference.add((x, trfi, i))
            assert bool(kept(ids, trade(i, x=x, trfi=trfi))) == expected
            assert ids.seen(trade(i, x=x, trfi=trfi))
        assert ids.held() == len(reference)
    finally:
        identity.PACK_AT = saved


def test_a_day_of_identities_costs_a_few_bytes_each() -> None:
    """What a builder keeps all day: 200,000 trades of 100 symbols on three venues."""
    trades = [
        Trade(f"S{n % 100}", 10.0, 100, T0 + n, (4, 11, 12)[n % 3], (), str(52_983_525_029_461 + n))
        for n in range(200_000)
    ]
    tracemalloc.start()
    try:
        ids = TradeIds()
        before = tracemalloc.get_traced_memory()[0]
        for t in trades:
            ids.fresh(t.sym, (t,))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert ids.held() == 200_000 and ids.duplicates == 0
    # strings in sets took about 140 B an identity; packed, 8 B, plus each symbol's recent set
    assert held / len(trades) < 24, held / len(trades)  # 15 here


def at(i: str, t_ms: int, *, x: int = 4) -> Trade:
    return Trade("SPY", 10.0, 100, T0 + t_ms, x, (), i, 1)


def test_with_a_horizon_a_trade_sent_again_within_it_is_dropped_whatever_its_own_time() -> None:
    ids = TradeIds(horizon_ms=10_000)
    assert kept(ids, at("1", 0), at("2", 1_000))
    # a backfilled trade of long before arrives at feed time 9 s: remembered from its arrival
    assert kept(ids, at("3", 9_000), at("99", -3_600_000))
    assert kept(ids, at("4", 18_500)) and kept(ids, at("99", -3_600_000)) == []
    # 10 s after their arrival the first trades are forgotten: no longer told apart
    assert kept(ids, at("5", 20_000)) and kept(ids, at("1", 0)) != []
    assert ids.duplicates == 1


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30), st.integers(0, 4_000)), max_size=200),
    st.integers(1, 3_000),
)
def test_a_horizon_drops_every_trade_sent_again_within_it_and_forgets_by_generations(
    events: list[tuple[int, int]], horizon: int
) -> None:
    """Against a model: an identity is kept from its arrival (the feed's time then, the newest
    trade time so far) until the feed is two generations of half the horizon past the one it
    arrived in; anything sent again sooner than the horizon is always dropped."""
    ids = TradeIds(horizon_ms=horizon)
    span = (horizon + 1) // 2
    arrived: dict[str, int] = {}  # identity -> feed time when it was last admitted
    feed = -1
    for n, step in events:
        t_ms = step * 5  # trades within one New York day; times go back as well as forward
        feed = max(feed, T0 + t_ms)
        i = str(n)
        first = arrived.get(i)
        remembered = first is not None and feed // span <= first // span + 2
        assert bool(kept(ids, at(i, t_ms))) == (not remembered)
        if first is not None and feed - first < horizon:
            assert remembered  # the guarantee
        if not remembered:
            arrived[i] = feed
    live = {i for i, first in arrived.items() if feed // span <= first // span + 2}
    assert ids.held() == len(live)


def test_a_horizon_bounds_the_identities_held_however_long_the_feed_runs() -> None:
    ids = TradeIds(horizon_ms=1_000)
    most = 0
    for n in range(100_000):  # 10 trades a millisecond of feed time, 10 horizons of feed
        ids.fresh("SPY", (at(str(n), n // 10),))
        most = max(most, ids.held())
    # a generation (500 ms) is 5,000 trades: the horizon's two and the current one are held
    assert ids.duplicates == 0 and 10_000 <= most <= 15_000, most
    assert 10_000 <= ids.held() <= 15_000
    assert TradeIds().fresh("SPY", [at("1", 0)]) and TradeIds(horizon_ms=0).horizon_ms == 0
    with pytest.raises(ValueError, match="horizon_ms"):
        TradeIds(horizon_ms=-1)
