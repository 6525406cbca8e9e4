"""Settings: one frozen, typed settings Struct per service, parsed once from the environment.

A field ``grace_ms`` of a service whose prefix is ``BARS_`` is read from ``BARS_GRACE_MS``;
the settings every service shares (``CommonSettings``) fall back on ``TICKMESH_<NAME>`` so one
``.env`` can set them for the whole mesh. A field may name its own variable through
``ENV_NAMES`` (the Polygon key comes from ``POLYGON_API_KEY`` only). Descriptions live in
``Annotated[..., msgspec.Meta(description=...)]`` and feed ``--help``; a choice is a
``Literal[...]``, validated by msgspec and listed by ``--help``.

A service with many settings groups them (``SettingsGroup``: a nested Struct whose fields are
still read from flat variables, ``BRIDGE_SLIPPAGE_BPS`` for ``broker.slippage_bps``), so the
code that uses a group takes it whole. Rules between fields live in one place, the settings
class's ``check``, which runs on every construction and raises ``SettingsError`` naming the
variable.

Parsing fails fast with the variable's name. Secrets are ``Secret`` values: their repr and str
are masked, so a settings object can be logged whole.
"""

from __future__ import annotations

import functools
import os
import re
import uuid
from collections.abc import Mapping
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    NamedTuple,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)

import msgspec
from msgspec import Meta, Struct

from libs.common.runtime.loop import GC_GEN0_THRESHOLD, EventLoop


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


Mode = Literal["live", "sim", "replay"]
"""What a service reports in its heartbeats (CONTRACT.md's modes)."""
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
TopicMode = Literal["per-symbol", "single"]
"""How ticks sit on Kafka: ``ticks.<SYM>`` topics, or one topic keyed by symbol."""


