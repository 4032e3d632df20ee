"""decode_request / decode_embeddings_request on realistic client bodies."""

from __future__ import annotations

from typing import Any

import pytest
from openai_chat_helpers import CODEC, inbound

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy_openai.common import NAME

PNG = "iVBORw0KGgo="


def decode(body: dict[str, Any]) -> ir.Request:
    return CODEC.decode_request(inbound(body))


def test_sdk_agent_turn() -> None:
    """What an agent built on the openai SDK sends on its second turn."""
    body = {
        "model": "gpt-4.1",
        "messages": [
            {"role": "developer", "content": "You are a weather bot."},
            {"role": "system", "content": [{"type": "text", "text": "Use metric units."}]},
            {"role": "user", "content": "Weather in Paris and Oslo?", "name": "alice"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "3C"}]},
            {"role": "user", "content": "Thanks, which is warmer?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                    "strict": True,
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_completion_tokens": 500,
        "max_tokens": 9999,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": "END",
        "seed": 7,
        "n": 2,
        "user": "u-1",
        "reasoning_effort": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True}},
        "stream": True,
        "stream_options": {"include_usage": True},
        "presence_penalty": 0.5,
        "metadata": {"app": "x"},
    }
    req = decode(body)
    assert req.model == "gpt-4.1" and req.stream is True
    assert [p.text for p in req.system] == ["You are a weather bot.", "Use metric units."]
    assert req.system[0].provider_data == {NAME: {"role": "developer"}} and req.system[1].provider_data == {}
    assert [m.role for m in req.messages] == ["user", "assistant", "user", "user"]
    assert req.messages[1].content == [
        ir.ToolCallPart(id="call_1", name="get_weather", arguments='{"city":"Paris"}'),
        ir.ToolCallPart(id="call_2", name="get_weather", arguments='{"city":"Oslo"}'),
    ]
    # consecutive tool messages become one user turn of results, names filled in
    assert req.messages[2].content == [
        ir.ToolResultPart(tool_call_id="call_1", name="get_weather", content=[ir.TextPart(text="18C")]),
        ir.ToolResultPart(tool_call_id="call_2", name="get_weather", content=[ir.TextPart(text="3C")]),
    ]
    assert req.messages[3].content == [ir.TextPart(text="Thanks, which is warmer?")]
    assert req.tools == [
        ir.Tool(
            name="get_weather",
            description="Current weather",
            parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            strict=True,
        )
    ]
    assert req.tool_choice == ir.ToolChoice(mode="required", parallel=False)
    assert req.max_tokens == 500  # max_completion_tokens wins
    assert (req.temperature, req.top_p, req.stop, req.seed, req.n, req.user) == (0.2, 0.9, ["END"], 7, 2, "u-1")
    assert req.reasoning == ir.Reasoning(enabled=True, effort="low")
    assert req.response_format == ir.ResponseFormat(type="json_schema", schema={"type": "object"}, name="w", strict=True)
    assert req.provider_data[NAME] == {
        "include_usage": True,
        "extra": {"presence_penalty": 0.5, "metadata": {"app": "x"}},
    }


def test_images_audio_files_and_mid_conversation_system() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "From now on answer in French."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.webp"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}},
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
                    {"type": "file", "file": {"file_id": "file-abc"}},
                ],
            },
        ],
    }
    req = decode(body)
    assert req.system == []
    assert req.messages[1] == ir.Message(role="system", content=[ir.TextPart(text="From now on answer in French.")])
    assert req.messages[2].content == [
        ir.TextPart(text="Compare"),
        ir.ImagePart(media_type="image/png", data=PNG, detail="high"),
        ir.ImagePart(url="https://example.com/a.webp"),
        ir.FilePart(media_type="audio/mpeg", data="UklGRg=="),
        ir.FilePart(media_type="application/pdf", data="JVBERi0=", filename="a.pdf"),
        ir.FilePart(file_id="file-abc"),
    ]
    assert req.provider_data[NAME]["include_usage"] is False


def test_legacy_functions_and_function_messages() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
            {"role": "function", "name": "get_weather", "content": "25C"},
        ],
        "functions": [{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}],
        "function_call": {"name": "get_weather"},
    }
    req = decode(body)
    call = req.messages[1].content[0]
    assert isinstance(call, ir.ToolCallPart) and call.name == "get_weather" and call.arguments == '{"city":"Rome"}'
    assert call.id.startswith("call_") and len(call.id) == 29
    result = req.messages[2].content[0]
    assert isinstance(result, ir.ToolResultPart)
    assert (result.tool_call_id, result.name, result.content) == (call.id, "get_weather", [ir.TextPart(text="25C")])
    assert [t.name for t in req.tools] == ["get_weather"]
    assert req.tool_choice == ir.ToolChoice(mode="tool", name="get_weather")
    assert req.provider_data[NAME]["legacy_functions"] is True


