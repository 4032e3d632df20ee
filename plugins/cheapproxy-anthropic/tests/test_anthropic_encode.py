"""Translation rules of encode_request, the client stream encoder's edge
cases, native error shapes, the provider type and plugin registration."""

from __future__ import annotations

import base64
import importlib.metadata
from decimal import Decimal
from typing import Any

import orjson
import pluggy
import pytest

from cheapproxy import hookspecs, ir
from cheapproxy.config import UpstreamConfig
from cheapproxy.errors import ProxyError
from cheapproxy_anthropic.provider import AnthropicProvider

from anthropic_testlib import CODEC, ctx, encode_stream, frames

PD = "anthropic-messages"


def body_of(req: ir.Request, stream: bool = False) -> dict[str, Any]:
    up = CODEC.encode_request(req, "claude-up", stream=stream)
    assert up.path == "/v1/messages" and up.stream is stream
    assert up.headers["anthropic-version"] == "2023-06-01"
    return orjson.loads(up.body)


def user(*parts: ir.Part) -> ir.Message:
    return ir.Message(role="user", content=list(parts))


def text(t: str) -> ir.TextPart:
    return ir.TextPart(text=t)


# ---------------------------------------------------------------- encode_request


@pytest.mark.parametrize(("given", "sent"), [(1.7, 1.0), (-0.5, 0.0), (0.3, 0.3)])
def test_temperature_clamped(given: float, sent: float) -> None:
    b = body_of(ir.Request(model="m", messages=[user(text("x"))], temperature=given, top_p=0.8, top_k=3,
                           stop=["END"], user="u1", seed=7, max_tokens=99))
    assert (b["temperature"], b["top_p"], b["top_k"], b["stop_sequences"]) == (sent, 0.8, 3, ["END"])
    assert b["metadata"] == {"user_id": "u1"} and b["max_tokens"] == 99 and "seed" not in b


@pytest.mark.parametrize(("reasoning", "max_tokens", "thinking", "sent_max", "effort"), [
    (ir.Reasoning(effort="minimal"), 8000, {"type": "enabled", "budget_tokens": 1024}, 8000, None),
    (ir.Reasoning(effort="medium"), 8000, {"type": "enabled", "budget_tokens": 4096}, 8000, None),
    (ir.Reasoning(effort="max"), 8000, {"type": "enabled", "budget_tokens": 64000}, 72000, None),
    (ir.Reasoning(budget_tokens=500), 8000, {"type": "enabled", "budget_tokens": 1024}, 8000, None),
    (ir.Reasoning(budget_tokens=2000), 1000, {"type": "enabled", "budget_tokens": 2000}, 3000, None),
    (ir.Reasoning(adaptive=True, effort="xhigh"), 8000, {"type": "adaptive"}, 8000, "xhigh"),
    (ir.Reasoning(adaptive=True, effort="minimal"), 8000, {"type": "adaptive"}, 8000, "low"),
    (ir.Reasoning(enabled=False, effort="high"), 8000, None, 8000, None),
    (ir.Reasoning(effort="none"), 8000, None, 8000, None),
])
def test_reasoning_mapping(reasoning: ir.Reasoning, max_tokens: int, thinking: Any, sent_max: int,
                           effort: str | None) -> None:
    b = body_of(ir.Request(model="m", messages=[user(text("x"))], reasoning=reasoning, max_tokens=max_tokens,
                           top_p=0.5, temperature=0.2))
    assert b.get("thinking") == thinking and b["max_tokens"] == sent_max
    assert b.get("output_config", {}).get("effort") == effort
    if thinking is not None:
        assert "temperature" not in b and b["top_p"] == 0.95  # top_p limited to [0.95, 1] with thinking


