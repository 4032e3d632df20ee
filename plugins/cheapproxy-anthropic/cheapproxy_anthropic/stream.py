"""Streams: IR events -> Anthropic SSE for clients (encoder), Anthropic SSE from
an upstream -> IR events (decoder).  protocols.md 3.7 has the event grammar."""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext, StreamDecoder, StreamEncoder
from cheapproxy.sse import RunReader, SSEParser, StringSlot, load_data

from .common import (
    NAME, error_status_type, sanitize_tool_id, signature_to_wire, stop_from_wire, stop_to_wire,
    stream_error_from_wire, usage_from_wire, usage_to_wire,
)
from .response import new_message_id

_dumps = orjson.dumps
_JSONDecodeError = orjson.JSONDecodeError
_TextDelta = ir.TextDelta
_TextRun = ir.TextRun
_TEXT_PATH = ("delta", "text")


def _frame(event: bytes, payload: bytes) -> bytes:
    return b"event: " + event + b"\ndata: " + payload + b"\n\n"


def _delta(index: int, delta: bytes) -> bytes:
    return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":' + str(index).encode()
            + b',"delta":' + delta + b"}\n\n")


# The hot deltas are built as block.head + orjson.dumps(value) + _TAIL, the
# same bytes as _delta(index, b'{"type":"text_delta","text":' + value + b"}").
_TAIL = b"}}\n\n"
_DELTA_FIELD = {
    "text": b'{"type":"text_delta","text":',
    "thinking": b'{"type":"thinking_delta","thinking":',
    "tool": b'{"type":"input_json_delta","partial_json":',
    "custom": b'{"type":"input_json_delta","partial_json":',
}


def error_event(err: ProxyError) -> bytes:
    """``event: error`` with the Anthropic error object (pitfall 18)."""
    _, etype = error_status_type(err)
    return _frame(b"error", orjson.dumps({"type": "error", "error": {"type": etype, "message": err.message}}))


class _Block:
    __slots__ = ("index", "kind", "sig", "sig_protocol", "head")

    def __init__(self, index: int, kind: str) -> None:
        self.index = index
        self.kind = kind  # text | thinking | redacted | tool | custom
        self.sig: list[str] = []
        self.sig_protocol: str | None = None
        # start of this block's text / thinking / input_json delta, up to its value
        field = _DELTA_FIELD.get(kind)
        self.head = _delta(index, field)[:-3] if field is not None else b""


