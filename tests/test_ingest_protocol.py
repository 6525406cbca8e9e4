"""The Polygon wire protocol: tolerant frame decoding, grouping, records and encoders (no I/O)."""

from __future__ import annotations

import base64

import msgspec
import pytest

from libs.common.schemas import AggregateBatch, QuoteBatch, TickBatch, Trade, decode
from services.ingest import protocol
from services.ingest.protocol import (
    BadEvent,
    MinuteAggEvent,
    QuoteEvent,
    SecondAggEvent,
    StatusEvent,
    TradeEvent,
    build_records,
    decode_frame,
    split_frame,
)

TRADE_AAPL = (
    b'{"ev":"T","sym":"AAPL","x":4,"i":"12345","z":3,"p":114.125,"s":100,"c":[0,12],'
    b'"t":1536036818784,"q":3681328}'
)
TRADE_MSFT = (
    b'{"ev":"T","sym":"MSFT","x":11,"i":"9","z":3,"p":300.5,"s":37,"c":[37],'
    b'"t":1536036818785,"q":7}'
)
QUOTE = (
    b'{"ev":"Q","sym":"MSFT","bx":4,"bp":114.125,"bs":100,"ax":7,"ap":114.128,"as":160,"c":0,'
    b'"i":[604],"t":1536036818784,"q":50385480,"z":3}'
)
SECOND = (
    b'{"ev":"A","sym":"SPCE","v":200,"av":8642007,"op":25.66,"vw":25.3981,"o":25.39,"c":25.39,'
    b'"h":25.39,"l":25.39,"a":25.3714,"z":50,"s":1610144868000,"e":1610144869000}'
)
MINUTE = (
    b'{"ev":"AM","sym":"GTE","v":4110,"av":9470157,"op":0.4372,"vw":0.4488,"o":0.4488,'
    b'"c":0.4486,"h":0.4489,"l":0.4486,"a":0.4352,"z":685,"s":1610144640000,"e":1610144700000}'
)
STATUS = b'{"ev":"status","status":"connected","message":"Connected Successfully"}'


def frame(*events: bytes) -> bytes:
    return b"[" + b",".join(events) + b"]"


def test_a_frame_of_every_event_type_decodes_into_typed_events_with_polygon_fields() -> None:
    events, bad = decode_frame(frame(TRADE_AAPL, QUOTE, SECOND, MINUTE, STATUS))

    assert bad == []
    trade, quote, second, minute, status = events
    assert trade == TradeEvent(
        sym="AAPL",
        p=114.125,
        s=100,
        t=1536036818784,
        x=4,
        c=(0, 12),
        i="12345",
        z=3,
        q=3681328,
    )
    assert isinstance(trade, Trade)  # lines up with the record type: no conversion needed
    assert isinstance(quote, QuoteEvent) and quote.as_ == 160 and quote.i == (604,)
    assert isinstance(second, SecondAggEvent) and second.e - second.s == 1000
    assert isinstance(minute, MinuteAggEvent) and minute.l == 0.4486 and minute.v == 4110
    assert status == StatusEvent("connected", "Connected Successfully")


def test_a_text_frame_decodes_like_bytes() -> None:
    events, bad = decode_frame(frame(TRADE_AAPL).decode())
    assert bad == [] and events[0].i == "12345"  # type: ignore[union-attr]


def test_unknown_fields_are_ignored_and_the_extension_flag_is_kept() -> None:
    extra = (
        b'{"ev":"T","sym":"IBM","p":1.5,"s":10,"t":5,"trfi":202,"trft":4,"new":1,"suspicious":true}'
    )
    (trade,), bad = decode_frame(frame(extra))
    assert bad == []
    assert isinstance(trade, TradeEvent)
    assert trade.suspicious is True and trade.trfi == 202 and trade.trft == 4


def test_in_a_mixed_frame_good_events_survive_and_each_bad_one_is_reported_with_its_bytes() -> None:
    missing_price = b'{"ev":"T","sym":"AAPL","s":100,"t":1}'
    bad_type = b'{"ev":"T", "sym":"AAPL","p":"abc","s":100,"t":1}'
    not_an_object = b"42"
    events, bad = decode_frame(
        frame(TRADE_AAPL, missing_price, QUOTE, bad_type, not_an_object, TRADE_MSFT)
    )

    assert [type(event) for event in events] == [TradeEvent, QuoteEvent, TradeEvent]
    assert [event.sym for event in events] == ["AAPL", "MSFT", "MSFT"]  # type: ignore[union-attr]
    assert [item.raw for item in bad] == [missing_price, bad_type, not_an_object]
    assert "missing required field `p`" in bad[0].error
    assert "Expected `float`, got `str`" in bad[1].error and "$.p" in bad[1].error
    assert "Expected `object`" in bad[2].error


