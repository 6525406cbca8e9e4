"""Every name tickmesh shares with other code and other teams, in one room.

Channel and topic templates (CONTRACT.md's defaults, and the project's additions listed in
``docs/contract.md``), the Redis keys of tickmesh's own state, and the Kafka header names of
a mirrored record's identity. A template holds ``{symbol}`` where the symbol goes; settings
that make a name configurable take these as their defaults. Nothing here does I/O.
"""

from __future__ import annotations

from typing import Final

# -- Redis channels (each mirrored in a stream of the same records) ----------------------------

TICKS: Final = "ticks.{symbol}"
"""Trades of one symbol, one record per feed frame (``TickBatch``)."""
QUOTES: Final = "quotes.{symbol}"
"""NBBO quotes of one symbol (``QuoteBatch``)."""
SECOND_AGGS: Final = "aggs.{symbol}.1s"
"""The vendor's second aggregates (Polygon ``A``)."""
MINUTE_AGGS: Final = "aggs.{symbol}.1m"
"""The vendor's minute aggregates (Polygon ``AM``)."""
BARS: Final = "bars.{symbol}.1m"
"""Closed 1-minute bars and their corrections (``Bar``); also the shadow's Kafka topics."""
SIGNALS: Final = "sentio.signals.minute.v1"
TRADES: Final = "sentio.trades.executed.v1"
POSITIONS: Final = "sentio.positions.state.v1"
PORTFOLIO: Final = "sentio.portfolio.minute.v1"
HEARTBEAT: Final = "sentio.heartbeat.v1"
DEAD_LETTERS: Final = "sentio.deadletter.v1"
ENGINE_GAPS: Final = "sentio.engine.gaps.v1"
"""Engine gap reports of the engine bridge (an addition, ``docs/contract.md``)."""
LEDGER: Final = "sentio.ledger.v1"
"""The source ledger: unique trades per symbol-minute, as ingest published them."""
PROGRESS: Final = "sentio.progress.v1"
"""Progress marks: the feed's time and each tick channel's sequence at that time."""
FEED_GAPS: Final = "sentio.gaps.v1"
"""Feed gaps: when the feed was not read, for which symbols, why, and what filled them."""

TICKS_PATTERN: Final = "ticks.*"
BARS_PATTERN: Final = "bars.*.1m"

# -- Kafka topics that are not a channel's own name --------------------------------------------

PRICES_TOPIC: Final = "sentio.prices.minute.v1"
"""The mirror of every ``bars.<SYM>.1m`` channel (the bars the app shows)."""
TICKS_SINGLE_TOPIC: Final = "sentio.ticks.v1"
"""All ticks in one topic keyed by symbol (``TOPIC_MODE=single``)."""
BARS_SINGLE_TOPIC: Final = "sentio.bars.v1"
"""All the shadow builder's bars in one topic keyed by symbol (``TOPIC_MODE=single``)."""
PARITY_TOPIC: Final = "sentio.parity.reports.v1"

# -- Kafka headers of a mirrored record ----------------------------------------------------------

HEADER_CHANNEL: Final = "tm-channel"
"""The Redis channel a mirrored record came from."""
HEADER_SEQ: Final = "tm-seq"
"""The record's per-channel sequence number (decimal ASCII)."""

# -- Redis keys of tickmesh's own state ----------------------------------------------------------

DEFAULT_KEY_PREFIX: Final = "tm:"
PARITY_DAYS: Final = "parity:days"
"""``Keys.state(PARITY_DAYS)``: the gate's day summaries (``schemas.DaySummary``), field = day."""


def shadow_bars_topic(topic_mode: str) -> str:
    """Where the shadow builder's bars go on Kafka: ``bars.<SYM>.1m`` topics (a template), or
    one topic keyed by symbol with ``TOPIC_MODE=single`` (a close of a thousand symbols is one
    partition's batch, not a thousand partitions')."""
    return BARS_SINGLE_TOPIC if topic_mode == "single" else BARS


def channel(template: str, symbol: str) -> str:
    """``template`` with ``symbol`` in place: ``channel(BARS, "SPY")`` is ``bars.SPY.1m``."""
    return template.replace("{symbol}", symbol)


def template_parts(template: str) -> tuple[str, str]:
    """What comes before and after ``{symbol}``; concatenating them is the hot path's way."""
    prefix, found, suffix = template.partition("{symbol}")
    if not found:
        raise ValueError(f"channel template {template!r} has no {{symbol}}")
    return prefix, suffix


def symbol_of(template: str, name: str) -> str | None:
    """The symbol of a channel or topic made from ``template`` (None when it is not one):
    ``symbol_of(BARS, "bars.BRK.B.1m")`` is ``BRK.B``."""
    prefix, suffix = template_parts(template)
    if len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix):
        return name[len(prefix) : len(name) - len(suffix)]
    return None


def pattern_of(template: str) -> str:
    """The glob matching every channel of ``template``: ``ticks.{symbol}`` -> ``ticks.*``."""
    return template.replace("{symbol}", "*")


def channel_kind(name: str) -> str:
    """A low-cardinality label for a channel: ``ticks``, ``bars``, or the sentio name."""
    if name.startswith("sentio."):
        return name
    return name.split(".", 1)[0]


class Keys:
    """Names of tickmesh's Redis keys under a prefix.

    Keys use a hash tag of the channel, so a channel's sequence and stream live in one
    cluster slot.
    """

    def __init__(self, prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self.prefix = prefix

    def seq(self, channel: str) -> str:
        """The sequence counter of ``channel``."""
        return f"{self.prefix}seq:{{{channel}}}"

    def stream(self, channel: str) -> str:
        """The durable stream of ``channel``."""
        return f"{self.prefix}stream:{{{channel}}}"

    def token(self, channel: str) -> str:
        """The token of the last batch whose publish call began with ``channel`` (a retry of
        the call applies nothing twice)."""
        return f"{self.prefix}token:{{{channel}}}"

    def channel_of_stream(self, key: str | bytes) -> str:
        """The channel a stream key belongs to."""
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self.prefix) + len("stream:{") : -1]

    def state(self, name: str) -> str:
        """A key for a service's own durable state (positions, offsets)."""
        return f"{self.prefix}state:{name}"
