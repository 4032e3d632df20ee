"""SQLiteStorage against real database files: schema, money, holds, exactly-once
settlement, transfers, idempotency, tasks, and two connections racing on one
file (as two worker processes would)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import random
import sqlite3
from decimal import Decimal
from pathlib import Path

import aiosqlite
import pytest

from cheapproxy.errors import StorageError
from cheapproxy.storage.base import InsufficientBalance, KeyRecord, UsageRecord
from cheapproxy.storage.migrations import MIGRATIONS, applied_migrations, apply_migrations
from cheapproxy.storage.records import IdempotentReplay, IdempotentWrite, TaskRecord
from cheapproxy.storage.sqlite import SQLiteStorage, from_micro, parse_url, to_micro

UTC = dt.timezone.utc


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStorage("sqlite:///state/test.db", tmp_path)
    await s.open()
    yield s
    await s.close()


def key(kid: str, user_id: int, **kw) -> KeyRecord:
    return KeyRecord(id=kid, user_id=user_id, key_hash=hashlib.sha256(kid.encode()).hexdigest(), **kw)


def record(rid: str, user_id: int, key_id: str | None = None) -> UsageRecord:
    return UsageRecord(request_id=rid, user_id=user_id, key_id=key_id, model="m1", upstream="up", protocol="openai-chat",
                       streamed=True, status="ok", input_tokens=10, output_tokens=7)


async def ledger_sum(s: SQLiteStorage, user_id: int) -> Decimal:
    return sum((e.amount for e in await s.ledger(user_id)), Decimal(0))


async def raw_rows(path: Path, sql: str, params=()) -> list[tuple]:
    async with aiosqlite.connect(path) as db:
        return [tuple(r) for r in await db.execute_fetchall(sql, params)]


# ---------------------------------------------------------------- URLs, schema


def test_url_forms(tmp_path: Path) -> None:
    assert parse_url("sqlite:///data/x.db", tmp_path) == tmp_path / "data/x.db"
    assert parse_url("sqlite:////abs/dir/x.db", tmp_path) == Path("/abs/dir/x.db")
    assert parse_url("sqlite://:memory:") is None
    for bad in ("postgresql://h/db", "sqlite://x.db", "sqlite:///x.db?mode=ro", "sqlite:///", "sqlite://"):
        with pytest.raises(StorageError):
            parse_url(bad, tmp_path)


def test_micro_conversion_is_exact() -> None:
    assert to_micro(Decimal("1.234567")) == 1_234_567
    assert to_micro(Decimal("-0.000001")) == -1
    assert to_micro(Decimal("1E+3")) == 1_000_000_000
    assert from_micro(1_234_567) == Decimal("1.234567") and str(from_micro(0)) == "0.000000"
    for bad in (Decimal("0.0000001"), Decimal("NaN"), Decimal("Infinity"), Decimal("1e30")):
        with pytest.raises(ValueError):
            to_micro(bad)
    with pytest.raises(TypeError):
        to_micro(1.5)  # type: ignore[arg-type]


async def test_open_creates_schema_with_pragmas(store: SQLiteStorage, tmp_path: Path) -> None:
    db_file = tmp_path / "state/test.db"
    assert db_file.is_file()
    names = [r[0] for r in await raw_rows(db_file, "SELECT name FROM schema_migrations ORDER BY rowid")]
    assert names == [m.name for m in MIGRATIONS]
    assert (await raw_rows(db_file, "PRAGMA journal_mode"))[0][0] == "wal"
    w = store._writer()
    assert (await w.execute_fetchall("PRAGMA synchronous"))[0][0] == 1  # NORMAL
    assert (await w.execute_fetchall("PRAGMA foreign_keys"))[0][0] == 1
    assert (await w.execute_fetchall("PRAGMA busy_timeout"))[0][0] == 30000
    assert await store.ping() is True


async def grow_wal(s: SQLiteStorage, user_id: int, wal: Path) -> int:
    """Credit ``user_id`` until the WAL file is over 4x ``s.wal_size_limit``; returns the credits made."""
    n = 0
    while wal.stat().st_size <= 4 * s.wal_size_limit and n < 5000:
        await s.credit(user_id, Decimal("0.01"), kind="topup", reference=f"t{n}", note="x" * 500)
        n += 1
    assert wal.stat().st_size > 4 * s.wal_size_limit
    return n


async def test_the_wal_file_shrinks_back_to_its_limit(tmp_path: Path) -> None:
    """Under sustained writes the WAL file grows; once a checkpoint has caught
    up, the write that restarts the WAL truncates the file to
    ``wal_size_limit`` (without the limit SQLite reuses it at full size)."""
    s = SQLiteStorage("sqlite:///wal.db", tmp_path)
    s.wal_size_limit = 128 * 1024
    await s.open()
    try:
        wal = tmp_path / "wal.db-wal"
        u = await s.create_user("walt", Decimal(0))
        n = await grow_wal(s, u.id, wal)
        s._checkpoint_once()  # caught up: every frame is in the database file now
        await s.credit(u.id, Decimal("0.01"), kind="topup", reference="last")  # restarts the WAL
        assert wal.stat().st_size <= s.wal_size_limit
        assert (await s.get_user("walt")).balance == Decimal("0.01") * (n + 1)
    finally:
        await s.close()


async def test_a_checkpoint_round_lets_the_log_start_over_despite_writes_meanwhile(tmp_path: Path) -> None:
    """Under steady writes, frames land in the log while the threaded
    checkpoint runs, so it never finds the log wholly checkpointed and the
    log would never start over (its file grew by megabytes a second).  The
    round checkpoints that tail on the loop's own connection, so the next
    write starts the log over (and cuts the file to ``wal_size_limit``).
    Here a reader's snapshot keeps the threaded checkpoint from the frames
    written after it, as a concurrent write would."""
    s = SQLiteStorage("sqlite:///round.db", tmp_path)
    s.wal_size_limit = 128 * 1024
    await s.open()
    reader = sqlite3.connect(tmp_path / "round.db", isolation_level=None, check_same_thread=False)
    try:
        wal = tmp_path / "round.db-wal"
        u = await s.create_user("rita", Decimal(0))
        n = await grow_wal(s, u.id, wal)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM users").fetchall()  # a snapshot at this frame
        for i in range(20):
            await s.credit(u.id, Decimal("0.01"), kind="topup", reference=f"late{i}")
        threaded = s._checkpoint_once

        def checkpoint_then_release() -> None:
            threaded()  # cannot pass the reader's snapshot
            reader.execute("COMMIT")

        s._checkpoint_once = checkpoint_then_release  # type: ignore[method-assign]
        await s._checkpoint_round()
        await s.credit(u.id, Decimal("0.01"), kind="topup", reference="last")
        assert wal.stat().st_size <= s.wal_size_limit  # the log started over
        assert (await s.get_user("rita")).balance == Decimal("0.01") * (n + 21)
    finally:
        reader.close()
        await s.close()


async def test_migrations_idempotent_and_data_kept(tmp_path: Path) -> None:
    url = "sqlite:///db.sqlite"
    a = SQLiteStorage(url, tmp_path)
    await a.open()
    await a.create_user("alice", Decimal("1.5"))
    await a.close()
    for _ in range(2):  # open twice more: nothing applied, nothing lost
        b = SQLiteStorage(url, tmp_path)
        await b.open()
        assert await apply_migrations(b._writer(), now="2026-01-01T00:00:00.000000+00:00") == []
        assert (await b.get_user("alice")).balance == Decimal("1.5")
        await b.close()
    rows = await raw_rows(tmp_path / "db.sqlite", "SELECT COUNT(*) FROM schema_migrations")
    assert rows[0][0] == len(MIGRATIONS)


async def test_concurrent_opens_apply_each_step_once(tmp_path: Path) -> None:
    stores = [SQLiteStorage("sqlite:///race.db", tmp_path) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert await applied_migrations(stores[0]._writer()) == [m.name for m in MIGRATIONS]
    finally:
        for s in stores:
            await s.close()


async def test_upgrade_from_an_older_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with aiosqlite.connect(path, isolation_level=None) as db:
        assert await apply_migrations(db, now="2026-01-01T00:00:00.000000+00:00", upto="m002_ledger") == [
            "m001_users_and_keys", "m002_ledger"]
        await db.execute("INSERT INTO users (name, balance, held, created_at) VALUES ('old', 5000000, 0, '2026-01-01T00:00:00.000000+00:00')")
    s = SQLiteStorage(f"sqlite:///{path.name}", tmp_path)
    await s.open()
    try:
        assert (await s.get_user("old")).balance == Decimal("5")
        assert await applied_migrations(s._writer()) == [m.name for m in MIGRATIONS]
        assert await s.open_holds() == 0  # m003 table exists now
    finally:
        await s.close()


async def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    s = SQLiteStorage("sqlite:///n.db", tmp_path)
    await s.open()
    await s.close()
    async with aiosqlite.connect(tmp_path / "n.db") as db:
        await db.execute("INSERT INTO schema_migrations VALUES ('m999_future', 'x')")
        await db.commit()
    again = SQLiteStorage("sqlite:///n.db", tmp_path)
    with pytest.raises(StorageError, match="m999_future"):
        await again.open()
    assert again._db is None


# ---------------------------------------------------------------- users, keys


async def test_users(store: SQLiteStorage) -> None:
    alice = await store.create_user("alice", Decimal("10.25"))
    bob = await store.create_user("bob")
    assert (alice.name, alice.balance, alice.held) == ("alice", Decimal("10.25"), Decimal(0))
    with pytest.raises(ValueError, match="exists"):
        await store.create_user("alice")
    with pytest.raises(ValueError):
        await store.create_user("carol", Decimal("0.0000001"))
    with pytest.raises(ValueError):
        await store.create_user("dave", Decimal("-1"))
    assert [u.name for u in await store.list_users()] == ["alice", "bob"]
    assert await store.count_users() == 2
    assert (await store.get_user_by_id(bob.id)).name == "bob"
    assert await store.get_user("nobody") is None
    [opening] = await store.ledger(alice.id)
    assert (opening.kind, opening.amount, opening.balance_after) == ("topup", Decimal("10.25"), Decimal("10.25"))
    assert await store.ledger(bob.id) == []  # a zero opening balance is no balance change


async def test_keys_round_trip_and_version(store: SQLiteStorage) -> None:
    u = await store.create_user("alice")
    v0 = await store.keys_version()
    expires = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    await store.create_key(key("key_a", u.id, prefix="cp-abc", label="ci", models=["gpt-*"], no_stream=True,
                               allow_ips=["10.0.0.0/8"], rpm=60, tpm=1000, max_spend=Decimal("2.50"), expires_at=expires))
    assert await store.keys_version() == v0 + 1
    k = await store.get_key_by_hash(hashlib.sha256(b"key_a").hexdigest())
    assert (k.id, k.user_id, k.user_name, k.prefix, k.label) == ("key_a", u.id, "alice", "cp-abc", "ci")
    assert (k.models, k.no_stream, k.allow_ips, k.rpm, k.tpm) == (["gpt-*"], True, ["10.0.0.0/8"], 60, 1000)
    assert (k.max_spend, k.spent, k.expires_at, k.revoked) == (Decimal("2.5"), Decimal(0), expires, False)
    with pytest.raises(ValueError):
        await store.create_key(key("key_a", u.id))  # same id and hash
    with pytest.raises(ValueError):
        await store.create_key(key("key_b", 999))  # no such user (foreign key)
    await store.create_key(key("key_c", u.id))
    assert [x.id for x in await store.list_keys("alice")] == ["key_a", "key_c"]
    assert await store.list_keys("nobody") == []
    v1 = await store.keys_version()
    assert await store.revoke_key("key_a") is True
    assert await store.keys_version() == v1 + 1
    assert (await store.get_key_by_hash(k.key_hash)).revoked is True
    assert await store.revoke_key("key_missing") is False
    assert await store.get_key_by_hash("0" * 64) is None


# ---------------------------------------------------------------- money


async def test_credit(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", Decimal("1"))
    assert await store.credit(u.id, Decimal("2.000001"), kind="topup", reference="t1", note="cli") == Decimal("3.000001")
    with pytest.raises(ValueError, match="already used"):
        await store.credit(u.id, Decimal("5"), kind="topup", reference="t1")
    for bad in (Decimal(0), Decimal("-1"), Decimal("0.0000001")):
        with pytest.raises(ValueError):
            await store.credit(u.id, bad, kind="topup", reference=f"bad{bad}")
    with pytest.raises(ValueError, match="no user"):
        await store.credit(999, Decimal(1), kind="topup", reference="t9")
    assert (await store.get_user("alice")).balance == Decimal("3.000001") == await ledger_sum(store, u.id)


async def test_ledger_is_append_only(store: SQLiteStorage, tmp_path: Path) -> None:
    await store.create_user("alice", Decimal("1"))
    async with aiosqlite.connect(tmp_path / "state/test.db") as db:
        for sql in ("UPDATE ledger SET amount = 999", "DELETE FROM ledger"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                await db.execute(sql)


async def test_hold_settle_exactly_once(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", Decimal("1"))
    await store.create_key(key("key_a", u.id))
    assert await store.hold("h1", user_id=u.id, key_id="key_a", amount=Decimal("0.4")) is True
    assert (await store.get_user("alice")).held == Decimal("0.4")
    assert await store.open_holds() == 1
    bal = await store.settle("h1", cost=Decimal("0.123456"), record=record("r1", u.id, "key_a"))
    assert bal == Decimal("0.876544")
    assert await store.settle("h1", cost=Decimal("0.5"), record=record("r1b", u.id, "key_a")) is None
    assert await store.release("h1") is False
    after = await store.get_user("alice")
    assert (after.balance, after.held) == (Decimal("0.876544"), Decimal(0))
    assert await store.open_holds() == 0
    charges = [e for e in await store.ledger(u.id) if e.kind == "charge"]
    assert [(e.amount, e.reference, e.balance_after) for e in charges] == [(Decimal("-0.123456"), "r1", Decimal("0.876544"))]
    [usage] = await store.list_usage()
    assert (usage.request_id, usage.cost, usage.unpaid, usage.input_tokens) == ("r1", Decimal("0.123456"), Decimal(0), 10)
    assert (await store.get_key_by_hash(hashlib.sha256(b"key_a").hexdigest())).spent == Decimal("0.123456")
    assert after.balance == await ledger_sum(store, u.id)


async def test_release_exactly_once(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", Decimal("1"))
    assert await store.hold("h1", user_id=u.id, key_id=None, amount=Decimal("0.7")) is True
    assert await store.hold("h2", user_id=u.id, key_id=None, amount=Decimal("0.4")) is False  # only 0.3 free
    assert await store.release("h1", record=record("r1", u.id)) is True
    assert await store.release("h1") is False
    assert await store.settle("h1", cost=Decimal("0.1"), record=record("r1x", u.id)) is None
    user = await store.get_user("alice")
    assert (user.balance, user.held) == (Decimal("1"), Decimal(0))
    [usage] = await store.list_usage()
    assert (usage.request_id, usage.cost) == ("r1", Decimal(0))
    assert [e.kind for e in await store.ledger(u.id)] == ["topup"]
    with pytest.raises(ValueError, match="already exists"):
        await store.hold("h1", user_id=u.id, key_id=None, amount=Decimal("0.1"))


async def test_hold_respects_key_cap(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", Decimal("10"))
    await store.create_key(key("key_a", u.id, max_spend=Decimal("0.01"), spent=Decimal("0.002")))
    assert await store.hold("h1", user_id=u.id, key_id="key_a", amount=Decimal("0.005")) is True
    # spent 0.002 + held 0.005 + 0.004 > 0.01
    assert await store.hold("h2", user_id=u.id, key_id="key_a", amount=Decimal("0.004")) is False
    assert (await store.get_user("alice")).held == Decimal("0.005")  # the user update was rolled back
    assert await store.hold("h3", user_id=u.id, key_id="key_a", amount=Decimal("0.003")) is True
    assert await store.hold("h4", user_id=u.id, key_id="key_other", amount=Decimal("0.001")) is False  # unknown key


async def test_settle_shortfall_charges_what_is_available(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", Decimal("1"))
    assert await store.hold("h1", user_id=u.id, key_id=None, amount=Decimal("0.2"))
    assert await store.hold("h2", user_id=u.id, key_id=None, amount=Decimal("0.3"))
    # h1's real cost is 5.00: only its hold (0.2) plus the free balance (0.5) can be charged; h2 stays covered
    assert await store.settle("h1", cost=Decimal("5"), record=record("r1", u.id)) == Decimal("0.3")
    user = await store.get_user("alice")
    assert (user.balance, user.held) == (Decimal("0.3"), Decimal("0.3"))
    assert await store.settle("h2", cost=Decimal("0.1"), record=record("r2", u.id)) == Decimal("0.2")
    got = {r.request_id: (r.cost, r.unpaid) for r in await store.list_usage()}
    assert got == {"r1": (Decimal("5"), Decimal("4.3")), "r2": (Decimal("0.1"), Decimal(0))}
    assert await ledger_sum(store, u.id) == Decimal("0.2")


async def test_settle_never_passes_key_cap(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", Decimal("10"))
    await store.create_key(key("key_a", u.id, max_spend=Decimal("0.01")))
    assert await store.hold("h1", user_id=u.id, key_id="key_a", amount=Decimal("0.004"))
    assert await store.settle("h1", cost=Decimal("0.05"), record=record("r1", u.id, "key_a")) == Decimal("9.99")
    k = await store.get_key_by_hash(hashlib.sha256(b"key_a").hexdigest())
    assert k.spent == Decimal("0.01")
    [r] = await store.list_usage()
    assert (r.cost, r.unpaid) == (Decimal("0.05"), Decimal("0.04"))


async def test_settle_rejects_foreign_record_and_rolls_back(store: SQLiteStorage) -> None:
    a = await store.create_user("alice", Decimal("1"))
    b = await store.create_user("bob", Decimal("1"))
    assert await store.hold("h1", user_id=a.id, key_id=None, amount=Decimal("0.5"))
    with pytest.raises(ValueError):
        await store.settle("h1", cost=Decimal("0.1"), record=record("r1", b.id))
    assert await store.open_holds() == 1  # the whole transaction was undone
    assert await store.settle("h1", cost=Decimal("0.1"), record=record("r1", a.id)) == Decimal("0.9")
    assert await store.hold("h2", user_id=a.id, key_id=None, amount=Decimal("0.1"))
    with pytest.raises(ValueError, match="already"):  # same request id charged twice
        await store.settle("h2", cost=Decimal("0.1"), record=record("r1", a.id))
    assert (await store.get_user("alice")).balance == Decimal("0.9") == await ledger_sum(store, a.id)


async def test_cancelled_writers_leave_no_half_transaction(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", Decimal("100"))
    for i in range(40):
        assert await store.hold(f"h{i}", user_id=u.id, key_id=None, amount=Decimal("1"))
        t = asyncio.create_task(store.settle(f"h{i}", cost=Decimal("0.5"), record=record(f"r{i}", u.id)))
        await asyncio.sleep(i * 0.00005)  # cancel at varying points: before, inside, after the transaction
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
    # every settle either happened completely or not at all; the connection is usable
    for i in range(40):
        await store.release(f"h{i}")
    user = await store.get_user("alice")
    charged = [e for e in await store.ledger(u.id) if e.kind == "charge"]
    assert user.held == 0 and await store.open_holds() == 0
    assert user.balance == Decimal(100) - Decimal("0.5") * len(charged) == await ledger_sum(store, u.id)
    assert len(await store.list_usage()) == len(charged)


async def test_cancel_inside_settle_rolls_back(store: SQLiteStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    u = await store.create_user("alice", Decimal("1"))
    assert await store.hold("h1", user_id=u.id, key_id=None, amount=Decimal("0.5"))
    reached, never = asyncio.Event(), asyncio.Event()
    real_insert = store._insert_usage

    async def stuck(*args, **kw):  # the charge and ledger row are written; then the task is cancelled
        reached.set()
        await never.wait()

    monkeypatch.setattr(store, "_insert_usage", stuck)
    t = asyncio.create_task(store.settle("h1", cost=Decimal("0.2"), record=record("r1", u.id)))
    await reached.wait()
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    monkeypatch.setattr(store, "_insert_usage", real_insert)
    user = await store.get_user("alice")
    assert (user.balance, user.held, await store.open_holds()) == (Decimal(1), Decimal("0.5"), 1)
    assert await store.settle("h1", cost=Decimal("0.2"), record=record("r1", u.id)) == Decimal("0.8")
    assert [e.kind for e in await store.ledger(u.id)] == ["topup", "charge"]


async def test_release_stale_holds_keeps_unfinished_task_holds(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", Decimal("1"))
    for h in ("h_old", "h_task", "h_done_task"):
        assert await store.hold(h, user_id=u.id, key_id=None, amount=Decimal("0.1"))
    await store.create_task(TaskRecord(id="t1", user_id=u.id, model="v", state="running", hold_id="h_task"))
    await store.create_task(TaskRecord(id="t2", user_id=u.id, model="v", state="failed", hold_id="h_done_task"))
    assert await store.release_stale_holds(dt.datetime.now(UTC) - dt.timedelta(hours=1)) == 0
    assert await store.release_stale_holds(dt.datetime.now(UTC) + dt.timedelta(seconds=1)) == 2
    assert await store.open_holds() == 1
    assert (await store.get_user("alice")).held == Decimal("0.1")


async def test_transfer(store: SQLiteStorage) -> None:
    a = await store.create_user("alice", Decimal("5"))
    b = await store.create_user("bob", Decimal("1"))
    assert await store.transfer(from_user_id=a.id, to_user_id=b.id, amount=Decimal("2.5"), reference="x1") == (
        Decimal("2.5"), Decimal("3.5"))
    out = [e for e in await store.ledger(a.id) if e.kind == "transfer_out"]
    inn = [e for e in await store.ledger(b.id) if e.kind == "transfer_in"]
    assert [(e.amount, e.reference, e.note) for e in out] == [(Decimal("-2.5"), "x1", "to bob")]
    assert [(e.amount, e.reference, e.note) for e in inn] == [(Decimal("2.5"), "x1", "from alice")]
    assert await store.hold("h", user_id=a.id, key_id=None, amount=Decimal("2"))
    with pytest.raises(InsufficientBalance):  # held money cannot be transferred
        await store.transfer(from_user_id=a.id, to_user_id=b.id, amount=Decimal("0.51"), reference="x2")
    with pytest.raises(ValueError):
        await store.transfer(from_user_id=a.id, to_user_id=b.id, amount=Decimal("0.1"), reference="x1")
    with pytest.raises(ValueError):
        await store.transfer(from_user_id=a.id, to_user_id=a.id, amount=Decimal("0.1"), reference="x3")
    with pytest.raises(ValueError):
        await store.transfer(from_user_id=a.id, to_user_id=999, amount=Decimal("0.1"), reference="x4")
    assert (await store.get_user("alice")).balance == Decimal("2.5") == await ledger_sum(store, a.id)
    assert (await store.get_user("bob")).balance == Decimal("3.5") == await ledger_sum(store, b.id)


async def test_transfer_idempotent_write(store: SQLiteStorage) -> None:
    a = await store.create_user("alice", Decimal("1"))
    b = await store.create_user("bob")
    spec = IdempotentWrite(scope="s", key="k1", request_hash="H",
                           on_success=lambda sb, rb: (200, f"{sb}|{rb}".encode()), on_insufficient=lambda: (400, b"short"))
    await store.transfer(from_user_id=a.id, to_user_id=b.id, amount=Decimal("0.4"), reference="r1", idempotency=spec)
    with pytest.raises(IdempotentReplay) as replay:
        await store.transfer(from_user_id=a.id, to_user_id=b.id, amount=Decimal("0.4"), reference="r2", idempotency=spec)
    assert (replay.value.request_hash, replay.value.status, replay.value.body) == ("H", 200, b"0.600000|0.400000")
    short = IdempotentWrite(scope="s", key="k2", request_hash="H2", on_success=spec.on_success,
                            on_insufficient=lambda: (400, b"short"))
    with pytest.raises(InsufficientBalance):
        await store.transfer(from_user_id=a.id, to_user_id=b.id, amount=Decimal("9"), reference="r3", idempotency=short)
    assert await store.get_idempotent("s", "k2") == ("H2", 400, b"short")
    assert (await store.get_user("alice")).balance == Decimal("0.6")


async def test_idempotency_rows(store: SQLiteStorage) -> None:
    assert await store.get_idempotent("s", "k") is None
    assert await store.put_idempotent("s", "k", "h1", 200, b'{"a":1}') is True
    assert await store.put_idempotent("s", "k", "h2", 500, b"x") is False
    assert await store.get_idempotent("s", "k") == ("h1", 200, b'{"a":1}')
    assert await store.prune_idempotency(dt.datetime.now(UTC) - dt.timedelta(hours=24)) == 0
    assert await store.prune_idempotency(dt.datetime.now(UTC) + dt.timedelta(seconds=1)) == 1
    assert await store.get_idempotent("s", "k") is None


async def test_list_usage_filters(store: SQLiteStorage) -> None:
    a = await store.create_user("alice", Decimal("1"))
    b = await store.create_user("bob", Decimal("1"))
    base = dt.datetime(2026, 3, 1, tzinfo=UTC)
    for i, uid in enumerate([a.id, b.id, a.id, a.id]):
        assert await store.hold(f"h{i}", user_id=uid, key_id=None, amount=Decimal("0.01"))
        rec = record(f"r{i}", uid)
        rec.created_at = base + dt.timedelta(days=i)
        await store.settle(f"h{i}", cost=Decimal("0.01"), record=rec)
    assert [r.request_id for r in await store.list_usage()] == ["r3", "r2", "r1", "r0"]
    assert [r.request_id for r in await store.list_usage(user_name="alice")] == ["r3", "r2", "r0"]
    assert [r.request_id for r in await store.list_usage(since=base + dt.timedelta(days=2))] == ["r3", "r2"]
    assert [r.request_id for r in await store.list_usage(limit=1)] == ["r3"]
    assert (await store.get_usage("r1")).user_id == b.id
    assert await store.get_usage("nope") is None


async def test_tasks(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", Decimal("1"))
    deadline = dt.datetime(2030, 1, 1, tzinfo=UTC)
    t = TaskRecord(id="task_1", user_id=u.id, key_id="key_x", model="seedance", upstream="ark", kind="video",
                   request={"prompt": "a cat", "duration": 5}, deadline_at=deadline, hold_id="h1")
    await store.create_task(t)
    with pytest.raises(ValueError):
        await store.create_task(t)
    got = await store.get_task("task_1")
    assert (got.state, got.request, got.deadline_at, got.cost, got.attempts) == ("queued", {"prompt": "a cat", "duration": 5},
                                                                                deadline, None, 0)
    assert await store.update_task("task_1", expect_state="queued", state="running", provider_task_id="cgt-1",
                                   attempts=1, next_poll_at=deadline) is True
    assert await store.update_task("task_1", expect_state="queued", state="failed") is False  # compare-and-set
    assert await store.update_task("task_1", expect_state="running", state="succeeded", result={"url": "https://x/v.mp4"},
                                   usage={"completion_tokens": 108900}, cost=Decimal("0.13")) is True
    got = await store.get_task("task_1")
    assert (got.state, got.provider_task_id, got.result, got.usage, got.cost, got.attempts) == (
        "succeeded", "cgt-1", {"url": "https://x/v.mp4"}, {"completion_tokens": 108900}, Decimal("0.13"), 1)
    assert got.updated_at >= got.created_at
    with pytest.raises(ValueError, match="unknown task field"):
        await store.update_task("task_1", **{"state = 'x' --": 1})
    with pytest.raises(ValueError, match="invalid task update"):
        await store.update_task("task_1", request=None)  # NOT NULL
    assert (await store.get_task("task_1")).request == {"prompt": "a cat", "duration": 5}
    await store.create_task(TaskRecord(id="task_2", user_id=u.id, model="seedance", next_poll_at=deadline))
    await store.create_task(TaskRecord(id="task_3", user_id=u.id, model="seedance",
                                       next_poll_at=dt.datetime(2029, 1, 1, tzinfo=UTC)))
    assert [x.id for x in await store.list_tasks()] == ["task_3", "task_2", "task_1"]
    assert [x.id for x in await store.list_tasks(unfinished_only=True)] == ["task_3", "task_2"]
    assert [x.id for x in await store.list_tasks(due_before=dt.datetime(2029, 6, 1, tzinfo=UTC))] == ["task_3"]
    assert await store.list_tasks(user_id=999) == []
    assert await store.get_task("nope") is None


# ---------------------------------------------------------------- concurrency


async def test_two_connections_racing_holds_never_overdraw(tmp_path: Path) -> None:
    """Two storages on one file = two processes: 2 x 100 holds of $0.10 against
    $5.00 with settlements interleaved; the balance never goes negative."""
    a, b = SQLiteStorage("sqlite:///shared.db", tmp_path), SQLiteStorage("sqlite:///shared.db", tmp_path)
    await a.open()
    await b.open()
    try:
        user = await a.create_user("alice", Decimal("5"))
        admitted: list[str] = []

        async def one(s: SQLiteStorage, i: int) -> None:
            hid = f"h{i}"
            if await s.hold(hid, user_id=user.id, key_id=None, amount=Decimal("0.10")):
                admitted.append(hid)
                await asyncio.sleep(random.random() / 100)
                await s.settle(hid, cost=Decimal("0.07"), record=record(f"r{i}", user.id))

        await asyncio.gather(*(one(a if i % 2 else b, i) for i in range(200)))
        final = await b.get_user("alice")
        assert final.held == 0 and final.balance >= 0
        assert len(admitted) <= 71  # floor(5.00 / 0.07): the holds bound what can be spent
        assert final.balance == Decimal(5) - Decimal("0.07") * len(admitted) == await ledger_sum(a, user.id)
        assert await a.open_holds() == 0
        assert len(await a.list_usage(limit=10_000)) == len(admitted)
    finally:
        await a.close()
        await b.close()


WORKER = """
import asyncio, sys
from decimal import Decimal
from cheapproxy.storage.base import UsageRecord
from cheapproxy.storage.sqlite import SQLiteStorage

