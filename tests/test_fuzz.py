"""Fuzzing the decoders that read bytes from outside (hypothesis): Polygon frames, tick files,
every Redis/Kafka record type, the Kafka headers and the mirror's routing check. Each input
either decodes or comes back as a rejected input (what the services send to the dead
letters); no other exception escapes, so no input can crash a service.

The default suite runs a short, derandomized pass of each (``TICKMESH_FUZZ_SHORT``, 300
examples); the slow suite a long one (``TICKMESH_FUZZ_EXAMPLES``, 20,000 per target). Runs
and findings are in docs/deploy.md ("Fuzzing").
"""

from __future__ import annotations

import os
from datetime import date
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common import names
from libs.common.io.kafka_io import SequenceDeduper, record_identity
from libs.common.market.aggregator import BarAggregator
from libs.common.market.tickfiles import lean_trades_from_text, polygon_trades_from_lines
from libs.common.schemas import DECODERS, ENCODER, RECORD_TYPES, TickBatch, Trade, seq_of
from services.ingest import protocol
from services.ingest.ledger import SourceBook
from services.mirror.config import DEFAULT_ROUTES, MirrorSettings
from services.mirror.routing import BadRecord, RoutingTable

FUZZ_EXAMPLES = int(os.environ.get("TICKMESH_FUZZ_SHORT", "300"))
"""Examples per target in the default suite."""
LONG_EXAMPLES = int(os.environ.get("TICKMESH_FUZZ_EXAMPLES", "20000"))
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


def fuzz(examples: int) -> Any:
    """The short pass is derandomized (the default suite, and CI, see the same inputs every
    run); the long one explores anew each time."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=examples == FUZZ_EXAMPLES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def aggregate(symbol: str, trades: list[Trade]) -> None:
    """The bar core as the bar builder drives it: the batch's symbol, then a flush."""
    aggregator = BarAggregator(symbol, "algoseek", grace_ms=0)
    aggregator.add(trades, 1_381_152_700_000, symbol=symbol)
    aggregator.flush()


# -- strategies -------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)

VALID_TRADE = {
    "ev": "T",
    "sym": "SPY",
    "p": 168.05,
    "s": 100,
    "t": 1_381_152_600_000,
    "x": 4,
    "c": [14, 37],
    "i": "7",
    "z": 1,
    "q": 7,
}
VALID_EVENTS = [
    VALID_TRADE,
    {"ev": "Q", "sym": "SPY", "bx": 4, "bp": 168.0, "bs": 3, "ax": 7, "ap": 168.1, "as": 2,
     "t": 1_381_152_600_000, "c": 1, "z": 1, "q": 9},
    {"ev": "AM", "sym": "SPY", "v": 100, "av": 2000, "op": 168.0, "vw": 168.02, "o": 168.0,
     "c": 168.1, "h": 168.2, "l": 167.9, "a": 168.0, "z": 100, "s": 1_381_152_600_000,
     "e": 1_381_152_660_000},
    {"ev": "status", "status": "success", "message": "subscribed to: T.SPY"},
]  # fmt: skip


