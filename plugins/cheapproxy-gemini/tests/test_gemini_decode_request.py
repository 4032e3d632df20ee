"""Client side, requests: realistic Gemini bodies (recorded live from the
google-genai SDK, plus the odd shapes of clients.md) decode to the expected IR."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from aiohttp import web
from google import genai
from google.genai import types

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import Inbound, Route
from cheapproxy_gemini.codec import GeminiProtocol

P = GeminiProtocol()
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000fbff")  # has bytes that need '+'/'/' in base64
BODIES = web.AppKey("gemini-test-bodies", list)


def decode(body: dict[str, Any], *, model: str = "gemini-2.5-flash", stream: bool = False, op: str = "chat") -> ir.Request:
    return P.decode_request(Inbound(model=model, stream=stream, operation=op, body=body))


@pytest.fixture
async def recorder(aiohttp_server: Any) -> Any:
    """Records what the SDK sends and answers with a minimal valid response."""
    async def handler(request: web.Request) -> web.Response:
        request.app[BODIES].append((request.path, dict(request.query), await request.json()))
        return web.json_response({"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]},
                                                  "finishReason": "STOP"}], "totalTokens": 1})

    app = web.Application()
    app[BODIES] = []
    app.router.add_post("/{version}/models/{model}:{method}", handler)
    return await aiohttp_server(app)


async def test_sdk_recorded_request_decodes(recorder: Any) -> None:
    c = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=str(recorder.make_url("")).rstrip("/")))
    tools = [types.Tool(function_declarations=[
        types.FunctionDeclaration(name="get_weather", description="Weather", parameters_json_schema={
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        types.FunctionDeclaration(name="legacy", description="OpenAPI schema", parameters=types.Schema(
            type="OBJECT", properties={"n": types.Schema(type="INTEGER", nullable=True),
                                       "tags": types.Schema(type="ARRAY", items=types.Schema(type="STRING"))})),
    ]), types.Tool(google_search=types.GoogleSearch())]
    contents = [
        types.Content(role="user", parts=[
            types.Part.from_text(text="hi"),
            types.Part.from_bytes(data=PNG, mime_type="image/png"),
            types.Part.from_uri(file_uri="https://generativelanguage.googleapis.com/v1beta/files/abc", mime_type="application/pdf"),
        ]),
        types.Content(role="model", parts=[
            types.Part(thought=True, text="hmm", thought_signature=b"sigbytes"),
            types.Part.from_function_call(name="get_weather", args={"city": "Paris"}),
        ]),
        types.Content(role="user", parts=[types.Part.from_function_response(name="get_weather", response={"output": "18C"})]),
    ]
    cfg = types.GenerateContentConfig(
        system_instruction="Be terse.", tools=tools,
        tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="ANY", allowed_function_names=["get_weather"])),
        max_output_tokens=100, temperature=0.5, top_p=0.9, top_k=20, stop_sequences=["END"], seed=7,
        response_mime_type="application/json", response_json_schema={"type": "object"},
        thinking_config=types.ThinkingConfig(thinking_budget=2048, include_thoughts=True),
        safety_settings=[types.SafetySetting(category="HARM_CATEGORY_HARASSMENT", threshold="BLOCK_NONE")],
        presence_penalty=0.5)
    await c.aio.models.generate_content(model="gemini-2.5-flash", contents=contents, config=cfg)
    path, _, body = recorder.app[BODIES][-1]
    assert path == "/v1/models/gemini-2.5-flash:generateContent"
    # the SDK's odd shapes are really there: snake_case inside camelCase objects, URL-safe base64, float topK
    decls = next(t["functionDeclarations"] for t in body["tools"] if "functionDeclarations" in t)
    assert "parameters_json_schema" in decls[0]
    assert body["contents"][0]["parts"][1]["inlineData"]["mime_type"] == "image/png"
    assert body["generationConfig"]["topK"] == 20.0
    assert body["generationConfig"]["thinkingConfig"] == {"include_thoughts": True, "thinking_budget": 2048}

    req = decode(body)
    assert req.model == "gemini-2.5-flash" and req.stream is False
    assert req.system == [ir.TextPart(text="Be terse.")]
    user0, model1, user2 = req.messages
    assert user0.role == "user" and model1.role == "assistant" and user2.role == "user"
    assert user0.content[0] == ir.TextPart(text="hi")
    assert user0.content[1] == ir.ImagePart(media_type="image/png", data=base64.b64encode(PNG).decode())  # standard alphabet
    assert user0.content[2] == ir.FilePart(media_type="application/pdf", url="https://generativelanguage.googleapis.com/v1beta/files/abc")
    thought, call = model1.content
    assert thought == ir.ReasoningPart(text="hmm", signature=base64.b64encode(b"sigbytes").decode(), signature_protocol="gemini")
    assert isinstance(call, ir.ToolCallPart) and call.name == "get_weather" and orjson.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and len(call.id) == 29
    result = user2.content[0]
    assert isinstance(result, ir.ToolResultPart)
    assert (result.tool_call_id, result.name, result.content, result.is_error) == (call.id, "get_weather", [ir.TextPart(text="18C")], False)
    # allowedFunctionNames restricts the declared tools; ANY with one name = that tool
    assert [t.name for t in req.tools] == ["get_weather"]
    assert req.tools[0].parameters == {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    assert req.tool_choice == ir.ToolChoice(mode="tool", name="get_weather")
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.stop, req.seed) == (100, 0.5, 0.9, 20, ["END"], 7)
    assert isinstance(req.top_k, int)
    assert req.response_format == ir.ResponseFormat(type="json_schema", schema={"type": "object"}, name="response")
    assert req.reasoning == ir.Reasoning(budget_tokens=2048, effort="low", include_thoughts=True)
    gem = req.provider_data["gemini"]
    assert gem["builtin_tools"] == [{"googleSearch": {}}]
    assert gem["safetySettings"] == [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    assert gem["generationConfig"] == {"presencePenalty": 0.5}


async def test_sdk_openapi_schema_and_thinking_level(recorder: Any) -> None:
    c = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=str(recorder.make_url("")).rstrip("/"), api_version="v1beta"))
    tool = types.Tool(function_declarations=[types.FunctionDeclaration(name="legacy", parameters=types.Schema(
        type="OBJECT", properties={"n": types.Schema(type="INTEGER", nullable=True),
                                   "tags": types.Schema(type="ARRAY", items=types.Schema(type="STRING"))}, required=["n"]))])
    async for _ in await c.aio.models.generate_content_stream(model="gemini-3-flash-preview", contents="hello", config=types.GenerateContentConfig(
            tools=[tool], thinking_config=types.ThinkingConfig(thinking_level="LOW"),
            response_mime_type="application/json",
            response_schema=types.Schema(type="OBJECT", properties={"a": types.Schema(type="STRING")}))):
        pass
    path, query, body = recorder.app[BODIES][-1]
    assert (path, query) == ("/v1beta/models/gemini-3-flash-preview:streamGenerateContent", {"alt": "sse"})
    req = decode(body, model="gemini-3-flash-preview", stream=True)
    assert req.stream is True
    assert req.tools[0].parameters == {"type": "object", "required": ["n"], "properties": {
        "n": {"type": ["integer", "null"]}, "tags": {"type": "array", "items": {"type": "string"}}}}
    assert req.reasoning == ir.Reasoning(effort="low", include_thoughts=False)
    assert req.response_format == ir.ResponseFormat(type="json_schema", name="response",
                                                    schema={"type": "object", "properties": {"a": {"type": "string"}}})


def test_hand_written_odd_shapes() -> None:
    body = {
        "system_instruction": "You are terse.",  # a bare string, snake_case key
        "contents": [
            {"parts": [{"text": "Weather in Paris and Rome?"}]},  # role omitted = user
            {"role": "model", "parts": [
                {"function_call": {"name": "get_weather", "args": {"city": "Paris"}}, "thought_signature": "c2ln"},
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                {"functionCall": {"id": "fc-7", "name": "lookup"}},
            ]},
            {"role": "function", "parts": [  # the very old spelling of a tool-result turn
                {"functionResponse": {"name": "get_weather", "response": {"result": {"temp": 18}}}},
                {"function_response": {"name": "get_weather", "response": {"error": "Rome unavailable"}}},
                {"functionResponse": {"id": "fc-7", "name": "lookup", "response": {"a": 1, "b": [2]}}},
            ]},
            {"role": "user", "parts": [{"inline_data": {"mime_type": "application/pdf", "data": "JVBERi0x"}}, {"videoMetadata": {}}]},
        ],
        "tool_config": {"function_calling_config": {"mode": "NONE"}},
        "generation_config": {"max_output_tokens": 5, "candidate_count": 1,
                              "thinking_config": {"thinking_budget": 0}, "response_mime_type": "application/json"},
        "cached_content": "cachedContents/xyz",
    }
    req = decode(body)
    assert req.system == [ir.TextPart(text="You are terse.")]
    calls = [p for p in req.messages[1].content if isinstance(p, ir.ToolCallPart)]
    assert calls[0].provider_data == {"gemini": {"thoughtSignature": "c2ln"}}
    assert calls[1].provider_data == {}
    assert calls[2].id == "fc-7" and calls[2].arguments == "{}"
    results = req.messages[2].content
    assert req.messages[2].role == "user"
    # results without ids pair with the calls of the same name, in order
    assert [(r.tool_call_id, r.name, r.content[0].text, r.is_error) for r in results] == [
        (calls[0].id, "get_weather", '{"temp":18}', False),
        (calls[1].id, "get_weather", "Rome unavailable", True),
        ("fc-7", "lookup", '{"a":1,"b":[2]}', False),
    ]
    assert req.messages[3].content == [ir.FilePart(media_type="application/pdf", data="JVBERi0x")]
    assert req.tool_choice == ir.ToolChoice(mode="none")
    assert (req.max_tokens, req.n) == (5, 1)
    assert req.reasoning == ir.Reasoning(enabled=False, effort="none", budget_tokens=0, include_thoughts=False)
    assert req.response_format == ir.ResponseFormat(type="json_object")
    assert req.provider_data == {"gemini": {"cachedContent": "cachedContents/xyz"}}


@pytest.mark.parametrize("tc,want", [
    ({"thinkingBudget": -1, "includeThoughts": True}, ir.Reasoning(adaptive=True, include_thoughts=True)),
    ({"thinkingBudget": 500}, ir.Reasoning(budget_tokens=500, effort="minimal", include_thoughts=False)),
    ({"thinkingBudget": 4096}, ir.Reasoning(budget_tokens=4096, effort="medium", include_thoughts=False)),
    ({"thinkingBudget": 24576}, ir.Reasoning(budget_tokens=24576, effort="high", include_thoughts=False)),
    ({"thinkingBudget": 32768}, ir.Reasoning(budget_tokens=32768, effort="xhigh", include_thoughts=False)),
    ({"thinkingLevel": "HIGH", "includeThoughts": True}, ir.Reasoning(effort="high", include_thoughts=True)),
    ({"includeThoughts": True}, ir.Reasoning(include_thoughts=True)),
])
def test_thinking_config_variants(tc: dict[str, Any], want: ir.Reasoning) -> None:
    req = decode({"contents": [{"role": "user", "parts": [{"text": "x"}]}], "generationConfig": {"thinkingConfig": tc}})
    assert req.reasoning == want


def test_tool_config_modes() -> None:
    tools = [{"functionDeclarations": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}]
    base = {"contents": [{"role": "user", "parts": [{"text": "x"}]}], "tools": tools}
    any_two = decode({**base, "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["a", "b"]}}})
    assert any_two.tool_choice == ir.ToolChoice(mode="required") and [t.name for t in any_two.tools] == ["a", "b"]
    auto = decode({**base, "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}}})
    assert auto.tool_choice == ir.ToolChoice(mode="auto") and len(auto.tools) == 3
    assert auto.tools[0].parameters == {"type": "object", "properties": {}}


def test_count_tokens_bodies() -> None:
    plain = decode({"contents": [{"parts": [{"text": "a b"}]}]}, op="count_tokens")
    assert plain.messages[0].content == [ir.TextPart(text="a b")]
    wrapped = decode({"generateContentRequest": {"model": "models/gemini-2.5-flash", "contents": [{"parts": [{"text": "c"}]}],
                                                 "systemInstruction": {"parts": [{"text": "s"}]}}}, op="count_tokens")
    assert wrapped.system == [ir.TextPart(text="s")] and wrapped.messages[0].content == [ir.TextPart(text="c")]
    with pytest.raises(ProxyError) as info:
        decode({"contents": [], "generateContentRequest": {"contents": []}}, op="count_tokens")
    assert info.value.param == "generateContentRequest"


@pytest.mark.parametrize("body,param", [
    ({}, "contents"),
    ({"contents": []}, "contents"),
    ({"contents": {"role": "user"}}, "contents"),
    ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "contents[0].role"),
    ({"contents": [{"role": "user", "parts": [{"text": 5}]}]}, "contents[0].parts[0].text"),
    ({"contents": [{"role": "user", "parts": ["hi"]}]}, "contents[0].parts[0]"),
    ({"contents": [{"role": "user", "parts": [{"inlineData": {"data": "AAAA"}}]}]}, "contents[0].parts[0].inlineData.mimeType"),
    ({"contents": [{"role": "model", "parts": [{"functionCall": {"name": "f", "args": [1]}}]}]}, "contents[0].parts[0].functionCall.args"),
    ({"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "f", "response": "18C"}}]}]},
     "contents[0].parts[0].functionResponse.response"),
    ({"contents": [], "generationConfig": {"temperature": "hot"}}, "generationConfig.temperature"),
    ({"contents": [], "generationConfig": {"stopSequences": "END"}}, "generationConfig.stopSequences"),
    ({"contents": [], "tools": [{"functionDeclarations": [{"description": "no name"}]}]}, "tools[0].functionDeclarations[0].name"),
])
def test_malformed_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyError) as info:
        decode(body)
    assert info.value.kind == "invalid_request" and info.value.status == 400
    assert info.value.param == param
    status, raw = P.encode_error(info.value)
    assert status == 400 and orjson.loads(raw)["error"]["status"] == "INVALID_ARGUMENT"


def test_routes_and_inspect() -> None:
    routes = P.routes()
    assert {(r.method, r.path, r.operation) for r in routes} == {
        ("POST", f"/{v}/models/{{model}}:{m}", op)
        for v in ("v1beta", "v1")
        for m, op in (("generateContent", "chat"), ("streamGenerateContent", "chat"), ("countTokens", "count_tokens"))
    }
    stream_route = next(r for r in routes if r.path == "/v1/models/{model}:streamGenerateContent")
    assert P.inspect(stream_route, {}, {"model": "gemini-2.5-flash"}, {"alt": "sse"}) == ("gemini-2.5-flash", True)
    plain = Route(method="POST", path="/v1beta/models/{model}:generateContent", operation="chat")
    assert P.inspect(plain, {}, {"model": "models/my-model"}, {}) == ("my-model", False)
    with pytest.raises(ProxyError) as info:
        P.inspect(plain, {}, {}, {})
    assert info.value.param == "model"
