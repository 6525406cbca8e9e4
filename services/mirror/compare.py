"""Comparing two sets of minute bars: the reconciler's core, pure (no I/O, no clock).

Per symbol and minute a bar is *matched* (every compared field within tolerance),
*mismatched* (which fields, both values, the difference), *missing* on one side, or not yet
compared (*pending*: it ended too recently, so it may still be in flight). Kafka bars can
arrive more than once (at-least-once) and in several revisions (corrections): the highest
revision of each minute is compared; every copy is looked at: extra identical copies of a
revision are duplicates, copies of one revision that disagree make the minute a mismatch
(``conflicts``), and a revision that comes after a higher one is flagged
(``revisionsBackwards``). Parity is matched / compared, in percent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Set
from typing import NamedTuple

import msgspec
from msgspec import Struct

from libs.common.market.sessions import bar_id, ts_et
from libs.common.schemas import Bar, VendorAggregate

BAR_FIELDS: tuple[str, ...] = ("open", "high", "low", "close", "volume", "vwap", "trades")
"""The fields of a bar that must agree."""
PRICE_FIELDS: tuple[str, ...] = ("open", "high", "low", "close")
VENDOR_FIELDS: dict[str, str] = {
    "open": "o",
    "high": "h",
    "low": "l",
    "close": "c",
    "volume": "v",
    "vwap": "vw",
}
"""Our bar's field -> the vendor aggregate's (Polygon ``AM``); the vendor has no trade count."""


class Tolerance:
    """Allowed absolute difference per field; exact (0) unless the spec says otherwise.

    Spec: ``exact``; one number for every field (``0.001``); or per field
    ``open=0.01,vwap=0.0001`` where ``price`` stands for open, high, low and close and
    ``default`` for the fields not named.
    """

    def __init__(self, spec: str = "exact") -> None:
        self.spec = spec.strip() or "exact"
        self.limits: dict[str, float] = dict.fromkeys(BAR_FIELDS, 0.0)
        if self.spec == "exact":
            return
        parts = [part.strip() for part in self.spec.split(",") if part.strip()]
        if len(parts) == 1 and "=" not in parts[0]:
            self.limits = dict.fromkeys(BAR_FIELDS, _number(parts[0]))
            return
        named: dict[str, float] = {}
        for part in parts:
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"tolerance {part!r}: want field=value")
            fields = (
                PRICE_FIELDS if name == "price" else BAR_FIELDS if name == "default" else (name,)
            )
            for field in fields:
                if field not in self.limits:
                    raise ValueError(
                        f"tolerance: unknown field {name!r} "
                        f"(fields: {', '.join(BAR_FIELDS)}, price, default)"
                    )
                if name == "default" and field in named:
                    continue
                named[field] = _number(value)
        self.limits.update(named)

    @property
    def exact(self) -> bool:
        """True when every field must be equal."""
        return not any(self.limits.values())

    def allows(self, field: str, left: float, right: float) -> bool:
        """True when ``left`` and ``right`` agree on ``field``."""
        if left == right:
            return True
        limit = self.limits.get(field, 0.0)
        # a hair of slack so that 0.01 allows a difference printed as 0.01
        return limit > 0 and abs(left - right) <= limit * (1 + 1e-9)

    def describe(self) -> str:
        """The tolerance in words, for the report."""
        if self.exact:
            return "exact"
        return ", ".join(f"{field} ±{limit:g}" for field, limit in self.limits.items() if limit)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"tolerance: not a number: {text!r}") from None
    if value < 0 or math.isnan(value):
        raise ValueError(f"tolerance: must be zero or more, not {text!r}")
    return value


class FieldDiff(Struct, frozen=True):
    """One field that differs."""

    field: str
    redis: float
    other: float
    diff: float


class MinuteRef(Struct, frozen=True):
    """One symbol-minute."""

    symbol: str
    startMs: int
    tsET: str
    barId: int


class Mismatch(Struct, frozen=True):
    """A minute both sides have, with the fields that differ."""

    symbol: str
    startMs: int
    tsET: str
    barId: int
    fields: list[FieldDiff]
    redisRevision: int = 0
    otherRevision: int = 0


class Duplicate(Struct, frozen=True):
    """Extra copies of one bar revision on the Kafka side."""

    symbol: str
    startMs: int
    tsET: str
    revision: int
    copies: int


class SymbolParity(Struct):
    """The counts of one symbol on one day."""

    symbol: str
    matched: int = 0
    mismatched: int = 0
    missingKafka: int = 0
    missingRedis: int = 0
    duplicates: int = 0
    corrections: int = 0
    pending: int = 0
    parityPct: float | None = None
    conflicts: int = 0
    """Minutes with copies of one revision that disagree (counted as mismatched)."""
    revisionsBackwards: int = 0
    """Minutes where a lower revision came after a higher one."""
    notReceived: int = 0
    """Vendor check: our bars of minutes whose vendor aggregate never reached us (the feed
    was not read then): unknown, not compared."""

    @property
    def compared(self) -> int:
        """Minutes counted in the parity (matched, mismatched or missing on a side)."""
        return self.matched + self.mismatched + self.missingKafka + self.missingRedis

    def finish(self) -> SymbolParity:
        """Compute ``parityPct`` (None when nothing was compared)."""
        compared = self.compared
        self.parityPct = round(100.0 * self.matched / compared, 4) if compared else None
        return self


class SymbolComparison(Struct):
    """Everything found for one symbol."""

    parity: SymbolParity
    mismatches: list[Mismatch] = msgspec.field(default_factory=list)
    missingKafka: list[MinuteRef] = msgspec.field(default_factory=list)
    missingRedis: list[MinuteRef] = msgspec.field(default_factory=list)
    duplicates: list[Duplicate] = msgspec.field(default_factory=list)


def _ref(symbol: str, start_ms: int) -> MinuteRef:
    return MinuteRef(symbol, start_ms, ts_et(start_ms), bar_id(start_ms))


class Collapsed(NamedTuple):
    """Every copy of a symbol's bars, read in topic order."""

    latest: dict[int, Bar]
    """The highest revision of each minute."""
    duplicated: list[tuple[int, int, int]]
    """(startMs, revision, copies) of revisions with identical extra copies."""
    corrected: int
    """Minutes with more than one revision."""
    conflicting: set[int]
    """Minutes with copies of one revision that disagree."""
    backwards: set[int]
    """Minutes where a lower revision came after a higher one."""