@st.composite
def mutated_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event with some fields replaced by arbitrary JSON, removed, or added."""
    event = dict(draw(st.sampled_from(VALID_EVENTS)))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        key = draw(st.sampled_from(sorted(event)) if event else st.just("ev"))
        if action == "replace":
            event[key] = draw(json_values)
        elif action == "drop":
            event.pop(key, None)
        else:
            event[draw(st.text(max_size=6))] = draw(json_values)
    return event


frames = st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda value: msgspec.json.encode(value)),
    st.lists(mutated_events(), max_size=6).map(lambda events: msgspec.json.encode(events)),
    st.lists(st.one_of(mutated_events(), json_values), max_size=6).map(
        lambda items: msgspec.json.encode(items)
    ),
)


# -- Polygon frames ---------------------------------------------------------------------------


def check_frame(frame: bytes) -> None:
    """The ingest path of one frame: decode (bad events kept apart for the dead letters),
    drop duplicates and note the ledger, group, build the records."""
    events, bad = protocol.decode_frame(frame)
    for item in bad:
        assert isinstance(item.raw, bytes) and item.error
    split = protocol.split_frame(events)
    split.pop(protocol.STATUS, None)
    book = SourceBook()
    for sym, group in split.get(protocol.TRADES, {}).items():
        book.admit(sym, group)  # type: ignore[arg-type]
    book.ledger(1_381_152_700_000)
    records = protocol.build_records(split, 1_381_152_600_000)
    for channel, payload in records:
        assert channel
        seq_of(payload)


@given(frames)
@fuzz(FUZZ_EXAMPLES)
def test_polygon_frames_decode_or_become_bad_events(frame: bytes) -> None:
    check_frame(frame)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@given(frames)
@fuzz(LONG_EXAMPLES)
def test_polygon_frames_decode_or_become_bad_events_long(frame: bytes) -> None:
    check_frame(frame)


# -- records on Redis and Kafka ---------------------------------------------------------------


def valid_payloads() -> list[bytes]:
    trade = Trade("SPY", 168.05, 100, 1_381_152_600_000, 4, (14,), "7", 1, 7)
    return [ENCODER.encode(TickBatch(3, "SPY", [trade], 1_381_152_600_001))]


@st.composite
def records(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, arbitrary JSON, or a real record with fields changed."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return msgspec.json.encode(draw(json_values))
    base = msgspec.json.decode(draw(st.sampled_from(valid_payloads())))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(base)))
        base[key] = draw(json_values)
    return msgspec.json.encode(base)


def check_record(payload: bytes) -> None:
    """Every record type's decoder, the sequence reader, the mirror's check of every route
    and the bar core behind the tick decoder: decoded, or rejected the way callers catch."""
    for record_type in RECORD_TYPES:
        try:
            DECODERS[record_type].decode(payload)
        except DECODE_ERRORS:
            pass
    try:
        seq_of(payload)
    except ValueError:
        pass
    for target in ROUTES:
        try:
            target.prepare(payload)
        except BadRecord:
            pass
    try:
        batch = DECODERS[TickBatch].decode(payload)
    except DECODE_ERRORS:
        return
    aggregate(batch.sym, batch.ticks)


ROUTES = [
    RoutingTable(MirrorSettings()).target(channel)
    for channel in ("ticks.SPY", "bars.SPY.1m", *[r.pattern for r in DEFAULT_ROUTES[2:]])
]


@given(records())
@fuzz(FUZZ_EXAMPLES)
def test_every_record_type_decodes_or_is_rejected(payload: bytes) -> None:
    check_record(payload)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@given(records())
@fuzz(LONG_EXAMPLES)
def test_every_record_type_decodes_or_is_rejected_long(payload: bytes) -> None:
    check_record(payload)


headers = st.lists(
    st.tuples(
        st.sampled_from([names.HEADER_CHANNEL, names.HEADER_SEQ, "other"]),
        st.one_of(st.binary(max_size=20), st.integers().map(lambda n: str(n).encode())),
    ),
    max_size=4,
)


@given(headers)
@fuzz(FUZZ_EXAMPLES)
def test_kafka_headers_give_an_identity_or_none(values: list[tuple[str, bytes]]) -> None:
    identity = record_identity(values)
    assert identity is None or (isinstance(identity[0], str) and isinstance(identity[1], int))
    SequenceDeduper().accept_headers(values)


# -- tick files -------------------------------------------------------------------------------

lean_lines = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.one_of(st.integers(-(2**40), 2**40).map(str), st.text(max_size=6)),
        min_size=0,
        max_size=7,
    ).map(",".join),
    st.builds(
        lambda ms, price, size, ex, flags: f"{ms},{price},{size},{ex},{flags},0",
        st.integers(-(10**12), 10**12),
        st.integers(-(10**9), 10**12),
        st.integers(-(10**6), 10**9),
        st.text(max_size=2),
        st.one_of(st.integers(0, 2**40).map(lambda n: f"{n:x}"), st.text(max_size=4)),
    ),
)


def check_lean(lines: list[str]) -> None:
    bad: list[tuple[str, bytes]] = []
    text = "\n".join(lines)
    trades = lean_trades_from_text(
        text, "SPY", date(2013, 10, 7), on_bad=lambda e, raw: bad.append((e, raw))
    )
    assert len(trades) + len(bad) == sum(1 for line in text.splitlines() if line)
    aggregate("SPY", trades)


@given(st.lists(lean_lines, max_size=20))
@fuzz(FUZZ_EXAMPLES)
def test_lean_tick_lines_parse_or_become_bad_lines(lines: list[str]) -> None:
    check_lean(lines)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@given(st.lists(lean_lines, max_size=20))
@fuzz(LONG_EXAMPLES)
def test_lean_tick_lines_parse_or_become_bad_lines_long(lines: list[str]) -> None:
    check_lean(lines)


FLATFILE_HEADER = "ticker,conditions,exchange,id,price,sequence_number,sip_timestamp,size,tape"
flat_rows = st.one_of(
    st.text(max_size=80),
    st.lists(st.text(max_size=12), max_size=10).map(",".join),
    st.builds(
        lambda c, x, p, ts, size: f'SPY,"{c}",{x},1,{p},2,{ts},{size},1',
        st.text(max_size=6),
        st.text(max_size=3),
        st.one_of(st.floats(allow_nan=True).map(str), st.text(max_size=5)),
        st.integers(-(10**25), 10**25),
        st.one_of(st.integers(-(10**6), 10**9).map(str), st.text(max_size=5)),
    ),
)


def check_flatfile(rows: list[str]) -> None:
    bad: list[tuple[str, bytes]] = []
    trades = polygon_trades_from_lines(
        [FLATFILE_HEADER, *rows], on_bad=lambda e, raw: bad.append((e, raw))
    )
    for trade in trades:
        aggregate(trade.sym, [trade])


@given(st.lists(flat_rows, max_size=15))
@fuzz(FUZZ_EXAMPLES)
def test_flat_file_rows_parse_or_become_bad_lines(rows: list[str]) -> None:
    check_flatfile(rows)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@given(st.lists(flat_rows, max_size=15))
@fuzz(LONG_EXAMPLES)
def test_flat_file_rows_parse_or_become_bad_lines_long(rows: list[str]) -> None:
    check_flatfile(rows)
