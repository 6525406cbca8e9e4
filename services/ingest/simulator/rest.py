"""Polygon's REST trades endpoint, served by the simulator for the trades its feed produced.

``GET /v3/trades/{ticker}`` as Polygon serves it (``docs/simulator.md`` has the details):
``timestamp`` and ``timestamp.gte|gt|lte|lt`` (nanoseconds or ``YYYY-MM-DD``), ``order``
(``desc`` by default), ``limit`` (1000 by default, at most 50000), ``sort=timestamp``; the
key as ``Authorization: Bearer <key>`` or ``?apiKey=``; ``{"status":"OK","request_id":...,
"results":[...]}`` with ``next_url`` only while more rows remain (its cursor carries the
whole query); 401 for a bad key, 429 with ``Retry-After`` while throttled (a fault). The
trades are those the feed produced up to now, whether or not a client was connected: what a
client missed while away is what it backfills from here. The simulator keeps the newest
``--history-max-trades`` of them; a query reaching before those gets 410 Gone. So the
official client's ``RESTClient(base=...).list_trades`` works against the simulator.
"""

from __future__ import annotations

import base64
import bisect
import hmac
import json
import uuid
from array import array
from collections import deque
from collections.abc import Sequence
from datetime import date
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from libs.common.market.sessions import ny_midnight_ms
from libs.common.schemas import Trade
from services.ingest.protocol import TradeEvent
from services.ingest.simulator.settings import DEFAULT_HISTORY_TRADES

log = structlog.get_logger("ingest.simulator")

PREFIX = "/v3/trades/"
DEFAULT_LIMIT = 1_000
MAX_LIMIT = 50_000
_NS = 1_000_000


