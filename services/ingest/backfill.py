"""Filling feed gaps from Polygon's REST API: what the socket missed, fetched and published.

Polygon's WebSocket does not replay what was sent while a client was away; its REST API has
every trade. When a gap closes (``FeedPublisher``: the feed is read again), the
``Backfiller`` fetches each of the gap's symbols' trades between the gap's start and end
(``GET /v3/trades/{ticker}`` with ``timestamp.gte``/``lte`` in nanoseconds, ``order=asc``,
``sort=timestamp``, ``limit=50000``, following ``next_url``; the key as ``Authorization:
Bearer``), at most ``concurrency`` symbols at a time, backing off on 429 (``Retry-After`` when
the server gives one) and on server errors. The trades are published in time order, a
``TickBatch`` of at most ``batch_trades`` per record, through the feed publisher, whose
identity check drops every trade already seen live (the ones around the gap's edges, and after
an ingest restart those published before it: read back from the tick streams first). Late
trades make the bar builders revise the minutes they touch, on both paths. The gap's record
is published again with ``status`` ``backfilled`` (and how many trades) or ``unfilled`` (no
key, backfill off, the API refused or kept failing: the report then counts its minutes as
incomplete).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx
import msgspec
import structlog
from prometheus_client import CollectorRegistry, Counter

from libs.common import names
from libs.common.market.identity import TradeIds
from libs.common.runtime.backoff import Backoff
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component
from libs.common.runtime.metrics import metrics_for
from libs.common.runtime.settings import Secret
from libs.common.schemas import ENCODER, FeedGap
from services.ingest import protocol
from services.ingest.protocol import TradeEvent
from services.ingest.publishing import FeedPublisher

log = structlog.get_logger("tickmesh.ingest.backfill")

_NS = 1_000_000
_EDGE_MS = 1_000
"""Trades this close to a gap's edges may have been seen live: read back to drop them."""


class BackfillRefused(Exception):
    """The REST API refused the request (a bad key, a plan without trades): no retry."""


class BackfillMetrics:
    """Metrics of the gap backfill; built once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.trades = Counter(
            "tickmesh_ingest_backfilled_trades",
            "Trades fetched from REST and published (new ones only)",
            registry=registry,
        )
        self.gaps = Counter(
            "tickmesh_ingest_backfill_gaps",
            "Gaps handled, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.requests = Counter(
            "tickmesh_ingest_rest_requests",
            "REST requests by status",
            ["status"],
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> BackfillMetrics:
        """The metrics of ``registry``, created once."""
        return metrics_for(cls, registry)


def _trade(symbol: str, row: dict[str, object]) -> TradeEvent:
    """A REST trade as the socket's ``T`` event (times back to milliseconds)."""
    trf_ns = row.get("trf_timestamp")
    return TradeEvent(
        symbol,
        float(row["price"]),  # type: ignore[arg-type]
        int(row["size"]),  # type: ignore[call-overload]
        int(row["sip_timestamp"]) // _NS,  # type: ignore[call-overload]
        int(row.get("exchange") or 0),  # type: ignore[call-overload]
        tuple(row.get("conditions") or ()),  # type: ignore[arg-type]
        str(row.get("id") or ""),
        int(row.get("tape") or 0),  # type: ignore[call-overload]
        int(row.get("sequence_number") or 0),  # type: ignore[call-overload]
        False,
        row.get("trf_id"),  # type: ignore[arg-type]
        int(trf_ns) // _NS if trf_ns else None,  # type: ignore[call-overload]
    )


