"""Exact wire output: client-side response/stream/error encoding, upstream
request bodies, the provider type and the plugin registration."""

from __future__ import annotations

from decimal import Decimal
from importlib.metadata import entry_points
from typing import Any

import orjson
import pluggy
import pytest

import cheapproxy_gemini
from cheapproxy import hookspecs, ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext, Inbound
from cheapproxy_gemini.codec import GeminiProtocol
from cheapproxy_gemini.provider import GeminiProvider
from gemini_helpers import encode_stream, make_provider

P = GeminiProtocol()
CTX = EncodeContext(model="client-model", request_id="req-1", created=0)


def body_of(request: ir.Request, model: str = "gemini-2.5-flash") -> dict[str, Any]:
    return orjson.loads(P.encode_request(request, model, stream=False).body)


def user(text: str) -> ir.Message:
    return ir.Message(role="user", content=[ir.TextPart(text=text)])


# ---------------------------------------------------------------- client side


SIMPLE = [
    ir.PartStart(index=0, part=ir.TextPart(text="")),
    ir.TextDelta(index=0, text="Hi"),
    ir.TextDelta(index=0, text=""),
    ir.TextDelta(index=0, text=" there"),
    ir.PartStop(index=0),
    ir.MessageStop(stop_reason=ir.StopReason.END_TURN, usage=ir.Usage(input_tokens=3, output_tokens=2)),
    ir.TextDelta(index=0, text="after the end"),
    ir.MessageStop(stop_reason=ir.StopReason.END_TURN),
]


def test_sse_stream_bytes_exact() -> None:
    chunk = '{"candidates":[{"content":{"parts":[%s],"role":"model"}%s,"index":0}]%s,"modelVersion":"client-model","responseId":"req-1"}'
    assert encode_stream(SIMPLE) == b"".join(
        b"data: " + (c).encode() + b"\r\n\r\n" for c in [
            chunk % ('{"text":"Hi"}', "", ""),
            chunk % ('{"text":" there"}', "", ""),
            chunk % ('{"text":""}', ',"finishReason":"STOP"',
                     ',"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"totalTokenCount":5}'),
        ])


def test_json_array_stream_bytes_exact() -> None:
    out = encode_stream(SIMPLE, sse=False)
    assert out.startswith(b'[{"candidates"') and out.endswith(b'"responseId":"req-1"}]')
    assert out.count(b",\r\n{") == 2
    assert [c["candidates"][0]["content"]["parts"][0]["text"] for c in orjson.loads(out)] == ["Hi", " there", ""]


def test_encoder_content_types_and_nothing_after_terminal() -> None:
    inb = Inbound(model="m", stream=True, operation="chat", body={}, query={"alt": "sse"})
    enc = P.stream_encoder(EncodeContext(model="m", request_id="r", created=0, inbound=inb))
    assert enc.content_type.startswith("text/event-stream") and enc.start() == b""
    enc2 = P.stream_encoder(EncodeContext(model="m", request_id="r", created=0,
                                          inbound=Inbound(model="m", stream=True, operation="chat", body={})))
    assert enc2.content_type.startswith("application/json") and enc2.start() == b"[" and enc2.close() == b"]"
    assert enc.encode(ir.MessageStop(stop_reason=ir.StopReason.END_TURN)) != b""
    assert enc.encode(ir.TextDelta(index=0, text="x")) == b""
    assert enc.error(ProxyError("internal", "late")) == b""


def test_error_event_ends_the_stream() -> None:
    inb = Inbound(model="m", stream=True, operation="chat", body={})
    enc = P.stream_encoder(EncodeContext(model="m", request_id="r", created=0, inbound=inb))
    out = enc.start() + enc.encode(ir.TextDelta(index=0, text="a")) + enc.error(ProxyError("upstream_overloaded", "busy"))
    out += enc.encode(ir.TextDelta(index=0, text="b")) + enc.close()
    chunks = orjson.loads(out)
    assert chunks[-1] == {"error": {"code": 503, "message": "busy", "status": "UNAVAILABLE"}}
    assert len(chunks) == 2


def test_foreign_signatures_are_not_sent_to_gemini_clients() -> None:
    events = [
        ir.PartStart(index=0, part=ir.ReasoningPart()),
        ir.ReasoningDelta(index=0, text="thinking"),
        ir.ReasoningDelta(index=0, signature="sig-anthropic", signature_protocol="anthropic-messages"),
        ir.PartStop(index=0),
        ir.MessageStop(stop_reason=ir.StopReason.END_TURN),
    ]
    out = encode_stream(events)
    assert b"sig-anthropic" not in out and out.count(b"data: ") == 2
    assert b'{"text":"thinking","thought":true}' in out


