"""Upstream side against the running fake: encode_request -> HTTP -> decode,
streamed and not, for every scenario of docs/dev/fakes.md."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from openai_chat_helpers import CODEC, summary

from cheapproxy import ir
from cheapproxy.config import UpstreamConfig
from cheapproxy.errors import ProxyError
from cheapproxy.provider import NoOptions
from cheapproxy.testing.fake_openai_chat import make_app
from cheapproxy_openai.provider import OpenAIProvider

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
USAGE = ir.Usage(input_tokens=10, output_tokens=7, cache_read_tokens=5)


def user(*parts: ir.Part) -> ir.Message:
    return ir.Message(role="user", content=list(parts))


def text_request(text: str, **kw: Any) -> ir.Request:
    return ir.Request(model="ignored", messages=[user(ir.TextPart(text=text))], **kw)


class Upstream:
    def __init__(self, server: Any, key: str = "upstream-secret") -> None:
        cfg = UpstreamConfig(name="oa", provider="openai", base_url=str(server.make_url("/v1")), api_key=key)
        self.provider = OpenAIProvider(cfg, NoOptions())

    async def send(self, req: ir.Request, stream: bool) -> tuple[int, Any, Any]:
        """(status, decoded answer or error message, response headers)."""
        up = CODEC.encode_request(req, "gpt-fake", stream=stream)
        headers = {**up.headers, **self.provider.auth_headers()}
        async with aiohttp.ClientSession() as s:
            async with s.post(self.provider.url(up.path), data=up.body, headers=headers) as r:
                if r.status != 200:
                    return r.status, CODEC.decode_error(r.status, await r.read()), r.headers
                if not stream:
                    return 200, CODEC.decode_response(await r.read()), r.headers
                dec = CODEC.stream_decoder()
                events: list[ir.StreamEvent] = []
                async for chunk in r.content.iter_any():
                    events += dec.feed(chunk)
                return 200, events + dec.close(), r.headers


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[Upstream, list[dict[str, Any]]]:
    log: list[dict[str, Any]] = []
    server = await aiohttp_server(make_app(log))
    return Upstream(server), log


async def answer(up: Upstream, req: ir.Request, stream: bool) -> dict[str, Any]:
    status, result, _ = await up.send(req, stream)
    assert status == 200, result
    if stream:
        assert isinstance(result[0], ir.MessageStart) and isinstance(result[-1], ir.MessageStop)
        result = ir.collect(result)
    return summary(result)


@pytest.mark.parametrize("stream", [False, True])
async def test_text(fake: Any, stream: bool) -> None:
    up, log = fake
    got = await answer(up, text_request("hello"), stream)
    assert got == {"text": "The answer is 42.", "reasoning": "", "calls": [], "stop": ir.StopReason.END_TURN, "usage": USAGE}
    sent = log[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == "Bearer upstream-secret"
    assert sent["body"]["model"] == "gpt-fake"
    if stream:
        assert sent["body"]["stream_options"] == {"include_usage": True}


async def test_streamed_text_arrives_in_several_deltas(fake: Any) -> None:
    up, _ = fake
    _, events, _ = await up.send(text_request("hello"), True)
    assert [e.text for e in events if isinstance(e, ir.TextDelta)] == ["The answer", " is", " 42."]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call(fake: Any, stream: bool) -> None:
    up, log = fake
    weather = ir.Tool(name="get_weather", description="Weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}})
    req = text_request("[tool] weather?", tools=[weather], tool_choice=ir.ToolChoice(mode="auto", parallel=False))
    got = await answer(up, req, stream)
    assert got["calls"] == [("call_fake_weather", "get_weather", {"city": "Paris"})]
    assert got["stop"] is ir.StopReason.TOOL_USE and got["usage"] == USAGE
    body = log[-1]["body"]
    assert body["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": weather.parameters, "description": "Weather"}}]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_tool_calls(fake: Any, stream: bool) -> None:
    up, _ = fake
    tools = [ir.Tool(name="get_weather"), ir.Tool(name="get_time")]
    got = await answer(up, text_request("[parallel]", tools=tools), stream)
    assert got["calls"] == [
        ("call_fake_weather", "get_weather", {"city": "Paris"}),
        ("call_fake_time", "get_time", {"tz": "Europe/Paris"}),
    ]
    assert got["stop"] is ir.StopReason.TOOL_USE


@pytest.mark.parametrize("stream", [False, True])
async def test_think(fake: Any, stream: bool) -> None:
    up, log = fake
    req = text_request("[think] ponder", reasoning=ir.Reasoning(budget_tokens=5000))
    got = await answer(up, req, stream)
    assert got["reasoning"] == "Let me think." and got["text"] == "The answer is 42."
    assert got["usage"] == ir.Usage(input_tokens=10, output_tokens=7, cache_read_tokens=5, reasoning_tokens=3)
    assert log[-1]["body"]["reasoning_effort"] == "medium"


@pytest.mark.parametrize("stream", [False, True])
async def test_length(fake: Any, stream: bool) -> None:
    up, log = fake
    got = await answer(up, text_request("[length]", max_tokens=3), stream)
    assert got["text"] == "The answer is" and got["stop"] is ir.StopReason.MAX_TOKENS
    assert log[-1]["body"]["max_completion_tokens"] == 3 and "max_tokens" not in log[-1]["body"]


@pytest.mark.parametrize("stream", [False, True])
async def test_image_base64_and_url(fake: Any, stream: bool) -> None:
    up, log = fake
    req = ir.Request(model="m", messages=[user(ir.TextPart(text="[image] what is it"), ir.ImagePart(media_type="image/png", data=PNG_B64, detail="low"))])
    got = await answer(up, req, stream)
    assert got["text"] == "image: image/png"
    part = log[-1]["body"]["messages"][0]["content"][1]
    assert part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "low"}}
    req = ir.Request(model="m", messages=[user(ir.ImagePart(url="https://example.com/cat.jpg"), ir.TextPart(text="[image]"))])
    got = await answer(up, req, stream)
    assert got["text"] == "image: image/jpeg"


@pytest.mark.parametrize("stream", [False, True])
async def test_json_mode(fake: Any, stream: bool) -> None:
    up, log = fake
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    req = text_request("[json]", response_format=ir.ResponseFormat(type="json_schema", schema=schema, name="a", strict=True))
    got = await answer(up, req, stream)
    assert orjson.loads(got["text"]) == {"answer": 42}
    assert log[-1]["body"]["response_format"] == {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_result_round_trip(fake: Any, stream: bool) -> None:
    up, log = fake
    req = ir.Request(
        model="m",
        tools=[ir.Tool(name="get_weather")],
        messages=[
            user(ir.TextPart(text="[tool] weather?")),
            ir.Message(role="assistant", content=[ir.TextPart(text=""), ir.ToolCallPart(id="toolu_01", name="get_weather", arguments='{"city":"Paris"}')]),
            user(ir.ToolResultPart(tool_call_id="toolu_01", content=[ir.TextPart(text="18C")])),
        ],
    )
    got = await answer(up, req, stream)
    assert got["text"] == "Tool said: 18C" and got["stop"] is ir.StopReason.END_TURN
    msgs = log[-1]["body"]["messages"]
    assert msgs[1] == {"role": "assistant", "content": None, "tool_calls": [{"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    assert msgs[2] == {"role": "tool", "tool_call_id": "toolu_01", "content": "18C"}


async def test_translated_history_with_error_result_image_and_mid_system(fake: Any) -> None:
    """An Anthropic-shaped IR (system blocks, mid-conversation system, error tool
    result carrying an image, user text in the same turn) is accepted as valid."""
    up, log = fake
    req = ir.Request(
        model="m",
        system=[ir.TextPart(text="You are terse."), ir.TextPart(text="Answer in English.")],
        tools=[ir.Tool(name="screenshot"), ir.Tool(name="apply_patch", kind="custom", description="Apply a patch")],
        messages=[
            user(ir.TextPart(text="take one")),
            ir.Message(role="assistant", content=[
                ir.ReasoningPart(text="thinking", signature="sig", signature_protocol="anthropic-messages"),
                ir.ToolCallPart(id="toolu_A", name="screenshot", arguments="{}"),
                ir.ToolCallPart(id="toolu_B", name="apply_patch", arguments="*** Begin Patch", kind="custom"),
            ]),
            user(
                ir.ToolResultPart(tool_call_id="toolu_A", is_error=True, content=[ir.TextPart(text="denied"), ir.ImagePart(media_type="image/png", data=PNG_B64)]),
                ir.ToolResultPart(tool_call_id="toolu_B", content=[ir.TextPart(text="ok")]),
                ir.TextPart(text="now [echo]"),
            ),
            ir.Message(role="system", content=[ir.TextPart(text="Be nice.")]),
        ],
    )
    got = await answer(up, req, False)
    assert got["text"] == "system: You are terse.\n\nAnswer in English.|Be nice."
    msgs = log[-1]["body"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool", "user", "system"]
    assert "reasoning_content" not in msgs[2]  # foreign reasoning is dropped
    assert msgs[2]["tool_calls"][1]["function"] == {"name": "apply_patch", "arguments": '{"input":"*** Begin Patch"}'}
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_A", "content": "Error: denied"}
    assert msgs[5]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "text", "text": "now [echo]"},
    ]
    custom = log[-1]["body"]["tools"][1]["function"]
    assert custom["parameters"] == {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("tag", "status", "message"),
    [("error400", 400, "bad request from fake"), ("error500", 500, "internal error from fake"), ("error429", 429, "rate limited by fake")],
)
async def test_errors(fake: Any, stream: bool, tag: str, status: int, message: str) -> None:
    up, _ = fake
    got_status, msg, headers = await up.send(text_request(f"[{tag}]"), stream)
    assert (got_status, msg) == (status, message)
    if status == 429:
        assert headers["retry-after"] == "1"


async def test_cut_stream_ends_with_stream_error(fake: Any) -> None:
    up, _ = fake
    status, events, _ = await up.send(text_request("[cut]"), True)
    assert status == 200
    assert [e.text for e in events if isinstance(e, ir.TextDelta)] == ["The answer"]
    assert isinstance(events[-1], ir.StreamError) and not any(isinstance(e, ir.MessageStop) for e in events)


async def test_wrong_key_is_401_and_the_masked_key_is_not_relayed(aiohttp_server: Any) -> None:
    server = await aiohttp_server(make_app())
    up = Upstream(server, key="sk-live-abcdefghijklmnop")
    status, msg, _ = await up.send(text_request("hi"), False)
    assert status == 401
    assert msg.startswith("Incorrect API key provided: [redacted]")
    assert "mnop" not in msg and "sk-" not in msg


async def test_fake_rejects_what_the_real_api_rejects(aiohttp_server: Any) -> None:
    server = await aiohttp_server(make_app())
    url = str(server.make_url("/v1/chat/completions"))
    auth = {"Authorization": "Bearer upstream-secret"}
    bad_bodies = {
        "model": {"messages": [{"role": "user", "content": "x"}]},
        "messages[1].tool_calls[0].function.arguments": {
            "model": "m",
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
            ],
        },
        "messages": {
            "model": "m",
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "user", "content": "y"},
            ],
        },
        "messages[1].role": {"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "zz", "content": "r"}]},
        "stream_options": {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
    }
    async with aiohttp.ClientSession() as s:
        for param, body in bad_bodies.items():
            async with s.post(url, json=body, headers=auth) as r:
                err = (await r.json())["error"]
                assert r.status == 400 and err["type"] == "invalid_request_error", param
                assert err["param"] == param, (param, err)
        async with s.post(url, json={"model": "m", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 401


async def test_embeddings_against_fake(fake: Any) -> None:
    up, log = fake
    for fmt in (None, "base64", "float"):
        req = ir.EmbeddingRequest(model="e", inputs=["a", "b"], encoding_format=fmt, dimensions=4)
        ureq = CODEC.encode_embeddings_request(req, "text-embedding-fake")
        async with aiohttp.ClientSession() as s:
            async with s.post(up.provider.url(ureq.path), data=ureq.body, headers={**ureq.headers, **up.provider.auth_headers()}) as r:
                assert r.status == 200
                resp = CODEC.decode_embeddings_response(await r.read())
        assert resp.vectors == [[0.25, -0.5, 0.125, 1.0], [0.5, -0.5, 0.125, 1.0]]
        assert resp.usage == ir.Usage(input_tokens=6)
        body = log[-1]["body"]
        assert log[-1]["path"] == "/v1/embeddings" and body["dimensions"] == 4 and body["input"] == ["a", "b"]
        assert body.get("encoding_format") == fmt


async def test_unsupported_targets_raise_before_sending() -> None:
    with pytest.raises(ProxyError) as e:
        CODEC.encode_request(text_request("x", stop=["a", "b", "c", "d", "e"]), "m", stream=False)
    assert e.value.kind == "invalid_request" and e.value.param == "stop"
    req = ir.Request(model="m", messages=[user(ir.FilePart(url="https://example.com/a.pdf", media_type="application/pdf"))])
    with pytest.raises(ProxyError) as e:
        CODEC.encode_request(req, "m", stream=False)
    assert e.value.status == 400 and "not supported by openai-chat" in e.value.message
