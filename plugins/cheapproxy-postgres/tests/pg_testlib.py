"""Helpers for the PostgreSQL backend tests (fixtures are in conftest.py).

The server comes from ``$CHEAPPROXY_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``).  Every test gets its own schema
``cp_test_<random>`` (the backend's ``?schema=`` option), dropped afterwards,
so parallel runs and reruns never see each other's rows.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import secrets
import sys
import threading
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any, Awaitable, Callable, TypeVar

import asyncpg

from cheapproxy_postgres.storage import PostgresStorage

T = TypeVar("T")
SERVER_URL = os.environ.get("CHEAPPROXY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REPO_ROOT = Path(__file__).resolve().parents[3]


def schema_url(schema: str, **options: Any) -> str:
    """The test server's URL selecting ``schema`` (plus backend options)."""
    query = "&".join([f"schema={schema}"] + [f"{k}={v}" for k, v in options.items()])
    return SERVER_URL + ("&" if "?" in SERVER_URL else "?") + query


def new_schema_name() -> str:
    return "cp_test_" + secrets.token_hex(6)


def run_in_thread(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a private event loop in another thread (for sync
    fixtures and hypothesis tests: never touches the test's own loop)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(fn())  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


async def server_error() -> str | None:
    """None when the test server answers, else why not."""
    try:
        conn = await asyncpg.connect(SERVER_URL, timeout=5)
    except Exception as exc:  # noqa: BLE001 - reported as the skip/fail reason
        return f"{type(exc).__name__}: {exc}"
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
    return None


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(SERVER_URL, timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def raw(schema: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement on a fresh connection in ``schema`` (outside the backend)."""
    conn = await asyncpg.connect(SERVER_URL, timeout=10, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def opened(url: str) -> PostgresStorage:
    s = PostgresStorage(url)
    await s.open()
    return s


async def ledger_sum(s: Any, user_id: int) -> Decimal:
    return sum((e.amount for e in await s.ledger(user_id)), Decimal(0))


def core_tests(name: str) -> ModuleType:
    """A module of the core test-suite (``tests/<name>.py``), whose
    backend-neutral tests are re-run here against PostgreSQL."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(f"tests.{name}")