@pytest.mark.parametrize("stop,finish", [
    (ir.StopReason.END_TURN, "STOP"), (ir.StopReason.STOP_SEQUENCE, "STOP"), (ir.StopReason.TOOL_USE, "STOP"),
    (ir.StopReason.PAUSE, "STOP"), (ir.StopReason.MAX_TOKENS, "MAX_TOKENS"), (ir.StopReason.CONTEXT_LIMIT, "MAX_TOKENS"),
    (ir.StopReason.CONTENT_FILTER, "SAFETY"), (ir.StopReason.ERROR, "OTHER"),
])
def test_encode_response_finish_reasons(stop: ir.StopReason, finish: str) -> None:
    resp = ir.Response(id="r1", model="up", content=[ir.TextPart(text="x")], stop_reason=stop)
    assert orjson.loads(P.encode_response(resp, CTX))["candidates"][0]["finishReason"] == finish


def test_encode_response_parts_and_usage() -> None:
    resp = ir.Response(id="r1", model="up", stop_reason=ir.StopReason.TOOL_USE, content=[
        ir.ReasoningPart(text="hm", signature="abc=", signature_protocol="gemini"),
        ir.ReasoningPart(text="", redacted="opaque"),
        ir.TextPart(text="Calling.", provider_data={"gemini": {"thoughtSignature": "t1"}, "other": {"x": 1}}),
        ir.ToolCallPart(id="toolu_9", name="run", arguments='{"cmd": "ls"}'),
        ir.ToolCallPart(id="ct_1", name="apply_patch", arguments="*** Begin Patch", kind="custom"),
        ir.ImagePart(media_type="image/png", data="iVBOR"),
    ], usage=ir.Usage(input_tokens=10, cache_read_tokens=5, cache_write_tokens=2, output_tokens=7, reasoning_tokens=3))
    body = orjson.loads(P.encode_response(resp, CTX))
    assert body == {
        "candidates": [{"content": {"parts": [
            {"text": "hm", "thought": True, "thoughtSignature": "abc="},
            {"text": "Calling.", "thoughtSignature": "t1"},
            {"functionCall": {"id": "toolu_9", "name": "run", "args": {"cmd": "ls"}}},
            {"functionCall": {"id": "ct_1", "name": "apply_patch", "args": {"input": "*** Begin Patch"}}},
            {"inlineData": {"mimeType": "image/png", "data": "iVBOR"}},
        ], "role": "model"}, "finishReason": "STOP", "index": 0}],
        # cache writes count as ordinary prompt tokens: Gemini has no such field
        "usageMetadata": {"promptTokenCount": 17, "candidatesTokenCount": 4, "cachedContentTokenCount": 5,
                          "thoughtsTokenCount": 3, "totalTokenCount": 24},
        "modelVersion": "client-model", "responseId": "r1",
    }


def test_count_tokens_and_errors_shape() -> None:
    assert P.encode_count_tokens(17, CTX) == b'{"totalTokens":17}'
    status, raw = P.encode_error(ProxyError("invalid_request", "tools[0] is bad", param="tools[0]"))
    assert (status, orjson.loads(raw)) == (400, {"error": {"code": 400, "message": "tools[0] is bad", "status": "INVALID_ARGUMENT"}})
    assert P.encode_error(ProxyError("upstream_overloaded", "x"))[0] == 503
    assert P.encode_error(ProxyError("rate_limited", "x", status=418))[1] == \
        b'{"error":{"code":418,"message":"x","status":"INVALID_ARGUMENT"}}'


# ---------------------------------------------------------------- upstream requests


