"""structlog configured once per process.

Every line carries the service name, plus ``correlation_id`` and ``message_type`` while a
message is being handled (bound through contextvars by the consumer wrapper).
"""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["bind_message_context", "configure_logging", "get_logger"]


def configure_logging(service: str, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger for ``service``."""
    use_json = (not sys.stdout.isatty()) if json is None else json
    lvl = getattr(logging, level.upper())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info if use_json else structlog.dev.set_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=max(lvl, logging.INFO), stream=sys.stderr, force=True)
    # Library chatter (aiormq reconnects, pymongo heartbeats) stays at warning.
    for noisy in ("aiormq", "aio_pika", "pymongo", "docker", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger; ``name`` ends up as the ``logger`` key."""
    return structlog.get_logger(name) if name is None else structlog.get_logger(logger=name)


def bind_message_context(*, correlation_id: str | None, message_type: str, message_id: str) -> None:
    """Bind the ids of the message being handled to every log line of this task."""
    structlog.contextvars.bind_contextvars(
        correlation_id=correlation_id, message_type=message_type, message_id=message_id
    )
