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
    """Builds, counts and logs dead letters; sends them to the Redis dead-letter channel
    (mirrored to Kafka), or hands the encoded letter to a caller that writes it elsewhere
    (the mirror writes its own to the Kafka dead-letter topic)."""

    def __init__(
        self,
        publisher: Publisher | None,
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

    def letter(self, source: str, error: str, raw: bytes, *, seq: int = 0) -> bytes:
        """Count and log one bad input and return its encoded dead letter."""
        self.counter.labels(self.service, names.channel_kind(source)).inc()
        log.warning("deadletter.sent", source=source, error=error[:300], size=len(raw))
        return ENCODER.encode(
            DeadLetter(
                seq=seq,
                source=source,
                error=error[:2_000],
                raw=raw,
                tsMs=self.clock.now_ms(),
                service=self.service,
            )
        )

    def records(self, source: str, bad: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """The dead-letter records of ``(error, raw)`` inputs, for a caller that publishes
        them in the same round trip (and retry) as its good records."""
        return [(self.channel, self.letter(source, error, raw)) for error, raw in bad]

    async def send(self, source: str, error: str, raw: bytes) -> None:
        """Record one bad input; processing goes on."""
        if self.publisher is None:
            raise RuntimeError("these dead letters have no publisher: use letter()")
        await self.publisher.publish_many(self.records(source, [(error, raw)]))
