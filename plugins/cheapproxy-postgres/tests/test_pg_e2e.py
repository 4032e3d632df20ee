"""The real gateway on PostgreSQL (``[server] database = "postgresql://..."``),
driven by the official openai SDK: the demo model's charge lands in
PostgreSQL; two gateway instances share one database (balances, keys, and a
revocation made on one instance refused by the other)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiohttp
import openai
import pytest

from cheapproxy_postgres.storage import PostgresStorage
from pg_testlib import ledger_sum, raw

D = Decimal
DEMO_INPUT, DEMO_OUTPUT = 1, 2  # the demo model's micro-USD per token ($1 / $2 per 1M)


def server_toml(url: str, **extra: object) -> str:
    return f'[server]\ndatabase = "{url}"\n' + "".join(f"{k} = {v}\n" for k, v in extra.items())


async def test_gateway_charges_into_postgres(gateway, pg_url: str, pg_schema: str) -> None:
    gw = await gateway(server_toml(pg_url), balance="10.00")
    assert type(gw.storage) is PostgresStorage
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    r = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello world"}])
    assert r.choices[0].message.content == "echo: hello world"
    await gw.idle()
    cost_micro = r.usage.prompt_tokens * DEMO_INPUT + r.usage.completion_tokens * DEMO_OUTPUT
    assert cost_micro > 0
    # read back with a separate connection, straight from the tables
    usage = await raw(pg_schema, "SELECT request_id, user_id, key_id, model, protocol, streamed, status, input_tokens,"
                                 " output_tokens, cost, unpaid FROM usage")
    assert len(usage) == 1
    u = usage[0]
    assert (u["key_id"], u["model"], u["protocol"], u["streamed"], u["status"]) == (
        gw.key_id, "demo", "openai-chat", False, "ok")
    assert (u["input_tokens"], u["output_tokens"], u["cost"], u["unpaid"]) == (
        r.usage.prompt_tokens, r.usage.completion_tokens, cost_micro, 0)
    ledger = await raw(pg_schema, "SELECT kind, amount, reference, balance_after FROM ledger ORDER BY id")
    assert [(e["kind"], e["amount"], e["reference"]) for e in ledger] == [
        ("topup", 10_000_000, f"opening:{u['user_id']}"), ("charge", -cost_micro, u["request_id"])]
    assert ledger[-1]["balance_after"] == 10_000_000 - cost_micro
    assert await gw.balance() == D(10) - D(cost_micro) / 1_000_000
    assert (await raw(pg_schema, "SELECT COUNT(*) FROM holds WHERE state = 'open'"))[0][0] == 0
    assert (await raw(pg_schema, "SELECT spent FROM api_keys WHERE id = $1", gw.key_id))[0][0] == cost_micro
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/health") as resp:
            assert (resp.status, (await resp.json())["database"]) == (200, "ok")


async def test_two_gateways_one_database(gateway, pg_url: str, pg_schema: str) -> None:
    """Two instances on one schema: alice's key (made through instance 1) works
    on both; ten calls alternate between them, streamed and not; the books
    balance; revoking on instance 1 is refused by instance 2 once its key
    cache polls keys_version."""
    toml = server_toml(pg_url, key_cache_seconds=0.2)
    gw1 = await gateway(toml, user="alice", balance="10.00")
    gw2 = await gateway(toml, user="bob", balance="1.00")
    assert gw1.storage is not gw2.storage and gw1.storage._pool is not gw2.storage._pool
    clients = [openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=gw1.key, max_retries=0) for g in (gw1, gw2)]

    async def call(i: int) -> int:
        c = clients[i % 2]
        msgs = [{"role": "user", "content": f"message number {i}"}]
        if i % 3:
            r = await c.chat.completions.create(model="demo", messages=msgs)
            assert r.choices[0].message.content == f"echo: message number {i}"
            return r.usage.prompt_tokens * DEMO_INPUT + r.usage.completion_tokens * DEMO_OUTPUT
        s = await c.chat.completions.create(model="demo", messages=msgs, stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in s:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert text == f"echo: message number {i}"
        return usage.prompt_tokens * DEMO_INPUT + usage.completion_tokens * DEMO_OUTPUT

    costs = await asyncio.gather(*(call(i) for i in range(10)))
    await gw1.idle()
    await gw2.idle()
    spent = D(sum(costs)) / 1_000_000
    assert await gw2.balance("alice") == D(10) - spent == await ledger_sum(gw2.storage, (await gw1.storage.get_user("alice")).id)
    assert await gw1.balance("bob") == D(1)
    rows = await raw(pg_schema, "SELECT COUNT(*) AS n, SUM(cost) AS c, COUNT(DISTINCT request_id) AS d FROM usage")
    assert (rows[0]["n"], rows[0]["c"], rows[0]["d"]) == (10, sum(costs), 10)
    assert len([r for r in await raw(pg_schema, "SELECT kind FROM ledger") if r["kind"] == "charge"]) == 10
    # revoke through instance 1's storage; instance 2 must stop accepting the key
    assert await gw1.storage.revoke_key(gw1.key_id) is True
    await asyncio.sleep(0.5)
    with pytest.raises(openai.AuthenticationError):
        await clients[1].chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}])
    assert await gw2.balance("alice") == D(10) - spent


async def test_two_gateways_share_a_keys_rpm(gateway, pg_url: str, pg_schema: str) -> None:
    """On PostgreSQL the rpm of a key is counted in the database: calls to
    two instances count against one window (the fourth of 3 is refused with
    429 and Retry-After, in the SDK's shape)."""
    gw1 = await gateway(server_toml(pg_url), user="alice", balance="10.00", rpm=3)
    gw2 = await gateway(server_toml(pg_url), user="bob", balance="1.00")
    clients = [openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=gw1.key, max_retries=0) for g in (gw1, gw2)]
    for i in range(3):
        r = await clients[i % 2].chat.completions.create(model="demo", messages=[{"role": "user", "content": f"m{i}"}])
        assert r.choices[0].message.content == f"echo: m{i}"
    with pytest.raises(openai.RateLimitError) as exc:
        await clients[1].chat.completions.create(model="demo", messages=[{"role": "user", "content": "again"}])
    assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60
    rows = await raw(pg_schema, "SELECT SUM(requests) AS n FROM rate_windows WHERE key_id = $1", gw1.key_id)
    assert rows[0]["n"] == 3
