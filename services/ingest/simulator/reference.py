"""Polygon's ticker reference, served by the simulator: ``GET /v3/reference/tickers/{ticker}``.

Polygon answers ``{"status":"OK","request_id":...,"results":{"ticker":...,
"primary_exchange":"XNYS",...}}`` (``date=YYYY-MM-DD`` asks about a past day), 404 for a ticker
it does not know, 401 for a bad key. The bars service and the reconciler read
``primary_exchange`` (a MIC) to know a symbol's listing exchange (``libs.common.market.listings``).

What the simulator knows: a tick-file feed's symbols are listed where the data set's map files
(or the ones tickmesh ships) say; any other symbol it sent trades of is listed where its tape
says (A NYSE, C Nasdaq, and NYSE Arca for tape B, the simulator's own convention for its
synthetic symbols). Anything else is not found.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from libs.common.market.listings import ARCA, NASDAQ, NYSE, POLYGON_TO_MIC, Listings, for_data
from services.ingest.simulator.feeds import find_tick_file
from services.ingest.simulator.rest import TradeHistory, _error, _json, refuse_unknown_key
from services.ingest.simulator.settings import FileFeed, SimulatorSettings

PREFIX = "/v3/reference/tickers/"
EXCHANGE_OF_TAPE = {1: NYSE, 2: ARCA, 3: NASDAQ}


class TickerEndpoint:
    """The ``/v3/reference/tickers/{ticker}`` handler of one simulator."""

    def __init__(
        self,
        history: TradeHistory,
        api_key: str,
        listings: Callable[[str], Listings | None] | None = None,
        default_day: date | None = None,
    ) -> None:
        self.history = history
        self.api_key = api_key
        self.listings = listings
        """The listings that know a ticker (None: only the tapes of the trades sent)."""
        self.default_day = default_day
        self.requests = 0

    def exchange_of(self, ticker: str, day: date) -> int:
        """The Polygon id of ``ticker``'s listing exchange on ``day`` (0 when unknown)."""
        listings = self.listings(ticker) if self.listings is not None else None
        if listings is not None:
            found = listings.lookup(ticker, day)
            if found is not None:
                return found.exchange
        tape = self.history.tape(ticker)
        return 0 if tape is None else EXCHANGE_OF_TAPE.get(tape, 0)

    def respond(self, connection: ServerConnection, request: Request) -> Response | None:
        """The answer to ``request`` (None when it is not a ticker-reference request)."""
        parts = urlsplit(request.path)
        if not parts.path.startswith(PREFIX):
            return None
        self.requests += 1
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        refused = refuse_unknown_key(connection, request, query, self.api_key)
        if refused is not None:
            return refused
        ticker = parts.path[len(PREFIX) :].upper()
        try:
            day = date.fromisoformat(query["date"]) if "date" in query else self.default_day
        except ValueError as exc:
            return _json(connection, HTTPStatus.BAD_REQUEST, _error(str(exc)))
        mic = POLYGON_TO_MIC.get(self.exchange_of(ticker, day or date.today()))
        if not ticker or mic is None:
            body = {"status": "NOT_FOUND", "request_id": uuid.uuid4().hex}
            body["message"] = "Ticker not found."
            return _json(connection, HTTPStatus.NOT_FOUND, body)
        results: dict[str, Any] = {
            "ticker": ticker,
            "name": ticker,
            "market": "stocks",
            "locale": "us",
            "primary_exchange": mic,
            "type": "CS",
            "active": True,
            "currency_name": "usd",
        }
        return _json(
            connection,
            HTTPStatus.OK,
            {"status": "OK", "request_id": uuid.uuid4().hex, "results": results},
        )


def ticker_endpoint(settings: SimulatorSettings, history: TradeHistory) -> TickerEndpoint:
    """The endpoint of a simulator: a tick-file feed's listings come from its data set."""
    feed = settings.feed
    key = settings.api_key.reveal()
    if not isinstance(feed, FileFeed):
        return TickerEndpoint(history, key)

    def listings_of(ticker: str) -> Listings:
        try:
            return for_data(find_tick_file(feed.data_dir, ticker, feed.day))
        except FileNotFoundError:
            return for_data(feed.data_dir)

    return TickerEndpoint(history, key, listings_of, feed.day)
