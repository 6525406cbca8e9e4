"""The bridge actor: bars from Redis through the core and an engine, records back to Redis.

Input is a ``SequencedConsumer`` on the bar channels (gap backfill from the streams, a
durable position per consumer), so bars published while the bridge was down are read when
it comes back. For every batch the actor offers the bars to the core, then processes every
minute bucket the core releases: ``begin`` → the engine's decision → ``finish`` → the
minute's records and the new state in one Redis transaction. Only then is the batch
committed to the consumer. A crash anywhere therefore either loses nothing (the batch is
delivered again, and bars already traded are recognised by the state) or publishes nothing
twice (records and state move together).

On start the actor loads the state of its portfolio from Redis: open positions, cash,
pending bars, the strategy's history; a new portfolio starts flat with ``initial_cash``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from libs.common.io.deadletter import DeadLetters
from libs.common.io.redis_io import Publisher
from libs.common.io.reliable import Record, SequencedConsumer
from libs.common.market.sessions import ts_et_minute
from libs.common.runtime.actors import Actor, Overflow
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.schemas import BAR_DECODER, ExecutedTrade, Signal
from services.engine_bridge.config import BridgeSettings
from services.engine_bridge.core import BridgeCore, Bucket, CoreConfig
from services.engine_bridge.engines import Engine, engine_name, make_engine
from services.engine_bridge.metrics import BridgeMetrics
from services.engine_bridge.model import EngineGap
from services.engine_bridge.state import StateStore


def core_config_from(settings: BridgeSettings) -> CoreConfig:
    """The core's configuration from the bridge settings."""
    return CoreConfig(
        portfolio_id=settings.portfolio_id,
        engine_name=engine_name(settings),
        symbols=tuple(symbol.upper() for symbol in settings.symbols),
        bucket_timeout_ms=settings.bucket_timeout_ms,
        extended_hours=settings.extended_hours,
        flatten_at_close=settings.flatten_at_close,
        broker=settings.broker,
        channels=settings.channels,
    )


class _Tick:
    """Timer message: release buckets whose wait timed out."""


TICK = _Tick()


class InputBatch(NamedTuple):
    """Records from the actor's own input consumer (posted: a restart drops what an earlier
    incarnation read and did not commit, and the new consumer delivers it again, in order)."""

    records: list[Record]


