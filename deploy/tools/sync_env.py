"""Keep ``deploy/.env`` in step with the services' settings classes.

    .venv/bin/python deploy/tools/sync_env.py          # rewrite deploy/.env
    .venv/bin/python deploy/tools/sync_env.py --check  # exit 1 if .env lacks or has stale settings

``deploy/.env`` holds every setting every service reads, so ``deploy/compose.yaml`` can hand
it to each container whole. Values already in the file are kept; a setting new in the code is
added with the code's default (or the compose value below, where the single-host stack needs a
different one); a variable no service reads any more is dropped and named on stderr.

The settings classes are read from the code: the one settings Struct of each
``services/<name>/config.py`` (tests/test_deploy_compose.py checks it is the class the
service's CLI parses).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, get_args, get_origin

import msgspec

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from libs.common.runtime.settings import CommonSettings, Secret, SettingInfo, settings_info

ENV_FILE = ROOT / "deploy" / ".env"

# Where the single-host stack needs something other than the code's default (first sync only;
# afterwards the value in .env wins).
COMPOSE_VALUES: dict[str, str] = {
    "TICKMESH_REDIS_URL": "redis://redis:6379/0",
    "TICKMESH_KAFKA_BOOTSTRAP": "kafka:9092",
    "TICKMESH_LOG_FORMAT": "json",
    "TICKMESH_KAFKA_ENABLE_IDEMPOTENCE": "true",
    "TICKMESH_KAFKA_SESSION_TIMEOUT_MS": "10000",
    "TICKMESH_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "TICKMESH_KAFKA_REBALANCE_TIMEOUT_MS": "10000",
    # The `sim` profile's simulator and its built-in local key (not a secret); see
    # docs/runbook.md "Go live" for the real feed.
    "INGEST_POLYGON_URL": "ws://simulator:8765",
    # Trades, and the vendor's minute bars for the reconciler's vendor check.
    "INGEST_EVENT_TYPES": "T,AM",
    "POLYGON_API_KEY": "tickmesh-sim",
    # In its container the dashboard listens on every address; compose publishes it on the
    # host's loopback only.
    "DASHBOARD_HTTP_HOST": "0.0.0.0",
}

# Variables compose itself reads (interpolation), not the services.
COMPOSE_ONLY: dict[str, tuple[str, str]] = {
    "COMPOSE_PROFILES": ("sim", "sim starts the Polygon simulator; empty for the live feed"),
    "TICKMESH_IMAGE_PREFIX": ("localhost/tickmesh-", "image name prefix of the four services"),
    "TICKMESH_IMAGE_TAG": ("latest", "image tag of the four services"),
    "TICKMESH_BASE_IMAGE": (
        "localhost/tickmesh-python:bookworm",
        (
            "base of `docker compose build` (docker.io/library/python:3.11-slim-bookworm with "
            "Docker Hub)"
        ),
    ),
}


def service_names() -> list[str]:
    """Every service package that can be run (``services/<name>/__main__.py``)."""
    return sorted(
        path.parent.name
        for path in (ROOT / "services").glob("*/__main__.py")
        if not path.parent.name.startswith("_")
    )


def settings_class(service: str) -> type[CommonSettings]:
    """The settings Struct defined in ``services.<service>.config``."""
    module = importlib.import_module(f"services.{service}.config")
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, CommonSettings)
        and value.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise LookupError(f"services.{service}.config defines {len(found)} settings classes")
    return found[0]


def settings_classes() -> dict[str, type[CommonSettings]]:
    """Service name -> its settings class."""
    return {name: settings_class(name) for name in service_names()}


def env_text(info: SettingInfo) -> str:
    """A default as the variable's text, in the form ``load_settings`` parses back to it."""
    field_type, value = info.type, info.default
    if value is msgspec.NODEFAULT or field_type is Secret:
        return ""
    if field_type is bool:
        return "true" if value else "false"
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    if isinstance(value, (str, int, float)):
        return str(value)
    return msgspec.json.encode(value).decode()  # everything else is parsed as JSON


def described(info: SettingInfo) -> str:
    """The description, with the choices of a ``Literal`` setting."""
    if get_origin(info.type) is Literal:
        return f"{info.description}: {', '.join(str(c) for c in get_args(info.type))}"
    return info.description


class Entry(msgspec.Struct, frozen=True):
    """One variable of the file: its name, the code's default text and its description."""

    name: str
    default: str
    description: str


