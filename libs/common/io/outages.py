"""Which dependency an error says is unavailable: an outage to ride out, not a failure.

A Redis restart, a broker pause or restart make a component's calls fail with connection and
timeout errors. Those are not the component's fault and a restart budget must not count them:
the supervisor (``runtime.supervisor``) waits for the dependency with backoff, logs and
measures the outage, and starts the component again, which resumes from its committed
positions. ``dependency_of`` is the classifier every service's supervisor uses.
"""

from __future__ import annotations

from aiokafka.errors import KafkaConnectionError, KafkaError
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_REDIS = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)


def dependency_of(error: BaseException) -> str | None:
    """``redis`` or ``kafka`` when ``error`` (or what caused it) says that dependency is
    unreachable; None for any other error (a bug, bad data: a real failure)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _REDIS):
            return "redis"
        if isinstance(current, KafkaConnectionError) or (
            isinstance(current, KafkaError) and getattr(current, "retriable", False)
        ):
            return "kafka"
        if isinstance(current, ConnectionError) and "Kafka" in str(current):
            return "kafka"  # kafka_io's "could not start" wraps the client's error
        if isinstance(current, ConnectionError) and "Redis" in str(current):
            return "redis"
        current = current.__cause__ or current.__context__
    return None
