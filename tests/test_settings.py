"""Settings: typed, frozen, from the environment, failing fast with the variable's name."""

from __future__ import annotations

from typing import Annotated, ClassVar

import pytest
from msgspec import Meta

from libs.common.runtime.settings import (
    CommonSettings,
    Secret,
    SettingsError,
    describe_settings,
    load_settings,
    public_view,
)


class DemoSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    ENV_PREFIX: ClassVar[str] = "DEMO_"
    ENV_NAMES: ClassVar[dict[str, str]] = {"api_key": "POLYGON_API_KEY"}

    api_key: Annotated[Secret, Meta(description="the key")] = Secret("")
    symbols: Annotated[list[str], Meta(description="symbols")] = []  # noqa: RUF012 - msgspec copies it
    grace_ms: Annotated[int, Meta(ge=0, description="grace")] = 2_000


def test_values_come_from_prefixed_variables_with_shared_fallback() -> None:
    settings = load_settings(
        DemoSettings,
        {
            "DEMO_GRACE_MS": "500",
            "DEMO_SYMBOLS": "SPY, IBM",
            "TICKMESH_REDIS_URL": "redis://h:1/0",
            "DEMO_HTTP_PORT": "9200",
        },
    )
    assert settings.grace_ms == 500 and settings.symbols == ["SPY", "IBM"]
    assert settings.redis_url == "redis://h:1/0" and settings.http_port == 9200


def test_prefixed_variable_wins_over_the_shared_one() -> None:
    settings = load_settings(DemoSettings, {"TICKMESH_MODE": "live", "DEMO_MODE": "replay"})
    assert settings.mode == "replay"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEMO_GRACE_MS", "soon"),
        ("DEMO_GRACE_MS", "-1"),
        ("DEMO_KAFKA_ENABLE_IDEMPOTENCE", "maybe"),
    ],
)
def test_malformed_values_fail_fast_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings(DemoSettings, {name: value})


def test_settings_are_frozen() -> None:
    settings = load_settings(DemoSettings, {})
    with pytest.raises(AttributeError):
        settings.grace_ms = 1  # type: ignore[misc]


def test_secret_never_shows_in_repr_str_format_or_public_view() -> None:
    settings = load_settings(DemoSettings, {"POLYGON_API_KEY": "sk-very-secret"})
    assert settings.api_key.reveal() == "sk-very-secret"
    for text in (
        repr(settings),
        str(settings),
        f"{settings.api_key}",
        str(public_view(settings)),
        describe_settings(DemoSettings),
    ):
        assert "sk-very-secret" not in text


def test_secret_comes_from_its_own_variable_only() -> None:
    settings = load_settings(DemoSettings, {"DEMO_API_KEY": "wrong-place"})
    assert not settings.api_key


def test_help_lists_every_variable() -> None:
    text = describe_settings(DemoSettings)
    for name in ("POLYGON_API_KEY", "DEMO_GRACE_MS", "DEMO_REDIS_URL", "DEMO_SYMBOLS"):
        assert name in text
