"""(d) client side against the official ``anthropic`` SDK: a tiny aiohttp
handler serves the codec's output for fixed IR answers."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from aiohttp import web

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import Inbound
from cheapproxy.sse import SSE_HEADERS

from anthropic_testlib import CODEC, ctx

SIG = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrk"

TOOL_EVENTS: list[ir.StreamEvent] = [
    ir.MessageStart(id="msg_sdk_1", model="upstream-model",
                    usage=ir.Usage(input_tokens=10, cache_read_tokens=5, cache_write_tokens=2, output_tokens=1)),
    ir.PartStart(index=0, part=ir.ReasoningPart()),
    ir.ReasoningDelta(index=0, text="Let me "),
    ir.ReasoningDelta(index=0, text="think."),
    ir.ReasoningDelta(index=0, signature=SIG, signature_protocol="anthropic-messages"),
    ir.PartStop(index=0),
    ir.PartStart(index=1, part=ir.TextPart(text="")),
    ir.TextDelta(index=1, text="Checking "),
    ir.TextDelta(index=1, text="the weather."),
    ir.PartStop(index=1),
    ir.PartStart(index=2, part=ir.ToolCallPart(id="toolu_01A", name="get_weather", arguments="")),
    ir.ToolCallDelta(index=2, arguments='{"city": '),
    ir.ToolCallDelta(index=2, arguments='"Paris", "days": [1, 2]}'),
    ir.PartStop(index=2),
    ir.MessageStop(stop_reason=ir.StopReason.END_TURN, usage=ir.Usage(output_tokens=7)),
]

# an OpenAI-style upstream: nothing known at the start, all usage at the end, no MessageStart
LATE_USAGE_EVENTS: list[ir.StreamEvent] = [
    ir.PartStart(index=0, part=ir.TextPart(text="")),
    ir.TextDelta(index=0, text="The answer is 42."),
    ir.PartStop(index=0),
    ir.UsageUpdate(usage=ir.Usage(input_tokens=30, cache_read_tokens=20, output_tokens=9)),
    ir.MessageStop(stop_reason=ir.StopReason.MAX_TOKENS),
]


def _response() -> ir.Response:
    return ir.collect(TOOL_EVENTS)


@pytest.fixture
async def client(aiohttp_server: Any) -> Any:
    state: dict[str, Any] = {"events": TOOL_EVENTS, "error": None, "stream_error": None, "seen": []}

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        inbound = Inbound(model=body["model"], stream=bool(body.get("stream")), operation="chat", body=body)
        state["seen"].append((request, CODEC.decode_request(inbound)))
        if state["error"] is not None:
            status, payload = CODEC.encode_error(state["error"])
            return web.Response(status=status, body=payload, content_type="application/json")
        c = ctx(body["model"])
        if not body.get("stream"):
            return web.Response(body=CODEC.encode_response(ir.collect(state["events"]), c), content_type="application/json")
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        enc = CODEC.stream_encoder(c)
        for ev in state["events"]:
            await resp.write(enc.encode(ev))  # one write per event: no buffering of the whole answer
        if state["stream_error"] is not None:
            await resp.write(enc.error(state["stream_error"]))
        await resp.write_eof()
        return resp

    async def count(request: web.Request) -> web.Response:
        body = await request.json()
        req = CODEC.decode_request(Inbound(model=body["model"], stream=False, operation="count_tokens", body=body))
        n = sum(len(p.text) for m in req.messages for p in m.content if isinstance(p, ir.TextPart))
        return web.Response(body=CODEC.encode_count_tokens(n, ctx()), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count)
    server = await aiohttp_server(app)
    sdk = anthropic.AsyncAnthropic(api_key="sk-client", base_url=str(server.make_url("")), max_retries=0)
    sdk.state = state  # type: ignore[attr-defined]
    yield sdk
    await sdk.close()


ARGS: dict[str, Any] = {"model": "claude-test", "max_tokens": 1024,
                        "messages": [{"role": "user", "content": "weather in Paris?"}]}


def _check_final(msg: Any) -> None:
    thinking, text, tool = msg.content
    assert (thinking.type, thinking.thinking, thinking.signature) == ("thinking", "Let me think.", SIG)
    assert (text.type, text.text) == ("text", "Checking the weather.")
    assert (tool.type, tool.id, tool.name, tool.input) == ("tool_use", "toolu_01A", "get_weather", {"city": "Paris", "days": [1, 2]})
    assert msg.stop_reason == "tool_use"  # a natural end with tool calls is reported as tool_use
    assert msg.model == "claude-test"
    u = msg.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (10, 5, 2, 7)


async def test_sdk_non_streamed(client: Any) -> None:
    msg = await client.messages.create(**ARGS)
    _check_final(msg)
    assert msg.id.startswith("msg_")


async def test_sdk_stream_helper_final_message(client: Any) -> None:
    async with client.messages.stream(**ARGS) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == ["Checking ", "the weather."]
    _check_final(final)
    assert final.id == "msg_sdk_1"


async def test_sdk_raw_stream_events(client: Any) -> None:
    events = [e async for e in await client.messages.create(**ARGS, stream=True)]
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0].message.usage
    assert (start.input_tokens, start.cache_read_input_tokens, start.cache_creation_input_tokens, start.output_tokens) == (10, 5, 2, 1)
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert [d.type for d in deltas] == ["thinking_delta", "thinking_delta", "signature_delta", "text_delta",
                                        "text_delta", "input_json_delta", "input_json_delta"]
    # signature_delta comes right before the thinking block's stop
    sig_at = kinds.index("content_block_delta") + 2
    assert kinds[sig_at + 1] == "content_block_stop" and events[sig_at + 1].index == 0
    assert events[-2].usage.output_tokens == 7 and events[-2].delta.stop_reason == "tool_use"


async def test_sdk_usage_only_known_at_the_end(client: Any) -> None:
    client.state["events"] = LATE_USAGE_EVENTS
    async with client.messages.stream(**ARGS) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "The answer is 42." and final.stop_reason == "max_tokens"
    u = final.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (30, 20, 0, 9)
    msg = await client.messages.create(**ARGS)
    assert msg.usage.input_tokens == 30 and msg.usage.output_tokens == 9


async def test_sdk_request_decodes(client: Any) -> None:
    await client.messages.create(
        model="claude-test", max_tokens=300, system=[{"type": "text", "text": "Sys", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        tools=[{"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True}, stop_sequences=["END"],
        metadata={"user_id": "u-1"}, extra_body={"temperature": 0.2})  # SDK 2.12 has no sampling kwargs
    request, req = client.state["seen"][-1]
    assert request.headers.get("anthropic-version")
    assert req.system[0].provider_data == {"anthropic-messages": {"cache_control": {"type": "ephemeral"}}}
    assert req.tool_choice == ir.ToolChoice(mode="required", parallel=False)
    assert (req.max_tokens, req.temperature, req.stop, req.user) == (300, 0.2, ["END"], "u-1")


async def test_sdk_count_tokens(client: Any) -> None:
    got = await client.messages.count_tokens(model="claude-test", messages=[{"role": "user", "content": "abcdefg"}])
    assert got.input_tokens == 7


@pytest.mark.parametrize(("kind", "status", "exc", "etype"), [
    ("invalid_request", None, anthropic.BadRequestError, "invalid_request_error"),
    ("authentication", None, anthropic.AuthenticationError, "authentication_error"),
    ("insufficient_balance", None, anthropic.PaymentRequiredError, "billing_error"),
    ("permission", None, anthropic.PermissionDeniedError, "permission_error"),
    ("not_found", None, anthropic.NotFoundError, "not_found_error"),
    ("payload_too_large", None, anthropic.ContentTooLargeError, "request_too_large"),
    ("rate_limited", None, anthropic.RateLimitError, "rate_limit_error"),
    ("internal", None, anthropic.InternalServerError, "api_error"),
    ("upstream_failed", None, anthropic.InternalServerError, "api_error"),
    ("upstream_overloaded", 503, anthropic.OverloadedError, "overloaded_error"),
    ("upstream_timeout", None, anthropic.GatewayTimeoutError, "timeout_error"),
    ("upstream_rejected", 422, anthropic.UnprocessableEntityError, "invalid_request_error"),
])
async def test_sdk_error_classes(client: Any, kind: str, status: int | None, exc: type, etype: str) -> None:
    client.state["error"] = ProxyError(kind, f"message for {kind}", status=status)
    for stream in (False, True):
        with pytest.raises(exc) as info:
            await client.messages.create(**ARGS, stream=stream)
        assert info.value.api_message == f"message for {kind}" and info.value.type == etype


async def test_sdk_in_stream_error(client: Any) -> None:
    client.state["events"] = TOOL_EVENTS[:8]
    client.state["stream_error"] = ProxyError("upstream_overloaded", "Overloaded upstream")
    with pytest.raises(anthropic.APIStatusError) as info:
        async with client.messages.stream(**ARGS) as stream:
            await stream.get_final_message()
    assert info.value.api_message == "Overloaded upstream" and info.value.type == "overloaded_error"
