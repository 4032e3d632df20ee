"""Client side, responses: IR -> Gemini ``GenerateContentResponse`` bodies,
stream chunks (SSE with CRLF framing for ``alt=sse``, else one JSON array
written element by element) and native errors."""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext, StreamEncoder
from cheapproxy.sse import encode_frame

from .upstream_request import parse_arguments
from .wire import PROTOCOL, status_name, stop_to_wire, usage_to_wire


def error_status(err: ProxyError) -> int:
    # an overloaded upstream is 503 UNAVAILABLE for Gemini clients (529 is Anthropic's)
    return 503 if err.kind == "upstream_overloaded" else err.status


def error_body(code: int, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "status": status_name(code)}})


def encode_error(err: ProxyError) -> tuple[int, bytes]:
    code = error_status(err)
    return code, error_body(code, err.message)


def _gemini_sig(pd: dict[str, Any]) -> str | None:
    sig = (pd.get(PROTOCOL) or {}).get("thoughtSignature")
    return sig if isinstance(sig, str) and sig else None


def part_to_wire(part: ir.Part) -> dict[str, Any] | None:
    """One IR content part of an answer -> a Gemini part (None = not shown)."""
    if isinstance(part, ir.TextPart):
        d: dict[str, Any] = {"text": part.text}
        sig = _gemini_sig(part.provider_data)
        if sig:
            d["thoughtSignature"] = sig
        return d
    if isinstance(part, ir.ReasoningPart):
        if part.redacted and not part.text:
            return None
        d = {"text": part.text, "thought": True}
        if part.signature and part.signature_protocol == PROTOCOL:
            d["thoughtSignature"] = part.signature
        return d
    if isinstance(part, ir.ToolCallPart):
        fc = {"id": part.id, "name": part.name, "args": parse_arguments(part.arguments, part.kind)}
        d = {"functionCall": fc}
        sig = _gemini_sig(part.provider_data)
        if sig:
            d["thoughtSignature"] = sig
        return d
    if isinstance(part, (ir.ImagePart, ir.FilePart)):
        if part.data:
            return {"inlineData": {"mimeType": part.media_type or "application/octet-stream", "data": part.data}}
        if part.url:
            return {"fileData": {"mimeType": part.media_type or "application/octet-stream", "fileUri": part.url}}
    return None


def _envelope(parts: list[dict[str, Any]], finish: str | None, usage: ir.Usage | None,
              model: str, response_id: str) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
    if finish:
        cand["finishReason"] = finish
    cand["index"] = 0
    out: dict[str, Any] = {"candidates": [cand]}
    if usage is not None:
        out["usageMetadata"] = usage_to_wire(usage)
    out["modelVersion"] = model
    out["responseId"] = response_id
    return out


def encode_response(response: ir.Response, ctx: EncodeContext) -> bytes:
    parts = [w for w in (part_to_wire(p) for p in response.content) if w is not None]
    if not parts:
        parts = [{"text": ""}]
    body = _envelope(parts, stop_to_wire(response.stop_reason), response.usage, ctx.model,
                     response.id or ctx.request_id)
    return orjson.dumps(body)


