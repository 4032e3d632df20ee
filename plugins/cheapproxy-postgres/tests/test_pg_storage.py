"""PostgresStorage against a real server: URLs, schema and migrations (also
several instances starting at once), the append-only ledger, secrets kept out
of errors -- and every backend-neutral test of the core's SQLite suite
(tests/test_storage_sqlite.py), re-run here on PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal

import asyncpg
import pytest

from cheapproxy.errors import StorageError
from cheapproxy.logging import _scrub_str
from cheapproxy.registry import build_registry
from cheapproxy.storage.records import TaskRecord
from cheapproxy_postgres.migrations import MIGRATIONS, applied_migrations, apply_migrations
from cheapproxy_postgres.storage import PostgresStorage
from cheapproxy_postgres.url import parse_url
from pg_testlib import SERVER_URL, core_tests, drop_schema, ledger_sum, new_schema_name, opened, raw, schema_url

UTC = dt.timezone.utc
_core = core_tests("test_storage_sqlite")

# the core's backend-neutral storage tests; they use the ``store`` fixture, here a PostgresStorage
test_users = _core.test_users
test_keys_round_trip_and_version = _core.test_keys_round_trip_and_version
test_credit = _core.test_credit
test_hold_settle_exactly_once = _core.test_hold_settle_exactly_once
test_release_exactly_once = _core.test_release_exactly_once
test_hold_respects_key_cap = _core.test_hold_respects_key_cap
test_settle_shortfall_charges_what_is_available = _core.test_settle_shortfall_charges_what_is_available
test_settle_never_passes_key_cap = _core.test_settle_never_passes_key_cap
test_settle_rejects_foreign_record_and_rolls_back = _core.test_settle_rejects_foreign_record_and_rolls_back
test_cancelled_writers_leave_no_half_transaction = _core.test_cancelled_writers_leave_no_half_transaction
test_cancel_inside_settle_rolls_back = _core.test_cancel_inside_settle_rolls_back
test_release_stale_holds_keeps_unfinished_task_holds = _core.test_release_stale_holds_keeps_unfinished_task_holds
test_transfer = _core.test_transfer
test_transfer_idempotent_write = _core.test_transfer_idempotent_write
test_idempotency_rows = _core.test_idempotency_rows
test_list_usage_filters = _core.test_list_usage_filters
test_tasks = _core.test_tasks


def test_store_fixture_is_postgres(store: PostgresStorage) -> None:
    # the re-run core tests are only worth something if they really hit PostgreSQL
    assert type(store) is PostgresStorage and store._pool is not None


# ---------------------------------------------------------------- URLs, plugin


def test_plugin_registers_both_schemes() -> None:
    reg = build_registry()
    assert reg.storage_backends["postgresql"] is PostgresStorage
    assert reg.storage_backends["postgres"] is PostgresStorage
    assert reg.plugins["postgres"].provides["storage_backends"] == ["postgresql", "postgres"]
    assert reg.plugins["postgres"].distribution == "cheapproxy-postgres"


def test_url_options() -> None:
    u = parse_url("postgres://app:s3cr%40t@db.internal:6432/gw?schema=cheap&pool_max_size=25&pool_min_size=2"
                  "&pool_timeout=5&statement_cache_size=0&sslmode=require&statement_timeout=15000")
    assert u.dsn == "postgresql://app:s3cr%40t@db.internal:6432/gw?sslmode=require&statement_timeout=15000"
    assert u.display == "postgresql://app:***@db.internal:6432/gw?sslmode=require&statement_timeout=15000"
    assert (u.schema, u.min_size, u.max_size, u.acquire_timeout, u.statement_cache_size) == ("cheap", 2, 25, 5.0, 0)
    assert u.server_settings == {"search_path": "cheap", "application_name": "cheapproxy",
                                 "idle_in_transaction_session_timeout": "60s"}
    assert set(u.secrets) == {"s3cr%40t", "s3cr@t"}
    assert "s3cr" not in repr(u)
    d = parse_url("postgresql+asyncpg://u@h/db?password=pw1234&application_name=mine")
    assert (d.dsn, d.schema, d.min_size, d.max_size, d.statement_cache_size) == (
        "postgresql://u@h/db?password=pw1234&application_name=mine", None, 1, 10, 100)
    assert d.display == "postgresql://u@h/db?password=***&application_name=mine"
    assert d.server_settings == {"idle_in_transaction_session_timeout": "60s"}
    assert parse_url("postgresql:///db?host=/run/postgresql").dsn == "postgresql:///db?host=%2Frun%2Fpostgresql"


@pytest.mark.parametrize("url, says", [
    ("sqlite:///x.db", "not a PostgreSQL URL"),
    ("mysql://u:topsecret@h/db", "not a PostgreSQL URL"),
    ("postgresql://h/db?schema=Bad-Name", "schema"),
    ("postgresql://h/db?schema=1abc", "schema"),
    ("postgresql://h/db?schema=a;drop", "schema"),
    ("postgresql://h/db?schema=a&search_path=b", "not both"),
    ("postgresql://h/db?pool_max_size=0", "pool_max_size"),
    ("postgresql://h/db?pool_max_size=x", "pool_max_size"),
    ("postgresql://h/db?pool_min_size=5&pool_max_size=2", "pool_min_size"),
    ("postgresql://h/db?pool_timeout=-1", "pool_timeout"),
    ("postgresql://h/db?schema=a&schema=b", "twice"),
    ("postgresql://h/db#frag", "fragment"),
])
def test_bad_urls_are_refused_without_secrets(url: str, says: str) -> None:
    with pytest.raises(StorageError, match=says) as exc:
        PostgresStorage(url)
    assert "topsecret" not in str(exc.value)


async def test_unreachable_server_error_hides_the_password(pg_server: str) -> None:
    s = PostgresStorage("postgresql://postgres:hunter2hunter2@127.0.0.1:1/test?pool_timeout=2")
    with pytest.raises(StorageError) as exc:
        await s.open()
    assert "hunter2hunter2" not in str(exc.value) and "postgres:***@127.0.0.1:1/test" in str(exc.value)
    assert await s.ping() is False
    # the backend registered the password with the log scrubber
    assert _scrub_str("dsn=postgresql://postgres:hunter2hunter2@x") == "dsn=postgresql://postgres:[redacted]@x"


async def test_not_open_is_a_storage_error(pg_url: str) -> None:
    s = PostgresStorage(pg_url)
    with pytest.raises(StorageError, match="not open"):
        await s.get_user("alice")
    await s.open()
    await s.open()  # idempotent
    await s.close()
    with pytest.raises(StorageError, match="not open"):
        await s.create_user("alice")
    assert await s.ping() is False


# ---------------------------------------------------------------- schema, migrations


async def test_open_creates_schema_and_tables(store: PostgresStorage, pg_schema: str) -> None:
    assert await store.ping() is True
    names = [r["name"] for r in await raw(pg_schema, "SELECT name FROM schema_migrations ORDER BY name")]
    assert names == [m.name for m in MIGRATIONS]
    tables = {r["table_name"] for r in await raw(
        pg_schema, "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", pg_schema)}
    assert tables == {"schema_migrations", "users", "api_keys", "keys_version", "ledger", "holds", "usage",
                      "idempotency", "tasks", "rate_windows"}
    money = {(r["table_name"], r["column_name"]): r["data_type"] for r in await raw(
        pg_schema, "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = $1",
        pg_schema)}
    for col in [("users", "balance"), ("users", "held"), ("ledger", "amount"), ("usage", "cost"), ("api_keys", "spent")]:
        assert money[col] == "bigint"  # integer micro-USD, never floating point
    assert money[("idempotency", "body")] == "bytea" and money[("holds", "created_at")] == "timestamp with time zone"
    async with store._pool.acquire() as conn:  # the session settings every pooled connection starts with
        assert await conn.fetchval("SHOW search_path") == pg_schema
        assert await conn.fetchval("SHOW application_name") == "cheapproxy"
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "1min"


async def test_migrations_idempotent_and_data_kept(pg_url: str, pg_schema: str) -> None:
    a = await opened(pg_url)
    await a.create_user("alice", Decimal("1.5"))
    await a.close()
    for _ in range(2):  # open twice more: nothing applied, nothing lost
        b = await opened(pg_url)
        async with b._pool.acquire() as conn:
            assert await apply_migrations(conn, now=dt.datetime.now(UTC), schema=pg_schema) == []
        assert (await b.get_user("alice")).balance == Decimal("1.5")
        await b.close()
    assert (await raw(pg_schema, "SELECT COUNT(*) FROM schema_migrations"))[0][0] == len(MIGRATIONS)


async def test_concurrent_instances_migrate_once(pg_url: str, pg_schema: str) -> None:
    """Six gateway instances (six pools) start at once on an empty schema: the
    advisory lock lets one apply every step; the others find nothing to do."""
    results: list[list[str]] = []

    async def start() -> PostgresStorage:
        s = PostgresStorage(pg_url)
        s._pool = await asyncpg.create_pool(s.options.dsn, min_size=1, max_size=2,
                                            server_settings=dict(s.options.server_settings))
        async with s._pool.acquire() as conn:
            results.append(await apply_migrations(conn, now=dt.datetime.now(UTC), schema=pg_schema))
        return s

    stores = await asyncio.gather(*(start() for _ in range(6)))
    try:
        assert sorted(results, key=len) == [[]] * 5 + [[m.name for m in MIGRATIONS]]
        async with stores[0]._pool.acquire() as conn:
            assert await applied_migrations(conn) == [m.name for m in MIGRATIONS]
        u = await stores[3].create_user("alice", Decimal(1))
        assert (await stores[5].get_user_by_id(u.id)).balance == Decimal(1)
    finally:
        for s in stores:
            await s.close()
    # and through open() itself, racing on a second fresh schema
    other = new_schema_name()
    try:
        opens = [PostgresStorage(schema_url(other)) for _ in range(4)]
        await asyncio.gather(*(s.open() for s in opens))
        rows = await raw(other, "SELECT name, COUNT(*) AS n FROM schema_migrations GROUP BY name ORDER BY name")
        assert [(r["name"], r["n"]) for r in rows] == [(m.name, 1) for m in MIGRATIONS]
        for s in opens:
            await s.close()
    finally:
        await drop_schema(other)


async def test_upgrade_from_an_older_schema(pg_url: str, pg_schema: str) -> None:
    conn = await asyncpg.connect(SERVER_URL, server_settings={"search_path": pg_schema})
    try:
        assert await apply_migrations(conn, now=dt.datetime.now(UTC), schema=pg_schema, upto="m002_ledger") == [
            "m001_users_and_keys", "m002_ledger"]
        await conn.execute("INSERT INTO users (name, balance, held, created_at) VALUES ('old', 5000000, 0, now())")
    finally:
        await conn.close()
    s = await opened(pg_url)
    try:
        assert (await s.get_user("old")).balance == Decimal("5")
        async with s._pool.acquire() as c:
            assert await applied_migrations(c) == [m.name for m in MIGRATIONS]
        assert await s.open_holds() == 0  # m003 table exists now
        assert (await s.create_user("new")).id > (await s.get_user("old")).id  # identity continues past old rows
    finally:
        await s.close()


async def test_database_from_a_newer_version_is_refused(pg_url: str, pg_schema: str) -> None:
    s = await opened(pg_url)
    await s.close()
    await raw(pg_schema, "INSERT INTO schema_migrations VALUES ('m999_future', now())")
    again = PostgresStorage(pg_url)
    with pytest.raises(StorageError, match="m999_future"):
        await again.open()
    assert again._pool is None


async def test_existing_schema_made_by_a_dba_is_used(pg_schema: str) -> None:
    await raw("public", f'CREATE SCHEMA "{pg_schema}"')
    s = await opened(schema_url(pg_schema, pool_max_size=3))
    try:
        assert s._pool.get_max_size() == 3
        u = await s.create_user("alice", Decimal("2"))
        assert (await raw(pg_schema, "SELECT balance FROM users WHERE id = $1", u.id))[0][0] == 2_000_000
    finally:
        await s.close()


# ---------------------------------------------------------------- ledger, values


async def test_ledger_is_append_only(store: PostgresStorage, pg_schema: str) -> None:
    u = await store.create_user("alice", Decimal("1"))
    for sql in ("UPDATE ledger SET amount = 999", "DELETE FROM ledger", "TRUNCATE ledger"):
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await raw(pg_schema, sql)
    assert [(e.amount, e.kind) for e in await store.ledger(u.id)] == [(Decimal(1), "topup")]


async def test_database_constraints_back_the_code(store: PostgresStorage, pg_schema: str) -> None:
    u = await store.create_user("alice", Decimal("1"))
    for sql in (f"UPDATE users SET held = 2000000 WHERE id = {u.id}",  # held above balance
                f"UPDATE users SET balance = -1 WHERE id = {u.id}",
                f"INSERT INTO ledger (user_id, amount, kind, reference, balance_after, created_at)"
                f" VALUES ({u.id}, -5, 'charge', 'x', -4, now())"):
        with pytest.raises(asyncpg.CheckViolationError):
            await raw(pg_schema, sql)
    with pytest.raises(asyncpg.UniqueViolationError):
        await raw(pg_schema, f"INSERT INTO ledger (user_id, amount, kind, reference, balance_after, created_at)"
                             f" VALUES ({u.id}, 1, 'topup', 'opening:{u.id}', 2, now())")


async def test_values_postgres_cannot_store(store: PostgresStorage) -> None:
    """PostgreSQL text cannot hold NUL: a write is a ValueError (never a
    mangled row), a lookup finds nothing (as SQLite would), a provider's task
    error text keeps everything but the NUL."""
    with pytest.raises(ValueError, match="refused by the database"):
        await store.create_user("nul\x00name")
    u = await store.create_user("alice", Decimal("1"))
    assert await store.get_user("alice\x00") is None and await store.get_key_by_hash("ab\x00") is None
    assert await store.get_idempotent("s", "k\x00") is None and await store.list_usage(user_name="a\x00") == []
    await store.create_task(TaskRecord(id="t1", user_id=u.id, model="v", request={"prompt": "a\x00b é"}))
    assert (await store.get_task("t1")).request == {"prompt": "a\x00b é"}  # JSON text keeps what jsonb would refuse
    with pytest.raises(ValueError, match="invalid task update"):
        await store.update_task("t1", attempts=2**70)
    assert await store.update_task("t1", expect_state="queued", state="failed", error="upstream said \x00bad") is True
    assert (await store.get_task("t1")).error == "upstream said \ufffdbad"
    assert [u.name for u in await store.list_users()] == ["alice"]
    assert await ledger_sum(store, u.id) == Decimal(1)


async def test_pool_exhaustion_is_a_storage_error(pg_schema: str) -> None:
    """pool_max_size=1 and pool_timeout=1: while one transaction holds the only
    connection, another call waits 1 s and fails with a clear StorageError."""
    s = await opened(schema_url(pg_schema, pool_max_size=1, pool_timeout=1))
    try:
        u = await s.create_user("alice", Decimal("1"))
        inside, leave = asyncio.Event(), asyncio.Event()

        async def slow(db: asyncpg.Connection) -> int:
            await db.execute("UPDATE users SET held = held WHERE id = $1", u.id)
            inside.set()
            await leave.wait()
            return 1

        t = asyncio.create_task(s._write(slow))
        await inside.wait()
        with pytest.raises(StorageError, match="no database connection within 1s .*pool_max_size"):
            await s.get_user("alice")
        assert await s.ping() is False  # /health reports the saturation
        leave.set()
        assert await t == 1
        assert (await s.get_user("alice")).balance == Decimal(1) and await s.ping() is True
    finally:
        await s.close()


async def test_timestamps_are_utc_and_naive_means_utc(store: PostgresStorage) -> None:
    u = await store.create_user("alice")
    naive = dt.datetime(2030, 1, 2, 3, 4, 5, 678901)
    await store.create_task(TaskRecord(id="t1", user_id=u.id, model="v", next_poll_at=naive,
                                       deadline_at=dt.datetime(2030, 1, 2, 5, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))))
    t = await store.get_task("t1")
    assert t.next_poll_at == naive.replace(tzinfo=UTC) and t.next_poll_at.tzinfo == UTC
    assert t.deadline_at == dt.datetime(2030, 1, 2, 3, 0, tzinfo=UTC)
    assert [x.id for x in await store.list_tasks(due_before=naive)] == ["t1"]
    assert await store.list_tasks(due_before=naive - dt.timedelta(microseconds=1)) == []
