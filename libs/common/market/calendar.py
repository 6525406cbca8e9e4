"""The exchange calendar: which days the US equity market trades, and when they close early.

Holidays and early closes (13:00 ET: the day after Thanksgiving, Christmas Eve, July 3 in
some years) come from ``exchange_calendars``' ``XNYS`` calendar, the maintained library the
field uses (a holiday calendar of our own would be wrong the first year a rule changes). It is
read once (by ``load`` at the start of a service that needs it, else on first use) into plain
Python sets, so a lookup costs a dict access and nothing on the hot path touches pandas.
"""

from __future__ import annotations

import threading
import warnings
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

_NEW_YORK = ZoneInfo("America/New_York")

_LOCK = threading.Lock()
_SESSIONS: set[date] | None = None
_EARLY_CLOSES: dict[date, tuple[int, int]] = {}
_RANGE: tuple[date, date] = (date.min, date.min)


def load() -> set[date]:
    """Read the XNYS calendar once: every session day and the early closes' times (about a
    second of CPU; services that need it call this at start, off the data path)."""
    global _SESSIONS, _RANGE
    if _SESSIONS is not None:
        return _SESSIONS
    with _LOCK:
        if _SESSIONS is None:
            with warnings.catch_warnings():
                # the library's own use of pandas warns about pandas' future; not ours to fix
                warnings.simplefilter("ignore")
                import exchange_calendars

                calendar = exchange_calendars.get_calendar("XNYS", start="1990-01-02")
                sessions = {stamp.date() for stamp in calendar.sessions}
                for stamp in calendar.early_closes:
                    close = calendar.session_close(stamp).tz_convert("America/New_York")
                    _EARLY_CLOSES[stamp.date()] = (close.hour, close.minute)
            _RANGE = (min(sessions), max(sessions))
            _SESSIONS = sessions
    return _SESSIONS


def covers(day: date) -> bool:
    """True when the calendar knows ``day`` (outside its range, weekdays are assumed open)."""
    load()
    return _RANGE[0] <= day <= _RANGE[1]


def is_trading_day(day: date) -> bool:
    """True when the exchange is open on ``day``."""
    sessions = load()
    if not covers(day):
        return day.weekday() < 5
    return day in sessions


def close_time(day: date) -> tuple[int, int]:
    """The regular session's close on ``day`` in New York time: (16, 0) or (13, 0)."""
    load()
    return _EARLY_CLOSES.get(day, (16, 0))


def close_ms(day: date) -> int:
    """Epoch ms of the regular session's close on ``day``."""
    hour, minute = close_time(day)
    close = datetime(day.year, day.month, day.day, hour, minute, tzinfo=_NEW_YORK)
    return int(close.timestamp() * 1000)


def trading_days_back(day: date, count: int) -> list[date]:
    """The ``count`` trading days ending at ``day`` (``day`` itself if it trades), oldest first."""
    days: list[date] = []
    current = day
    while len(days) < count:
        if is_trading_day(current):
            days.append(current)
        current -= timedelta(days=1)
    return list(reversed(days))