def test_an_unknown_event_type_is_reported_and_the_rest_of_the_frame_survives() -> None:
    luld = b'{"ev":"LULD","T":"MSFT","h":218.96,"l":198.11,"t":1601316752683}'
    events, bad = decode_frame(frame(TRADE_AAPL, luld))
    assert [event.sym for event in events] == ["AAPL"]  # type: ignore[union-attr]
    assert bad == [BadEvent(luld, "Invalid value 'LULD' - at `$.ev`")]


def test_a_frame_that_is_not_an_array_is_one_dead_letter_with_the_whole_frame() -> None:
    not_array = b'{"ev":"status","status":"connected"}'
    assert decode_frame(not_array) == (
        [],
        [BadEvent(not_array, "frame: Expected `array`, got `object`")],
    )


@pytest.mark.parametrize("raw", [b"", b"[", b'[{"ev":"T","sym":"A"', b"\xff\xfe", b"nonsense"])
def test_input_that_is_not_json_is_one_dead_letter_and_never_raises(raw: bytes) -> None:
    events, bad = decode_frame(raw)
    assert events == []
    assert len(bad) == 1 and bad[0].raw == raw and bad[0].error.startswith("frame: ")


def test_an_empty_frame_has_no_events_and_no_errors() -> None:
    assert decode_frame(b"[]") == ([], [])


def test_split_frame_groups_by_kind_and_symbol_in_frame_order() -> None:
    events, _ = decode_frame(frame(TRADE_AAPL, TRADE_MSFT, QUOTE, TRADE_AAPL, MINUTE, STATUS))
    split = split_frame(events)

    assert set(split) == {"T", "Q", "AM", "status"}
    aapl = split["T"]["AAPL"]
    assert [trade.i for trade in aapl] == ["12345", "12345"]  # type: ignore[union-attr]
    assert len(split["T"]["MSFT"]) == 1
    assert list(split["Q"]) == ["MSFT"] and list(split["AM"]) == ["GTE"]
    (connected,) = split["status"]["connected"]
    assert connected.message == "Connected Successfully"  # type: ignore[union-attr]


def test_build_records_makes_one_record_per_kind_and_symbol_on_the_contract_channels() -> None:
    events, _ = decode_frame(frame(TRADE_AAPL, TRADE_MSFT, TRADE_AAPL, QUOTE, SECOND, MINUTE))
    records = dict(build_records(split_frame(events), ts_init_ms=99))

    assert set(records) == {
        "ticks.AAPL",
        "ticks.MSFT",
        "quotes.MSFT",
        "aggs.SPCE.1s",
        "aggs.GTE.1m",
    }
    batch = decode(records["ticks.AAPL"], TickBatch)
    assert batch.seq == 0 and batch.sym == "AAPL" and batch.tsInit == 99
    assert [tick.p for tick in batch.ticks] == [114.125, 114.125]
    assert type(batch.ticks[0]) is Trade and batch.ticks[0].c == (0, 12)
    assert records["ticks.AAPL"].startswith(b'{"seq":0,')
    assert decode(records["quotes.MSFT"], QuoteBatch).quotes[0].as_ == 160
    assert decode(records["aggs.GTE.1m"], AggregateBatch).aggs[0].v == 4110
    assert decode(records["aggs.SPCE.1s"], AggregateBatch).aggs[0].e == 1610144869000


def test_build_records_can_strip_the_event_tag_from_ticks_with_the_same_content() -> None:
    events, _ = decode_frame(frame(TRADE_AAPL))
    tagged = build_records(split_frame(events), 1)[0][1]
    plain = build_records(split_frame(events), 1, strip_event_tag=True)[0][1]

    assert b'"ev":"T"' in tagged and b'"ev"' not in plain
    assert decode(tagged, TickBatch) == decode(plain, TickBatch)


def test_channel_templates_are_configurable() -> None:
    events, _ = decode_frame(frame(TRADE_AAPL))
    channels = protocol.ChannelNames(trades="t.{symbol}.v2")
    assert build_records(split_frame(events), 1, channels)[0][0] == "t.AAPL.v2"


