"""Upstream side against the running fake Gemini API: encode_request of IR
requests for every fakes.md scenario, send over real HTTP, decode."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import orjson
import pytest

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import UpstreamRequest
from cheapproxy_gemini.codec import GeminiProtocol
from gemini_helpers import calls_of, make_provider, text_of

PNG = base64.b64encode(bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489")).decode()
USAGE = ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=7)
THINK_USAGE = ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=7, reasoning_tokens=3)


def user(text: str) -> ir.Message:
    return ir.Message(role="user", content=[ir.TextPart(text=text)])


async def send(fake: Any, ureq: UpstreamRequest, key: str | None = "upstream-secret") -> tuple[int, bytes, list[ir.StreamEvent] | None]:
    """POST like the dispatcher would: base URL + path, provider auth headers."""
    provider = make_provider(str(fake.make_url("")), api_key=key)
    p = GeminiProtocol()
    async with aiohttp.ClientSession() as session:
        async with session.post(provider.url(ureq.path), params=ureq.query, data=ureq.body,
                                headers={**provider.auth_headers(), "content-type": "application/json"}) as resp:
            if resp.status != 200 or not ureq.stream:
                return resp.status, await resp.read(), None
            dec = p.stream_decoder()
            events: list[ir.StreamEvent] = []
            try:
                async for chunk in resp.content.iter_any():
                    events.extend(dec.feed(chunk))
            except aiohttp.ClientPayloadError:
                pass  # the [cut] scenario drops the connection
            events.extend(dec.close())
            return resp.status, b"", events


async def run(fake: Any, request: ir.Request, *, stream: bool, model: str = "gemini-2.5-flash") -> ir.Response:
    p = GeminiProtocol()
    ureq = p.encode_request(request, model, stream=stream)
    status, body, events = await send(fake, ureq)
    assert status == 200, body
    if stream:
        assert events is not None
        assert not any(isinstance(e, ir.StreamError) for e in events), events
        return ir.collect(events)
    return p.decode_response(body)


@pytest.mark.parametrize("stream", [False, True])
async def test_plain_text(fake: Any, stream: bool) -> None:
    resp = await run(fake, ir.Request(model="m", messages=[user("hello")]), stream=stream)
    assert text_of(resp) == "The answer is 42."
    assert resp.stop_reason is ir.StopReason.END_TURN
    assert resp.usage == USAGE
    entry = fake.log[-1]
    if stream:
        assert entry["path"] == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
        assert entry["query"] == {"alt": "sse"}
    else:
        assert entry["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert entry["headers"]["x-goog-api-key"] == "upstream-secret"
    assert entry["body"] == {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}


async def test_text_stream_arrives_in_three_deltas(fake: Any) -> None:
    p = GeminiProtocol()
    _, _, events = await send(fake, p.encode_request(ir.Request(model="m", messages=[user("hi")]), "gemini-2.5-flash", stream=True))
    assert events is not None
    assert [e.text for e in events if isinstance(e, ir.TextDelta)] == ["The answer", " is", " 42."]
    assert isinstance(events[-1], ir.MessageStop) and events[-1].usage == USAGE


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call(fake: Any, stream: bool) -> None:
    tools = [ir.Tool(name="get_weather", description="Weather", parameters={
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
        "properties": {"city": {"type": ["string", "null"]}}, "additionalProperties": False})]
    req = ir.Request(model="m", messages=[user("weather? [tool]")], tools=tools, tool_choice=ir.ToolChoice(mode="auto"))
    resp = await run(fake, req, stream=stream)
    assert calls_of(resp) == [("get_weather", {"city": "Paris"})]
    assert resp.stop_reason is ir.StopReason.TOOL_USE
    assert resp.usage == USAGE
    decl = fake.log[-1]["body"]["tools"][0]["functionDeclarations"][0]
    # JSON Schema goes as parametersJsonSchema untouched (pitfall 9): the fake
    # would reject $schema / additionalProperties / type lists under `parameters`
    assert "parameters" not in decl and decl["parametersJsonSchema"]["additionalProperties"] is False
    assert fake.log[-1]["body"]["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_tool_calls(fake: Any, stream: bool) -> None:
    req = ir.Request(model="m", messages=[user("[parallel]")], tools=[ir.Tool(name="get_weather"), ir.Tool(name="get_time")])
    resp = await run(fake, req, stream=stream)
    assert calls_of(resp) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]
    ids = [p.id for p in resp.content if isinstance(p, ir.ToolCallPart)]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert resp.stop_reason is ir.StopReason.TOOL_USE


@pytest.mark.parametrize("stream", [False, True])
async def test_thinking(fake: Any, stream: bool) -> None:
    req = ir.Request(model="m", messages=[user("[think]")], reasoning=ir.Reasoning(effort="high"))
    resp = await run(fake, req, stream=stream)
    assert isinstance(resp.content[0], ir.ReasoningPart)
    assert (resp.content[0].text, resp.content[0].signature, resp.content[0].signature_protocol) == \
        ("Let me think.", "c2lnLWdlbWluaQ==", "gemini")
    assert text_of(resp) == "The answer is 42."
    assert resp.usage == THINK_USAGE
    assert fake.log[-1]["body"]["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 16384, "includeThoughts": True}


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens(fake: Any, stream: bool) -> None:
    resp = await run(fake, ir.Request(model="m", messages=[user("[length]")], max_tokens=3), stream=stream)
    assert text_of(resp) == "The answer is"
    assert resp.stop_reason is ir.StopReason.MAX_TOKENS
    assert fake.log[-1]["body"]["generationConfig"] == {"maxOutputTokens": 3}


@pytest.mark.parametrize("stream", [False, True])
async def test_image_inline_and_google_file_uri(fake: Any, stream: bool) -> None:
    msg = ir.Message(role="user", content=[ir.TextPart(text="what? [image]"), ir.ImagePart(data=PNG)])
    resp = await run(fake, ir.Request(model="m", messages=[msg]), stream=stream)
    assert text_of(resp) == "image: image/png"  # media type sniffed from the bytes
    sent = fake.log[-1]["body"]["contents"][0]["parts"][1]
    assert sent == {"inlineData": {"mimeType": "image/png", "data": PNG}}
    uri = "https://generativelanguage.googleapis.com/v1beta/files/abc123"
    msg = ir.Message(role="user", content=[ir.TextPart(text="[image]"), ir.ImagePart(url=uri, media_type="image/webp")])
    resp = await run(fake, ir.Request(model="m", messages=[msg]), stream=stream)
    assert text_of(resp) == "image: image/webp"
    assert fake.log[-1]["body"]["contents"][0]["parts"][1] == {"fileData": {"fileUri": uri, "mimeType": "image/webp"}}


async def test_data_url_image_goes_inline(fake: Any) -> None:
    msg = ir.Message(role="user", content=[ir.TextPart(text="[image]"), ir.ImagePart(url=f"data:image/jpeg;base64,{PNG}")])
    resp = await run(fake, ir.Request(model="m", messages=[msg]), stream=False)
    assert text_of(resp) == "image: image/jpeg"
    assert fake.log[-1]["body"]["contents"][0]["parts"][1]["inlineData"]["data"] == PNG


@pytest.mark.parametrize("stream", [False, True])
async def test_json_mode(fake: Any, stream: bool) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    req = ir.Request(model="m", messages=[user("[json]")], response_format=ir.ResponseFormat(type="json_schema", schema=schema))
    resp = await run(fake, req, stream=stream)
    assert orjson.loads(text_of(resp)) == {"answer": 42}
    gc = fake.log[-1]["body"]["generationConfig"]
    assert gc == {"responseMimeType": "application/json", "responseJsonSchema": schema}


async def test_echo_folds_system_messages_in_order(fake: Any) -> None:
    req = ir.Request(model="m", system=[ir.TextPart(text="You are terse."), ir.TextPart(text="Be kind.")], messages=[
        user("first"),
        ir.Message(role="assistant", content=[ir.TextPart(text="ok")]),
        ir.Message(role="system", content=[ir.TextPart(text="Mid-conversation rule.")]),
        user("[echo]"),
    ])
    resp = await run(fake, req, stream=True)
    assert text_of(resp) == "system: You are terse.|Be kind.|Mid-conversation rule."
    assert [c["role"] for c in fake.log[-1]["body"]["contents"]] == ["user", "model", "user"]


def _history(signature: str | None) -> list[ir.Message]:
    call = ir.ToolCallPart(id="toolu_01A", name="get_weather", arguments='{"city": "Paris"}')
    if signature:
        call.provider_data["gemini"] = {"thoughtSignature": signature}
    return [
        user("weather in Paris?"),
        ir.Message(role="assistant", content=[
            ir.ReasoningPart(text="foreign thoughts", signature="sig-anthropic", signature_protocol="anthropic-messages"),
            ir.TextPart(text=""),  # pitfall 2: empty text beside tool calls
            call,
            ir.ToolCallPart(id="toolu_01B", name="get_time", arguments="not json"),
        ]),
        ir.Message(role="user", content=[
            ir.ToolResultPart(tool_call_id="toolu_01A", content=[ir.TextPart(text="18C and sunny")]),
            ir.ToolResultPart(tool_call_id="toolu_01B", content=[ir.TextPart(text="no clock")], is_error=True),
        ]),
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_results_from_foreign_history_on_gemini_3(fake: Any, stream: bool) -> None:
    req = ir.Request(model="m", messages=_history(None), tools=[ir.Tool(name="get_weather"), ir.Tool(name="get_time")])
    resp = await run(fake, req, stream=stream, model="gemini-3-pro-preview")
    assert text_of(resp) == "Tool said: 18C and sunny"
    body = fake.log[-1]["body"]
    model_turn = body["contents"][1]
    assert model_turn == {"role": "model", "parts": [
        {"functionCall": {"id": "toolu_01A", "name": "get_weather", "args": {"city": "Paris"}},
         "thoughtSignature": "skip_thought_signature_validator"},
        {"functionCall": {"id": "toolu_01B", "name": "get_time", "args": {"input": "not json"}}},
    ]}
    assert body["contents"][2]["parts"] == [
        {"functionResponse": {"id": "toolu_01A", "name": "get_weather", "response": {"output": "18C and sunny"}}},
        {"functionResponse": {"id": "toolu_01B", "name": "get_time", "response": {"error": "no clock"}}},
    ]


async def test_gemini_signature_round_trips_unchanged(fake: Any) -> None:
    p = GeminiProtocol()
    first = await run(fake, ir.Request(model="m", messages=[user("[tool]")], tools=[ir.Tool(name="get_weather")]),
                      stream=True, model="gemini-3-pro-preview")
    call = first.content[0]
    assert isinstance(call, ir.ToolCallPart)
    assert call.provider_data == {"gemini": {"thoughtSignature": "c2lnLWdlbWluaQ=="}}
    history = [user("[tool]"), ir.Message(role="assistant", content=first.content), ir.Message(role="user", content=[
        ir.ToolResultPart(tool_call_id=call.id, content=[ir.TextPart(text="sunny")])])]
    resp = await run(fake, ir.Request(model="m", messages=history, tools=[ir.Tool(name="get_weather")]),
                     stream=False, model="gemini-3-pro-preview")
    assert text_of(resp) == "Tool said: sunny"
    sent = fake.log[-1]["body"]["contents"][1]["parts"][0]
    assert sent["thoughtSignature"] == "c2lnLWdlbWluaQ=="
    assert p.name == "gemini"


async def test_fake_rejects_missing_signature_on_gemini_3(fake: Any) -> None:
    # the check the sentinel exists for: a hand-made body without it is refused
    body = {"contents": [
        {"role": "user", "parts": [{"text": "q"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"output": "x"}}}]},
    ]}
    status, raw, _ = await send(fake, UpstreamRequest(path="/v1beta/models/gemini-3-pro-preview:generateContent", body=orjson.dumps(body)))
    assert status == 400
    assert b"thought_signature" in raw


@pytest.mark.parametrize("tag,status,message", [
    ("[error400]", 400, "INVALID_ARGUMENT: bad request from fake"),
    ("[error500]", 500, "INTERNAL: An internal error has occurred."),
    ("[error429]", 429, "RESOURCE_EXHAUSTED: Resource has been exhausted (e.g. check quota)."),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_errors(fake: Any, tag: str, status: int, message: str, stream: bool) -> None:
    p = GeminiProtocol()
    got, body, _ = await send(fake, p.encode_request(ir.Request(model="m", messages=[user(tag)]), "gemini-2.5-flash", stream=stream))
    assert got == status
    assert p.decode_error(got, body) == message


async def test_cut_stream_ends_with_stream_error(fake: Any) -> None:
    p = GeminiProtocol()
    _, _, events = await send(fake, p.encode_request(ir.Request(model="m", messages=[user("[cut]")]), "gemini-2.5-flash", stream=True))
    assert events is not None
    assert [e.text for e in events if isinstance(e, ir.TextDelta)] == ["The answer"]
    assert isinstance(events[-1], ir.StreamError) and events[-1].kind == "upstream_failed"
    assert not any(isinstance(e, ir.MessageStop) for e in events)


async def test_wrong_or_missing_key_is_401(fake: Any) -> None:
    p = GeminiProtocol()
    ureq = p.encode_request(ir.Request(model="m", messages=[user("hi")]), "gemini-2.5-flash", stream=False)
    for key in ("wrong", None):
        status, body, _ = await send(fake, ureq, key=key)
        assert status == 401
        assert orjson.loads(body)["error"]["status"] == "UNAUTHENTICATED"


async def test_json_array_stream_without_alt(fake: Any) -> None:
    p = GeminiProtocol()
    ureq = p.encode_request(ir.Request(model="m", messages=[user("[parallel]")]), "gemini-2.5-flash", stream=True)
    status, _, events = await send(fake, UpstreamRequest(path=ureq.path, body=ureq.body, stream=True))
    assert status == 200 and events is not None
    resp = ir.collect(events)
    assert calls_of(resp) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]
    assert resp.usage == USAGE and resp.stop_reason is ir.StopReason.TOOL_USE


async def test_count_tokens(fake: Any) -> None:
    p = GeminiProtocol()
    req = ir.Request(model="m", system=[ir.TextPart(text="be brief")], messages=[user("one two three")],
                     tools=[ir.Tool(name="get_weather")])
    ureq = p.encode_count_tokens_request(req, "gemini-2.5-flash")
    assert ureq is not None and ureq.path == "/v1beta/models/gemini-2.5-flash:countTokens"
    status, body, _ = await send(fake, ureq)
    assert status == 200, body
    assert p.decode_count_tokens_response(body) == 5  # 2 system words + 3 user words
    inner = fake.log[-1]["body"]["generateContentRequest"]
    assert inner["model"] == "models/gemini-2.5-flash"
    assert inner["systemInstruction"] == {"parts": [{"text": "be brief"}]}


async def test_untranslatable_input_is_refused_before_sending(fake: Any) -> None:
    p = GeminiProtocol()
    cases = [
        (ir.ImagePart(url="https://example.com/cat.png"), "messages[0].content[1]", "does not fetch URLs"),
        (ir.ImagePart(data=base64.b64encode(b"GIF89a....").decode()), "messages[0].content[1]", "image/gif"),
        (ir.FilePart(file_id="file-abc"), "messages[0].content[1]", "file ids"),
    ]
    for part, param, words in cases:
        req = ir.Request(model="m", messages=[ir.Message(role="user", content=[ir.TextPart(text="x"), part])])
        with pytest.raises(ProxyError) as info:
            p.encode_request(req, "gemini-2.5-flash", stream=False)
        assert info.value.kind == "invalid_request" and info.value.status == 400
        assert info.value.param == param and words in info.value.message
    with pytest.raises(ProxyError) as info:
        p.encode_request(ir.Request(model="m", messages=[user("x")], n=2), "gemini-2.5-flash", stream=False)
    assert info.value.param == "n"
    orphan = ir.Request(model="m", messages=[ir.Message(role="user", content=[ir.ToolResultPart(tool_call_id="zz")])])
    with pytest.raises(ProxyError) as info:
        p.encode_request(orphan, "gemini-2.5-flash", stream=False)
    assert "function name" in info.value.message
    assert fake.log == []  # nothing reached the upstream


def _turns(*contents: dict[str, Any]) -> dict[str, Any]:
    return {"contents": list(contents)}


U_TEXT = {"role": "user", "parts": [{"text": "hi"}]}
BAD_BODIES = [
    pytest.param(_turns({"role": "assistant", "parts": [{"text": "x"}]}), "valid role", id="role"),
    pytest.param(_turns({"role": "user", "parts": []}), "must not be empty", id="empty-parts"),
    pytest.param(_turns({"role": "user", "parts": [{"text": ""}]}), "empty text", id="empty-text"),
    pytest.param(_turns({"role": "user", "parts": [{"text": "a", "inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}),
                 "exactly one", id="two-data-fields"),
    pytest.param(_turns({"role": "user", "parts": [{"inlineData": {"mimeType": "image/png", "data": "data:image/png;base64,AAAA"}}]}),
                 "Base64", id="data-url-prefix"),
    pytest.param(_turns({"role": "user", "parts": [{"inlineData": {"mimeType": "image/gif", "data": "R0lGODlh"}}]}),
                 "image/gif", id="gif"),
    pytest.param(_turns({"role": "user", "parts": [{"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/a.png"}}]}),
                 "file uri", id="web-url"),
    pytest.param(_turns(U_TEXT, {"role": "model", "parts": [{"functionCall": {"name": "f", "args": "{}"}}]}),
                 "args", id="args-string"),
    pytest.param(_turns(U_TEXT, {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                        {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": "ok"}}]}),
                 "function_response.response", id="response-string"),
    pytest.param(_turns(U_TEXT, {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}},
                                                            {"functionCall": {"name": "g", "args": {}}}]},
                        {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}),
                 "number of function response parts", id="unpaired-call"),
    pytest.param(_turns({"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}),
                 "function call turn", id="orphan-result"),
    pytest.param({**_turns(U_TEXT), "tools": [{"functionDeclarations": [{"name": "f", "parameters": {
        "type": "object", "additionalProperties": False}}]}]}, "additionalProperties", id="openapi-schema-dialect"),
    pytest.param({**_turns(U_TEXT), "tools": [{"functionDeclarations": [{"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": ["string", "null"]}}}}]}]}, "not repeating", id="type-list"),
    pytest.param({**_turns(U_TEXT), "generationConfig": {"max_tokens": 5}}, "Unknown name", id="unknown-gen-field"),
    pytest.param({**_turns(U_TEXT), "messages": []}, "Unknown name", id="unknown-top-field"),
    pytest.param({"systemInstruction": {"parts": [{"text": "s"}]}}, "contents is not specified", id="no-contents"),
]


@pytest.mark.parametrize("body,words", BAD_BODIES)
async def test_fake_rejects_what_the_real_api_rejects(fake: Any, body: dict[str, Any], words: str) -> None:
    status, raw, _ = await send(fake, UpstreamRequest(path="/v1beta/models/gemini-2.5-flash:generateContent", body=orjson.dumps(body)))
    assert status == 400
    err = orjson.loads(raw)["error"]
    assert err["code"] == 400 and err["status"] == "INVALID_ARGUMENT"
    assert words in err["message"]
    assert GeminiProtocol().decode_error(status, raw).startswith("INVALID_ARGUMENT: ")


async def test_fake_accepts_snake_case_and_query_key(fake: Any) -> None:
    body = {"contents": [{"role": "user", "parts": [{"inline_data": {"mime_type": "image/png", "data": PNG}}, {"text": "[image]"}]}],
            "generation_config": {"max_output_tokens": 9, "top_k": 20.0}}
    provider = make_provider(str(fake.make_url("")), api_key=None)
    async with aiohttp.ClientSession() as session:
        async with session.post(provider.url("/v1/models/gemini-2.5-flash:generateContent"), params={"key": "upstream-secret"},
                                data=orjson.dumps(body)) as resp:
            assert resp.status == 200
            resp_body = await resp.read()
    assert text_of(GeminiProtocol().decode_response(resp_body)) == "image: image/png"
