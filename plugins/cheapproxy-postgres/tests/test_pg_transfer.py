"""Transfers on PostgreSQL: the core's transfer tests (tests/test_transfer.py)
re-run on a PostgresStorage, and the multi-instance cases -- opposite
transfers at once on two instances (I3: the total never changes; ordered row
locks, so no deadlock even happens), transfers while the same users spend and
a stale-hold sweep runs (reliability test 41), concurrent Idempotency-Keys,
and the deadlock retry safety net against a real PostgreSQL deadlock."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from decimal import Decimal

import asyncpg

from cheapproxy.storage.base import UsageRecord
from cheapproxy.transfer import do_transfer
from cheapproxy_postgres.storage import PostgresStorage
from pg_testlib import core_tests, ledger_sum, opened

D = Decimal
_core = core_tests("test_transfer")

# the core's transfer tests; their ``store`` fixture is a PostgresStorage here
test_success_moves_both_sides_atomically = _core.test_success_moves_both_sides_atomically
test_errors_have_status_and_body_and_move_nothing = _core.test_errors_have_status_and_body_and_move_nothing
test_held_money_cannot_be_transferred = _core.test_held_money_cannot_be_transferred
test_idempotency_stores_executed_results_only = _core.test_idempotency_stores_executed_results_only

SHORT = (400, {"success": False, "error": "Insufficient balance"})


async def balances(s: PostgresStorage) -> dict[str, Decimal]:
    return {u.name: u.balance for u in await s.list_users()}


async def test_concurrent_opposite_transfers_on_two_instances(pg_url: str) -> None:
    """300 random transfers among three users, A->B and B->A at once, split
    over two instances: no error surfaces, the total stays $30, nobody goes
    below zero, and ordered locking means PostgreSQL never saw a deadlock."""
    s1, s2 = await opened(pg_url), await opened(pg_url)
    try:
        users = [await s1.create_user(n, D("10")) for n in ("a", "b", "c")]
        rnd = random.Random(7)

        async def one(i: int) -> tuple[int, dict]:
            sender, receiver = rnd.sample(users, 2)
            amount = f"{rnd.randint(1, 400) / 100:.2f}"
            return await do_transfer(s1 if i % 2 else s2, sender=sender, body={"toUsername": receiver.name, "amount": amount},
                                     idempotency_key=None)

        results = await asyncio.gather(*(one(i) for i in range(300)))
        assert all((st == 200 and b["success"] is True) or (st, b) == SHORT for st, b in results)
        ok = sum(1 for r in results if r[0] == 200)
        assert ok > 100
        final = await balances(s2)
        assert sum(final.values()) == D(30) and min(final.values()) >= 0
        for u in users:
            assert final[u.name] == await ledger_sum(s1, u.id)
            assert min(e.balance_after for e in await s1.ledger(u.id)) >= 0
        outs = [e for u in users for e in await s1.ledger(u.id) if e.kind == "transfer_out"]
        assert len(outs) == ok
        assert s1.conflict_retries == s2.conflict_retries == 0
    finally:
        await s1.close()
        await s2.close()


async def test_transfers_while_spending_keep_the_books(pg_url: str) -> None:
    """Reliability test 41, scaled: 20 users x $10; 1000 random transfers
    (including simultaneous opposite pairs) while the same users hold and
    settle calls and both instances sweep stale holds.  Sum before == sum
    after + charges; nobody below zero; every balance equals its ledger."""
    s1, s2 = await opened(pg_url), await opened(pg_url)
    stores = (s1, s2)
    try:
        users = [await s1.create_user(f"u{i:02d}", D("10")) for i in range(20)]
        rnd = random.Random(41)

        async def transfer(i: int) -> int:
            a, b = rnd.sample(users, 2)
            pair = [(a, b), (b, a)] if i % 5 == 0 else [(a, b)]  # every fifth: A->B and B->A at the same moment
            amount = {"amount": f"{rnd.randint(1, 150) / 100:.2f}"}
            res = await asyncio.gather(*(do_transfer(stores[(i + k) % 2], sender=x, body={"toUsername": y.name, **amount},
                                                     idempotency_key=None) for k, (x, y) in enumerate(pair)))
            assert all(st == 200 or (st, body) == SHORT for st, body in res)
            return sum(1 for st, _ in res if st == 200)

        async def spend(i: int) -> None:
            u = users[i % len(users)]
            s = stores[i % 2]
            if await s.hold(f"h{i}", user_id=u.id, key_id=None, amount=D("0.20")):
                await asyncio.sleep(random.random() / 200)
                rec = UsageRecord(request_id=f"r{i}", user_id=u.id, key_id=None, model="m", upstream=None,
                                  protocol="p", streamed=False, status="ok")
                await s.settle(f"h{i}", cost=D("0.15"), record=rec)  # None when a sweep released it first

        async def sweep(s: PostgresStorage) -> int:
            released = 0
            for _ in range(15):
                released += await s.release_stale_holds(dt.datetime.now(dt.timezone.utc))
                await asyncio.sleep(0.01)
            return released

        work = [transfer(i) for i in range(1000)] + [spend(i) for i in range(400)] + [sweep(s1), sweep(s2)]
        rnd_order = random.Random(5)
        rnd_order.shuffle(work)
        await asyncio.gather(*work)

        final = {u.name: u for u in await s2.list_users()}
        charges = D(0)
        for u in users:
            ledger = await s1.ledger(u.id)
            charges += -sum((e.amount for e in ledger if e.kind == "charge"), D(0))
            assert final[u.name].balance == await ledger_sum(s1, u.id)
            assert final[u.name].balance >= 0 and final[u.name].held == 0
            assert min(e.balance_after for e in ledger) >= 0
        assert D(200) == sum((u.balance for u in final.values()), D(0)) + charges
        assert charges > 0 and await s1.open_holds() == 0
        usage = await s1.list_usage(limit=10_000)
        assert sum((r.cost for r in usage), D(0)) == charges  # settled ones; released ones wrote no usage row
        assert s1.conflict_retries == s2.conflict_retries == 0  # lock order held: no deadlock, nothing to retry
    finally:
        await s1.close()
        await s2.close()


async def test_idempotency_concurrent_same_key_on_two_instances(pg_url: str) -> None:
    s1, s2 = await opened(pg_url), await opened(pg_url)
    try:
        alice = await s1.create_user("alice", D("10"))
        await s1.create_user("bob")
        body = {"toUsername": "bob", "amount": "3.00"}
        results = await asyncio.gather(*(do_transfer(s1 if i % 2 else s2, sender=alice, body=body, idempotency_key="key-1")
                                         for i in range(20)))
        want = (200, {"success": True, "amount": "3.00", "from": "alice", "to": "bob",
                      "senderNewBalance": "7.00", "receiverNewBalance": "3.00"})
        assert results == [want] * 20
        assert len([e for e in await s1.ledger(alice.id) if e.kind == "transfer_out"]) == 1
        assert await balances(s2) == {"alice": D(7), "bob": D(3)}
        assert await do_transfer(s2, sender=alice, body={"toUsername": "bob", "amount": 3}, idempotency_key="key-1") == want
        assert await do_transfer(s1, sender=alice, body={"toUsername": "bob", "amount": "4.00"}, idempotency_key="key-1") == (
            409, {"success": False, "error": "Idempotency-Key reused with a different request"})
        # an executed "insufficient balance" is stored once too, whichever instance ran it
        short = await asyncio.gather(*(do_transfer(s2 if i % 2 else s1, sender=alice, body={"toUsername": "bob", "amount": 50},
                                                   idempotency_key="key-2") for i in range(10)))
        assert short == [SHORT] * 10
        stored = await s1.get_idempotent(f"transfer:{alice.id}", "key-2")
        assert stored is not None and stored[1] == 400
        assert await balances(s1) == {"alice": D(7), "bob": D(3)}
    finally:
        await s1.close()
        await s2.close()


async def test_a_real_deadlock_is_retried_not_surfaced(store: PostgresStorage) -> None:
    """Two transactions lock two user rows in opposite order (what the backend
    itself never does): PostgreSQL aborts one with deadlock_detected, the
    backend re-runs it, and both complete."""
    a = await store.create_user("a", D(1))
    b = await store.create_user("b", D(1))
    first_locked = [asyncio.Event(), asyncio.Event()]
    runs = {"x": 0, "y": 0}

    def locker(name: str, mine: int, theirs: int, me: int) -> object:
        async def fn(db: asyncpg.Connection) -> str:
            runs[name] += 1
            await db.execute("UPDATE users SET held = held WHERE id = $1", mine)
            first_locked[me].set()
            await first_locked[1 - me].wait()  # both hold one row; now each wants the other's
            await db.execute("UPDATE users SET held = held WHERE id = $1", theirs)
            return name

        return fn

    got = await asyncio.wait_for(asyncio.gather(store._write(locker("x", a.id, b.id, 0)),
                                                store._write(locker("y", b.id, a.id, 1))), 30)
    assert got == ["x", "y"]
    assert store.conflict_retries == 1 and sorted(runs.values()) == [1, 2]
    assert [u.balance for u in await store.list_users()] == [D(1), D(1)]
