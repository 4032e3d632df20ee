"""Fixtures for the PostgreSQL backend tests (helpers live in pg_testlib.py).

When the server is unreachable the tests skip -- unless
``$CHEAPPROXY_REQUIRE_SERVICES`` is set (CI), where they fail instead.
"""

from __future__ import annotations

import os
from typing import Any, AsyncIterator, Iterator

import pytest

from pg_testlib import SERVER_URL, drop_schema, new_schema_name, run_in_thread, schema_url, server_error


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The test server's URL, once it answered."""
    error = run_in_thread(server_error)
    if error is not None:
        reason = f"PostgreSQL at {SERVER_URL} is unreachable ({error})"
        if os.environ.get("CHEAPPROXY_REQUIRE_SERVICES"):
            pytest.fail(reason + " and CHEAPPROXY_REQUIRE_SERVICES is set", pytrace=False)
        pytest.skip(reason)
    return SERVER_URL


@pytest.fixture
def pg_schema(pg_server: str) -> Iterator[str]:
    """A fresh schema name for this test; the schema is dropped afterwards."""
    name = new_schema_name()
    yield name
    run_in_thread(lambda: drop_schema(name))


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    """The backend URL of this test's schema."""
    return schema_url(pg_schema)


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[Any]:
    """An open PostgresStorage on this test's schema (the name the core tests use)."""
    from cheapproxy_postgres.storage import PostgresStorage

    s = PostgresStorage(pg_url)
    await s.open()
    yield s
    await s.close()
