"""Metric families built once per Prometheus registry.

Each service injects its own ``CollectorRegistry`` (tests inject a fresh one); a family of
metrics must be created once per registry, or prometheus-client refuses the duplicate names.
Instances are kept per registry object (weakly), never by ``id()``, which a new registry can
reuse once an old one is gone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry

MetricsT = TypeVar("MetricsT")

_INSTANCES: weakref.WeakKeyDictionary[CollectorRegistry, dict[Any, Any]] = (
    weakref.WeakKeyDictionary()
)


def metrics_for(
    factory: Callable[[CollectorRegistry], MetricsT], registry: CollectorRegistry | None
) -> MetricsT:
    """``factory(registry)``, created the first time and the same object afterwards."""
    registry = registry if registry is not None else REGISTRY
    instances = _INSTANCES.setdefault(registry, {})
    instance = instances.get(factory)
    if instance is None:
        instance = factory(registry)
        instances[factory] = instance
    return instance
