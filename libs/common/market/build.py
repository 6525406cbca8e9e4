"""Bars rebuilt from trades in hand: every symbol's trades through an aggregator of its own
(``libs.common.market.aggregator``), on the trades' own time, late trades revising. The
reconciler feeds such an aggregator batch by batch as it reads (``rebuilding_aggregator``);
``build_bars`` gives one batch of everything (tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import attrgetter

from libs.common.market.aggregator import BarAggregator
from libs.common.market.policies import ConditionPolicy, _PolicyBase, get_policy
from libs.common.runtime.clock import ManualClock
from libs.common.schemas import Bar, Trade

_SYMBOL = attrgetter("sym")


def rebuilding_aggregator(
    symbol: str, policy: _PolicyBase | ConditionPolicy, *, grace_ms: int = 0
) -> BarAggregator:
    """An aggregator that rebuilds ``symbol``'s bars from trades in hand: no wall clock (minutes
    close on the trades' time and at ``flush``), late trades revising their bars. Any split of
    the trades into batches gives the same bars' values."""
    return BarAggregator(
        symbol, policy, grace_ms=grace_ms, late_policy="revise", clock=ManualClock(0)
    )


def build_bars(
    trades: Sequence[Trade],
    policy: _PolicyBase | ConditionPolicy | str = "algoseek",
    *,
    grace_ms: int = 0,
    symbol: str | None = None,
) -> list[Bar]:
    """Bars of a finished, in-memory trade sequence (backfill, tests): the latest revision of
    every bar, ordered by symbol then minute.

    Each symbol's trades, in their order, go to an aggregator of their own as one batch.
    ``symbol``: every trade is of that symbol (taken on trust, not checked trade by trade).
    """
    if isinstance(policy, str):
        policy = get_policy(policy)
    groups: Mapping[str, Sequence[Trade]]
    if symbol is not None:
        groups = {symbol: trades}
    elif trades and all(map(trades[0].sym.__eq__, map(_SYMBOL, trades))):
        groups = {trades[0].sym: trades}
    else:
        per_symbol: dict[str, list[Trade]] = {}
        for trade in trades:
            bucket = per_symbol.get(trade.sym)
            if bucket is None:
                bucket = per_symbol[trade.sym] = []
            bucket.append(trade)
        groups = per_symbol
    out: list[Bar] = []
    for sym in sorted(groups):
        aggregator = rebuilding_aggregator(sym, policy, grace_ms=grace_ms)
        aggregator.add(groups[sym], 0, symbol=sym)
        aggregator.flush()
        out.extend(aggregator.published().values())
    return out
