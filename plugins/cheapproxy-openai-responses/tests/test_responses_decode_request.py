"""Client side: realistic request bodies (Codex, the SDK) decoded into IR."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import Inbound, Route
from cheapproxy.testing.fake_openai_responses import make_app

from responses_testlib import PROTO, codex_body

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
ROUTE = Route(method="POST", path="/v1/responses", operation="chat")
P = "openai-responses"


def decode(body: dict[str, Any]) -> ir.Request:
    model, stream = PROTO.inspect(ROUTE, body, {}, {})
    return PROTO.decode_request(Inbound(model=model, stream=stream, operation="chat", body=body))


def test_codex_body() -> None:
    req = decode(codex_body())
    assert req.model == "m-codex" and req.stream is True
    assert [p.text for p in req.system] == ["<permissions>", "You are Codex."]
    shape = [(m.role, [type(p).__name__ for p in m.content]) for m in req.messages]
    assert shape == [
        ("user", ["TextPart"]), ("user", ["TextPart"]),
        ("assistant", ["ReasoningPart", "ToolCallPart"]),
        ("user", ["ToolResultPart"]),
        ("assistant", ["TextPart"]),
        ("system", ["TextPart"]),
        ("user", ["TextPart"]),
        ("assistant", ["ToolCallPart"]),
        ("user", ["ToolResultPart"]),
        ("assistant", ["ToolCallPart"]),
        ("user", ["ToolResultPart"]),
        ("user", ["TextPart"]),
    ]
    m = req.messages
    assert m[2].content[0] == ir.ReasoningPart(
        text="**Plan**", signature="enc-responses", signature_protocol=P,
        provider_data={P: {"id": "rs_1", "summary": [{"type": "summary_text", "text": "**Plan**"}]}})
    assert m[2].content[1] == ir.ToolCallPart(id="call_1", name="exec_command", arguments='{"cmd":"ls"}',
                                              provider_data={P: {"id": "fc_1"}})
    assert m[3].content[0] == ir.ToolResultPart(tool_call_id="call_1", name="exec_command",
                                                content=[ir.TextPart(text="a.txt\nb.txt")])
    assert m[5].content[0].text == "<turn note>"
    assert m[7].content[0].kind == "custom" and m[7].content[0].arguments == "*** Begin Patch\n*** End Patch"
    assert m[8].content[0].name == "apply_patch"
    assert m[9].content[0].name == "mcp__fs__read"
    assert m[10].content[0] == ir.ToolResultPart(tool_call_id="call_3", name="mcp__fs__read",
                                                 content=[ir.TextPart(text="AAA")])
    assert [(t.name, t.kind) for t in req.tools] == [("exec_command", "function"), ("apply_patch", "custom"),
                                                     ("mcp__fs__read", "function")]
    assert req.tools[1].provider_data == {P: {"format": {"type": "grammar", "syntax": "lark",
                                                         "definition": "start: begin_patch"}}}
    assert req.tools[2].provider_data == {P: {"namespace": "mcp__fs__", "name": "read"}}
    assert req.tools[2].description == "Read a file"
    assert req.tool_choice == ir.ToolChoice(mode="auto", parallel=True)
    assert req.reasoning == ir.Reasoning(enabled=True, effort=None, include_thoughts=True)
    assert req.response_format is None and req.max_tokens is None


async def test_codex_body_survives_translation_to_a_responses_upstream(aiohttp_server: Any) -> None:
    """Decoded and re-encoded, Codex's history passes the strict fake (pairing,
    shapes, our own encrypted reasoning) and the system text arrives in order."""
    log: list[dict[str, Any]] = []
    server = await aiohttp_server(make_app(log))
    ureq = PROTO.encode_request(decode(codex_body()), "gpt-up", stream=False)
    async with aiohttp.ClientSession() as s:
        async with s.post(str(server.make_url("/v1/responses")), data=ureq.body,
                          headers={"Authorization": "Bearer upstream-secret"}) as r:
            assert r.status == 200, await r.text()
            resp = PROTO.decode_response(await r.read())
    assert resp.content[0].text == "system: <permissions>\n\nYou are Codex.|<turn note>"
    sent = log[-1]["body"]
    assert sent["tools"][2]["name"] == "mcp__fs__read"
    assert [t["type"] for t in sent["tools"]] == ["function", "custom", "function"]
    assert sent["tools"][1]["format"]["syntax"] == "lark"


def test_sdk_body_with_images_files_schema_and_knobs() -> None:
    body = {
        "model": "gpt-x",
        "instructions": "Answer in JSON.",
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "Describe these."},
                {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "high"},
                {"type": "input_image", "image_url": "https://example.com/cat.jpg"},
                {"type": "input_image", "file_id": "file-abc"},
                {"type": "input_file", "filename": "r.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"},
                {"type": "input_file", "file_url": "https://example.com/doc.pdf"},
            ]},
            {"role": "assistant", "content": "It is a cat."},
            {"role": "user", "content": "And now?"},
        ],
        "text": {"format": {"type": "json_schema", "name": "answer", "strict": True,
                            "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}},
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}},
                   "strict": True}],
        "tool_choice": {"type": "function", "name": "lookup"},
        "parallel_tool_calls": False,
        "max_output_tokens": 500, "temperature": 0.2, "top_p": 0.9,
        "reasoning": {"effort": "low"},
        "safety_identifier": "user-7", "metadata": {"k": "v"}, "truncation": "auto", "service_tier": "flex",
        "top_logprobs": 2,
    }
    req = decode(body)
    assert [p.text for p in req.system] == ["Answer in JSON."]
    parts = req.messages[0].content
    assert parts[0] == ir.TextPart(text="Describe these.")
    assert parts[1] == ir.ImagePart(media_type="image/png", data=PNG, detail="high")
    assert parts[2] == ir.ImagePart(url="https://example.com/cat.jpg")
    assert parts[3] == ir.FilePart(file_id="file-abc", provider_data={P: {"kind": "image", "detail": None}})
    assert parts[4] == ir.FilePart(media_type="application/pdf", data="JVBERi0x", filename="r.pdf")
    assert parts[5] == ir.FilePart(url="https://example.com/doc.pdf", media_type="application/pdf")
    assert req.messages[1] == ir.Message(role="assistant", content=[ir.TextPart(text="It is a cat.")])
    assert req.messages[2] == ir.Message(role="user", content=[ir.TextPart(text="And now?")])
    assert req.response_format == ir.ResponseFormat(type="json_schema", name="answer", strict=True,
                                                    schema={"type": "object", "properties": {"a": {"type": "string"}}})
    assert req.tools == [ir.Tool(name="lookup", parameters={"type": "object", "properties": {}}, strict=True)]
    assert req.tool_choice == ir.ToolChoice(mode="tool", name="lookup", parallel=False)
    assert (req.max_tokens, req.temperature, req.top_p) == (500, 0.2, 0.9)
    assert req.reasoning == ir.Reasoning(enabled=True, effort="low", include_thoughts=False)
    assert req.user == "user-7" and req.stream is False


def test_string_input_json_object_and_effort_none() -> None:
    req = decode({"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}},
                  "reasoning": {"effort": "none"}, "tool_choice": "required"})
    assert req.messages == [ir.Message(role="user", content=[ir.TextPart(text="hi")])]
    assert req.response_format == ir.ResponseFormat(type="json_object")
    assert req.reasoning == ir.Reasoning(enabled=False, effort="none", include_thoughts=False)
    assert req.tool_choice == ir.ToolChoice(mode="required")


def test_allowed_tools_filters_the_tool_list() -> None:
    tools = [{"type": "function", "name": n} for n in ("a", "b", "c")]
    req = decode({"model": "m", "input": "hi", "tools": tools, "tool_choice": {
        "type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "b"}]}})
    assert [t.name for t in req.tools] == ["b"]
    assert req.tool_choice == ir.ToolChoice(mode="required")


def test_hosted_tool_choice_lets_the_model_choose() -> None:
    req = decode({"model": "m", "input": "hi", "tools": [{"type": "web_search"}],
                  "tool_choice": {"type": "web_search"}})
    assert req.tools == [] and req.tool_choice == ir.ToolChoice(mode="auto")


def test_foreign_signature_comes_back_through_encrypted_content() -> None:
    """An Anthropic thinking signature shown to Codex as encrypted_content is
    recognised when Codex replays the item."""
    part = ir.ReasoningPart(text="hmm", signature="sig-anthropic", signature_protocol="anthropic-messages")
    resp = ir.Response(id="x", model="m", content=[part, ir.TextPart(text="ok")])
    from responses_testlib import ctx

    out = orjson.loads(PROTO.encode_response(resp, ctx()))
    item = out["output"][0]
    assert item["encrypted_content"].startswith("cpx1:")
    req = decode({"model": "m", "input": [{"role": "user", "content": "q"}, item, out["output"][1],
                                          {"role": "user", "content": "more"}]})
    back = req.messages[1].content[0]
    assert (back.text, back.signature, back.signature_protocol) == ("hmm", "sig-anthropic", "anthropic-messages")


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "hi"}, "model"),
    ({"model": "m", "input": "hi", "stream": "yes"}, "stream"),
    ({"model": "m", "input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"model": "m", "input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"model": "m", "input": "hi", "background": True}, "background"),
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 5}, "input"),
    ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x"}]}]},
     "input[0].content[0].image_url"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image",
                                                            "image_url": "data:image/png,abc"}]}]},
     "input[0].content[0].image_url"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}]},
     "input[0].arguments"),
    ({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"model": "m", "input": "hi", "max_output_tokens": "10"}, "max_output_tokens"),
    ({"model": "m", "input": "hi", "temperature": True}, "temperature"),
    ({"model": "m", "input": "hi", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"model": "m", "input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"model": "m", "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "m", "input": "hi", "tool_choice": 3}, "tool_choice"),
])
def test_malformed_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyError) as info:
        decode(body)
    assert info.value.kind == "invalid_request" and info.value.status == 400
    assert info.value.param == param
