"""structlog set up the way its performance notes advise: a filtering bound logger, cached on first use.

Console rendering for people by default, one JSON object per line for machines. Per-packet events are
counters in the cores and transports, never log lines; what is logged here is state changes an operator
acts on (TM down/up, reloads, start/stop).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(format: str = "console", level: str = "info") -> None:
    """Configure structlog process-wide; `format` is "console" or "json", `level` a name from LEVELS."""
    if format not in ("console", "json"):
        raise ValueError(f"log format must be console or json, not {format!r}")
    renderers: list[Any]
    if format == "json":
        renderers = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # The console renderer formats exceptions itself (format_exc_info before it would flatten them).
        renderers = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level.lower(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
