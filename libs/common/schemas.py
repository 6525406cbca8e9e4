"""Wire types of CONTRACT.md: one frozen msgspec Struct per payload, codecs built once.

Every record published on a Redis channel starts with ``seq`` (the per-channel sequence
number); the publisher fills it in atomically in Redis (see ``redis_io``), so records are
encoded with ``seq=0`` and the publisher splices the real number into the first field.
Field names are camelCase on the wire; Polygon's own one-letter names are kept for ticks
so that a tick reads like the feed it came from. Evolve additively only: new fields get
defaults, no field changes type, unknown fields are ignored on decode.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

SEQ_PREFIX = b'{"seq":'
"""Every sequenced record's JSON starts with this, then the number."""

MAX_EPOCH_MS = 4_102_444_800_000
"""2100-01-01 UTC: the latest event time a record may carry."""
EpochMs = Annotated[int, Meta(ge=0, le=MAX_EPOCH_MS)]
"""An event time in epoch ms, 1970 to 2100: a record outside fails to decode (a dead letter)
instead of reaching the calendar arithmetic of a consumer, which cannot represent it."""


class Trade(Struct, frozen=True, omit_defaults=True, gc=False):
    """One trade print, with Polygon's field names (``T`` event without ``ev``).

    Like ``Quote`` and ``VendorAggregate``, it holds only numbers, strings and a tuple of
    ints, so it can never be part of a reference cycle: ``gc=False`` keeps the hundreds of
    thousands a service holds out of the cyclic collector's scans.

    ``c`` holds Polygon trade-condition ids. ``suspicious`` marks a print the data vendor
    judged suspicious (only known for vendor tick files). When tickmesh saw it is the
    record's ``tsInit`` (``TickBatch``), one per feed frame.
    """

    sym: str
    p: float
    s: int
    t: EpochMs
    x: int = 0
    c: tuple[int, ...] = ()
    i: str = ""
    z: int = 0
    q: int = 0
    suspicious: bool = False
    trfi: int | None = None
    """The trade reporting facility of an off-exchange print (Polygon's ``trfi``)."""
    trft: int | None = None

    def identity(self) -> str:
        """The vendor's identity of this trade within its symbol and day: Polygon's ``i`` is
        unique per ticker, exchange and TRF, so those qualify it (``x:trfi:i``)."""
        return f"{self.x}:{self.trfi or ''}:{self.i}"


class Quote(Struct, frozen=True, omit_defaults=True, gc=False):
    """One NBBO quote, with Polygon's field names (``Q`` event without ``ev``)."""

    sym: str
    bx: int = 0
    bp: float = 0.0
    bs: int = 0
    ax: int = 0
    ap: float = 0.0
    as_: int = msgspec.field(default=0, name="as")
    c: int = 0
    i: tuple[int, ...] = ()
    t: EpochMs = 0
    q: int = 0
    z: int = 0


class VendorAggregate(Struct, frozen=True, omit_defaults=True, gc=False):
    """The vendor's own second or minute aggregate (Polygon ``A`` / ``AM``)."""

    sym: str
    v: int = 0
    av: int = 0
    op: float = 0.0
    vw: float = 0.0
    o: float = 0.0
    c: float = 0.0
    h: float = 0.0
    l: float = 0.0  # noqa: E741 - Polygon's field name
    a: float = 0.0
    z: int = 0
    s: EpochMs = 0
    e: EpochMs = 0
    otc: bool = False


class TickBatch(Struct, frozen=True):
    """Record on ``ticks.<SYM>``: the trades of one symbol from one feed frame."""

    seq: int
    sym: str
    ticks: list[Trade]
    tsInit: int = 0


class QuoteBatch(Struct, frozen=True):
    """Record on ``quotes.<SYM>``: the quotes of one symbol from one feed frame."""

    seq: int
    sym: str
    quotes: list[Quote]
    tsInit: int = 0


