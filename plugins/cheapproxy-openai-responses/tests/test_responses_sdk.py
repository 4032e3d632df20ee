"""Client side against the official ``openai`` SDK: a tiny aiohttp handler
serves what our encoders produce and the SDK must parse it."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp import web

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.sse import SSE_HEADERS

from responses_testlib import PROTO, ctx, encode_stream

USAGE = ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=7, reasoning_tokens=3)
WEATHER = {"type": "function", "name": "get_weather", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


class Served:
    """What the next request gets: (status, content type, body)."""

    def __init__(self) -> None:
        self.status = 200
        self.content_type = "application/json"
        self.body = b""
        self.requests: list[Any] = []

    def json(self, body: bytes, status: int = 200) -> None:
        self.status, self.content_type, self.body = status, "application/json", body

    def sse(self, body: bytes) -> None:
        self.status, self.content_type, self.body = 200, SSE_HEADERS["Content-Type"], body


@pytest.fixture
async def sdk(aiohttp_server: Any) -> tuple[openai.AsyncOpenAI, Served]:
    served = Served()

    async def handler(request: web.Request) -> web.Response:
        served.requests.append(await request.json())
        return web.Response(status=served.status, body=served.body, headers={"Content-Type": served.content_type})

    app = web.Application()
    app.router.add_post("/v1/responses", handler)
    server = await aiohttp_server(app)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="cp-user-key", max_retries=0)
    yield client, served
    await client.close()


def _request(*tools: ir.Tool) -> ir.Request:
    return ir.Request(model="m-client", messages=[ir.Message(role="user", content=[ir.TextPart(text="hi")])],
                      tools=list(tools))


def _events(parts: list[ir.Part], stop: ir.StopReason, usage: ir.Usage = USAGE) -> list[ir.StreamEvent]:
    """A realistic IR stream for ``parts`` (text split in fragments)."""
    evs: list[ir.StreamEvent] = [ir.MessageStart(id="up-1", model="up-model", usage=ir.Usage(input_tokens=10))]
    for i, p in enumerate(parts):
        if isinstance(p, ir.TextPart):
            evs += [ir.PartStart(index=i, part=ir.TextPart(text=""))]
            evs += [ir.TextDelta(index=i, text=p.text[j:j + 4]) for j in range(0, len(p.text), 4)]
        elif isinstance(p, ir.ReasoningPart):
            evs += [ir.PartStart(index=i, part=ir.ReasoningPart()), ir.ReasoningDelta(index=i, text=p.text)]
            if p.signature:
                evs.append(ir.ReasoningDelta(index=i, signature=p.signature, signature_protocol=p.signature_protocol))
        elif isinstance(p, ir.ToolCallPart):
            evs += [ir.PartStart(index=i, part=ir.ToolCallPart(id=p.id, name=p.name, arguments="", kind=p.kind))]
            evs += [ir.ToolCallDelta(index=i, arguments=p.arguments[j:j + 5]) for j in range(0, len(p.arguments), 5)]
        evs.append(ir.PartStop(index=i))
    evs.append(ir.MessageStop(stop_reason=stop, usage=usage))
    return evs


def _check_usage(u: Any) -> None:
    assert (u.input_tokens, u.input_tokens_details.cached_tokens) == (15, 5)
    assert (u.output_tokens, u.output_tokens_details.reasoning_tokens, u.total_tokens) == (7, 3, 22)


# ---------------------------------------------------------------- non-streamed


async def test_sdk_parses_text_response(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    client, served = sdk
    resp = ir.Response(id="x", model="m", content=[ir.TextPart(text="The answer is 42.")], usage=USAGE)
    served.json(PROTO.encode_response(resp, ctx(_request())))
    r = await client.responses.create(model="m-client", input="hi")
    assert r.output_text == "The answer is 42."
    assert r.status == "completed" and r.incomplete_details is None
    assert r.id == "resp_req0123abcd" and r.model == "m-client"
    _check_usage(r.usage)


async def test_sdk_parses_tool_call_and_reasoning(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    client, served = sdk
    resp = ir.Response(id="x", model="m", stop_reason=ir.StopReason.TOOL_USE, usage=USAGE, content=[
        ir.ReasoningPart(text="Weather needs a tool.", signature="enc-1", signature_protocol="openai-responses"),
        ir.ToolCallPart(id="call_1", name="get_weather", arguments='{"city": "Paris"}')])
    served.json(PROTO.encode_response(resp, ctx(_request(ir.Tool(name="get_weather")))))
    r = await client.responses.create(model="m-client", input="hi")
    reasoning, call = r.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "Weather needs a tool."
    assert reasoning.encrypted_content == "enc-1"
    assert (call.type, call.name, call.call_id) == ("function_call", "get_weather", "call_1")
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert r.status == "completed"
    _check_usage(r.usage)


async def test_sdk_parse_gives_parsed_arguments_for_strict_tools(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    client, served = sdk
    resp = ir.Response(id="x", model="m", stop_reason=ir.StopReason.TOOL_USE, usage=USAGE, content=[
        ir.ToolCallPart(id="call_1", name="get_weather", arguments='{"city": "Paris"}')])
    served.json(PROTO.encode_response(resp, ctx(_request(ir.Tool(name="get_weather")))))
    r = await client.responses.parse(model="m-client", input="hi", tools=[WEATHER])
    assert r.output[0].parsed_arguments == {"city": "Paris"}


async def test_sdk_sees_custom_tool_call_unwrapped(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    # the upstream had no freeform tools: the call came back as {"input": ...} JSON
    client, served = sdk
    resp = ir.Response(id="x", model="m", stop_reason=ir.StopReason.TOOL_USE, usage=USAGE, content=[
        ir.ToolCallPart(id="call_p", name="apply_patch", arguments='{"input": "*** Begin Patch\\n*** End Patch"}')])
    served.json(PROTO.encode_response(resp, ctx(_request(ir.Tool(name="apply_patch", kind="custom")))))
    r = await client.responses.create(model="m-client", input="hi")
    call = r.output[0]
    assert (call.type, call.name, call.call_id) == ("custom_tool_call", "apply_patch", "call_p")
    assert call.input == "*** Begin Patch\n*** End Patch"


async def test_sdk_sees_namespace_of_flattened_tool(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    client, served = sdk
    tool = ir.Tool(name="mcp__fs__read", provider_data={"openai-responses": {"namespace": "mcp__fs__", "name": "read"}})
    resp = ir.Response(id="x", model="m", stop_reason=ir.StopReason.TOOL_USE, usage=USAGE, content=[
        ir.ToolCallPart(id="call_r", name="mcp__fs__read", arguments='{"path": "a"}')])
    served.json(PROTO.encode_response(resp, ctx(_request(tool))))
    r = await client.responses.create(model="m-client", input="hi")
    assert (r.output[0].name, r.output[0].namespace) == ("read", "mcp__fs__")


@pytest.mark.parametrize(("stop", "reason"), [(ir.StopReason.MAX_TOKENS, "max_output_tokens"),
                                              (ir.StopReason.CONTENT_FILTER, "content_filter")])
async def test_sdk_sees_incomplete(sdk: tuple[openai.AsyncOpenAI, Served], stop: ir.StopReason, reason: str) -> None:
    client, served = sdk
    resp = ir.Response(id="x", model="m", content=[ir.TextPart(text="The answer is")], stop_reason=stop, usage=USAGE)
    served.json(PROTO.encode_response(resp, ctx(_request())))
    r = await client.responses.create(model="m-client", input="hi")
    assert r.status == "incomplete" and r.incomplete_details.reason == reason
    assert r.output_text == "The answer is"


# ---------------------------------------------------------------- streamed


async def test_sdk_raw_stream_events(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    client, served = sdk
    served.sse(encode_stream(_events([ir.TextPart(text="The answer is 42.")], ir.StopReason.END_TURN), ctx(_request())))
    stream = await client.responses.create(model="m-client", input="hi", stream=True)
    events = [ev async for ev in stream]
    types = [ev.type for ev in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(ev.delta for ev in events if ev.type == "response.output_text.delta") == "The answer is 42."
    assert [ev.sequence_number for ev in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == "The answer is 42." and final.status == "completed"
    _check_usage(final.usage)


async def test_sdk_stream_helper_text_reasoning_and_tool(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    client, served = sdk
    parts = [ir.ReasoningPart(text="Let me think.", signature="enc-9", signature_protocol="openai-responses"),
             ir.TextPart(text="Checking the weather."),
             ir.ToolCallPart(id="call_w", name="get_weather", arguments='{"city": "Paris"}')]
    served.sse(encode_stream(_events(parts, ir.StopReason.TOOL_USE), ctx(_request(ir.Tool(name="get_weather")))))
    deltas: list[str] = []
    async with client.responses.stream(model="m-client", input="hi", tools=[WEATHER]) as stream:
        async for ev in stream:
            if ev.type == "response.function_call_arguments.delta":
                deltas.append(ev.delta)
        final = await stream.get_final_response()
    assert "".join(deltas) == '{"city": "Paris"}'
    reasoning, message, call = final.output
    assert reasoning.summary[0].text == "Let me think." and reasoning.encrypted_content == "enc-9"
    assert final.output_text == "Checking the weather."
    assert (call.name, call.call_id, call.parsed_arguments) == ("get_weather", "call_w", {"city": "Paris"})
    assert final.status == "completed"
    _check_usage(final.usage)


async def test_sdk_stream_helper_custom_tool_from_function_upstream(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    client, served = sdk
    parts = [ir.ToolCallPart(id="call_p", name="apply_patch", arguments='{"input": "*** Begin Patch\\n*** End Patch"}')]
    served.sse(encode_stream(_events(parts, ir.StopReason.TOOL_USE),
                             ctx(_request(ir.Tool(name="apply_patch", kind="custom")))))
    seen: list[str] = []
    async with client.responses.stream(model="m-client", input="hi") as stream:
        async for ev in stream:
            seen.append(ev.type)
        final = await stream.get_final_response()
    assert "response.custom_tool_call_input.done" in seen
    assert "response.function_call_arguments.delta" not in seen
    call = final.output[0]
    assert (call.type, call.name, call.input) == ("custom_tool_call", "apply_patch", "*** Begin Patch\n*** End Patch")


async def test_sdk_stream_incomplete(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    client, served = sdk
    served.sse(encode_stream(_events([ir.TextPart(text="The answer is")], ir.StopReason.MAX_TOKENS), ctx(_request())))
    stream = await client.responses.create(model="m-client", input="hi", stream=True)
    events = [ev async for ev in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == "The answer is"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("err", "cls", "status", "etype", "code"), [
    (ProxyError("invalid_request", "messages is wrong", param="input"), openai.BadRequestError, 400,
     "invalid_request_error", None),
    (ProxyError("authentication", "invalid API key"), openai.AuthenticationError, 401, "authentication_error",
     "invalid_api_key"),
    (ProxyError("insufficient_balance", "balance too low"), openai.APIStatusError, 402, "insufficient_quota",
     "insufficient_quota"),
    (ProxyError("permission", "key may not use this model"), openai.PermissionDeniedError, 403, "permission_error",
     None),
    (ProxyError("not_found", "model 'x' is not registered", param="model"), openai.NotFoundError, 404,
     "not_found_error", "model_not_found"),
    (ProxyError("payload_too_large", "body too large"), openai.APIStatusError, 413, "invalid_request_error",
     "request_too_large"),
    (ProxyError("rate_limited", "slow down", retry_after=1), openai.RateLimitError, 429, "rate_limit_error",
     "rate_limit_exceeded"),
    (ProxyError("upstream_failed", "every upstream failed"), openai.InternalServerError, 502, "server_error", None),
    (ProxyError("upstream_overloaded", "overloaded"), openai.InternalServerError, 503, "service_unavailable", None),
    (ProxyError("upstream_timeout", "too slow"), openai.InternalServerError, 504, "timeout", None),
])
async def test_sdk_raises_for_error_bodies(sdk: tuple[openai.AsyncOpenAI, Served], err: ProxyError, cls: type,
                                           status: int, etype: str, code: str | None) -> None:
    client, served = sdk
    st, body = PROTO.encode_error(err)
    assert st == status
    served.json(body, status=st)
    with pytest.raises(cls) as info:
        await client.responses.create(model="m-client", input="hi")
    exc = info.value
    assert exc.status_code == status
    assert exc.body["message"] == err.message
    assert (exc.type, exc.code, exc.param) == (etype, code, err.param)


async def test_sdk_raises_on_in_stream_error(sdk: tuple[openai.AsyncOpenAI, Served]) -> None:
    client, served = sdk
    events = _events([ir.TextPart(text="partial")], ir.StopReason.END_TURN)[:-2]  # cut before PartStop
    enc = PROTO.stream_encoder(ctx(_request()))
    body = b"".join(enc.encode(e) for e in events) + enc.error(ProxyError("upstream_failed", "upstream went away"))
    assert enc.encode(ir.MessageStop(stop_reason=ir.StopReason.END_TURN)) == b""  # nothing after the terminal event
    served.sse(body)
    stream = await client.responses.create(model="m-client", input="hi", stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError) as info:
        async for ev in stream:
            seen.append(ev.type)
    assert info.value.message == "upstream went away"
    assert info.value.code == "server_error"
    assert "response.output_text.delta" in seen
    served.sse(body)
    with pytest.raises(openai.APIError, match="upstream went away"):
        async with client.responses.stream(model="m-client", input="hi") as helper:
            async for _ in helper:
                pass