class GeminiStreamEncoder(StreamEncoder):
    """IR events -> Gemini chunks, one chunk per delta (no buffering beyond a
    single function call, which Gemini sends whole)."""

    def __init__(self, ctx: EncodeContext, *, sse: bool) -> None:
        self.ctx = ctx
        self.sse = sse
        self.content_type = "text/event-stream; charset=utf-8" if sse else "application/json; charset=utf-8"
        self.model = ctx.model
        self.response_id = ctx.request_id
        self.usage: ir.Usage | None = None
        self.calls: dict[int, ir.ToolCallPart] = {}
        self.args: dict[int, list[str]] = {}
        self.kinds: dict[int, str] = {}
        self.count = 0  # chunks written (JSON array separators)
        self.done = False

    def start(self) -> bytes:
        return b"" if self.sse else b"["

    def _chunk(self, obj: dict[str, Any]) -> bytes:
        data = orjson.dumps(obj)
        if self.sse:
            return encode_frame(data, crlf=True)
        sep = b"" if self.count == 0 else b",\r\n"
        self.count += 1
        return sep + data

    def _parts(self, parts: list[dict[str, Any]], finish: str | None = None) -> bytes:
        return self._chunk(_envelope(parts, finish, self.usage, self.model, self.response_id))

    def encode(self, event: ir.StreamEvent) -> bytes:
        if self.done:
            return b""
        if isinstance(event, ir.TextDelta):
            return self._parts([{"text": event.text}]) if event.text else b""
        if isinstance(event, ir.ReasoningDelta):
            d: dict[str, Any] = {"text": event.text, "thought": True}
            if event.signature and event.signature_protocol == PROTOCOL:
                d["thoughtSignature"] = event.signature
            elif not event.text:
                return b""  # a foreign signature alone: nothing a Gemini client can use
            return self._parts([d])
        if isinstance(event, ir.ToolCallDelta):
            self.args.setdefault(event.index, []).append(event.arguments)
            return b""
        if isinstance(event, ir.PartStart):
            return self._start(event)
        if isinstance(event, ir.PartStop):
            return self._stop(event)
        if isinstance(event, ir.MessageStart):
            self.response_id = event.id or self.response_id
            if event.usage is not None:
                self.usage = event.usage
            return b""
        if isinstance(event, ir.UsageUpdate):
            self.usage = ir.merge_usage(self.usage, event.usage)
            return b""
        if isinstance(event, ir.MessageStop):
            if event.usage is not None:
                self.usage = ir.merge_usage(self.usage, event.usage)
            self.done = True
            return self._parts([{"text": ""}], stop_to_wire(event.stop_reason))
        if isinstance(event, ir.StreamError):
            self.done = True
            return self._chunk(orjson.loads(error_body(event.status, event.message)))
        return b""

    def _start(self, event: ir.PartStart) -> bytes:
        part = event.part
        if isinstance(part, ir.ToolCallPart):
            self.calls[event.index] = part
            if part.arguments:
                self.args[event.index] = [part.arguments]
            return b""
        if isinstance(part, (ir.ImagePart, ir.FilePart)):
            wire = part_to_wire(part)  # media arrives whole in its PartStart
            return self._parts([wire]) if wire else b""
        if isinstance(part, ir.TextPart) and part.text:
            return self._parts([{"text": part.text}])
        if isinstance(part, ir.ReasoningPart) and part.text:
            return self._parts([{"text": part.text, "thought": True}])
        self.kinds[event.index] = "reasoning" if isinstance(part, ir.ReasoningPart) else "text"
        return b""

    def _stop(self, event: ir.PartStop) -> bytes:
        call = self.calls.pop(event.index, None)
        if call is not None:
            args = "".join(self.args.pop(event.index, []))
            wire = {"id": call.id, "name": call.name, "args": parse_arguments(args, call.kind)}
            d: dict[str, Any] = {"functionCall": wire}
            sig = _gemini_sig(event.provider_data) or _gemini_sig(call.provider_data)
            if sig:
                d["thoughtSignature"] = sig
            return self._parts([d])
        kind = self.kinds.pop(event.index, "text")
        sig = _gemini_sig(event.provider_data)
        if sig and kind == "text":
            # Gemini puts a text signature on a closing part with empty text
            return self._parts([{"text": "", "thoughtSignature": sig}])
        return b""

    def error(self, err: ProxyError) -> bytes:
        if self.done:
            return b""
        self.done = True
        code = error_status(err)
        return self._chunk({"error": {"code": code, "message": err.message, "status": status_name(code)}})

    def close(self) -> bytes:
        return b"" if self.sse else b"]"


def encode_count_tokens(total: int) -> bytes:
    return orjson.dumps({"totalTokens": total})
