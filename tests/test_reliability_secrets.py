"""Secrets canary: known upstream keys and user keys are planted in a real
``cheapproxy serve`` process (JSON logging at debug level, as configured by
cheapproxy/logging.py), every error path is run, and no secret may appear in
any log line, response body or header, /health, /metrics, model lists or CLI
listing.  Masked forms may show at most 4 characters of a secret."""

import asyncio
import json
import signal

import aiohttp

from .reliability_util import Blackhole, Fault, ServeProcess, faults, free_port, model_toml  # noqa: F401

# canaries made of letters that never occur in normal output, so that any run
# of 5 of their characters found anywhere is a leak, not a coincidence
UP_OA = "sk-UQZXJV-KWQXZJ-VKQWJX-QJZW1"
UP_AN = "sk-ant-UZQXJV-KWQJZX-VQKWXJ-XWJQ2"
PLANTED = "cp-QZXJKVWQJXZKVWJQZXVKWQJZXKVJWQXZKVJQWZXJ"  # a user key, stored hashed like any other
WRONG_KEYS = ["cp-WQZXJKVQZXJWKVQZJXW", "QXZJVKWJZQXVWKQJ-userkey", "Bearer cp-JQZXWKVJQZXWKV"]
PATHS = {"oa": "/v1/chat/completions", "an": "/v1/messages"}


def body(kind, model, text="hi", stream=False, **extra):
    b = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    if kind == "an":
        b["max_tokens"] = 20
    if stream:
        b["stream"] = True
    return b


def auth(kind, key):
    return {"x-api-key": key, "anthropic-version": "2023-06-01"} if kind == "an" else {"Authorization": f"Bearer {key}"}


async def plant_key(sp, user, secret):
    from cheapproxy.auth import hash_key, new_key_id
    from cheapproxy.storage.base import KeyRecord
    from cheapproxy.storage.sqlite import SQLiteStorage

    store = SQLiteStorage(f"sqlite:///{sp.db}", ".")
    await store.open()
    try:
        u = await store.get_user(user)
        await store.create_key(KeyRecord(id=new_key_id(), user_id=u.id, user_name=u.name, key_hash=hash_key(secret),
                                         prefix=secret[:7], label="canary"))
    finally:
        await store.close()


def leaks(text, secret, reveal=4):
    """Any run of more than ``reveal`` characters of the secret (its random
    part: our 'cp-' prefix and a provider's 'sk-' are not secret)."""
    core = secret.split("-", 1)[1] if secret.startswith(("cp-", "sk-", "Bearer ")) else secret
    n = reveal + 1
    return [core[i:i + n] for i in range(len(core) - n + 1) if core[i:i + n] in text]


