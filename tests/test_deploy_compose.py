"""deploy/ agrees with the code: every setting set, ports, health checks, scrapes, images.

Fast and offline: parses deploy/compose.yaml, deploy/.env, the Dockerfiles, the Prometheus and
Grafana files, and compares them with the settings classes the services parse (read from the
code, so a setting added to a service without a value in deploy/.env fails here; fix with
``.venv/bin/python deploy/tools/sync_env.py``).
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: pip install -e .[test]")

from libs.common.runtime.settings import (
    CommonSettings,
    Secret,
    SettingsError,
    env_name,
    load_settings,
    setting_paths,
    settings_info,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
HEALTHCHECK = ["CMD", "python", "/opt/tickmesh/healthcheck.py"]
SHARED_PREFIX = CommonSettings.ENV_PREFIX
METRIC_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info")


def _load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync_env = _load_tool("sync_env")


# --- reading deploy/ ---------------------------------------------------------------------------


@cache
def env_file() -> dict[str, str]:
    return sync_env.read_env(DEPLOY / ".env")


REQUIRED_AT_DEPLOY: set[str] = set()
"""Variables compose refuses to start without and deploy/.env does not set."""

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` against deploy/.env."""

    def replace(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        value = env_file().get(name)
        if operator in (":-", "-") and (value is None or (operator == ":-" and value == "")):
            return argument
        if operator in (":?", "?") and (value is None or (operator == ":?" and value == "")):
            # required from the environment of `docker compose` (passwords, never in .env)
            REQUIRED_AT_DEPLOY.add(name)
            return f"<{name} from the environment>"
        assert value is not None, f"compose.yaml uses ${{{name}}} but deploy/.env does not set it"
        return value

    return _INTERPOLATION.sub(replace, text.replace("$$", "\0")).replace("\0", "$")


def interpolated(value: Any) -> Any:
    if isinstance(value, str):
        return interpolate(value)
    if isinstance(value, list):
        return [interpolated(item) for item in value]
    if isinstance(value, dict):
        return {key: interpolated(item) for key, item in value.items()}
    return value


@cache
def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return interpolated(document)


def compose_services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def service_names() -> list[str]:
    return sync_env.service_names()


def settings_class(service: str) -> type[CommonSettings]:
    return sync_env.settings_class(service)


def image_of(service: str) -> str:
    env = env_file()
    return f"{env['TICKMESH_IMAGE_PREFIX']}{service}:{env['TICKMESH_IMAGE_TAG']}"


def containers_of(service: str) -> dict[str, dict[str, Any]]:
    """Compose services that run ``service``: its image, its entrypoint, the ``run`` command."""
    return {
        name: spec
        for name, spec in compose_services().items()
        if spec.get("image") == image_of(service)
        and "entrypoint" not in spec
        and spec.get("command", ["run"])[:1] == ["run"]
    }


def environment_of(spec: dict[str, Any]) -> dict[str, str]:
    """What a container's process sees: its env_files, then its ``environment``."""
    env: dict[str, str] = {}
    files = spec.get("env_file", [])
    for item in [files] if isinstance(files, (str, dict)) else files:
        path = item["path"] if isinstance(item, dict) else item
        env.update(sync_env.read_env(DEPLOY / path))
    environment = spec.get("environment", {})
    if isinstance(environment, list):
        environment = dict(entry.split("=", 1) for entry in environment)
    env.update({key: "" if value is None else str(value) for key, value in environment.items()})
    return env


def field_is_set(cls: type[CommonSettings], field: str, env: dict[str, str]) -> bool:
    if env_name(cls, field) in env:
        return True
    shared = field in CommonSettings.__struct_fields__ and field not in cls.ENV_NAMES
    return shared and f"{SHARED_PREFIX}{field.upper()}" in env


def dockerfile(service: str) -> Path:
    return DEPLOY / "docker" / f"{service}.Dockerfile"


def exec_form(instruction: str, path: Path) -> list[str]:
    """The JSON array of the last ``instruction`` (exec form, e.g. ``ENTRYPOINT [...]``)."""
    found = [args for op, args in dockerfile_instructions(path) if op == instruction]
    assert found, f"no {instruction} in {path.name}"
    match = re.search(r"(\[.*\])\s*$", found[-1])
    assert match, f"{instruction} is not in exec form: {found[-1]}"
    return json.loads(match.group(1))


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
        ),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in joined.splitlines())
        if line
    ]


