"""Running a service: logging, metrics registry, HTTP endpoint, signals, supervision, exit code.

``ServiceRuntime`` is what every ``services/<name>/__main__.py`` builds: it owns the process's
Prometheus registry (injected into every actor and metric), the HTTP endpoint, and the root
supervisor. A signal only sets the stop event; the supervisor then stops its children in
reverse order, each draining within the deadline. Past the restart budget the process exits
with ``EXIT_RESTART_BUDGET`` and one clear log line.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Generic

import structlog
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Info as InfoMetric

from libs.common.runtime.http import HealthServer
from libs.common.runtime.logs import configure_logging
from libs.common.runtime.loop import run_on_loop, tune_gc
from libs.common.runtime.settings import SettingsError, SettingsT, public_view
from libs.common.runtime.supervisor import RestartBudgetExceeded, Supervisor

log = structlog.get_logger("tickmesh.service")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_RESTART_BUDGET = 70
EXIT_CONFIG = 78


class ServiceRuntime(Generic[SettingsT]):
    """The process-wide pieces of one service, typed by its settings class."""

    def __init__(self, service: str, settings: SettingsT) -> None:
        self.service = service
        self.settings = settings
        self.registry = CollectorRegistry()
        self.http = HealthServer(self.registry, settings.http_host, settings.http_port)
        self.supervisor = Supervisor(
            service,
            max_restarts=settings.max_restarts,
            window_s=settings.restart_window_s,
            stop_deadline_s=settings.stop_deadline_s,
            registry=self.registry,
        )
        self._cleanups: list[Callable[[], Awaitable[None]]] = []
        info = InfoMetric("tickmesh_service", "Service identity", registry=self.registry)
        info.info(
            {"service": service, "run_id": settings.effective_run_id(), "mode": settings.mode}
        )
        self.up = Gauge("tickmesh_up", "1 while the service runs", registry=self.registry)
        self.exit_code = EXIT_OK

    def on_cleanup(self, function: Callable[[], Awaitable[None]]) -> None:
        """Run ``function`` after the actors stopped (close clients, last flush)."""
        self._cleanups.append(function)

    async def run(self) -> int:
        """Serve until a signal or a give-up; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        await self.http.start()
        self.up.set(1)
        log.info("service.starting", settings=public_view(self.settings))
        code = EXIT_OK
        try:
            await self.supervisor.run()
            code = self.exit_code
        except SettingsError as exc:
            self.http.healthy = False
            log.critical("service.bad_setting", reason=str(exc), exit_code=EXIT_CONFIG)
            code = EXIT_CONFIG
        except RestartBudgetExceeded as exc:
            self.http.healthy = False
            log.critical("service.giving_up", reason=str(exc), exit_code=EXIT_RESTART_BUDGET)
            code = EXIT_RESTART_BUDGET
        except Exception as exc:
            self.http.healthy = False
            log.critical("service.crashed", error=repr(exc), exc_info=exc)
            code = EXIT_FAILED
        finally:
            self.up.set(0)
            for cleanup in reversed(self._cleanups):
                try:
                    await cleanup()
                except Exception as exc:
                    log.error("service.cleanup_failed", error=repr(exc))
            await self.http.stop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("service.stopped", exit_code=code)
        return code

    def fail(self, reason: str, exit_code: int = EXIT_FAILED) -> None:
        """Stop the whole service with ``exit_code`` (a fatal condition a restart cannot fix)."""
        log.critical("service.fatal", reason=reason, exit_code=exit_code)
        self.http.healthy = False
        self.exit_code = exit_code
        self.supervisor.stop()

    def _on_signal(self, signum: int) -> None:
        log.info("service.signal", signal=signal.Signals(signum).name)
        self.supervisor.stop()


def run_main(
    service: str,
    settings: SettingsT,
    build: Callable[[ServiceRuntime[SettingsT]], Awaitable[None]],
) -> int:
    """Configure logging, build the actors with ``build`` and serve; returns the exit code."""
    configure_logging(service, settings.log_level, settings.log_format)
    tune_gc(settings.gc_gen0_threshold)

    async def main() -> int:
        runtime: ServiceRuntime[SettingsT] = ServiceRuntime(service, settings)
        try:
            await build(runtime)
        except SettingsError as exc:
            # one line naming the variable, no traceback: the operator fixes a setting
            log.critical("service.bad_setting", reason=str(exc), exit_code=EXIT_CONFIG)
            for cleanup in reversed(runtime._cleanups):
                await cleanup()
            return EXIT_CONFIG
        except Exception as exc:
            log.critical("service.build_failed", error=repr(exc), exc_info=exc)
            for cleanup in reversed(runtime._cleanups):
                await cleanup()
            return EXIT_FAILED
        return await runtime.run()

    try:
        return run_on_loop(main(), settings.event_loop)
    except KeyboardInterrupt:
        return EXIT_OK
