"""The heartbeat every service sends on ``sentio.heartbeat.v1``."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from libs.common import names
from libs.common.io.redis_io import Publisher
from libs.common.market.sessions import ts_et
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component
from libs.common.runtime.settings import Mode
from libs.common.schemas import Heartbeat


class HeartbeatSender(Component):
    """Publishes a heartbeat every ``interval_ms`` with the service's status and lag."""

    def __init__(
        self,
        service: str,
        run_id: str,
        mode: Mode,
        publisher: Publisher,
        *,
        interval_ms: int,
        lag_ms: Callable[[], int] = lambda: 0,
        status: Callable[[], str] = lambda: "ok",
        channel: str = names.HEARTBEAT,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(f"{service}.heartbeat", registry=registry)
        self.service = service
        self.run_id = run_id
        self.mode = mode
        self.publisher = publisher
        self.channel = channel
        self.lag_ms = lag_ms
        self.status = status
        self.clock = clock
        self.sent = 0
        self.every(interval_ms / 1000.0, self.beat, name=f"{service}.heartbeat.timer")

    async def on_start(self) -> None:
        await self.beat()

    async def beat(self) -> None:
        """Publish one heartbeat now."""
        now = self.clock.now_ms()
        await self.publisher.publish(
            self.channel,
            Heartbeat(
                seq=0,
                runId=self.run_id,
                service=self.service,
                tsET=ts_et(now),
                mode=self.mode,
                status=self.status(),
                lagMs=int(self.lag_ms()),
                tsMs=now,
            ),
        )
        self.sent += 1
