"""Lease billing (the request path): in-memory reservations against a leased
slice of the balance, settlements committed in batches.  The money invariants
are the same as the plain path's: never below zero, balance == sum(ledger),
admitted bounded, charged exactly once, no hold left open."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from pathlib import Path

import pytest

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.leases import LeaseBilling, LeaseHold
from cheapproxy.storage.sqlite import SQLiteStorage

from .test_billing import SCHEME, ledger_sum, make_key, rec, reserve
from .test_charge_queue import queued

D = Decimal


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStorage("sqlite:///lease.db", tmp_path)
    await s.open()
    yield s
    await s.close()


async def test_reserve_settle_release_exactly_once(store):
    u = await store.create_user("alice", D("1.00"))
    key = await make_key(store, u.id)
    b = LeaseBilling(store, lease_multiple=4)
    h = await reserve(b, "r1", u.id, key)
    assert isinstance(h, LeaseHold) and h.amount == D("0.03")
    assert (await store.get_user("alice")).held == D("0.12")  # one lease of 4 x 0.03
    h2 = await reserve(b, "r2", u.id, key)
    assert h2.lease is h.lease and await store.open_holds() == 1  # served from the same lease, in memory
    cost = await b.settle(h, scheme=SCHEME, usage=ir.Usage(input_tokens=100, output_tokens=50), record=rec("r1", u.id))
    assert cost == D("0.002") and await b.settle(h, scheme=SCHEME, usage=ir.Usage(output_tokens=999), record=rec("r1", u.id)) == cost
    assert await b.release(h2, record=rec("r2", u.id)) is True and await b.release(h2) is False
    await b.flush()
    user = await store.get_user("alice")
    assert (user.balance, user.held) == (D("0.998"), D(0)) and await store.open_holds() == 0
    assert await ledger_sum(store, u.id) == user.balance
    assert [e.reference for e in await store.ledger(u.id) if e.kind == "charge"] == ["r1"]
    usage = {r.request_id: r for r in await store.list_usage()}
    assert usage["r1"].cost == D("0.002") and usage["r2"].cost == 0
    k = await store.get_key_by_hash(key.key_hash)
    assert k.spent == D("0.002")


async def test_concurrent_requests_never_overdraw(store):
    """200 concurrent requests, each holding $0.03 and costing $0.02 or more, against $0.30."""
    u = await store.create_user("bob", D("0.30"))
    key = await make_key(store, u.id)
    b = LeaseBilling(store, lease_multiple=8)
    admitted, refused = [], 0

    async def one(i):
        nonlocal refused
        try:
            h = await reserve(b, f"q{i}", u.id, key)
        except ProxyError as e:
            assert e.status == 402
            refused += 1
            return
        admitted.append(i)
        await asyncio.sleep(random.random() / 100)
        await b.settle(h, scheme=SCHEME, usage=ir.Usage(input_tokens=random.randint(0, 1000), output_tokens=1000),
                       record=rec(f"q{i}", u.id))

    await asyncio.gather(*(one(i) for i in range(200)))
    await b.flush()
    user = await store.get_user("bob")
    charges = [e for e in await store.ledger(u.id) if e.kind == "charge"]
    assert user.balance >= 0 and user.held == 0 and await store.open_holds() == 0
    assert await ledger_sum(store, u.id) == user.balance
    assert sum(-e.amount for e in charges) == D("0.30") - user.balance
    # each admitted request costs at least $0.02, so at most 15 fit in $0.30
    assert 10 <= len(charges) == len(admitted) <= 15 and refused == 200 - len(admitted)
    assert len({e.reference for e in charges}) == len(charges)


async def test_two_processes_share_a_balance(tmp_path):
    """Two storages on one file (as two worker processes): leases are real holds."""
    s1, s2 = SQLiteStorage("sqlite:///two.db", tmp_path), SQLiteStorage("sqlite:///two.db", tmp_path)
    await s1.open()
    await s2.open()
    try:
        u = await s1.create_user("carol", D("0.30"))
        key = await make_key(s1, u.id)
        billings = [LeaseBilling(s1, lease_multiple=4), LeaseBilling(s2, lease_multiple=4)]
        ok = 0

        async def one(i):
            nonlocal ok
            b = billings[i % 2]
            try:
                h = await reserve(b, f"t{i}", u.id, key)
            except ProxyError:
                return
            ok += 1
            await b.settle(h, scheme=SCHEME, usage=ir.Usage(input_tokens=1000, output_tokens=1000), record=rec(f"t{i}", u.id))

        await asyncio.gather(*(one(i) for i in range(100)))
        for b in billings:
            await b.flush()
        user = await s1.get_user("carol")
        assert user.balance == D("0.30") - ok * D("0.03") >= 0 and ok <= 10
        assert user.held == 0 and await s1.open_holds() == 0 and await ledger_sum(s1, u.id) == user.balance
    finally:
        await s1.close()
        await s2.close()


async def test_cost_above_the_hold_is_capped_and_recorded_unpaid(store):
    u = await store.create_user("dan", D("0.05"))
    key = await make_key(store, u.id)
    b = LeaseBilling(store, lease_multiple=1)
    h = await reserve(b, "big", u.id, key)  # holds 0.03
    cost = await b.settle(h, scheme=SCHEME, usage=ir.Usage(output_tokens=5000), record=rec("big", u.id))  # 0.10
    await b.flush()
    user = await store.get_user("dan")
    assert cost == D("0.10") and user.balance == 0 and user.held == 0
    (r,) = await store.list_usage()
    assert (r.cost, r.unpaid) == (D("0.10"), D("0.05"))


async def test_idle_lease_is_released_by_itself(store):
    u = await store.create_user("eve", D("1"))
    key = await make_key(store, u.id)
    b = LeaseBilling(store, lease_idle_seconds=0.05)
    h = await reserve(b, "x", u.id, key)
    await b.release(h)
    assert await store.open_holds() == 1
    for _ in range(100):
        await asyncio.sleep(0.02)
        if await store.open_holds() == 0:
            break
    assert await store.open_holds() == 0 and (await store.get_user("eve")).held == 0 and b.open_leases() == 0


async def test_cancelled_waiter_still_commits(store):
    u = await store.create_user("fay", D("1"))
    key = await make_key(store, u.id)
    b = LeaseBilling(store)
    h = await reserve(b, "c1", u.id, key)
    t = asyncio.ensure_future(b.settle(h, scheme=SCHEME, usage=ir.Usage(output_tokens=100), record=rec("c1", u.id)))
    await asyncio.sleep(0)
    t.cancel()
    await b.flush()
    assert [e.reference for e in await store.ledger(u.id) if e.kind == "charge"] == ["c1"]
    assert await store.open_holds() == 0


async def test_a_lease_released_under_a_request_still_charges(store):
    """If the stale-hold sweeper released a lease while a request used it, the
    charge is taken from the free balance instead of being dropped."""
    u = await store.create_user("gus", D("1"))
    key = await make_key(store, u.id)
    b = LeaseBilling(store)
    h1 = await reserve(b, "g1", u.id, key)
    h2 = await reserve(b, "g2", u.id, key)
    assert await store.release(h1.lease.id)  # the sweeper took it
    await asyncio.gather(
        b.settle(h1, scheme=SCHEME, usage=ir.Usage(output_tokens=100), record=rec("g1", u.id)),
        b.settle(h2, scheme=SCHEME, usage=ir.Usage(output_tokens=200), record=rec("g2", u.id)))
    await b.flush()
    user = await store.get_user("gus")
    assert user.balance == D("1") - D("0.006") and user.held == 0 and await store.open_holds() == 0
    assert sorted(e.reference for e in await store.ledger(u.id) if e.kind == "charge") == ["g1", "g2"]


async def test_leases_grow_while_they_run_out_fast_and_stay_within_the_balance(tmp_path):
    """A lease that runs out within a second is followed by a 4x larger one,
    up to 16x lease_multiple; a balance too small for the larger size gets the
    plain size, then exactly one estimate; an idle group starts small again."""
    class Recording(SQLiteStorage):  # the real backend, noting what each lease asked for
        sizes: list[tuple[Decimal, bool]] = []

        async def hold(self, hold_id, *, user_id, key_id, amount):
            ok = await super().hold(hold_id, user_id=user_id, key_id=key_id, amount=amount)
            self.sizes.append((amount, ok))
            return ok

    store = Recording("sqlite:///grow.db", tmp_path)
    await store.open()
    u = await store.create_user("gil", D("10"))
    key = await make_key(store, u.id)
    b = LeaseBilling(store, lease_multiple=2)

    def lease_sizes() -> list[Decimal]:
        return [a for a, ok in store.sizes if ok]

    n = 0

    async def spend(times: int) -> None:
        nonlocal n
        for _ in range(times):
            n += 1
            h = await reserve(b, f"g{n}", u.id, key)  # an estimate of $0.03
            await b.settle(h, scheme=SCHEME, usage=ir.Usage(input_tokens=1000, output_tokens=1000), record=rec(f"g{n}", u.id))

    await spend(2 + 8 + 32 + 32 + 32)
    await b.flush()
    # 2, 8, 32 estimates, then at most 2 x 16 = 32 per lease
    assert lease_sizes()[:5] == [D("0.06"), D("0.24"), D("0.96"), D("0.96"), D("0.96")]
    user = await store.get_user("gil")
    assert user.balance == D("10") - n * D("0.03") and user.held == 0 and await ledger_sum(store, u.id) == user.balance
    # idle (flush released every lease): the group starts at 2 estimates again
    await spend(1)
    assert lease_sizes()[-1] == D("0.06")
    await b.flush()
    # a balance too small for 32 estimates ($0.96): 2 estimates, then exactly 1, and every request served
    u2 = await store.create_user("hank", D("0.30"))
    key2 = await make_key(store, u2.id, kid="key_b")
    b2 = LeaseBilling(store, lease_multiple=2)
    for i in range(10):
        h = await reserve(b2, f"h{i}", u2.id, key2)
        await b2.settle(h, scheme=SCHEME, usage=ir.Usage(input_tokens=1000, output_tokens=1000), record=rec(f"h{i}", u2.id, "key_b"))
    with pytest.raises(ProxyError):
        await reserve(b2, "h-last", u2.id, key2)
    await b2.flush()
    user2 = await store.get_user("hank")
    assert user2.balance == 0 and user2.held == 0 and await ledger_sum(store, u2.id) == 0
    # 2 then 8 estimates served all ten; the eleventh asked 32, 2, then exactly 1, refused each time
    assert store.sizes[-5:] == [(D("0.06"), True), (D("0.24"), True), (D("0.96"), False), (D("0.06"), False),
                                (D("0.03"), False)]
    await store.close()


async def test_a_request_alone_is_committed_before_settle_returns_and_others_batch(store, tmp_path):
    """With nothing else in flight, no other charge can join a batch: the
    charge is committed (durable in the charge queue) by the time
    settle_nowait returns, so the answer waits for no loop iteration.  With
    requests in flight, charges wait for the batch task, which gathers
    those that finish together into one commit."""
    u = await store.create_user("erin", D("1.00"))
    key = await make_key(store, u.id)
    b = LeaseBilling(store, lease_multiple=16)
    usage = ir.Usage(input_tokens=100, output_tokens=50)
    db = tmp_path / "lease.db"
    # the lease's first charge reads its row (the storage's exact path): it
    # cannot be committed without a suspension, so the batch task takes it
    h = await reserve(b, "r0", u.id, key)
    fut = b.settle_nowait(h, scheme=SCHEME, usage=usage, record=rec("r0", u.id))
    assert fut is not None and not fut.done()
    assert await fut == (D("0.002"), D("0.002"))
    # alone now: durable when settle_nowait returns
    h = await reserve(b, "r1", u.id, key)
    fut = b.settle_nowait(h, scheme=SCHEME, usage=usage, record=rec("r1", u.id))
    assert fut is not None and fut.done() and fut.result() == (D("0.002"), D("0.002"))
    assert queued(db) == 1 and h.lease is None  # unreserved
    # three in flight: the first two to finish are committed together, later
    h2, h3, h4 = [await reserve(b, f"r{i}", u.id, key) for i in (2, 3, 4)]
    f2 = b.settle_nowait(h2, scheme=SCHEME, usage=usage, record=rec("r2", u.id))
    f3 = b.settle_nowait(h3, scheme=SCHEME, usage=usage, record=rec("r3", u.id))
    assert not f2.done() and not f3.done() and queued(db) == 1
    await asyncio.gather(f2, f3)
    assert queued(db) == 3
    # the last one is alone again
    f4 = b.settle_nowait(h4, scheme=SCHEME, usage=usage, record=rec("r4", u.id))
    assert f4.done() and queued(db) == 4
    await b.flush()
    user = await store.get_user("erin")
    assert (user.balance, user.held) == (D("0.99"), D(0)) and await store.open_holds() == 0
    assert await ledger_sum(store, u.id) == user.balance
    assert sorted(e.reference for e in await store.ledger(u.id) if e.kind == "charge") == ["r0", "r1", "r2", "r3", "r4"]
