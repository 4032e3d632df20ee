"""(e) client bodies -> IR, including the shapes Claude Code sends (clients.md)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import Inbound

from anthropic_testlib import CLAUDE_CODE_BODY, CODEC, ctx

PD = "anthropic-messages"
EPH = {"type": "ephemeral"}


def decode(body: dict[str, Any], operation: str = "chat") -> ir.Request:
    return CODEC.decode_request(Inbound(model=body.get("model", ""), stream=bool(body.get("stream")),
                                        operation=operation, body=body))


def test_claude_code_body() -> None:
    req = decode(CLAUDE_CODE_BODY)
    assert (req.model, req.max_tokens, req.stream) == ("claude-opus-4-8", 64000, True)
    assert req.reasoning == ir.Reasoning(enabled=True, adaptive=True, effort="high")
    assert req.user == CLAUDE_CODE_BODY["metadata"]["user_id"]
    assert [p.text for p in req.system] == [b["text"] for b in CLAUDE_CODE_BODY["system"]]
    assert req.system[0].provider_data == {} and req.system[1].provider_data == {PD: {"cache_control": EPH}}
    # the server tool has no IR equivalent; the function tool keeps its schema verbatim
    assert [t.name for t in req.tools] == ["Bash"]
    assert req.tools[0].parameters == CLAUDE_CODE_BODY["tools"][0]["input_schema"]
    assert [m.role for m in req.messages] == ["user", "system", "assistant", "user"]
    assert req.messages[1].content == [ir.TextPart(text="<system-reminder>Today's date is 2026-08-01.</system-reminder>")]
    thinking, redacted, call = req.messages[2].content
    assert thinking == ir.ReasoningPart(text="I will run ls.", signature="EqQBCgIYAhIMsig==", signature_protocol=PD)
    assert redacted == ir.ReasoningPart(redacted="EmwKAhgBredacted", signature_protocol=PD)
    assert (call.id, call.name, orjson.loads(call.arguments)) == ("toolu_01ABC", "Bash", {"command": "ls"})
    result, text = req.messages[3].content
    assert isinstance(result, ir.ToolResultPart)
    assert (result.tool_call_id, result.name, result.is_error) == ("toolu_01ABC", "Bash", True)
    assert result.content == [ir.TextPart(text="permission denied"),
                              ir.ImagePart(media_type="image/png", data="iVBORw0KGgo=")]
    assert text == ir.TextPart(text="go on", provider_data={PD: {"cache_control": EPH}})
    extras = req.provider_data[PD]
    assert extras["context_management"] == CLAUDE_CODE_BODY["context_management"]
    assert extras["metadata"] == CLAUDE_CODE_BODY["metadata"]


def test_inspect_routes_and_query_string() -> None:
    routes = CODEC.routes()
    assert [(r.method, r.path, r.operation) for r in routes] == [
        ("POST", "/v1/messages", "chat"), ("POST", "/v1/messages/count_tokens", "count_tokens")]
    assert CODEC.inspect(routes[0], CLAUDE_CODE_BODY, {}, {"beta": "true"}) == ("claude-opus-4-8", True)
    assert CODEC.inspect(routes[1], {"model": "m", "stream": True, "messages": []}, {}, {}) == ("m", False)
    with pytest.raises(ProxyError) as info:
        CODEC.inspect(routes[0], {"messages": []}, {}, {})
    assert (info.value.status, info.value.param) == (400, "model")
    with pytest.raises(ProxyError):
        CODEC.inspect(routes[0], {"model": "m", "stream": "yes"}, {}, {})


def test_simple_shapes_and_knobs() -> None:
    req = decode({
        "model": "m", "max_tokens": 10, "system": "Be terse.", "stop_sequences": ["END", "STOP"],
        "temperature": 0.5, "top_p": 0.9, "top_k": 40,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
                 "title": "report.pdf"},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain doc"}},
                {"type": "search_result", "source": "x", "title": "t", "content": []},
            ]},
            {"role": "assistant", "content": "I see."},
            {"role": "assistant", "content": ""},
        ],
    })
    assert [p.text for p in req.system] == ["Be terse."]
    assert (req.stop, req.temperature, req.top_p, req.top_k) == (["END", "STOP"], 0.5, 0.9, 40)
    assert req.reasoning == ir.Reasoning(enabled=True, budget_tokens=2048)
    assert req.tool_choice == ir.ToolChoice(mode="tool", name="get_weather")
    assert req.response_format == ir.ResponseFormat(type="json_schema", schema={"type": "object"})
    img, pdf, txt = req.messages[0].content  # search_result dropped
    assert img == ir.ImagePart(url="https://example.com/a.png")
    assert (pdf.media_type, pdf.data, pdf.filename) == ("application/pdf", "JVBERi0=", "report.pdf")
    assert (txt.media_type, txt.data) == ("text/plain", "cGxhaW4gZG9j")
    assert req.messages[1].content == [ir.TextPart(text="I see.")] and req.messages[2].content == []
    assert req.stream is False


@pytest.mark.parametrize(("thinking", "oc", "want"), [
    ({"type": "disabled"}, {}, ir.Reasoning(enabled=False)),
    (None, {"effort": "low"}, ir.Reasoning(enabled=True, effort="low")),
    (None, {}, None),
    ({"type": "adaptive", "display": "omitted"}, {"effort": "max"},
     ir.Reasoning(enabled=True, adaptive=True, effort="max", include_thoughts=False)),
])
def test_reasoning_knobs(thinking: Any, oc: dict[str, Any], want: ir.Reasoning | None) -> None:
    body: dict[str, Any] = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "output_config": oc}
    if thinking is not None:
        body["thinking"] = thinking
    assert decode(body).reasoning == want


@pytest.mark.parametrize(("choice", "want"), [
    ({"type": "auto"}, ir.ToolChoice(mode="auto")),
    ({"type": "any", "disable_parallel_tool_use": True}, ir.ToolChoice(mode="required", parallel=False)),
    ({"type": "none"}, ir.ToolChoice(mode="none")),
])
def test_tool_choice(choice: dict[str, Any], want: ir.ToolChoice) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": choice}
    assert decode(body).tool_choice == want


def test_count_tokens_does_not_need_max_tokens() -> None:
    req = decode({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}, "count_tokens")
    assert req.max_tokens is None and req.stream is False


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": 5, "messages": []}, "model"),
    ({"model": "m", "max_tokens": 5}, "messages"),
    ({"model": "m", "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": "5", "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0.text"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png"}}]}]}, "messages.0.content.0.source"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "n", "input": "x"}]}]}, "messages.0.content.0.input"),
    ({"model": "m", "max_tokens": 5, "messages": [], "tool_choice": {"type": "some"}}, "tool_choice.type"),
    ({"model": "m", "max_tokens": 5, "messages": [], "tools": [{"name": "t"}]}, "tools.0.input_schema"),
    ({"model": "m", "max_tokens": 5, "messages": [], "temperature": "hot"}, "temperature"),
    ({"model": "m", "max_tokens": 5, "messages": [], "thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": [], "output_config": {"effort": "ultra"}}, "output_config.effort"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x"}}]}]}, "messages.0.content.0.type"),
])
def test_malformed_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyError) as info:
        decode(body)
    assert info.value.kind == "invalid_request" and info.value.status == 400 and info.value.param == param


def test_foreign_signature_survives_a_client_round_trip() -> None:
    """A Gemini thoughtSignature handed to an Anthropic client comes back as itself."""
    resp = ir.Response(id="r1", model="g", content=[
        ir.ReasoningPart(text="hmm", signature="gem-sig==", signature_protocol="gemini"),
        ir.ReasoningPart(text="no token"),
        ir.ToolCallPart(id="call_1", name="f", arguments='{"a": 1}')], stop_reason=ir.StopReason.END_TURN)
    body = orjson.loads(CODEC.encode_response(resp, ctx("m")))
    assert body["content"][0] == {"type": "thinking", "thinking": "hmm", "signature": "cheapproxy:gemini:gem-sig=="}
    assert body["content"][1] == {"type": "thinking", "thinking": "no token", "signature": ""}
    back = decode({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": body["content"]}]})
    r1, r2, call = back.messages[1].content
    assert (r1.signature, r1.signature_protocol) == ("gem-sig==", "gemini")
    assert (r2.signature, r2.signature_protocol) == (None, None)
    assert call.id == "call_1" and orjson.loads(call.arguments) == {"a": 1}
