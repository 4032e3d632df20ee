"""Lease billing on PostgreSQL: the core's lease tests (tests/test_leases.py)
re-run on a PostgresStorage, ``charge_batch`` checked against the SQLite
backend's results on the same batches, its atomicity and lock order, and two
gateway processes (two pools, two LeaseBilling) sharing one balance: never
below zero, balance == sum(ledger), one charge per finished request, no hold
left open once both flushed."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.leases import LeaseBilling
from cheapproxy.storage.base import KeyRecord, UsageRecord
from cheapproxy.storage.sqlite import SQLiteStorage
from pg_testlib import core_tests, ledger_sum, opened, raw

D = Decimal
_core = core_tests("test_leases")
_billing = core_tests("test_billing")
SCHEME, make_key, reserve = _billing.SCHEME, _billing.make_key, _billing.reserve

# the core's lease tests; their ``store`` fixture is a PostgresStorage here
test_reserve_settle_release_exactly_once = _core.test_reserve_settle_release_exactly_once
test_concurrent_requests_never_overdraw = _core.test_concurrent_requests_never_overdraw
test_cost_above_the_hold_is_capped_and_recorded_unpaid = _core.test_cost_above_the_hold_is_capped_and_recorded_unpaid
test_idle_lease_is_released_by_itself = _core.test_idle_lease_is_released_by_itself
test_cancelled_waiter_still_commits = _core.test_cancelled_waiter_still_commits


def rec(rid: str, user_id: int, key_id: str | None = "key_a", model: str = "m") -> UsageRecord:
    return UsageRecord(request_id=rid, user_id=user_id, key_id=key_id, model=model, upstream="u",
                       protocol="openai-chat", streamed=True, status="ok", input_tokens=3, output_tokens=4)


async def hold_amount(schema: str, hold_id: str) -> tuple[int, str]:
    (row,) = await raw(schema, "SELECT amount, state FROM holds WHERE id = $1", hold_id)
    return row["amount"], row["state"]


async def test_charge_batch_takes_the_lease_then_the_balance_then_stops_at_the_cap(store: Any, pg_schema: str) -> None:
    u = await store.create_user("alice", D("1.00"))
    await make_key(store, u.id, "key_a", max_spend=D("0.50"))
    assert await store.hold("L1", user_id=u.id, key_id="key_a", amount=D("0.10"))
    assert await store.hold("L2", user_id=u.id, key_id="key_a", amount=D("0.20"))
    out = await store.charge_batch([
        ("L1", D("0.04"), rec("r1", u.id), "charge"),          # all from the lease
        ("L1", D("0.08"), rec("r2", u.id), "charge"),          # 0.06 from the lease, 0.02 from the free balance
        ("L1", D(0), rec("r3", u.id), "charge"),               # nothing: a usage row, no ledger row
        ("L2", D("0.05"), rec("r4", u.id), "task_charge"),
        ("L2", D("0.40"), rec("r5", u.id, model="big"), "charge"),  # the key's cap leaves 0.50 - 0.17 = 0.33
    ])
    assert out == [(D("0.04"), D("0.04")), (D("0.08"), D("0.06")), (D(0), D(0)), (D("0.05"), D("0.05")),
                   (D("0.33"), D("0.15"))]
    assert all(isinstance(c, Decimal) and isinstance(f, Decimal) for c, f in out)
    # the leases stay open with what is left of them
    assert await hold_amount(pg_schema, "L1") == (0, "open") and await hold_amount(pg_schema, "L2") == (0, "open")
    user = await store.get_user("alice")
    assert (user.balance, user.held) == (D("0.50"), D(0)) and user.balance == await ledger_sum(store, u.id)
    key = (await store.list_keys("alice"))[0]
    assert key.spent == D("0.50")
    assert (await raw(pg_schema, "SELECT held FROM api_keys WHERE id = 'key_a'"))[0]["held"] == 0
    ledger = [(e.amount, e.kind, e.reference, e.balance_after, e.note) for e in await store.ledger(u.id)][1:]
    assert ledger == [(D("-0.04"), "charge", "r1", D("0.96"), "m"), (D("-0.08"), "charge", "r2", D("0.88"), "m"),
                      (D("-0.05"), "task_charge", "r4", D("0.83"), "m"), (D("-0.33"), "charge", "r5", D("0.50"), "big")]
    usage = {r.request_id: (r.cost, r.unpaid, r.input_tokens, r.output_tokens, r.streamed) for r in await store.list_usage()}
    assert usage == {"r1": (D("0.04"), 0, 3, 4, True), "r2": (D("0.08"), 0, 3, 4, True), "r3": (0, 0, 3, 4, True),
                     "r4": (D("0.05"), 0, 3, 4, True), "r5": (D("0.40"), D("0.07"), 3, 4, True)}
    # a drained lease is released like any hold, and frees nothing more
    assert await store.release("L1") and await store.release("L2") and await store.open_holds() == 0
    assert (await store.get_user("alice")).held == 0


async def test_charge_batch_never_below_zero_without_a_key(store: Any) -> None:
    u = await store.create_user("bob", D("0.10"))
    assert await store.hold("L", user_id=u.id, key_id=None, amount=D("0.03"))
    out = await store.charge_batch([("L", D("0.06"), rec("a", u.id, None), "charge"),
                                    ("L", D("0.06"), rec("b", u.id, None), "charge"),
                                    ("L", D("0.01"), rec("c", u.id, None), "charge")])
    assert out == [(D("0.06"), D("0.03")), (D("0.04"), D(0)), (D(0), D(0))]
    user = await store.get_user("bob")
    assert (user.balance, user.held) == (D(0), D(0)) and await ledger_sum(store, u.id) == 0
    assert {r.request_id: r.unpaid for r in await store.list_usage()} == {"a": 0, "b": D("0.02"), "c": D("0.01")}
    assert await store.charge_batch([]) == []


@pytest.mark.parametrize("bad", ["closed lease", "charged twice", "other user", "negative cost", "seven decimals"])
async def test_a_bad_item_rolls_the_whole_batch_back(store: Any, pg_schema: str, bad: str) -> None:
    u = await store.create_user("carol", D("1.00"))
    other = await store.create_user("dan", D("1.00"))
    assert await store.hold("L", user_id=u.id, key_id=None, amount=D("0.50"))
    assert await store.hold("X", user_id=u.id, key_id=None, amount=D("0.10")) and await store.release("X")
    await store.charge_batch([("L", D("0.01"), rec("old", u.id, None), "charge")])
    items = [("L", D("0.02"), rec("n1", u.id, None), "charge"), ("L", D("0.70"), rec("n2", u.id, None), "charge")]
    items.append({"closed lease": ("X", D("0.01"), rec("n3", u.id, None), "charge"),
                  "charged twice": ("L", D("0.01"), rec("old", u.id, None), "charge"),
                  "other user": ("L", D("0.01"), rec("n3", other.id, None), "charge"),
                  "negative cost": ("L", D("-0.01"), rec("n3", u.id, None), "charge"),
                  "seven decimals": ("L", D("0.0000001"), rec("n3", u.id, None), "charge")}[bad])
    with pytest.raises(ValueError):
        await store.charge_batch(items)
    user = await store.get_user("carol")
    assert (user.balance, user.held) == (D("0.99"), D("0.49")) and await hold_amount(pg_schema, "L") == (490_000, "open")
    assert [r.request_id for r in await store.list_usage()] == ["old"]
    assert [e.reference for e in await store.ledger(u.id)] == [f"opening:{u.id}", "old"]


async def _snapshot(s: Any, names: list[str]) -> dict[str, Any]:
    users = {n: await s.get_user(n) for n in names}
    return {"users": {n: (u.balance, u.held) for n, u in users.items()},
            "keys": sorted((k.id, k.spent) for k in await s.list_keys()),
            "ledger": {n: [(e.amount, e.kind, e.reference, e.balance_after, e.note) for e in await s.ledger(u.id)]
                       for n, u in users.items()},
            "usage": sorted((r.request_id, r.key_id, r.model, r.cost, r.unpaid) for r in await s.list_usage(limit=100_000)),
            "open": await s.open_holds()}


async def test_charge_batch_matches_the_sqlite_backend(store: Any, pg_schema: str, tmp_path: Path) -> None:
    """Random batches over two users, three keys (two capped) and six leases,
    run on both backends: identical results, balances, ledgers, usage rows."""
    lite = SQLiteStorage("sqlite:///ref.db", tmp_path)
    await lite.open()
    try:
        rnd = random.Random(20240611)
        keys = [("key_a", "u0", D("2.50")), ("key_b", "u1", None), ("key_c", "u1", D("0.80"))]
        leases = [("L0", "u0", "key_a"), ("L1", "u0", None), ("L2", "u1", "key_b"), ("L3", "u1", "key_c"),
                  ("L4", "u1", "key_c"), ("L5", "u0", "key_a")]
        amounts = {lid: D(rnd.randint(0, 400_000)).scaleb(-6) for lid, _, _ in leases}
        uids: dict[str, int] = {}
        for s in (store, lite):
            for name, bal in (("u0", D("3.00")), ("u1", D("1.70"))):
                uids[name] = (await s.create_user(name, bal)).id
            for kid, owner, cap in keys:
                await make_key(s, uids[owner], kid, max_spend=cap)
            for lid, owner, kid in leases:
                assert await s.hold(lid, user_id=uids[owner], key_id=kid, amount=amounts[lid])
        n = 0
        for _ in range(12):
            items = []
            for _ in range(rnd.randint(1, 15)):
                lid, owner, kid = rnd.choice(leases)
                n += 1
                cost = D(rnd.choice([0, rnd.randint(1, 100_000), rnd.randint(100_000, 600_000)])).scaleb(-6)
                items.append((lid, cost, rec(f"q{n}", uids[owner], kid, model=f"m{n % 3}"), rnd.choice(["charge", "task_charge"])))
            assert await store.charge_batch(items) == await lite.charge_batch(items)
        # what is left of each lease, then everything else once the leases are released
        left = {r["id"]: r["amount"] for r in await raw(pg_schema, "SELECT id, amount FROM holds")}
        assert left == {r["id"]: r["amount"] for r in await lite._read("SELECT id, amount FROM holds")}
        assert sum(1 for v in left.values() if v == 0) >= 2
        pg_keys = {r["id"]: r["held"] for r in await raw(pg_schema, "SELECT id, held FROM api_keys")}
        assert pg_keys == {r["id"]: r["held"] for r in await lite._read("SELECT id, held FROM api_keys")}
        for lid, _, _ in leases:
            assert await store.release(lid) and await lite.release(lid)
        pg, ref = await _snapshot(store, ["u0", "u1"]), await _snapshot(lite, ["u0", "u1"])
        assert pg == ref
        assert all(held == 0 for _, held in pg["users"].values()) and pg["open"] == 0
        # the runs really reached the caps and the empty balance, not only the easy path
        assert sum(1 for *_, unpaid in pg["usage"] if unpaid) >= 5
        assert min(bal for bal, _ in pg["users"].values()) < D("0.10")
    finally:
        await lite.close()


async def test_opposite_batches_lock_in_one_order(pg_url: str) -> None:
    """Two instances settle batches over the same two users and keys, listed in
    opposite orders, while transfers between the users and new leases run: the
    shared lock order (holds, users, keys by id) means nothing ever waits in a
    cycle, so no transaction is retried, and the money adds up."""
    a, b = await opened(pg_url), await opened(pg_url)
    try:
        u1, u2 = await a.create_user("p", D("50")), await a.create_user("q", D("50"))
        for kid, uid in (("key_p", u1.id), ("key_q", u2.id)):
            await a.create_key(KeyRecord(id=kid, user_id=uid, key_hash=kid * 8))
        for s, tag in ((a, "a"), (b, "b")):
            for uid, kid in ((u1.id, "key_p"), (u2.id, "key_q")):
                assert await s.hold(f"{tag}-{kid}", user_id=uid, key_id=kid, amount=D("10"))

        async def batches(s: Any, tag: str, flip: bool) -> None:
            for i in range(40):
                pair = [(f"{tag}-key_p", u1.id, "key_p"), (f"{tag}-key_q", u2.id, "key_q")]
                if flip:
                    pair.reverse()
                await s.charge_batch([(lid, D("0.01"), rec(f"{tag}{i}-{kid}", uid, kid), "charge") for lid, uid, kid in pair])

        async def transfers() -> None:
            for i in range(40):
                src, dst = (u1.id, u2.id) if i % 2 else (u2.id, u1.id)
                await (a, b)[i % 2].transfer(from_user_id=src, to_user_id=dst, amount=D("0.5"), reference=f"t{i}")

        async def new_leases() -> None:
            for i in range(40):
                s, (uid, kid) = (a, b)[i % 2], ((u1.id, "key_p"), (u2.id, "key_q"))[i % 2]
                assert await s.hold(f"n{i}", user_id=uid, key_id=kid, amount=D("0.2"))
                assert await s.release(f"n{i}")

        await asyncio.gather(batches(a, "a", False), batches(b, "b", True), transfers(), new_leases())
        assert a.conflict_retries == 0 == b.conflict_retries
        for tag in ("a", "b"):
            for kid in ("key_p", "key_q"):
                assert await a.release(f"{tag}-{kid}")
        for u in (u1, u2):
            user = await b.get_user_by_id(u.id)
            charges = [e for e in await a.ledger(u.id) if e.kind == "charge"]
            assert len(charges) == 80 and user.held == 0 and user.balance == await ledger_sum(a, u.id)
        total = sum([(await a.get_user_by_id(u.id)).balance for u in (u1, u2)], D(0))
        assert total == D("100") - 160 * D("0.01")
        assert sum([k.spent for k in await a.list_keys()], D(0)) == 160 * D("0.01")
    finally:
        await a.close()
        await b.close()


async def test_two_processes_share_a_balance(pg_url: str, pg_schema: str) -> None:
    """Two gateway processes (two pools, each its own LeaseBilling) serve 600
    requests of two users at once.  Each request reserves $0.03 and mostly
    costs $0.02 to $0.03, but one in seven costs $0.07 (more than it reserved),
    one in thirteen fails and is released.  erin has $1.00 and an uncapped key;
    frank has $5.00 and a key capped at $0.60."""
    a, b = await opened(pg_url), await opened(pg_url)
    billings = [LeaseBilling(a, lease_multiple=4), LeaseBilling(b, lease_multiple=16)]
    try:
        erin, frank = await a.create_user("erin", D("1.00")), await a.create_user("frank", D("5.00"))
        keys = {erin.id: await make_key(a, erin.id, "key_e"), frank.id: await make_key(b, frank.id, "key_f", max_spend=D("0.60"))}
        admitted: dict[int, list[str]] = {erin.id: [], frank.id: []}
        costs: dict[str, Decimal] = {}
        seen = [0]
        stop = asyncio.Event()

        async def watch() -> None:  # the balances as another reader sees them, while requests run
            while not stop.is_set():
                for row in await raw(pg_schema, "SELECT balance, held FROM users"):
                    assert row["balance"] >= row["held"] >= 0
                for row in await raw(pg_schema, "SELECT spent, held, max_spend FROM api_keys"):
                    assert row["max_spend"] is None or row["spent"] + row["held"] <= row["max_spend"]
                seen[0] += 1
                await asyncio.sleep(0.003)

        async def one(i: int) -> None:
            bill, rid, uid = billings[i % 2], f"r{i}", (erin.id, frank.id)[(i // 2) % 2]
            try:
                h = await reserve(bill, rid, uid, keys[uid])
            except ProxyError as exc:
                assert exc.status == 402
                return
            admitted[uid].append(rid)
            await asyncio.sleep(random.random() / 50)
            if i % 13 == 0:  # a failed upstream call: released, never charged
                assert await bill.release(h, record=rec(rid, uid, keys[uid].id))
                return
            out = 3000 if i % 7 == 0 else random.randint(500, 1000)
            costs[rid] = await bill.settle(h, scheme=SCHEME, usage=ir.Usage(input_tokens=1000, output_tokens=out),
                                           record=rec(rid, uid, keys[uid].id))

        watcher = asyncio.ensure_future(watch())
        await asyncio.gather(*(one(i) for i in range(600)))
        for bill in billings:
            await bill.close()
        stop.set()
        await watcher
        assert seen[0] >= 2
        assert await a.open_holds() == 0 == await b.open_holds()
        assert billings[0].open_leases() == 0 == billings[1].open_leases()
        usage = {r.request_id: r for r in await a.list_usage(limit=10_000)}
        assert set(usage) == {r for rids in admitted.values() for r in rids}
        for user, start, cap in ((erin, D("1.00"), None), (frank, D("5.00"), D("0.60"))):
            final = await b.get_user_by_id(user.id)
            ledger = await a.ledger(user.id)
            charges = {e.reference: -e.amount for e in ledger if e.kind == "charge"}
            assert final.balance >= 0 and final.held == 0 and min(e.balance_after for e in ledger) >= 0
            assert final.balance == await ledger_sum(a, user.id) == start - sum(charges.values(), D(0))
            # one usage row per admitted request; a charge only for settled ones, never above the cost,
            # and what was not charged is the usage row's unpaid
            settled = [r for r in admitted[user.id] if r in costs]
            assert len(settled) < len(admitted[user.id]) and set(charges) <= set(settled)
            for rid in admitted[user.id]:
                cost = costs.get(rid, D(0))
                assert usage[rid].cost == cost and usage[rid].unpaid == cost - charges.get(rid, D(0)) >= 0
            k = await a.get_key_by_hash(keys[user.id].key_hash)
            assert k.spent == start - final.balance and (cap is None or k.spent <= cap)
            # both processes served this user, and the limit was reached (requests were refused)
            assert {int(r[1:]) % 2 for r in settled} == {0, 1} and 10 <= len(admitted[user.id]) < 150
        assert [r["held"] for r in await raw(pg_schema, "SELECT held FROM api_keys")] == [0, 0]
    finally:
        for bill in billings:
            await bill.close()
        await a.close()
        await b.close()
