"""Settings: one frozen, typed settings Struct per service, parsed once from the environment.

A field ``grace_ms`` of a service whose prefix is ``BARS_`` is read from ``BARS_GRACE_MS``;
the settings every service shares (``CommonSettings``) fall back on ``TICKMESH_<NAME>`` so one
``.env`` can set them for the whole mesh. A field may name its own variable through
``ENV_NAMES`` (the Polygon key comes from ``POLYGON_API_KEY`` only). Descriptions live in
``Annotated[..., msgspec.Meta(description=...)]`` and feed ``--help``.

Parsing fails fast with the variable's name. Secrets are ``Secret`` values: their repr and str
are masked, so a settings object can be logged whole.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

import msgspec
from msgspec import Meta, Struct


class Secret:
    """A secret string; never shown by repr, str or format. Use ``reveal()`` to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> Any:
        raise TypeError("secrets are not pickled")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class CommonSettings(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Settings every service has (variables fall back on ``TICKMESH_<NAME>``)."""

    ENV_PREFIX: ClassVar[str] = "TICKMESH_"
    ENV_NAMES: ClassVar[dict[str, str]] = {}
    SERVICE: ClassVar[str] = "common"

    redis_url: Annotated[str, Meta(description="Redis URL")] = "redis://127.0.0.1:6379/0"
    kafka_bootstrap: Annotated[
        str, Meta(description="Kafka bootstrap servers, comma separated")
    ] = "127.0.0.1:9092"
    http_host: Annotated[str, Meta(description="bind address of /metrics /healthz /readyz")] = (
        "0.0.0.0"
    )
    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the HTTP endpoint")] = 9100
    log_level: Annotated[str, Meta(description="debug, info, warning or error")] = "info"
    log_format: Annotated[
        str, Meta(description="auto (JSON unless a terminal), json or console")
    ] = "auto"
    run_id: Annotated[str, Meta(description="run id in heartbeats (random when empty)")] = ""
    mode: Annotated[str, Meta(description="live, sim or replay (heartbeat mode)")] = "sim"
    heartbeat_interval_ms: Annotated[int, Meta(gt=0, description="heartbeat period")] = 5_000
    stream_maxlen: Annotated[int, Meta(gt=0, description="entries kept per Redis stream")] = 200_000
    key_prefix: Annotated[str, Meta(description="prefix of tickmesh's own Redis keys")] = "tm:"
    kafka_enable_idempotence: Annotated[
        bool, Meta(description="idempotent Kafka producer (off for brokers without it)")
    ] = False
    kafka_session_timeout_ms: Annotated[int, Meta(gt=0, description="consumer group session")] = (
        6_000
    )
    kafka_heartbeat_interval_ms: Annotated[int, Meta(gt=0, description="group heartbeat")] = 500
    kafka_rebalance_timeout_ms: Annotated[int, Meta(gt=0, description="group rebalance")] = 6_000
    kafka_fetch_max_wait_ms: Annotated[int, Meta(gt=0, description="consumer fetch wait")] = 50
    max_restarts: Annotated[int, Meta(ge=0, description="supervisor restart budget")] = 5
    restart_window_s: Annotated[float, Meta(gt=0, description="restart budget window")] = 60.0
    stop_deadline_s: Annotated[float, Meta(gt=0, description="drain deadline at shutdown")] = 10.0

    def effective_run_id(self) -> str:
        """``run_id`` or a random one, fixed for the life of this process."""
        if self.run_id:
            return self.run_id
        global _RANDOM_RUN_ID
        if _RANDOM_RUN_ID is None:
            _RANDOM_RUN_ID = uuid.uuid4().hex[:12]
        return _RANDOM_RUN_ID


_RANDOM_RUN_ID: str | None = None

SettingsT = TypeVar("SettingsT", bound=CommonSettings)
_COMMON_FIELDS = frozenset(CommonSettings.__struct_fields__)


def env_name(cls: type[CommonSettings], field: str) -> str:
    """The environment variable that sets ``field`` of ``cls``."""
    return cls.ENV_NAMES.get(field, f"{cls.ENV_PREFIX}{field.upper()}")


def _field_type(cls: type[Struct], field: str) -> Any:
    hint = get_type_hints(cls, include_extras=True)[field]
    if get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    return hint


def _description(cls: type[Struct], field: str) -> str:
    hint = get_type_hints(cls, include_extras=True)[field]
    for meta in get_args(hint)[1:] if get_origin(hint) is Annotated else ():
        if isinstance(meta, Meta) and meta.description:
            return meta.description
    return ""


def _parse_value(raw: str, field_type: Any) -> Any:
    if field_type is Secret:
        return Secret(raw)
    if field_type in (tuple[str, ...], list[str]):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if field_type is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if field_type in (str, int, float):
        return raw
    return msgspec.json.decode(raw)


def _dec_hook(field_type: type, value: Any) -> Any:
    if field_type is Secret:
        if isinstance(value, Secret):
            return value
        return Secret(str(value))
    raise NotImplementedError(f"no conversion to {field_type}")


def load_settings(cls: type[SettingsT], environ: Mapping[str, str] | None = None) -> SettingsT:
    """Parse ``cls`` from the environment, failing fast with the variable's name."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in cls.__struct_fields__:
        name = env_name(cls, field)
        raw = environ.get(name)
        if raw is None and field in _COMMON_FIELDS and field not in cls.ENV_NAMES:
            raw = environ.get(f"{CommonSettings.ENV_PREFIX}{field.upper()}")
        if raw is None:
            continue
        field_type = _field_type(cls, field)
        try:
            values[field] = _parse_value(raw, field_type)
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}") from None
    try:
        return msgspec.convert(values, cls, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        message = str(exc)
        for field in cls.__struct_fields__:
            if f"`$.{field}`" in message:
                shown = "<secret>" if _field_type(cls, field) is Secret else values.get(field)
                raise SettingsError(
                    f"{env_name(cls, field)}={shown!r}: {message.split(' - at ')[0]}"
                ) from None
        raise SettingsError(f"{cls.__name__}: {message}") from None


def describe_settings(cls: type[CommonSettings]) -> str:
    """A help text listing every setting: variable, type, default, description."""
    offset = len(cls.__struct_fields__) - len(cls.__struct_defaults__)
    defaults = {
        field: cls.__struct_defaults__[index - offset]
        for index, field in enumerate(cls.__struct_fields__)
        if index >= offset
    }
    lines = [f"settings (environment variables; shared ones also as {CommonSettings.ENV_PREFIX}*):"]
    for field in cls.__struct_fields__:
        field_type = _field_type(cls, field)
        type_name = getattr(field_type, "__name__", str(field_type))
        if field in defaults:
            default = defaults[field]
            if isinstance(default, msgspec._core.Factory):
                default = default.factory()
            if default is msgspec.NODEFAULT:
                shown = "(required)"
            elif isinstance(default, Secret):
                shown = "(secret)"
            else:
                shown = f"default {default!r}"
        else:
            shown = "(required)"
        lines.append(
            f"  {env_name(cls, field):<40} {type_name:<8} {shown:<28} {_description(cls, field)}"
        )
    return "\n".join(lines)


def public_view(settings: CommonSettings) -> dict[str, Any]:
    """The settings as a dict safe to log (secrets masked by their repr)."""
    return {
        field: repr(value) if isinstance(value, Secret) else value
        for field, value in ((f, getattr(settings, f)) for f in settings.__struct_fields__)
    }
