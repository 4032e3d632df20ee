"""The SQLite charge queue: a batch whose charges all fit in leases this
process knows is made durable as rows of ``charge_queue`` and applied to
users, keys, holds, ledger and usage later, in bulk, by any process -- before
any write and before any read of balances, ledger or usage.  The outcome must
be the one the exact path (every row read and written in the batch's own
transaction) gives, and nothing may be lost to a crash, a released lease, a
duplicate or a second process."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import sqlite3
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cheapproxy.storage.sqlite import SQLiteStorage

from .test_billing import ledger_sum, make_key, rec

D = Decimal


def queued(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM charge_queue").fetchone()[0]


def table(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStorage("sqlite:///q.db", tmp_path)
    await s.open()
    yield s
    await s.close()


async def test_a_covered_batch_is_queued_and_every_read_sees_it_applied(store, tmp_path):
    u = await store.create_user("alice", D("1.00"))
    key = await make_key(store, u.id)
    assert await store.hold("L", user_id=u.id, key_id=key.id, amount=D("0.50"))
    # the first batch of a lease reads its row (exact path): nothing queued
    assert await store.charge_batch([("L", D("0.10"), rec("r1", u.id), "charge")]) == [(D("0.10"), D("0.10"))]
    assert queued(tmp_path / "q.db") == 0
    out = await store.charge_batch([("L", D("0.05"), rec("r2", u.id), "charge"),
                                    ("L", D("0.07"), rec("r3", u.id), "charge")])
    assert out == [(D("0.05"), D("0.05")), (D("0.07"), D("0.07"))]
    db = tmp_path / "q.db"
    assert queued(db) == 2  # durable, not yet applied
    assert table(db, "SELECT balance, held FROM users") == [(900_000, 400_000)]
    # a read that shows money applies the queue first
    user = await store.get_user("alice")
    assert (user.balance, user.held) == (D("0.78"), D("0.28"))
    assert queued(db) == 0
    assert [(e.amount, e.reference, e.balance_after) for e in await store.ledger(u.id) if e.kind == "charge"] == [
        (D("-0.10"), "r1", D("0.90")), (D("-0.05"), "r2", D("0.85")), (D("-0.07"), "r3", D("0.78"))]
    assert await ledger_sum(store, u.id) == user.balance
    assert (await store.get_usage("r3")).cost == D("0.07") and (await store.get_usage("r3")).unpaid == 0
    assert table(db, "SELECT amount FROM holds WHERE id = 'L'") == [(280_000,)]
    assert table(db, "SELECT spent, held FROM api_keys") == [(220_000, 280_000)]


async def test_a_charge_past_the_lease_takes_the_exact_path(store, tmp_path):
    u = await store.create_user("bob", D("1.00"))
    assert await store.hold("L", user_id=u.id, key_id=None, amount=D("0.10"))
    await store.charge_batch([("L", D("0.04"), rec("a", u.id, None), "charge")])
    await store.charge_batch([("L", D("0.04"), rec("b", u.id, None), "charge")])  # queued: 0.02 left
    assert queued(tmp_path / "q.db") == 1
    # 0.05 > 0.02 left: the queue is applied, then this batch, in one transaction
    out = await store.charge_batch([("L", D("0.05"), rec("c", u.id, None), "charge")])
    assert out == [(D("0.05"), D("0.02"))]
    assert queued(tmp_path / "q.db") == 0
    user = await store.get_user("bob")
    assert (user.balance, user.held) == (D("0.87"), D(0))
    assert await ledger_sum(store, u.id) == user.balance


async def test_queued_charges_survive_a_crash(tmp_path):
    """A process queues charges and dies without closing its storage: the
    next open applies them."""
    script = textwrap.dedent(f"""
        import asyncio, os
        from decimal import Decimal as D
        from cheapproxy.storage.sqlite import SQLiteStorage
        from cheapproxy.storage.base import UsageRecord
        def rec(rid, uid):
            return UsageRecord(request_id=rid, user_id=uid, key_id=None, model="m", upstream="u",
                               protocol="openai-chat", streamed=False, status="ok")
        async def main():
            s = SQLiteStorage("sqlite:///q.db", {str(tmp_path)!r})
            await s.open()
            u = await s.create_user("carol", D("5"))
            assert await s.hold("L", user_id=u.id, key_id=None, amount=D("1"))
            await s.charge_batch([("L", D("0.01"), rec("first", u.id), "charge")])
            for i in range(30):
                await s.charge_batch([("L", D("0.001"), rec(f"q{{i}}-{{j}}", u.id), "charge") for j in range(3)])
            print("queued", flush=True)
            os._exit(0)  # no close, no fold: what a kill -9 leaves
        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "queued", done.stderr
    db = tmp_path / "q.db"
    assert queued(db) == 90
    s = SQLiteStorage("sqlite:///q.db", tmp_path)
    await s.open()
    try:
        assert queued(db) == 0
        user = await s.get_user("carol")
        assert (user.balance, user.held) == (D("4.9"), D("0.9"))  # the lease stays open: the sweeper's job
        charges = [e for e in await s.ledger(user.id) if e.kind == "charge"]
        assert len(charges) == 91 and {e.reference for e in charges} >= {"q0-0", "q29-2"}
        assert await ledger_sum(s, user.id) == user.balance
        assert len(await s.list_usage()) == 91
        assert await s.release_stale_holds(older_than=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)) == 1
        user = await s.get_user("carol")
        assert (user.balance, user.held) == (D("4.9"), D(0))
    finally:
        await s.close()


