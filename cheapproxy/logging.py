"""structlog setup: JSON lines (or console on a TTY), the request id merged,
secrets redacted.  Configured only by the CLI, never on import.

Every billed request writes one line, so the JSON path is built for speed
(structlog's own performance advice): orjson renders straight to bytes for a
``BytesLogger``, the request id comes from one ContextVar (binding and clearing
structlog's per-key context vars copies the whole context on every request),
and the secret scan skips fields whose values the gateway itself produces.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import datetime
import logging
import re
import sys
from typing import Any

import orjson
import structlog

# the request being served by the current task (set by the pipeline)
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("cheapproxy_request_id", default=None)

SECRET_FIELDS = {"api_key", "authorization", "secret", "key", "x-api-key", "x-goog-api-key", "password", "token"}
# anything that looks like one of our keys or a provider key
_SECRET_RE = re.compile(r"(cp-[A-Za-z0-9_\-]{8,}|sk-[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,})")
_known: set[str] = set()
# values the gateway produces itself (names from its own config, numbers, enums):
# never a client's text, so never scanned
SAFE_FIELDS = frozenset({"event", "level", "timestamp", "request_id", "key_id", "model", "upstream", "protocol",
                         "stream", "status", "outcome", "attempts", "latency_ms", "logger"})


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
    for k, v in event_dict.items():
        if k in SAFE_FIELDS:
            continue
        if k.lower() in SECRET_FIELDS:
            event_dict[k] = "[redacted]"
        elif isinstance(v, str):
            event_dict[k] = _scrub_str(v)
    return event_dict


def add_request_id(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    rid = REQUEST_ID.get()
    if rid is not None:
        event_dict.setdefault("request_id", rid)
    return event_dict


def _dumps(obj: Any, **_: Any) -> bytes:
    return orjson.dumps(obj, default=str)


class LineWriter:
    """structlog's logger for JSON lines: the lines logged during one event
    loop iteration leave in one write (a write per line was a syscall on every
    request).  Warnings and worse, lines logged outside a running loop, and
    whatever is pending at exit are written at once."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._pending: list[bytes] = []
        self._scheduled = False
        atexit.register(self.flush)

    def msg(self, message: bytes) -> None:
        self._pending.append(message)
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop in this thread: write now
            self.flush()
            return
        self._scheduled = True

    def urgent(self, message: bytes) -> None:
        self._pending.append(message)
        self.flush()

    debug = info = log = msg
    warning = warn = error = err = exception = critical = fatal = failure = urgent

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        lines.append(b"")
        try:
            self._file.write(b"\n".join(lines))
            self._file.flush()
        except (OSError, ValueError):  # stderr closed or gone: nothing to do
            pass


_fast: LineWriter | None = None  # set when JSON lines at info level go straight to a LineWriter


def info_line(event: str, fields: dict[str, Any]) -> bool:
    """The per-request line without structlog's processor chain: the same JSON
    object (event, fields, level, timestamp, secrets scrubbed) written by the
    same writer.  False when logging is not configured for JSON at info
    level; the caller then logs through structlog."""
    writer = _fast
    if writer is None:
        return False
    redact(None, "info", fields)
    fields["event"] = event
    fields["level"] = "info"
    fields["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    writer.msg(orjson.dumps(fields, default=str))
    return True


def configure(level: str = "info", fmt: str = "auto") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    processors: list[Any] = [
        add_request_id,
        structlog.contextvars.merge_contextvars,  # plugins may still bind their own context
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    writer: LineWriter | None = None
    if use_console:
        processors.append(structlog.dev.ConsoleRenderer())
        factory: Any = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=_dumps))
        writer = LineWriter(sys.stderr.buffer)
        factory = lambda *_: writer  # noqa: E731 - one writer for every logger
    global _fast
    _fast = writer if not use_console and lvl <= logging.INFO else None
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
