"""Every contract payload round-trips; the contract's example position decodes unchanged."""

from __future__ import annotations

import msgspec
import pytest

from libs.common import schemas
from libs.common.schemas import (
    AggregateBatch,
    Bar,
    DeadLetter,
    ExecutedTrade,
    Heartbeat,
    ParityReport,
    Portfolio,
    Position,
    Quote,
    QuoteBatch,
    Signal,
    TickBatch,
    Trade,
    VendorAggregate,
    decode,
    encode,
    seq_of,
)

CONTRACT_POSITION = (
    b'{"symbol":"AAPL","tsET":"2025-10-27T14:30:00-04:00","barId":301,"barsHeld":15,'
    b'"shares":100,"entryPrice":150.25,"unrealizedPnl":255.00}'
)

EXAMPLES: list[msgspec.Struct] = [
    TickBatch(
        7,
        "SPY",
        [
            Trade(
                "SPY",
                167.41,
                100,
                1381152600123,
                x=11,
                c=(14, 41),
                i="9",
                z=2,
                q=3,
                suspicious=True,
            )
        ],
        tsInit=5,
    ),
    QuoteBatch(1, "SPY", [Quote("SPY", bx=11, bp=1.0, bs=2, ax=12, ap=1.1, as_=3, t=5)]),
    AggregateBatch(2, "SPY", [VendorAggregate("SPY", v=10, o=1, c=2, h=3, l=0.5, s=1, e=2)]),
    Bar(
        3,
        "SPY",
        "2013-10-07T10:00:00-04:00",
        31,
        1.0,
        2.0,
        0.5,
        1.5,
        337771,
        1.2,
        90,
        1381154400000,
        1381154460000,
        1,
    ),
    Signal(4, "SPY", "2013-10-07T10:00:00-04:00", 31, "BULLISH", 80.0, "golden_cross"),
    ExecutedTrade(5, "SPY", "t", 31, "BUY", 100, 1.0, 0.9, 1.2, "entry", "T1"),
    Position(6, "SPY", "t", 31, 2, 100, 1.0, 1.1, 10.0, 0.9, 1.2),
    Portfolio(7, "main", "t", 31, 100_000.0, 90_000.0, 0.0, 10.0, 10_000.0, 1),
    Heartbeat(8, "run", "bars", "t", "sim", "ok", 12, tsMs=3),
    DeadLetter(9, "ticks.SPY", "bad", b"\x00raw", 1, service="ingest"),
    ParityReport(10, "2013-10-07", 100.0, 390, 0, 0, 0, 0, False, {"x": 1}),
]


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_every_contract_type_round_trips(record: msgspec.Struct) -> None:
    data = encode(record)
    assert decode(data, type(record)) == record


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_sequenced_records_start_with_seq(record: msgspec.Struct) -> None:
    data = encode(record)
    if hasattr(record, "seq"):
        assert seq_of(data) == record.seq  # type: ignore[attr-defined]


def test_contract_example_position_decodes_unchanged() -> None:
    position = decode(CONTRACT_POSITION, Position)
    assert (position.symbol, position.tsET, position.barId, position.barsHeld) == (
        "AAPL",
        "2025-10-27T14:30:00-04:00",
        301,
        15,
    )
    assert (position.shares, position.entryPrice, position.unrealizedPnl) == (100, 150.25, 255.0)
    as_json = msgspec.json.decode(CONTRACT_POSITION)
    reencoded = msgspec.json.decode(encode(position))
    assert {k: reencoded[k] for k in as_json} == as_json


def test_unknown_fields_are_ignored_on_wire_types() -> None:
    data = b'{"seq":1,"sym":"SPY","ticks":[],"tsInit":0,"futureField":[1,2]}'
    assert decode(data, TickBatch).sym == "SPY"


def test_quote_uses_polygons_as_field_name() -> None:
    assert b'"as":3' in encode(Quote("SPY", as_=3))


def test_records_are_immutable() -> None:
    with pytest.raises(AttributeError):
        EXAMPLES[0].sym = "X"  # type: ignore[attr-defined]


def test_decoders_are_built_once_per_type() -> None:
    assert set(schemas.DECODERS) == set(schemas.RECORD_TYPES)