async def test_a_lease_released_under_a_queued_charge_charges_the_free_balance(tmp_path):
    """Another process's sweeper releases a lease this process still charges
    against (it cannot know): the charge is taken from the free balance, never
    dropped, never twice."""
    a = SQLiteStorage("sqlite:///q.db", tmp_path)
    b = SQLiteStorage("sqlite:///q.db", tmp_path)
    await a.open()
    await b.open()
    try:
        u = await a.create_user("dave", D("1.00"))
        key = await make_key(a, u.id)
        assert await a.hold("L", user_id=u.id, key_id=key.id, amount=D("0.30"))
        await a.charge_batch([("L", D("0.10"), rec("r1", u.id), "charge")])
        assert await b.release_stale_holds(older_than=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)) == 1
        # a still believes 0.20 is left in L: queued
        assert await a.charge_batch([("L", D("0.15"), rec("r2", u.id), "charge")]) == [(D("0.15"), D("0.15"))]
        assert queued(tmp_path / "q.db") == 1
        user = await b.get_user("dave")  # the other process applies it, from the free balance
        assert (user.balance, user.held) == (D("0.75"), D(0))
        assert await ledger_sum(b, u.id) == user.balance
        assert (await b.get_usage("r2")).unpaid == 0
        assert (await b.get_key_by_hash(key.key_hash)).spent == D("0.25")
        # the free balance now all held elsewhere: a queued charge finds nothing to
        # take, the shortfall is recorded as unpaid, the balance never goes below it
        assert await b.hold("M", user_id=u.id, key_id=key.id, amount=D("0.75"))
        assert await a.charge_batch([("L", D("0.05"), rec("r3", u.id), "charge")]) == [(D("0.05"), D("0.05"))]
        assert queued(tmp_path / "q.db") == 1
        user = await b.get_user("dave")
        assert (user.balance, user.held) == (D("0.75"), D("0.75"))
        r3 = await b.get_usage("r3")
        assert (r3.cost, r3.unpaid) == (D("0.05"), D("0.05"))
        assert await ledger_sum(b, u.id) == user.balance
        # L is used up in a's eyes: the next charge takes the exact path, which refuses it
        with pytest.raises(ValueError, match="not open"):
            await a.charge_batch([("L", D("0.01"), rec("r4", u.id), "charge")])
    finally:
        await a.close()
        await b.close()


async def test_a_request_queued_twice_is_charged_once(store, tmp_path):
    u = await store.create_user("erin", D("1.00"))
    assert await store.hold("L", user_id=u.id, key_id=None, amount=D("0.50"))
    await store.charge_batch([("L", D("0.01"), rec("x", u.id, None), "charge")])
    await store.charge_batch([("L", D("0.02"), rec("dup", u.id, None), "charge")])
    await store.charge_batch([("L", D("0.02"), rec("dup", u.id, None), "charge"),
                              ("L", D("0.03"), rec("y", u.id, None), "charge")])
    await store.charge_batch([("L", D("0.01"), rec("x", u.id, None), "charge")])  # already applied before
    assert queued(tmp_path / "q.db") == 4
    user = await store.get_user("erin")
    assert queued(tmp_path / "q.db") == 0  # the queue did not stick on the duplicates
    assert [e.reference for e in await store.ledger(u.id) if e.kind == "charge"] == ["x", "dup", "y"]
    assert user.balance == D("0.94") and await ledger_sum(store, u.id) == user.balance
    assert await store.release("L") is True
    assert (await store.get_user("erin")).held == 0