class AggregateBatch(Struct, frozen=True):
    """Record on ``aggs.<SYM>.1s`` / ``aggs.<SYM>.1m``: vendor aggregates of one frame."""

    seq: int
    sym: str
    aggs: list[VendorAggregate]
    tsInit: int = 0


class Bar(Struct, frozen=True):
    """Record on ``bars.<SYM>.1m`` and ``sentio.prices.minute.v1``: one 1-minute bar.

    ``revision`` is 0 for the first publication and grows with each correction.
    """

    seq: int
    symbol: str
    tsET: str
    barId: int
    open: float
    high: float
    low: float
    close: float
    volume: int
    vwap: float
    trades: int
    startMs: EpochMs
    endMs: EpochMs
    revision: int = 0


class Signal(Struct, frozen=True):
    """Record on ``sentio.signals.minute.v1``."""

    seq: int
    symbol: str
    tsET: str
    barId: int
    signal: Literal["BULLISH", "BEARISH", "NEUTRAL"]
    confidence: float
    strategy: str


class ExecutedTrade(Struct, frozen=True):
    """Record on ``sentio.trades.executed.v1``."""

    seq: int
    symbol: str
    tsET: str
    barId: int
    action: Literal["BUY", "SELL"]
    shares: int
    price: float
    stopPrice: float | None
    targetPrice: float | None
    reason: str
    tradeId: str
    realizedPnl: float = 0.0
    commission: float = 0.0


class Position(Struct, frozen=True):
    """Record on ``sentio.positions.state.v1``; the contract's example decodes unchanged."""

    seq: int = 0
    symbol: str = ""
    tsET: str = ""
    barId: int = 0
    barsHeld: int = 0
    shares: int = 0
    entryPrice: float = 0.0
    lastPrice: float | None = None
    unrealizedPnl: float = 0.0
    stopPrice: float | None = None
    targetPrice: float | None = None


class Portfolio(Struct, frozen=True):
    """Record on ``sentio.portfolio.minute.v1``."""

    seq: int
    portfolioId: str
    tsET: str
    barId: int
    equity: float
    cash: float
    realizedPnl: float
    unrealizedPnl: float
    exposure: float
    openPositions: int


class Heartbeat(Struct, frozen=True):
    """Record on ``sentio.heartbeat.v1``, sent by every service."""

    seq: int
    runId: str
    service: str
    tsET: str
    mode: Literal["live", "sim", "replay"]
    status: str
    lagMs: int
    tsMs: int = 0


class DeadLetter(Struct, frozen=True):
    """Record on the dead-letter stream / ``sentio.deadletter.v1``; ``raw`` is base64."""

    seq: int
    source: str
    error: str
    raw: bytes
    tsMs: int
    service: str = ""


class ParityReport(Struct, frozen=True):
    """Record on ``sentio.parity.reports.v1``: one day's shadow-mode parity summary."""

    seq: int
    day: str
    parityPct: float
    matched: int
    mismatched: int
    missingRedis: int
    missingKafka: int
    duplicates: int
    promotionReady: bool
    report: dict[str, Any] = {}


class LedgerEntry(Struct, frozen=True, array_like=True):
    """What the feed gave ingest for one symbol-minute since the previous ledger record:
    ``[sym, minuteMs, trades, volume, firstQ, lastQ]`` (the vendor's sequence range, 0 when
    the feed has none)."""

    sym: str
    minuteMs: EpochMs
    trades: int
    volume: int
    firstQ: int = 0
    lastQ: int = 0


class Ledger(Struct, frozen=True):
    """Record on ``sentio.ledger.v1``: the unique trades ingest published with the same
    round trip, counted per symbol-minute (deltas: a consumer sums them)."""

    seq: int
    source: str
    entries: list[LedgerEntry]
    duplicates: int = 0
    """Trades of that round trip dropped as already published (same identity)."""
    tsMs: int = 0