def test_turn_merging_and_tool_results_first() -> None:
    msgs = [
        user(text("a")), user(text("b")),
        ir.Message(role="assistant", content=[ir.ToolCallPart(id="t1", name="f", arguments="{}")]),
        user(text("look:")),
        user(ir.ToolResultPart(tool_call_id="t1", content=[text("r1"), ir.ImagePart(media_type="image/png", data="iVBO")])),
        ir.Message(role="user", content=[ir.ToolResultPart(tool_call_id="ghost", content=[text("stale")])]),
    ]
    sent = body_of(ir.Request(model="m", messages=msgs))["messages"]
    assert sent[0] == {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    assert [b["type"] for b in sent[2]["content"]] == ["tool_result", "text", "text"]
    assert sent[2]["content"][0]["content"][1] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBO"}}
    assert sent[2]["content"][1] == {"type": "text", "text": "[tool result ghost] stale"}  # orphan result -> text
    assert sent[2]["content"][2] == {"type": "text", "text": "look:"}


def test_custom_tools_and_ids_sanitized_consistently() -> None:
    tools = [ir.Tool(name="apply_patch", kind="custom", description="patch"), ir.Tool(name="f", parameters={})]
    msgs = [user(text("go")),
            ir.Message(role="assistant", content=[
                ir.ToolCallPart(id="fc.1", name="apply_patch", kind="custom", arguments='*** Begin "Patch"\n'),
                ir.ToolCallPart(id="fc:1", name="f", arguments="[1, 2]")]),
            user(ir.ToolResultPart(tool_call_id="fc.1", content=[text("ok")]),
                 ir.ToolResultPart(tool_call_id="fc:1", is_error=True))]
    b = body_of(ir.Request(model="m", messages=msgs, tools=tools, tool_choice=ir.ToolChoice(mode="required")))
    assert b["tools"][0] == {"name": "apply_patch", "description": "patch", "input_schema": {
        "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}
    assert b["tools"][1] == {"name": "f", "input_schema": {"type": "object", "properties": {}}}
    assert b["tool_choice"] == {"type": "any"}
    c1, c2 = b["messages"][1]["content"]
    assert c1["input"] == {"input": '*** Begin "Patch"\n'} and c2["input"] == {"input": "[1, 2]"}
    assert c1["id"] != c2["id"] and all(ch.isalnum() or ch in "_-" for ch in c1["id"] + c2["id"])
    r1, r2 = b["messages"][2]["content"]
    assert (r1["tool_use_id"], r2["tool_use_id"]) == (c1["id"], c2["id"])
    assert r2 == {"type": "tool_result", "tool_use_id": c2["id"], "is_error": True}


def test_anthropic_thinking_kept_foreign_dropped() -> None:
    msgs = [user(text("q")), ir.Message(role="assistant", content=[
        ir.ReasoningPart(text="t", signature="s1", signature_protocol=PD),
        ir.ReasoningPart(redacted="RD", signature_protocol=PD),
        ir.ReasoningPart(text="openai thought"),
        ir.ReasoningPart(text="g", signature="gs", signature_protocol="gemini"),
        text("answer")])]
    content = body_of(ir.Request(model="m", messages=msgs))["messages"][1]["content"]
    assert content == [{"type": "thinking", "thinking": "t", "signature": "s1"},
                       {"type": "redacted_thinking", "data": "RD"}, {"type": "text", "text": "answer"}]


def test_files_and_extras() -> None:
    pdf = ir.FilePart(media_type="application/pdf", data="JVBERi0=", filename="r.pdf")
    txt = ir.FilePart(media_type="text/plain", data=base64.b64encode(b"hello").decode())
    req = ir.Request(model="m", messages=[user(text("x"), pdf, txt)],
                     provider_data={PD: {"service_tier": "auto", "metadata": {"user_id": "cc"},
                                         "context_management": {"edits": []}}})
    b = body_of(req, stream=True)
    assert b["messages"][0]["content"][1:] == [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}, "title": "r.pdf"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hello"}}]
    assert b["service_tier"] == "auto" and b["metadata"] == {"user_id": "cc"} and b["stream"] is True
    assert "context_management" not in b  # needs a beta header a translated request does not carry


@pytest.mark.parametrize(("req", "param"), [
    (ir.Request(model="m", messages=[user(ir.ImagePart(media_type="image/bmp", data="Qk0="))]), "image"),
    (ir.Request(model="m", messages=[user(ir.FilePart(file_id="file-openai-1"))]), "file"),
    (ir.Request(model="m", messages=[user(ir.FilePart(media_type="audio/wav", data="UklG"))]), "file"),
    (ir.Request(model="m", messages=[user(text("  "))]), "messages"),
    (ir.Request(model="m", messages=[]), "messages"),
    (ir.Request(model="m", messages=[user(text("x"))], n=3), "n"),
])
def test_inexpressible_requests_are_400(req: ir.Request, param: str) -> None:
    with pytest.raises(ProxyError) as info:
        CODEC.encode_request(req, "m", stream=False)
    assert (info.value.status, info.value.param) == (400, param)
    assert PD in info.value.message


def test_tool_choice_without_tools_is_omitted() -> None:
    b = body_of(ir.Request(model="m", messages=[user(text("x"))], tool_choice=ir.ToolChoice(mode="none")))
    assert "tool_choice" not in b and "tools" not in b


# ---------------------------------------------------------------- stream encoder edge cases


def test_encoder_synthesizes_start_skips_images_and_stops_after_terminal() -> None:
    events: list[ir.StreamEvent] = [
        ir.PartStart(index=0, part=ir.ImagePart(url="https://x/y.png")), ir.PartStop(index=0),
        ir.PartStart(index=1, part=ir.TextPart(text="")), ir.TextDelta(index=1, text="hi"),
        ir.MessageStop(stop_reason=ir.StopReason.CONTENT_FILTER),  # open block closed for us
        ir.TextDelta(index=1, text="late"), ir.MessageStop(stop_reason=ir.StopReason.END_TURN),
    ]
    chunks = encode_stream(events)
    assert chunks[-3:] == [b"", b"", b""]
    out = frames(b"".join(chunks))
    assert [e for e, _ in out] == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                                   "message_delta", "message_stop"]
    assert out[0][1]["message"]["id"].startswith("msg_") and out[0][1]["message"]["usage"]["output_tokens"] == 0
    assert out[1][1]["index"] == 0 and out[4][1]["delta"]["stop_reason"] == "refusal"
    enc = CODEC.stream_encoder(ctx())
    enc.encode(ir.MessageStop(stop_reason=ir.StopReason.END_TURN))
    assert enc.error(ProxyError("internal", "boom")) == b""


def test_custom_tool_call_streams_as_valid_json_and_signature_buffered() -> None:
    raw = 'line "one"\n\ttab \\ done \u00e9'
    events: list[ir.StreamEvent] = [
        ir.MessageStart(id="resp_1", model="gpt"),
        ir.PartStart(index=0, part=ir.ReasoningPart()),
        ir.ReasoningDelta(index=0, text="think", signature="part1-", signature_protocol="openai-responses"),
        ir.ReasoningDelta(index=0, signature="part2", signature_protocol="openai-responses"),
        ir.PartStop(index=0),
        ir.PartStart(index=1, part=ir.ToolCallPart(id="call:9", name="apply_patch", kind="custom", arguments="")),
        *[ir.ToolCallDelta(index=1, arguments=raw[i:i + 3]) for i in range(0, len(raw), 3)],
        ir.PartStop(index=1),
        ir.MessageStop(stop_reason=ir.StopReason.END_TURN, usage=ir.Usage(input_tokens=4, output_tokens=2)),
    ]
    out = frames(b"".join(encode_stream(events)))
    sigs = [d["delta"]["signature"] for e, d in out if e == "content_block_delta" and d["delta"]["type"] == "signature_delta"]
    assert sigs == ["cheapproxy:openai-responses:part1-part2"]
    partial = "".join(d["delta"]["partial_json"] for e, d in out
                      if e == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert orjson.loads(partial) == {"input": raw}
    start = [d for e, d in out if e == "content_block_start"][1]["content_block"]
    assert start["id"].startswith("call_9_") and start["name"] == "apply_patch"
    assert out[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert out[-2][1]["usage"] == {"input_tokens": 4, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                                   "output_tokens": 2}


def test_non_stream_encode_response_shape() -> None:
    resp = ir.Response(id="chatcmpl-1", model="gpt", content=[text("a"), ir.ImagePart(url="u"),
                       ir.ToolCallPart(id="call_1", name="f", arguments="oops"),
                       ir.ToolCallPart(id="functions.f:1", name="f", arguments='{"a": [1]}')],
                       stop_reason=ir.StopReason.STOP_SEQUENCE, stop_sequence="END",
                       usage=ir.Usage(input_tokens=1, output_tokens=5, reasoning_tokens=2))
    b = orjson.loads(CODEC.encode_response(resp, ctx("mine")))
    assert b["id"].startswith("msg_") and b["model"] == "mine" and b["type"] == "message" and b["role"] == "assistant"
    assert b["content"][:2] == [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "call_1", "name": "f",
                                                                "input": {"input": "oops"}}]
    # ids a real Anthropic upstream would reject are sanitized for the client as well
    assert b["content"][2]["id"].startswith("functions_f_1_") and b["content"][2]["input"] == {"a": [1]}
    assert (b["stop_reason"], b["stop_sequence"]) == ("tool_use", None)
    assert b["usage"] == {"input_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                          "output_tokens": 5, "output_tokens_details": {"thinking_tokens": 2}}


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("err", "status", "etype"), [
    (ProxyError("invalid_request", "m"), 400, "invalid_request_error"),
    (ProxyError("authentication", "m"), 401, "authentication_error"),
    (ProxyError("insufficient_balance", "m"), 402, "billing_error"),
    (ProxyError("permission", "m"), 403, "permission_error"),
    (ProxyError("not_found", "m"), 404, "not_found_error"),
    (ProxyError("payload_too_large", "m"), 413, "request_too_large"),
    (ProxyError("rate_limited", "m", retry_after=3), 429, "rate_limit_error"),
    (ProxyError("internal", "m"), 500, "api_error"),
    (ProxyError("upstream_failed", "m"), 502, "api_error"),
    (ProxyError("overloaded", "m"), 503, "overloaded_error"),
    (ProxyError("upstream_overloaded", "m", status=503), 529, "overloaded_error"),
    (ProxyError("upstream_timeout", "m"), 504, "timeout_error"),
    (ProxyError("upstream_rejected", "m", status=409), 409, "invalid_request_error"),
])
def test_encode_error(err: ProxyError, status: int, etype: str) -> None:
    got_status, body = CODEC.encode_error(err)
    assert got_status == status
    assert orjson.loads(body) == {"type": "error", "error": {"type": etype, "message": "m"}}
    enc = CODEC.stream_encoder(ctx())
    assert frames(enc.error(err)) == [("error", {"type": "error", "error": {"type": etype, "message": "m"}})]


def test_decode_error_messages() -> None:
    assert CODEC.decode_error(529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}') == "Overloaded"
    assert CODEC.decode_error(502, b"<html>Bad gateway</html>") == "<html>Bad gateway</html>"
    assert CODEC.decode_error(500, b"") == "upstream answered HTTP 500"
    with pytest.raises(ProxyError):
        CODEC.decode_response(b"<html>")
    with pytest.raises(ProxyError):
        CODEC.decode_count_tokens_response(b'{"tokens": 3}')
    assert CODEC.encode_count_tokens(42, ctx()) == b'{"input_tokens":42}'


# ---------------------------------------------------------------- provider and registration


def test_provider_type() -> None:
    up = UpstreamConfig(name="anth", provider="anthropic", api_key="sk-ant-secret")
    p = AnthropicProvider(up, None)
    assert p.auth_headers() == {"x-api-key": "sk-ant-secret"}
    assert p.url("/v1/messages") == "https://api.anthropic.com/v1/messages"
    assert AnthropicProvider(UpstreamConfig(name="a", provider="anthropic"), None).auth_headers() == {}
    assert AnthropicProvider(UpstreamConfig(name="a", provider="anthropic", base_url="http://127.0.0.1:9/"), None).url(
        "/v1/messages") == "http://127.0.0.1:9/v1/messages"
    assert (AnthropicProvider.name, AnthropicProvider.protocol, AnthropicProvider.env_key) == (
        "anthropic", PD, "ANTHROPIC_API_KEY")
    assert AnthropicProvider.operations == frozenset({"chat", "count_tokens"})
    models = {m.name: m for m in AnthropicProvider.default_models("anth")}
    sonnet = models["claude-sonnet-4-5"]
    assert sonnet.upstream == "anth" and sonnet.aliases == ["claude-sonnet-4-5-20250929"]
    assert sonnet.price.scheme == "per_token" and sonnet.price.options == {
        "input": Decimal("3"), "output": Decimal("15"), "cache_write": Decimal("3.75"), "cache_read": Decimal("0.30")}
    assert models["claude-opus-4-8"].price.options["output"] == Decimal("25")
    assert all(isinstance(v, Decimal) for m in models.values() for v in m.price.options.values())


def test_entry_point_registers_both() -> None:
    (ep,) = [e for e in importlib.metadata.entry_points(group="cheapproxy") if e.name == "anthropic"]
    pm = pluggy.PluginManager("cheapproxy")
    pm.add_hookspecs(hookspecs)
    pm.register(ep.load())
    protocols: list[Any] = []
    providers: list[type] = []
    pm.hook.register_protocols(register=protocols.append)
    pm.hook.register_provider_types(register=providers.append)
    assert [p.name for p in protocols] == [PD] and providers == [AnthropicProvider]
    assert protocols[0].forward_headers == frozenset({"anthropic-version", "anthropic-beta"})
