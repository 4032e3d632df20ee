"""Client side: IR stream events -> the Responses SSE event sequence.

Every frame is ``event: <type>`` + ``data: <json>`` with a ``sequence_number``
counting from 0 (protocols.md 2.5, 5.9 D).  Each IR block becomes one output
item with its added / delta / done events; the terminal event carries the full
output array and the usage.  No ``[DONE]``.
"""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext, StreamEncoder
from cheapproxy.sse import encode_frame

from .common import (
    CallStyle,
    envelope,
    error_type_for,
    message_item,
    output_text,
    reasoning_item,
    response_id,
    status_for_stop,
    tools_by_name,
    unwrap_custom_input,
    usage_to_wire,
    wrap_signature,
)


class _Block:
    """The output item being streamed for one open IR block."""

    __slots__ = ("part", "output_index", "item_id", "text", "sig", "sig_protocol", "summary_open", "style")

    def __init__(self, part: ir.Part, output_index: int, item_id: str, style: CallStyle | None) -> None:
        self.part = part
        self.output_index = output_index
        self.item_id = item_id
        self.text: list[str] = []
        self.sig: list[str] = []
        self.sig_protocol = part.signature_protocol if isinstance(part, ir.ReasoningPart) else None
        self.summary_open = False
        self.style = style


