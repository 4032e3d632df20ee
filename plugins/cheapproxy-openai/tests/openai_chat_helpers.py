"""Shared helpers for the openai-chat plugin tests (imported by name; pytest
puts this directory on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import EncodeContext, Inbound
from cheapproxy_openai.codec import OpenAIChatProtocol

FIXTURES = Path(__file__).parent / "fixtures"
CODEC = OpenAIChatProtocol()


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def decode_stream(chunks: list[bytes]) -> list[ir.StreamEvent]:
    dec = CODEC.stream_decoder()
    events: list[ir.StreamEvent] = []
    for c in chunks:
        events += dec.feed(c)
    return events + dec.close()


def inbound(body: dict[str, Any], operation: str = "chat") -> Inbound:
    return Inbound(model=body.get("model", ""), stream=bool(body.get("stream")), operation=operation, body=body)


def context(body: dict[str, Any] | None = None, model: str = "client-model", operation: str = "chat") -> EncodeContext:
    """An EncodeContext as the pipeline builds it for a client body."""
    body = body if body is not None else {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    inb = inbound(body, operation)
    req = CODEC.decode_request(inb) if operation == "chat" else None
    return EncodeContext(model=model, request_id="req-1", created=1754000000, request=req, inbound=inb)


def encode_stream(events: list[ir.StreamEvent], ctx: EncodeContext) -> bytes:
    enc = CODEC.stream_encoder(ctx)
    return enc.start() + b"".join(enc.encode(e) for e in events) + enc.close()


def sse_payloads(body: bytes) -> list[Any]:
    """The JSON of every ``data:`` frame of an LF-framed body ("[DONE]" kept as is)."""
    out: list[Any] = []
    for frame in body.split(b"\n\n"):
        if not frame.strip():
            continue
        assert frame.startswith(b"data: "), frame
        data = frame[6:]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def summary(resp: ir.Response) -> dict[str, Any]:
    """What a client cares about, for comparing answers in meaning."""
    return {
        "text": "".join(p.text for p in resp.content if isinstance(p, ir.TextPart)),
        "reasoning": "".join(p.text for p in resp.content if isinstance(p, ir.ReasoningPart)),
        "calls": [
            (p.id, p.name, orjson.loads(p.arguments))
            for p in resp.content
            if isinstance(p, ir.ToolCallPart)
        ],
        "stop": resp.stop_reason,
        "usage": resp.usage,
    }
