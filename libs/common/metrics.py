"""Metric families built once per Prometheus registry.

Each service injects its own ``CollectorRegistry`` (tests inject a fresh one); a family of
metrics must be created once per registry, or prometheus-client refuses the duplicate names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry

MetricsT = TypeVar("MetricsT")

_INSTANCES: dict[tuple[Any, int], Any] = {}


def metrics_for(factory: Callable[[CollectorRegistry], MetricsT],
                registry: CollectorRegistry | None) -> MetricsT:
    """``factory(registry)``, created the first time and the same object afterwards."""
    registry = registry if registry is not None else REGISTRY
    key = (factory, id(registry))
    instance = _INSTANCES.get(key)
    if instance is None:
        instance = factory(registry)
        _INSTANCES[key] = instance
    return instance  # type: ignore[no-any-return]
