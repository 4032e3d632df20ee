"""Shared helpers for the anthropic-messages tests (a uniquely named module, not
a conftest, so the plugin test directories stay independent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import EncodeContext
from cheapproxy.sse import SSEParser
from cheapproxy_anthropic.codec import AnthropicMessagesProtocol

FIXTURES = Path(__file__).parent / "fixtures"
CODEC = AnthropicMessagesProtocol()
EPH = {"type": "ephemeral"}

# what Claude Code 2.1 sends on a tool round trip (clients.md), trimmed to one tool
CLAUDE_CODE_BODY: dict[str, Any] = {
    "model": "claude-opus-4-8",
    "max_tokens": 64000,
    "stream": True,
    "thinking": {"type": "adaptive"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
    "metadata": {"user_id": '{"device_id":"d1","account_uuid":"","session_id":"s1"}'},
    "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.abc; cc_entrypoint=sdk-cli;"},
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.", "cache_control": EPH},
    ],
    "tools": [
        {"name": "Bash", "description": "Run a command", "input_schema": {
            "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"],
            "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
    ],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "please use the tool"}]},
        {"role": "system", "content": "<system-reminder>Today's date is 2026-08-01.</system-reminder>"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I will run ls.", "signature": "EqQBCgIYAhIMsig=="},
            {"type": "redacted_thinking", "data": "EmwKAhgBredacted"},
            {"type": "tool_use", "id": "toolu_01ABC", "name": "Bash", "input": {"command": "ls"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01ABC", "is_error": True, "content": [
                {"type": "text", "text": "permission denied"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            ]},
            {"type": "text", "text": "go on", "cache_control": EPH},
        ]},
    ],
}


def golden(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def ctx(model: str = "client-model", request: ir.Request | None = None) -> EncodeContext:
    return EncodeContext(model=model, request_id="req-test", created=1_700_000_000, request=request)


def frames(body: bytes) -> list[tuple[str | None, Any]]:
    """(event, parsed data) of every SSE frame."""
    p = SSEParser()
    out = p.feed(body) + p.close()
    return [(f.event, orjson.loads(f.data)) for f in out]


def decode_stream(body: bytes, chunks: list[bytes] | None = None) -> list[ir.StreamEvent]:
    d = CODEC.stream_decoder()
    events: list[ir.StreamEvent] = []
    for c in chunks if chunks is not None else [body]:
        events += d.feed(c)
    return events + d.close()


def encode_stream(events: list[ir.StreamEvent], model: str = "client-model") -> list[bytes]:
    """The client encoder's output, one bytes object per IR event."""
    enc = CODEC.stream_encoder(ctx(model))
    return [enc.start()] + [enc.encode(e) for e in events] + [enc.close()]


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(body)})
    out, prev = [], 0
    for p in points:
        out.append(body[prev:p])
        prev = p
    out.append(body[prev:])
    return out