class MessagesStreamEncoder(StreamEncoder):
    """IR events -> the exact Anthropic event sequence, one event at a time.

    IR parts without an Anthropic block (images, files) are skipped and the
    block indexes stay contiguous.  Signatures are buffered and sent as one
    ``signature_delta`` right before their thinking block stops (the SDK assigns,
    it does not append).
    """

    def __init__(self, ctx: EncodeContext) -> None:
        self.model = ctx.model
        self.request_id = ctx.request_id
        self.started = False
        self.done = False
        self.next_index = 0
        self.blocks: dict[int, _Block] = {}
        self.open: _Block | None = None
        self.usage = ir.Usage()
        self.tool_seen = False

    # -- envelope

    def _start(self, msg_id: str | None, usage: ir.Usage | None) -> bytes:
        self.started = True
        if usage is not None:
            self.usage = ir.merge_usage(self.usage, usage)
        message = {
            "id": msg_id if msg_id and msg_id.startswith("msg_") else new_message_id(),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_to_wire(self.usage, output_tokens=usage.output_tokens if usage else 0),
        }
        return _frame(b"message_start", orjson.dumps({"type": "message_start", "message": message}))

    def _open(self, ev: ir.PartStart) -> bytes:
        p = ev.part
        idx = self.next_index
        out = b""
        if isinstance(p, ir.TextPart):
            blk, cb = _Block(idx, "text"), {"type": "text", "text": ""}
        elif isinstance(p, ir.ReasoningPart):
            if p.redacted and p.signature_protocol == NAME:
                blk, cb = _Block(idx, "redacted"), {"type": "redacted_thinking", "data": p.redacted}
            else:
                blk, cb = _Block(idx, "thinking"), {"type": "thinking", "thinking": "", "signature": ""}
        elif isinstance(p, ir.ToolCallPart):
            blk = _Block(idx, "custom" if p.kind == "custom" else "tool")
            cb = {"type": "tool_use", "id": sanitize_tool_id(p.id), "name": p.name, "input": {}}
            self.tool_seen = True
        else:
            return b""  # no Anthropic block for this part
        self.next_index += 1
        self.blocks[ev.index] = blk
        self.open = blk
        out += _frame(b"content_block_start",
                      orjson.dumps({"type": "content_block_start", "index": idx, "content_block": cb}))
        if blk.kind == "custom":  # freeform input travels as {"input": "<raw text>"}
            out += _delta(idx, b'{"type":"input_json_delta","partial_json":' + orjson.dumps('{"input": "') + b"}")
        # templates are normally empty; carry anything they hold as deltas
        if isinstance(p, ir.TextPart) and p.text:
            out += self._text(blk, p.text)
        elif isinstance(p, ir.ReasoningPart) and blk.kind == "thinking":
            out += self._reasoning(blk, p.text, p.signature, p.signature_protocol)
        elif isinstance(p, ir.ToolCallPart) and p.arguments:
            out += self._args(blk, p.arguments)
        return out

    def _close(self, blk: _Block) -> bytes:
        out = b""
        if blk.kind == "thinking" and blk.sig:
            sig = signature_to_wire("".join(blk.sig), blk.sig_protocol)
            out += _delta(blk.index, b'{"type":"signature_delta","signature":' + orjson.dumps(sig) + b"}")
        elif blk.kind == "custom":
            out += _delta(blk.index, b'{"type":"input_json_delta","partial_json":"\\"}"}')
        if self.open is blk:
            self.open = None
        blk.kind = "closed"
        return out + _frame(b"content_block_stop",
                            b'{"type":"content_block_stop","index":' + str(blk.index).encode() + b"}")

    # -- deltas

    @staticmethod
    def _text(blk: _Block, text: str) -> bytes:
        return blk.head + _dumps(text) + _TAIL

    @staticmethod
    def _reasoning(blk: _Block, text: str, sig: str | None, proto: str | None) -> bytes:
        if sig:
            blk.sig.append(sig)
            blk.sig_protocol = proto or blk.sig_protocol
        if not text:
            return b""
        return blk.head + _dumps(text) + _TAIL

    @staticmethod
    def _args(blk: _Block, frag: str) -> bytes:
        if not frag:
            return b""
        if blk.kind == "custom":
            # JSON-escape the raw fragment and strip the quotes: it continues an open string
            frag = orjson.dumps(frag).decode()[1:-1]
        return blk.head + _dumps(frag) + _TAIL

    # -- public

    def encode(self, event: ir.StreamEvent) -> bytes:
        if type(event) is _TextDelta and self.started and not self.done:
            # the usual event, what _encode gives for it with fewer steps
            blk = self.blocks.get(event.index)
            text = event.text
            return blk.head + _dumps(text) + _TAIL if blk is not None and blk.kind == "text" and text else b""
        return self._encode(event)

    def encode_text_run(self, run: ir.TextRun) -> bytes:
        blk = self.blocks.get(run.index)
        if self.started and not self.done and blk is not None and blk.kind == "text":
            # what encode gives for each delta, joined at once
            head = blk.head
            return head + (_TAIL + head).join(run.literals) + _TAIL
        return super().encode_text_run(run)

    def _encode(self, event: ir.StreamEvent) -> bytes:
        if self.done:
            return b""
        out = b""
        if not self.started and not isinstance(event, (ir.MessageStart, ir.StreamError)):
            out = self._start(None, None)  # the IR stream lacked MessageStart: synthesize one
        if isinstance(event, ir.TextDelta):
            blk = self.blocks.get(event.index)
            return out + (self._text(blk, event.text) if blk and blk.kind == "text" and event.text else b"")
        if isinstance(event, ir.ToolCallDelta):
            blk = self.blocks.get(event.index)
            return out + (self._args(blk, event.arguments) if blk and blk.kind in ("tool", "custom") else b"")
        if isinstance(event, ir.ReasoningDelta):
            blk = self.blocks.get(event.index)
            if blk and blk.kind == "thinking":
                out += self._reasoning(blk, event.text, event.signature, event.signature_protocol)
            return out
        if isinstance(event, ir.PartStart):
            if self.open is not None:  # blocks never interleave: close a block left open
                out += self._close(self.open)
            return out + self._open(event)
        if isinstance(event, ir.PartStop):
            blk = self.blocks.get(event.index)
            return out + (self._close(blk) if blk and blk.kind != "closed" else b"")
        if isinstance(event, ir.MessageStart):
            return out if self.started else self._start(event.id, event.usage)
        if isinstance(event, ir.UsageUpdate):
            self.usage = ir.merge_usage(self.usage, event.usage)
            return out
        if isinstance(event, ir.MessageStop):
            return out + self._finish(event)
        if isinstance(event, ir.StreamError):
            self.done = True
            return out + error_event(ProxyError(event.kind, event.message, status=event.status))
        return out

    def _finish(self, ev: ir.MessageStop) -> bytes:
        out = self._close(self.open) if self.open is not None else b""
        if ev.usage is not None:
            self.usage = ir.merge_usage(self.usage, ev.usage)
        stop = stop_to_wire(ev.stop_reason, self.tool_seen)
        delta = {"stop_reason": stop, "stop_sequence": ev.stop_sequence if stop == "stop_sequence" else None}
        # input and cache counts too: with an OpenAI upstream they are only known now
        payload = {"type": "message_delta", "delta": delta, "usage": usage_to_wire(self.usage)}
        self.done = True
        return (out + _frame(b"message_delta", orjson.dumps(payload))
                + _frame(b"message_stop", b'{"type":"message_stop"}'))

    def error(self, err: ProxyError) -> bytes:
        if self.done:
            return b""
        self.done = True
        return error_event(err)


