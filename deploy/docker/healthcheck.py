"""Container HEALTHCHECK: GET the service's own /healthz; exit 0 when it answers 200.

    python /opt/tickmesh/healthcheck.py <service>

The port and bind address come from the service's settings class, parsed from the same
environment by the same loader the service uses, so ``INGEST_HTTP_PORT``,
``TICKMESH_HTTP_PORT`` and the code's default all resolve exactly as they do for the service.
"""

from __future__ import annotations

import http.client
import importlib
import sys
import urllib.request

from libs.common.runtime.settings import CommonSettings, load_settings

UNSPECIFIED = ("", "0.0.0.0", "::")


def settings_class(service: str) -> type[CommonSettings]:
    """The settings Struct of ``services.<service>.config``."""
    module = importlib.import_module(f"services.{service}.config")
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, CommonSettings)
            and value is not CommonSettings
            and value.__module__ == module.__name__
        ):
            return value
    raise LookupError(f"no settings class in services.{service}.config")


def main(service: str) -> int:
    settings = load_settings(settings_class(service))
    host = "127.0.0.1" if settings.http_host in UNSPECIFIED else settings.http_host
    if ":" in host:
        host = f"[{host}]"
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.http_port}/healthz", timeout=3) as r:
            return 0 if r.status == 200 else 1
    except (OSError, http.client.HTTPException) as exc:  # say why, in the health log
        print(f"unhealthy: {exc!r}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
