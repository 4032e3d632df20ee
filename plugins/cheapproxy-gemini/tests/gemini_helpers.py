"""Helpers shared by the gemini plugin tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import orjson

from cheapproxy import ir
from cheapproxy.config import UpstreamConfig
from cheapproxy.protocol import EncodeContext, Inbound
from cheapproxy.provider import NoOptions
from cheapproxy_gemini.codec import GeminiProtocol
from cheapproxy_gemini.decode import GeminiStreamDecoder
from cheapproxy_gemini.provider import GeminiProvider

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def normalize(events: list[ir.StreamEvent]) -> list[Any]:
    """Events as plain data with generated call ids replaced by their order of
    appearance (``call_<hex>`` ids are random by design)."""
    ids: dict[str, str] = {}
    out = []
    for ev in events:
        d = attrs.asdict(ev, recurse=True)
        part = d.get("part")
        if isinstance(part, dict) and part.get("type") == "tool_call" and part["id"].startswith("call_"):
            part["id"] = ids.setdefault(part["id"], f"call#{len(ids)}")
        out.append(d)
    return out


def make_provider(base_url: str, api_key: str | None = "upstream-secret") -> GeminiProvider:
    up = UpstreamConfig(name="gem", provider="gemini", base_url=base_url, api_key=api_key)
    return GeminiProvider(up, NoOptions())


def decode_stream(body: bytes, pieces: list[bytes] | None = None) -> list[ir.StreamEvent]:
    """Run the upstream stream decoder over ``body`` (or the given split)."""
    dec = GeminiStreamDecoder()
    events: list[ir.StreamEvent] = []
    for piece in pieces if pieces is not None else [body]:
        events.extend(dec.feed(piece))
    events.extend(dec.close())
    return events


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in zip(points, points[1:])]


def encode_stream(events: list[ir.StreamEvent], *, sse: bool = True, model: str = "client-model") -> bytes:
    """Run the client-side stream encoder over ``events``."""
    inbound = Inbound(model=model, stream=True, operation="chat", body={}, query={"alt": "sse"} if sse else {})
    enc = GeminiProtocol().stream_encoder(EncodeContext(model=model, request_id="req-1", created=0, inbound=inbound))
    return enc.start() + b"".join(enc.encode(e) for e in events) + enc.close()


def text_of(response: ir.Response) -> str:
    return "".join(p.text for p in response.content if isinstance(p, ir.TextPart))


def calls_of(response: ir.Response) -> list[tuple[str, Any]]:
    return [(p.name, orjson.loads(p.arguments)) for p in response.content if isinstance(p, ir.ToolCallPart)]
