"""Polygon stocks WebSocket protocol: wire events, a tolerant fast frame decoder, encoders.

Every frame is a JSON array of events tagged by ``ev``: ``T`` trades, ``Q`` quotes, ``A``
second aggregates, ``AM`` minute aggregates and ``status`` messages
(``/work/shared/reference/polygon-websocket-spec.json`` has the exact fields).

The event Structs *subclass* the record types of ``libs.common.schemas`` (a ``TradeEvent`` is a
``Trade``, a ``QuoteEvent`` a ``Quote``, the aggregate events ``VendorAggregate``), so a decoded
event needs no conversion before it goes into a ``TickBatch``. Measured on frames of 100
trades over 10 symbols, decode + group + encode runs at ~1.2 M ticks/s this way against
~1.0 M ticks/s when each event is copied into a plain ``Trade`` first. The price of that choice:
an encoded tick record carries the event tag ``"ev":"T"`` (ignored when decoding ``Trade``,
so it is additive); ``build_records(..., strip_event_tag=True)`` produces plain ``Trade``
objects instead for a consumer that wants the tag gone.

Decoding is tolerant: ``decode_frame`` first decodes the whole frame in one call (the fast
path); when that fails it splits the array into raw elements and decodes each on its own, so
good events survive and each bad one comes back as a ``BadEvent`` with its raw bytes and the
error, for the dead-letter stream. Nothing here raises on bad input.

Extension: a trade may carry ``"suspicious": true`` (tickmesh's simulator sends it for prints
the data vendor flagged); real Polygon never sends it and the official client ignores it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple, TypeAlias

import msgspec
from msgspec import Struct

from libs.common import names
from libs.common.schemas import (
    AggregateBatch,
    Quote,
    QuoteBatch,
    TickBatch,
    Trade,
    VendorAggregate,
)

# Kinds: the ``ev`` tag values of the stock channels, also the topic prefixes.
TRADES: Final = "T"
QUOTES: Final = "Q"
SECOND_AGGS: Final = "A"
MINUTE_AGGS: Final = "AM"
STATUS: Final = "status"
DATA_KINDS: Final[tuple[str, ...]] = (TRADES, QUOTES, SECOND_AGGS, MINUTE_AGGS)

# Status values (the ``status`` field of a ``status`` event).
CONNECTED: Final = "connected"
AUTH_SUCCESS: Final = "auth_success"
AUTH_FAILED: Final = "auth_failed"
AUTH_TIMEOUT: Final = "auth_timeout"
AUTH_REQUIRED: Final = "auth_required"
SUCCESS: Final = "success"
ERROR: Final = "error"
MAX_CONNECTIONS: Final = "max_connections"
FORCE_DISCONNECT: Final = "force_disconnect"
SLOW_CONSUMER: Final = "slow_consumer"
DISCONNECT_STATUSES: Final = frozenset({MAX_CONNECTIONS, FORCE_DISCONNECT, SLOW_CONSUMER})


class TradeEvent(Trade, tag_field="ev", tag=TRADES, frozen=True, gc=False):
    """Polygon ``T``: one trade. ``t`` is SIP time in epoch ms; ``i`` the trade id (a string).

    Every field is ``Trade``'s (``sym p s t x c i z q suspicious trfi trft``).
    """


class QuoteEvent(Quote, tag_field="ev", tag=QUOTES, frozen=True, gc=False):
    """Polygon ``Q``: one NBBO quote (``as`` is ``as_`` in Python)."""


class SecondAggEvent(VendorAggregate, tag_field="ev", tag=SECOND_AGGS, frozen=True, gc=False):
    """Polygon ``A``: the vendor's aggregate of one second, [s, e)."""


class MinuteAggEvent(VendorAggregate, tag_field="ev", tag=MINUTE_AGGS, frozen=True, gc=False):
    """Polygon ``AM``: the vendor's aggregate of one minute; sent only for minutes with trades."""


class StatusEvent(Struct, tag_field="ev", tag=STATUS, frozen=True, gc=False):
    """A ``status`` event: connection, auth and subscription results, disconnect reasons."""

    status: str
    message: str = ""


Event: TypeAlias = TradeEvent | QuoteEvent | SecondAggEvent | MinuteAggEvent | StatusEvent
"""One decoded wire event."""

EVENT_TYPES: Final[tuple[type[Struct], ...]] = (
    TradeEvent,
    QuoteEvent,
    SecondAggEvent,
    MinuteAggEvent,
    StatusEvent,
)
KIND_OF: Final[dict[type[Struct], str]] = {
    TradeEvent: TRADES,
    QuoteEvent: QUOTES,
    SecondAggEvent: SECOND_AGGS,
    MinuteAggEvent: MINUTE_AGGS,
    StatusEvent: STATUS,
}
"""``ev`` tag of each event type."""


class BadEvent(NamedTuple):
    """An input the decoder rejected: the raw bytes (a whole frame or one element) and why."""

    raw: bytes
    error: str


