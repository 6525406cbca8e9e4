"""The New York trading day: sessions, minutes, ``tsET`` and ``barId``.

All stored timestamps are UTC epoch milliseconds. App-facing payloads also carry ``tsET``,
ISO-8601 in America/New_York with its offset. ``barId`` counts regular-session minutes from
09:30 ET = 1 (so 14:30 ET is 301); minutes outside the regular session get a barId of 0 or
below (pre-market) and above the last regular one (after hours: 390 is 15:59, or 210 at 12:59
on an early close), so the number still orders the day. Holidays and early closes come from
the exchange calendar (``calendar``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from libs.common.market.calendar import close_ms, is_trading_day

NEW_YORK = ZoneInfo("America/New_York")
MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Session:
    """The New York trading session of one calendar day, as epoch milliseconds."""

    day: date
    premarket_ms: int
    open_ms: int
    close_ms: int
    end_ms: int
    trading: bool = True
    """False on a day the exchange does not trade (a weekend, a holiday): its regular session
    is empty (``close_ms == open_ms``), so no minute of it is regular."""

    @property
    def last_bar_id(self) -> int:
        """``barId`` of the regular session's last minute: 390 (15:59), 210 on an early close
        (12:59), 0 when the exchange does not trade that day."""
        return (self.close_ms - self.open_ms) // MINUTE_MS

    def phase(self, ts_ms: int) -> str:
        """``closed``, ``pre``, ``regular`` or ``post`` for an epoch-ms time on this day."""
        if ts_ms < self.premarket_ms or ts_ms >= self.end_ms:
            return "closed"
        if ts_ms < self.open_ms:
            return "pre"
        if ts_ms < self.close_ms:
            return "regular"
        return "post"


_SESSION_CACHE: dict[date, Session] = {}


def ny_epoch_ms(day: date, hour: int, minute: int = 0, ms_of_minute: int = 0) -> int:
    """Epoch ms of a New York wall-clock time on ``day`` (DST aware)."""
    local = datetime(day.year, day.month, day.day, hour, minute, tzinfo=NEW_YORK)
    return int(local.timestamp() * 1000) + ms_of_minute


_MIDNIGHTS: dict[date, int] = {}


def ny_midnight_ms(day: date) -> int:
    """Epoch ms of 00:00 New York time on ``day``."""
    midnight = _MIDNIGHTS.get(day)
    if midnight is None:
        midnight = _MIDNIGHTS[day] = ny_epoch_ms(day, 0)
    return midnight


def session_for(day: date) -> Session:
    """The session calendar of ``day``: 04:00 pre-market, 09:30 open, the close of the exchange
    calendar (16:00, or 13:00 on an early close: ``calendar``), 20:00 end; on a day the
    exchange does not trade, no regular session (the close is the open)."""
    session = _SESSION_CACHE.get(day)
    if session is None:
        trading = is_trading_day(day)
        open_ms = ny_epoch_ms(day, 9, 30)
        session = Session(
            day=day,
            premarket_ms=ny_epoch_ms(day, 4),
            open_ms=open_ms,
            close_ms=close_ms(day) if trading else open_ms,
            end_ms=ny_epoch_ms(day, 20),
            trading=trading,
        )
        _SESSION_CACHE[day] = session
    return session


def last_bar_id(ts_ms: int) -> int:
    """``barId`` of the last regular minute of the New York day holding ``ts_ms`` (390, 210 on
    an early close, 0 when the exchange is closed that day)."""
    return session_of(ts_ms).last_bar_id


_HOUR_MS = 3_600_000
_HOUR_DATES: dict[int, date] = {}


def ny_date(ts_ms: int) -> date:
    """The New York calendar date of an epoch-ms time.

    New York's offsets are whole hours, so its midnight falls on a UTC hour and the date is
    the same for every time within one UTC hour: looked up per hour, computed once."""
    hour = ts_ms // _HOUR_MS
    day = _HOUR_DATES.get(hour)
    if day is None:
        if len(_HOUR_DATES) > 200_000:
            _HOUR_DATES.clear()
        day = _HOUR_DATES[hour] = datetime.fromtimestamp(hour * 3_600, tz=NEW_YORK).date()
    return day


def session_of(ts_ms: int) -> Session:
    """The session of the New York day that contains ``ts_ms``."""
    return session_for(ny_date(ts_ms))


def floor_minute(ts_ms: int) -> int:
    """Start of the minute containing ``ts_ms`` (New York offsets are whole minutes)."""
    return ts_ms - ts_ms % MINUTE_MS


_TS_ET_CACHE: dict[int, str] = {}


def ts_et(ts_ms: int) -> str:
    """ISO-8601 New York time with offset, to the second: ``2025-10-27T14:30:00-04:00``."""
    second_ms = ts_ms - ts_ms % 1000
    text = _TS_ET_CACHE.get(second_ms)
    if text is None:
        local = datetime.fromtimestamp(second_ms / 1000, tz=NEW_YORK)
        text = local.isoformat(timespec="seconds")
        if len(_TS_ET_CACHE) > 100_000:
            _TS_ET_CACHE.clear()
        _TS_ET_CACHE[second_ms] = text
    return text


def ts_et_minute(ts_ms: int) -> str:
    """``tsET`` of the start of the minute containing ``ts_ms``."""
    return ts_et(floor_minute(ts_ms))


def bar_id(ts_ms: int) -> int:
    """Regular-session minute index of the minute containing ``ts_ms``: 09:30 ET is 1.

    Pre-market minutes count down to 0 and below; after-hours minutes continue past 390.
    """
    session = session_of(ts_ms)
    return (floor_minute(ts_ms) - session.open_ms) // MINUTE_MS + 1


def parse_day(text: str) -> date:
    """Parse ``YYYY-MM-DD`` or ``YYYYMMDD`` with a clear error."""
    cleaned = text.replace("-", "")
    try:
        return datetime.strptime(cleaned, "%Y%m%d").date()
    except ValueError:
        raise ValueError(f"not a date (want YYYY-MM-DD): {text!r}") from None