def test_statuses_are_not_records() -> None:
    events, _ = decode_frame(frame(STATUS))
    assert build_records(split_frame(events), 1) == []


def test_dead_letters_carry_source_error_and_raw_bytes_as_base64() -> None:
    from prometheus_client import CollectorRegistry

    from libs.common import names
    from libs.common.io.deadletter import DeadLetters
    from libs.common.runtime.clock import ManualClock

    bad = BadEvent(b"\x00[bad", "boom")
    letters = DeadLetters(
        None,
        "ingest",
        registry=CollectorRegistry(),  # type: ignore[arg-type]
        clock=ManualClock(5),
    )
    ((channel, payload),) = letters.records("polygon", [(bad.error, bad.raw)])
    assert channel == names.DEAD_LETTERS
    encoded = msgspec.json.decode(payload)
    assert encoded["source"] == "polygon" and encoded["error"] == "boom"
    assert base64.b64decode(encoded["raw"]) == b"\x00[bad" and encoded["service"] == "ingest"


def test_client_actions_encode_as_polygon_expects() -> None:
    assert protocol.encode_auth("k3y") == b'{"action":"auth","params":"k3y"}'
    assert protocol.encode_subscribe(["T.AAPL", "Q.AAPL", "AM.*"]) == (
        b'{"action":"subscribe","params":"T.AAPL,Q.AAPL,AM.*"}'
    )
    assert protocol.encode_unsubscribe("T.*") == b'{"action":"unsubscribe","params":"T.*"}'


def test_the_auth_action_never_shows_the_key() -> None:
    action = protocol.decode_action(protocol.encode_auth("top-secret-key"))
    assert action.params == "top-secret-key"
    assert "top-secret-key" not in repr(action) and "top-secret-key" not in str(action)
    assert "T.AAPL" in repr(protocol.decode_action(protocol.encode_subscribe("T.AAPL")))


def test_topics_parse_from_comma_lists_with_blanks() -> None:
    assert protocol.parse_topics(" T.AAPL, AM.* ,,Q.MSFT") == ["T.AAPL", "AM.*", "Q.MSFT"]
    assert protocol.split_topic("AM.*") == ("AM", "*")
    assert protocol.split_topic("T.BRK.A") == ("T", "BRK.A")
    for bad in ("AAPL", ".AAPL", "T."):
        with pytest.raises(ValueError, match=r"EV\.SYMBOL"):
            protocol.split_topic(bad)


def test_server_frames_round_trip_through_the_decoder() -> None:
    trade = TradeEvent("SPY", 168.5, 100, 1381152600000, 11, (37,), "7", 2, 3, suspicious=True)
    status_frame = protocol.encode_statuses([("success", "subscribed to: T.SPY")])
    assert status_frame == (
        b'[{"ev":"status","status":"success","message":"subscribed to: T.SPY"}]'
    )
    encoded = protocol.encode_events([trade])
    assert encoded.startswith(b'[{"ev":"T","sym":"SPY"') and b'"suspicious":true' in encoded
    assert decode_frame(encoded) == ([trade], [])
    assert decode_frame(protocol.encode_status("auth_success", "authenticated"))[0] == [
        StatusEvent("auth_success", "authenticated")
    ]


def test_as_trade_event_sends_suspicious_only_when_true() -> None:
    plain = protocol.as_trade_event(Trade("IBM", 180.0, 100, 1, 4, (), "1", 1, 1))
    flagged = protocol.as_trade_event(Trade("IBM", 180.0, 100, 1, suspicious=True))
    assert b"suspicious" not in protocol.encode_events([plain])
    assert b'"suspicious":true' in protocol.encode_events([flagged])
    assert protocol.as_trade_event(plain) is plain


def test_a_channel_template_without_the_symbol_is_refused() -> None:
    with pytest.raises(ValueError, match="needs one"):
        protocol.ChannelNames(trades="ticks")


def test_records_of_frame_runs_the_whole_path_and_returns_the_rejects() -> None:
    records, bad = protocol.records_of_frame(frame(TRADE_AAPL, b'{"ev":"T"}'), 7)
    assert [channel for channel, _ in records] == ["ticks.AAPL"]
    assert bad == [BadEvent(b'{"ev":"T"}', "Object missing required field `sym`")]
