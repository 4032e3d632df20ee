"""Billing on PostgreSQL: the core's billing tests (tests/test_billing.py)
re-run on a PostgresStorage, the rounding property, and the reliability-plan
concurrency test with two gateway instances (two pools) sharing one database:
I1 balance == sum(ledger), I2 never below zero, I4 one charge per completed
call, admitted calls bounded by the holds, no open hold left."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cheapproxy import ir
from cheapproxy.billing import Billing
from cheapproxy.default_plugins.per_token_pricing import PerTokenOptions, PerTokenScheme
from cheapproxy.errors import ProxyError
from cheapproxy.pricing import MICRO
from cheapproxy.storage.base import UsageRecord
from pg_testlib import core_tests, ledger_sum, opened, raw, run_in_thread

D = Decimal
_core = core_tests("test_billing")

# the core's billing tests; their ``store`` fixture is a PostgresStorage here
test_reserve_and_settle_exact = _core.test_reserve_and_settle_exact
test_settle_and_release_are_exactly_once = _core.test_settle_and_release_are_exactly_once
test_concurrent_settles_of_one_hold_charge_once = _core.test_concurrent_settles_of_one_hold_charge_once
test_402_names_the_short_limit = _core.test_402_names_the_short_limit
test_absurd_quantities_are_refused = _core.test_absurd_quantities_are_refused
test_hostile_usage_never_credits = _core.test_hostile_usage_never_credits
test_task_hold_and_charge = _core.test_task_hold_and_charge
test_release_stale = _core.test_release_stale
test_200_concurrent_calls_against_a_balance_for_10 = _core.test_200_concurrent_calls_against_a_balance_for_10
test_key_cap_under_concurrency = _core.test_key_cap_under_concurrency

# $10 / $20 per 1M tokens; reliability test 17: a call really costs $0.03 and holds $0.05
SCHEME = PerTokenScheme(PerTokenOptions(input=D(10), output=D(20)))


def rec(rid: str, user_id: int, key_id: str | None = None) -> UsageRecord:
    return UsageRecord(request_id=rid, user_id=user_id, key_id=key_id, model="m", upstream="u", protocol="openai-chat",
                       streamed=False, status="ok")


async def test_two_instances_200_calls_repeated(pg_url: str, pg_schema: str) -> None:
    """Reliability test 17 on two instances: B = $1.00, each call holds $0.05
    (1000 in + 2000 out) and costs $0.03 (1000 in + 1000 out); 200 calls at
    once, split over the instances, five rounds (each a fresh user)."""
    a, b = await opened(pg_url), await opened(pg_url)
    try:
        billings = (Billing(a), Billing(b))
        for rnd in range(5):
            u = await a.create_user(f"user{rnd}", D("1.00"))
            admitted: list[str] = []
            lowest = [D("1.00")]

            async def call(i: int, u_id: int = u.id, rnd: int = rnd) -> None:
                billing = billings[i % 2]
                rid = f"r{rnd}-{i}"
                try:
                    h = await billing.reserve(request_id=rid, user_id=u_id, key=None, scheme=SCHEME,
                                              input_tokens_estimate=1000, max_output_tokens=2000)
                except ProxyError as exc:
                    assert exc.status == 402
                    return
                admitted.append(rid)
                await asyncio.sleep(random.random() / 100)
                if i % 11 == 0:  # a failed upstream call: released, never charged
                    await billing.release(h, record=rec(rid, u_id))
                    return
                await billing.settle(h, scheme=SCHEME, usage=ir.Usage(input_tokens=1000, output_tokens=1000),
                                     record=rec(rid, u_id))
                lowest[0] = min(lowest[0], (await (a if i % 2 else b).get_user_by_id(u_id)).balance)

            await asyncio.gather(*(call(i) for i in range(200)))
            final = await b.get_user_by_id(u.id)
            ledger = await a.ledger(u.id)
            charges = [e for e in ledger if e.kind == "charge"]
            released = sum(1 for r in admitted if int(r.rsplit("-", 1)[1]) % 11 == 0)
            # I4: one charge row per completed (not released) call, each exactly $0.03
            assert len(charges) == len(admitted) - released and all(e.amount == D("-0.03") for e in charges)
            assert len({e.reference for e in charges}) == len(charges)
            # I1 and I2; the balance moved by exactly the charges
            assert final.balance == D("1.00") + sum(e.amount for e in charges) == await ledger_sum(a, u.id)
            assert final.balance >= 0 and final.held == 0 and lowest[0] >= 0
            assert min(e.balance_after for e in ledger) >= 0
            # a charge is at most the $0.05 hold, so at least 20 calls fit; every $0.03 charge had $0.05 held
            assert 20 <= len(admitted) and len(charges) <= 33
            stored = await a.list_usage(user_name=u.name, limit=1000)
            assert len(stored) == len(admitted) and sum((r.cost for r in stored), D(0)) == D("0.03") * len(charges)
        assert await a.open_holds() == 0
        assert (await raw(pg_schema, "SELECT COUNT(*) FROM holds WHERE state = 'settled'"))[0][0] == sum(
            1 for r in await raw(pg_schema, "SELECT kind FROM ledger") if r["kind"] == "charge")
    finally:
        await a.close()
        await b.close()


_examples = iter(range(10**9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 5_000_000), st.integers(0, 200_000), st.integers(0, 2_000_000),
                          st.decimals(min_value=0, max_value=50, places=3)), min_size=1, max_size=25))
def test_rounding_sum_of_charges_equals_balance_change(pg_url: str, calls) -> None:
    """The core's rounding property, on PostgreSQL (the schema is shared by the
    examples: each one has its own user and request ids)."""
    n = next(_examples)

    async def run() -> None:
        s = await opened(pg_url)
        try:
            u = await s.create_user(f"alice{n}", D(1_000_000))
            billing = Billing(s)
            total = D(0)
            for i, (inp, out, cached, price) in enumerate(calls):
                scheme = PerTokenScheme(PerTokenOptions(input=price, output=price * 4, cache_read=price / 10))
                h = await billing.reserve(request_id=f"r{n}-{i}", user_id=u.id, key=None, scheme=scheme,
                                          input_tokens_estimate=inp + cached, max_output_tokens=out)
                cost = await billing.settle(h, scheme=scheme, usage=ir.Usage(input_tokens=inp, output_tokens=out,
                                                                             cache_read_tokens=cached),
                                            record=rec(f"r{n}-{i}", u.id))
                exact = (inp * price + out * price * 4 + cached * price / 10) / D(1_000_000)
                assert exact <= cost < exact + MICRO and cost <= h.amount
                assert (cost == 0) == (exact == 0)
                total += cost
            user = await s.get_user_by_id(u.id)
            assert D(1_000_000) - user.balance == total == -sum(e.amount for e in await s.ledger(u.id) if e.kind == "charge")
            assert user.balance == await ledger_sum(s, u.id)
        finally:
            await s.close()

    run_in_thread(run)
