"""Keys, per-key restrictions, and every error case of this stage, asserted by
status and by the native body shape of each protocol.  Every rejection is
checked to have sent nothing upstream."""

import asyncio
import datetime as dt
import json

import aiohttp
import pytest
import structlog

from cheapproxy.auth import hash_key
from cheapproxy.storage.sqlite import SQLiteStorage

from .test_e2e_relay import model_toml

PROTOCOLS = {
    # protocol: (path, body, headers-for-key)
    "openai-chat": ("/v1/chat/completions", {"model": "m1", "messages": [{"role": "user", "content": "x"}]}, "authorization"),
    "openai-responses": ("/v1/responses", {"model": "m1", "input": "x"}, "authorization"),
    "anthropic-messages": ("/v1/messages", {"model": "m1", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "x-api-key"),
    "gemini": ("/v1beta/models/{m}:generateContent", {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}, "x-goog-api-key"),
}


def key_headers(kind, key):
    if kind == "authorization":
        return {"Authorization": f"Bearer {key}"}
    return {kind: key}


def assert_shape(protocol, status, body, expect_status):
    assert status == expect_status, (status, body)
    if protocol in ("openai-chat", "openai-responses"):
        assert set(body["error"]) >= {"message", "type", "param", "code"}
        assert body["error"]["message"]
    elif protocol == "anthropic-messages":
        assert body["type"] == "error" and body["error"]["type"] and body["error"]["message"]
    else:
        assert body["error"]["code"] == expect_status and body["error"]["status"] and body["error"]["message"]


async def call(gw, protocol, key=None, model="m1", body=None, headers=None, raw=None, stream=False):
    path, default_body, kind = PROTOCOLS[protocol]
    body = dict(default_body if body is None else body)
    if protocol == "gemini":
        path = path.format(m=model)
        if stream:
            path = path.replace("generateContent", "streamGenerateContent") + "?alt=sse"
    else:
        body["model"] = model
        if stream:
            body["stream"] = True
    h = dict(headers or {})
    if key:
        h.update(key_headers(kind, key))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + path, data=raw if raw is not None else json.dumps(body), headers=h) as r:
            text = await r.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return r.status, parsed, r.headers


@pytest.fixture
async def env(gateway, fake_upstream):
    fake = await fake_upstream("openai-chat")
    gw = await gateway(fake.toml("up") + model_toml("m1", "up") + model_toml("m2", "up")
                       + "[server]\nmax_body_bytes = 4096\nkey_cache_seconds = 0.05\n")
    return gw, fake


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
async def test_missing_and_invalid_key_is_401_in_protocol_shape(env, protocol):
    gw, fake = env
    status, body, headers = await call(gw, protocol)
    assert_shape(protocol, status, body, 401)
    assert headers["x-request-id"].startswith("req_")
    status, body, _ = await call(gw, protocol, key="cp-not-a-real-key")
    assert_shape(protocol, status, body, 401)
    assert fake.log == []


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
async def test_unknown_model_is_404_and_never_forwarded(env, protocol):
    gw, fake = env
    status, body, _ = await call(gw, protocol, key=gw.key, model="gpt-unregistered")
    assert_shape(protocol, status, body, 404)
    assert "gpt-unregistered" in json.dumps(body)
    assert fake.log == []


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
async def test_malformed_json_is_400(env, protocol):
    gw, fake = env
    for raw in (b"{not json", b"[1,2]", b'{"a": NaN}', b"\xff\xfe{}", b"[" * 1500 + b"]" * 1500):
        status, body, _ = await call(gw, protocol, key=gw.key, raw=raw)
        assert_shape(protocol, status, body, 400)
    assert fake.log == []


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
async def test_oversize_body_is_413(env, protocol):
    gw, fake = env
    big = {"model": "m1", "messages": [{"role": "user", "content": "x" * 10000}], "contents": [], "input": "x" * 10000}
    status, body, _ = await call(gw, protocol, key=gw.key, body=big)
    assert_shape(protocol, status, body, 413)
    assert fake.log == []