def source_metric_names() -> set[str]:
    names: set[str] = set()
    for path in [*ROOT.glob("libs/**/*.py"), *ROOT.glob("services/**/*.py")]:
        names.update(re.findall(r"[\"'](tickmesh_[a-z0-9_]+)[\"']", path.read_text()))
    return names


def metric_base(name: str) -> str:
    for suffix in METRIC_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- the checks --------------------------------------------------------------------------------


def test_config_module_holds_the_settings_class_the_service_cli_parses() -> None:
    for service in service_names():
        main = importlib.import_module(f"services.{service}.__main__")
        assert main.CLI.settings_cls is settings_class(service), service


def test_env_file_sets_every_setting_of_every_service() -> None:
    missing = {
        service: [
            env_name(cls, field)
            for field in setting_paths(cls)
            if not field_is_set(cls, field, env_file())
        ]
        for service in service_names()
        for cls in [settings_class(service)]
    }
    missing = {service: names for service, names in missing.items() if names}
    assert not missing, (
        f"deploy/.env lacks settings the services read: {missing}; "
        "run `.venv/bin/python deploy/tools/sync_env.py`"
    )


def test_env_file_holds_no_variable_that_nothing_reads() -> None:
    classes = [settings_class(service) for service in service_names()]
    read = {env_name(cls, field) for cls in classes for field in setting_paths(cls)}
    read |= {f"{SHARED_PREFIX}{field.upper()}" for field in CommonSettings.__struct_fields__}
    prefixes = {SHARED_PREFIX, *(cls.ENV_PREFIX for cls in classes)}
    names = set(env_file())
    unread = sorted(
        name
        for name in names - read - set(sync_env.COMPOSE_ONLY)
        if name.startswith(tuple(prefixes))
        or name in {alias for cls in classes for alias in cls.ENV_NAMES.values()}
    )
    assert not unread, f"deploy/.env sets variables no service reads: {unread}"
    assert sync_env.main(["--check"]) == 0, "deploy/.env is out of step with sync_env.py"


def test_env_file_holds_the_code_defaults_but_for_the_compose_values() -> None:
    """sync_env keeps the values the file has, so a default changed in the code stays behind
    in the file (and in every deployment of it) unless the file is changed with it."""
    env = env_file()
    kept = set(sync_env.COMPOSE_VALUES) | {
        alias for service in service_names() for alias in settings_class(service).ENV_NAMES.values()
    }
    behind = {}
    for service in service_names():
        cls = settings_class(service)
        from_file = msgspec.structs.asdict(load_settings(cls, env))
        defaults = msgspec.structs.asdict(
            load_settings(cls, {name: value for name, value in env.items() if name in kept})
        )
        changed = sorted(field for field in from_file if from_file[field] != defaults[field])
        if changed:
            behind[service] = changed
    assert not behind, (
        f"deploy/.env holds values other than the code's defaults: {behind}; set them to the "
        "defaults, or list them in sync_env.COMPOSE_VALUES if compose needs them"
    )


def test_every_service_runs_in_compose_and_parses_its_environment() -> None:
    for service in service_names():
        containers = containers_of(service)
        assert containers, f"compose.yaml runs no container of {service} ({image_of(service)})"
        cls = settings_class(service)
        for name, spec in containers.items():
            env = environment_of(spec)
            unset = [
                env_name(cls, field)
                for field in setting_paths(cls)
                if not field_is_set(cls, field, env)
            ]
            assert not unset, f"{name}: not set: {unset}"
            try:
                load_settings(cls, env)
            except SettingsError as exc:
                pytest.fail(f"{name}: {service} would refuse to start: {exc}")


def test_ports_healthchecks_and_scrape_targets_match_each_service_http_port() -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: {
            target for config in job.get("static_configs", []) for target in config["targets"]
        }
        for job in scrape["scrape_configs"]
    }
    for service in service_names():
        cls = settings_class(service)
        for name, spec in containers_of(service).items():
            settings = load_settings(cls, environment_of(spec))
            port = settings.http_port
            health = spec.get("healthcheck", {}).get("test")
            assert health == [*HEALTHCHECK, service], f"{name}: healthcheck {health}"
            for mapping in spec.get("ports", []):
                container_port = int(str(mapping).rsplit(":", 1)[-1].split("/")[0])
                assert container_port == port, f"{name}: publishes {mapping}, serves {port}"
            assert f"{name}:{port}" in targets.get(service, set()), (
                f"prometheus.yml: job {service} does not scrape {name}:{port}"
            )
            assert settings.http_host in ("0.0.0.0", "::"), f"{name}: binds {settings.http_host}"