class TradeHistory:
    """The newest ``max_trades`` trades the feed produced, per symbol in the order sent (time
    order), about 300 bytes a trade (the trade itself, kept, and its time).

    Past ``max_trades`` the oldest tenth goes, every symbol's alike: the trades before a time
    (``kept_from_ms``). A query that would need any of them is refused (``TradesEndpoint``),
    so a client never takes a partial answer for a whole one."""

    def __init__(self, max_trades: int = DEFAULT_HISTORY_TRADES) -> None:
        if max_trades < 1:
            raise ValueError(f"max_trades must be at least 1, not {max_trades}")
        self.max_trades = max_trades
        self._rows: dict[str, list[TradeEvent]] = {}
        self._times: dict[str, array[int]] = {}
        self._tapes: dict[str, int] = {}
        self._adds: deque[tuple[int, int]] = deque()
        """Per ``add`` call, oldest first: its first trade's time and its number of trades."""
        self.kept = 0
        self.dropped = 0
        """Trades let go so far (the oldest first)."""
        self.kept_from_ms = 0
        """Every trade before this time was let go (0: none was)."""

    def add(self, trades: Sequence[TradeEvent]) -> None:
        """Record trades as the feed sends them."""
        if not trades:
            return
        rows_of, times_of = self._rows, self._times
        for trade in trades:
            rows = rows_of.get(trade.sym)
            if rows is None:
                rows = rows_of[trade.sym] = []
                times_of[trade.sym] = array("q")
                self._tapes[trade.sym] = trade.z
            rows.append(trade)
            times_of[trade.sym].append(trade.t)
        self._adds.append((trades[0].t, len(trades)))
        self.kept += len(trades)
        if self.kept > self.max_trades:
            self._trim(self.kept - self.max_trades + self.max_trades // 10)

    def _trim(self, count: int) -> None:
        """Let go of the oldest ``count`` trades or so: those sent before the first trade of
        the oldest ``add`` kept (whole calls, so a call larger than that is kept whole)."""
        adds = self._adds
        while count > 0 and len(adds) > 1:
            count -= adds.popleft()[1]
        self.kept_from_ms = max(self.kept_from_ms, adds[0][0])
        before = self.kept
        for symbol, times in self._times.items():
            gone = bisect.bisect_left(times, self.kept_from_ms)
            if gone:
                del times[:gone]
                del self._rows[symbol][:gone]
                self.kept -= gone
                self.dropped += gone
        log.info(
            "simulator.history_trimmed",
            dropped=before - self.kept,
            kept=self.kept,
            kept_from_ms=self.kept_from_ms,
        )

    def symbols(self) -> list[str]:
        """Every symbol the feed sent a trade of (its trades may have been let go since)."""
        return list(self._rows)

    def count(self, symbol: str) -> int:
        """Trades of ``symbol`` kept."""
        return len(self._rows.get(symbol, ()))

    def tape(self, symbol: str) -> int | None:
        """The tape of ``symbol``'s first trade (None: no trade of it was sent)."""
        return self._tapes.get(symbol)

    def trades(self, symbol: str) -> list[TradeEvent]:
        """Every kept trade of ``symbol``, oldest first."""
        return list(self._rows.get(symbol, ()))

    def between(self, symbol: str, low_ns: int, high_ns: int) -> list[TradeEvent]:
        """Trades of ``symbol`` with ``low_ns <= t(ns) < high_ns``, oldest first."""
        times = self._times.get(symbol)
        if not times:
            return []
        start = bisect.bisect_left(times, -(-low_ns // _NS))
        end = bisect.bisect_left(times, -(-high_ns // _NS))
        return self._rows[symbol][start:end]


def _ns(value: str) -> int:
    """A timestamp filter's value: nanoseconds, or a New York day's midnight."""
    if value.isdigit():
        return int(value)
    return ny_midnight_ms(date.fromisoformat(value)) * _NS


def _bounds(query: dict[str, str]) -> tuple[int, int]:
    """[low, high) in ns from the timestamp filters."""
    low, high = 0, 1 << 62
    if "timestamp" in query:
        value = query["timestamp"]
        low = _ns(value)
        high = low + (86_400_000 * _NS if not value.isdigit() else 1)
    if "timestamp.gte" in query:
        low = max(low, _ns(query["timestamp.gte"]))
    if "timestamp.gt" in query:
        low = max(low, _ns(query["timestamp.gt"]) + 1)
    if "timestamp.lte" in query:
        high = min(high, _ns(query["timestamp.lte"]) + 1)
    if "timestamp.lt" in query:
        high = min(high, _ns(query["timestamp.lt"]))
    return low, high


def result_of(trade: Trade) -> dict[str, Any]:
    """One trade in the REST shape (nanosecond times, Polygon's field names)."""
    out: dict[str, Any] = {
        "conditions": list(trade.c),
        "exchange": trade.x,
        "id": trade.i,
        "participant_timestamp": trade.t * _NS,
        "price": trade.p,
        "sequence_number": trade.q,
        "sip_timestamp": trade.t * _NS,
        "size": trade.s,
        "tape": trade.z,
    }
    if trade.trfi is not None:
        out["trf_id"] = trade.trfi
    if trade.trft is not None:
        out["trf_timestamp"] = trade.trft * _NS
    return out


class TradesEndpoint:
    """The ``/v3/trades`` handler of one simulator."""

    def __init__(self, history: TradeHistory, api_key: str) -> None:
        self.history = history
        self.api_key = api_key
        self.throttle = 0
        """Requests still to answer with 429 (the ``rest_throttle`` fault)."""
        self.requests = 0

    def respond(self, connection: ServerConnection, request: Request) -> Response | None:
        """The answer to ``request`` (None when it is not a trades request)."""
        parts = urlsplit(request.path)
        if not parts.path.startswith(PREFIX):
            return None
        self.requests += 1
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        refused = refuse_unknown_key(connection, request, query, self.api_key)
        if refused is not None:
            return refused
        if self.throttle > 0:
            self.throttle -= 1
            response = _json(
                connection,
                HTTPStatus.TOO_MANY_REQUESTS,
                _error("You've exceeded the maximum requests per minute, please wait."),
            )
            response.headers["Retry-After"] = "1"
            return response
        ticker = parts.path[len(PREFIX) :]
        try:
            if "cursor" in query:
                query = json.loads(base64.urlsafe_b64decode(query["cursor"].encode()))
            limit = min(MAX_LIMIT, max(1, int(query.get("limit", DEFAULT_LIMIT))))
            order = query.get("order", "desc")
            if order not in ("asc", "desc"):
                raise ValueError(f"order must be asc or desc, not {order!r}")
            low, high = _bounds(query)
            skip = int(query.get("skip", 0))
        except (ValueError, KeyError) as exc:
            return _json(connection, HTTPStatus.BAD_REQUEST, _error(str(exc)))
        history = self.history
        rows = history.between(ticker, low, high)
        if order == "desc":
            rows = rows[::-1]
        page = rows[skip : skip + limit]
        # a page that starts, or (newest first) ends, where the kept trades begin, of a range
        # that reaches before them: some of its trades are gone
        if -(-low // _NS) < history.kept_from_ms and (order == "asc" or skip + limit >= len(rows)):
            return _json(
                connection,
                HTTPStatus.GONE,
                _error(
                    f"the simulator keeps its newest {history.max_trades:,} trades "
                    f"(--history-max-trades): those sent before {history.kept_from_ms} "
                    "(epoch ms) are gone, and this range reaches before that"
                ),
            )
        body: dict[str, Any] = {
            "status": "OK",
            "request_id": uuid.uuid4().hex,
            "results": [result_of(trade) for trade in page],
        }
        if skip + limit < len(rows):
            cursor = {**query, "skip": str(skip + limit), "limit": str(limit), "order": order}
            token = base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode()
            host = request.headers.get("Host", "127.0.0.1")
            body["next_url"] = f"http://{host}{PREFIX}{ticker}?cursor={token}"
        return _json(connection, HTTPStatus.OK, body)


def refuse_unknown_key(
    connection: ServerConnection, request: Request, query: dict[str, str], api_key: str
) -> Response | None:
    """A 401 unless the request carries ``api_key`` as Polygon takes it (the ``apiKey`` query
    parameter, taken out of ``query``, or an ``Authorization: Bearer`` header); else None."""
    supplied = query.pop("apiKey", "")
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        supplied = header[len("Bearer ") :]
    if hmac.compare_digest(supplied.encode(), api_key.encode()):
        return None
    return _json(connection, HTTPStatus.UNAUTHORIZED, _error("Unknown API Key"))


def _error(message: str) -> dict[str, str]:
    return {"status": "ERROR", "request_id": uuid.uuid4().hex, "error": message}


def _json(connection: ServerConnection, status: HTTPStatus, body: Any) -> Response:
    response = connection.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response
