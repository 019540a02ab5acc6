"""Structured logging: JSON lines for machines, colored lines on a terminal.

Request-scoped fields (request_id, adapter_id, shard) are bound with `structlog.contextvars`, so
every line logged while a request is handled carries them.
"""

from __future__ import annotations

import logging
import sys

import structlog

from router.config import LogFormat


def configure_logging(log_format: LogFormat, level: int = logging.INFO) -> None:
    """Sets up structlog for the process; AUTO means console on a TTY, JSON otherwise."""
    if log_format is LogFormat.AUTO:
        log_format = LogFormat.CONSOLE if sys.stderr.isatty() else LogFormat.JSON
    # The console renderer prints exceptions itself; JSON needs them flattened to a string.
    tail: list[structlog.typing.Processor] = (
        [structlog.dev.ConsoleRenderer()]
        if log_format is LogFormat.CONSOLE
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