async def test_model_globs_no_stream_ip_and_expiry(env):
    gw, fake = env
    _, only_m2 = await gw.create_key(models=["m2"])
    status, body, _ = await call(gw, "openai-chat", key=only_m2, model="m1")
    assert_shape("openai-chat", status, body, 403)
    status, _, _ = await call(gw, "openai-chat", key=only_m2, model="m2")
    assert status == 200
    n = len(fake.log)
    _, nostream = await gw.create_key(no_stream=True)
    status, body, _ = await call(gw, "anthropic-messages", key=nostream, stream=True)
    assert_shape("anthropic-messages", status, body, 403)
    _, ip_key = await gw.create_key(allow_ips=["10.0.0.0/8"])
    status, body, _ = await call(gw, "gemini", key=ip_key)
    assert_shape("gemini", status, body, 403)
    _, ok_ip = await gw.create_key(allow_ips=["127.0.0.0/8"])
    assert (await call(gw, "openai-chat", key=ok_ip))[0] == 200
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    _, expired = await gw.create_key(expires_at=past)
    status, body, _ = await call(gw, "openai-chat", key=expired)
    assert_shape("openai-chat", status, body, 401)
    assert "expired" in body["error"]["message"]
    assert len(fake.log) == n + 1  # only the allowed-IP request went upstream


async def test_alias_cannot_widen_a_model_glob(gateway, fake_upstream):
    fake = await fake_upstream("openai-chat")
    gw = await gateway(fake.toml("up") + model_toml("secret-model", "up").replace(
        'upstream = "up"\n', 'upstream = "up"\naliases = ["public-name"]\n') + model_toml("public-model", "up"),
        models=["public-*"])
    status, body, _ = await call(gw, "openai-chat", key=gw.key, model="public-name")
    assert status == 403 and fake.log == []


async def test_revocation_from_another_process_takes_effect(env):
    gw, fake = env
    key_id, secret = await gw.create_key()
    assert (await call(gw, "openai-chat", key=secret))[0] == 200
    # another process (the CLI) revokes through its own connection to the same database
    other = SQLiteStorage(gw.proxy.config.server.database, gw.proxy.config.base_dir)
    await other.open()
    try:
        assert await other.revoke_key(key_id)
    finally:
        await other.close()
    await asyncio.sleep(0.1)  # > key_cache_seconds
    status, body, _ = await call(gw, "openai-chat", key=secret)
    assert_shape("openai-chat", status, body, 401)
    assert "revoked" in body["error"]["message"]


async def test_keys_are_stored_only_as_hashes(env):
    gw, _ = env
    import sqlite3

    path = gw.proxy.config.server.database.removeprefix("sqlite:///")
    await gw.idle()
    dump = "\n".join(sqlite3.connect(path).iterdump())
    assert gw.key not in dump and hash_key(gw.key) in dump


@pytest.mark.parametrize("fault,expect", [("[error500]", 502), ("[error400]", 400), ("[error429]", 429)])
async def test_upstream_errors_in_client_shape(env, fault, expect):
    gw, fake = env
    for protocol in ("openai-chat", "anthropic-messages", "gemini"):
        body = dict(PROTOCOLS[protocol][1])
        if protocol == "gemini":
            body = {"contents": [{"role": "user", "parts": [{"text": fault}]}]}
        else:
            body["messages"] = [{"role": "user", "content": fault}]
        status, parsed, headers = await call(gw, protocol, key=gw.key, body=body)
        assert_shape(protocol, status, parsed, expect)
        assdump = json.dumps(parsed)
        assert "upstream-secret" not in assdump and gw.key not in assdump
        if fault == "[error400]":
            assert "bad request from fake" in assdump
    await gw.idle()
    assert await gw.balance() == 10  # failures cost nothing
    assert await gw.storage.open_holds() == 0


async def test_upstream_timeout_is_504(gateway, aiohttp_server):
    from aiohttp import web

    async def stall(request):
        await asyncio.sleep(30)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stall)
    srv = await aiohttp_server(app)
    gw = await gateway(f"""
[[upstreams]]
name = "slow"
provider = "openai"
base_url = "{str(srv.make_url('')).rstrip('/')}/v1"
api_key = "upstream-secret"
first_byte_timeout = 0.3
[routing]
retries = 0
""" + model_toml("m1", "slow"))
    for protocol in ("openai-chat", "anthropic-messages", "gemini", "openai-responses"):
        status, body, _ = await call(gw, protocol, key=gw.key)
        assert_shape(protocol, status, body, 504)


