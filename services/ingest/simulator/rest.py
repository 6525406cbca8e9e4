"""Polygon's REST trades endpoint, served by the simulator for the trades its feed produced.

``GET /v3/trades/{ticker}`` as Polygon serves it (``docs/simulator.md`` has the details):
``timestamp`` and ``timestamp.gte|gt|lte|lt`` (nanoseconds or ``YYYY-MM-DD``), ``order``
(``desc`` by default), ``limit`` (1000 by default, at most 50000), ``sort=timestamp``; the
key as ``Authorization: Bearer <key>`` or ``?apiKey=``; ``{"status":"OK","request_id":...,
"results":[...]}`` with ``next_url`` only while more rows remain (its cursor carries the
whole query); 401 for a bad key, 429 with ``Retry-After`` while throttled (a fault). The
trades are those the feed produced up to now, whether or not a client was connected: what a
client missed while away is what it backfills from here. So the official client's
``RESTClient(base=...).list_trades`` works against the simulator.
"""

from __future__ import annotations

import base64
import bisect
import hmac
import json
import uuid
from datetime import date
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from libs.common.market.sessions import ny_midnight_ms
from libs.common.schemas import Trade

PREFIX = "/v3/trades/"
DEFAULT_LIMIT = 1_000
MAX_LIMIT = 50_000
_NS = 1_000_000


class TradeHistory:
    """Every trade the feed produced, per symbol, in the order sent (time order)."""

    def __init__(self) -> None:
        self.trades: dict[str, list[Trade]] = {}
        self._times: dict[str, list[int]] = {}

    def add(self, trades: list[Trade]) -> None:
        """Record trades as the feed sends them."""
        for trade in trades:
            kept = self.trades.get(trade.sym)
            if kept is None:
                kept = self.trades[trade.sym] = []
                self._times[trade.sym] = []
            kept.append(trade)
            self._times[trade.sym].append(trade.t)

    def between(self, symbol: str, low_ns: int, high_ns: int) -> tuple[list[Trade], int]:
        """Trades of ``symbol`` with ``low_ns <= t(ns) < high_ns`` and the index of the first."""
        times = self._times.get(symbol)
        if not times:
            return [], 0
        start = bisect.bisect_left(times, -(-low_ns // _NS))
        end = bisect.bisect_left(times, -(-high_ns // _NS))
        return self.trades[symbol][start:end], start


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
        rows, _ = self.history.between(ticker, low, high)
        if order == "desc":
            rows = rows[::-1]
        page = rows[skip : skip + limit]
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
