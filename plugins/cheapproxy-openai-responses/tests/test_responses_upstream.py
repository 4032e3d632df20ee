"""Upstream side against the loopback fake: encode_request, send, decode
(streamed and not), for every scenario of docs/dev/fakes.md."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from cheapproxy import ir
from cheapproxy.config import UpstreamConfig
from cheapproxy.errors import ProxyError
from cheapproxy.testing.fake_openai_responses import make_app
from cheapproxy_openai_responses.provider import OpenAIResponsesProvider

from responses_testlib import PROTO, meaning, user

USAGE = ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=7)
THINK_USAGE = ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=7, reasoning_tokens=3)
TOOLS = [ir.Tool(name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}}),
         ir.Tool(name="get_time", parameters={"type": "object", "properties": {"tz": {"type": "string"}}}),
         ir.Tool(name="apply_patch", kind="custom", description="Apply a patch")]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


class Upstream:
    def __init__(self, base: str, session: aiohttp.ClientSession, log: list[dict[str, Any]], key: str) -> None:
        self.provider = OpenAIResponsesProvider(UpstreamConfig(name="up", provider="openai-responses", base_url=base,
                                                               api_key=key), None)
        self.session, self.log = session, log

    async def send(self, req: ir.Request, *, stream: bool, chunk: int = 0) -> tuple[int, Any]:
        """POST the encoded request; (status, IR events | IR response | error message)."""
        ureq = PROTO.encode_request(req, "gpt-up", stream=stream)
        headers = {"Content-Type": "application/json", **self.provider.auth_headers()}
        async with self.session.post(self.provider.url(ureq.path), data=ureq.body, headers=headers) as r:
            if r.status != 200:
                return r.status, PROTO.decode_error(r.status, await r.read())
            if not stream:
                return 200, PROTO.decode_response(await r.read())
            dec = PROTO.stream_decoder()
            events: list[ir.StreamEvent] = []
            if chunk:
                async for piece in r.content.iter_chunked(chunk):
                    events += dec.feed(piece)
            else:
                events += dec.feed(await r.read())
            return 200, events + dec.close()


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    log: list[dict[str, Any]] = []
    server = await aiohttp_server(make_app(log))
    async with aiohttp.ClientSession() as session:
        yield Upstream(str(server.make_url("/v1")), session, log, "upstream-secret")


def _req(text: str, **kw: Any) -> ir.Request:
    return ir.Request(model="m", system=[ir.TextPart(text="Be brief.")], messages=[user(text)], tools=list(TOOLS),
                      max_tokens=256, **kw)


SCENARIOS = {
    "": ([("text", "The answer is 42.")], ir.StopReason.END_TURN, USAGE),
    "[tool]": ([("call", "call_fake_weather", "get_weather", "function", '{"city": "Paris"}')],
               ir.StopReason.TOOL_USE, USAGE),
    "[parallel]": ([("call", "call_fake_weather", "get_weather", "function", '{"city": "Paris"}'),
                    ("call", "call_fake_time", "get_time", "function", '{"tz": "Europe/Paris"}')],
                   ir.StopReason.TOOL_USE, USAGE),
    "[custom]": ([("call", "call_fake_patch", "apply_patch", "custom",
                   "*** Begin Patch\n*** Add File: a.txt\n+hello\n*** End Patch")], ir.StopReason.TOOL_USE, USAGE),
    "[think]": ([("reasoning", "Let me think.", "enc-responses", "openai-responses"), ("text", "The answer is 42.")],
                ir.StopReason.END_TURN, THINK_USAGE),
    "[length]": ([("text", "The answer is")], ir.StopReason.MAX_TOKENS, USAGE),
    "[json]": ([("text", '{"answer": 42}')], ir.StopReason.END_TURN, USAGE),
    "[echo]": ([("text", "system: Be brief.")], ir.StopReason.END_TURN, USAGE),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tag", sorted(SCENARIOS))
async def test_scenarios(upstream: Upstream, tag: str, stream: bool) -> None:
    status, got = await upstream.send(_req(f"hello {tag}"), stream=stream, chunk=7 if stream else 0)
    assert status == 200
    if stream:
        assert isinstance(got[0], ir.MessageStart) and isinstance(got[-1], ir.MessageStop)
        if tag == "":
            assert [e.text for e in got if isinstance(e, ir.TextDelta)] == ["The answer", " is", " 42."]
        if tag == "[tool]":
            assert len([e for e in got if isinstance(e, ir.ToolCallDelta)]) >= 2
        got = ir.collect(got)
    parts, stop, usage = SCENARIOS[tag]
    assert meaning(got) == {"parts": parts, "stop": stop, "usage": usage}
    sent = upstream.log[-1]
    assert sent["path"] == "/v1/responses" and sent["headers"]["authorization"] == "Bearer upstream-secret"
    assert sent["body"]["model"] == "gpt-up" and sent["body"]["stream"] is stream and sent["body"]["store"] is False
    assert sent["body"]["instructions"] == "Be brief."


@pytest.mark.parametrize("stream", [False, True])
async def test_image_scenario_sends_a_data_url(upstream: Upstream, stream: bool) -> None:
    req = _req("")
    req.messages = [ir.Message(role="user", content=[ir.TextPart(text="what is it? [image]"),
                                                     ir.ImagePart(media_type="image/png", data=PNG)])]
    status, got = await upstream.send(req, stream=stream)
    resp = ir.collect(got) if stream else got
    assert status == 200 and resp.content[0].text == "image: image/png"
    part = upstream.log[-1]["body"]["input"][0]["content"][1]
    assert part == {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "auto"}


@pytest.mark.parametrize("stream", [False, True])
async def test_image_url_scenario(upstream: Upstream, stream: bool) -> None:
    req = _req("")
    req.messages = [ir.Message(role="user", content=[ir.TextPart(text="[image]"),
                                                     ir.ImagePart(url="https://example.com/cat.jpeg")])]
    status, got = await upstream.send(req, stream=stream)
    resp = ir.collect(got) if stream else got
    assert status == 200 and resp.content[0].text == "image: image/jpeg"


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_round_trip_history(upstream: Upstream, stream: bool) -> None:
    """A full tool loop in history (with our own encrypted reasoning) is accepted
    and the answer quotes the first tool result."""
    req = _req("")
    req.reasoning = ir.Reasoning(effort="high")
    req.messages = [
        user("weather in Paris and the time? [parallel]"),
        ir.Message(role="assistant", content=[
            ir.ReasoningPart(text="Two tools.", signature="enc-responses", signature_protocol="openai-responses"),
            ir.ReasoningPart(text="foreign", signature="sig-anthropic", signature_protocol="anthropic-messages"),
            ir.TextPart(text="Let me check."),
            ir.ToolCallPart(id="call_a", name="get_weather", arguments='{"city": "Paris"}'),
            ir.ToolCallPart(id="call_b", name="get_time", arguments='{"tz": "Europe/Paris"}')]),
        ir.Message(role="user", content=[
            ir.ToolResultPart(tool_call_id="call_a", name="get_weather", content=[ir.TextPart(text="18C")]),
            ir.ToolResultPart(tool_call_id="call_b", name="get_time", content=[ir.TextPart(text="noon")],
                              is_error=True)]),
    ]
    status, got = await upstream.send(req, stream=stream)
    assert status == 200
    resp = ir.collect(got) if stream else got
    assert resp.content[0].text == "Tool said: 18C" and resp.stop_reason is ir.StopReason.END_TURN
    body = upstream.log[-1]["body"]
    assert [i["type"] for i in body["input"]] == ["message", "reasoning", "message", "function_call", "function_call",
                                                  "function_call_output", "function_call_output"]
    assert body["input"][1] == {"type": "reasoning", "encrypted_content": "enc-responses",
                                "summary": [{"type": "summary_text", "text": "Two tools."}]}
    assert body["input"][6]["output"] == "Error: noon"
    assert body["reasoning"] == {"effort": "high", "summary": "auto"}
    assert body["include"] == ["reasoning.encrypted_content"]


async def test_custom_tool_round_trip_history(upstream: Upstream) -> None:
    req = _req("")
    req.messages = [
        user("patch it"),
        ir.Message(role="assistant", content=[ir.ToolCallPart(id="call_p", name="apply_patch", kind="custom",
                                                              arguments="*** Begin Patch\n*** End Patch")]),
        ir.Message(role="user", content=[ir.ToolResultPart(tool_call_id="call_p", content=[ir.TextPart(text="Done!")])]),
    ]
    status, resp = await upstream.send(req, stream=False)
    assert status == 200 and resp.content[0].text == "Tool said: Done!"
    items = upstream.log[-1]["body"]["input"]
    assert items[1] == {"type": "custom_tool_call", "call_id": "call_p", "name": "apply_patch",
                        "input": "*** Begin Patch\n*** End Patch"}
    assert items[2] == {"type": "custom_tool_call_output", "call_id": "call_p", "output": "Done!"}


async def test_tools_are_sent_flat_and_not_strict(upstream: Upstream) -> None:
    await upstream.send(_req("hi"), stream=False)
    tools = upstream.log[-1]["body"]["tools"]
    assert tools[0] == {"type": "function", "name": "get_weather", "strict": False,
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    assert tools[2] == {"type": "custom", "name": "apply_patch", "description": "Apply a patch"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("tag", "status", "message"), [
    ("[error400]", 400, "bad request from fake"),
    ("[error500]", 500, "The server had an error while processing your request. Sorry about that!"),
    ("[error429]", 429, "Rate limit reached for requests (fake)."),
])
async def test_error_scenarios(upstream: Upstream, tag: str, status: int, message: str, stream: bool) -> None:
    got_status, msg = await upstream.send(_req(tag), stream=stream)
    assert (got_status, msg) == (status, message)


async def test_error429_carries_retry_after(upstream: Upstream) -> None:
    ureq = PROTO.encode_request(_req("[error429]"), "gpt-up", stream=False)
    headers = {"Content-Type": "application/json", **upstream.provider.auth_headers()}
    async with upstream.session.post(upstream.provider.url(ureq.path), data=ureq.body, headers=headers) as r:
        assert r.status == 429 and r.headers["retry-after"] == "1"


async def test_cut_stream_ends_in_stream_error(upstream: Upstream) -> None:
    status, events = await upstream.send(_req("[cut]"), stream=True)
    assert status == 200
    assert [type(e).__name__ for e in events] == ["MessageStart", "PartStart", "TextDelta", "StreamError"]
    assert events[2].text == "The answer"
    assert events[-1].kind == "upstream_failed" and events[-1].status == 502


async def test_wrong_key_is_refused_and_not_echoed(aiohttp_server: Any) -> None:
    server = await aiohttp_server(make_app([]))
    async with aiohttp.ClientSession() as session:
        up = Upstream(str(server.make_url("/v1")), session, [], "sk-proj-leakyleakyleaky1234")
        status, msg = await up.send(_req("hi"), stream=False)
    assert status == 401
    assert "leaky" not in msg and "1234" not in msg and msg.startswith("Incorrect API key provided: [redacted]")


async def test_fake_rejects_what_translation_bugs_produce(upstream: Upstream) -> None:
    """The fake is strict where the real API is: a chat-style field is refused."""
    async with upstream.session.post(upstream.provider.url("/responses"), json={
        "model": "m", "input": "hi", "max_tokens": 10}, headers=upstream.provider.auth_headers()) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "max_tokens"
    async with upstream.session.post(upstream.provider.url("/responses"), json={
        "model": "m", "input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
            headers=upstream.provider.auth_headers()) as r:
        assert r.status == 400 and "No tool call found" in (await r.json())["error"]["message"]


async def test_stop_sequences_and_n_are_refused() -> None:
    with pytest.raises(ProxyError) as info:
        PROTO.encode_request(_req("hi", stop=["END"]), "gpt-up", stream=False)
    assert (info.value.kind, info.value.param, info.value.status) == ("invalid_request", "stop", 400)
    with pytest.raises(ProxyError) as info:
        PROTO.encode_request(_req("hi", n=2), "gpt-up", stream=False)
    assert (info.value.kind, info.value.param) == ("invalid_request", "n")