class SettingsGroup(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Related settings kept together; each field ``f`` is read from the variable
    ``<service prefix><ENV_TEMPLATE with f>`` (upper case), or from ``ENV_NAMES[f]``."""

    ENV_TEMPLATE: ClassVar[str] = "{field}"
    ENV_NAMES: ClassVar[dict[str, str]] = {}


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
    log_level: Annotated[LogLevel, Meta(description="log level")] = "info"
    event_loop: Annotated[
        EventLoop, Meta(description="asyncio event loop (uvloop: less CPU per message)")
    ] = "uvloop"
    gc_gen0_threshold: Annotated[
        int,
        Meta(
            ge=0,
            description="allocations between young-generation garbage collections "
            "(0: Python's 700)",
        ),
    ] = GC_GEN0_THRESHOLD
    log_format: Annotated[
        LogFormat, Meta(description="log format (auto: JSON unless a terminal)")
    ] = "auto"
    run_id: Annotated[str, Meta(description="run id in heartbeats (random when empty)")] = ""
    mode: Annotated[Mode, Meta(description="heartbeat mode")] = "sim"
    heartbeat_interval_ms: Annotated[int, Meta(gt=0, description="heartbeat period")] = 5_000
    stream_maxlen: Annotated[int, Meta(gt=0, description="entries kept per Redis stream")] = 200_000
    key_prefix: Annotated[str, Meta(description="prefix of tickmesh's own Redis keys")] = "tm:"
    identity_horizon_s: Annotated[
        int,
        Meta(
            ge=0,
            description="ingest and the bar builders drop a trade sent again within this "
            "long (the feed's time) of its first copy, and forget identities older than 1.5 "
            "times it (0: keep the last two days). Backfills and re-reads check the tick "
            "streams instead; the daily report counts every duplicate of the day",
        ),
    ] = 30
    publish_channels_per_call: Annotated[
        int,
        Meta(
            ge=1,
            description="channels in one call of the Redis publish script, and bars in one "
            "call of the bar store's (1 on a Redis Cluster, where a call's keys must share a "
            "slot)",
        ),
    ] = 64
    kafka_enable_idempotence: Annotated[
        bool, Meta(description="idempotent Kafka producer (off for brokers without it)")
    ] = False
    kafka_session_timeout_ms: Annotated[int, Meta(gt=0, description="consumer group session")] = (
        6_000
    )
    kafka_heartbeat_interval_ms: Annotated[int, Meta(gt=0, description="group heartbeat")] = 500
    kafka_rebalance_timeout_ms: Annotated[int, Meta(gt=0, description="group rebalance")] = 6_000
    kafka_fetch_max_wait_ms: Annotated[int, Meta(gt=0, description="consumer fetch wait")] = 50
    topic_mode: Annotated[
        TopicMode,
        Meta(
            description="ticks on Kafka (written by the mirror, read by the shadow builder and "
            "the reconciler) and the shadow builder's bars: per-symbol (ticks.<SYM>, "
            "bars.<SYM>.1m topics) or single (sentio.ticks.v1, sentio.bars.v1: one topic each "
            "keyed by symbol, for thousands of symbols)"
        ),
    ] = "per-symbol"
    kafka_request_timeout_ms: Annotated[
        int,
        Meta(
            gt=0,
            description="Kafka call timeout (connect, TLS, each request); keep it above half "
            "the session timeout",
        ),
    ] = 30_000
    # -- Kafka security (every producer, consumer and admin client) -------------------------
    kafka_security_protocol: Annotated[
        KafkaSecurityProtocol, Meta(description="Kafka security protocol")
    ] = "PLAINTEXT"
    kafka_sasl_mechanism: Annotated[
        KafkaSaslMechanism, Meta(description="SASL mechanism (SASL_* protocols)")
    ] = "PLAIN"
    kafka_sasl_username: Annotated[str, Meta(description="SASL user (SASL_* protocols)")] = ""
    kafka_sasl_password: Annotated[Secret, Meta(description="SASL password (SASL_* protocols)")] = (
        Secret("")
    )
    kafka_ssl_cafile: Annotated[
        str, Meta(description="CA bundle that signs the brokers' certificates (empty: system)")
    ] = ""
    kafka_ssl_certfile: Annotated[
        str, Meta(description="client certificate (PEM) for mutual TLS; may hold the key too")
    ] = ""
    kafka_ssl_keyfile: Annotated[str, Meta(description="client private key (PEM)")] = ""
    kafka_ssl_key_password: Annotated[
        Secret, Meta(description="password of the client private key, if encrypted")
    ] = Secret("")
    kafka_ssl_check_hostname: Annotated[
        bool, Meta(description="check the broker certificate's name against its address")
    ] = True
    # -- Redis connections (TLS with a rediss:// URL; ACL user) -----------------------------
    redis_username: Annotated[str, Meta(description="Redis ACL user (empty: default user)")] = ""
    redis_password: Annotated[
        Secret, Meta(description="Redis password (never in TICKMESH_REDIS_URL)")
    ] = Secret("")
    redis_ssl_cafile: Annotated[
        str, Meta(description="CA bundle that signs Redis's certificate (rediss://)")
    ] = ""
    redis_ssl_certfile: Annotated[
        str, Meta(description="client certificate (PEM) for Redis mutual TLS")
    ] = ""
    redis_ssl_keyfile: Annotated[str, Meta(description="client private key (PEM) for Redis")] = ""
    redis_ssl_check_hostname: Annotated[
        bool, Meta(description="check Redis's certificate name against its host")
    ] = True
    redis_socket_timeout_s: Annotated[
        float, Meta(gt=0, description="Redis reply timeout: a stalled server is a retriable error")
    ] = 5.0
    redis_connect_timeout_s: Annotated[
        float, Meta(gt=0, description="Redis connect and TLS handshake timeout")
    ] = 5.0
    max_restarts: Annotated[int, Meta(ge=0, description="supervisor restart budget")] = 5
    restart_window_s: Annotated[float, Meta(gt=0, description="restart budget window")] = 60.0
    stop_deadline_s: Annotated[float, Meta(gt=0, description="drain deadline at shutdown")] = 10.0

    def __post_init__(self) -> None:
        self._check_connections()
        self.check()

    def check(self) -> None:
        """The rules between fields that types cannot state; raise ``self.invalid(...)``.
        Runs on every construction (loading, ``msgspec.structs.replace``, tests)."""

    def _check_connections(self) -> None:
        """The connection settings every service shares: consistent, and no secret in a URL
        (a URL is logged; a password goes in its own ``Secret`` setting)."""
        scheme, _, rest = self.redis_url.partition("://")
        if scheme not in ("redis", "rediss", "unix"):
            raise self.invalid("redis_url", f"scheme {scheme!r}: use redis://, rediss:// (TLS)")
        if ":" in rest.partition("/")[0].rpartition("@")[0]:
            raise self.invalid(
                "redis_url",
                "holds a password: put the user in "
                f"{env_name(type(self), 'redis_username')} and the password in "
                f"{env_name(type(self), 'redis_password')} instead",
            )
        if scheme != "rediss":
            for field in ("redis_ssl_cafile", "redis_ssl_certfile", "redis_ssl_keyfile"):
                if getattr(self, field):
                    raise self.invalid(field, "set, but the Redis URL is not rediss:// (TLS)")
        if bool(self.redis_ssl_keyfile) and not self.redis_ssl_certfile:
            raise self.invalid("redis_ssl_certfile", "a client key needs its certificate")
        protocol = self.kafka_security_protocol
        if "SSL" not in protocol:
            for field in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
                if getattr(self, field):
                    raise self.invalid(field, f"set, but the security protocol is {protocol}")
        if bool(self.kafka_ssl_keyfile) and not self.kafka_ssl_certfile:
            raise self.invalid("kafka_ssl_certfile", "a client key needs its certificate")
        if protocol.startswith("SASL"):
            if not self.kafka_sasl_username:
                raise self.invalid("kafka_sasl_username", f"required with {protocol}")
            if not self.kafka_sasl_password:
                raise self.invalid("kafka_sasl_password", f"required with {protocol}")

    @classmethod
    def invalid(cls, field: str, message: str) -> SettingsError:
        """The error for a bad ``field`` (``group.field`` inside a group), naming its
        variable."""
        return SettingsError(f"{env_name(cls, field)}: {message}")

    @property
    def identity_horizon_ms(self) -> int:
        """``identity_horizon_s`` in milliseconds, as ``TradeIds`` takes it."""
        return self.identity_horizon_s * 1000

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
_OWN_ERROR = re.compile(r"^[A-Z][A-Z0-9_]*[:=]")
_ERROR_PATH = re.compile(r"`\$\.([\w.]+)[^`]*`")


def _group_of(cls: type[Struct], field: str) -> type[SettingsGroup] | None:
    field_type = _field_type(cls, field)
    if isinstance(field_type, type) and issubclass(field_type, SettingsGroup):
        return field_type
    return None


def env_name(cls: type[CommonSettings], field: str) -> str:
    """The environment variable that sets ``field`` of ``cls`` (``group.field`` in a group)."""
    head, _, sub = field.partition(".")
    group = _group_of(cls, head) if sub else None
    if group is not None:
        if sub in group.ENV_NAMES:
            return group.ENV_NAMES[sub]
        return f"{cls.ENV_PREFIX}{group.ENV_TEMPLATE.format(field=sub).upper()}"
    return cls.ENV_NAMES.get(field, f"{cls.ENV_PREFIX}{field.upper()}")


class SettingInfo(NamedTuple):
    """One setting of a settings class, as ``--help``, ``deploy/.env`` and tests see it."""

    path: str
    """The field's name, or ``group.field`` inside a group."""
    variable: str
    type: Any
    """The field's type (without ``Annotated``)."""
    default: Any
    """The default value (``msgspec.NODEFAULT`` when the setting is required)."""
    description: str


def _default(info: msgspec.structs.FieldInfo) -> Any:
    if info.default is not msgspec.NODEFAULT:
        return info.default
    if info.default_factory is not msgspec.NODEFAULT:
        return info.default_factory()
    return msgspec.NODEFAULT


def settings_info(cls: type[CommonSettings]) -> list[SettingInfo]:
    """Every setting of ``cls`` in declaration order, group members in place of their group."""
    out: list[SettingInfo] = []
    for info in msgspec.structs.fields(cls):
        group = _group_of(cls, info.name)
        owner: type[Struct] = cls if group is None else group
        members = (
            [(info.name, info)]
            if group is None
            else [
                (f"{info.name}.{member.name}", member) for member in msgspec.structs.fields(group)
            ]
        )
        for path, member in members:
            leaf = member.name
            out.append(
                SettingInfo(
                    path,
                    env_name(cls, path),
                    _field_type(owner, leaf),
                    _default(member),
                    _description(owner, leaf),
                )
            )
    return out


def setting_paths(cls: type[CommonSettings]) -> list[str]:
    """Every setting of ``cls``: a field's name, or ``group.field`` inside a group."""
    return [info.path for info in settings_info(cls)]


@functools.cache
def _hints(cls: type[Struct]) -> dict[str, Any]:
    """The resolved annotations of ``cls``, once per class (``--help`` and loading ask for
    every field, and resolving them is slow)."""
    return get_type_hints(cls, include_extras=True)


def _field_type(cls: type[Struct], field: str) -> Any:
    hint = _hints(cls)[field]
    if get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    return hint


def _description(cls: type[Struct], field: str) -> str:
    hint = _hints(cls)[field]
    for meta in get_args(hint)[1:] if get_origin(hint) is Annotated else ():
        if isinstance(meta, Meta) and meta.description:
            return meta.description
    return ""


def _is_text(field_type: Any) -> bool:
    return field_type is str or get_origin(field_type) is Literal


def _parse_value(raw: str, field_type: Any) -> Any:
    if field_type is Secret:
        return Secret(raw)
    if get_origin(field_type) in (list, tuple) and _is_text(get_args(field_type)[0]):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if field_type is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if field_type in (str, int, float) or get_origin(field_type) is Literal:
        return raw
    return msgspec.json.decode(raw)


def _dec_hook(field_type: type, value: Any) -> Any:
    if field_type is Secret:
        if isinstance(value, Secret):
            return value
        return Secret(str(value))
    raise NotImplementedError(f"no conversion to {field_type}")


def _read(
    cls: type[CommonSettings], environ: Mapping[str, str], field: str, owner: type[Struct]
) -> tuple[bool, Any]:
    """(found, value) of one field of ``owner`` (the settings class or one of its groups)."""
    name = env_name(cls, field)
    raw = environ.get(name)
    leaf = field.rpartition(".")[2]
    if raw is None and owner is cls and leaf in _COMMON_FIELDS and leaf not in cls.ENV_NAMES:
        raw = environ.get(f"{CommonSettings.ENV_PREFIX}{leaf.upper()}")
    if raw is None:
        return False, None
    try:
        return True, _parse_value(raw, _field_type(owner, leaf))
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def load_settings(cls: type[SettingsT], environ: Mapping[str, str] | None = None) -> SettingsT:
    """Parse ``cls`` from the environment, failing fast with the variable's name."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in cls.__struct_fields__:
        group = _group_of(cls, field)
        if group is None:
            found, value = _read(cls, environ, field, cls)
            if found:
                values[field] = value
            continue
        members: dict[str, Any] = {}
        for member in group.__struct_fields__:
            found, value = _read(cls, environ, f"{field}.{member}", group)
            if found:
                members[member] = value
        if members:
            values[field] = members
    try:
        return msgspec.convert(values, cls, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if _OWN_ERROR.match(message):  # raised by a ``check``: it names its variable
            raise SettingsError(message.split(" - at ")[0]) from None
        path = _ERROR_PATH.search(message)
        if path is not None:
            field = path.group(1)
            head, _, sub = field.partition(".")
            owner: type[Struct] = _group_of(cls, head) or cls if sub else cls
            leaf = sub or head
            if leaf in owner.__struct_fields__:
                secret = _field_type(owner, leaf) is Secret
                shown = values.get(head, {}).get(sub) if sub else values.get(head)
                raise SettingsError(
                    f"{env_name(cls, field)}={'<secret>' if secret else shown!r}: "
                    f"{message.split(' - at ')[0]}"
                ) from None
        raise SettingsError(f"{cls.__name__}: {message}") from None


def _type_name(field_type: Any) -> str:
    if get_origin(field_type) is Literal:
        return "|".join(str(choice) for choice in get_args(field_type))
    if field_type is Secret:
        return "secret"
    if get_origin(field_type) is list:
        return "list"
    return getattr(field_type, "__name__", str(field_type))


def describe_settings(cls: type[CommonSettings]) -> str:
    """A help text listing every setting: variable, type, default, description."""
    lines = [f"settings (environment variables; shared ones also as {CommonSettings.ENV_PREFIX}*):"]
    for info in settings_info(cls):
        if info.default is msgspec.NODEFAULT:
            shown = "(required)"
        elif isinstance(info.default, Secret):
            shown = "(secret)"
        else:
            shown = f"default {info.default!r}"
        lines.append(
            f"  {info.variable:<40} {_type_name(info.type):<8} {shown:<28} {info.description}"
        )
    return "\n".join(lines)


def _public(value: Any) -> Any:
    if isinstance(value, Secret):
        return repr(value)
    if isinstance(value, SettingsGroup):
        return {field: _public(getattr(value, field)) for field in value.__struct_fields__}
    return value


def public_view(settings: CommonSettings) -> dict[str, Any]:
    """The settings as a dict safe to log (secrets masked by their repr)."""
    return {field: _public(getattr(settings, field)) for field in settings.__struct_fields__}
