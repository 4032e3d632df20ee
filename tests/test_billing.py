"""Billing over a real SQLite file: holds, exactly-once settlement, 402s,
bounds, the shortfall policy, and the concurrency invariants (balance >= 0,
balance == sum(ledger), admitted bounded by the holds, no open holds left)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapproxy import ir
from cheapproxy.billing import Billing, Hold, estimate_input_tokens, format_usd, local_token_count
from cheapproxy.default_plugins.per_token_pricing import PerTokenOptions, PerTokenScheme
from cheapproxy.errors import ProxyError
from cheapproxy.pricing import MICRO
from cheapproxy.storage.base import KeyRecord, UsageRecord
from cheapproxy.storage.sqlite import SQLiteStorage

D = Decimal
# $10 / $20 per 1M tokens: 1000 input + 1000 output tokens hold exactly $0.03
SCHEME = PerTokenScheme(PerTokenOptions(input=D(10), output=D(20)))


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStorage("sqlite:///billing.db", tmp_path)
    await s.open()
    yield s
    await s.close()


async def make_key(s: SQLiteStorage, user_id: int, kid: str = "key_a", **kw) -> KeyRecord:
    await s.create_key(KeyRecord(id=kid, user_id=user_id, key_hash=hashlib.sha256(kid.encode()).hexdigest(), **kw))
    return await s.get_key_by_hash(hashlib.sha256(kid.encode()).hexdigest())


def rec(rid: str, user_id: int, key_id: str | None = "key_a") -> UsageRecord:
    return UsageRecord(request_id=rid, user_id=user_id, key_id=key_id, model="m", upstream="u", protocol="openai-chat",
                       streamed=False, status="ok")


async def ledger_sum(s: SQLiteStorage, user_id: int) -> Decimal:
    return sum((e.amount for e in await s.ledger(user_id)), D(0))


async def reserve(b: Billing, rid: str, user_id: int, key: KeyRecord | None, inp: int = 1000, out: int = 1000) -> Hold:
    return await b.reserve(request_id=rid, user_id=user_id, key=key, scheme=SCHEME, input_tokens_estimate=inp,
                           max_output_tokens=out)


def test_token_estimates() -> None:
    assert [estimate_input_tokens(n) for n in (0, 1, 3, 4, 3000, 3001)] == [0, 1, 1, 2, 1000, 1001]
    assert estimate_input_tokens(4000, bytes_per_token=4) == 1000
    assert estimate_input_tokens(10**15) == 10**9
    with pytest.raises(ValueError):
        estimate_input_tokens(-1)
    assert [local_token_count(t) for t in ("", "a", "abcd", "abcde", "é" * 3, "😀")] == [0, 1, 1, 2, 2, 1]
    assert [format_usd(D(x)) for x in ("0.03", "1", "0.000123", "12.5")] == ["0.03", "1.00", "0.000123", "12.50"]


async def test_reserve_and_settle_exact(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", D("1.00"))
    key = await make_key(store, u.id)
    billing = Billing(store)
    hold = await reserve(billing, "r1", u.id, key)
    assert (hold.amount, hold.key_id, hold.state) == (D("0.03"), "key_a", "open")
    assert (await store.get_user("alice")).held == D("0.03")
    r = rec("r1", u.id)
    usage = ir.Usage(input_tokens=123, output_tokens=45, cache_read_tokens=7)
    cost = await billing.settle(hold, scheme=SCHEME, usage=usage, record=r)
    assert cost == D("0.002200") == r.cost  # (123 + 7) * 10 + 45 * 20 = 2200 per 1M
    assert (r.input_tokens, r.output_tokens, r.cache_read_tokens) == (123, 45, 7)
    user = await store.get_user("alice")
    assert (user.balance, user.held) == (D("0.9978"), D(0))
    assert user.balance == await ledger_sum(store, u.id)
    assert (await store.get_usage("r1")).cost == D("0.0022")


async def test_settle_and_release_are_exactly_once(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", D("1.00"))
    key = await make_key(store, u.id)
    billing = Billing(store)
    usage = ir.Usage(input_tokens=1000, output_tokens=100)
    h1 = await reserve(billing, "r1", u.id, key)
    first = await billing.settle(h1, scheme=SCHEME, usage=usage, record=rec("r1", u.id))
    assert first == D("0.012")
    # again, with a different usage: nothing more is charged, the first result comes back
    assert await billing.settle(h1, scheme=SCHEME, usage=ir.Usage(output_tokens=10**6), record=rec("r1", u.id)) == first
    assert await billing.release(h1) is False
    # a second Hold object for the same hold (another process): storage refuses, stored cost returned
    twin = Hold(id=h1.id, request_id="r1", user_id=u.id, key_id="key_a", amount=h1.amount)
    assert await billing.settle(twin, scheme=SCHEME, usage=usage, record=rec("r1", u.id)) == first
    h2 = await reserve(billing, "r2", u.id, key)
    assert await billing.release(h2, record=rec("r2", u.id)) is True
    assert await billing.release(h2) is False
    assert await billing.settle(h2, scheme=SCHEME, usage=usage, record=rec("r2", u.id)) == 0
    user = await store.get_user("alice")
    assert (user.balance, user.held) == (D("0.988"), D(0))
    assert [e.kind for e in await store.ledger(u.id)] == ["topup", "charge"]
    assert await store.open_holds() == 0


async def test_concurrent_settles_of_one_hold_charge_once(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", D("1.00"))
    billing = Billing(store)
    h = await reserve(billing, "r1", u.id, None)
    usage = ir.Usage(input_tokens=500, output_tokens=500)
    results = await asyncio.gather(*(billing.settle(h, scheme=SCHEME, usage=usage, record=rec("r1", u.id, None))
                                     for _ in range(10)))
    assert results == [D("0.015")] * 10
    assert (await store.get_user("alice")).balance == D("0.985") == await ledger_sum(store, u.id)


async def test_402_names_the_short_limit(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", D("0.02"))
    key = await make_key(store, u.id)
    billing = Billing(store)
    with pytest.raises(ProxyError) as exc:
        await reserve(billing, "r1", u.id, key)
    assert (exc.value.kind, exc.value.status) == ("insufficient_balance", 402)
    assert exc.value.message.startswith("Insufficient balance: this request may cost up to $0.03 but the available balance is $0.02.")
    rich = await store.create_user("bob", D("100"))
    capped = await make_key(store, rich.id, "key_b", max_spend=D("0.05"), spent=D("0.04"))
    with pytest.raises(ProxyError) as exc:
        await reserve(billing, "r2", rich.id, capped)
    assert exc.value.status == 402
    assert "spending cap" in exc.value.message and "$0.03" in exc.value.message and "$0.01 left of its $0.05 cap" in exc.value.message
    assert key.key_hash not in exc.value.message and capped.key_hash not in exc.value.message
    assert (await store.get_user("alice")).held == 0 and (await store.get_user("bob")).held == 0
    assert await store.open_holds() == 0


@pytest.mark.parametrize("inp, out", [(-1, 10), (10, -1), (10, 10**9 + 1), (10**30, 1), (True, 1), (1, 2.5), (1, "9")])
async def test_absurd_quantities_are_refused(store: SQLiteStorage, inp, out) -> None:
    u = await store.create_user("alice", D("1000"))
    with pytest.raises(ProxyError) as exc:
        await reserve(Billing(store), "r1", u.id, None, inp=inp, out=out)
    assert (exc.value.kind, exc.value.status) == ("invalid_request", 400)
    assert await store.open_holds() == 0


async def test_hostile_usage_never_credits(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", D("1"))
    billing = Billing(store)
    h = await reserve(billing, "r1", u.id, None)
    cost = await billing.settle(h, scheme=SCHEME, usage=ir.Usage(input_tokens=-10**12, output_tokens=-5), record=rec("r1", u.id, None))
    assert cost == 0
    h = await reserve(billing, "r2", u.id, None)
    # 2**63 output tokens saturate at 1e9 -> $20,000, far beyond the balance: charge what is there, record the rest
    r = rec("r2", u.id, None)
    assert await billing.settle(h, scheme=SCHEME, usage=ir.Usage(output_tokens=2**63), record=r) == D("20000")
    assert r.output_tokens == 10**9
    user = await store.get_user("alice")
    assert (user.balance, user.held) == (D(0), D(0))
    stored = await store.get_usage("r2")
    assert (stored.cost, stored.unpaid) == (D("20000"), D("19999"))
    assert all(e.amount > 0 for e in await store.ledger(u.id) if e.kind == "topup")
    assert all(e.amount < 0 for e in await store.ledger(u.id) if e.kind == "charge")
    assert await ledger_sum(store, u.id) == 0


async def test_task_hold_and_charge(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", D("1"))
    seedance = PerTokenScheme(PerTokenOptions(output=D("1.2")))
    billing = Billing(store)
    task = {"duration": 5, "resolution": "720p"}
    h = await billing.reserve(request_id="task_1", user_id=u.id, key=None, scheme=seedance, input_tokens_estimate=0,
                              max_output_tokens=250_000, task=task)
    assert (h.amount, h.task) == (D("0.30"), True)
    cost = await billing.settle(h, scheme=seedance, usage=ir.Usage(output_tokens=108_900), record=rec("task_1", u.id, None),
                                task=task)
    assert cost == D("0.13")
    [charge] = [e for e in await store.ledger(u.id) if e.amount < 0]
    assert (charge.kind, charge.reference, charge.amount) == ("task_charge", "task_1", D("-0.13"))


async def test_release_stale(store: SQLiteStorage) -> None:
    u = await store.create_user("alice", D("1"))
    billing = Billing(store)
    await reserve(billing, "r1", u.id, None)
    assert await billing.release_stale(3600) == 0
    assert await billing.release_stale(-1) == 1
    assert (await store.get_user("alice")).held == 0


async def test_200_concurrent_calls_against_a_balance_for_10(store: SQLiteStorage) -> None:
    """Balance $0.30; worst case held $0.03, real cost $0.03 (1000 in + 1000 out):
    at most 10 calls can ever be admitted, whatever the interleaving."""
    u = await store.create_user("alice", D("0.30"))
    key = await make_key(store, u.id)
    billing = Billing(store)
    admitted, refused = [], []

    async def call(i: int) -> None:
        try:
            h = await reserve(billing, f"r{i}", u.id, key)
        except ProxyError as exc:
            assert exc.status == 402
            refused.append(i)
            return
        admitted.append(h)
        await asyncio.sleep(random.random() / 200)
        if i % 7 == 0:  # some calls fail upstream: released, not charged
            await billing.release(h, record=rec(f"r{i}", u.id))
        else:
            await billing.settle(h, scheme=SCHEME, usage=ir.Usage(input_tokens=1000, output_tokens=1000), record=rec(f"r{i}", u.id))

    await asyncio.gather(*(call(i) for i in range(200)))
    charges = [e for e in await store.ledger(u.id) if e.kind == "charge"]
    user = await store.get_user("alice")
    assert len(admitted) + len(refused) == 200 and 10 <= len(admitted) < 200
    assert len(charges) <= 10 and all(e.amount == D("-0.03") for e in charges)
    assert user.balance >= 0 and user.held == 0
    assert D("0.30") - user.balance == -sum(e.amount for e in charges)
    assert user.balance == await ledger_sum(store, u.id)
    assert min(e.balance_after for e in await store.ledger(u.id)) >= 0
    assert await store.open_holds() == 0
    assert len(await store.list_usage(limit=1000)) == len(admitted)
    assert (await store.get_key_by_hash(key.key_hash)).spent == D("0.30") - user.balance


async def test_key_cap_under_concurrency(store: SQLiteStorage) -> None:
    """reliability.md test 5: cap $0.01, each call holds $0.004: at most 2 at a time, spend <= cap."""
    u = await store.create_user("alice", D("100"))
    key = await make_key(store, u.id, max_spend=D("0.01"))
    billing = Billing(store)
    ok = 0

    async def call(i: int) -> None:
        nonlocal ok
        try:
            h = await reserve(billing, f"r{i}", u.id, key, inp=0, out=200)  # 200 * $20/1M = $0.004
        except ProxyError:
            return
        ok += 1
        await asyncio.sleep(0.001)
        await billing.settle(h, scheme=SCHEME, usage=ir.Usage(output_tokens=200), record=rec(f"r{i}", u.id))

    await asyncio.gather(*(call(i) for i in range(50)))
    spent = (await store.get_key_by_hash(key.key_hash)).spent
    assert ok == 2 and spent == D("0.008") <= D("0.01")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5_000_000), st.integers(0, 200_000), st.integers(0, 2_000_000),
                          st.decimals(min_value=0, max_value=50, places=3)), min_size=1, max_size=25))
def test_rounding_sum_of_charges_equals_balance_change(calls) -> None:
    async def run() -> None:
        s = SQLiteStorage("sqlite://:memory:")
        await s.open()
        try:
            u = await s.create_user("alice", D(1_000_000))
            billing = Billing(s)
            total = D(0)
            for i, (inp, out, cached, price) in enumerate(calls):
                scheme = PerTokenScheme(PerTokenOptions(input=price, output=price * 4, cache_read=price / 10))
                h = await billing.reserve(request_id=f"r{i}", user_id=u.id, key=None, scheme=scheme,
                                          input_tokens_estimate=inp + cached, max_output_tokens=out)
                usage = ir.Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached)
                cost = await billing.settle(h, scheme=scheme, usage=usage, record=rec(f"r{i}", u.id, None))
                exact = (inp * price + out * price * 4 + cached * price / 10) / D(1_000_000)
                assert exact <= cost < exact + MICRO and cost <= h.amount
                assert (cost == 0) == (exact == 0)
                total += cost
            user = await s.get_user("alice")
            assert D(1_000_000) - user.balance == total == -sum(e.amount for e in await s.ledger(u.id) if e.kind == "charge")
            assert user.balance == await ledger_sum(s, u.id)
        finally:
            await s.close()

    asyncio.run(run())
