"""Row <-> record conversions and small helpers shared by the backend's modules.

Money is BIGINT micro-USD (the core's exact ``to_micro`` / ``from_micro``),
times are TIMESTAMPTZ (naive datetimes are taken as UTC, as in the SQLite
backend, and read back timezone-aware in UTC), JSON is text.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import orjson

from cheapproxy.storage.base import KeyRecord, User
from cheapproxy.storage.records import StoredUsageRecord, TaskRecord
from cheapproxy.storage.sqlite import from_micro, to_micro

UTC = dt.timezone.utc

USAGE_COLS = (
    "request_id", "user_id", "key_id", "model", "upstream", "protocol", "streamed", "status", "http_status",
    "input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens", "reasoning_tokens",
    "cost", "unpaid", "latency_ms", "ttft_ms", "usage_source", "created_at",
)
TASK_COLS = (
    "id", "user_id", "key_id", "model", "upstream", "kind", "state", "provider_task_id", "request", "result",
    "usage", "cost", "error", "hold_id", "callback_url", "created_at", "updated_at", "deadline_at",
    "next_poll_at", "attempts",
)
TASK_JSON = {"request", "result", "usage"}
TASK_TIMES = {"created_at", "updated_at", "deadline_at", "next_poll_at"}


def ts(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:  # naive datetimes are taken as UTC (as in the SQLite backend)
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


def to_json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def from_json(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


def count(status: str) -> int:
    """Rows touched, from a command tag such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


def marks(n: int, start: int = 1) -> str:
    """``$1, $2, ...`` placeholders."""
    return ", ".join(f"${i}" for i in range(start, start + n))


def user_row(r: asyncpg.Record) -> User:
    return User(id=r["id"], name=r["name"], balance=from_micro(r["balance"]), held=from_micro(r["held"]),
                created_at=r["created_at"])


def key_row(r: asyncpg.Record) -> KeyRecord:
    rs = orjson.loads(r["restrictions"])
    return KeyRecord(
        id=r["id"], user_id=r["user_id"], user_name=r["user_name"], key_hash=r["key_hash"], prefix=r["prefix"],
        label=r["label"], models=rs.get("models"), no_stream=bool(rs.get("no_stream", False)),
        allow_ips=rs.get("allow_ips"), rpm=rs.get("rpm"), tpm=rs.get("tpm"),
        max_spend=None if r["max_spend"] is None else from_micro(r["max_spend"]),
        spent=from_micro(r["spent"]), expires_at=r["expires_at"], revoked=bool(r["revoked"]),
        created_at=r["created_at"],
    )


def usage_row(r: asyncpg.Record) -> StoredUsageRecord:
    return StoredUsageRecord(
        request_id=r["request_id"], user_id=r["user_id"], key_id=r["key_id"], model=r["model"],
        upstream=r["upstream"], protocol=r["protocol"], streamed=bool(r["streamed"]), status=r["status"],
        http_status=r["http_status"], input_tokens=r["input_tokens"], output_tokens=r["output_tokens"],
        cache_write_tokens=r["cache_write_tokens"], cache_read_tokens=r["cache_read_tokens"],
        reasoning_tokens=r["reasoning_tokens"], cost=from_micro(r["cost"]), unpaid=from_micro(r["unpaid"]),
        latency_ms=r["latency_ms"], ttft_ms=r["ttft_ms"], usage_source=r["usage_source"],
        created_at=r["created_at"],
    )


def task_value(col: str, value: Any) -> Any:
    """A TaskRecord field as stored."""
    if col in TASK_JSON:
        return to_json(value)
    if col in TASK_TIMES:
        return ts(value)
    if col == "cost":
        return None if value is None else to_micro(value, "cost")
    if col == "error" and isinstance(value, str):
        # free text from a provider; PostgreSQL text cannot hold NUL (lossy: U+FFFD instead)
        return value.replace("\x00", "\ufffd")
    return value


def task_row(r: asyncpg.Record) -> TaskRecord:
    kw = {c: r[c] for c in TASK_COLS}
    for c in TASK_JSON:
        kw[c] = from_json(kw[c])
    kw["cost"] = None if kw["cost"] is None else from_micro(kw["cost"])
    kw["request"] = kw["request"] or {}
    return TaskRecord(**kw)