def collapse(bars: Iterable[Bar]) -> Collapsed:
    """Look at every copy; see ``Collapsed``."""
    latest: dict[int, Bar] = {}
    first: dict[tuple[int, int], Bar] = {}
    copies: dict[tuple[int, int], int] = {}
    revisions: dict[int, set[int]] = {}
    conflicting: set[int] = set()
    backwards: set[int] = set()
    for bar in bars:
        identity = (bar.startMs, bar.revision)
        copies[identity] = copies.get(identity, 0) + 1
        seen = first.get(identity)
        if seen is None:
            first[identity] = bar
        elif any(getattr(seen, f) != getattr(bar, f) for f in BAR_FIELDS):
            conflicting.add(bar.startMs)
        revisions.setdefault(bar.startMs, set()).add(bar.revision)
        kept = latest.get(bar.startMs)
        if kept is None or bar.revision > kept.revision:
            latest[bar.startMs] = bar
        elif bar.revision < kept.revision:
            backwards.add(bar.startMs)
    duplicated = [
        (start, revision, count) for (start, revision), count in sorted(copies.items()) if count > 1
    ]
    corrected = sum(1 for seen_revisions in revisions.values() if len(seen_revisions) > 1)
    return Collapsed(latest, duplicated, corrected, conflicting, backwards)