class Progress(Struct, frozen=True):
    """Record on ``sentio.progress.v1``: how far the feed has been published.

    Everything the feed gave ingest up to ``feedTimeMs`` (event time) is on Redis: on each
    tick channel up to ``ticks[channel]`` (its sequence number). ``idle`` says the feed has
    sent nothing for a while (the end of a replayed day): what is up to ``feedTimeMs`` is all
    there is. ``live`` says ``feedTimeMs`` follows the wall clock of a connected live feed.
    """

    seq: int
    source: str
    feedTimeMs: EpochMs
    ticks: dict[str, int]
    idle: bool = False
    live: bool = False
    connected: bool = True
    tsMs: int = 0


class FeedGap(Struct, frozen=True):
    """Record on ``sentio.gaps.v1``: a time the feed was not read (or may have lost trades).

    Published when the gap opens (``endMs`` 0) and again when it closes. ``startMs`` and
    ``endMs`` are event times: the feed's time when reading stopped and when it resumed.
    ``status``: ``open``, ``closed`` (nothing filled it), ``backfilled`` or ``unfilled``.
    """

    seq: int
    gapId: str
    source: str
    cause: str
    symbols: list[str]
    startMs: int
    endMs: int = 0
    status: str = "open"
    openedAtMs: int = 0
    closedAtMs: int = 0
    backfilled: int = 0
    detail: str = ""


class DaySummary(Struct, frozen=True):
    """What the promotion gate keeps of a day's parity report, in the Redis hash
    ``state:parity:days`` (field = day; ``names.PARITY_DAYS``). The reconciler writes it; the
    gate and the dashboard read it. ``gate*`` is the gate's verdict at that day's report."""

    day: str
    parityPct: float | None
    compared: int
    matched: int
    generatedAtMs: int
    kafkaBars: int = 0
    redisBars: int = 0
    completenessPct: float | None = None
    """The lowest of the day's completeness percentages (ticks, Redis bars, Kafka bars)
    against the source; None when the report did not judge completeness."""
    incompleteMinutes: int = 0
    gateReady: bool | None = None
    """Whether Kafka may become the source of truth at this day (None: not evaluated)."""
    gatePassing: int = 0
    """Consecutive passing trading days ending at this day."""
    gateDays: int = 0
    """Passing days the gate needs."""
    gateTargetPct: float = 0.0
    gateReasons: list[str] = []


StructT = TypeVar("StructT", bound=Struct)

RECORD_TYPES: tuple[type[Struct], ...] = (
    TickBatch,
    QuoteBatch,
    AggregateBatch,
    Bar,
    Signal,
    ExecutedTrade,
    Position,
    Portfolio,
    Heartbeat,
    DeadLetter,
    ParityReport,
    Ledger,
    Progress,
    FeedGap,
)

ENCODER = msgspec.json.Encoder()
"""The one JSON encoder; msgspec encoders are type-agnostic and thread-safe."""

DECODERS: dict[type[Struct], msgspec.json.Decoder[Any]] = {
    record_type: msgspec.json.Decoder(record_type) for record_type in RECORD_TYPES
}
TICK_BATCH_DECODER: msgspec.json.Decoder[TickBatch] = DECODERS[TickBatch]
BAR_DECODER: msgspec.json.Decoder[Bar] = DECODERS[Bar]


def encode(record: Struct) -> bytes:
    """Encode a record to JSON bytes."""
    return ENCODER.encode(record)


def decode(data: bytes | str, record_type: type[StructT]) -> StructT:
    """Decode JSON bytes into ``record_type`` with its prebuilt decoder."""
    return DECODERS[record_type].decode(data)


def seq_of(payload: bytes) -> int:
    """Read the sequence number of a sequenced record without decoding the rest."""
    if not payload.startswith(SEQ_PREFIX):
        raise ValueError("record does not start with a seq field")
    end = payload.index(b",", len(SEQ_PREFIX))
    return int(payload[len(SEQ_PREFIX) : end])
