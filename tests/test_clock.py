"""Session calendar, tsET and barId, across daylight-saving changes."""

from __future__ import annotations

from datetime import date

import pytest

from libs.common.market.calendar import trading_days_back
from libs.common.market.sessions import (
    bar_id,
    ny_epoch_ms,
    parse_day,
    session_for,
    ts_et,
    ts_et_minute,
)
from libs.common.runtime.clock import ManualClock


def test_regular_open_is_bar_one_and_1430_is_301() -> None:
    day = date(2025, 10, 27)
    assert bar_id(ny_epoch_ms(day, 9, 30)) == 1
    assert bar_id(ny_epoch_ms(day, 9, 30, 59_999)) == 1
    assert bar_id(ny_epoch_ms(day, 14, 30)) == 301
    assert bar_id(ny_epoch_ms(day, 15, 59)) == 390
    assert bar_id(ny_epoch_ms(day, 16, 0)) == 391
    assert bar_id(ny_epoch_ms(day, 9, 29)) == 0


@pytest.mark.parametrize(
    ("day", "offset"),
    [
        (date(2013, 10, 7), "-04:00"),
        (date(2013, 11, 4), "-05:00"),
        (date(2025, 3, 10), "-04:00"),
        (date(2025, 3, 7), "-05:00"),
    ],
)
def test_ts_et_carries_the_new_york_offset_of_the_day(day: date, offset: str) -> None:
    assert ts_et(ny_epoch_ms(day, 9, 30)) == f"{day.isoformat()}T09:30:00{offset}"


def test_session_boundaries_follow_dst() -> None:
    summer, winter = session_for(date(2013, 10, 7)), session_for(date(2013, 11, 4))
    assert summer.open_ms - summer.premarket_ms == 5.5 * 3_600_000
    assert (winter.open_ms - summer.open_ms) % 86_400_000 == 3_600_000
    assert summer.phase(summer.premarket_ms - 1) == "closed"
    assert summer.phase(summer.premarket_ms) == "pre"
    assert summer.phase(summer.open_ms) == "regular"
    assert summer.phase(summer.close_ms) == "post"
    assert summer.phase(summer.end_ms) == "closed"


def test_dst_change_day_has_a_23_hour_calendar() -> None:
    spring = session_for(date(2025, 3, 9))
    assert ts_et(spring.open_ms) == "2025-03-09T09:30:00-04:00"
    assert ts_et(spring.premarket_ms) == "2025-03-09T04:00:00-04:00"


def test_ts_et_minute_floors_to_the_minute() -> None:
    assert ts_et_minute(ny_epoch_ms(date(2013, 10, 7), 10, 0, 59_999)) == (
        "2013-10-07T10:00:00-04:00"
    )


def test_manual_clock_moves_only_forward() -> None:
    clock = ManualClock(1_000)
    clock.advance(500)
    assert clock.now_ms() == 1_500 and clock.monotonic() == 0.5
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_parse_day_is_clear_about_bad_input() -> None:
    assert parse_day("2013-10-07") == parse_day("20131007") == date(2013, 10, 7)
    with pytest.raises(ValueError, match="not a date"):
        parse_day("yesterday")


def test_trading_days_back_skips_weekends() -> None:
    days = trading_days_back(date(2013, 10, 9), 5)
    assert days[0] == date(2013, 10, 3) and len(days) == 5


def test_the_exchange_calendar_knows_holidays_and_early_closes() -> None:
    from libs.common.market.calendar import close_time, is_trading_day
    from libs.common.market.sessions import bar_id, session_for

    assert not is_trading_day(date(2013, 12, 25))  # Christmas
    assert not is_trading_day(date(2013, 11, 28))  # Thanksgiving
    assert is_trading_day(date(2013, 11, 29)) and close_time(date(2013, 11, 29)) == (13, 0)
    assert close_time(date(2013, 12, 24)) == (13, 0) and close_time(date(2013, 10, 7)) == (16, 0)
    early = session_for(date(2013, 11, 29))
    assert early.close_ms == ny_epoch_ms(date(2013, 11, 29), 13)
    assert early.phase(ny_epoch_ms(date(2013, 11, 29), 13, 30)) == "post"
    assert bar_id(ny_epoch_ms(date(2013, 11, 29), 12, 59)) == 210  # the last regular bar


def test_trading_days_back_skip_holidays() -> None:
    days = trading_days_back(date(2013, 12, 27), 4)  # a Friday, after Christmas
    assert days == [date(2013, 12, 23), date(2013, 12, 24), date(2013, 12, 26), date(2013, 12, 27)]