async def test_no_secret_leaves_on_any_error_path(tmp_path, faults):
    oa = await faults(secret=UP_OA)
    an = await faults(secret=UP_AN)
    hole = Blackhole()
    dead = free_port()
    cfg = ("[routing]\nretries = 0\n"
           + oa.toml("oa", "openai-chat", first_byte_timeout=0.3, idle_timeout=0.3).replace(f'"{UP_OA}"', '"${CANARY_OA}"')
           + an.toml("an", "anthropic-messages", first_byte_timeout=0.3, idle_timeout=0.3).replace(f'"{UP_AN}"', '"${CANARY_AN}"')
           + f'[[upstreams]]\nname = "dead"\nprovider = "openai"\nbase_url = "http://127.0.0.1:{dead}/v1"\napi_key = "${{CANARY_OA}}"\n'
           + f'[[upstreams]]\nname = "hole"\nprovider = "anthropic"\nbase_url = "http://127.0.0.1:{hole.port}"\n'
           + 'api_key = "${CANARY_AN}"\nconnect_timeout = 0.2\n'
           + model_toml("m-oa", "oa") + model_toml("m-an", "an") + model_toml("m-dead", "dead") + model_toml("m-hole", "hole"))
    sp = ServeProcess(tmp_path, cfg, env={"CANARY_OA": UP_OA, "CANARY_AN": UP_AN})
    assert UP_OA not in sp.config.read_text()
    outputs: list[str] = []
    try:
        await sp.cli("users", "add", "carol", "--balance", "10", "--json")
        await sp.cli("users", "add", "dave", "--balance", "10", "--json")
        keys = {}
        for user in ("carol", "dave"):
            _, out, _ = await sp.cli("keys", "create", user, "--json")
            keys[user] = json.loads(out)["key"]
        _, out, _ = await sp.cli("keys", "create", "dave", "--json", "--label", "to-revoke")
        revoked = json.loads(out)
        await sp.cli("keys", "revoke", revoked["id"])
        user_keys = [keys["carol"], keys["dave"], revoked["key"]]
        await plant_key(sp, "carol", PLANTED)
        await sp.start()
        key = PLANTED
        calls = pipeline_calls = 0
        async with aiohttp.ClientSession() as s:
            async def hit(method, path, *, headers=None, data=None, echoes_input=False):
                nonlocal calls, pipeline_calls
                calls += 1
                pipeline_calls += path in PATHS.values() or "generateContent" in path
                async with s.request(method, sp.url + path, headers=headers, data=data) as r:
                    raw = await r.read()
                    if not echoes_input:  # a 404 names the model the client sent: its own input, back to itself
                        outputs.append(f"{r.status} {dict(r.headers)} {raw.decode(errors='replace')}")
                    return r.status

            # upstream errors, some echoing the credential they received
            for kind, fault in (("oa", oa), ("an", an)):
                for st in (400, 401, 403, 429, 500, 503):
                    for stream in (False, True):
                        fault.script(Fault(kind="status", status=st, echo_key=True, retry_after="1"))
                        await hit("POST", PATHS[kind], headers=auth(kind, key),
                                  data=json.dumps(body(kind, f"m-{kind}", stream=stream)))
                for fk in ("stall_headers", "stall_accept", "stall_mid", "cut", "fin", "rst"):
                    fault.script(Fault(kind=fk, chunks=2))
                    await hit("POST", PATHS[kind], headers=auth(kind, key), data=json.dumps(body(kind, f"m-{kind}", stream=True)))
                # translated to the other protocol, with errors too
                other = "an" if kind == "oa" else "oa"
                (an if other == "an" else oa).script(Fault(kind="status", status=401, echo_key=True))
                await hit("POST", PATHS[kind], headers=auth(kind, key), data=json.dumps(body(kind, f"m-{other}")))
                for model in ("m-dead", "m-hole"):
                    await hit("POST", PATHS[kind], headers=auth(kind, key), data=json.dumps(body(kind, model, stream=True)))
            # the gateway's own refusals, with keys in odd places
            for bad in WRONG_KEYS + [revoked["key"]]:
                await hit("POST", PATHS["oa"], headers={"Authorization": f"Bearer {bad}"}, data=json.dumps(body("oa", "m-oa")))
                await hit("POST", PATHS["an"], headers={"x-api-key": bad}, data=json.dumps(body("an", "m-an")))
                await hit("POST", f"/v1beta/models/m-oa:generateContent?key={bad}", data=json.dumps({"contents": []}))
                await hit("GET", "/v1/models", headers={"Authorization": f"Bearer {bad}"})
            await hit("POST", PATHS["oa"], headers=auth("oa", key), data=b'{"model": "m-oa", "messages": [')
            await hit("POST", PATHS["oa"], headers=auth("oa", key), data=json.dumps(body("oa", "m-oa", api_key=keys["dave"])))
            await hit("POST", PATHS["oa"], headers=auth("oa", key), data=json.dumps(body("oa", keys["dave"])), echoes_input=True)
            await hit("POST", PATHS["oa"], headers=auth("oa", key), data=json.dumps(body("oa", "m-oa", max_tokens=-5)))
            await hit("POST", "/api/user/transfer", headers=auth("oa", key),
                      data=json.dumps({"toUsername": "dave", "amount": "1.00", "note": keys["dave"]}))
            await hit("POST", "/api/user/transfer", headers=auth("oa", key), data=json.dumps({"toUsername": keys["dave"], "amount": 1}))
            for path in ("/health", "/", "/v1/models", "/v1/models/info", "/v1beta/models", "/metrics"):
                await hit("GET", path, headers=auth("oa", key))
            # a successful call too
            assert await hit("POST", PATHS["oa"], headers=auth("oa", key), data=json.dumps(body("oa", "m-oa"))) == 200
        sp.signal(signal.SIGTERM)
        assert await sp.wait() == 0
        listings = await asyncio.gather(*(sp.cli(*args) for args in (
            ("keys", "list", "--json"), ("keys", "list"), ("users", "list", "--json"), ("users", "list"),
            ("usage", "--json"), ("usage",), ("users", "show", "carol", "--json"), ("plugins",), ("check",))))
        outputs.extend(out + err for _, out, err in listings)
        assert len(json.loads(listings[4][1])["records"]) == pipeline_calls - 16  # usage rows: the calls that got past auth
    finally:
        await sp.stop()
        hole.close()
    logs = sp.stderr
    log_lines = [line for line in logs.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in log_lines if line.startswith("{")]
    finished = [e for e in parsed if e.get("event") == "request.finished"]
    assert len(finished) == pipeline_calls  # every protocol request logged its line (plain GETs and transfers have none)
    assert any(e.get("level") == "debug" for e in parsed) or any(e.get("level") == "warning" for e in parsed)
    # the upstreams really received the canaries (so the test would see them if they leaked)
    assert all(e["headers"].get("authorization") == f"Bearer {UP_OA}" for e in oa.log)
    assert all(e["headers"].get("x-api-key") == UP_AN for e in an.log)
    everything = "\n".join([logs, sp.stdout, *outputs])
    for secret in [UP_OA, UP_AN, PLANTED, *WRONG_KEYS]:
        assert secret not in everything
        assert leaks(everything, secret) == [], (secret, leaks(everything, secret))
    for secret in user_keys:  # random keys: no run of 12 of their characters (a masked form shows 4)
        assert secret not in everything and leaks(everything, secret, reveal=11) == []
    assert "cp-QZXJ" in "".join(outputs)  # the listing's masked form: 4 characters after the prefix
    print(f"\ncanary: {calls} requests, {len(log_lines)} log lines, {len(outputs)} bodies/listings scanned, 0 leaks")
