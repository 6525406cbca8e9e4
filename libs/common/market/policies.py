"""Condition policies: what each trade counts for in a 1-minute bar.

A policy maps a trade's conditions, exchange, suspicious flag and session phase (and the
symbol's primary listing) to a classification code: bits of ``OPEN_CLOSE``, ``HIGH_LOW`` and
``VOLUME``, or one of the auction codes. Policies are pure, so the aggregator caches each
answer (``libs.common.market.aggregator``). The rules and their evidence are in
``docs/bars.md`` and ``docs/conditions.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Protocol

from libs.common.market.listings import Listings

# --- classification codes ---------------------------------------------------------------------

OPEN_CLOSE = 1
HIGH_LOW = 2
VOLUME = 4
EVERYTHING = OPEN_CLOSE | HIGH_LOW | VOLUME
IGNORED = 0
OPENING_AUCTION = 8
"""The primary listing's opening auction print: it is the open of the session's first bar."""
CLOSING_AUCTION = 16
"""The primary listing's closing auction print: it is the close of the session's last bar."""
BY_EXCHANGE = 32
"""Cache marker: this condition tuple's classification depends on the exchange."""


class Classification(NamedTuple):
    """What a trade counts for under a policy."""

    counts_for_open_close: bool
    counts_for_high_low: bool
    counts_for_volume: bool
    auction: Literal["", "open", "close"] = ""


def classification_of(code: int) -> Classification:
    """The readable form of a classification code."""
    if code & OPENING_AUCTION:
        return Classification(True, True, True, "open")
    if code & CLOSING_AUCTION:
        return Classification(True, True, True, "close")
    return Classification(bool(code & OPEN_CLOSE), bool(code & HIGH_LOW), bool(code & VOLUME))


# --- policies ---------------------------------------------------------------------------------


class ConditionPolicy(Protocol):
    """Decides what each trade counts for. Implementations must be pure functions of their
    arguments so that the core may cache the answer."""

    name: str
    fold_unpriced_volume: bool
    needs_listing: bool
    """Whether ``code`` looks at the primary listing (then it is looked up each day)."""
    """True: the volume of a minute without any open/close-eligible trade goes to the previous
    bar of the day (to the next one when there is none); False: no bar, volume dropped."""

    def code(
        self,
        conditions: tuple[int, ...],
        exchange: int,
        suspicious: bool,
        regular_session: bool,
        primary_exchange: int,
    ) -> int:
        """The classification code (bits of ``OPEN_CLOSE``, ``HIGH_LOW``, ``VOLUME``, or one
        of ``OPENING_AUCTION``/``CLOSING_AUCTION``) of one trade."""
        ...

    def depends_on_exchange(self, conditions: tuple[int, ...]) -> bool:
        """Whether ``code`` looks at the exchange (or primary listing) for these conditions."""
        ...

    def primary_exchange(self, symbol: str, tape: int, day: date) -> int:
        """Polygon id of ``symbol``'s primary listing exchange on ``day`` (0 when unknown)."""
        ...

    def warm_listing(self, symbol: str, day: date) -> None:
        """Start finding ``symbol``'s listing for ``day`` (a slow lookup) in the background."""
        ...


class _PolicyBase:
    name = "base"
    fold_unpriced_volume = False
    needs_listing = False

    def __init__(self, *, listings: Listings | None = None) -> None:
        self._listings = listings

    @property
    def listings(self) -> Listings:
        """Where primary listings come from (by default the packaged map files only)."""
        if self._listings is None:
            self._listings = default_listings()
        return self._listings

    if TYPE_CHECKING:
        # Every subclass defines it; declared here only so the checker knows a policy has one.
        def code(
            self,
            conditions: tuple[int, ...],
            exchange: int,
            suspicious: bool,
            regular_session: bool,
            primary_exchange: int,
        ) -> int: ...

    def classify(
        self,
        conditions: tuple[int, ...],
        exchange: int = 0,
        suspicious: bool = False,
        regular_session: bool = True,
        primary_exchange: int = 0,
    ) -> Classification:
        """What a trade with these attributes counts for (readable form of ``code``)."""
        return classification_of(
            self.code(tuple(conditions), exchange, suspicious, regular_session, primary_exchange)
        )

    def depends_on_exchange(self, conditions: tuple[int, ...]) -> bool:
        """Whether the exchange matters for these conditions (not by default)."""
        return False

    def primary_exchange(self, symbol: str, tape: int, day: date) -> int:
        """``symbol``'s listing exchange on ``day`` from the policy's ``Listings``."""
        return self.listings.primary(symbol, day, tape)

    def warm_listing(self, symbol: str, day: date) -> None:
        """Start a slow listing lookup (Polygon's reference) in the background."""
        self.listings.warm(symbol, day)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class NonePolicy(_PolicyBase):
    """Plain OHLCV: every trade counts for everything, whatever its conditions."""

    name = "none"

    def code(
        self,
        conditions: tuple[int, ...],
        exchange: int,
        suspicious: bool,
        regular_session: bool,
        primary_exchange: int,
    ) -> int:
        """Always ``EVERYTHING``."""
        return EVERYTHING