async def test_model_lists_and_info_and_health(env):
    gw, _ = env
    _, only_m2 = await gw.create_key(models=["m2"])
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {only_m2}"}) as r:
            data = await r.json()
            assert r.status == 200 and data["object"] == "list" and [m["id"] for m in data["data"]] == ["m2"]
        async with s.get(gw.url + "/v1/models", headers={"x-api-key": gw.key, "anthropic-version": "2023-06-01"}) as r:
            data = await r.json()
            ids = [m["id"] for m in data["data"]]
            assert "m1" in ids and "demo" in ids and data["data"][0]["type"] == "model" and "has_more" in data
        async with s.get(gw.url + "/v1beta/models", headers={"x-goog-api-key": gw.key}) as r:
            data = await r.json()
            assert "models/m1" in [m["name"] for m in data["models"]]
        async with s.get(gw.url + "/v1/models/info", headers={"Authorization": f"Bearer {gw.key}"}) as r:
            info = {m["id"]: m for m in (await r.json())["data"]}
            assert info["m1"]["price"]["input"] == "3" or info["m1"]["price"]["input"].startswith("3")
        async with s.get(gw.url + "/v1/models") as r:
            assert r.status == 401
        async with s.get(gw.url + "/health") as r:
            assert r.status == 200 and (await r.json())["database"] == "ok" and r.headers["x-request-id"]
        async with s.head(gw.url + "/") as r:
            assert r.status == 200 and r.headers["x-request-id"]
        async with s.get(gw.url + "/") as r:
            assert (await r.json())["name"] == "cheapproxy"
        # no route: aiohttp answers, and the answer still carries a request id
        async with s.get(gw.url + "/no/such/route") as r:
            assert r.status == 404 and r.headers["x-request-id"].startswith("req_")
        async with s.delete(gw.url + "/health") as r:
            assert r.status == 405 and r.headers["x-request-id"].startswith("req_")


async def test_no_secret_in_logs(env):
    gw, fake = env
    with structlog.testing.capture_logs() as logs:
        await call(gw, "openai-chat", key=gw.key)
        await call(gw, "openai-chat", key=gw.key, body={"messages": [{"role": "user", "content": "[error500]"}]})
        await call(gw, "openai-chat", key="cp-wrong-key-0123456789")
        await gw.idle()
    assert any(e.get("event") == "request.finished" and e.get("key_id") == gw.key_id for e in logs)
    text = json.dumps(logs, default=str)
    assert gw.key not in text and "upstream-secret" not in text and "cp-wrong-key-0123456789" not in text


async def test_a_burst_of_requests_with_a_new_key_reads_it_once(tmp_path):
    """KeyCache: concurrent lookups of a key not yet cached share one database
    read; a caller cancelled meanwhile does not cancel it for the others."""
    from cheapproxy.auth import KeyCache
    from cheapproxy.storage.base import KeyRecord

    class Counting(SQLiteStorage):  # the real backend, counting key reads
        reads = 0

        async def get_key_by_hash(self, key_hash):
            type(self).reads += 1
            await asyncio.sleep(0.05)  # a slow read: every caller arrives while it runs
            return await super().get_key_by_hash(key_hash)

    s = Counting("sqlite:///k.db", tmp_path)
    await s.open()
    try:
        u = await s.create_user("kay", 1)
        await s.create_key(KeyRecord(id="k1", user_id=u.id, key_hash=hash_key("cp-secret-one")))
        cache = KeyCache(s)
        first = asyncio.ensure_future(cache.lookup("cp-secret-one"))
        await asyncio.sleep(0.01)
        first.cancel()
        found = await asyncio.gather(*(cache.lookup("cp-secret-one") for _ in range(16)),
                                     *(cache.lookup("cp-unknown") for _ in range(4)))
        assert [r.id for r in found[:16]] == ["k1"] * 16 and found[16:] == [None] * 4
        assert Counting.reads == 2  # one per key, the cancelled caller's read shared
        assert await cache.lookup("cp-secret-one") is found[0] and Counting.reads == 2
    finally:
        await s.close()
