"""Bad input gets a clear 400/413 in the client's shape and nothing reaches an
upstream; client-controlled fields never change where a request goes; only
each protocol's header allowlist is forwarded; CR/LF/NUL never reaches an
upstream header."""

import asyncio
import json

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapproxy.errors import ProxyError
from cheapproxy.protocol import UpstreamRequest
from cheapproxy.testing.fault_upstream import SECRET
from cheapproxy.upstream import check_outbound

from .reliability_util import Fault, faults, model_toml, port_of, raw_request  # noqa: F401

ROUTES = {
    "openai-chat": ("/v1/chat/completions", lambda m, t: {"model": m, "messages": [{"role": "user", "content": t}]}),
    "openai-responses": ("/v1/responses", lambda m, t: {"model": m, "input": t}),
    "anthropic-messages": ("/v1/messages", lambda m, t: {"model": m, "max_tokens": 50, "messages": [{"role": "user", "content": t}]}),
    "gemini": ("/v1beta/models/m:generateContent", lambda m, t: {"contents": [{"role": "user", "parts": [{"text": t}]}]}),
}


@pytest.fixture
async def env(gateway, faults):
    fault = await faults()
    gw = await gateway(fault.toml("up", "openai-chat") + fault.toml("an", "anthropic-messages") + model_toml("m", "up")
                       + model_toml("m-an", "an") + "[server]\nmax_body_bytes = 65536\n", production=True)
    return gw, fault