def test_secrets_reach_only_the_services_that_read_them() -> None:
    classes = {service: settings_class(service) for service in service_names()}
    secrets = {
        info.variable
        for cls in classes.values()
        for info in settings_info(cls)
        if info.type is Secret
    }
    assert secrets, "expected at least the Polygon key"
    for service, cls in classes.items():
        own = {env_name(cls, field) for field in cls.__struct_fields__}
        for name, spec in containers_of(service).items():
            env = environment_of(spec)
            leaked = sorted(s for s in secrets - own if env.get(s))
            assert not leaked, f"{name} gets {leaked} it does not read; blank them in compose"


def test_each_service_has_a_dockerfile_that_compose_builds() -> None:
    for service in service_names():
        path = dockerfile(service)
        assert path.is_file(), f"no {path.relative_to(ROOT)}"
        builders = [spec for spec in containers_of(service).values() if "build" in spec]
        assert builders, f"compose.yaml has no build for {service}"
        for spec in builders:
            assert Path(DEPLOY / spec["build"]["context"]).resolve() == ROOT, "context = repo root"
            assert spec["build"]["dockerfile"] == str(path.relative_to(ROOT))


@pytest.mark.parametrize("service", service_names())
def test_dockerfile_is_multi_stage_non_root_with_exec_form_healthcheck(service: str) -> None:
    path = dockerfile(service)
    instructions = dockerfile_instructions(path)
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    runtime = instructions[stages[-1] :]
    build = instructions[stages[0] : stages[-1]]
    installs = [args for op, args in build if op == "RUN" and "pip install" in args]
    assert any(re.search(r"pip install\b.*\s\.(\s|$)", args) for args in installs), (
        "the build stage installs the package from the repo root (pip install .)"
    )
    copies = [args for op, args in runtime if op == "COPY"]
    assert copies and all(args.startswith("--from=") for args in copies), (
        f"the runtime stage copies only from the build stage, never the sources: {copies}"
    )
    users = [args.split(":")[0] for op, args in runtime if op == "USER"]
    assert users and users[-1] not in ("0", "root"), "runs as a non-root user"
    health = [args for op, args in runtime if op == "HEALTHCHECK"]
    assert health and re.search(r"\bCMD\s*\[", health[-1]), "HEALTHCHECK CMD in exec form"
    assert exec_form("HEALTHCHECK", path) == [*HEALTHCHECK[1:], service]
    assert exec_form("ENTRYPOINT", path) == ["python", "-m", f"services.{service}"]
    assert exec_form("CMD", path) == ["run"]
    default_port = settings_class(service)().http_port
    assert [args for op, args in runtime if op == "EXPOSE"] == [str(default_port)]


def test_dockerignore_lets_in_everything_the_dockerfiles_copy() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for service in service_names():
        for op, args in dockerfile_instructions(dockerfile(service)):
            if op != "COPY" or args.startswith("--from="):
                continue
            *sources, _destination = shlex.split(args)
            for source in sources:
                source = source.rstrip("/")
                assert (ROOT / source).exists(), f"{service}: COPY {source} does not exist"
                assert any(source == a or source.startswith(f"{a}/") for a in allowed), (
                    f".dockerignore keeps {source} (COPY in {service}.Dockerfile) out"
                )


def test_image_pins_agree_with_pyproject() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    unpinned = []
    for text in project["dependencies"]:
        requirement = Requirement(text)
        pinned = pins.get(requirement.name.lower().replace("_", "-"))
        if pinned is None:
            unpinned.append(requirement.name)
        else:
            assert requirement.specifier.contains(pinned, prereleases=True), (
                f"deploy/constraints.txt pins {requirement.name}=={pinned}, pyproject wants "
                f"{requirement.specifier}: the image build would fail; regenerate the pins"
            )
    if unpinned:
        warnings.warn(
            f"image build resolves {unpinned} unpinned; regenerate "
            "deploy/constraints.txt (deploy/tools/constraints.py)",
            stacklevel=1,
        )


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "tickmesh.json").read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_and_alerts_query_only_metrics_the_code_defines() -> None:
    defined = source_metric_names()
    queries = [
        target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])
    ]
    assert queries, "the dashboard has no queries"
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    queries += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    used = {name for query in queries for name in re.findall(r"\btickmesh_[a-z0-9_]+", query)}
    unknown = sorted(
        name for name in used if name not in defined and metric_base(name) not in defined
    )
    assert not unknown, f"queries name metrics no code defines: {unknown}"