class MessagesStreamDecoder(StreamDecoder):
    """Anthropic SSE (any chunking) -> IR events.  Server-tool blocks are
    dropped and IR indexes renumbered to stay contiguous."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.index_map: dict[int, int | None] = {}
        self.next_index = 0
        self.stop_reason: Any = None
        self.stop_sequence: str | None = None
        self.usage: ir.Usage | None = None
        self.done = False
        # the usual text_delta frame, learned from the stream (one text block at a time)
        self.slot = StringSlot(learns=8)
        self.slot_index: Any = None  # the wire "index" of the learned frame
        self.runs = RunReader(self.slot, "content_block_delta")

    def feed(self, chunk: bytes) -> list[ir.StreamEvent]:
        return self.runs.decode(self, chunk)

    def _run_ready(self) -> bool:
        return not self.done

    def _run(self, texts: list[str], literals: list[bytes], events: list[ir.StreamEvent]) -> None:
        """Learned text_delta frames: what ``feed`` does with each, as one event."""
        i = self.index_map.get(self.slot_index)
        if i is None:
            return
        events.append(_TextRun(i, texts, literals))

    def _feed(self, chunk: bytes, events: list[ir.StreamEvent]) -> None:
        match = self.slot.match
        for event, raw in self.parser.feed_raw(chunk):
            text = None if self.done or event == "ping" else match(raw)
            if text is None:
                self._frame(event, raw, events)
            elif text:
                # the bytes of a learned text_delta frame around another text:
                # what _frame does with it, inline
                i = self.index_map.get(self.slot_index)
                if i is not None:
                    events.append(_TextDelta(i, text))

    def close(self) -> list[ir.StreamEvent]:
        events: list[ir.StreamEvent] = []
        for event, data in self.parser.close_raw():
            self._frame(event, data, events)
        if not self.done:
            self.done = True
            events.append(ir.StreamError(message=f"{NAME} upstream stream ended before message_stop",
                                         kind="upstream_failed", status=502))
        return events

    def _frame(self, event: str | None, raw: bytes, events: list[ir.StreamEvent]) -> None:
        """One frame, its data as bytes (``SSEParser.feed_raw``)."""
        if self.done or not raw or event == "ping":
            return
        try:
            obj = load_data(raw)
        except _JSONDecodeError:
            self.done = True
            events.append(ir.StreamError(message=f"{NAME} upstream sent invalid JSON in its stream"))
            return
        if type(obj) is not dict:
            return
        t = obj.get("type") or event
        if t == "content_block_delta" and self._text_frame(obj, raw, events):
            return
        self._object(t, obj, events)

    def _text_frame(self, obj: dict[str, Any], raw: bytes, events: list[ir.StreamEvent]) -> bool:
        """A text_delta frame, done as ``_object`` -> ``_delta`` would (and
        learned for ``feed``'s shortcut); False for any other delta."""
        d = obj.get("delta")
        if type(d) is not dict or d.get("type") != "text_delta":
            return False
        idx = obj.get("index", -1)
        i = self.index_map.get(idx)
        text = d.get("text")
        if i is not None and text:
            events.append(_TextDelta(i, text))
        if type(text) is str and obj.get("type") == "content_block_delta" and self.slot.learn(raw, _TEXT_PATH):
            self.slot_index = idx
        return True

    def _object(self, t: Any, obj: dict[str, Any], events: list[ir.StreamEvent]) -> None:
        """One parsed frame of type ``t``."""
        if t == "content_block_delta":
            self._delta(obj, events)
        elif t == "content_block_start":
            self._block_start(obj, events)
        elif t == "content_block_stop":
            i = self.index_map.get(obj.get("index", -1))
            if i is not None:
                events.append(ir.PartStop(index=i))
        elif t == "message_start":
            msg = obj.get("message") or {}
            usage = usage_from_wire(msg.get("usage"))
            self.usage = ir.merge_usage(self.usage, usage)
            events.append(ir.MessageStart(id=str(msg.get("id") or ""), model=str(msg.get("model") or ""), usage=usage))
        elif t == "message_delta":
            delta = obj.get("delta") or {}
            if delta.get("stop_reason") is not None:
                self.stop_reason = delta.get("stop_reason")
            if isinstance(delta.get("stop_sequence"), str):
                self.stop_sequence = delta["stop_sequence"]
            usage = usage_from_wire(obj.get("usage"))
            if not usage.is_zero():
                self.usage = ir.merge_usage(self.usage, usage)
                events.append(ir.UsageUpdate(usage=usage))
        elif t == "message_stop":
            self.done = True
            events.append(ir.MessageStop(stop_reason=stop_from_wire(self.stop_reason),
                                         stop_sequence=self.stop_sequence, usage=self.usage))
        elif t == "error":
            self.done = True
            events.append(stream_error_from_wire(obj.get("error")))
        # unknown event types are ignored (Anthropic may add more)

    def _block_start(self, obj: dict[str, Any], events: list[ir.StreamEvent]) -> None:
        idx = obj.get("index", -1)
        cb = obj.get("content_block") or {}
        t = cb.get("type")
        i = self.next_index
        if t == "text":
            events.append(ir.PartStart(index=i, part=ir.TextPart(text="")))
            if cb.get("text"):
                events.append(ir.TextDelta(index=i, text=cb["text"]))
        elif t == "thinking":
            events.append(ir.PartStart(index=i, part=ir.ReasoningPart()))
            sig = cb.get("signature") or None
            if cb.get("thinking") or sig:
                events.append(ir.ReasoningDelta(index=i, text=cb.get("thinking") or "", signature=sig,
                                                signature_protocol=NAME if sig else None))
        elif t == "redacted_thinking":
            events.append(ir.PartStart(index=i, part=ir.ReasoningPart(redacted=cb.get("data") or "",
                                                                       signature_protocol=NAME)))
        elif t == "tool_use":
            events.append(ir.PartStart(index=i, part=ir.ToolCallPart(id=str(cb.get("id") or ""),
                                                                      name=str(cb.get("name") or ""), arguments="")))
            if isinstance(cb.get("input"), dict) and cb["input"]:
                events.append(ir.ToolCallDelta(index=i, arguments=orjson.dumps(cb["input"]).decode()))
        else:
            self.index_map[idx] = None  # server tool blocks: no IR equivalent
            return
        self.index_map[idx] = i
        self.next_index += 1

    def _delta(self, obj: dict[str, Any], events: list[ir.StreamEvent]) -> None:
        i = self.index_map.get(obj.get("index", -1))
        if i is None:
            return
        d = obj.get("delta") or {}
        t = d.get("type")
        if t == "text_delta":
            if d.get("text"):
                events.append(ir.TextDelta(index=i, text=d["text"]))
        elif t == "input_json_delta":
            if d.get("partial_json"):
                events.append(ir.ToolCallDelta(index=i, arguments=d["partial_json"]))
        elif t == "thinking_delta":
            if d.get("thinking"):
                events.append(ir.ReasoningDelta(index=i, text=d["thinking"]))
        elif t == "signature_delta":
            if d.get("signature"):
                events.append(ir.ReasoningDelta(index=i, signature=d["signature"], signature_protocol=NAME))
        # citations_delta: no IR equivalent
