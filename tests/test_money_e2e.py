"""Money through the real HTTP API and SDKs: exact costs (cache tokens
included, streamed == non-streamed), concurrency against a small balance,
per-key caps and rate limits, and the transfer API."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import aiohttp
import anthropic
import openai
import pytest

D = Decimal
PRICES = "[models.price]\ninput = 3\noutput = 15\ncache_write = 3.75\ncache_read = 0.3\n"


async def gw_for(gateway, fake_upstream, protocol, balance="10.00", **key):
    fake = await fake_upstream(protocol)
    gw = await gateway(fake.toml("up") + '[[models]]\nname = "m"\nupstream = "up"\nmax_output_tokens = 1000\n' + PRICES,
                       balance=balance, **key)
    return gw, fake


@pytest.mark.parametrize("protocol,expected", [
    # U=10 uncached, R=5 cache read, W=2 cache write (Anthropic only), O=7 output, prices per 1M
    ("anthropic-messages", D("0.000144")),   # 10*3 + 2*3.75 + 5*0.3 + 7*15 = 144 micro-USD
    ("openai-chat", D("0.000137")),          # 10*3 + 5*0.3 + 7*15 = 136.5 -> rounded up to 137
])
async def test_exact_cost_streamed_equals_non_streamed(gateway, fake_upstream, protocol, expected):
    gw, fake = await gw_for(gateway, fake_upstream, protocol)
    async with aiohttp.ClientSession() as s:
        if protocol == "anthropic-messages":
            path, body, hdr = "/v1/messages", {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}, {"x-api-key": gw.key}
        else:
            path, body, hdr = "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, {"Authorization": f"Bearer {gw.key}"}
        async with s.post(gw.url + path, json=body, headers=hdr) as r:
            assert r.status == 200
            assert D(r.headers["x-cheapproxy-cost"]) == expected
        async with s.post(gw.url + path, json={**body, "stream": True}, headers=hdr) as r:
            assert r.status == 200 and "x-cheapproxy-cost" not in r.headers
            await r.read()
    # through the SDK too (streamed helper)
    if protocol == "anthropic-messages":
        c = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
        async with c.messages.stream(model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as st:
            await st.get_final_message()
    else:
        c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
        async for _ in await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True):
            pass
    await gw.idle()
    recs = await gw.storage.list_usage()
    assert len(recs) == 3 and {r.cost for r in recs} == {expected}
    assert sorted(r.streamed for r in recs) == [False, True, True]
    assert await gw.balance() == D("10.00") - 3 * expected
    ledger = await gw.storage.ledger((await gw.storage.get_user(gw.user)).id)
    assert sum(e.amount for e in ledger) == await gw.balance()
    assert await gw.storage.open_holds() == 0


async def test_200_concurrent_requests_against_a_small_balance(gateway, fake_upstream):
    # each request holds (input estimate + 1000 output tokens at $15/M) ~= $0.0152 and costs $0.000137
    gw, fake = await gw_for(gateway, fake_upstream, "openai-chat", balance="0.05")
    statuses: dict[int, int] = {}

    async def one(s):
        async with s.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {gw.key}"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}) as r:
            body = await r.json()
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if r.status == 402:
                assert body["error"]["type"] == "insufficient_quota" and "balance" in body["error"]["message"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(one(s) for _ in range(200)))
    await gw.idle()
    ok = statuses.get(200, 0)
    assert set(statuses) <= {200, 402} and ok + statuses.get(402, 0) == 200
    assert 1 <= ok and len(fake.log) == ok  # a refused request never reached the upstream
    bal = await gw.balance()
    recs = [r for r in await gw.storage.list_usage() if r.status == "ok"]
    assert len(recs) == ok and bal == D("0.05") - ok * D("0.000137") >= 0
    user = await gw.storage.get_user(gw.user)
    assert user.held == 0 and await gw.storage.open_holds() == 0
    assert sum(e.amount for e in await gw.storage.ledger(user.id)) == bal


async def test_key_spending_cap_and_rpm(gateway, fake_upstream):
    gw, fake = await gw_for(gateway, fake_upstream, "openai-chat")
    _, capped = await gw.create_key(max_spend=D("0.02"))
    hdr = {"Authorization": f"Bearer {capped}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=hdr) as r:
            assert r.status == 200
        async with s.post(gw.url + "/v1/chat/completions", json={**body, "max_tokens": 5000}, headers=hdr) as r:
            # 5000 tokens at $15/M = $0.075 > the key's $0.02 cap
            assert r.status == 402 and (await r.json())["error"]["code"] == "key_spend_cap"
        _, limited = await gw.create_key(rpm=2)
        n_before = len(fake.log)
        codes = []
        for _ in range(3):
            async with s.post(gw.url + "/v1/messages", json={"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
                              headers={"x-api-key": limited}) as r:
                codes.append(r.status)
                last = (r.headers.get("Retry-After"), await r.json())
        assert codes == [200, 200, 429]
        assert int(last[0]) >= 1 and last[1]["type"] == "error" and last[1]["error"]["type"] == "rate_limit_error"
        assert len(fake.log) == n_before + 2


async def test_transfer_api(gateway):
    gw = await gateway("", balance="10.00")
    await gw.create_user("bob", "1.00")
    url = gw.url + "/api/user/transfer"
    hdr = {"Authorization": f"Bearer {gw.key}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"toUsername": "bob", "amount": 2.5}, headers=hdr) as r:
            body = await r.json()
            assert r.status == 200 and body == {"success": True, "amount": "2.50", "from": "alice", "to": "bob",
                                                "senderNewBalance": "7.50", "receiverNewBalance": "3.50"}
        cases = [
            ({"toUsername": "bob", "amount": 100}, 400, "Insufficient balance"),
            ({"toUsername": "nobody", "amount": 1}, 404, "User not found"),
            ({"toUsername": "alice", "amount": 1}, 400, "Cannot transfer to yourself"),
            ({"toUsername": "bob", "amount": -1}, 400, None),
            ({"toUsername": "bob", "amount": 0}, 400, None),
            ({"toUsername": "bob", "amount": 1e-30}, 400, None),
            ({"toUsername": "bob", "amount": "1.001"}, 400, None),
            ({"toUsername": "bob", "amount": 1e300}, 400, None),
            ({"toUsername": "bob", "amount": True}, 400, None),
        ]
        for payload, status, msg in cases:
            async with s.post(url, json=payload, headers=hdr) as r:
                body = await r.json()
                assert r.status == status and body["success"] is False, (payload, body)
                if msg:
                    assert body["error"] == msg
        async with s.post(url, data=b'{"toUsername": "bob", "amount": NaN}', headers=hdr) as r:
            assert r.status == 400
        async with s.post(url, json={"toUsername": "bob", "amount": 1}) as r:
            assert r.status == 401 and (await r.json()) == {"success": False, "error": "Unauthorized"}
        # idempotency: 20 concurrent retries move money once; a different body with the key is refused
        idem = {**hdr, "Idempotency-Key": "abc-123"}
        results = await asyncio.gather(*(s.post(url, json={"toUsername": "bob", "amount": "1.25"}, headers=idem) for _ in range(20)))
        bodies = [json.loads(await r.read()) for r in results]
        assert all(r.status == 200 for r in results) and len({json.dumps(b) for b in bodies}) == 1
        async with s.post(url, json={"toUsername": "bob", "amount": "2"}, headers=idem) as r:
            assert r.status == 409
    assert await gw.balance() == D("6.25") and await gw.balance("bob") == D("4.75")
    alice = await gw.storage.get_user("alice")
    kinds = [e.kind for e in await gw.storage.ledger(alice.id)]
    assert kinds.count("transfer_out") == 2


async def test_database_outage_fails_closed_with_503(gateway):
    gw = await gateway("")
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages", headers={"x-api-key": gw.key},
                          json={"model": "demo", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 200
        await gw.idle()
        await gw.proxy.billing.flush()  # drop the idle lease so the next request needs the database
        await gw.storage.close()  # the database goes away under the running gateway
        async with s.post(gw.url + "/v1/messages", headers={"x-api-key": gw.key},
                          json={"model": "demo", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}) as r:
            body = await r.json()
            assert r.status == 503 and body["type"] == "error" and "database" in body["error"]["message"]
            assert r.headers["Retry-After"] == "1"
        async with s.get(gw.url + "/health") as r:
            assert r.status == 503 and (await r.json())["database"] == "unavailable"
        await gw.storage.open()