@pytest.mark.parametrize("reasoning,model,want", [
    (ir.Reasoning(effort="low"), "gemini-2.5-flash", {"thinkingBudget": 1024, "includeThoughts": True}),
    (ir.Reasoning(effort="medium", include_thoughts=False), "gemini-2.5-pro", {"thinkingBudget": 4096}),
    (ir.Reasoning(effort="max"), "gemini-2.5-pro", {"thinkingBudget": 32768, "includeThoughts": True}),
    (ir.Reasoning(effort="xhigh"), "gemini-2.5-flash", {"thinkingBudget": 24576, "includeThoughts": True}),
    (ir.Reasoning(budget_tokens=200), "gemini-2.5-flash-lite", {"thinkingBudget": 512, "includeThoughts": True}),
    (ir.Reasoning(budget_tokens=64), "gemini-2.5-pro", {"thinkingBudget": 128, "includeThoughts": True}),
    (ir.Reasoning(budget_tokens=50000), "some-future-model", {"thinkingBudget": 50000, "includeThoughts": True}),
    (ir.Reasoning(effort="minimal"), "gemini-3-flash-preview", {"thinkingLevel": "MINIMAL", "includeThoughts": True}),
    (ir.Reasoning(effort="xhigh"), "models/gemini-3-pro-preview", {"thinkingLevel": "HIGH", "includeThoughts": True}),
    (ir.Reasoning(budget_tokens=3000, effort="low"), "gemini-3-pro-preview", {"thinkingBudget": 3000, "includeThoughts": True}),
    (ir.Reasoning(adaptive=True, effort="high"), "gemini-2.5-flash", {"thinkingBudget": 16384, "includeThoughts": True}),
    (ir.Reasoning(adaptive=True), "gemini-2.5-flash", {"thinkingBudget": -1, "includeThoughts": True}),
    (ir.Reasoning(adaptive=True, include_thoughts=False), "gemini-3-pro-preview", None),
    (ir.Reasoning(enabled=False), "gemini-2.5-flash", {"thinkingBudget": 0}),
    (ir.Reasoning(effort="none"), "gemini-2.5-flash", {"thinkingBudget": 0}),
])
def test_thinking_config(reasoning: ir.Reasoning, model: str, want: dict[str, Any] | None) -> None:
    gc = body_of(ir.Request(model="m", messages=[user("x")], reasoning=reasoning), model).get("generationConfig", {})
    assert gc.get("thinkingConfig") == want


@pytest.mark.parametrize("choice,want", [
    (ir.ToolChoice(mode="auto"), {"mode": "AUTO"}),
    (ir.ToolChoice(mode="none"), {"mode": "NONE"}),
    (ir.ToolChoice(mode="required", parallel=False), {"mode": "ANY"}),
    (ir.ToolChoice(mode="tool", name="b"), {"mode": "ANY", "allowedFunctionNames": ["b"]}),
])
def test_tool_choice(choice: ir.ToolChoice, want: dict[str, Any]) -> None:
    req = ir.Request(model="m", messages=[user("x")], tools=[ir.Tool(name="a"), ir.Tool(name="b")], tool_choice=choice)
    assert body_of(req)["toolConfig"] == {"functionCallingConfig": want}


