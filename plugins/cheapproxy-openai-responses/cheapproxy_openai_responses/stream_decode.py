"""Upstream side: Responses SSE -> IR stream events.

Blocks: a reasoning item, a function / custom tool call item, and each
output_text / refusal content part of a message item.  The Responses API
streams items one after another (an item is done before the next is added),
so blocks never interleave; should an upstream interleave anyway, opening a
block closes the previous one and late deltas for a closed block are dropped.
Usage is read only from the terminal event; a trailing ``data: [DONE]`` that
some gateways append is ignored (pitfall 17).
"""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import StreamDecoder
from cheapproxy.sse import SSEParser

from .common import PROTOCOL, flat_tool_name, stop_from_wire, summary_texts, usage_from_wire
from .response import content_from_output, error_fields, failure_kind

_TERMINAL = frozenset({"response.completed", "response.incomplete"})


class _Open:
    """The IR block currently open."""

    __slots__ = ("key", "index", "kind", "emitted", "summary_index")

    def __init__(self, key: tuple[Any, ...], index: int, kind: str) -> None:
        self.key = key
        self.index = index
        self.kind = kind  # text | reasoning | call
        self.emitted = 0  # characters of text / arguments sent as deltas
        self.summary_index = 0


class ResponsesStreamDecoder(StreamDecoder):
    """One upstream stream; ``feed`` accepts any chunking of the body."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.started = False
        self.done = False
        self.next_index = 0
        self.open: _Open | None = None
        self.closed: set[tuple[Any, ...]] = set()
        self.has_calls = False
        self.any_block = False

    def feed(self, chunk: bytes) -> list[ir.StreamEvent]:
        out: list[ir.StreamEvent] = []
        for frame in self.parser.feed(chunk):
            self._frame(frame.data, out)
        return out

    def close(self) -> list[ir.StreamEvent]:
        out: list[ir.StreamEvent] = []
        for frame in self.parser.close():
            self._frame(frame.data, out)
        if not self.done:
            self.done = True
            out.append(ir.StreamError(message="the upstream stream ended before response.completed",
                                      kind="upstream_failed", status=502))
        return out

    # ------------------------------------------------------------ dispatch

    def _frame(self, data: str, out: list[ir.StreamEvent]) -> None:
        if self.done or not data or data.startswith("[DONE]"):
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.done = True
            out.append(ir.StreamError(message="the upstream sent a malformed stream event", kind="upstream_failed"))
            return
        if not isinstance(obj, dict):
            return
        t = obj.get("type")
        if not isinstance(t, str):  # e.g. {"type": []}: unhashable, and no event we know
            return
        if t in ("response.created", "response.in_progress", "response.queued"):
            self._start(obj.get("response"), out)
        elif t == "response.output_item.added":
            self._item_added(obj, out)
        elif t == "response.content_part.added":
            part = obj.get("part") or {}
            if part.get("type") in ("output_text", "refusal"):
                blk = self._block(("part", obj.get("output_index"), obj.get("content_index")), "text",
                                  ir.TextPart(text=""), out)
                if blk is not None:
                    self._more(blk, part.get("text") or part.get("refusal") or "", out)
        elif t in ("response.output_text.delta", "response.refusal.delta"):
            blk = self._block(("part", obj.get("output_index"), obj.get("content_index")), "text",
                              ir.TextPart(text=""), out)
            if blk is not None:
                self._delta(blk, obj.get("delta"), out)
        elif t in ("response.output_text.done", "response.refusal.done", "response.content_part.done"):
            self._part_done(obj, t, out)
        elif t in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            self._reasoning_delta(obj, out)
        elif t in ("response.function_call_arguments.delta", "response.custom_tool_call_input.delta"):
            blk = self._current(("item", obj.get("output_index")))
            if blk is not None:
                self._delta(blk, obj.get("delta"), out)
        elif t in ("response.function_call_arguments.done", "response.custom_tool_call_input.done"):
            blk = self._current(("item", obj.get("output_index")))
            if blk is not None:
                final = obj.get("arguments") if t.startswith("response.function") else obj.get("input")
                self._more(blk, final if isinstance(final, str) else "", out, whole=True)
        elif t == "response.output_item.done":
            self._item_done(obj, out)
        elif t in _TERMINAL:
            self._terminal(obj.get("response") or {}, out)
        elif t == "response.failed":
            resp = obj.get("response") or {}
            self._fail(resp.get("error"), out)
        elif t == "error":
            self._fail(obj.get("error") if isinstance(obj.get("error"), dict) else obj, out)
        # other events (annotations, hosted-tool progress, ...) carry nothing for IR

    # ------------------------------------------------------------ envelope

    def _start(self, resp: Any, out: list[ir.StreamEvent]) -> None:
        if self.started:
            return
        self.started = True
        resp = resp if isinstance(resp, dict) else {}
        out.append(ir.MessageStart(id=str(resp.get("id") or ""), model=str(resp.get("model") or "")))

    def _terminal(self, resp: dict[str, Any], out: list[ir.StreamEvent]) -> None:
        self._start(resp, out)
        self._stop_open(out)
        if not self.any_block:
            # an upstream that sent only the final snapshot: replay its output
            parts, has_calls = content_from_output(resp.get("output"))
            self.has_calls = self.has_calls or has_calls
            for p in parts:
                self._replay(p, out)
        else:
            self.has_calls = self.has_calls or any(
                isinstance(i, dict) and i.get("type") in ("function_call", "custom_tool_call")
                for i in resp.get("output") or [])
        stop = stop_from_wire(resp.get("status"), resp.get("incomplete_details"), self.has_calls)
        out.append(ir.MessageStop(stop_reason=stop, usage=usage_from_wire(resp.get("usage"))))
        self.done = True

    def _fail(self, error: Any, out: list[ir.StreamEvent]) -> None:
        msg, code = error_fields(error)
        kind, status = failure_kind(code)
        out.append(ir.StreamError(message=f"upstream failed: {msg}", kind=kind, status=status))
        self.done = True

    def _replay(self, p: ir.Part, out: list[ir.StreamEvent]) -> None:
        idx = self.next_index
        self.next_index += 1
        if isinstance(p, ir.TextPart):
            out += [ir.PartStart(index=idx, part=ir.TextPart(text="")), ir.TextDelta(index=idx, text=p.text)]
        elif isinstance(p, ir.ReasoningPart):
            out += [ir.PartStart(index=idx, part=ir.ReasoningPart()),
                    ir.ReasoningDelta(index=idx, text=p.text, signature=p.signature,
                                      signature_protocol=p.signature_protocol)]
        elif isinstance(p, ir.ToolCallPart):
            out += [ir.PartStart(index=idx, part=ir.ToolCallPart(id=p.id, name=p.name, arguments="", kind=p.kind)),
                    ir.ToolCallDelta(index=idx, arguments=p.arguments)]
        out.append(ir.PartStop(index=idx, provider_data=p.provider_data))

    # ------------------------------------------------------------ blocks

    def _begin(self, key: tuple[Any, ...], kind: str, part: ir.Part, out: list[ir.StreamEvent]) -> _Open:
        if not self.started:
            self._start(None, out)
        self._stop_open(out)
        blk = _Open(key, self.next_index, kind)
        self.next_index += 1
        self.open = blk
        self.any_block = True
        out.append(ir.PartStart(index=blk.index, part=part))
        return blk

    def _block(self, key: tuple[Any, ...], kind: str, part: ir.Part, out: list[ir.StreamEvent]) -> _Open | None:
        """The open block for ``key``, opening it unless it was already closed."""
        if self.open is not None and self.open.key == key:
            return self.open
        if key in self.closed:
            return None
        return self._begin(key, kind, part, out)

    def _current(self, key: tuple[Any, ...]) -> _Open | None:
        return self.open if self.open is not None and self.open.key == key else None

    def _stop_open(self, out: list[ir.StreamEvent], provider_data: dict[str, Any] | None = None) -> None:
        if self.open is not None:
            out.append(ir.PartStop(index=self.open.index, provider_data=provider_data or {}))
            self.closed.add(self.open.key)
            self.open = None

    def _delta(self, blk: _Open, delta: Any, out: list[ir.StreamEvent]) -> None:
        if not isinstance(delta, str) or not delta:
            return
        blk.emitted += len(delta)
        if blk.kind == "text":
            out.append(ir.TextDelta(index=blk.index, text=delta))
        elif blk.kind == "reasoning":
            out.append(ir.ReasoningDelta(index=blk.index, text=delta))
        else:
            out.append(ir.ToolCallDelta(index=blk.index, arguments=delta))

    def _more(self, blk: _Open, final: str, out: list[ir.StreamEvent], *, whole: bool = False) -> None:
        """Emit what ``final`` has beyond the deltas already sent (upstreams that
        put text only in added/done events)."""
        if whole and blk.emitted and blk.emitted <= len(final):
            self._delta(blk, final[blk.emitted:], out)
        elif not blk.emitted:
            self._delta(blk, final, out)

    # ------------------------------------------------------------ items

    def _item_added(self, obj: dict[str, Any], out: list[ir.StreamEvent]) -> None:
        item = obj.get("item") or {}
        kind = item.get("type")
        key = ("item", obj.get("output_index"))
        if kind == "reasoning":
            self._begin(key, "reasoning", ir.ReasoningPart(), out)
        elif kind in ("function_call", "custom_tool_call"):
            custom = kind == "custom_tool_call"
            self.has_calls = True
            part = ir.ToolCallPart(
                id=str(item.get("call_id") or item.get("id") or ""),
                name=flat_tool_name(item.get("namespace"), str(item.get("name") or "")),
                arguments="", kind="custom" if custom else "function",
                provider_data={PROTOCOL: {"id": item["id"]}} if item.get("id") else {})
            blk = self._begin(key, "call", part, out)
            initial = item.get("input") if custom else item.get("arguments")
            self._delta(blk, initial, out)
        elif kind == "message" and not self.started:
            self._start(None, out)

    def _part_done(self, obj: dict[str, Any], t: str, out: list[ir.StreamEvent]) -> None:
        key = ("part", obj.get("output_index"), obj.get("content_index"))
        blk = self._current(key)
        if blk is None:
            return
        if t == "response.content_part.done":
            part = obj.get("part") or {}
            final = part.get("text") if part.get("type") == "output_text" else part.get("refusal")
        else:
            final = obj.get("text") if t == "response.output_text.done" else obj.get("refusal")
        self._more(blk, final if isinstance(final, str) else "", out, whole=True)
        if t == "response.content_part.done":
            self._stop_open(out)

    def _reasoning_delta(self, obj: dict[str, Any], out: list[ir.StreamEvent]) -> None:
        blk = self._current(("item", obj.get("output_index")))
        if blk is None or blk.kind != "reasoning":
            return
        si = obj.get("summary_index", obj.get("content_index", 0))
        if isinstance(si, int) and si != blk.summary_index:
            blk.summary_index = si
            if blk.emitted:
                self._delta(blk, "\n\n", out)  # summary parts are paragraphs
        self._delta(blk, obj.get("delta"), out)

    def _item_done(self, obj: dict[str, Any], out: list[ir.StreamEvent]) -> None:
        item = obj.get("item") or {}
        kind = item.get("type")
        oi = obj.get("output_index")
        if kind == "message":
            if self.open is not None and self.open.key[:2] == ("part", oi):
                self._stop_open(out)
            if not any(k[:2] == ("part", oi) for k in self.closed):
                parts, _ = content_from_output([item])  # a message sent whole
                for p in parts:
                    self._stop_open(out)
                    self._replay(p, out)
                    self.any_block = True
            return
        blk = self._current(("item", oi))
        if blk is None:
            return
        if kind == "reasoning":
            if not blk.emitted:
                self._delta(blk, "\n\n".join(summary_texts(item)), out)
            enc = item.get("encrypted_content")
            if isinstance(enc, str) and enc:
                out.append(ir.ReasoningDelta(index=blk.index, signature=enc, signature_protocol=PROTOCOL))
            self._stop_open(out, {PROTOCOL: {"id": item.get("id"), "summary": item.get("summary") or []}})
        elif kind in ("function_call", "custom_tool_call"):
            final = item.get("input") if kind == "custom_tool_call" else item.get("arguments")
            self._more(blk, final if isinstance(final, str) else "", out, whole=True)
            self._stop_open(out)