@dataclass(frozen=True)
class AlgoseekRules:
    """The clauses of the ``algoseek`` rule. ``suspicious`` and the condition sets follow the
    vendor's documentation; the four booleans are what the documentation leaves open and the
    data decides (``docs/bars.md`` has the evidence of each, ``docs/conditions.md`` the
    sources). ``documented()`` is the rule with none of them."""

    suspicious: Literal["volume", "nothing"] = "volume"
    """QuantConnect: a suspicious tick is *excluded*, and an excluded tick's "volume is
    aggregated in the bar but its price is not" (``nothing``: Lean's engine, which keeps them
    out of its consolidators altogether)."""
    official_reports_ignored: bool = True
    """Market Center Official Open / Close (16, 15) count for nothing, not even volume: they
    restate an auction already printed. Off: they are ordinary included trades (the
    documentation lists them as included)."""
    opening_print_opens_session: bool = True
    """The primary listing's first opening print opens the session's first bar when it
    prints within that minute; every other opening print counts for nothing. Off: opening
    prints are ordinary included trades."""
    closing_print_closes_session: bool = True
    """The primary listing's first closing print closes the session's last bar (15:59, 12:59
    on an early close) whenever it prints; every other closing print counts for nothing. Off:
    ordinary included trades."""
    fold_unpriced: bool = True
    """A minute whose trades count for volume only has no bar; its volume goes to the
    previous bar of the day (the next when there is none). Off: dropped and counted."""

    DATA_CLAUSES: ClassVar[tuple[str, ...]] = (
        "official_reports_ignored",
        "opening_print_opens_session",
        "closing_print_closes_session",
        "fold_unpriced",
    )
    """The clauses the data decides, in the order a fit adds them."""

    @classmethod
    def documented(cls) -> AlgoseekRules:
        """The rule the documentation states alone: none of the data's clauses."""
        return cls(
            official_reports_ignored=False,
            opening_print_opens_session=False,
            closing_print_closes_session=False,
            fold_unpriced=False,
        )

    def with_clauses(self, **changes: Any) -> AlgoseekRules:
        """A copy with some clauses changed."""
        return replace(self, **changes)

    def describe(self) -> str:
        """The data clauses in force, for reports."""
        on = [name for name in self.DATA_CLAUSES if getattr(self, name)]
        return ", ".join(on) if on else "documented clauses only"


class AlgoseekPolicy(_PolicyBase):
    """The rule of AlgoSeek's minute bars (the vendor of Lean's US-equity data), clause by
    clause from the vendor's documentation, the rest from the data (``AlgoseekRules``;
    ``docs/bars.md``, ``docs/conditions.md``). Works on Polygon condition ids.

    * a suspicious print counts for volume only (the documentation's *excluded* tick);
    * official open/close reports count for nothing;
    * an opening (closing) print counts only if it is the primary listing exchange's: the first
      one of the day opens the session's first bar when it prints within that minute, the first
      closing print closes the session's last bar whenever it prints; the others, and every
      other venue's opening/closing prints (e.g. Nasdaq's cross in a NYSE stock), count for
      nothing;
    * any other trade counts for volume, and for price (open, high, low, close) unless it
      carries an excluding condition (Intermarket Sweep, Trade Thru Exempt, Odd Lot) and none
      of the including ones (Regular, Cash, Next Day, Form T, Extended Hours, and the auction
      and official flags); every other condition (Seller, Average Price, ...) is neutral. Trade
      Thru Exempt alone implies Regular, which Polygon's feed does not send;
    * a minute with volume but no price-eligible trade has no bar of its own: its volume goes
      to the previous bar of the day.
    """

    name = "algoseek"

    INCLUDING = frozenset({0, 12, 13, 7, 20, 15, 16, 8, 19, 25, 17})
    """QuantConnect's *included* TradeConditionFlags: Regular (0), Form T and Extended Hours
    (12; 13 with Sold Out Of Sequence), Cash (7), Next Day (20), Official Close (15), Official
    Open (16), Closing Prints (8; UTP's Market Center Closing Trade 19), Opening Prints (25;
    UTP's Market Center Opening Trade 17)."""
    EXCLUDING = frozenset({14, 41, 37})
    """QuantConnect's *excluded* ones: Intermarket Sweep, Trade Thru Exempt, Odd Lot Trade."""
    OPENING = frozenset({25, 17})
    """Opening Prints (CTA), Market Center Opening Trade (UTP)."""
    CLOSING = frozenset({8, 19})
    """Closing Prints (CTA), Market Center Closing Trade (UTP)."""
    OFFICIAL = frozenset({15, 16})
    """Market Center Official Close / Open: reports of the auction, not trades."""
    IMPLIED_REGULAR = frozenset({41})
    """Polygon's feed leaves the Regular condition out: a trade whose only condition is Trade
    Thru Exempt is a regular sale that is trade-through exempt (AlgoSeek: Regular + TTE)."""

    def __init__(
        self, rules: AlgoseekRules | None = None, *, listings: Listings | None = None
    ) -> None:
        super().__init__(listings=listings)
        self.rules = rules = rules if rules is not None else AlgoseekRules()
        self.fold_unpriced_volume = rules.fold_unpriced
        self.needs_listing = rules.opening_print_opens_session or rules.closing_print_closes_session
        self._suspicious = VOLUME if rules.suspicious == "volume" else IGNORED
        self._official = self.OFFICIAL if rules.official_reports_ignored else frozenset()
        self._opening = self.OPENING if rules.opening_print_opens_session else frozenset()
        self._closing = self.CLOSING if rules.closing_print_closes_session else frozenset()

    def code(
        self,
        conditions: tuple[int, ...],
        exchange: int,
        suspicious: bool,
        regular_session: bool,
        primary_exchange: int,
    ) -> int:
        """See the class docstring."""
        kinds = frozenset(conditions)
        if kinds & self._official:
            return IGNORED
        if suspicious:
            return self._suspicious
        if kinds & self._opening:
            return OPENING_AUCTION if exchange == primary_exchange else IGNORED
        if kinds & self._closing:
            return CLOSING_AUCTION if exchange == primary_exchange else IGNORED
        if kinds & self.INCLUDING or not kinds & self.EXCLUDING or kinds <= self.IMPLIED_REGULAR:
            return EVERYTHING
        return VOLUME

    def depends_on_exchange(self, conditions: tuple[int, ...]) -> bool:
        """Opening and closing prints depend on the exchange being the primary listing."""
        kinds = frozenset(conditions)
        return bool(kinds & (self._opening | self._closing)) and not kinds & self._official

    def __repr__(self) -> str:
        return f"<AlgoseekPolicy {self.rules.describe()}>"