def compare_symbol(
    symbol: str,
    redis_bars: Mapping[int, Bar],
    kafka_bars: Iterable[Bar],
    tolerance: Tolerance,
    *,
    settled_before_ms: int | None = None,
) -> SymbolComparison:
    """Compare one symbol's Redis bars (by startMs) with its Kafka bars (all copies).

    Bars ending after ``settled_before_ms`` on either side are *pending*, not compared.
    """
    kafka_latest, duplicated, corrected, conflicting, backwards = collapse(kafka_bars)
    parity = SymbolParity(
        symbol,
        corrections=corrected,
        conflicts=len(conflicting),
        revisionsBackwards=len(backwards),
    )
    result = SymbolComparison(parity)
    for start, revision, count in duplicated:
        parity.duplicates += count - 1
        result.duplicates.append(Duplicate(symbol, start, ts_et(start), revision, count))
    for start in sorted(set(redis_bars) | set(kafka_latest)):
        ours = redis_bars.get(start)
        theirs = kafka_latest.get(start)
        end = (ours or theirs).endMs  # type: ignore[union-attr]
        if settled_before_ms is not None and end > settled_before_ms:
            parity.pending += 1
            continue
        if theirs is None:
            parity.missingKafka += 1
            result.missingKafka.append(_ref(symbol, start))
            continue
        if ours is None:
            parity.missingRedis += 1
            result.missingRedis.append(_ref(symbol, start))
            continue
        diffs = [
            FieldDiff(field, float(left), float(right), _diff(left, right))
            for field in BAR_FIELDS
            if not tolerance.allows(
                field, left := getattr(ours, field), right := getattr(theirs, field)
            )
        ]
        if start in conflicting:
            diffs.append(FieldDiff("copies", 1.0, 2.0, 1.0))  # copies of a revision disagree
        if diffs:
            parity.mismatched += 1
            result.mismatches.append(
                Mismatch(
                    symbol,
                    start,
                    ts_et(start),
                    bar_id(start),
                    diffs,
                    ours.revision,
                    theirs.revision,
                )
            )
        else:
            parity.matched += 1
    parity.finish()
    return result


def _diff(left: float, right: float) -> float:
    return round(float(right) - float(left), 10)


def compare_vendor(
    symbol: str,
    redis_bars: Mapping[int, Bar],
    vendor: Mapping[int, VendorAggregate],
    tolerance: Tolerance,
    *,
    settled_before_ms: int | None = None,
    not_received: Set[int] = frozenset(),
) -> SymbolComparison:
    """Compare our Redis bars with the vendor's own minute aggregates.

    ``not_received``: minutes whose aggregate the feed would have sent while it was not read
    (feed gaps, even backfilled ones: the REST backfill brings trades, not aggregates); our bar
    of such a minute without a vendor aggregate is counted ``notReceived``, not missing.

    The vendor side reuses the Kafka slots of the result (``missingKafka`` = we have a bar
    the vendor has not, ``missingRedis`` = the vendor has a bar we have not). A vendor VWAP
    of 0 means "not supplied" and is not compared; the vendor has no trade count.
    """
    parity = SymbolParity(symbol)
    result = SymbolComparison(parity)
    for start in sorted(set(redis_bars) | set(vendor)):
        ours = redis_bars.get(start)
        theirs = vendor.get(start)
        if ours is not None:
            end = ours.endMs
        else:
            assert theirs is not None
            end = theirs.e or start + 60_000
        if settled_before_ms is not None and end > settled_before_ms:
            parity.pending += 1
            continue
        if theirs is None and start in not_received:
            parity.notReceived += 1
            continue
        if theirs is None:
            parity.missingKafka += 1
            result.missingKafka.append(_ref(symbol, start))
            continue
        if ours is None:
            parity.missingRedis += 1
            result.missingRedis.append(_ref(symbol, start))
            continue
        diffs = []
        for field, vendor_field in VENDOR_FIELDS.items():
            right = getattr(theirs, vendor_field)
            if field == "vwap" and not right:
                continue
            left = getattr(ours, field)
            if not tolerance.allows(field, left, right):
                diffs.append(FieldDiff(field, float(left), float(right), _diff(left, right)))
        if diffs:
            parity.mismatched += 1
            result.mismatches.append(
                Mismatch(symbol, start, ts_et(start), bar_id(start), diffs, ours.revision, 0)
            )
        else:
            parity.matched += 1
    parity.finish()
    return result
