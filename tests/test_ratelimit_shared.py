"""Rate limits shared by the processes of one database: two gateways on one
SQLite file driven by the official SDKs, and a real ``serve --workers 2``
whose workers count one key's requests in one window."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from .reliability_util import ServeProcess, eventually


async def test_two_gateways_on_one_file_share_a_keys_rpm(gateway: Any, tmp_path: Any) -> None:
    toml = f'[server]\ndatabase = "sqlite:///{tmp_path}/shared.db"\nrate_limits = "database"\n'
    gw1 = await gateway(toml, user="alice", rpm=3)
    gw2 = await gateway(toml, user="bob")
    oa = [openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=gw1.key, max_retries=0) for g in (gw1, gw2)]
    for i in range(3):  # alternating: 1, 2, 1
        r = await oa[i % 2].chat.completions.create(model="demo", messages=[{"role": "user", "content": f"hi {i}"}])
        assert r.choices[0].message.content == f"echo: hi {i}"
    with pytest.raises(openai.RateLimitError) as exc:
        await oa[1].chat.completions.create(model="demo", messages=[{"role": "user", "content": "one more"}])
    assert exc.value.status_code == 429
    assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60
    assert exc.value.body["code"] == "rate_limit_exceeded"
    assert "3 requests per minute" in exc.value.body["message"]
    # the same key in another protocol, on the first gateway: the same window, the 429 in Anthropic's shape
    an = anthropic.AsyncAnthropic(base_url=gw1.url, api_key=gw1.key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as aexc:
        await an.messages.create(model="demo", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert aexc.value.body["error"]["type"] == "rate_limit_error"
    await gw1.idle()
    await gw2.idle()
    assert len(await gw1.storage.list_usage()) == 3  # refused requests were neither served nor charged


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (one per worker under SO_REUSEPORT)."""
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                n += 1
    return n


async def test_serve_workers_count_a_keys_rpm_in_one_window(tmp_path: Any) -> None:
    """``serve --workers 2``: twenty requests on fresh connections, which the
    kernel spreads over both workers; exactly the key's rpm of 5 are
    served (counted per worker, as before, it would be up to 10)."""
    sp = ServeProcess(tmp_path, "")
    await sp.cli("users", "add", "bob", "--balance", "10", "--json")
    _, out, _ = await sp.cli("keys", "create", "bob", "--rpm", "5", "--json")
    key = json.loads(out)["key"]
    await sp.start("--workers", "2")
    try:
        await eventually(lambda: _listeners(sp.port) == 2, timeout=30)
        statuses: list[int] = []
        body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
        for _ in range(20):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                async with http.post(sp.url + "/v1/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert r.headers["Retry-After"].isdigit()
                        assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 15
    finally:
        sp.signal(2)
        try:
            await sp.wait(30)
        finally:
            await sp.stop()
    rows = await asyncio.to_thread(_usage_rows, sp.db)
    assert rows == 5


def _usage_rows(db: Any) -> int:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0])
    finally:
        conn.close()
