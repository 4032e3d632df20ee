"""Helpers shared by the openai-responses plugin tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import EncodeContext
from cheapproxy.sse import SSEParser
from cheapproxy_openai_responses.codec import ResponsesProtocol

FIXTURES = Path(__file__).parent / "fixtures"
PROTO = ResponsesProtocol()


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def ctx(request: ir.Request | None = None, model: str = "m-client") -> EncodeContext:
    return EncodeContext(model=model, request_id="req-0123abcd", created=1760000000, request=request)


def frames(body: bytes) -> list[tuple[str | None, Any]]:
    """(event line, parsed data) of every SSE frame of ``body``."""
    p = SSEParser()
    out = [(f.event, orjson.loads(f.data) if f.data != "[DONE]" else "[DONE]") for f in p.feed(body)]
    out += [(f.event, orjson.loads(f.data)) for f in p.close()]
    return out


def decode_stream(body: bytes, chunks: list[bytes] | None = None) -> list[ir.StreamEvent]:
    dec = PROTO.stream_decoder()
    events: list[ir.StreamEvent] = []
    for c in chunks if chunks is not None else [body]:
        events += dec.feed(c)
    return events + dec.close()


def encode_stream(events: list[ir.StreamEvent], c: EncodeContext) -> bytes:
    enc = PROTO.stream_encoder(c)
    out = enc.start()
    for ev in events:
        out += enc.encode(ev)
    return out + enc.close()


def meaning(resp: ir.Response) -> dict[str, Any]:
    """What must survive a round trip: texts, reasoning, calls, stop, usage."""
    parts: list[Any] = []
    for p in resp.content:
        if isinstance(p, ir.TextPart):
            parts.append(("text", p.text))
        elif isinstance(p, ir.ReasoningPart):
            parts.append(("reasoning", p.text, p.signature, p.signature_protocol))
        elif isinstance(p, ir.ToolCallPart):
            parts.append(("call", p.id, p.name, p.kind, p.arguments))
    return {"parts": parts, "stop": resp.stop_reason, "usage": resp.usage}


def user(text: str) -> ir.Message:
    return ir.Message(role="user", content=[ir.TextPart(text=text)])


def codex_body() -> dict[str, Any]:
    """The shape Codex 0.169 sends (clients.md): no instructions, developer
    messages, item ids, namespace + custom + hosted tools, encrypted reasoning."""
    return {
        "model": "m-codex",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions>"}]},
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
            {"type": "message", "role": "user", "id": "msg_u1",
             "content": [{"type": "input_text", "text": "<environment_context>cwd=/w</environment_context>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "**Plan**"}],
             "content": None, "encrypted_content": "enc-responses"},
            {"type": "function_call", "id": "fc_1", "name": "exec_command", "arguments": "{\"cmd\":\"ls\"}",
             "call_id": "call_1"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a.txt\nb.txt"},
            {"type": "message", "role": "assistant", "id": "msg_a1",
             "content": [{"type": "output_text", "text": "Two files.", "annotations": []}]},
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<turn note>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "now patch"}]},
            {"type": "custom_tool_call", "id": "ctc_1", "status": "completed", "call_id": "call_2",
             "name": "apply_patch", "input": "*** Begin Patch\n*** End Patch"},
            {"type": "custom_tool_call_output", "call_id": "call_2", "output": "Success"},
            {"type": "function_call", "name": "read", "namespace": "mcp__fs__", "arguments": "{\"path\":\"a\"}",
             "call_id": "call_3"},
            {"type": "function_call_output", "call_id": "call_3", "output": [{"type": "input_text", "text": "AAA"}]},
            {"type": "web_search_call", "id": "ws_1", "status": "completed",
             "action": {"type": "search", "query": "x"}},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "thanks [echo]"}]},
        ],
        "tools": [
            {"type": "function", "name": "exec_command", "description": "Runs a command", "strict": False,
             "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"],
                            "additionalProperties": False}},
            {"type": "custom", "name": "apply_patch", "description": "Edit files",
             "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch"}},
            {"type": "namespace", "name": "mcp__fs__", "description": "Filesystem",
             "tools": [{"type": "function", "name": "read", "description": "Read a file",
                        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]},
            {"type": "web_search", "external_web_access": False},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a1b2-c3d4",
        "client_metadata": {"originator": "codex_exec"},
        "text": {"verbosity": "low"},
    }