async def main(url, base, tag):
    s = SQLiteStorage(url, base)
    await s.open()
    user = await s.get_user("alice")
    async def one(i):
        hid = f"{tag}-{i}"
        if await s.hold(hid, user_id=user.id, key_id=None, amount=Decimal("0.05")):
            await asyncio.sleep(0.001)
            rec = UsageRecord(request_id=hid, user_id=user.id, key_id=None, model="m", upstream=None,
                              protocol="p", streamed=False, status="ok")
            await s.settle(hid, cost=Decimal("0.03"), record=rec)
            return 1
        return 0
    n = sum(await asyncio.gather(*(one(i) for i in range(150))))
    await s.close()
    print(n)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_worker_processes_share_the_file(tmp_path: Path) -> None:
    """Three real processes (serve --workers 3) race holds and settlements on one file."""
    import sys

    s = SQLiteStorage("sqlite:///procs.db", tmp_path)
    await s.open()
    try:
        user = await s.create_user("alice", Decimal("3"))
        procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", WORKER, "sqlite:///procs.db", str(tmp_path), f"p{i}",
                                                      stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                 for i in range(3)]
        outs = [await p.communicate() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [o[1].decode()[-2000:] for o in outs]
        admitted = sum(int(o[0]) for o in outs)
        final = await s.get_user("alice")
        assert 60 <= admitted <= 100  # 3.00 / 0.03: holds of 0.05 may refuse a few near the end
        assert final.balance == Decimal(3) - Decimal("0.03") * admitted == await ledger_sum(s, user.id)
        assert final.balance >= 0 and final.held == 0 and await s.open_holds() == 0
    finally:
        await s.close()


async def test_memory_database_is_safe_under_concurrency() -> None:
    s = SQLiteStorage("sqlite://:memory:")
    await s.open()
    try:
        u = await s.create_user("alice", Decimal("1"))

        async def one(i: int) -> bool:
            if not await s.hold(f"h{i}", user_id=u.id, key_id=None, amount=Decimal("0.3")):
                return False
            await asyncio.sleep(0)
            return await s.settle(f"h{i}", cost=Decimal("0.25"), record=record(f"r{i}", u.id)) is not None

        done = await asyncio.gather(*(one(i) for i in range(30)))
        user = await s.get_user("alice")
        assert user.balance == Decimal(1) - Decimal("0.25") * sum(done) == await ledger_sum(s, u.id)
        assert 3 <= sum(done) <= 4 and user.held == 0
    finally:
        await s.close()