class ClientAction(Struct, frozen=True):
    """A client-to-server message: ``{"action": "auth" | "subscribe" | "unsubscribe", ...}``.

    ``params`` is the API key for ``auth``, so the repr never shows it.
    """

    action: str
    params: str = ""

    def __repr__(self) -> str:
        shown = "'***'" if self.action == "auth" else repr(self.params)
        return f"ClientAction(action={self.action!r}, params={shown})"

    __str__ = __repr__


# Codecs are built once (msgspec perf tips): a decoder per shape, one encoder.
_FRAME_DECODER: Final = msgspec.json.Decoder(list[Event])
_RAW_FRAME_DECODER: Final = msgspec.json.Decoder(list[msgspec.Raw])
_EVENT_DECODER: Final = msgspec.json.Decoder(Event)
_ACTION_DECODER: Final = msgspec.json.Decoder(ClientAction)
_ENCODER: Final = msgspec.json.Encoder()


def decode_frame(frame: bytes | str) -> tuple[list[Event], list[BadEvent]]:
    """Decode one frame into typed events; never raises on bad input.

    Returns ``(events, bad)``. A frame that is not a JSON array (or not JSON) yields no events
    and one ``BadEvent`` holding the whole frame; in an array, each element that is not a known,
    well-typed event yields a ``BadEvent`` with that element's bytes, and the rest survive in
    their original order.
    """
    try:
        return _FRAME_DECODER.decode(frame), []
    except msgspec.DecodeError:
        pass
    try:
        elements = _RAW_FRAME_DECODER.decode(frame)
    except msgspec.DecodeError as exc:
        raw = frame.encode("utf-8", "surrogateescape") if isinstance(frame, str) else bytes(frame)
        return [], [BadEvent(raw, f"frame: {exc}")]
    events: list[Event] = []
    bad: list[BadEvent] = []
    for element in elements:
        try:
            events.append(_EVENT_DECODER.decode(element))
        except msgspec.DecodeError as exc:
            bad.append(BadEvent(bytes(element), str(exc)))
    return events, bad


FrameSplit: TypeAlias = dict[str, dict[str, list[Event]]]
"""``{kind: {symbol: [events in frame order]}}``; statuses are keyed by their status value."""


def split_frame(events: Iterable[Event]) -> FrameSplit:
    """Group the events of one frame by kind (``T``, ``Q``, ``A``, ``AM``, ``status``) and symbol.

    Status events go under ``"status"``, keyed by their ``status`` value (``"connected"``, ...).
    Order within a group is frame order. Kinds and symbols absent from the frame are absent.
    """
    split: FrameSplit = {}
    last_type: type | None = None
    by_symbol: dict[str, list[Event]] = {}
    for event in events:
        if type(event) is not last_type:
            # Frames are usually one kind: look the group up only when the type changes.
            last_type = type(event)
            kind = KIND_OF[last_type]
            found = split.get(kind)
            if found is None:
                found = split[kind] = {}
            by_symbol = found
            if last_type is StatusEvent:
                by_symbol.setdefault(event.status, []).append(event)  # type: ignore[union-attr]
                last_type = None
                continue
        sym = event.sym  # type: ignore[union-attr]
        if sym in by_symbol:
            by_symbol[sym].append(event)
        else:
            by_symbol[sym] = [event]
    return split


def merge_split(into: FrameSplit, split: FrameSplit) -> None:
    """Append a later frame's groups to ``into`` (kind by kind, symbol by symbol, in order):
    the records of several frames as one per (kind, symbol)."""
    for kind, by_symbol in split.items():
        target = into.get(kind)
        if target is None:
            into[kind] = by_symbol
            continue
        for sym, group in by_symbol.items():
            found = target.get(sym)
            if found is None:
                target[sym] = group
            else:
                found.extend(group)


class ChannelNames(Struct, frozen=True):
    """Redis channel templates of the records ingest publishes (``libs.common.names``).

    Each template holds ``{symbol}`` exactly once.
    """

    trades: str = names.TICKS
    quotes: str = names.QUOTES
    second_aggs: str = names.SECOND_AGGS
    minute_aggs: str = names.MINUTE_AGGS

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            template = getattr(self, name)
            if template.count("{symbol}") != 1:
                raise ValueError(f"channel template {name}={template!r} needs one {{symbol}}")


# Concatenating the parts is several times cheaper than str.format, once per record.
_template_parts = names.template_parts


DEFAULT_CHANNELS: Final = ChannelNames()


def _plain_trade(event: Trade) -> Trade:
    return Trade(
        event.sym,
        event.p,
        event.s,
        event.t,
        event.x,
        event.c,
        event.i,
        event.z,
        event.q,
        event.suspicious,
    )


