"""Encoders and decoders in isolation: upstream request bodies, responses,
error shapes, stream-encoder rules, the provider type and the hooks."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pluggy
import pytest
from openai_chat_helpers import CODEC, context, encode_stream, sse_payloads

import cheapproxy_openai
from cheapproxy import hookspecs, ir
from cheapproxy.config import UpstreamConfig
from cheapproxy.errors import ProxyError
from cheapproxy.provider import NoOptions
from cheapproxy_openai.codec import OpenAIChatProtocol
from cheapproxy_openai.provider import OpenAIProvider


def body_of(req: ir.Request, stream: bool = False) -> dict[str, Any]:
    up = CODEC.encode_request(req, "gpt-up", stream=stream)
    assert up.path == "/chat/completions" and up.stream is stream
    return orjson.loads(up.body)


def test_encode_request_full() -> None:
    req = ir.Request(
        model="client",
        system=[ir.TextPart(text="sys", provider_data={"openai-chat": {"role": "developer"}})],
        messages=[
            ir.Message(role="user", content=[
                ir.TextPart(text="look"),
                ir.ImagePart(url="https://x/y.png", detail="high"),
                ir.FilePart(media_type="audio/wav", data="UklG"),
                ir.FilePart(media_type="application/pdf", data="JVBE"),
                ir.FilePart(file_id="file-1", filename="f.pdf"),
            ]),
            ir.Message(role="assistant", content=[ir.TextPart(text="Sure. "), ir.TextPart(text="Done.")]),
            ir.Message(role="assistant", content=[ir.ReasoningPart(text="only thoughts")]),
        ],
        max_tokens=64000,
        temperature=0.5,
        top_p=0.8,
        top_k=40,
        stop=["X", "Y"],
        n=2,
        seed=3,
        user="x" * 65,
        reasoning=ir.Reasoning(effort="high", adaptive=True),
        response_format=ir.ResponseFormat(type="json_object"),
        provider_data={"openai-chat": {"extra": {"presence_penalty": 0.1, "temperature": 9}}},
    )
    b = body_of(req, stream=True)
    assert b["messages"] == [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "high"}},
            {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE", "filename": "document.pdf"}},
            {"type": "file", "file": {"file_id": "file-1", "filename": "f.pdf"}},
        ]},
        {"role": "assistant", "content": "Sure. Done."},
        {"role": "assistant", "content": ""},
    ]
    assert b["max_completion_tokens"] == 64000 and "max_tokens" not in b and "top_k" not in b
    assert (b["temperature"], b["top_p"], b["stop"], b["n"], b["seed"]) == (0.5, 0.8, ["X", "Y"], 2, 3)
    assert "user" not in b  # longer than OpenAI's 64-character limit
    assert b["reasoning_effort"] == "high" and b["response_format"] == {"type": "json_object"}
    assert b["presence_penalty"] == 0.1 and b["temperature"] == 0.5  # extras never override IR fields
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("reasoning", "effort"),
    [
        (ir.Reasoning(budget_tokens=500), "minimal"),
        (ir.Reasoning(budget_tokens=1024), "low"),
        (ir.Reasoning(budget_tokens=4095), "low"),
        (ir.Reasoning(budget_tokens=4096), "medium"),
        (ir.Reasoning(budget_tokens=31999), "high"),
        (ir.Reasoning(budget_tokens=32768), "xhigh"),
        (ir.Reasoning(budget_tokens=64000), "max"),
        (ir.Reasoning(effort="none", enabled=False), "none"),
        (ir.Reasoning(enabled=False), None),
        (ir.Reasoning(adaptive=True), None),
    ],
)
def test_reasoning_to_effort(reasoning: ir.Reasoning, effort: str | None) -> None:
    b = body_of(ir.Request(model="m", messages=[ir.Message(role="user", content=[ir.TextPart(text="x")])], reasoning=reasoning))
    assert b.get("reasoning_effort") == effort


def test_tool_choice_encoding() -> None:
    base = dict(model="m", messages=[ir.Message(role="user", content=[ir.TextPart(text="x")])])
    tools = [ir.Tool(name="f", strict=True)]
    b = body_of(ir.Request(**base, tools=tools, tool_choice=ir.ToolChoice(mode="tool", name="f")))
    assert b["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert b["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}, "strict": True}}]
    b = body_of(ir.Request(**base, tools=tools, tool_choice=ir.ToolChoice(mode="required", parallel=True)))
    assert (b["tool_choice"], b["parallel_tool_calls"]) == ("required", True)
    b = body_of(ir.Request(**base, tool_choice=ir.ToolChoice(mode="none", parallel=False)))
    assert "tool_choice" not in b and "parallel_tool_calls" not in b and "tools" not in b


def test_decode_response_variants() -> None:
    body = {
        "id": "chatcmpl-9", "model": "deepseek-chat",
        "choices": [{"index": 0, "finish_reason": "function_call", "message": {
            "role": "assistant", "content": "ok", "reasoning_content": "why",
            "function_call": {"name": "f", "arguments": "{\"a\":1}"}}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 9, "total_tokens": 109, "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36},
    }
    r = CODEC.decode_response(orjson.dumps(body))
    assert (r.id, r.model, r.stop_reason) == ("chatcmpl-9", "deepseek-chat", ir.StopReason.TOOL_USE)
    assert r.content[0] == ir.ReasoningPart(text="why") and r.content[1] == ir.TextPart(text="ok")
    call = r.content[2]
    assert isinstance(call, ir.ToolCallPart) and (call.name, call.arguments) == ("f", '{"a":1}') and call.id.startswith("call_")
    assert r.usage == ir.Usage(input_tokens=36, output_tokens=9, cache_read_tokens=64)
    refusal = {"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None, "refusal": "I can't help."}}]}
    r = CODEC.decode_response(orjson.dumps(refusal))
    assert r.content == [ir.TextPart(text="I can't help.")] and r.stop_reason is ir.StopReason.CONTENT_FILTER
    empty = CODEC.decode_response(b'{"id":"c","model":"m","choices":[]}')
    assert empty.content == [] and empty.usage == ir.Usage()
    for bad in (b"<html>", b'{"error":{"message":"overloaded"}}'):
        with pytest.raises(ProxyError) as e:
            CODEC.decode_response(bad)
        assert e.value.kind == "upstream_failed"


def test_encode_response_shapes() -> None:
    resp = ir.Response(
        id="msg_01", model="claude",
        content=[ir.ReasoningPart(text="hmm", signature="s", signature_protocol="anthropic-messages"),
                 ir.TextPart(text="A"), ir.TextPart(text="B"),
                 ir.ToolCallPart(id="toolu_1", name="f", arguments='{"x":1}'),
                 ir.ToolCallPart(id="toolu_2", name="apply_patch", arguments="*** patch", kind="custom")],
        stop_reason=ir.StopReason.END_TURN,
        usage=ir.Usage(input_tokens=10, output_tokens=7, cache_read_tokens=5, cache_write_tokens=2, reasoning_tokens=3),
    )
    b = orjson.loads(CODEC.encode_response(resp, context(model="alias")))
    assert b["id"] == "chatcmpl-req-1" and b["object"] == "chat.completion" and b["model"] == "alias" and b["created"] == 1754000000
    ch = b["choices"][0]
    assert ch["finish_reason"] == "tool_calls"  # a message with tool calls
    assert ch["message"]["content"] == "AB" and ch["message"]["reasoning_content"] == "hmm"
    assert ch["message"]["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
        {"id": "toolu_2", "type": "custom", "custom": {"name": "apply_patch", "input": "*** patch"}},
    ]
    assert b["usage"] == {
        "prompt_tokens": 17, "completion_tokens": 7, "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    legacy_body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}
    b = orjson.loads(CODEC.encode_response(resp, context(legacy_body)))
    ch = b["choices"][0]
    assert ch["finish_reason"] == "function_call" and ch["message"]["function_call"] == {"name": "f", "arguments": '{"x":1}'}
    assert "tool_calls" not in ch["message"]


@pytest.mark.parametrize(
    ("stop", "finish"),
    [(ir.StopReason.END_TURN, "stop"), (ir.StopReason.STOP_SEQUENCE, "stop"), (ir.StopReason.PAUSE, "stop"),
     (ir.StopReason.MAX_TOKENS, "length"), (ir.StopReason.CONTEXT_LIMIT, "length"),
     (ir.StopReason.CONTENT_FILTER, "content_filter"), (ir.StopReason.TOOL_USE, "tool_calls")],
)
def test_finish_reasons(stop: ir.StopReason, finish: str) -> None:
    resp = ir.Response(id="x", model="m", content=[ir.TextPart(text="t")], stop_reason=stop)
    assert orjson.loads(CODEC.encode_response(resp, context()))["choices"][0]["finish_reason"] == finish


def test_stream_encoder_tool_index_is_a_counter_and_legacy_mode() -> None:
    events = [
        ir.MessageStart(id="x", model="m"),
        ir.PartStart(index=0, part=ir.TextPart(text="")), ir.TextDelta(index=0, text="a"), ir.PartStop(index=0),
        ir.PartStart(index=1, part=ir.ReasoningPart()), ir.ReasoningDelta(index=1, text="r"), ir.PartStop(index=1),
        ir.PartStart(index=2, part=ir.TextPart(text="")), ir.TextDelta(index=2, text="b"), ir.PartStop(index=2),
        ir.PartStart(index=3, part=ir.ToolCallPart(id="t1", name="f", arguments="")),
        ir.ToolCallDelta(index=3, arguments="{}"), ir.PartStop(index=3),
        ir.PartStart(index=4, part=ir.ToolCallPart(id="t2", name="g", arguments='{"whole":true}')), ir.PartStop(index=4),
        ir.MessageStop(stop_reason=ir.StopReason.TOOL_USE),
        ir.TextDelta(index=5, text="after the end"),
    ]
    frames = sse_payloads(encode_stream(events, context()))
    tcs = [tc for f in frames[:-1] for tc in f["choices"][0]["delta"].get("tool_calls", [])]
    assert tcs == [
        {"index": 0, "id": "t1", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": "{}"}},
        {"index": 1, "id": "t2", "type": "function", "function": {"name": "g", "arguments": ""}},
        {"index": 1, "function": {"arguments": '{"whole":true}'}},
    ]
    assert frames[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert frames[-1] == "[DONE]" and "after the end" not in str(frames)
    legacy = {"model": "m", "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}], "stream": True}
    frames = sse_payloads(encode_stream(events, context(legacy)))
    fcs = [f["choices"][0]["delta"]["function_call"] for f in frames[:-1] if "function_call" in f["choices"][0]["delta"]]
    assert fcs == [{"name": "f", "arguments": ""}, {"arguments": "{}"}]
    assert frames[-2]["choices"][0]["finish_reason"] == "function_call"


def test_stream_encoder_error_ends_the_stream() -> None:
    enc = CODEC.stream_encoder(context())
    first = enc.encode(ir.TextDelta(index=0, text="hi"))  # no MessageStart: role chunk synthesized
    assert [f["choices"][0]["delta"] for f in sse_payloads(first)] == [{"role": "assistant", "content": ""}, {"content": "hi"}]
    err = enc.error(ProxyError("upstream_timeout", "upstream too slow"))
    assert sse_payloads(err) == [{"error": {"message": "upstream too slow", "type": "timeout", "param": None, "code": None}}]
    assert enc.encode(ir.TextDelta(index=0, text="more")) == b"" and enc.error(ProxyError("internal", "x")) == b""
    assert enc.close() == b""


@pytest.mark.parametrize(
    ("err", "status", "etype", "code"),
    [
        (ProxyError("invalid_request", "bad", param="messages"), 400, "invalid_request_error", None),
        (ProxyError("upstream_rejected", "context too long", code="context_length_exceeded"), 400, "invalid_request_error", "context_length_exceeded"),
        (ProxyError("authentication", "no key"), 401, "authentication_error", "invalid_api_key"),
        (ProxyError("insufficient_balance", "top up"), 402, "insufficient_quota", "insufficient_quota"),
        (ProxyError("permission", "no"), 403, "permission_error", None),
        (ProxyError("not_found", "model 'x' is not registered"), 404, "not_found_error", "model_not_found"),
        (ProxyError("not_found", "no such task"), 404, "not_found_error", None),
        (ProxyError("payload_too_large", "big"), 413, "invalid_request_error", "request_too_large"),
        (ProxyError("rate_limited", "slow"), 429, "rate_limit_error", "rate_limit_exceeded"),
        (ProxyError("internal", "oops"), 500, "server_error", None),
        (ProxyError("upstream_failed", "down"), 502, "server_error", None),
        (ProxyError("upstream_overloaded", "busy"), 503, "service_unavailable", None),
        (ProxyError("unavailable", "draining"), 503, "service_unavailable", None),
        (ProxyError("upstream_timeout", "slow"), 504, "timeout", None),
    ],
)
def test_encode_error(err: ProxyError, status: int, etype: str, code: str | None) -> None:
    got_status, body = CODEC.encode_error(err)
    assert got_status == status
    assert orjson.loads(body) == {"error": {"message": err.message, "type": etype, "param": err.param, "code": code}}


def test_decode_error() -> None:
    assert CODEC.decode_error(400, b'{"error":{"message":"Invalid value for stop","type":"invalid_request_error"}}') == "Invalid value for stop"
    assert CODEC.decode_error(502, b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert CODEC.decode_error(503, b"") == "the upstream answered HTTP 503"
    assert CODEC.decode_error(400, b'[{"error":{"code":400,"message":"listed","status":"INVALID_ARGUMENT"}}]') == "listed"
    msg = CODEC.decode_error(401, b'{"error":{"message":"Incorrect API key provided: sk-proj-****wxyz. Bearer abc.def"}}')
    assert msg == "Incorrect API key provided: [redacted]. [redacted]"


def test_provider_type() -> None:
    cfg = UpstreamConfig(name="oa", provider="openai", api_key="sk-upstream")
    p = OpenAIProvider(cfg, NoOptions())
    assert (OpenAIProvider.name, OpenAIProvider.protocol, OpenAIProvider.env_key) == ("openai", "openai-chat", "OPENAI_API_KEY")
    assert OpenAIProvider.operations == frozenset({"chat", "embeddings"})
    assert p.url("/chat/completions") == "https://api.openai.com/v1/chat/completions"
    assert p.auth_headers() == {"Authorization": "Bearer sk-upstream"}
    assert OpenAIProvider(UpstreamConfig(name="l", provider="openai", base_url="http://127.0.0.1:8000/v1/"), NoOptions()).auth_headers() == {}
    models = {m.name: m for m in OpenAIProvider.default_models("oa")}
    assert {"gpt-5", "gpt-4o-mini", "text-embedding-3-small"} <= set(models)
    gpt4o = models["gpt-4o"]
    assert gpt4o.upstream == "oa" and gpt4o.kind == "chat" and gpt4o.price.scheme == "per_token"
    assert gpt4o.price.options == {"input": Decimal("2.50"), "output": Decimal("10.00"), "cache_write": Decimal("2.50"), "cache_read": Decimal("1.25")}
    assert models["text-embedding-3-small"].kind == "embedding"
    assert all(isinstance(v, Decimal) for m in models.values() for v in m.price.options.values())


def test_hooks_register_codec_and_provider() -> None:
    pm = pluggy.PluginManager("cheapproxy")
    pm.add_hookspecs(hookspecs)
    pm.register(cheapproxy_openai)
    protocols: list[Any] = []
    providers: list[type] = []
    pm.hook.register_protocols(register=protocols.append)
    pm.hook.register_provider_types(register=providers.append)
    assert [type(p) for p in protocols] == [OpenAIChatProtocol] and protocols[0].name == "openai-chat"
    assert providers == [OpenAIProvider]
    pm.check_pending()


def _frames(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _choice(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": "c1", "model": "m", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def test_decoder_tolerates_odd_tool_call_streams() -> None:
    from openai_chat_helpers import decode_stream

    body = _frames(
        # a server that gives every call index 0 but distinct ids (pitfall 1)
        _choice({"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}]}),
        _choice({"tool_calls": [{"index": 0, "id": "b", "type": "function", "function": {"name": "g", "arguments": "{"}}]}),
        _choice({"tool_calls": [{"index": 0, "function": {"arguments": '"y":2}'}}]}),
        # a server that omits the index: keyed by id, later fragments go to the latest call
        _choice({"tool_calls": [{"id": "c", "type": "function", "function": {"name": "h", "arguments": ""}}]}),
        _choice({"tool_calls": [{"function": {"arguments": "{}"}}]}),
        # another choice (n > 1) is ignored when translating
        _choice({"content": "other choice"}, index=1),
        _choice({}, "tool_calls"),
    )
    resp = ir.collect(decode_stream([body]))
    assert [(p.id, p.name, p.arguments) for p in resp.content] == [("a", "f", '{"x":1}'), ("b", "g", '{"y":2}'), ("c", "h", "{}")]  # type: ignore[union-attr]
    assert resp.stop_reason is ir.StopReason.TOOL_USE


def test_decoder_legacy_function_call_refusal_and_custom_calls() -> None:
    from openai_chat_helpers import decode_stream

    legacy = _frames(
        _choice({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": ""}}),
        _choice({"function_call": {"arguments": '{"a":'}}),
        _choice({"function_call": {"arguments": "1}"}}),
        _choice({}, "function_call"),
    )
    resp = ir.collect(decode_stream([legacy]))
    assert len(resp.content) == 1 and resp.content[0].name == "f" and resp.content[0].arguments == '{"a":1}'  # type: ignore[union-attr]
    assert resp.stop_reason is ir.StopReason.TOOL_USE
    refusal = _frames(_choice({"role": "assistant", "refusal": "I can't help with that."}), _choice({}, "stop"))
    resp = ir.collect(decode_stream([refusal]))
    assert resp.content == [ir.TextPart(text="I can't help with that.")] and resp.stop_reason is ir.StopReason.CONTENT_FILTER
    custom = _frames(
        _choice({"tool_calls": [{"index": 0, "id": "k", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin"}}]}),
        _choice({"tool_calls": [{"index": 0, "custom": {"input": " Patch"}}]}),
        _choice({}, "tool_calls"),
    )
    resp = ir.collect(decode_stream([custom]))
    assert resp.content == [ir.ToolCallPart(id="k", name="apply_patch", arguments="*** Begin Patch", kind="custom")]


@pytest.mark.parametrize(
    ("err", "kind", "status", "client_type", "code"),
    [
        ({"message": "busy", "type": "service_unavailable_error"}, "upstream_overloaded", 529, "service_unavailable", None),
        ({"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}, "rate_limited", 429, "rate_limit_error", "rate_limit_exceeded"),
        ({"message": "boom", "type": "server_error"}, "upstream_failed", 502, "server_error", None),
    ],
)
def test_in_stream_error_classes(err: dict[str, Any], kind: str, status: int, client_type: str, code: str | None) -> None:
    from openai_chat_helpers import decode_stream

    events = decode_stream([b"data: " + orjson.dumps({"error": err}) + b"\n\n"])
    assert events == [ir.StreamError(message=err["message"], kind=kind, status=status)]
    wire = encode_stream(events, context())
    assert sse_payloads(wire) == [{"error": {"message": err["message"], "type": client_type, "param": None, "code": code}}]