async def test_writes_apply_the_queue_first(store, tmp_path):
    """A top-up or transfer after queued charges writes the balance those
    charges left (balance_after in order), as the exact path would."""
    u = await store.create_user("fay", D("1.00"))
    v = await store.create_user("gus", D("0"))
    assert await store.hold("L", user_id=u.id, key_id=None, amount=D("0.50"))
    await store.charge_batch([("L", D("0.10"), rec("a", u.id, None), "charge")])
    await store.charge_batch([("L", D("0.10"), rec("b", u.id, None), "charge")])
    assert queued(tmp_path / "q.db") == 1
    await store.credit(u.id, D("1"), kind="topup", reference="t1")
    await store.charge_batch([("L", D("0.10"), rec("c", u.id, None), "charge")])
    await store.transfer(from_user_id=u.id, to_user_id=v.id, amount=D("0.5"), reference="tr1")
    entries = [(e.kind, e.amount, e.balance_after) for e in await store.ledger(u.id)]
    assert entries == [("topup", D("1.00"), D("1.00")), ("charge", D("-0.10"), D("0.90")),
                       ("charge", D("-0.10"), D("0.80")), ("topup", D("1"), D("1.80")),
                       ("charge", D("-0.10"), D("1.70")), ("transfer_out", D("-0.5"), D("1.20"))]


async def test_the_queue_is_applied_in_the_background_and_at_close(tmp_path):
    s = SQLiteStorage("sqlite:///q.db", tmp_path)
    s.fold_every = 0.05
    await s.open()
    u = await s.create_user("hal", D("1"))
    assert await s.hold("L", user_id=u.id, key_id=None, amount=D("0.5"))
    await s.charge_batch([("L", D("0.01"), rec("a", u.id, None), "charge")])
    await s.charge_batch([("L", D("0.01"), rec("b", u.id, None), "charge")])
    assert queued(tmp_path / "q.db") == 1
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not queued(tmp_path / "q.db"):
            break
    assert queued(tmp_path / "q.db") == 0  # applied by the timer, no read needed
    await s.charge_batch([("L", D("0.01"), rec("c", u.id, None), "charge")])
    await s.close()
    assert queued(tmp_path / "q.db") == 0
    assert table(tmp_path / "q.db", "SELECT balance FROM users") == [(970_000,)]


async def test_queue_and_exact_path_give_the_same_books(tmp_path):
    """Random batches through the queue, against the same batches with the
    queue off (every batch exact): the same users, keys, holds, ledger and
    usage, two processes sharing the queued database."""
    rng = random.Random(7)
    users = [("u1", D("2.00"), None), ("u2", D("0.40"), D("0.30")), ("u3", D("1.00"), D("5"))]
    batches = []
    n = 0
    for _ in range(120):
        batch = []
        for _ in range(rng.randint(1, 6)):
            n += 1
            who = rng.randrange(3)
            micros = rng.randint(0, 8_000) if rng.random() < 0.9 else rng.randint(0, 100_000)
            batch.append((who, D(micros) / 1_000_000, f"r{n}"))
        batches.append(batch)

    async def books(tag: str, queue: bool) -> dict[str, Any]:
        s1 = SQLiteStorage(f"sqlite:///{tag}.db", tmp_path)
        s2 = SQLiteStorage(f"sqlite:///{tag}.db", tmp_path)
        await s1.open()
        await s2.open()
        leases = []
        took_queue = 0
        for i, (name, bal, cap) in enumerate(users):
            u = await s1.create_user(name, bal)
            await make_key(s1, u.id, kid=f"k{i}", max_spend=cap)
            assert await s1.hold(f"L{i}a", user_id=u.id, key_id=f"k{i}", amount=D("0.20"))
            assert await s1.hold(f"L{i}b", user_id=u.id, key_id=f"k{i}", amount=D("0.05"))
            leases.append((u.id, f"k{i}"))
        for j, batch in enumerate(batches):
            s = (s1, s2)[j % 2]
            items = [(f"L{who}{'ab'[j % 2]}", cost, rec(rid, leases[who][0], leases[who][1]), "charge")
                     for who, cost, rid in batch]
            if not queue:
                s1._lease_room.clear()
                s2._lease_room.clear()
            await s.charge_batch(items)
            took_queue += queued(tmp_path / f"{tag}.db") > 0
        assert (took_queue > 15) if queue else took_queue == 0
        await s1.close()
        await s2.close()
        db = tmp_path / f"{tag}.db"
        assert queued(db) == 0
        return {
            "users": table(db, "SELECT name, balance, held FROM users ORDER BY id"),
            "keys": table(db, "SELECT id, spent, held FROM api_keys ORDER BY id"),
            "holds": table(db, "SELECT id, amount, state FROM holds ORDER BY id"),
            "ledger": table(db, "SELECT user_id, amount, kind, reference, balance_after FROM ledger ORDER BY id"),
            "usage": table(db, "SELECT request_id, cost, unpaid FROM usage ORDER BY request_id"),
        }

    assert await books("queued", True) == await books("exact", False)


