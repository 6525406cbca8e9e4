"""Logging: structlog configured once per process; JSON when not on a terminal.

The stdlib loggers of aiokafka, redis and websockets go through the same processors, so every
line of a service is one JSON object with ``service``, ``level``, ``event`` and ``timestamp``.
"""

from __future__ import annotations

import logging
import sys

import structlog

_NOISY = ("aiokafka", "kafka", "redis", "websockets", "asyncio")


def configure_logging(service: str, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and stdlib logging for ``service``.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console on a terminal, JSON otherwise).
    """
    level_number = logging.getLevelName(level.upper())
    if not isinstance(level_number, int):
        raise ValueError(f"unknown log level {level!r}")
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor
    if use_json:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_number)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(level_number, logging.WARNING))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
