"""structlog setup: JSON lines (or console on a TTY), request context merged,
secrets redacted.  Configured only by the CLI, never on import."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import orjson
import structlog

SECRET_FIELDS = {"api_key", "authorization", "secret", "key", "x-api-key", "x-goog-api-key", "password", "token"}
# anything that looks like one of our keys or a provider key
_SECRET_RE = re.compile(r"(cp-[A-Za-z0-9_\-]{8,}|sk-[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,})")
_known: set[str] = set()


def add_secret(value: str | None) -> None:
    """Register a value (an upstream api_key) that must never appear in a log line."""
    if value and len(value) >= 6:
        _known.add(value)


def _scrub_str(s: str) -> str:
    for k in _known:
        if k in s:
            s = s.replace(k, "[redacted]")
    return _SECRET_RE.sub("[redacted]", s)


def redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for k, v in list(event_dict.items()):
        if k.lower() in SECRET_FIELDS:
            event_dict[k] = "[redacted]"
        elif isinstance(v, str):
            event_dict[k] = _scrub_str(v)
    return event_dict


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure(level: str = "info", fmt: str = "auto") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    processors.append(structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer(serializer=_dumps))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
