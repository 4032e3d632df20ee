"""Encoders in detail: IR -> upstream request, IR events -> client SSE, errors,
and the provider type / plugin registration."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pluggy
import pytest

import cheapproxy_openai_responses
from cheapproxy import ir
from cheapproxy.config import UpstreamConfig
from cheapproxy.errors import ProxyError
from cheapproxy_openai_responses.codec import ResponsesProtocol
from cheapproxy_openai_responses.provider import OpenAIResponsesProvider
from cheapproxy_openai_responses.request_encode import budget_to_effort

from responses_testlib import PROTO, ctx, encode_stream, frames, user

P = "openai-responses"


def body_of(req: ir.Request, stream: bool = False) -> dict[str, Any]:
    ureq = PROTO.encode_request(req, "gpt-up", stream=stream)
    assert ureq.path == "/responses" and ureq.stream is stream
    return orjson.loads(ureq.body)


# ---------------------------------------------------------------- encode_request


def test_system_prompts_and_mid_conversation_system() -> None:
    req = ir.Request(model="m", system=[ir.TextPart(text="A"), ir.TextPart(text="B")],
                     messages=[user("hi"), ir.Message(role="system", content=[ir.TextPart(text="late note")]),
                               ir.Message(role="assistant", content=[ir.TextPart(text=""), ir.TextPart(text="ok")])])
    body = body_of(req)
    assert body["instructions"] == "A\n\nB"
    assert body["input"] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "late note"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
    ]
    assert "tools" not in body and "reasoning" not in body and "include" not in body
    assert body["store"] is False and body["stream"] is False


def test_images_files_and_tool_result_with_image() -> None:
    req = ir.Request(model="m", messages=[
        ir.Message(role="user", content=[
            ir.ImagePart(media_type="image/webp", data="AAAA", detail="low"),
            ir.ImagePart(url="https://x/y.png"),
            ir.FilePart(media_type="application/pdf", data="JVBE"),
            ir.FilePart(url="https://x/doc.pdf"),
            ir.FilePart(file_id="file-1"),
            ir.FilePart(file_id="file-2", provider_data={P: {"kind": "image", "detail": "high"}})]),
        ir.Message(role="assistant", content=[ir.ToolCallPart(id="c1", name="shot", arguments="")]),
        ir.Message(role="user", content=[
            ir.ToolResultPart(tool_call_id="c1", content=[ir.TextPart(text="see"), ir.ImagePart(url="https://x/s.png")]),
            ir.TextPart(text="after")]),
    ])
    items = body_of(req)["input"]
    assert items[0]["content"] == [
        {"type": "input_image", "image_url": "data:image/webp;base64,AAAA", "detail": "low"},
        {"type": "input_image", "image_url": "https://x/y.png", "detail": "auto"},
        {"type": "input_file", "filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBE"},
        {"type": "input_file", "file_url": "https://x/doc.pdf"},
        {"type": "input_file", "file_id": "file-1"},
        {"type": "input_image", "file_id": "file-2", "detail": "high"},
    ]
    assert items[1] == {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"}
    assert items[2] == {"type": "function_call_output", "call_id": "c1", "output": [
        {"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": "https://x/s.png", "detail": "auto"}]}
    assert items[3] == {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "after"}]}


@pytest.mark.parametrize(("choice", "wire", "parallel"), [
    (ir.ToolChoice(mode="auto"), "auto", None),
    (ir.ToolChoice(mode="none"), "none", None),
    (ir.ToolChoice(mode="required", parallel=False), "required", False),
    (ir.ToolChoice(mode="tool", name="f"), {"type": "function", "name": "f"}, None),
    (ir.ToolChoice(mode="tool", name="patch"), {"type": "custom", "name": "patch"}, None),
])
def test_tool_choice(choice: ir.ToolChoice, wire: Any, parallel: bool | None) -> None:
    req = ir.Request(model="m", messages=[user("x")], tool_choice=choice,
                     tools=[ir.Tool(name="f", strict=True), ir.Tool(name="patch", kind="custom")])
    body = body_of(req)
    assert body["tool_choice"] == wire
    assert body.get("parallel_tool_calls") == parallel
    assert body["tools"][0]["strict"] is True


@pytest.mark.parametrize(("reasoning", "wire", "include"), [
    (ir.Reasoning(effort="high"), {"effort": "high", "summary": "auto"}, True),
    (ir.Reasoning(budget_tokens=2048, include_thoughts=False), {"effort": "low"}, True),
    (ir.Reasoning(adaptive=True), {"summary": "auto"}, True),
    (ir.Reasoning(enabled=False), None, False),
    (ir.Reasoning(enabled=False, effort="none"), {"effort": "none"}, False),
])
def test_reasoning(reasoning: ir.Reasoning, wire: Any, include: bool) -> None:
    body = body_of(ir.Request(model="m", messages=[user("x")], reasoning=reasoning))
    assert body.get("reasoning") == wire
    assert ("include" in body) is include


@pytest.mark.parametrize(("budget", "effort"), [(0, "minimal"), (1023, "minimal"), (1024, "low"), (4095, "low"),
                                                 (4096, "medium"), (16384, "high"), (32768, "xhigh"),
                                                 (64000, "max"), (100000, "max")])
def test_budget_to_effort(budget: int, effort: str) -> None:
    assert budget_to_effort(budget) == effort


def test_response_format_and_sampling() -> None:
    req = ir.Request(model="m", messages=[user("x")], max_tokens=99, temperature=0.5, top_p=0.8, top_k=40, seed=1,
                     user="u1", response_format=ir.ResponseFormat(type="json_schema", schema={"type": "object"}))
    body = body_of(req, stream=True)
    assert body["text"] == {"format": {"type": "json_schema", "name": "response", "schema": {"type": "object"}}}
    assert (body["max_output_tokens"], body["temperature"], body["top_p"], body["user"]) == (99, 0.5, 0.8, "u1")
    assert "top_k" not in body and "seed" not in body and body["stream"] is True
    body = body_of(ir.Request(model="m", messages=[user("x")], response_format=ir.ResponseFormat(type="json_object")))
    assert body["text"] == {"format": {"type": "json_object"}}


def test_image_without_source_is_refused() -> None:
    with pytest.raises(ProxyError) as info:
        body_of(ir.Request(model="m", messages=[ir.Message(role="user", content=[ir.ImagePart()])]))
    assert info.value.param == "messages[0].content[0]"


# ---------------------------------------------------------------- client stream encoder


def test_stream_without_message_start_still_has_the_envelope() -> None:
    events = [ir.PartStart(index=0, part=ir.TextPart(text="")), ir.TextDelta(index=0, text="hi"),
              ir.PartStop(index=0), ir.MessageStop(stop_reason=ir.StopReason.END_TURN,
                                                   usage=ir.Usage(input_tokens=1, output_tokens=1))]
    fr = frames(encode_stream(events, ctx()))
    assert [d["type"] for _, d in fr] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert fr[0][1]["response"]["id"] == fr[-1][1]["response"]["id"] == "resp_req0123abcd"
    assert fr[0][1]["response"]["status"] == "in_progress" and fr[0][1]["response"]["output"] == []
    assert fr[2][1]["item"] == {"id": "msg_req0123abcd_0", "type": "message", "status": "in_progress",
                                "role": "assistant", "content": []}


def test_stream_closed_without_message_stop_is_finished_by_close() -> None:
    enc = PROTO.stream_encoder(ctx())
    out = enc.encode(ir.PartStart(index=0, part=ir.ToolCallPart(id="c", name="f", arguments="")))
    out += enc.encode(ir.ToolCallDelta(index=0, arguments='{"a":1}'))
    out += enc.close()
    assert enc.close() == b""
    fr = frames(out)
    assert fr[-1][1]["type"] == "response.completed"
    assert fr[-1][1]["response"]["output"] == [{"id": "fc_req0123abcd_0", "type": "function_call",
                                                "status": "completed", "call_id": "c", "name": "f",
                                                "arguments": '{"a":1}'}]


def test_custom_tool_streams_raw_input_and_namespace_is_split() -> None:
    req = ir.Request(model="m", tools=[ir.Tool(name="apply_patch", kind="custom"),
                                       ir.Tool(name="mcp__fs__read", provider_data={P: {"namespace": "mcp__fs__",
                                                                                        "name": "read"}})])
    events = [ir.MessageStart(id="u", model="u"),
              ir.PartStart(index=0, part=ir.ToolCallPart(id="c1", name="apply_patch", arguments="", kind="custom")),
              ir.ToolCallDelta(index=0, arguments="*** Begin"), ir.ToolCallDelta(index=0, arguments=" Patch"),
              ir.PartStop(index=0),
              ir.PartStart(index=1, part=ir.ToolCallPart(id="c2", name="mcp__fs__read", arguments="")),
              ir.ToolCallDelta(index=1, arguments='{"path":"a"}'), ir.PartStop(index=1),
              ir.MessageStop(stop_reason=ir.StopReason.TOOL_USE)]
    fr = [d for _, d in frames(encode_stream(events, ctx(req)))]
    custom = [d for d in fr if d["type"].startswith("response.custom_tool_call_input")]
    assert [(d["type"], d.get("delta"), d.get("input")) for d in custom] == [
        ("response.custom_tool_call_input.delta", "*** Begin", None),
        ("response.custom_tool_call_input.delta", " Patch", None),
        ("response.custom_tool_call_input.done", None, "*** Begin Patch")]
    out = fr[-1]["response"]["output"]
    assert out[0] == {"id": "ctc_req0123abcd_0", "type": "custom_tool_call", "status": "completed",
                      "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch"}
    assert (out[1]["name"], out[1]["namespace"], out[1]["arguments"]) == ("read", "mcp__fs__", '{"path":"a"}')
    done = [d for d in fr if d["type"] == "response.function_call_arguments.done"][0]
    assert done["name"] == "read" and done["arguments"] == '{"path":"a"}'


def test_reasoning_summary_events_and_foreign_signature() -> None:
    events = [ir.PartStart(index=0, part=ir.ReasoningPart()), ir.ReasoningDelta(index=0, text="Let me "),
              ir.ReasoningDelta(index=0, text="think."),
              ir.ReasoningDelta(index=0, signature="sig-a", signature_protocol="anthropic-messages"),
              ir.PartStop(index=0), ir.MessageStop(stop_reason=ir.StopReason.END_TURN)]
    fr = [d for _, d in frames(encode_stream(events, ctx()))]
    types = [d["type"] for d in fr]
    assert types[2:9] == ["response.output_item.added", "response.reasoning_summary_part.added",
                          "response.reasoning_summary_text.delta", "response.reasoning_summary_text.delta",
                          "response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
                          "response.output_item.done"]
    item = fr[8]["item"]
    assert item["summary"] == [{"type": "summary_text", "text": "Let me think."}]
    assert item["encrypted_content"].startswith("cpx1:")
    # our own signature is passed as it is
    events[3] = ir.ReasoningDelta(index=0, signature="enc-own", signature_protocol=P)
    fr = [d for _, d in frames(encode_stream(events, ctx()))]
    assert fr[8]["item"]["encrypted_content"] == "enc-own"


def test_stop_error_becomes_response_failed_and_nothing_follows() -> None:
    enc = ResponsesProtocol().stream_encoder(ctx())
    out = enc.encode(ir.MessageStart(id="u", model="u"))
    out += enc.encode(ir.StreamError(message="overloaded upstream", kind="upstream_overloaded", status=529))
    assert enc.encode(ir.PartStart(index=0, part=ir.TextPart(text=""))) == b""
    assert enc.error(ProxyError("internal", "again")) == b"" and enc.close() == b""
    fr = [d for _, d in frames(out)]
    assert [d["type"] for d in fr] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert fr[2]["error"] == {"type": "service_unavailable", "code": "server_is_overloaded",
                              "message": "overloaded upstream", "param": None}
    assert fr[3]["response"]["status"] == "failed"


def test_encode_error_overloaded_is_503_and_codes_pass_through() -> None:
    status, body = PROTO.encode_error(ProxyError("upstream_overloaded", "busy", status=529))
    assert status == 503 and orjson.loads(body)["error"]["type"] == "service_unavailable"
    status, body = PROTO.encode_error(ProxyError("invalid_request", "too long", code="context_length_exceeded"))
    assert status == 400 and orjson.loads(body) == {"error": {"message": "too long", "type": "invalid_request_error",
                                                              "param": None, "code": "context_length_exceeded"}}


def test_decode_error_scrubs_keys() -> None:
    body = b'{"error":{"message":"Incorrect API key provided: sk-proj-abcdef1234. Check it.","code":"invalid_api_key"}}'
    assert PROTO.decode_error(401, body) == "Incorrect API key provided: [redacted] Check it."
    assert PROTO.decode_error(502, b"<html>bad gateway key-abcdefgh</html>") == "<html>bad gateway key-[redacted]</html>"


def test_routes_and_inspect() -> None:
    (route,) = PROTO.routes()
    assert (route.method, route.path, route.operation) == ("POST", "/v1/responses", "chat")
    assert PROTO.inspect(route, {"model": "m", "stream": True}, {}, {}) == ("m", True)
    assert PROTO.inspect(route, {"model": "m"}, {}, {}) == ("m", False)


# ---------------------------------------------------------------- provider and plugin


def test_provider_auth_and_url() -> None:
    up = UpstreamConfig(name="u", provider="openai-responses", api_key="upstream-secret")
    prov = OpenAIResponsesProvider(up, None)
    assert prov.auth_headers() == {"Authorization": "Bearer upstream-secret"}
    assert prov.url("/responses") == "https://api.openai.com/v1/responses"
    assert OpenAIResponsesProvider(UpstreamConfig(name="u", provider="openai-responses"), None).auth_headers() == {}
    assert (OpenAIResponsesProvider.protocol, OpenAIResponsesProvider.env_key) == (P, "OPENAI_API_KEY")
    assert OpenAIResponsesProvider.operations == frozenset({"chat"})


def test_default_models_have_decimal_list_prices() -> None:
    models = OpenAIResponsesProvider.default_models("openai-responses")
    by_name = {m.name: m for m in models}
    assert {"gpt-5-codex", "gpt-5.1-codex", "gpt-5.1-codex-mini"} <= set(by_name)
    m = by_name["gpt-5.1-codex-mini"]
    assert m.upstream == "openai-responses" and m.kind == "chat" and m.price.scheme == "per_token"
    assert m.price.options == {"input": Decimal("0.25"), "output": Decimal("2.00"), "cache_write": Decimal("0.25"),
                               "cache_read": Decimal("0.025")}
    assert all(isinstance(v, Decimal) for mc in models for v in mc.price.options.values())


def test_plugin_registers_protocol_and_provider_type() -> None:
    pm = pluggy.PluginManager("cheapproxy")
    from cheapproxy import hookspecs

    pm.add_hookspecs(hookspecs)
    pm.register(cheapproxy_openai_responses)
    protocols: list[Any] = []
    providers: list[type] = []
    pm.hook.register_protocols(register=protocols.append)
    pm.hook.register_provider_types(register=providers.append)
    assert [p.name for p in protocols] == [P] and isinstance(protocols[0], ResponsesProtocol)
    assert providers == [OpenAIResponsesProvider] and providers[0].name == "openai-responses"
    hooks = sorted(n for n in dir(cheapproxy_openai_responses) if n.startswith("register_"))
    assert hooks == ["register_protocols", "register_provider_types"]