def test_dashboard_covers_the_operating_signals_and_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    titles = " | ".join(panel.get("title", "").lower() for panel in dashboard_panels())
    for topic in (
        "feed lag",
        "ticks/s",
        "bars per minute",
        "mirror lag",
        "dead letters",
        "parity",
        "actor restarts",
    ):
        assert topic in titles, f"no dashboard panel about {topic!r}"
    for panel in dashboard_panels():
        if panel.get("targets"):
            assert panel["datasource"]["uid"] == uid, panel.get("title")
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "tickmesh.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    mounts = compose_services()["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts


def test_compose_mounts_the_prometheus_config_it_checks() -> None:
    mounts = compose_services()["prometheus"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in mounts
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rule_file in scrape.get("rule_files", []):
        assert (DEPLOY / "prometheus" / Path(rule_file).name).is_file(), rule_file


def test_every_alert_points_at_a_runbook_section_that_exists() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in runbook.splitlines()
        if line.startswith("## ")
    }
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in (rule for group in alerts["groups"] for rule in group["rules"]):
        link = rule["annotations"]["runbook"]
        path, _, anchor = link.partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, f"{rule['alert']}: {link}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_passwords_are_required_at_deploy_and_none_is_committed() -> None:
    compose()
    assert REQUIRED_AT_DEPLOY == {
        "GRAFANA_ADMIN_PASSWORD",
        "REDIS_PASSWORD_INGEST",
        "REDIS_PASSWORD_BARS",
        "REDIS_PASSWORD_ENGINE_BRIDGE",
        "REDIS_PASSWORD_MIRROR",
        "REDIS_PASSWORD_DASHBOARD",
    }
    committed = {
        name: value
        for name, value in env_file().items()
        if ("PASSWORD" in name or name == "POLYGON_API_KEY") and value
    }
    # the simulator's built-in local key is the only credential-like value in the repository
    assert committed == {"POLYGON_API_KEY": "tickmesh-sim"}, committed


def test_each_service_reaches_redis_as_its_own_acl_user() -> None:
    acl = (DEPLOY / "redis" / "users.acl.in").read_text()
    users = {line.split()[1] for line in acl.splitlines() if line.startswith("user ")}
    assert "user default off" in acl
    seen = set()
    for service in service_names():
        cls = settings_class(service)
        for name, spec in containers_of(service).items():
            settings = load_settings(cls, environment_of(spec))
            assert settings.redis_username in users, f"{name}: {settings.redis_username!r}"
            assert settings.redis_password, f"{name} has no Redis password"
            seen.add(settings.redis_username)
            assert spec.get("read_only") is True and "/tmp" in spec.get("tmpfs", []), name
    assert seen == users - {"default", "healthcheck"}


def test_redis_start_renders_each_user_with_its_password_and_refuses_a_missing_one(
    tmp_path: Path,
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "redis-server").write_text('#!/bin/sh\necho "redis-server $*"\n')
    (fake / "redis-server").chmod(0o755)
    rendered = tmp_path / "run" / "users.acl"
    env = {
        "PATH": f"{fake}:/usr/bin:/bin",
        "TICKMESH_ACL_TEMPLATE": str(DEPLOY / "redis" / "users.acl.in"),
        "TICKMESH_ACL_FILE": str(rendered),
        "REDIS_PASSWORD_INGEST": "pw-ingest",
        "REDIS_PASSWORD_BARS": "pw-bars",
        "REDIS_PASSWORD_ENGINE_BRIDGE": "pw-bridge",
    }
    script = str(DEPLOY / "redis" / "start.sh")
    missing = subprocess.run(
        ["sh", script], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert missing.returncode == 78 and "REDIS_PASSWORD_MIRROR" in missing.stderr
    env["REDIS_PASSWORD_MIRROR"] = "pw-mirror"
    env["REDIS_PASSWORD_DASHBOARD"] = "pw-dashboard"
    started = subprocess.run(
        ["sh", script, "--appendonly", "yes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    assert f"--aclfile {rendered} --appendonly yes" in started.stdout
    lines = rendered.read_text().splitlines()
    assert "user default off" in lines
    assert any(line.startswith("user healthcheck on nopass") for line in lines)
    for user, password in [("ingest", "pw-ingest"), ("mirror", "pw-mirror")]:
        line = next(line for line in lines if line.startswith(f"user {user} "))
        assert line.endswith(f" >{password}")
    assert oct(rendered.stat().st_mode & 0o777) == "0o600"
