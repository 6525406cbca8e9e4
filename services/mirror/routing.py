"""The routing table at work: a Redis channel's Kafka topic, key, schema and topic configs.

``RoutingTable.target(channel)`` resolves a channel once (the first matching route wins) and
caches the answer; ``Target.prepare(seq, payload)`` checks one record and returns its Kafka
key (or raises ``BadRecord``, which sends it to the dead-letter topic).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import msgspec

from libs.common.io.kafka_io import TopicSpec
from libs.common.schemas import DECODERS, RECORD_TYPES, TickBatch
from services.mirror.config import MirrorSettings, Route

SCHEMAS: dict[str, type[msgspec.Struct]] = {cls.__name__: cls for cls in RECORD_TYPES}


class BadRecord(ValueError):
    """A record that cannot be forwarded as it is (it goes to the dead-letter topic)."""


def channel_word(channel: str, index: int) -> str:
    """The ``index``-th dot-separated word of ``channel`` (``ticks.SPY``, 1 -> ``SPY``)."""
    words = channel.split(".")
    if index >= len(words):
        raise BadRecord(f"channel {channel!r} has no word {index}")
    return words[index]


def topic_configs(route: Route, settings: MirrorSettings) -> dict[str, str]:
    """A route's topic configs: the global ones, the cleanup policy, then the route's own."""
    policy = route.cleanup_policy
    if not settings.topic_compaction and "compact" in policy:
        policy = "delete"
    return {**settings.topic_configs, "cleanup.policy": policy, **route.configs}


@dataclass(slots=True)
class Target:
    """Where one channel's records go, and how each is checked and keyed."""

    channel: str
    route: Route
    topic: str
    spec: TopicSpec
    static_key: bytes | None
    key_field: str | None
    decoder: msgspec.json.Decoder[Any] | None
    counts_ticks: bool
    kind: str = field(default="")

    def prepare(self, payload: bytes) -> tuple[bytes | None, int]:
        """Check a record; returns its Kafka key and its number of ticks (0 if not ticks)."""
        ticks = 0
        record: Any = None
        if self.decoder is not None:
            try:
                record = self.decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise BadRecord(f"{self.route.schema}: {exc}") from None
            if self.counts_ticks:
                ticks = len(record.ticks)
        if self.key_field is None:
            return self.static_key, ticks
        value = getattr(record, self.key_field, None) if record is not None else None
        if value is None:
            try:
                value = _field_decoder(self.key_field).decode(payload).value
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise BadRecord(f"key field {self.key_field!r}: {exc}") from None
        if value is None or value == "":
            raise BadRecord(f"key field {self.key_field!r} is missing")
        return str(value).encode(), ticks


_FIELD_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {}


def _field_decoder(name: str) -> msgspec.json.Decoder[Any]:
    decoder = _FIELD_DECODERS.get(name)
    if decoder is None:
        struct = msgspec.defstruct(
            f"KeyField_{name}",
            [("value", str | int | float | None, None)],
            rename={"value": name},
        )
        decoder = _FIELD_DECODERS[name] = msgspec.json.Decoder(struct)
    return decoder


class RoutingTable:
    """Routes channels to topics; resolves each channel once."""

    def __init__(self, settings: MirrorSettings) -> None:
        self.settings = settings
        self.routes = settings.table()
        for route in self.routes:
            if route.schema and route.schema not in SCHEMAS:
                raise ValueError(
                    f"route {route.pattern}: unknown schema {route.schema!r} "
                    f"(known: {', '.join(sorted(SCHEMAS))})"
                )
            if not (
                route.key in ("channel", "none")
                or route.key.startswith("field:")
                or route.key.startswith("channel:")
            ):
                raise ValueError(
                    f"route {route.pattern}: key must be channel:<n>, "
                    f"field:<name>, channel or none, not {route.key!r}"
                )
        self._cache: dict[str, Target | None] = {}

    @property
    def patterns(self) -> list[str]:
        """The channel patterns to consume (in table order, without repeats)."""
        return list(dict.fromkeys(route.pattern for route in self.routes))

    def route_of(self, channel: str) -> Route | None:
        """The first route whose pattern matches ``channel``."""
        for route in self.routes:
            if fnmatch.fnmatchcase(channel, route.pattern):
                return route
        return None

    def topic_name(self, route: Route, channel: str) -> str:
        """The topic of ``channel`` under ``route`` and the topic mode."""
        template = route.topic
        if self.settings.topic_mode == "single" and route.single_topic:
            template = route.single_topic
        if "{symbol}" in template:
            template = template.replace("{symbol}", channel_word(channel, 1))
        return template.replace("{channel}", channel)

    def spec(self, route: Route, topic: str) -> TopicSpec:
        """The topic to create for ``route``."""
        return TopicSpec(
            name=topic,
            partitions=route.partitions,
            replication_factor=self.settings.topic_replication,
            configs=topic_configs(route, self.settings),
        )

    def target(self, channel: str) -> Target | None:
        """Where ``channel`` goes; None when no route matches (the channel is not mirrored)."""
        if channel in self._cache:
            return self._cache[channel]
        route = self.route_of(channel)
        target = None if route is None else self._build(route, channel)
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[channel] = target
        return target

    def _build(self, route: Route, channel: str) -> Target:
        topic = self.topic_name(route, channel)
        static_key: bytes | None = None
        key_field: str | None = None
        if route.key == "channel":
            static_key = channel.encode()
        elif route.key.startswith("channel:"):
            static_key = channel_word(channel, int(route.key.split(":", 1)[1])).encode()
        elif route.key.startswith("field:"):
            key_field = route.key.split(":", 1)[1]
        schema = SCHEMAS.get(route.schema) if route.schema and self.settings.validate else None
        return Target(
            channel=channel,
            route=route,
            topic=topic,
            spec=self.spec(route, topic),
            static_key=static_key,
            key_field=key_field,
            decoder=DECODERS[schema] if schema is not None else None,
            counts_ticks=schema is TickBatch,
            kind=channel.split(".", 1)[0],
        )

    def targets(self) -> list[Target]:
        """The targets resolved so far."""
        return [target for target in self._cache.values() if target is not None]

    def spec_for_deadletters(self) -> TopicSpec:
        """The dead-letter topic (keyed by source, delete), unless a route already makes it."""
        topic = self.settings.deadletter_topic
        route = self.route_of(topic) or Route(pattern=topic, topic=topic, key="field:source")
        return self.spec(route, topic)

    def static_specs(self) -> list[TopicSpec]:
        """Topics known without seeing a channel (no placeholder in their name)."""
        specs: dict[str, TopicSpec] = {}
        for route in self.routes:
            template = route.topic
            if self.settings.topic_mode == "single" and route.single_topic:
                template = route.single_topic
            if "{" not in template:
                specs[template] = self.spec(route, template)
            elif template == "{channel}" and not any(ch in route.pattern for ch in "*?["):
                specs[route.pattern] = self.spec(route, route.pattern)
        return list(specs.values())

    def describe(self) -> list[dict[str, Any]]:
        """The table as plain data, for ``python -m services.mirror routes``."""
        rows = []
        for route in self.routes:
            row = msgspec.to_builtins(route)
            row["configsInEffect"] = topic_configs(route, self.settings)
            row["topicInEffect"] = (
                route.single_topic
                if self.settings.topic_mode == "single" and route.single_topic
                else route.topic
            )
            rows.append(row)
        return rows