async def test_a_long_queue_is_applied_in_chunks(tmp_path):
    s = SQLiteStorage("sqlite:///q.db", tmp_path)
    s.fold_every, s.fold_after = 3600, 10**9  # nothing applies it but the read below
    await s.open()
    try:
        u = await s.create_user("ivy", D("100"))
        assert await s.hold("L", user_id=u.id, key_id=None, amount=D("50"))
        await s.charge_batch([("L", D("0.01"), rec("first", u.id, None), "charge")])
        for b in range(11):
            await s.charge_batch([("L", D("0.000003"), rec(f"c{b}-{i}", u.id, None), "charge") for i in range(100)])
        assert queued(tmp_path / "q.db") == 1100  # more than two chunks of 500
        user = await s.get_user("ivy")
        assert queued(tmp_path / "q.db") == 0
        assert user.balance == D("100") - D("0.01") - 1100 * D("0.000003") and user.held == D("50") - (D("100") - user.balance)
        ledger = await s.ledger(u.id)
        assert len(ledger) == 1102 and await ledger_sum(s, u.id) == user.balance
        assert [e.balance_after for e in ledger][-1] == user.balance
    finally:
        await s.close()


async def test_the_background_fold_goes_in_short_steps_with_the_loop_free_between(tmp_path):
    """A fold runs on the loop's own connection, so every request waits while
    one runs: a long queue is applied ``fold_step`` rows per transaction,
    ``fold_pause`` apart, and other coroutines run between the steps (each
    sees the queue shorter by a step, never half a step), until all of it is
    applied."""
    s = SQLiteStorage("sqlite:///q.db", tmp_path)
    s.fold_every, s.fold_after, s.fold_step = 3600, 50, 10
    await s.open()
    try:
        u = await s.create_user("joe", D("10"))
        assert await s.hold("L", user_id=u.id, key_id=None, amount=D("5"))
        await s.charge_batch([("L", D("0.01"), rec("first", u.id, None), "charge")])  # the exact path: the lease is learned
        seen = []
        await s.charge_batch([("L", D("0.001"), rec(f"r{i}", u.id, None), "charge") for i in range(55)])
        for _ in range(500):  # the fold was started by the batch (55 >= fold_after)
            seen.append(queued(tmp_path / "q.db"))
            if not seen[-1]:
                break
            await asyncio.sleep(0.001)
        steps = sorted(set(seen), reverse=True)
        assert steps[0] == 55 and steps[-1] == 0
        assert all(n % 10 == 5 for n in steps[:-1]) and len(steps) >= 4  # whole steps of 10, seen between them
        user = await s.get_user("joe")
        assert user.balance == D("10") - D("0.01") - 55 * D("0.001")
        assert await ledger_sum(s, u.id) == user.balance and len(await s.ledger(u.id)) == 57
    finally:
        await s.close()


async def test_close_finishes_a_fold_under_way_without_its_pauses(tmp_path):
    s = SQLiteStorage("sqlite:///q.db", tmp_path)
    s.fold_every, s.fold_after, s.fold_step, s.fold_pause = 3600, 50, 10, 30.0
    await s.open()
    u = await s.create_user("kim", D("10"))
    assert await s.hold("L", user_id=u.id, key_id=None, amount=D("5"))
    await s.charge_batch([("L", D("0.01"), rec("first", u.id, None), "charge")])
    await s.charge_batch([("L", D("0.001"), rec(f"r{i}", u.id, None), "charge") for i in range(55)])
    await asyncio.sleep(0.05)
    assert queued(tmp_path / "q.db") == 45  # one step applied, the fold now pausing
    await asyncio.wait_for(s.close(), 5)  # not 30 s a step
    assert queued(tmp_path / "q.db") == 0
    assert table(tmp_path / "q.db", "SELECT balance FROM users") == [(10_000_000 - 10_000 - 55_000,)]