def sections(classes: dict[str, type[CommonSettings]]) -> Iterator[tuple[str, list[Entry]]]:
    """The file's sections: shared settings, then each service's own."""
    common = {info.path: info for info in settings_info(CommonSettings)}
    own = {name: {info.path: info for info in settings_info(cls)} for name, cls in classes.items()}
    shared = [
        Entry(info.variable, env_text(info), described(info))
        for path, info in common.items()
        # A shared setting every service overrides (http_port) is set per service instead.
        if not all(
            own[name][path].default != info.default or path in cls.ENV_NAMES
            for name, cls in classes.items()
        )
    ]
    yield "shared by every service (a service's own prefix overrides one for that service)", shared
    for name, cls in classes.items():
        entries = []
        for path, info in own[name].items():
            shared_field = path in common and path not in cls.ENV_NAMES
            if shared_field and info.default == common[path].default:
                continue
            entries.append(Entry(info.variable, env_text(info), described(info)))
        yield f"{name} ({cls.ENV_PREFIX}*)", entries


def read_env(path: Path = ENV_FILE) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        if not sep:
            raise ValueError(f"{path}:{number}: not KEY=VALUE: {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


HEADER = """\
# Every setting of every tickmesh service, for deploy/compose.yaml (which gives this file to
# each service container as env_file, and reads it for ${...} interpolation).
#
# Kept in step with the code by `.venv/bin/python deploy/tools/sync_env.py` (values set here
# are kept; settings new in the code are added with their default; stale ones are dropped).
# Shared settings are TICKMESH_*; INGEST_*, BARS_*, BRIDGE_*, MIRROR_*, DASHBOARD_* override one
# service.
# Each comment gives the code's default, so a changed value stands out.
#
# Secrets: POLYGON_API_KEY and DASHBOARD_TOKEN. Compose blanks each for every service but its
# own. Do not commit a real key or token: put it in the environment of `docker compose` or in
# a copy of this file outside the repository (`docker compose --env-file /etc/tickmesh/prod.env ...`).
#
# Passwords are never in this file (it reaches every container): compose refuses to start
# until the environment of `docker compose` sets REDIS_PASSWORD_INGEST, REDIS_PASSWORD_BARS,
# REDIS_PASSWORD_ENGINE_BRIDGE, REDIS_PASSWORD_MIRROR, REDIS_PASSWORD_DASHBOARD (each service's
# Redis ACL user) and GRAFANA_ADMIN_PASSWORD; each service gets only its own (docs/deploy.md,
# "Security").
"""


def render(classes: dict[str, type[CommonSettings]], current: dict[str, str]) -> str:
    """The new file text: ``current`` values kept, defaults for the rest."""
    lines = [HEADER]
    for title, entries in sections(classes):
        lines.append(f"\n## {title}\n")
        for entry in entries:
            value = current.get(entry.name, COMPOSE_VALUES.get(entry.name, entry.default))
            shown = entry.default if entry.default else "empty"
            lines.append(f"# {entry.description} [default: {shown}]\n{entry.name}={value}\n")
    lines.append("\n## compose only (read by deploy/compose.yaml, not by the services)\n")
    for name, (default, text) in COMPOSE_ONLY.items():
        lines.append(f"# {text}\n{name}={current.get(name, default)}\n")
    return "".join(lines)


def expected_names(classes: dict[str, type[CommonSettings]]) -> set[str]:
    """Every variable the file should hold."""
    names = {entry.name for _, entries in sections(classes) for entry in entries}
    return names | set(COMPOSE_ONLY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if out of step")
    parser.add_argument("--env-file", type=Path, default=ENV_FILE)
    args = parser.parse_args(argv)
    classes = settings_classes()
    current = read_env(args.env_file)
    wanted = expected_names(classes)
    missing = sorted(wanted - set(current))
    stale = sorted(set(current) - wanted)
    for name in missing:
        print(f"sync_env: {'missing' if args.check else 'adding'} {name}", file=sys.stderr)
    for name in stale:
        print(
            f"sync_env: {'stale' if args.check else 'dropping'} {name} (nothing reads it)",
            file=sys.stderr,
        )
    if args.check:
        return 1 if missing or stale else 0
    args.env_file.write_text(render(classes, current))
    print(f"sync_env: wrote {args.env_file} ({len(wanted)} variables)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
