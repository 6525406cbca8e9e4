"""Dead letters: what fails to decode or validate, with its raw bytes, error and origin."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from prometheus_client import CollectorRegistry, Counter

from libs.common import names
from libs.common.io.redis_io import Publisher
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.metrics import metrics_for
from libs.common.schemas import ENCODER, DeadLetter

log = structlog.get_logger("tickmesh.deadletter")


def _dead_letter_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "tickmesh_dead_letters",
        "Records sent to the dead-letter stream",
        ["service", "source_kind"],
        registry=registry,
    )


def dead_letter_counter(registry: CollectorRegistry | None) -> Counter:
    """``tickmesh_dead_letters_total{service,source_kind}``, created once per registry."""
    return metrics_for(_dead_letter_counter, registry)


class DeadLetters:
    """Sends dead letters to the Redis dead-letter channel (mirrored to Kafka) and counts."""

    def __init__(
        self,
        publisher: Publisher,
        service: str,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
        channel: str = names.DEAD_LETTERS,
    ) -> None:
        self.publisher = publisher
        self.service = service
        self.clock = clock
        self.channel = channel
        self.counter = dead_letter_counter(registry)

    def records(self, source: str, bad: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Count and log ``(error, raw)`` inputs and return their dead-letter records, for a
        caller that publishes them in the same round trip (and retry) as its good records."""
        kind = source.split(".", 1)[0]
        self.counter.labels(self.service, kind).inc(len(bad))
        now = self.clock.now_ms()
        out = []
        for error, raw in bad:
            log.warning("deadletter.sent", source=source, error=error[:300], size=len(raw))
            letter = DeadLetter(
                seq=0, source=source, error=error[:2_000], raw=raw, tsMs=now, service=self.service
            )
            out.append((self.channel, ENCODER.encode(letter)))
        return out

    async def send(self, source: str, error: str, raw: bytes) -> None:
        """Record one bad input; processing goes on."""
        await self.publisher.publish_many(self.records(source, [(error, raw)]))