class BridgeActor(Actor[Any]):
    """Owns the core, the engine and the input consumer of one paper portfolio."""

    def __init__(
        self,
        settings: BridgeSettings,
        client: aioredis.Redis,
        publisher: Publisher,
        *,
        engine_factory: Callable[[], Engine] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
        tick_interval_s: float = 0.25,
    ) -> None:
        super().__init__(
            "engine_bridge.bridge", mailbox_size=16, overflow=Overflow.BLOCK, registry=registry
        )
        self.settings = settings
        self.client = client
        self.publisher = publisher
        self.clock = clock
        self.registry = registry
        self.config = core_config_from(settings)
        self.store = StateStore(client, publisher, settings.portfolio_id)
        self.dead_letters = DeadLetters(publisher, "engine_bridge", registry=registry, clock=clock)
        self.bridge_metrics = BridgeMetrics.for_registry(registry)
        self.engine_factory = engine_factory or (
            lambda: make_engine(
                settings,
                on_restart=self.bridge_metrics.engine_restarts.inc,
                on_timeout=self.bridge_metrics.engine_timeouts.inc,
                on_protocol_error=self.bridge_metrics.engine_protocol_errors.inc,
            )
        )
        self.core: BridgeCore | None = None
        self.engine: Engine | None = None
        self.consumer: SequencedConsumer | None = None
        self.last_gap_ms = 0
        self.restored = False
        self.minutes_done = 0
        self._unsaved_minute = False
        self.spawn(self._read_input, name="engine_bridge.input")
        self.every(tick_interval_s, self._tick, name="engine_bridge.tick")

    # -- heartbeat hooks ---------------------------------------------------------------------

    def lag_ms(self) -> int:
        """Now minus the end of the newest bar processed (0 before the first bar)."""
        core = self.core
        if core is None or not core.state.lastBarEndMs:
            return 0
        return max(0, self.clock.now_ms() - core.state.lastBarEndMs)

    def status(self) -> str:
        """``starting``, ``waiting`` (no bar yet), ``degraded`` (engine gap) or ``ok``."""
        core = self.core
        if core is None:
            return "starting"
        if core.state.gap is not None or (
            self.last_gap_ms
            and self.clock.now_ms() - self.last_gap_ms < self.settings.degraded_hold_ms
        ):
            return "degraded"
        if not core.state.lastBarEndMs:
            return "waiting"
        return "ok"

    # -- lifecycle ---------------------------------------------------------------------------

    async def on_start(self) -> None:
        self._unsaved_minute = False
        state = await self.store.load()
        self.core = BridgeCore(self.config, state)
        self.restored = state is not None
        engine = self.engine_factory()
        engine.restore(state.engine if state is not None else None)
        await engine.start(self.core.position_views())
        self.engine = engine
        settings = self.settings
        self.consumer = SequencedConsumer(
            self.client,
            settings.consumer_name or f"engine_bridge:{settings.portfolio_id}",
            [settings.bar_pattern],
            keys=self.publisher.keys,
            start=settings.input_start,
            registry=self.registry,
        )
        await self.consumer.open()
        broker = self.core.state.broker
        self.log.info(
            "bridge.started",
            restored=self.restored,
            engine=engine.name,
            portfolio=settings.portfolio_id,
            open_positions=sorted(broker.positions),
            cash=round(broker.cash, 2),
            last_minute=ts_et_minute(self.core.state.lastBucketMs)
            if self.core.state.lastBucketMs
            else None,
            pending_minutes=self.core.pending_minutes(),
        )

    async def on_stop(self) -> None:
        core, engine = self.core, self.engine
        try:
            # A minute not saved (the actor failed inside it or while publishing it) left
            # the core ahead of Redis: that state must not be saved. The gap then stays open
            # in Redis and is reported by the next incarnation.
            if (
                core is not None
                and not self._unsaved_minute
                and core.state.gap is not None
                and engine is not None
            ):
                records = core.close_gap(engine.restarts)
                await self.store.publish_and_save(records, core.snapshot(engine.snapshot()))
                self._count(records)
        except Exception as exc:  # shutting down: report, then stop the engine
            self.log.error("bridge.final_gap_report_failed", error=repr(exc))
        finally:
            if engine is not None:
                await engine.stop()
            if self.consumer is not None:
                await self.consumer.close()
            self.engine = None
            self.consumer = None

    async def _read_input(self) -> None:
        assert self.consumer is not None  # owned tasks start after on_start
        async for batch in self.consumer.batches():
            await self.post(InputBatch(batch))

    async def _tick(self) -> None:
        self.bridge_metrics.lag.set(self.lag_ms() / 1000.0)
        if self.core is not None and self.core.pending_minutes():
            self.tell_nowait(TICK)

    # -- work --------------------------------------------------------------------------------

    async def handle(self, message: Any) -> None:
        core = self.core
        assert core is not None
        now_ms = self.clock.now_ms()
        batch: list[Record] | None = None
        if isinstance(message, InputBatch):
            batch = message.records
        offered = await self._offer(core, batch, now_ms) if batch else False
        processed = await self._drain(core, now_ms)
        if offered and not processed:
            await self.store.save(core.snapshot(self._engine().snapshot()))
        self.bridge_metrics.pending.set(core.pending_minutes())
        if batch is not None and self.consumer is not None:
            await self.consumer.commit(batch)

    def _engine(self) -> Engine:
        assert self.engine is not None
        return self.engine

    async def _offer(self, core: BridgeCore, batch: list[Record], now_ms: int) -> bool:
        offered = False
        for record in batch:
            try:
                if record.seq < 0:
                    raise ValueError("record does not start with a seq field")
                bar = BAR_DECODER.decode(record.payload)
            except (msgspec.DecodeError, ValueError) as exc:
                self.bridge_metrics.bars.labels("undecodable").inc()
                await self.dead_letters.send(record.channel, str(exc), record.payload)
                continue
            outcome = core.offer(bar, now_ms)
            self.bridge_metrics.bars.labels(outcome).inc()
            offered = offered or outcome != "ignored"
        return offered

    async def _drain(self, core: BridgeCore, now_ms: int) -> int:
        processed = 0
        while (bucket := core.ready(now_ms)) is not None:
            await self._process(core, bucket)
            processed += 1
        return processed

    async def _process(self, core: BridgeCore, bucket: Bucket) -> None:
        engine = self._engine()
        started = time.perf_counter()
        self._unsaved_minute = True
        engine_input = core.begin(bucket)
        output, reason = await engine.decide(engine_input)
        records = core.finish(output, gap_reason=reason, engine_restarts=engine.restarts)
        await self.store.publish_and_save(records, core.snapshot(engine.snapshot()))
        self._unsaved_minute = False
        elapsed = time.perf_counter() - started
        self.minutes_done += 1
        release = "late" if bucket.late else "timed_out" if bucket.timedOut else "complete"
        self.bridge_metrics.buckets.labels(release).inc()
        self.bridge_metrics.minute_seconds.observe(elapsed)
        if output is None:
            self.bridge_metrics.gap_minutes.inc()
            self.last_gap_ms = self.clock.now_ms()
        signals, trades = self._count(records)
        for symbol, action, why in core.rejections:
            self.bridge_metrics.rejected.inc()
            self.log.warning(
                "bridge.order_rejected",
                symbol=symbol,
                action=action,
                reason=why,
                minute=engine_input.tsET,
            )
        portfolio = records[-1][1]
        self.log.info(
            "bridge.minute",
            minute=engine_input.tsET,
            bar_id=engine_input.barId,
            bars=len(bucket.bars),
            release=release,
            signals=signals,
            trades=trades,
            decided=output is not None,
            gap_reason=reason or None,
            equity=getattr(portfolio, "equity", None),
            open_positions=getattr(portfolio, "openPositions", None),
            ms=round(elapsed * 1000, 2),
        )

    def _count(self, records: list[tuple[str, msgspec.Struct]]) -> tuple[int, int]:
        signals = trades = 0
        for _, record in records:
            if isinstance(record, Signal):
                signals += 1
            elif isinstance(record, ExecutedTrade):
                trades += 1
            elif isinstance(record, EngineGap):
                self.bridge_metrics.gap_reports.inc()
                self.last_gap_ms = self.clock.now_ms()
                self.log.warning(
                    "bridge.engine_gap",
                    reason=record.reason,
                    from_minute=record.fromTsET,
                    to_minute=record.toTsET,
                    minutes=record.minutes,
                    restarts=record.restarts,
                    timeouts=record.timeouts,
                )
        self.bridge_metrics.signals.inc(signals)
        self.bridge_metrics.trades.inc(trades)
        return signals, trades
