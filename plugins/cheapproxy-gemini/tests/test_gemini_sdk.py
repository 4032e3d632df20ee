"""Client side against the official google-genai SDK: a tiny aiohttp handler
serves this codec's encode_response / stream_encoder / encode_error bytes for
fixed IR answers, and the SDK must parse them exactly."""

from __future__ import annotations

import asyncio
import base64
import functools
from typing import Any

import pytest
from aiohttp import web
from google import genai
from google.genai import errors, types

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext, Inbound, Route
from cheapproxy_gemini.codec import GeminiProtocol

SIG = base64.b64encode(b"gemini-thought-signature").decode()
P = GeminiProtocol()
SEEN = web.AppKey("gemini-test-seen", list)

THINK_USAGE = ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=7, reasoning_tokens=3)
SCENARIOS: dict[str, list[ir.StreamEvent]] = {
    "text": [
        ir.MessageStart(id="resp-text", model="upstream-x", usage=ir.Usage(input_tokens=9)),
        ir.PartStart(index=0, part=ir.TextPart(text="")),
        ir.TextDelta(index=0, text="Hello"),
        ir.TextDelta(index=0, text=", wörld"),
        ir.PartStop(index=0),
        ir.MessageStop(stop_reason=ir.StopReason.END_TURN, usage=ir.Usage(input_tokens=9, output_tokens=3)),
    ],
    "tools": [
        ir.MessageStart(id="resp-tools", model="upstream-x"),
        ir.PartStart(index=0, part=ir.ReasoningPart()),
        ir.ReasoningDelta(index=0, text="Two lookups."),
        ir.ReasoningDelta(index=0, signature=SIG, signature_protocol="gemini"),
        ir.PartStop(index=0),
        ir.PartStart(index=1, part=ir.TextPart(text="")),
        ir.TextDelta(index=1, text="Checking."),
        ir.PartStop(index=1),
        ir.PartStart(index=2, part=ir.ToolCallPart(id="toolu_01", name="get_weather", arguments="")),
        ir.ToolCallDelta(index=2, arguments='{"city": '),
        ir.ToolCallDelta(index=2, arguments='"Paris", "days": 3}'),
        ir.PartStop(index=2),
        ir.PartStart(index=3, part=ir.ToolCallPart(id="call_02", name="get_time", arguments="")),
        ir.ToolCallDelta(index=3, arguments='{"tz": "Europe/Paris"}'),
        ir.PartStop(index=3),
        ir.UsageUpdate(usage=THINK_USAGE),
        ir.MessageStop(stop_reason=ir.StopReason.TOOL_USE),
    ],
    "length": [
        ir.PartStart(index=0, part=ir.TextPart(text="")),  # no MessageStart: the envelope is synthesized
        ir.TextDelta(index=0, text="The answer is"),
        ir.PartStop(index=0),
        ir.MessageStop(stop_reason=ir.StopReason.MAX_TOKENS, usage=ir.Usage(input_tokens=1, output_tokens=3)),
    ],
    "filter": [
        ir.MessageStart(id="resp-f", model="m"),
        ir.MessageStop(stop_reason=ir.StopReason.CONTENT_FILTER, usage=ir.Usage(input_tokens=4)),
    ],
    "broken": [
        ir.MessageStart(id="resp-b", model="m"),
        ir.PartStart(index=0, part=ir.TextPart(text="")),
        ir.TextDelta(index=0, text="Partial"),
        ir.StreamError(message="upstream overloaded mid-answer", kind="upstream_overloaded", status=503),
        ir.TextDelta(index=0, text="never sent"),
    ],
}

ERRORS = {
    "err-auth": (ProxyError("authentication", "invalid cheapproxy key"), 401, "UNAUTHENTICATED", errors.ClientError),
    "err-perm": (ProxyError("permission", "key may not use this model"), 403, "PERMISSION_DENIED", errors.ClientError),
    "err-404": (ProxyError("not_found", "model 'x' is not registered"), 404, "NOT_FOUND", errors.ClientError),
    "err-400": (ProxyError("invalid_request", "contents is required", param="contents"), 400, "INVALID_ARGUMENT", errors.ClientError),
    "err-413": (ProxyError("payload_too_large", "body over 1 MiB"), 413, "INVALID_ARGUMENT", errors.ClientError),
    "err-402": (ProxyError("insufficient_balance", "balance too low"), 402, "FAILED_PRECONDITION", errors.ClientError),
    "err-429": (ProxyError("rate_limited", "slow down", retry_after=3), 429, "RESOURCE_EXHAUSTED", errors.ClientError),
    "err-500": (ProxyError("internal", "oops"), 500, "INTERNAL", errors.ServerError),
    "err-502": (ProxyError("upstream_failed", "every upstream failed"), 502, "UNAVAILABLE", errors.ServerError),
    "err-529": (ProxyError("upstream_overloaded", "upstream overloaded"), 503, "UNAVAILABLE", errors.ServerError),
    "err-504": (ProxyError("upstream_timeout", "upstream too slow"), 504, "DEADLINE_EXCEEDED", errors.ServerError),
}


