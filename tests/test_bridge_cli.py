"""The bridge's command line and settings: subcommands, every setting in --help, fail fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from libs.common.runtime.settings import SettingsError, SettingsGroup, env_name, load_settings
from services.engine_bridge.config import BridgeSettings

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.engine_bridge", *args],
        check=False,
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, **env},
    )


def every_variable(cls: type[BridgeSettings]) -> list[str]:
    """Every environment variable of ``cls``, groups included."""
    out = []
    for field in cls.__struct_fields__:
        value = getattr(cls(), field)
        if isinstance(value, SettingsGroup):
            out += [env_name(cls, f"{field}.{member}") for member in value.__struct_fields__]
        else:
            out.append(env_name(cls, field))
    return out


def test_help_lists_the_subcommands_and_every_setting() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "replay", "backtest"):
        assert command in result.stdout
    for name in every_variable(BridgeSettings):
        assert name in result.stdout, name
    for name in ("BRIDGE_SLIPPAGE_BPS", "BRIDGE_SIGNALS_CHANNEL", "BRIDGE_GOLDEN_FAST_WINDOW"):
        assert name in result.stdout, name  # grouped settings keep their flat variables
    assert "REPLAY_SPEED_MS" in result.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BRIDGE_ENGINE": "quantum"}, "BRIDGE_ENGINE"),
        ({"BRIDGE_STRATEGY": "astrology"}, "BRIDGE_STRATEGY"),
        ({"BRIDGE_GOLDEN_FAST_WINDOW": "30"}, "BRIDGE_GOLDEN_FAST_WINDOW"),
        ({"BRIDGE_ENGINE": "external"}, "BRIDGE_EXTERNAL_COMMAND"),
        ({"BRIDGE_ENGINE": "replay"}, "BRIDGE_REPLAY_RESULTS_PATH"),
        ({"BRIDGE_SIZING": "kelly"}, "BRIDGE_SIZING"),
    ],
)
def test_inconsistent_settings_fail_fast_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(BridgeSettings, env)


def test_a_bad_setting_exits_with_the_configuration_code() -> None:
    result = run_cli("run", BRIDGE_ENGINE="quantum")
    assert result.returncode == 78
    assert "BRIDGE_ENGINE" in result.stderr


def test_settings_parse_from_the_environment() -> None:
    settings = load_settings(
        BridgeSettings,
        {
            "BRIDGE_SYMBOLS": "SPY, IBM",
            "BRIDGE_STOP_PCT": "0.25",
            "BRIDGE_ALLOW_SHORT": "yes",
            "REPLAY_SPEED_MS": "0",
            "BRIDGE_EXTERNAL_COMMAND": "engine --fast",
        },
    )
    assert settings.symbols == ["SPY", "IBM"] and settings.broker.stop_pct == 0.25
    assert settings.broker.allow_short and settings.replay.speed_ms == 0
    assert settings.external.command == "engine --fast"


def test_backtest_prints_the_figures_of_a_bar_file(tmp_path: Path, shared_data: Path) -> None:
    from services.engine_bridge.datasets import write_bars_jsonl
    from tests.test_bridge_support import spy_day_bars

    bars_file = write_bars_jsonl(tmp_path / "bars.jsonl", spy_day_bars(shared_data))
    result = run_cli(
        "backtest",
        "--bars",
        str(bars_file),
        "--strategy",
        "golden_cross",
        "--export",
        str(tmp_path / "replay"),
        BRIDGE_SYMBOLS="SPY",
    )
    assert result.returncode == 0, result.stderr
    assert '"trades": 14' in result.stdout and '"pnl": -82.52' in result.stdout
    assert (tmp_path / "replay" / "results.json").exists()
    assert (tmp_path / "replay" / "trades.jsonl").read_text().count('"action"') == 14
