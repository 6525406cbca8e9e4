"""SequenceDeduper: what consumers of the mirrored topics use to drop duplicates by sequence."""

from __future__ import annotations

from libs.common.io.kafka_io import SequenceDeduper, record_identity, sequence_headers
from libs.common.names import HEADER_CHANNEL, HEADER_SEQ


def test_duplicates_are_dropped_and_counted() -> None:
    deduper = SequenceDeduper()
    seen = [deduper.accept("ticks.SPY", seq) for seq in (1, 2, 3, 2, 3, 4, 1)]
    assert seen == [True, True, True, False, False, True, False]
    assert deduper.duplicates == 3
    assert deduper.floors == {"ticks.SPY": 4}


def test_records_resent_after_newer_ones_are_kept_not_dropped_as_old() -> None:
    # a produce of 3..4 failed after 5..6 succeeded; the mirror re-sends 3..6
    deduper = SequenceDeduper()
    arrivals = [1, 2, 5, 6, 3, 4, 5, 6, 7]
    accepted = [seq for seq in arrivals if deduper.accept("ticks.SPY", seq)]
    assert accepted == [1, 2, 5, 6, 3, 4, 7]
    assert deduper.duplicates == 2
    assert deduper.holes() == {}


def test_channels_are_independent() -> None:
    deduper = SequenceDeduper()
    assert deduper.accept("ticks.A", 1)
    assert deduper.accept("ticks.B", 1)
    assert not deduper.accept("ticks.A", 1)


def test_first_record_of_a_channel_sets_the_floor_and_seed_restores_state() -> None:
    deduper = SequenceDeduper()
    assert deduper.accept("ticks.A", 500)  # a consumer starting mid-stream
    assert deduper.accept("ticks.A", 501)
    restarted = SequenceDeduper()
    restarted.seed(deduper.floors)
    assert not restarted.accept("ticks.A", 501)
    assert restarted.accept("ticks.A", 502)


def test_a_hole_that_never_fills_is_abandoned_past_the_bound() -> None:
    deduper = SequenceDeduper(max_pending=3)
    for seq in (1, 3, 4, 5, 6):  # 2 never comes (e.g. it went to the dead-letter topic)
        assert deduper.accept("ticks.A", seq)
    assert deduper.abandoned == 1
    assert deduper.floors["ticks.A"] == 6
    assert deduper.holes() == {}


def test_headers_round_trip_and_records_without_them_pass() -> None:
    headers = sequence_headers("ticks.SPY", 42)
    assert dict(headers) == {HEADER_CHANNEL: b"ticks.SPY", HEADER_SEQ: b"42"}
    assert record_identity(headers) == ("ticks.SPY", 42)
    assert record_identity([("other", b"x")]) is None
    deduper = SequenceDeduper()
    assert deduper.accept_headers(headers)
    assert not deduper.accept_headers(headers)
    assert deduper.accept_headers(None)
    assert deduper.accept_headers([(HEADER_SEQ, b"not a number"), (HEADER_CHANNEL, b"x")])