def test_odd_shapes_compatible_clients_send() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": "https://x/y.png"}]},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Let me look."}, {"type": "refusal", "refusal": ""}],
                "reasoning_content": "hidden steps",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
                    {"id": "c2", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin"}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": None},
            {"role": "tool", "tool_call_id": "c2", "content": "done"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "f"}},
            {"type": "custom", "custom": {"name": "apply_patch", "description": "patch", "format": {"type": "text"}}},
            {"type": "function", "function": {"name": "unused"}},
        ],
        "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
            {"type": "function", "function": {"name": "f"}}, {"type": "custom", "custom": {"name": "apply_patch"}}]}},
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "max_tokens": 100,
        "top_k": 40,
        "stream": False,
    }
    req = decode(body)
    assert req.messages[0].content[1] == ir.ImagePart(url="https://x/y.png")
    a = req.messages[1].content
    assert a[0] == ir.ReasoningPart(text="hidden steps")
    assert a[1] == ir.TextPart(text="Let me look.")
    assert a[2] == ir.ToolCallPart(id="c1", name="f", arguments='{"a":1}')
    assert a[3] == ir.ToolCallPart(id="c2", name="apply_patch", arguments="*** Begin", kind="custom")
    results = req.messages[2].content
    assert [(r.tool_call_id, r.name, r.content) for r in results] == [  # type: ignore[union-attr]
        ("c1", "f", [ir.TextPart(text="")]),
        ("c2", "apply_patch", [ir.TextPart(text="done")]),
    ]
    assert [(t.name, t.kind) for t in req.tools] == [("f", "function"), ("apply_patch", "custom")]
    assert req.tools[1].provider_data == {NAME: {"format": {"type": "text"}}}
    assert req.tool_choice == ir.ToolChoice(mode="required")
    assert req.reasoning == ir.Reasoning(budget_tokens=2048)
    assert (req.max_tokens, req.top_k) == (100, 40)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"reasoning_effort": "none"}, ir.Reasoning(enabled=False, effort="none")),
        ({"reasoning_effort": "xhigh"}, ir.Reasoning(effort="xhigh")),
        ({"reasoning": {"effort": "high"}}, ir.Reasoning(effort="high")),
        ({"reasoning": {"max_tokens": 3000, "exclude": True}}, ir.Reasoning(budget_tokens=3000, include_thoughts=False)),
        ({"thinking": {"type": "disabled"}}, ir.Reasoning(enabled=False)),
        ({"thinking": {"type": "adaptive"}}, ir.Reasoning(adaptive=True)),
        ({}, None),
    ],
)
def test_reasoning_knobs(body: dict[str, Any], expected: ir.Reasoning | None) -> None:
    req = decode({"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    assert req.reasoning == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]}, "messages[0].content[0].type"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": 3}, "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "huge"}, "reasoning_effort"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": 3}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]},
         "messages[0].content[0].image_url.url"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}, "tool_choice"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}, "response_format"),
    ],
)
def test_malformed_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyError) as e:
        decode(body)
    assert (e.value.kind, e.value.status, e.value.param) == ("invalid_request", 400, param)


def test_inspect() -> None:
    chat, emb = CODEC.routes()
    assert (chat.method, chat.path, chat.operation) == ("POST", "/v1/chat/completions", "chat")
    assert (emb.method, emb.path, emb.operation) == ("POST", "/v1/embeddings", "embeddings")
    assert CODEC.inspect(chat, {"model": "m", "stream": True}, {}, {}) == ("m", True)
    assert CODEC.inspect(chat, {"model": "m", "stream": None}, {}, {}) == ("m", False)
    assert CODEC.inspect(emb, {"model": "e", "stream": True}, {}, {}) == ("e", False)
    for body in ({}, {"model": ""}, {"model": 3}):
        with pytest.raises(ProxyError) as e:
            CODEC.inspect(chat, body, {}, {})
        assert e.value.param == "model"


@pytest.mark.parametrize(
    ("raw", "inputs"),
    [("one", ["one"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1, 2], [3]], [[1, 2], [3]])],
)
def test_decode_embeddings_request(raw: Any, inputs: list[Any]) -> None:
    body = {"model": "e", "input": raw, "encoding_format": "base64", "dimensions": 256, "user": "u"}
    req = CODEC.decode_embeddings_request(inbound(body, "embeddings"))
    assert req == ir.EmbeddingRequest(model="e", inputs=inputs, dimensions=256, encoding_format="base64", user="u")


@pytest.mark.parametrize(
    ("body", "param"),
    [({"model": "e", "input": []}, "input"), ({"model": "e", "input": 5}, "input"),
     ({"model": "e", "input": "x", "encoding_format": "hex"}, "encoding_format"), ({"input": "x"}, "model")],
)
def test_decode_embeddings_request_errors(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyError) as e:
        CODEC.decode_embeddings_request(inbound(body, "embeddings"))
    assert e.value.param == param