class PolygonPolicy(_PolicyBase):
    """Polygon's consolidated update rules (``conditions_table.polygon_rules``): a trade updates
    a field only if all its conditions allow it; unknown ids restrict nothing. Outside the
    regular session Form T (12) does not restrict prices (Polygon's extended-hours minute bars
    take prices from Form T trades). Suspicious prints count for nothing. A minute without an
    open/close-eligible trade has no bar, as Polygon emits none."""

    name = "polygon"
    fold_unpriced_volume = False

    def __init__(self, kind: str = "consolidated", *, listings: Listings | None = None) -> None:
        super().__init__(listings=listings)
        from libs.common.market.conditions_table import FORM_T_EXTENDED_HOURS, combine_rules

        self._combine = combine_rules
        self._kind = kind
        self._extended_ignore = frozenset({FORM_T_EXTENDED_HOURS})

    def code(
        self,
        conditions: tuple[int, ...],
        exchange: int,
        suspicious: bool,
        regular_session: bool,
        primary_exchange: int,
    ) -> int:
        """AND of the conditions' consolidated rules."""
        if suspicious:
            return IGNORED
        ignore = frozenset() if regular_session else self._extended_ignore
        rule = self._combine(conditions, self._kind, ignore=ignore).rule
        return (
            (OPEN_CLOSE if rule.updates_open_close else 0)
            | (HIGH_LOW if rule.updates_high_low else 0)
            | (VOLUME if rule.updates_volume else 0)
        )


POLICIES: dict[str, Callable[..., _PolicyBase]] = {
    "algoseek": AlgoseekPolicy,
    "polygon": PolygonPolicy,
    "none": NonePolicy,
}

_DEFAULT_LISTINGS: Listings | None = None


def default_listings() -> Listings:
    """The listings of a policy given none: the packaged map files (shared, built once)."""
    global _DEFAULT_LISTINGS
    if _DEFAULT_LISTINGS is None:
        _DEFAULT_LISTINGS = Listings()
    return _DEFAULT_LISTINGS


def get_policy(name: str, *, listings: Listings | None = None) -> _PolicyBase:
    """A policy by name: ``algoseek``, ``polygon`` or ``none``; ``listings`` is where it finds
    symbols' primary listings (``libs.common.market.listings``)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown bar policy {name!r}; expected one of {sorted(POLICIES)}"
        ) from None
    return factory(listings=listings)


__all__ = [
    "POLICIES",
    "AlgoseekPolicy",
    "AlgoseekRules",
    "Classification",
    "ConditionPolicy",
    "NonePolicy",
    "PolygonPolicy",
    "classification_of",
    "default_listings",
    "get_policy",
]
