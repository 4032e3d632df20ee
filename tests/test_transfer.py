"""Transfers (CONTRACT section 7): amount parsing, every error case with its
status and body, atomicity under concurrency, Stripe-style idempotency."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from cheapproxy.errors import ProxyError
from cheapproxy.storage.sqlite import SQLiteStorage
from cheapproxy.transfer import BAD_AMOUNT, do_transfer, money, parse_amount

D = Decimal


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStorage("sqlite:///transfer.db", tmp_path)
    await s.open()
    yield s
    await s.close()


async def balances(s: SQLiteStorage) -> dict[str, Decimal]:
    return {u.name: u.balance for u in await s.list_users()}


async def ledger_sum(s: SQLiteStorage, user_id: int) -> Decimal:
    return sum((e.amount for e in await s.ledger(user_id)), D(0))


async def movements(s: SQLiteStorage, user_id: int) -> int:
    return len([e for e in await s.ledger(user_id) if e.kind == "transfer_out"])


@pytest.mark.parametrize("raw, want", [
    (10, "10.00"), (10.5, "10.50"), (0.01, "0.01"), ("10.50", "10.50"), ("7", "7.00"), ("0.1", "0.10"),
    (1_000_000_000, "1000000000.00"), ("1000000000.00", "1000000000.00"), (D("2.50"), "2.50"), (19.99, "19.99"),
])
def test_parse_amount_accepts(raw, want) -> None:
    got = parse_amount(raw)
    assert isinstance(got, Decimal) and str(got) == want


@pytest.mark.parametrize("raw", [
    0, -1, 0.0, -0.01, "0", "0.00", "-5", True, False, None, "abc", "", " 10", "10 ", "+5", "1e3", "1e-30", 1e-30,
    float("nan"), float("inf"), float("-inf"), "NaN", "Infinity", "-Infinity", 10.001, "10.001", 0.1 + 0.2,
    1_000_000_000.01, "1000000000.01", 10**20, 1e308, [], {}, [5], D("NaN"), D("0.001"), "٣",  # an Arabic-Indic 3
])
def test_parse_amount_refuses(raw) -> None:
    with pytest.raises(ProxyError) as exc:
        parse_amount(raw)
    assert (exc.value.status, exc.value.message, exc.value.param) == (400, BAD_AMOUNT, "amount")


def test_money_format() -> None:
    assert [money(D(x)) for x in ("1", "0.999999", "12.345", "0")] == ["1.00", "0.99", "12.34", "0.00"]


async def test_success_moves_both_sides_atomically(store: SQLiteStorage) -> None:
    alice = await store.create_user("alice", D("10"))
    bob = await store.create_user("bob", D("1.25"))
    status, body = await do_transfer(store, sender=alice, body={"toUsername": "bob", "amount": 2.5}, idempotency_key=None)
    assert status == 200
    assert body == {"success": True, "amount": "2.50", "from": "alice", "to": "bob",
                    "senderNewBalance": "7.50", "receiverNewBalance": "3.75"}
    assert await balances(store) == {"alice": D("7.5"), "bob": D("3.75")}
    [out] = [e for e in await store.ledger(alice.id) if e.kind == "transfer_out"]
    [inn] = [e for e in await store.ledger(bob.id) if e.kind == "transfer_in"]
    assert out.reference == inn.reference and out.reference.startswith("tr_")
    assert (out.amount, inn.amount) == (D("-2.5"), D("2.5"))
    assert await ledger_sum(store, alice.id) == D("7.5") and await ledger_sum(store, bob.id) == D("3.75")


@pytest.mark.parametrize("body, status, error", [
    ({"toUsername": "bob", "amount": 10.01}, 400, "Insufficient balance"),
    ({"toUsername": "nobody", "amount": 1}, 404, "User not found"),
    ({"toUsername": "alice", "amount": 1}, 400, "Cannot transfer to yourself"),
    ({"toUsername": "bob", "amount": -1}, 400, BAD_AMOUNT),
    ({"toUsername": "bob", "amount": 0}, 400, BAD_AMOUNT),
    ({"toUsername": "bob", "amount": "1e-30"}, 400, BAD_AMOUNT),
    ({"toUsername": "bob", "amount": 0.005}, 400, BAD_AMOUNT),
    ({"toUsername": "bob"}, 400, BAD_AMOUNT),
    ({"amount": 1}, 400, "toUsername is required (the name of the receiving user)"),
    ({"toUsername": 5, "amount": 1}, 400, "toUsername is required (the name of the receiving user)"),
    ([1, 2], 400, "The body must be a JSON object with toUsername and amount"),
])
async def test_errors_have_status_and_body_and_move_nothing(store: SQLiteStorage, body, status, error) -> None:
    alice = await store.create_user("alice", D("10"))
    await store.create_user("bob", D("1"))
    got = await do_transfer(store, sender=alice, body=body, idempotency_key=None)
    assert got == (status, {"success": False, "error": error})
    assert orjson.loads(orjson.dumps(got[1])) == {"success": False, "error": error}
    assert await balances(store) == {"alice": D(10), "bob": D(1)}
    assert await movements(store, alice.id) == 0


async def test_held_money_cannot_be_transferred(store: SQLiteStorage) -> None:
    alice = await store.create_user("alice", D("1"))
    await store.create_user("bob")
    assert await store.hold("h", user_id=alice.id, key_id=None, amount=D("0.6"))
    assert await do_transfer(store, sender=alice, body={"toUsername": "bob", "amount": "0.41"}, idempotency_key=None) == (
        400, {"success": False, "error": "Insufficient balance"})
    status, body = await do_transfer(store, sender=alice, body={"toUsername": "bob", "amount": "0.40"}, idempotency_key=None)
    assert (status, body["senderNewBalance"]) == (200, "0.60")


async def test_concurrent_opposite_transfers_keep_the_total(tmp_path: Path) -> None:
    """A->B and B->A at once, split over two connections (two processes):
    no error surfaces, the total is constant, nobody goes below zero."""
    s1, s2 = SQLiteStorage("sqlite:///t.db", tmp_path), SQLiteStorage("sqlite:///t.db", tmp_path)
    await s1.open()
    await s2.open()
    try:
        users = [await s1.create_user(n, D("10")) for n in ("a", "b", "c")]
        rnd = random.Random(7)

        async def one(i: int) -> tuple[int, dict]:
            sender, receiver = rnd.sample(users, 2)
            amount = f"{rnd.randint(1, 400) / 100:.2f}"
            return await do_transfer(s1 if i % 2 else s2, sender=sender, body={"toUsername": receiver.name, "amount": amount},
                                     idempotency_key=None)

        results = await asyncio.gather(*(one(i) for i in range(300)))
        short = {"success": False, "error": "Insufficient balance"}
        assert all((st == 200 and b["success"] is True) or (st, b) == (400, short) for st, b in results)
        assert sum(1 for r in results if r[0] == 200) > 100
        final = await balances(s2)
        assert sum(final.values()) == D(30) and min(final.values()) >= 0
        for u in users:
            assert final[u.name] == await ledger_sum(s1, u.id)
            assert min(e.balance_after for e in await s1.ledger(u.id)) >= 0
    finally:
        await s1.close()
        await s2.close()


async def test_idempotency_concurrent_same_key_moves_once(tmp_path: Path) -> None:
    s1, s2 = SQLiteStorage("sqlite:///i.db", tmp_path), SQLiteStorage("sqlite:///i.db", tmp_path)
    await s1.open()
    await s2.open()
    try:
        alice = await s1.create_user("alice", D("10"))
        await s1.create_user("bob")
        body = {"toUsername": "bob", "amount": "3.00"}
        results = await asyncio.gather(*(do_transfer(s1 if i % 2 else s2, sender=alice, body=body, idempotency_key="key-1")
                                         for i in range(20)))
        want = (200, {"success": True, "amount": "3.00", "from": "alice", "to": "bob",
                      "senderNewBalance": "7.00", "receiverNewBalance": "3.00"})
        assert results == [want] * 20
        assert await movements(s1, alice.id) == 1
        assert await balances(s1) == {"alice": D(7), "bob": D(3)}
        # a later replay, with an equivalent body: same stored answer, no movement
        assert await do_transfer(s2, sender=alice, body={"toUsername": "bob", "amount": 3}, idempotency_key="key-1") == want
        # the same key with a different body
        assert await do_transfer(s1, sender=alice, body={"toUsername": "bob", "amount": "4.00"}, idempotency_key="key-1") == (
            409, {"success": False, "error": "Idempotency-Key reused with a different request"})
        assert await movements(s1, alice.id) == 1
    finally:
        await s1.close()
        await s2.close()


async def test_idempotency_stores_executed_results_only(store: SQLiteStorage) -> None:
    alice = await store.create_user("alice", D("1"))
    bob = await store.create_user("bob")
    # validation failures are answered but not stored: the key stays usable
    assert (await do_transfer(store, sender=alice, body={"toUsername": "bob", "amount": "x"}, idempotency_key="k"))[0] == 400
    assert (await do_transfer(store, sender=alice, body={"toUsername": "zed", "amount": 1}, idempotency_key="k"))[0] == 404
    assert await store.get_idempotent(f"transfer:{alice.id}", "k") is None
    # an executed failure (insufficient balance) is stored and replayed, even after a top-up
    short = (400, {"success": False, "error": "Insufficient balance"})
    assert await do_transfer(store, sender=alice, body={"toUsername": "bob", "amount": 5}, idempotency_key="k") == short
    await store.credit(alice.id, D(10), kind="topup", reference="t1")
    assert await do_transfer(store, sender=alice, body={"toUsername": "bob", "amount": 5}, idempotency_key="k") == short
    assert await movements(store, alice.id) == 0
    # keys are scoped to the sender: bob may use "k" for his own transfer
    bob = await store.get_user("bob")
    await store.credit(bob.id, D(1), kind="topup", reference="t2")
    status, body = await do_transfer(store, sender=bob, body={"toUsername": "alice", "amount": 1}, idempotency_key="k")
    assert (status, body["to"], body["receiverNewBalance"]) == (200, "alice", "12.00")
    assert (await do_transfer(store, sender=alice, body={"toUsername": "bob", "amount": 1}, idempotency_key="k x"))[0] == 400
    assert (await do_transfer(store, sender=alice, body={"toUsername": "bob", "amount": 1}, idempotency_key="k" * 256))[0] == 400