async def _handler(request: web.Request, route: Route) -> web.StreamResponse:
    """Mounted on the codec's own routes(), as the core mounts them."""
    model, op = request.match_info["model"], route.operation
    body = await request.json()
    name, stream = P.inspect(route, body, dict(request.match_info), dict(request.query))
    inbound = Inbound(model=name, stream=stream, operation=op, body=body, query=dict(request.query))
    decoded = P.decode_request(inbound)
    request.app[SEEN].append((request.path, dict(request.query), decoded))
    ctx = EncodeContext(model=name, request_id="req-1", created=0, request=decoded, inbound=inbound)
    if model in ERRORS:
        status, raw = P.encode_error(ERRORS[model][0])
        return web.Response(status=status, body=raw, content_type="application/json")
    if op == "count_tokens":
        return web.Response(body=P.encode_count_tokens(42, ctx), content_type="application/json")
    events = SCENARIOS[model]
    if not stream:
        return web.Response(body=P.encode_response(ir.collect(events), ctx), content_type="application/json")
    enc = P.stream_encoder(ctx)
    resp = web.StreamResponse(headers={"Content-Type": enc.content_type})
    await resp.prepare(request)
    await resp.write(enc.start())
    for ev in events:
        chunk = enc.encode(ev)
        if chunk:
            await resp.write(chunk)  # event by event, as the gateway streams
    await resp.write(enc.close())
    await resp.write_eof()
    return resp


@pytest.fixture
async def served(aiohttp_server: Any) -> Any:
    app = web.Application()
    app[SEEN] = []
    for route in P.routes():
        app.router.add_route(route.method, route.path, functools.partial(_handler, route=route))
    return await aiohttp_server(app)


def client(server: Any, version: str | None) -> genai.Client:
    opts = types.HttpOptions(base_url=str(server.make_url("")).rstrip("/"), api_version=version)
    return genai.Client(api_key="cheapproxy-key", http_options=opts)


VERSIONS = [pytest.param("v1beta", id="v1beta"), pytest.param(None, id="default-v1")]


@pytest.mark.parametrize("version", VERSIONS)
async def test_text_non_stream(served: Any, version: str | None) -> None:
    res = await client(served, version).aio.models.generate_content(model="text", contents="hi")
    assert res.text == "Hello, wörld"
    assert res.candidates[0].finish_reason == types.FinishReason.STOP
    assert res.response_id == "resp-text" and res.model_version == "text"
    u = res.usage_metadata
    assert (u.prompt_token_count, u.candidates_token_count, u.total_token_count) == (9, 3, 12)
    path, query, decoded = served.app[SEEN][-1]
    assert path == f"/{version or 'v1'}/models/text:generateContent" and query == {}
    assert decoded.messages == [ir.Message(role="user", content=[ir.TextPart(text="hi")])]


@pytest.mark.parametrize("version", VERSIONS)
async def test_text_stream(served: Any, version: str | None) -> None:
    chunks = [c async for c in await client(served, version).aio.models.generate_content_stream(model="text", contents="hi")]
    assert [c.text for c in chunks[:-1]] == ["Hello", ", wörld"]
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage_metadata.total_token_count == 12
    assert chunks[0].usage_metadata.prompt_token_count == 9  # from MessageStart
    path, query, _ = served.app[SEEN][-1]
    assert path.endswith("/models/text:streamGenerateContent") and query == {"alt": "sse"}


@pytest.mark.parametrize("version", VERSIONS)
async def test_function_calls_thoughts_and_usage_non_stream(served: Any, version: str | None) -> None:
    res = await client(served, version).aio.models.generate_content(model="tools", contents="weather and time?")
    calls = res.function_calls
    assert [(c.id, c.name, c.args) for c in calls] == [
        ("toolu_01", "get_weather", {"city": "Paris", "days": 3}),
        ("call_02", "get_time", {"tz": "Europe/Paris"}),
    ]
    parts = res.candidates[0].content.parts
    assert (parts[0].thought, parts[0].text, parts[0].thought_signature) == (True, "Two lookups.", b"gemini-thought-signature")
    assert parts[1].text == "Checking." and not parts[1].thought
    assert res.candidates[0].finish_reason == types.FinishReason.STOP  # tool use is STOP in Gemini
    u = res.usage_metadata
    assert (u.prompt_token_count, u.cached_content_token_count, u.candidates_token_count,
            u.thoughts_token_count, u.total_token_count) == (15, 5, 4, 3, 22)