def test_full_request_body() -> None:
    req = ir.Request(
        model="m",
        system=[ir.TextPart(text="S1")],
        messages=[
            user("one"), user("two"),  # consecutive user turns merge into one
            ir.Message(role="assistant", content=[
                ir.ReasoningPart(text="mine", signature="gsig", signature_protocol="gemini"),
                ir.TextPart(text="let me run it"),
                ir.ToolCallPart(id="c1", name="apply_patch", arguments="raw patch text", kind="custom"),
            ]),
            ir.Message(role="system", content=[ir.TextPart(text="S2")]),
            ir.Message(role="user", content=[
                ir.ToolResultPart(tool_call_id="c1", content=[
                    ir.TextPart(text="done"), ir.TextPart(text="ok"), ir.ImagePart(media_type="image/png", data="AAAA")]),
                ir.TextPart(text="thanks"),
            ]),
            ir.Message(role="assistant", content=[ir.ReasoningPart(text="foreign", signature="x", signature_protocol="openai-responses")]),
            user("three"),
        ],
        tools=[ir.Tool(name="apply_patch", kind="custom", description="Patch files"),
               ir.Tool(name="f", parameters={"type": "object", "properties": {"q": {"type": "string"}}})],
        max_tokens=50, temperature=0.3, top_p=0.8, top_k=4, stop=["###"], seed=11, n=1, user="u-1",
        response_format=ir.ResponseFormat(type="json_object"),
        provider_data={"gemini": {"safetySettings": [{"category": "C", "threshold": "T"}],
                                  "builtin_tools": [{"codeExecution": {}}],
                                  "generationConfig": {"presencePenalty": 0.1}},
                       "anthropic-messages": {"metadata": {"user_id": "x"}}},
    )
    body = body_of(req)
    assert body == {
        "contents": [
            {"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
            {"role": "model", "parts": [
                {"text": "mine", "thought": True, "thoughtSignature": "gsig"},
                {"text": "let me run it"},
                {"functionCall": {"id": "c1", "name": "apply_patch", "args": {"input": "raw patch text"}},
                 "thoughtSignature": "skip_thought_signature_validator"},
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"id": "c1", "name": "apply_patch", "response": {"output": "done\nok"}}},
                {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
                {"text": "thanks"},
                {"text": "three"},  # the assistant turn holding only foreign reasoning is dropped
            ]},
        ],
        "systemInstruction": {"parts": [{"text": "S1"}, {"text": "S2"}]},
        "tools": [
            {"functionDeclarations": [
                {"name": "apply_patch", "description": "Patch files", "parametersJsonSchema": {
                    "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}},
                {"name": "f", "parametersJsonSchema": {"type": "object", "properties": {"q": {"type": "string"}}}},
            ]},
            {"codeExecution": {}},
        ],
        "generationConfig": {"maxOutputTokens": 50, "temperature": 0.3, "topP": 0.8, "topK": 4, "stopSequences": ["###"],
                             "seed": 11, "responseMimeType": "application/json", "presencePenalty": 0.1},
        "safetySettings": [{"category": "C", "threshold": "T"}],
    }


def test_stream_request_uses_sse_and_root_relative_path() -> None:
    ureq = P.encode_request(ir.Request(model="m", messages=[user("x")]), "models/gemini-2.5-flash", stream=True)
    assert (ureq.path, ureq.query, ureq.stream) == ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", {"alt": "sse"}, True)
    assert ureq.headers == {}  # credentials come from the provider, never the codec
    with pytest.raises(ProxyError) as info:
        P.encode_request(ir.Request(model="m", messages=[ir.Message(role="system", content=[ir.TextPart(text="s")])]),
                         "gemini-2.5-flash", stream=False)
    assert info.value.param == "messages"


def test_data_url_must_be_base64() -> None:
    req = ir.Request(model="m", messages=[ir.Message(role="user", content=[ir.ImagePart(url="data:image/png,rawtext")])])
    with pytest.raises(ProxyError) as info:
        P.encode_request(req, "gemini-2.5-flash", stream=False)
    assert info.value.param == "messages[0].content[0]"


def test_decode_response_error_body_and_count_errors() -> None:
    with pytest.raises(ProxyError) as info:
        P.decode_response(b'{"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}')
    assert info.value.message == "INTERNAL: boom" and info.value.status == 500
    with pytest.raises(ProxyError):
        P.decode_response(b"<html>")
    assert P.decode_count_tokens_response(b"{}") == 0
    with pytest.raises(ProxyError):
        P.decode_count_tokens_response(b'{"error": {"code": 400}}')
    assert P.decode_error(400, b'[{"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}]') == "INVALID_ARGUMENT: bad"
    assert P.decode_error(502, b"<html>bad gateway</html>") == "<html>bad gateway</html>"
    bad_key = (b'{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT",'
               b' "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}}')
    assert "configured for this Gemini upstream" in P.decode_error(400, bad_key)


# ---------------------------------------------------------------- provider and plugin


def test_provider_type() -> None:
    assert (GeminiProvider.name, GeminiProvider.protocol, GeminiProvider.env_key) == ("gemini", "gemini", "GEMINI_API_KEY")
    assert GeminiProvider.default_base_url == "https://generativelanguage.googleapis.com"
    assert GeminiProvider.operations == frozenset({"chat", "count_tokens"})
    prov = make_provider("https://gateway.example/root/")
    assert prov.auth_headers() == {"x-goog-api-key": "upstream-secret"}
    assert prov.url("/v1beta/models/g:generateContent") == "https://gateway.example/root/v1beta/models/g:generateContent"
    assert make_provider("https://x", api_key=None).auth_headers() == {}
    assert prov.auth_query() == {}  # the key never goes in a URL (it would end up in logs)
    models = GeminiProvider.default_models("gemini-env")
    assert {m.name for m in models} >= {"gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite"}
    flash = next(m for m in models if m.name == "gemini-2.5-flash")
    assert flash.upstream == "gemini-env" and flash.price.scheme == "per_token"
    assert flash.price.options == {"input": Decimal("0.30"), "output": Decimal("2.50"),
                                   "cache_write": Decimal("0.30"), "cache_read": Decimal("0.03")}
    for m in models:
        assert all(isinstance(v, Decimal) and v > 0 for v in m.price.options.values())
        assert m.price.options["cache_read"] < m.price.options["input"] < m.price.options["output"]


def test_plugin_registers_through_the_entry_point_group() -> None:
    eps = [ep for ep in entry_points(group="cheapproxy") if ep.name == "gemini"]
    assert len(eps) == 1 and eps[0].value == "cheapproxy_gemini"
    pm = pluggy.PluginManager("cheapproxy")
    pm.add_hookspecs(hookspecs)
    pm.register(eps[0].load(), name="gemini")
    pm.check_pending()
    protocols: list[Any] = []
    providers: list[type] = []
    pm.hook.register_protocols(register=protocols.append)
    pm.hook.register_provider_types(register=providers.append)
    assert [p.name for p in protocols] == ["gemini"] and isinstance(protocols[0], GeminiProtocol)
    assert providers == [GeminiProvider]
    assert eps[0].load() is cheapproxy_gemini
