"""(c) upstream side against the running fake: encode_request for every
scenario of docs/dev/fakes.md, send, decode (streamed and not)."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession

from cheapproxy import ir
from cheapproxy.config import UpstreamConfig
from cheapproxy.protocol import UpstreamRequest
from cheapproxy.testing.fake_anthropic import make_app
from cheapproxy_anthropic.provider import AnthropicProvider

from anthropic_testlib import CODEC

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 24).decode()
USAGE = ir.Usage(input_tokens=10, output_tokens=7, cache_read_tokens=5, cache_write_tokens=2)


def user(text: str, *extra: ir.Part) -> ir.Message:
    return ir.Message(role="user", content=[ir.TextPart(text=text), *extra])


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    log: list[dict[str, Any]] = []
    server = await aiohttp_server(make_app(log))
    provider = AnthropicProvider(UpstreamConfig(name="anth", provider="anthropic", api_key="upstream-secret",
                                                base_url=str(server.make_url(""))), None)

    class Upstream:
        def __init__(self) -> None:
            self.log = log

        async def send(self, req: UpstreamRequest, *, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
            async with ClientSession() as s:
                hdrs = {**req.headers, **provider.auth_headers(), **(headers or {})}
                async with s.post(provider.url(req.path), data=req.body, headers=hdrs, params=req.query) as r:
                    return r.status, await r.read()

        async def run(self, request: ir.Request, stream: bool) -> ir.Response | list[ir.StreamEvent]:
            status, body = await self.send(CODEC.encode_request(request, "claude-sonnet-4-5", stream=stream))
            assert status == 200, CODEC.decode_error(status, body)
            if not stream:
                return CODEC.decode_response(body)
            dec = CODEC.stream_decoder()
            return dec.feed(body) + dec.close()

        async def answer(self, request: ir.Request, stream: bool) -> ir.Response:
            got = await self.run(request, stream)
            return ir.collect(got) if stream else got  # type: ignore[arg-type]

    yield Upstream()


@pytest.mark.parametrize("stream", [False, True])
async def test_plain_text(upstream: Any, stream: bool) -> None:
    req = ir.Request(model="x", messages=[user("hello")], max_tokens=100)
    resp = await upstream.answer(req, stream)
    assert [p.text for p in resp.content] == ["The answer is 42."]
    assert resp.stop_reason is ir.StopReason.END_TURN and resp.usage == USAGE
    sent = upstream.log[-1]
    assert sent["path"] == "/v1/messages" and sent["headers"]["x-api-key"] == "upstream-secret"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"]["model"] == "claude-sonnet-4-5" and sent["body"]["max_tokens"] == 100
    assert sent["body"].get("stream", False) is stream


async def test_streamed_text_arrives_in_three_deltas(upstream: Any) -> None:
    events = await upstream.run(ir.Request(model="x", messages=[user("hello")]), True)
    assert [e.text for e in events if isinstance(e, ir.TextDelta)] == ["The answer", " is", " 42."]
    assert isinstance(events[0], ir.MessageStart) and isinstance(events[-1], ir.MessageStop)
    assert upstream.log[-1]["body"]["max_tokens"] == 4096  # the default when IR has none


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call(upstream: Any, stream: bool) -> None:
    tools = [ir.Tool(name="get_weather", description="Weather", parameters={"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]})]
    req = ir.Request(model="x", messages=[user("weather? [tool]")], tools=tools,
                     tool_choice=ir.ToolChoice(mode="tool", name="get_weather", parallel=False))
    resp = await upstream.answer(req, stream)
    (call,) = resp.content
    assert call.id == "toolu_fake_01" and call.name == "get_weather" and orjson.loads(call.arguments) == {"city": "Paris"}
    assert resp.stop_reason is ir.StopReason.TOOL_USE and resp.usage == USAGE
    body = upstream.log[-1]["body"]
    assert body["tools"] == [{"name": "get_weather", "description": "Weather", "input_schema": tools[0].parameters}]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_tool_calls(upstream: Any, stream: bool) -> None:
    resp = await upstream.answer(ir.Request(model="x", messages=[user("[parallel]")]), stream)
    assert [(c.name, orjson.loads(c.arguments)) for c in resp.content] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]
    assert resp.stop_reason is ir.StopReason.TOOL_USE


@pytest.mark.parametrize("stream", [False, True])
async def test_thinking(upstream: Any, stream: bool) -> None:
    req = ir.Request(model="x", messages=[user("[think]")], max_tokens=1000, temperature=0.3, top_k=5,
                     reasoning=ir.Reasoning(effort="high"), tools=[ir.Tool(name="t")],
                     tool_choice=ir.ToolChoice(mode="required"))
    resp = await upstream.answer(req, stream)
    reasoning, text = resp.content
    assert (reasoning.text, reasoning.signature, reasoning.signature_protocol) == (
        "Let me think.", "sig-anthropic", "anthropic-messages")
    assert text.text == "The answer is 42."
    assert resp.usage == ir.Usage(input_tokens=10, output_tokens=7, cache_read_tokens=5, cache_write_tokens=2,
                                  reasoning_tokens=3)
    body = upstream.log[-1]["body"]
    # high effort = 16384 budget; max_tokens raised above it; forced choice and sampling knobs dropped
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 16384}
    assert body["max_tokens"] == 17384
    assert body["tool_choice"] == {"type": "auto"}
    assert "temperature" not in body and "top_k" not in body


@pytest.mark.parametrize("stream", [False, True])
async def test_length(upstream: Any, stream: bool) -> None:
    resp = await upstream.answer(ir.Request(model="x", messages=[user("[length]")]), stream)
    assert resp.content[0].text == "The answer is" and resp.stop_reason is ir.StopReason.MAX_TOKENS


@pytest.mark.parametrize("stream", [False, True])
async def test_images_base64_data_url_and_url(upstream: Any, stream: bool) -> None:
    img = ir.ImagePart(url=f"data:image/png;base64,{PNG}")
    resp = await upstream.answer(ir.Request(model="x", messages=[user("[image]", img)]), stream)
    assert resp.content[0].text == "image: image/png"
    sent = upstream.log[-1]["body"]["messages"][0]["content"][1]
    assert sent == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    # media type sniffed when the IR has none
    resp = await upstream.answer(ir.Request(model="x", messages=[user("[image]", ir.ImagePart(data=PNG))]), stream)
    assert resp.content[0].text == "image: image/png"
    resp = await upstream.answer(ir.Request(model="x", messages=[
        user("[image]", ir.ImagePart(url="https://example.com/cat.jpg"))]), stream)
    assert resp.content[0].text == "image: url"
    assert upstream.log[-1]["body"]["messages"][0]["content"][1]["source"] == {
        "type": "url", "url": "https://example.com/cat.jpg"}


@pytest.mark.parametrize("stream", [False, True])
async def test_json_schema_and_json_mode(upstream: Any, stream: bool) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    req = ir.Request(model="x", messages=[user("[json]")], response_format=ir.ResponseFormat(type="json_schema", schema=schema))
    resp = await upstream.answer(req, stream)
    assert orjson.loads(resp.content[0].text) == {"answer": 42}
    assert upstream.log[-1]["body"]["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    req = ir.Request(model="x", messages=[user("[json]")], response_format=ir.ResponseFormat(type="json_object"))
    await upstream.answer(req, stream)
    assert upstream.log[-1]["body"]["system"][-1]["text"] == "Respond with a single valid JSON object and nothing else."


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("tag", "status", "message"), [
    ("[error400]", 400, "bad request from fake"), ("[error500]", 500, "internal error from fake"),
    ("[error429]", 429, "rate limited by fake")])
async def test_errors(upstream: Any, stream: bool, tag: str, status: int, message: str) -> None:
    got_status, body = await upstream.send(CODEC.encode_request(ir.Request(model="x", messages=[user(tag)]), "m", stream=stream))
    assert got_status == status and CODEC.decode_error(got_status, body) == message


async def test_cut_stream_ends_with_stream_error(upstream: Any) -> None:
    events = await upstream.run(ir.Request(model="x", messages=[user("[cut]")]), True)
    assert [e.text for e in events if isinstance(e, ir.TextDelta)] == ["The answer"]
    assert isinstance(events[-1], ir.StreamError) and events[-1].kind == "upstream_failed"
    assert not any(isinstance(e, ir.MessageStop) for e in events)


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_result_history_openai_shaped(upstream: Any, stream: bool) -> None:
    """History as an OpenAI client sends it: empty assistant text next to the call,
    an id Anthropic would reject, the result and more user text in separate turns."""
    msgs = [
        ir.Message(role="assistant", content=[ir.TextPart(text="Earlier answer")]),  # first turn not user
        user("weather?"),
        ir.Message(role="assistant", content=[
            ir.TextPart(text=""), ir.ReasoningPart(text="foreign thought", signature="xx", signature_protocol="gemini"),
            ir.ToolCallPart(id="functions.get_weather:0", name="get_weather", arguments='{"city": "Paris"}'),
            ir.ToolCallPart(id="call_2", name="get_time", arguments="not json")]),
        ir.Message(role="user", content=[ir.TextPart(text="  ")]),
        ir.Message(role="user", content=[ir.ToolResultPart(tool_call_id="functions.get_weather:0", content=[
            ir.TextPart(text="18C")])]),
    ]
    resp = await upstream.answer(ir.Request(model="x", messages=msgs), stream)
    assert resp.content[0].text == "Tool said: 18C"
    sent = upstream.log[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
    assert sent[0]["content"] == [{"type": "text", "text": "..."}]
    calls = sent[3]["content"]
    assert [b["type"] for b in calls] == ["tool_use", "tool_use"]  # empty text and foreign thinking dropped
    assert calls[0]["id"].startswith("functions_get_weather_0_") and calls[1]["input"] == {"input": "not json"}
    results = sent[4]["content"]
    assert results[0] == {"type": "tool_result", "tool_use_id": calls[0]["id"], "content": [{"type": "text", "text": "18C"}]}
    assert results[1]["tool_use_id"] == "call_2" and results[1]["is_error"] is True  # synthesized for the cancelled call


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_system_folds_mid_conversation_system(upstream: Any, stream: bool) -> None:
    msgs = [user("hi"), ir.Message(role="assistant", content=[ir.TextPart(text="hello")]),
            ir.Message(role="system", content=[ir.TextPart(text="Be brief.")]), user("[echo]")]
    req = ir.Request(model="x", system=[ir.TextPart(text="You are terse.", provider_data={
        "anthropic-messages": {"cache_control": {"type": "ephemeral"}}})], messages=msgs)
    resp = await upstream.answer(req, stream)
    assert resp.content[0].text == "system: You are terse.|Be brief."
    body = upstream.log[-1]["body"]
    assert body["system"][0] == {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}
    assert all(m["role"] != "system" for m in body["messages"])


async def test_count_tokens_upstream(upstream: Any) -> None:
    req = ir.Request(model="x", system=[ir.TextPart(text="two words")], messages=[user("three more words")],
                     max_tokens=50, temperature=0.5, stream=True)
    up = CODEC.encode_count_tokens_request(req, "claude-haiku-4-5")
    assert up is not None and up.path == "/v1/messages/count_tokens"
    status, body = await upstream.send(up)
    assert status == 200 and CODEC.decode_count_tokens_response(body) == 5
    assert set(upstream.log[-1]["body"]) == {"model", "system", "messages"}


async def test_wrong_credential_is_refused(upstream: Any) -> None:
    req = CODEC.encode_request(ir.Request(model="x", messages=[user("hi")]), "m", stream=False)
    status, body = await upstream.send(req, headers={"x-api-key": "nope"})
    assert status == 401 and orjson.loads(body)["error"]["type"] == "authentication_error"


async def test_n_greater_than_one_is_refused() -> None:
    from cheapproxy.errors import ProxyError
    with pytest.raises(ProxyError) as info:
        CODEC.encode_request(ir.Request(model="x", messages=[user("hi")], n=2), "m", stream=False)
    assert info.value.status == 400 and info.value.param == "n"