def build_records(
    split: FrameSplit,
    ts_init_ms: int,
    channels: ChannelNames = DEFAULT_CHANNELS,
    strip_event_tag: bool = False,
) -> list[tuple[str, bytes]]:
    """The records ingest publishes for one frame: ``[(channel, JSON payload), ...]``.

    One record per (kind, symbol): a ``TickBatch`` on ``ticks.<SYM>``, a ``QuoteBatch`` on
    ``quotes.<SYM>``, an ``AggregateBatch`` on ``aggs.<SYM>.1s`` / ``.1m``, each with
    ``seq=0`` (the publisher splices in the real number) and ``tsInit=ts_init_ms``. Status
    events are not records. With ``strip_event_tag`` the ticks are copied into plain ``Trade``
    objects so their JSON has no ``"ev"`` key (about 15 % slower).
    """
    records: list[tuple[str, bytes]] = []
    append = records.append
    encode = _ENCODER.encode
    trades = split.get(TRADES)
    if trades:
        prefix, suffix = _template_parts(channels.trades)
        if strip_event_tag:
            for sym, group in trades.items():
                ticks = [_plain_trade(event) for event in group]  # type: ignore[arg-type]
                append((prefix + sym + suffix, encode(TickBatch(0, sym, ticks, ts_init_ms))))
        else:
            for sym, group in trades.items():
                batch = TickBatch(0, sym, group, ts_init_ms)  # type: ignore[arg-type]
                append((prefix + sym + suffix, encode(batch)))
    quotes = split.get(QUOTES)
    if quotes:
        prefix, suffix = _template_parts(channels.quotes)
        for sym, group in quotes.items():
            quote_batch = QuoteBatch(0, sym, group, ts_init_ms)  # type: ignore[arg-type]
            append((prefix + sym + suffix, encode(quote_batch)))
    for kind, template in (
        (SECOND_AGGS, channels.second_aggs),
        (MINUTE_AGGS, channels.minute_aggs),
    ):
        aggs = split.get(kind)
        if aggs:
            prefix, suffix = _template_parts(template)
            for sym, group in aggs.items():
                agg_batch = AggregateBatch(0, sym, group, ts_init_ms)  # type: ignore[arg-type]
                append((prefix + sym + suffix, encode(agg_batch)))
    return records


def records_of_frame(
    frame: bytes | str,
    ts_init_ms: int,
    channels: ChannelNames = DEFAULT_CHANNELS,
    strip_event_tag: bool = False,
) -> tuple[list[tuple[str, bytes]], list[BadEvent]]:
    """Frame in, records out: ``decode_frame`` → ``split_frame`` → ``build_records``.

    Returns the records to publish and the rejected inputs (for the dead letter). This is the
    whole per-frame CPU cost of ingest before Redis, the path ``bench/`` measures.
    """
    events, bad = decode_frame(frame)
    return build_records(split_frame(events), ts_init_ms, channels, strip_event_tag), bad


# ---- client → server ----------------------------------------------------------------------


def _params(topics: str | Iterable[str]) -> str:
    if isinstance(topics, str):
        return topics
    return ",".join(topics)


def encode_auth(api_key: str) -> bytes:
    """``{"action":"auth","params":"<key>"}``. The result holds the key: send it, never log it."""
    return _ENCODER.encode(ClientAction("auth", api_key))


def encode_subscribe(topics: str | Iterable[str]) -> bytes:
    """``{"action":"subscribe","params":"T.AAPL,Q.AAPL,AM.*"}`` from a list or a comma string."""
    return _ENCODER.encode(ClientAction("subscribe", _params(topics)))


def encode_unsubscribe(topics: str | Iterable[str]) -> bytes:
    """``{"action":"unsubscribe","params":...}`` from a list or a comma string."""
    return _ENCODER.encode(ClientAction("unsubscribe", _params(topics)))


def decode_action(message: bytes | str) -> ClientAction:
    """Decode a client message; raises ``msgspec.DecodeError`` when it is not an action."""
    return _ACTION_DECODER.decode(message)


def parse_topics(params: str) -> list[str]:
    """Split a ``params`` string into topics: comma separated, blanks stripped, empties dropped."""
    return [topic for topic in (part.strip() for part in params.split(",")) if topic]


def split_topic(topic: str) -> tuple[str, str]:
    """``"T.AAPL"`` → ``("T", "AAPL")``; ``"AM.*"`` → ``("AM", "*")``. Raises ``ValueError``."""
    kind, dot, sym = topic.partition(".")
    if not dot or not kind or not sym:
        raise ValueError(f"not a topic (want EV.SYMBOL): {topic!r}")
    return kind, sym


# ---- server → client ----------------------------------------------------------------------


def encode_status(status: str, message: str) -> bytes:
    """A one-event frame: ``[{"ev":"status","status":...,"message":...}]``."""
    return _ENCODER.encode([StatusEvent(status, message)])


def encode_statuses(statuses: Iterable[tuple[str, str]]) -> bytes:
    """A frame of several status events, e.g. one per subscribed topic."""
    return _ENCODER.encode([StatusEvent(status, message) for status, message in statuses])


def encode_events(events: Sequence[Event]) -> bytes:
    """A frame (JSON array) of events, each tagged with its ``ev``."""
    return _ENCODER.encode(events)


def as_trade_event(trade: Trade) -> TradeEvent:
    """The ``T`` wire event of a ``Trade`` record (``suspicious`` is sent only when true)."""
    if type(trade) is TradeEvent:
        return trade
    return TradeEvent(
        trade.sym,
        trade.p,
        trade.s,
        trade.t,
        trade.x,
        trade.c,
        trade.i,
        trade.z,
        trade.q,
        trade.suspicious,
    )