async def send(gw, protocol, data, headers=None):
    path = ROUTES[protocol][0]
    h = {"Authorization": f"Bearer {gw.key}", "Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + path, data=data, headers=h) as r:
            raw = await r.read()
            return r.status, raw, r.headers


def shape_ok(protocol, status, raw):
    body = json.loads(raw)
    if protocol.startswith("openai"):
        return body["error"]["message"] and body["error"]["type"]
    if protocol == "anthropic-messages":
        return body["type"] == "error" and body["error"]["message"]
    return body["error"]["code"] == status and body["error"]["status"]


def valid(protocol, text="hi"):
    return json.dumps(ROUTES[protocol][1]("m", text)).encode()


BAD_JSON = {
    "truncated": b'{"model": "m", "messages": [',
    "nan": b'{"model": "m", "temperature": NaN, "messages": []}',
    "infinity": b'{"model": "m", "temperature": Infinity, "messages": []}',
    "overflow": b'{"model": "m", "temperature": 1e309, "messages": []}',
    "duplicate": b'{"model": "m", "model": "other", "messages": []}',
    "duplicate-nested": b'{"model": "m", "metadata": {"a": 1, "b": {"x": ":", "x": 2}}}',
    "deep": b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "deep-under-orjson": b'{"model": "m", "x": ' + b"[" * 500 + b"]" * 500 + b"}",
    "invalid-utf8": b'{"model": "m\xff\xfe", "messages": []}',
    "lone-surrogate": b'{"model": "\\ud800", "messages": []}',
    "array": b'[{"model": "m"}]',
    "string": b'"hello"',
    "empty": b"",
    "trailing": b'{"model": "m"} {"model": "m"}',
}


@pytest.mark.parametrize("protocol", list(ROUTES))
@pytest.mark.parametrize("case", list(BAD_JSON))
async def test_malformed_json_is_400_in_the_client_shape(env, protocol, case):
    gw, fault = env
    status, raw, _ = await send(gw, protocol, BAD_JSON[case])
    assert status == 400 and shape_ok(protocol, status, raw), (status, raw[:300])
    assert fault.attempts() == 0


async def test_the_worker_survives_bad_input(env):
    gw, fault = env
    for data in BAD_JSON.values():
        await send(gw, "openai-chat", data)
    status, raw, _ = await send(gw, "openai-chat", valid("openai-chat"))
    assert status == 200 and fault.attempts() == 1


def test_duplicate_detection_is_exact():
    """The cheap pre-check never hides a duplicate and the exact pass never
    invents one: escaped quotes, colons in strings, empty keys, backslashes."""
    from cheapproxy.validate import parse_body

    fine = [b'{"a": "x\\": y", "b": ":", "": 1, "\\\\": 2, "c": {"a": "\\"\\":"}}',
            b'{"a" :1, "b"\n:\t2, "t": "{\\"k\\": \\"v\\", \\"k\\": 1}"}']
    for raw in fine:
        parse_body(raw)
    for raw in [b'{"a": 1, "a": 1}', b'{"x": [{"k": ":", "k": 2}]}', b'{"\\\\": 1, "\\\\": 2}', b'{"": 1, "": 2}',
                b'{"a": "x\\": y", "a": 2}']:
        with pytest.raises(ProxyError) as e:
            parse_body(raw)
        assert e.value.status == 400 and "appears twice" in e.value.message


ABSURD = [
    ("max_tokens", 2**63), ("max_tokens", 18446744073709551616), ("max_tokens", -1), ("max_tokens", 1.5),
    ("max_tokens", "100"), ("max_tokens", True), ("max_tokens", 10_000_001),
    ("n", 2**63), ("n", 0), ("n", -1), ("n", 129), ("n", "2"), ("n", 1e9),
]


@pytest.mark.parametrize("field,value", ABSURD)
async def test_absurd_numbers_are_400(env, field, value):
    gw, fault = env
    body = dict(ROUTES["openai-chat"][1]("m", "hi"), **{field: value})
    status, raw, _ = await send(gw, "openai-chat", json.dumps(body).encode())
    assert status == 400 and shape_ok("openai-chat", status, raw), raw
    assert fault.attempts() == 0
    assert await gw.balance() == 10


async def test_n_choices_are_held_for(env):
    """n = 3 holds three answers' worth of output (never multiplied past the bound)."""
    gw, fault = env
    body = dict(ROUTES["openai-chat"][1]("m", "hi"), n=3, max_tokens=1000)
    status, raw, _ = await send(gw, "openai-chat", json.dumps(body).encode())
    assert status == 200 and fault.log[-1]["body"]["n"] == 3


# ---------------------------------------------------------------- routing fields


class Canary:
    """A loopback listener that counts every connection made to it."""

    def __init__(self):
        self.connections = 0

    async def start(self):
        async def on_conn(reader, writer):
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self


ROUTING = ["api_base", "base_url", "host", "api_key", "user_config", "extra_body"]


def steer(url):
    return {"api_base": url, "base_url": url + "/v1", "host": url.removeprefix("http://"), "api_key": "sk-client-supplied",
            "user_config": {"api_base": url, "model_list": [{"litellm_params": {"api_base": url}}]},
            "extra_body": {"api_base": url, "base_url": url}}


@pytest.mark.parametrize("protocol", list(ROUTES))
@pytest.mark.parametrize("field", ROUTING)
async def test_routing_fields_at_the_top_level_are_refused(env, protocol, field):
    gw, fault = env
    canary = await Canary().start()
    body = dict(ROUTES[protocol][1]("m", "hi"), **{field: steer(canary.url)[field]})
    status, raw, _ = await send(gw, protocol, json.dumps(body).encode())
    assert status == 400 and shape_ok(protocol, status, raw) and field in raw.decode()
    assert canary.connections == 0 and fault.attempts() == 0


@pytest.mark.parametrize("protocol", list(ROUTES))
async def test_routing_fields_nested_anywhere_are_inert(env, protocol):
    """Nested, they are the client's data: the configured upstream gets the
    request (with the data), nothing ever connects to the canary."""
    gw, fault = env
    canary = await Canary().start()
    nested = steer(canary.url)
    body = ROUTES[protocol][1]("m", "hi " + json.dumps(nested))
    schema = {"type": "object", "properties": {k: {"type": "string", "default": canary.url} for k in nested}}
    if protocol == "openai-chat":
        body.update(metadata={k: json.dumps(v) for k, v in nested.items()},
                    tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
    elif protocol == "openai-responses":
        body.update(metadata={k: json.dumps(v)[:500] for k, v in nested.items()},
                    tools=[{"type": "function", "name": "f", "parameters": schema}])
    elif protocol == "anthropic-messages":
        body["model"] = "m-an"
        body.update(metadata={"user_id": canary.url}, tools=[{"name": "f", "input_schema": schema}])
    else:
        body.update(tools=[{"functionDeclarations": [{"name": "f", "parameters": schema}]}])
    if protocol == "openai-chat":  # an image URL too: data for the upstream, never fetched here
        body["messages"][0]["content"] = [{"type": "text", "text": "hi"},
                                          {"type": "image_url", "image_url": {"url": canary.url + "/i.png"}}]
    status, raw, _ = await send(gw, protocol, json.dumps(body).encode())
    assert status == 200, raw
    assert fault.attempts() == 1 and canary.connections == 0
    sent = fault.log[0]
    assert canary.url in json.dumps(sent["body"])  # passed on as data to the configured upstream
    creds = sent["headers"].get("authorization", "") + sent["headers"].get("x-api-key", "")
    assert SECRET in creds and "sk-client-supplied" not in creds


# ---------------------------------------------------------------- headers

ALLOWED = {"host", "content-type", "content-length", "accept", "accept-encoding", "authorization", "x-api-key",
           "anthropic-version", "anthropic-beta"}
HOSTILE = {"Cookie": "session=abc", "x-goog-api-key": "client-goog", "Connection": "keep-alive, X-Smuggle",
           "X-Smuggle": "1", "Proxy-Authorization": "Basic eA==", "TE": "trailers", "X-Forwarded-For": "10.0.0.1",
           "X-Forwarded-Host": "evil.example", "Forwarded": "for=10.0.0.1", "anthropic-beta": "tools-2024-04-04",
           "User-Agent": "client/1.0", "X-Stainless-Os": "Linux", "Origin": "http://evil.example"}


@pytest.mark.parametrize("protocol,model", [("openai-chat", "m"), ("anthropic-messages", "m-an"), ("openai-chat", "m-an"),
                                            ("anthropic-messages", "m")])
async def test_only_allowlisted_client_headers_reach_the_upstream(env, protocol, model):
    gw, fault = env
    for auth in ({"Authorization": f"Bearer {gw.key}"}, {"x-api-key": gw.key}):
        body = json.loads(valid(protocol))
        body["model"] = model
        headers = {**HOSTILE, **auth, "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as s:
            async with s.post(gw.url + ROUTES[protocol][0], json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
        sent = fault.log[-1]["headers"]
        assert set(sent) <= ALLOWED, set(sent) - ALLOWED
        assert gw.key not in json.dumps(sent)
        assert sent.get("authorization", f"Bearer {SECRET}") == f"Bearer {SECRET}"
        assert sent.get("x-api-key", SECRET) == SECRET
        # anthropic-beta is Anthropic's allowlisted header on a same-protocol relay only
        assert ("anthropic-beta" in sent) == (protocol == "anthropic-messages" and model == "m-an")


@pytest.mark.parametrize("header", [b"anthropic-beta: a\x00b", b"anthropic-beta: a\rX-Injected: 1", b"anthropic-version: 2023\x00"])
async def test_control_characters_in_forwarded_headers_are_refused(env, header):
    gw, fault = env
    body = json.dumps({"model": "m-an", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}).encode()
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"x-api-key: {gw.key}\r\nContent-Length: {len(body)}\r\n".encode() + header + b"\r\n\r\n")
    data = await raw_request(port_of(gw.url), head, body)
    assert data.split(b"\r\n")[0].endswith(b" 400 Bad Request"), data[:200]
    assert fault.attempts() == 0


@pytest.mark.parametrize("where", ["model", "user", "metadata"])
async def test_crlf_in_body_fields_never_becomes_a_header(env, where):
    gw, fault = env
    evil = "m\r\nX-Injected: 1\r\n\r\nGET / HTTP/1.1"
    body = json.loads(valid("openai-chat"))
    if where == "model":
        body["model"] = evil
    elif where == "user":
        body["user"] = evil
    else:
        body["metadata"] = {"tag": evil}
    status, raw, _ = await send(gw, "openai-chat", json.dumps(body).encode())
    if where == "model":
        assert status == 404 and fault.attempts() == 0  # an unregistered name never leaves the gateway
    else:
        assert status == 200 and fault.attempts() == 1
        assert "x-injected" not in fault.log[0]["headers"]


def test_the_transport_refuses_control_characters_in_anything_it_sends():
    for ureq in (UpstreamRequest(path="/v1/messages", body=b"{}", headers={"anthropic-beta": "a\r\nX-Injected: 1"}),
                 UpstreamRequest(path="/v1/messages", body=b"{}", headers={"x\nname": "v"}),
                 UpstreamRequest(path="/v1/models/a\r\nb:generateContent", body=b"{}"),
                 UpstreamRequest(path="/v1/x", body=b"{}", query={"alt": "sse\x00"})):
        with pytest.raises(ProxyError) as e:
            check_outbound(ureq)
        assert e.value.status == 400
    check_outbound(UpstreamRequest(path="/v1/messages", body=b"{\"a\": \"\\r\\n\"}", headers={"anthropic-beta": "x"}))


@pytest.mark.parametrize("protocol,model", [("openai-chat", "m"), ("anthropic-messages", "m-an")])
async def test_upstream_redirects_are_never_followed(env, protocol, model):
    """A 3xx from an upstream would carry our credential headers to its Location."""
    gw, fault = env
    canary = await Canary().start()
    fault.script(*[Fault(kind="redirect", location=canary.url + "/v1/messages")] * 3)  # every attempt (retries = 2)
    body = json.loads(valid(protocol))
    body["model"] = model
    status, raw, _ = await send(gw, protocol, json.dumps(body).encode(), {"anthropic-version": "2023-06-01"})
    assert status == 502 and b"redirect" in raw and shape_ok(protocol, status, raw)
    assert canary.connections == 0 and fault.attempts() == 3


async def test_image_urls_are_never_fetched_by_the_gateway(env):
    gw, fault = env
    canary = await Canary().start()
    for model in ("m", "m-an"):  # relayed, and translated to Anthropic (a url image source)
        body = {"model": model, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": canary.url + "/latest/meta-data/iam"}}]}]}
        status, raw, _ = await send(gw, "openai-chat", json.dumps(body).encode())
        assert status == 200, raw
    assert canary.connections == 0 and fault.attempts() == 2


@pytest.mark.parametrize("path", ["//v1/chat/completions", "/v1/chat/completions/", "/v1/./chat/completions",
                                  "/v1/%2e%2e/v1/chat/completions", "/V1/CHAT/COMPLETIONS", "/v1/chat/completions%00",
                                  "/v1/chat/completions?model=m&key=", "/v1//messages", "/v1beta/models/m:generateContent/..",
                                  "/v1beta/models/..%2fm:generateContent"])
async def test_path_tricks_and_forged_hosts_never_bypass_auth(env, path):
    gw, fault = env
    port = port_of(gw.url)
    body = valid("openai-chat")
    for host in (b"x", b"localhost", b"admin.internal"):
        head = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\nX-Forwarded-Host: 127.0.0.1\r\n"
                b"X-Forwarded-For: 127.0.0.1\r\nX-Original-URL: /v1/chat/completions\r\nX-Rewrite-URL: /health\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode())
        data = await raw_request(port, head, body)
        status = int(data.split(b" ", 2)[1])
        assert status in (400, 401, 404, 405), (path, data[:200])
    assert fault.attempts() == 0


def _dump(value, rng, dup: bool) -> str:
    """JSON text with random spacing; ``dup`` repeats one key somewhere."""
    sp = lambda: rng.choice(["", " ", "\n", "\t "])  # noqa: E731
    if isinstance(value, dict):
        items = [(json.dumps(k), _dump(v, rng, False)) for k, v in value.items()]
        if dup and items:
            items.append((items[rng.randrange(len(items))][0], "1"))
        return "{" + ",".join(f"{sp()}{k}{sp()}:{sp()}{v}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v, rng, False) for v in value) + "]"
    return json.dumps(value)


_json_text = st.text(alphabet=st.sampled_from(['a', '"', ':', '\\', ' ', 'é', '{', '}']), max_size=6)
_json_values = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | _json_text,  # orjson reads wider ints as floats
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_json_text, kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(_json_text, _json_values, min_size=1, max_size=5), dup=st.booleans(), seed=st.integers(0, 2**16))
def test_duplicate_keys_found_whatever_the_spacing_and_escapes(body, dup, seed):
    import random

    from cheapproxy.validate import parse_body

    raw = _dump(body, random.Random(seed), dup).encode()
    if dup:
        with pytest.raises(ProxyError) as e:
            parse_body(raw)
        assert "appears twice" in e.value.message
    else:
        assert parse_body(raw) == body