@pytest.mark.parametrize("version", VERSIONS)
async def test_function_calls_stream(served: Any, version: str | None) -> None:
    chunks = [c async for c in await client(served, version).aio.models.generate_content_stream(model="tools", contents="q")]
    calls = [(fc.id, fc.name, fc.args) for c in chunks for fc in (c.function_calls or [])]
    assert calls == [("toolu_01", "get_weather", {"city": "Paris", "days": 3}), ("call_02", "get_time", {"tz": "Europe/Paris"})]
    thoughts = [p for c in chunks for p in (c.candidates[0].content.parts or []) if p.thought]
    assert "".join(p.text or "" for p in thoughts) == "Two lookups."
    assert [p.thought_signature for p in thoughts if p.thought_signature] == [b"gemini-thought-signature"]
    last = chunks[-1]
    assert last.candidates[0].finish_reason == types.FinishReason.STOP
    u = last.usage_metadata
    assert (u.prompt_token_count, u.cached_content_token_count, u.candidates_token_count, u.thoughts_token_count,
            u.total_token_count) == (15, 5, 4, 3, 22)


@pytest.mark.parametrize("model,reason", [("length", types.FinishReason.MAX_TOKENS), ("filter", types.FinishReason.SAFETY)])
async def test_other_finish_reasons(served: Any, model: str, reason: Any) -> None:
    c = client(served, "v1beta")
    res = await c.aio.models.generate_content(model=model, contents="x")
    assert res.candidates[0].finish_reason == reason
    chunks = [ch async for ch in await c.aio.models.generate_content_stream(model=model, contents="x")]
    assert chunks[-1].candidates[0].finish_reason == reason
    if model == "length":
        assert "".join(ch.text or "" for ch in chunks) == "The answer is"
        assert res.response_id == "req-1"  # synthesized from the request id


async def test_count_tokens(served: Any) -> None:
    for version in ("v1beta", None):
        res = await client(served, version).aio.models.count_tokens(model="text", contents="count me please")
        assert res.total_tokens == 42
        path, _, decoded = served.app[SEEN][-1]
        assert path == f"/{version or 'v1'}/models/text:countTokens"
        assert decoded.messages[0].content == [ir.TextPart(text="count me please")]


@pytest.mark.parametrize("model", sorted(ERRORS))
async def test_errors_raise_the_sdk_exception(served: Any, model: str) -> None:
    err, code, status, cls = ERRORS[model]
    c = client(served, "v1beta")
    with pytest.raises(cls) as info:
        await c.aio.models.generate_content(model=model, contents="x")
    assert (info.value.code, info.value.status, info.value.message) == (code, status, err.message)
    with pytest.raises(cls) as info:
        async for _ in await c.aio.models.generate_content_stream(model=model, contents="x"):
            pass
    assert info.value.code == code and info.value.message == err.message


async def test_in_stream_error_event_raises_in_the_sdk(served: Any) -> None:
    got: list[str] = []
    with pytest.raises(errors.ServerError) as info:
        async for chunk in await client(served, "v1beta").aio.models.generate_content_stream(model="broken", contents="x"):
            got.append(chunk.text)
    assert got == ["Partial"]  # nothing after the error event
    assert (info.value.code, info.value.status, info.value.message) == (503, "UNAVAILABLE", "upstream overloaded mid-answer")


async def test_sync_sdk_over_httpx(served: Any) -> None:
    """The default (sync, httpx) transport parses the CRLF SSE framing too."""
    c = client(served, None)

    def run() -> tuple[list[str | None], Any]:
        texts = [ch.text for ch in c.models.generate_content_stream(model="text", contents="hi")]
        return texts, c.models.generate_content(model="tools", contents="hi").function_calls

    texts, calls = await asyncio.to_thread(run)
    assert texts[:2] == ["Hello", ", wörld"]
    assert [(fc.name, fc.args) for fc in calls] == [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"tz": "Europe/Paris"})]


async def test_sdk_chat_tool_round_trip_decodes_to_matched_ids(served: Any) -> None:
    """The SDK's second turn sends the model's functionCall (with our id) and a
    functionResponse without id: the decoder pairs them by name."""
    c = client(served, "v1beta")
    chat = c.aio.chats.create(model="tools", config=types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[types.FunctionDeclaration(
            name="get_weather", parameters_json_schema={"type": "object", "properties": {"city": {"type": "string"}}})])],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True)))
    await chat.send_message("weather?")
    await chat.send_message([
        types.Part.from_function_response(name="get_weather", response={"output": "18C"}),
        types.Part.from_function_response(name="get_time", response={"error": "no clock"}),
    ])
    decoded = served.app[SEEN][-1][2]
    assistant = decoded.messages[1]
    calls = [p for p in assistant.content if isinstance(p, ir.ToolCallPart)]
    assert [(p.id, p.name) for p in calls] == [("toolu_01", "get_weather"), ("call_02", "get_time")]
    reasoning = assistant.content[0]
    assert isinstance(reasoning, ir.ReasoningPart) and reasoning.signature == SIG and reasoning.signature_protocol == "gemini"
    results = decoded.messages[2].content
    assert [(r.tool_call_id, r.name, r.content[0].text, r.is_error) for r in results] == [
        ("toolu_01", "get_weather", "18C", False), ("call_02", "get_time", "no clock", True)]
    assert decoded.tools[0].parameters == {"type": "object", "properties": {"city": {"type": "string"}}}
