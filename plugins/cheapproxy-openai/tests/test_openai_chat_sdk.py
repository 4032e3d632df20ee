"""Client side against the official ``openai`` SDK: a tiny aiohttp handler
serves what the codec encodes for fixed IR answers; the SDK must parse it."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp import web
from openai_chat_helpers import CODEC

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext, Inbound
from cheapproxy.sse import SSE_HEADERS

USAGE = ir.Usage(input_tokens=10, output_tokens=7, cache_read_tokens=5, reasoning_tokens=3)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def answer_events() -> list[ir.StreamEvent]:
    """Reasoning, text, then two tool calls: IR block indices 0..3."""
    return [
        ir.MessageStart(id="msg_01", model="upstream-model", usage=ir.Usage(input_tokens=10, cache_read_tokens=5)),
        ir.PartStart(index=0, part=ir.ReasoningPart()),
        ir.ReasoningDelta(index=0, text="Let me think."),
        ir.ReasoningDelta(index=0, signature="sig", signature_protocol="anthropic-messages"),
        ir.PartStop(index=0),
        ir.PartStart(index=1, part=ir.TextPart(text="")),
        ir.TextDelta(index=1, text="Checking "),
        ir.TextDelta(index=1, text="both."),
        ir.PartStop(index=1),
        ir.PartStart(index=2, part=ir.ToolCallPart(id="toolu_1", name="get_weather", arguments="")),
        ir.ToolCallDelta(index=2, arguments='{"city": '),
        ir.ToolCallDelta(index=2, arguments='"Paris"}'),
        ir.PartStop(index=2),
        ir.PartStart(index=3, part=ir.ToolCallPart(id="toolu_2", name="get_weather", arguments="")),
        ir.ToolCallDelta(index=3, arguments='{"city": "Oslo"}'),
        ir.PartStop(index=3),
        ir.UsageUpdate(usage=ir.Usage(output_tokens=7, reasoning_tokens=3)),
        ir.MessageStop(stop_reason=ir.StopReason.TOOL_USE),
    ]


class Served:
    """What the handler answers with."""

    events: list[ir.StreamEvent] = []
    error: ProxyError | None = None
    stream_error: ProxyError | None = None
    embedding: ir.EmbeddingResponse | None = None
    seen: list[dict[str, Any]] = []


SERVED = web.AppKey("served", Served)


async def _chat(request: web.Request) -> web.StreamResponse:
    served = request.app[SERVED]
    body = await request.json()
    served.seen.append(body)
    if served.error is not None:
        status, payload = CODEC.encode_error(served.error)
        return web.Response(status=status, body=payload, content_type="application/json")
    inbound = Inbound(model=body["model"], stream=bool(body.get("stream")), operation="chat", body=body)
    req = CODEC.decode_request(inbound)
    ctx = EncodeContext(model=body["model"], request_id="req-9", created=1754000000, request=req, inbound=inbound)
    if not req.stream:
        data = CODEC.encode_response(ir.collect(served.events), ctx)
        return web.Response(body=data, content_type="application/json")
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    enc = CODEC.stream_encoder(ctx)
    await resp.write(enc.start())
    for ev in served.events:
        out = enc.encode(ev)
        if out:
            await resp.write(out)  # one write per event: nothing buffered
    if served.stream_error is not None:
        await resp.write(enc.error(served.stream_error))
    await resp.write(enc.close())
    await resp.write_eof()
    return resp


async def _embeddings(request: web.Request) -> web.Response:
    served = request.app[SERVED]
    body = await request.json()
    served.seen.append(body)
    inbound = Inbound(model=body["model"], stream=False, operation="embeddings", body=body)
    ereq = CODEC.decode_embeddings_request(inbound)
    assert served.embedding is not None and len(ereq.inputs) == len(served.embedding.vectors)
    ctx = EncodeContext(model=body["model"], request_id="req-9", created=1754000000, inbound=inbound)
    return web.Response(body=CODEC.encode_embeddings_response(served.embedding, ctx), content_type="application/json")


@pytest.fixture
async def sdk(aiohttp_server: Any) -> tuple[openai.AsyncOpenAI, Served]:
    served = Served()
    served.events, served.seen = answer_events(), []
    app = web.Application()
    app[SERVED] = served
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/embeddings", _embeddings)
    server = await aiohttp_server(app)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="sk-client", max_retries=0)
    yield client, served
    await client.close()


MESSAGES = [{"role": "user", "content": "weather in Paris and Oslo?"}]


async def test_non_streamed(sdk: Any) -> None:
    client, _ = sdk
    c = await client.chat.completions.create(model="my-model", messages=MESSAGES, tools=TOOLS)
    assert c.object == "chat.completion" and c.model == "my-model" and c.created == 1754000000
    choice = c.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking both."
    assert choice.message.model_extra["reasoning_content"] == "Let me think."
    calls = choice.message.tool_calls
    assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        ("toolu_1", "get_weather", {"city": "Paris"}),
        ("toolu_2", "get_weather", {"city": "Oslo"}),
    ]
    u = c.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (15, 7, 22)
    assert u.prompt_tokens_details.cached_tokens == 5 and u.completion_tokens_details.reasoning_tokens == 3


async def test_streamed_with_usage(sdk: Any) -> None:
    client, _ = sdk
    stream = await client.chat.completions.create(
        model="my-model", messages=MESSAGES, tools=TOOLS, stream=True, stream_options={"include_usage": True}
    )
    text, reasoning, calls, finish, usage, n = "", "", {}, None, None, 0
    async for chunk in stream:
        n += 1
        assert chunk.object == "chat.completion.chunk" and chunk.model == "my-model"
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        d = chunk.choices[0].delta
        text += d.content or ""
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "args": ""})
            entry["args"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert text == "Checking both." and reasoning == "Let me think." and finish == "tool_calls"
    assert {k: (v["id"], v["name"], json.loads(v["args"])) for k, v in calls.items()} == {
        0: ("toolu_1", "get_weather", {"city": "Paris"}),
        1: ("toolu_2", "get_weather", {"city": "Oslo"}),
    }
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (15, 7, 22)
    assert usage.prompt_tokens_details.cached_tokens == 5
    assert n == 11  # role, reasoning, 2 text, head + 2 fragments, head + 1 fragment, finish, usage


async def test_streamed_without_usage_sends_none(sdk: Any) -> None:
    client, _ = sdk
    stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert all("usage" not in c.model_fields_set for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_stream_helper(sdk: Any) -> None:
    client, _ = sdk
    kinds = []
    async with client.chat.completions.stream(model="my-model", messages=MESSAGES, tools=TOOLS) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "tool_calls.function.arguments.done":
                assert event.name == "get_weather"
        final = await stream.get_final_completion()
    msg = final.choices[0].message
    assert msg.content == "Checking both." and final.choices[0].finish_reason == "tool_calls"
    assert [json.loads(t.function.arguments) for t in msg.tool_calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert kinds.count("tool_calls.function.arguments.done") == 2
    assert "content.done" in kinds


async def test_stream_helper_text_only(sdk: Any) -> None:
    client, served = sdk
    served.events = [
        ir.PartStart(index=0, part=ir.TextPart(text="")),  # no MessageStart: the envelope is synthesized
        ir.TextDelta(index=0, text="The answer is 42."),
        ir.PartStop(index=0),
        ir.MessageStop(stop_reason=ir.StopReason.PAUSE, usage=ir.Usage(input_tokens=3, output_tokens=5)),
    ]
    async with client.chat.completions.stream(model="m", messages=MESSAGES, stream_options={"include_usage": True}) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "The answer is 42."
    assert final.choices[0].finish_reason == "stop"
    assert final.usage.prompt_tokens == 3 and final.usage.completion_tokens == 5


async def test_length_finish_reason(sdk: Any) -> None:
    client, served = sdk
    served.events = [
        ir.MessageStart(id="x", model="u"),
        ir.PartStart(index=0, part=ir.TextPart(text="")),
        ir.TextDelta(index=0, text="The answer is"),
        ir.PartStop(index=0),
        ir.MessageStop(stop_reason=ir.StopReason.MAX_TOKENS),
    ]
    c = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert (c.choices[0].message.content, c.choices[0].finish_reason) == ("The answer is", "length")
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    finishes = [ch.choices[0].finish_reason async for ch in stream]
    assert finishes == [None, None, "length"]
    with pytest.raises(openai.LengthFinishReasonError):
        async with client.chat.completions.stream(model="m", messages=MESSAGES) as s:
            await s.get_final_completion()


async def test_in_stream_error_raises(sdk: Any) -> None:
    client, served = sdk
    served.events = answer_events()[:7]
    served.stream_error = ProxyError("upstream_failed", "upstream went away")
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    text = ""
    with pytest.raises(openai.APIError) as e:
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    assert text == "Checking "
    assert e.value.message == "upstream went away"


@pytest.mark.parametrize(
    ("err", "exc", "status", "etype", "code"),
    [
        (ProxyError("invalid_request", "messages is required", param="messages"), openai.BadRequestError, 400, "invalid_request_error", None),
        (ProxyError("authentication", "invalid API key"), openai.AuthenticationError, 401, "authentication_error", "invalid_api_key"),
        (ProxyError("insufficient_balance", "balance too low"), openai.APIStatusError, 402, "insufficient_quota", "insufficient_quota"),
        (ProxyError("permission", "key may not use this model"), openai.PermissionDeniedError, 403, "permission_error", None),
        (ProxyError("not_found", "model 'x' is not registered", param="model"), openai.NotFoundError, 404, "not_found_error", "model_not_found"),
        (ProxyError("payload_too_large", "body over 1 MB"), openai.APIStatusError, 413, "invalid_request_error", "request_too_large"),
        (ProxyError("rate_limited", "slow down", retry_after=2), openai.RateLimitError, 429, "rate_limit_error", "rate_limit_exceeded"),
        (ProxyError("upstream_failed", "every upstream failed"), openai.InternalServerError, 502, "server_error", None),
        (ProxyError("upstream_overloaded", "upstream overloaded"), openai.InternalServerError, 503, "service_unavailable", None),
        (ProxyError("upstream_timeout", "upstream too slow"), openai.InternalServerError, 504, "timeout", None),
    ],
)
async def test_errors_raise_the_sdk_exception(sdk: Any, err: ProxyError, exc: type, status: int, etype: str, code: str | None) -> None:
    client, served = sdk
    served.error = err
    with pytest.raises(exc) as e:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert e.value.status_code == status
    assert e.value.body["message"] == err.message
    assert e.value.type == etype and e.value.code == code and e.value.param == err.param


async def test_embeddings_default_base64_and_float(sdk: Any) -> None:
    client, served = sdk
    served.embedding = ir.EmbeddingResponse(
        model="u", vectors=[[0.25, -0.5, 3.0], [1.5, 0.0, -2.25]], usage=ir.Usage(input_tokens=6)
    )
    r = await client.embeddings.create(model="emb", input=["a", "b"])
    assert served.seen[-1]["encoding_format"] == "base64"  # the SDK's default
    assert [d.embedding for d in r.data] == [[0.25, -0.5, 3.0], [1.5, 0.0, -2.25]]
    assert [d.index for d in r.data] == [0, 1]
    assert r.usage.prompt_tokens == 6 and r.usage.total_tokens == 6 and r.model == "emb"
    r = await client.embeddings.create(model="emb", input=["a", "b"], encoding_format="float")
    assert [d.embedding for d in r.data] == [[0.25, -0.5, 3.0], [1.5, 0.0, -2.25]]
