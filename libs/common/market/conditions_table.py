"""Polygon's stocks trade-condition table, shipped with tickmesh, as frozen lookups.

The data is ``libs/common/data/polygon_stock_conditions.json``: every row Polygon's
``GET /v3/reference/conditions?asset_class=stocks`` lists, in the endpoint's own format, each
with a ``source`` saying where its update rule comes from (see ``data/README.md``). It is read
once, on first use, from the installed package; nothing else here does I/O.

What a trade's conditions mean for a bar (Polygon knowledge base, "How does Polygon create the
OHLCV aggregate bars?", and the blog post "Understanding Trade Eligibility"):

* each condition carries ``update_rules`` for two kinds of aggregation: ``consolidated`` (all
  venues together, what Polygon's own aggregates use) and ``market_center`` (per venue), taken
  from the CTA and UTP plans' sale-condition matrices;
* ``updates_open_close`` is the matrices' "last" column: a trade that may not set the last price
  may not open or close a bar either;
* a trade can carry several conditions; it updates a field only if every one of its conditions
  allows it (one "no" wins). See :func:`combine_rules`.

Condition ids are unique among trade conditions but not across the whole table: quote
conditions reuse them (41 is "Trade Thru Exempt" on trades and "Cash Only Settlement" on
quotes). Every lookup here is about trades (``data_types`` holding ``"trade"``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from functools import cache, lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from types import MappingProxyType
from typing import Any, NamedTuple

DATA_FILE = "polygon_stock_conditions.json"
KINDS = ("consolidated", "market_center")
"""The two aggregation kinds Polygon publishes rules for."""

FORM_T_EXTENDED_HOURS = 12
"""Polygon id of "Form T/Extended Hours". Its consolidated rule says no high/low/open/close
(the SIP rule for daily statistics), yet Polygon's knowledge base says extended-hours trades do
update its *minute* bars; a builder that wants Polygon-like minute bars outside the regular
session passes it in ``ignore`` to :func:`combine_rules`."""


class UpdateRule(NamedTuple):
    """Which parts of a bar a trade may update."""

    updates_high_low: bool
    updates_open_close: bool
    updates_volume: bool


ALL_UPDATES = UpdateRule(True, True, True)
"""A regular sale: a trade with no conditions updates everything."""

UNKNOWN_CONDITION_RULE = ALL_UPDATES
"""The documented default for a condition id the table does not list: it restricts nothing, so
the trade counts (volume, and prices unless another, known condition forbids them), exactly as a
trade carrying no conditions would. :func:`combine_rules` reports such ids so the caller can
count them (a metric, a log line) and refresh the table; it never raises for them."""


class Combined(NamedTuple):
    """The rule for one trade, and the condition ids the table did not know."""

    rule: UpdateRule
    unknown: tuple[int, ...]


def data_file() -> Traversable:
    """The packaged JSON file (a resource of ``libs.common.market``)."""
    return resources.files(__package__ or "libs.common.market").joinpath("data").joinpath(DATA_FILE)


@cache
def _table() -> tuple[Mapping[str, Any], ...]:
    doc = json.loads(data_file().read_text(encoding="utf-8"))
    results = doc["results"]
    if not isinstance(results, list) or not results:
        raise ValueError(f"{DATA_FILE}: 'results' must be a non-empty list")
    return tuple(MappingProxyType(row) for row in results)


def _is_trade(row: Mapping[str, Any]) -> bool:
    return "trade" in row.get("data_types", ())


@cache
def _trade_rows() -> Mapping[int, Mapping[str, Any]]:
    rows: dict[int, Mapping[str, Any]] = {}
    for row in _table():
        if not _is_trade(row):
            continue
        cid = row["id"]
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise ValueError(f"{DATA_FILE}: trade condition id {cid!r} is not an integer")
        if cid in rows:
            raise ValueError(f"{DATA_FILE}: trade condition id {cid} is listed twice")
        rows[cid] = row
    return MappingProxyType(rows)


def _rule(row: Mapping[str, Any], kind: str) -> UpdateRule:
    try:
        flags = row["update_rules"][kind]
        rule = UpdateRule(
            flags["updates_high_low"], flags["updates_open_close"], flags["updates_volume"]
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"{DATA_FILE}: trade condition {row.get('id')} has no {kind} update rules"
        ) from exc
    if not all(isinstance(flag, bool) for flag in rule):
        raise ValueError(f"{DATA_FILE}: trade condition {row['id']} has non-boolean {kind} rules")
    return rule


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown aggregation kind {kind!r}; expected one of {KINDS}")


def polygon_rules(kind: str = "consolidated") -> Mapping[int, UpdateRule]:
    """Trade condition id -> its update rule for ``kind`` (read-only, built once per kind).

    Covers every condition Polygon lists for trades: sale conditions, "Trade Thru Exempt",
    and the short-sale-restriction and financial-status indicators (neutral; their rule is
    inferred, see the data README).
    """
    _check_kind(kind)
    return _rules_for(kind)


@cache
def _rules_for(kind: str) -> Mapping[int, UpdateRule]:
    return MappingProxyType({cid: _rule(row, kind) for cid, row in _trade_rows().items()})


@cache
def condition_names() -> Mapping[int, str]:
    """Trade condition id -> Polygon's name for it (read-only)."""
    return MappingProxyType({cid: row["name"] for cid, row in _trade_rows().items()})


def combine_rules(
    condition_ids: Iterable[int],
    kind: str = "consolidated",
    *,
    ignore: Collection[int] = frozenset(),
) -> Combined:
    """The update rule of one trade carrying ``condition_ids``, and the ids the table lacks.

    A field is updated only if *all* of the trade's conditions allow it: high/low, open/close
    and volume are each the logical AND over the conditions (no conditions: everything). This
    is how the per-condition booleans of Polygon's table are meant to be read: Polygon's
    "Understanding Trade Eligibility" post notes that several conditions can apply to one trade
    and points to the CTA/UTP matrices, where each "No" forbids the update whatever else the
    trade carries (for example an Intermarket Sweep that is also an Odd Lot does not set the
    high). Polygon's wording of the rule is not quoted here: the stored copy of the post is cut
    off at that sentence, so the AND reading rests on the matrices and on the table's semantics.

    Ids missing from the table get :data:`UNKNOWN_CONDITION_RULE` (they restrict nothing) and
    are returned in ``unknown``, in order, so the caller can count them; this never raises for
    them. Ids in ``ignore`` are skipped entirely (for example :data:`FORM_T_EXTENDED_HOURS` for
    Polygon-like minute bars in extended hours).
    """
    _check_kind(kind)
    ids = condition_ids if isinstance(condition_ids, tuple) else tuple(condition_ids)
    skip = ignore if isinstance(ignore, frozenset) else frozenset(ignore)
    return _combine(ids, kind, skip)


@lru_cache(maxsize=4096)
def _combine(ids: tuple[int, ...], kind: str, ignore: frozenset[int]) -> Combined:
    rules = _rules_for(kind)
    high_low = open_close = volume = True
    unknown: list[int] = []
    for cid in ids:
        if cid in ignore:
            continue
        rule = rules.get(cid)
        if rule is None:
            unknown.append(cid)
            rule = UNKNOWN_CONDITION_RULE
        high_low = high_low and rule.updates_high_low
        open_close = open_close and rule.updates_open_close
        volume = volume and rule.updates_volume
    return Combined(UpdateRule(high_low, open_close, volume), tuple(unknown))