class RestTrades:
    """A small client of Polygon's ``/v3/trades/{ticker}``."""

    def __init__(
        self,
        base_url: str,
        api_key: Secret,
        *,
        timeout_s: float = 10.0,
        max_wait_s: float = 300.0,
        page_limit: int = 50_000,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_wait_s = max_wait_s
        self.page_limit = page_limit
        self.metrics = BackfillMetrics.for_registry(registry)
        self.clock = clock
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout_s,
                headers={"Authorization": f"Bearer {self._api_key.reveal()}"},
            )
        return self._client

    async def close(self) -> None:
        """Release the HTTP client."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def trades(self, symbol: str, start_ms: int, end_ms: int) -> list[TradeEvent]:
        """Every trade of ``symbol`` with ``start_ms <= t <= end_ms``, in time order."""
        url = f"{self.base_url}/v3/trades/{symbol}"
        params: dict[str, str | int] | None = {
            "timestamp.gte": start_ms * _NS,
            "timestamp.lte": end_ms * _NS + _NS - 1,
            "order": "asc",
            "sort": "timestamp",
            "limit": self.page_limit,
        }
        out: list[TradeEvent] = []
        while True:
            body = await self._get(url, params)
            rows: list[dict[str, object]] = body.get("results") or []  # type: ignore[assignment]
            out.extend(_trade(symbol, row) for row in rows)
            next_url = body.get("next_url")
            if not next_url:
                return out
            parts = urlsplit(str(next_url))  # its host may be another's: keep path and query
            url = f"{self.base_url}{parts.path}?{parts.query}"
            params = None

    async def _get(self, url: str, params: dict[str, str | int] | None) -> dict[str, object]:
        backoff = Backoff(0.5, 30.0)
        deadline = self.clock.monotonic() + self.max_wait_s
        while True:
            try:
                response = await self._http().get(url, params=params)
            except httpx.TransportError as exc:
                self.metrics.requests.labels("transport_error").inc()
                wait = backoff.next_s()
                if self.clock.monotonic() + wait > deadline:
                    raise
                log.warning("ingest.rest_retry", error=repr(exc), delay_s=round(wait, 2))
                await asyncio.sleep(wait)
                continue
            status = response.status_code
            self.metrics.requests.labels(str(status)).inc()
            if status == 200:
                result: dict[str, object] = response.json()
                return result
            if status in (401, 403):
                raise BackfillRefused(f"{status}: {response.text[:200]}")
            if status == 429 or status >= 500:
                retry_after = response.headers.get("Retry-After", "")
                wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 0.0
                wait = max(wait, backoff.next_s())
                if self.clock.monotonic() + wait > deadline:
                    raise BackfillRefused(
                        f"{status} for {self.max_wait_s:g} s: {response.text[:200]}"
                    )
                log.warning("ingest.rest_retry", status=status, delay_s=round(wait, 2))
                await asyncio.sleep(wait)
                continue
            raise BackfillRefused(f"{status}: {response.text[:200]}")


class Backfiller(Component):
    """Fills each closed feed gap from REST; see the module docstring."""

    def __init__(
        self,
        feed: FeedPublisher,
        rest: RestTrades | None,
        *,
        unavailable: str = "",
        concurrency: int = 4,
        batch_trades: int = 100,
        queue_size: int = 1_000,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__("ingest.backfill", registry=registry)
        self.feed = feed
        self.rest = rest
        self.unavailable = unavailable or "backfill is off (INGEST_BACKFILL=false)"
        self.concurrency = concurrency
        self.batch_trades = batch_trades
        self.clock = clock
        self.backfill_metrics = BackfillMetrics.for_registry(registry)
        self.queue: asyncio.Queue[FeedGap] = asyncio.Queue(maxsize=queue_size)
        self.filled: list[FeedGap] = []
        """Every gap handled, as last published."""
        feed.on_gap_closed = self.enqueue
        self.spawn(self._run, name="ingest.backfill.run")

    def enqueue(self, gap: FeedGap) -> None:
        """A gap closed: fill it (a full queue leaves it reported unfilled)."""
        try:
            self.queue.put_nowait(gap)
        except asyncio.QueueFull:
            log.error("ingest.backfill_queue_full", gap=gap.gapId, action="left unfilled")
            self.backfill_metrics.gaps.labels("queue_full").inc()

    async def on_stop(self) -> None:
        if self.rest is not None:
            await self.rest.close()

    async def _run(self) -> None:
        while True:
            gap = await self.queue.get()
            await self.fill(gap)

    async def fill(self, gap: FeedGap) -> FeedGap:
        """Fill one closed gap and publish its outcome."""
        if self.rest is None:
            return await self._outcome(gap, "unfilled", 0, self.unavailable)
        symbols = self._symbols(gap)
        started = self.clock.monotonic()
        # what the tick streams hold of the gap's edges, kept for this fill (the book forgets
        # after its horizon, and a fill of many symbols can take longer)
        known = TradeIds()
        try:
            await self.feed.remember_published(
                symbols, gap.startMs - _EDGE_MS, gap.endMs + _EDGE_MS, known
            )
            semaphore = asyncio.Semaphore(self.concurrency)

            async def one(symbol: str) -> int:
                async with semaphore:
                    assert self.rest is not None
                    trades = await self.rest.trades(symbol, gap.startMs, gap.endMs)
                    return await self._publish(symbol, trades, known)

            counts = await asyncio.gather(*(one(symbol) for symbol in symbols))
        except (BackfillRefused, httpx.HTTPError, msgspec.DecodeError, ValueError) as exc:
            return await self._outcome(gap, "unfilled", 0, f"REST backfill failed: {exc}")
        total = sum(counts)
        log.info(
            "ingest.gap_backfilled",
            gap=gap.gapId,
            symbols=len(symbols),
            trades=total,
            seconds=round(self.clock.monotonic() - started, 3),
        )
        return await self._outcome(gap, "backfilled", total, f"{len(symbols)} symbols from REST")

    def _symbols(self, gap: FeedGap) -> list[str]:
        if "*" not in gap.symbols:
            return sorted(gap.symbols)
        # a subscription to every symbol: those the feed has given (a symbol never seen
        # before the gap is not known to have traded; the report says so)
        return sorted(
            symbol
            for channel in self.feed.book.channels
            if (symbol := names.symbol_of(names.TICKS, channel)) is not None
        )

    async def _publish(self, symbol: str, trades: list[TradeEvent], known: TradeIds) -> int:
        trades.sort(key=lambda trade: trade.t)
        published = 0
        for start in range(0, len(trades), self.batch_trades):
            chunk = trades[start : start + self.batch_trades]
            split: protocol.FrameSplit = {protocol.TRADES: {symbol: list(chunk)}}
            self.feed.admit(split, known)
            kept = split.get(protocol.TRADES, {}).get(symbol, [])
            if not kept:
                continue
            records = protocol.build_records(split, self.clock.now_ms())
            await self.feed.publish(records)
            published += len(kept)
        self.backfill_metrics.trades.inc(published)
        return published

    async def _outcome(self, gap: FeedGap, status: str, trades: int, detail: str) -> FeedGap:
        done = msgspec.structs.replace(gap, seq=0, status=status, backfilled=trades, detail=detail)
        self.backfill_metrics.gaps.labels(status).inc()
        if status != "backfilled":
            log.warning("ingest.gap_unfilled", gap=gap.gapId, reason=detail)
        await self.feed.publish([(names.FEED_GAPS, ENCODER.encode(done))])
        self.filled.append(done)
        return done