class ResponsesStreamEncoder(StreamEncoder):
    """One client stream.  Emits nothing after its terminal event."""

    content_type = "text/event-stream; charset=utf-8"

    def __init__(self, ctx: EncodeContext) -> None:
        self.ctx = ctx
        self.rid = response_id(ctx.request_id)
        self.suffix = self.rid[5:]
        self.tools = tools_by_name(ctx.request)
        self.seq = 0
        self.started = False
        self.finished = False
        self.output: list[dict[str, Any]] = []  # completed items, in output order
        self.blocks: dict[int, _Block] = {}  # IR index -> open block
        self.usage: ir.Usage | None = None

    # ------------------------------------------------------------ framing

    def _frame(self, event_type: str, payload: dict[str, Any]) -> bytes:
        payload["type"] = event_type
        payload["sequence_number"] = self.seq
        self.seq += 1
        return encode_frame(orjson.dumps(payload), event_type)

    def _snapshot(self, status: str) -> dict[str, Any]:
        return envelope(self.ctx.model, self.rid, self.ctx.created, self.ctx.request, status)

    def _start(self) -> bytes:
        self.started = True
        return (self._frame("response.created", {"response": self._snapshot("in_progress")})
                + self._frame("response.in_progress", {"response": self._snapshot("in_progress")}))

    # ------------------------------------------------------------ events

    def encode(self, event: ir.StreamEvent) -> bytes:
        if self.finished:
            return b""
        if isinstance(event, ir.StreamError):
            return self.error(ProxyError(event.kind, event.message, status=event.status))
        out = b"" if self.started else self._start()
        if isinstance(event, ir.MessageStart):
            if event.usage is not None:
                self.usage = ir.merge_usage(self.usage, event.usage)
        elif isinstance(event, ir.PartStart):
            out += self._open(event)
        elif isinstance(event, ir.TextDelta):
            out += self._text(event)
        elif isinstance(event, ir.ReasoningDelta):
            out += self._reasoning(event)
        elif isinstance(event, ir.ToolCallDelta):
            out += self._args(event)
        elif isinstance(event, ir.PartStop):
            out += self._close(event.index)
        elif isinstance(event, ir.UsageUpdate):
            self.usage = ir.merge_usage(self.usage, event.usage)
        elif isinstance(event, ir.MessageStop):
            if event.usage is not None:
                self.usage = ir.merge_usage(self.usage, event.usage)
            out += self._finish(event.stop_reason)
        return out

    def _open(self, ev: ir.PartStart) -> bytes:
        out = b""
        for idx in list(self.blocks):  # IR blocks never interleave; close a stray one
            out += self._close(idx)
        part = ev.part
        oi = len(self.output)
        self.output.append({})  # placeholder keeps output_index stable
        if isinstance(part, ir.TextPart):
            block = _Block(part, oi, f"msg_{self.suffix}_{oi}", None)
            out += self._frame("response.output_item.added", {
                "output_index": oi, "item": message_item(block.item_id, "", "in_progress")})
            out += self._frame("response.content_part.added", {
                "item_id": block.item_id, "output_index": oi, "content_index": 0, "part": output_text("")})
            if part.text:
                block.text.append(part.text)
                out += self._text_frame(block, part.text)
        elif isinstance(part, ir.ReasoningPart):
            block = _Block(part, oi, f"rs_{self.suffix}_{oi}", None)
            out += self._frame("response.output_item.added", {
                "output_index": oi, "item": reasoning_item(block.item_id, "", None)})
            if part.text:
                out += self._summary_delta(block, part.text)
            if part.signature:
                block.sig.append(part.signature)
        elif isinstance(part, ir.ToolCallPart):
            style = CallStyle(part, self.tools)
            block = _Block(part, oi, f"{'ctc' if style.custom else 'fc'}_{self.suffix}_{oi}", style)
            out += self._frame("response.output_item.added", {
                "output_index": oi, "item": style.call_item(block.item_id, part.id, "", "in_progress")})
            if part.arguments:
                out += self._args_text(block, part.arguments)
        else:
            # images/files/results never appear in a model answer; keep indices sane
            self.output.pop()
            return out
        self.blocks[ev.index] = block
        return out

    def _text(self, ev: ir.TextDelta) -> bytes:
        block = self.blocks.get(ev.index)
        if block is None or not ev.text:
            return b""
        block.text.append(ev.text)
        return self._text_frame(block, ev.text)

    def _text_frame(self, block: _Block, text: str) -> bytes:
        return self._frame("response.output_text.delta", {
            "item_id": block.item_id, "output_index": block.output_index, "content_index": 0,
            "delta": text, "logprobs": []})

    def _reasoning(self, ev: ir.ReasoningDelta) -> bytes:
        block = self.blocks.get(ev.index)
        if block is None:
            return b""
        if ev.signature:
            block.sig.append(ev.signature)
            block.sig_protocol = ev.signature_protocol or block.sig_protocol
        return self._summary_delta(block, ev.text) if ev.text else b""

    def _summary_delta(self, block: _Block, text: str) -> bytes:
        out = b""
        if not block.summary_open:
            block.summary_open = True
            out += self._frame("response.reasoning_summary_part.added", {
                "item_id": block.item_id, "output_index": block.output_index, "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}})
        block.text.append(text)
        return out + self._frame("response.reasoning_summary_text.delta", {
            "item_id": block.item_id, "output_index": block.output_index, "summary_index": 0, "delta": text})

    def _args(self, ev: ir.ToolCallDelta) -> bytes:
        block = self.blocks.get(ev.index)
        if block is None or not ev.arguments:
            return b""
        return self._args_text(block, ev.arguments)

    def _args_text(self, block: _Block, text: str) -> bytes:
        block.text.append(text)
        style = block.style
        assert style is not None
        if style.unwrap:
            return b""  # {"input": ...} JSON: unwrapped whole at the end of the call
        event = "response.custom_tool_call_input.delta" if style.custom else "response.function_call_arguments.delta"
        return self._frame(event, {"item_id": block.item_id, "output_index": block.output_index, "delta": text})

    def _close(self, index: int) -> bytes:
        block = self.blocks.pop(index, None)
        if block is None:
            return b""
        oi, iid = block.output_index, block.item_id
        text = "".join(block.text)
        part = block.part
        if isinstance(part, ir.TextPart):
            item = message_item(iid, text, "completed")
            out = self._frame("response.output_text.done", {
                "item_id": iid, "output_index": oi, "content_index": 0, "text": text, "logprobs": []})
            out += self._frame("response.content_part.done", {
                "item_id": iid, "output_index": oi, "content_index": 0, "part": output_text(text)})
        elif isinstance(part, ir.ReasoningPart):
            out = b""
            if block.summary_open:
                out += self._frame("response.reasoning_summary_text.done", {
                    "item_id": iid, "output_index": oi, "summary_index": 0, "text": text})
                out += self._frame("response.reasoning_summary_part.done", {
                    "item_id": iid, "output_index": oi, "summary_index": 0,
                    "part": {"type": "summary_text", "text": text}})
            final = ir.ReasoningPart(text=text, signature="".join(block.sig) or None,
                                     signature_protocol=block.sig_protocol, redacted=part.redacted)
            item = reasoning_item(iid, text, wrap_signature(final))
        else:
            assert isinstance(part, ir.ToolCallPart) and block.style is not None
            style = block.style
            if style.custom:
                raw = unwrap_custom_input(text) if style.unwrap else text
                out = b""
                if style.unwrap and raw:
                    out += self._frame("response.custom_tool_call_input.delta",
                                       {"item_id": iid, "output_index": oi, "delta": raw})
                out += self._frame("response.custom_tool_call_input.done",
                                   {"item_id": iid, "output_index": oi, "input": raw})
                item = style.call_item(iid, part.id, raw, "completed")
            else:
                args = text or "{}"
                out = self._frame("response.function_call_arguments.done", {
                    "item_id": iid, "output_index": oi, "name": style.name, "arguments": args})
                item = style.call_item(iid, part.id, args, "completed")
        self.output[oi] = item
        return out + self._frame("response.output_item.done", {"output_index": oi, "item": item})

    def _finish(self, stop: ir.StopReason) -> bytes:
        out = b"" if self.started else self._start()
        for idx in list(self.blocks):
            out += self._close(idx)
        status, incomplete = status_for_stop(stop)
        if status == "failed":
            return out + self.error(ProxyError("upstream_failed", "the upstream reported a failure"))
        snap = self._snapshot(status)
        snap["output"] = [item for item in self.output if item]
        snap["incomplete_details"] = incomplete
        snap["usage"] = usage_to_wire(self.usage)
        self.finished = True
        event = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._frame(event, {"response": snap})

    # ------------------------------------------------------------ errors / end

    def error(self, err: ProxyError) -> bytes:
        """``error`` (nested error object, which the openai SDK raises as
        APIError, plus the flat fields the API reference documents), then the
        terminal ``response.failed`` that Codex reads."""
        if self.finished:
            return b""
        self.finished = True
        status = 503 if err.kind == "upstream_overloaded" else err.status
        code = err.code or _error_code(err.kind, status)
        etype = error_type_for(status)
        out = self._frame("error", {
            "code": code, "message": err.message, "param": err.param,
            "error": {"type": etype, "code": code, "message": err.message, "param": err.param}})
        snap = self._snapshot("failed")
        snap["output"] = [item for item in self.output if item]
        snap["error"] = {"code": code, "message": err.message}
        snap["usage"] = usage_to_wire(self.usage) if self.usage is not None else None
        return out + self._frame("response.failed", {"response": snap})

    def close(self) -> bytes:
        """The IR stream ended without MessageStop: finish the envelope anyway."""
        if self.finished:
            return b""
        stop = ir.StopReason.END_TURN
        if any(isinstance(b.part, ir.ToolCallPart) for b in self.blocks.values()) or any(
            item.get("type") in ("function_call", "custom_tool_call") for item in self.output if item
        ):
            stop = ir.StopReason.TOOL_USE
        return self._finish(stop)


def _error_code(kind: str, status: int) -> str:
    """The ``code`` of an in-stream error (the values OpenAI uses)."""
    if status == 429:
        return "rate_limit_exceeded"
    if status == 402:
        return "insufficient_quota"
    if status == 504:
        return "timeout"
    if status == 503:
        return "server_is_overloaded"
    return "server_error" if status >= 500 else "invalid_request"
