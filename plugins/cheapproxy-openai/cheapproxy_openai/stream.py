"""Streams: IR events -> ``chat.completion.chunk`` SSE for clients, and
upstream chunk SSE -> IR events."""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext, StreamDecoder, StreamEncoder
from cheapproxy.sse import RunReader, SSEParser, StringSlot, load_data

from .common import (
    NAME,
    error_object,
    finish_from_stop,
    new_call_id,
    reasoning_text,
    stop_from_finish,
    usage_from_wire,
    usage_to_wire,
)
from .encode import completion_id, legacy_functions

DONE = b"data: [DONE]\n\n"

_dumps = orjson.dumps
_JSONDecodeError = orjson.JSONDecodeError
_TextDelta = ir.TextDelta
_TextRun = ir.TextRun
_CONTENT_PATH = ("choices", 0, "delta", "content")
_OBFUSCATION = b',"obfuscation":"'
_VALUE_END = b'"]}0123456789el'  # the last byte of a JSON value: string, array, object, number, true/false, null


def without_obfuscation(raw: bytes) -> bytes:
    """``raw`` without the member OpenAI ends each chunk with by default,
    ``,"obfuscation":"<letters and digits>"`` (random padding against
    length side channels), else ``raw`` itself.  The decoder reads nothing
    from it, and a value that changes in every chunk would keep the learned
    text chunk (``StringSlot``) from ever matching.  Only that exact form
    is cut: the last member of the top-level object, after a complete
    value; anything else is parsed as it came."""
    if raw[-2:] == b'"}':
        i = raw.rfind(_OBFUSCATION, max(0, len(raw) - 96))
        if i > 0:
            value = raw[i + len(_OBFUSCATION) : -2]
            if (value.isalnum() or not value) and raw[i - 1] in _VALUE_END:
                return raw[:i] + b"}"
    return raw


class ChatStreamEncoder(StreamEncoder):
    """IR events -> Chat Completions chunks, one SSE frame per delta.

    The tool-call ``index`` is a per-stream counter of tool calls (never the IR
    block index).  The usage chunk (``choices: []``) and the ``"usage": null``
    fields appear only when the client asked for ``include_usage``.
    """

    def __init__(self, ctx: EncodeContext) -> None:
        self.ctx = ctx
        req = ctx.request
        if req is not None:
            self.include_usage = bool(req.provider_data.get(NAME, {}).get("include_usage"))
        else:
            so = (ctx.inbound.body.get("stream_options") if ctx.inbound is not None else None) or {}
            self.include_usage = isinstance(so, dict) and so.get("include_usage") is True
        self.legacy = legacy_functions(ctx)
        self.started = False
        self.stopped = False  # MessageStop went by: finish chunk sent
        self.ended = False  # an error frame or [DONE] went by: nothing more
        self.id = completion_id(None, ctx)
        self.usage: ir.Usage | None = None
        self.tool_count = 0
        self.tool_index: dict[int, int] = {}  # IR block index -> wire tool-call index
        self._prefix = b""
        self._suffix = b""
        self._text_head = b""  # _chunk({"content": text}) == _text_head + orjson.dumps(text) + _text_tail
        self._text_tail = b""

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.ctx.created, "model": self.ctx.model}

    def _envelope(self) -> None:
        head = self._head()
        # every chunk shares id/created/model: serialize that head once
        self._prefix = b"data: " + orjson.dumps(head)[:-1] + b',"choices":[{"index":0,"delta":'
        self._suffix = b',"usage":null}\n\n' if self.include_usage else b"}\n\n"
        self._text_head = self._prefix + b'{"content":'
        self._text_tail = b'},"logprobs":null,"finish_reason":null}]' + self._suffix

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        tail = b',"logprobs":null,"finish_reason":null}]' if finish is None else (
            b',"logprobs":null,"finish_reason":"' + finish.encode() + b'"}]'
        )
        return self._prefix + orjson.dumps(delta) + tail + self._suffix

    def _start(self, msg_id: str | None = None) -> bytes:
        self.started = True
        if msg_id:
            self.id = completion_id(msg_id, self.ctx)
        self._envelope()
        return self._chunk({"role": "assistant", "content": ""})

    def encode(self, event: ir.StreamEvent) -> bytes:
        if type(event) is _TextDelta and self.started and not self.stopped and not self.ended:
            # the usual event, what _encode gives for it, from prebuilt pieces
            text = event.text
            return self._text_head + _dumps(text) + self._text_tail if text else b""
        return self._encode(event)

    def encode_text_run(self, run: ir.TextRun) -> bytes:
        if self.started and not self.stopped and not self.ended:
            # what encode gives for each delta, joined at once
            head, tail = self._text_head, self._text_tail
            return head + (tail + head).join(run.literals) + tail
        return super().encode_text_run(run)

    def _encode(self, event: ir.StreamEvent) -> bytes:
        if self.ended:
            return b""
        out = b""
        if isinstance(event, ir.MessageStart):
            if event.usage is not None:
                self.usage = ir.merge_usage(self.usage, event.usage)
            return b"" if self.started else self._start(event.id)
        if isinstance(event, ir.UsageUpdate):
            self.usage = ir.merge_usage(self.usage, event.usage)
            return b""
        if isinstance(event, ir.StreamError):
            return self.error(ProxyError(event.kind, event.message, status=event.status))
        if self.stopped:
            return b""  # nothing but usage may follow the finish chunk
        if not self.started:
            out = self._start()
        if isinstance(event, ir.TextDelta):
            if event.text:
                out += self._chunk({"content": event.text})
        elif isinstance(event, ir.ReasoningDelta):
            if event.text:  # signatures have no Chat field
                out += self._chunk({"reasoning_content": event.text})
        elif isinstance(event, ir.ToolCallDelta):
            out += self._tool_args(event.index, event.arguments)
        elif isinstance(event, ir.PartStart):
            out += self._part_start(event)
        elif isinstance(event, ir.MessageStop):
            if event.usage is not None:
                self.usage = ir.merge_usage(self.usage, event.usage)
            self.stopped = True
            finish = finish_from_stop(event.stop_reason, self.tool_count > 0, self.legacy)
            out += self._chunk({}, finish)
        return out

    def _part_start(self, event: ir.PartStart) -> bytes:
        p = event.part
        if isinstance(p, ir.TextPart):
            return self._chunk({"content": p.text}) if p.text else b""
        if isinstance(p, ir.ReasoningPart):
            return self._chunk({"reasoning_content": p.text}) if p.text else b""
        if not isinstance(p, ir.ToolCallPart):
            return b""
        k = self.tool_count
        self.tool_count += 1
        self.tool_index[event.index] = k
        if self.legacy:
            if k > 0:
                return b""  # a legacy function_call answer carries one call only
            out = self._chunk({"function_call": {"name": p.name, "arguments": ""}})
        else:
            # custom calls go out as function-typed deltas with the raw input as
            # arguments: the Chat stream format (and the SDK) knows only functions
            head = {"index": k, "id": p.id, "type": "function", "function": {"name": p.name, "arguments": ""}}
            out = self._chunk({"tool_calls": [head]})
        return out + (self._tool_args(event.index, p.arguments) if p.arguments else b"")

    def _tool_args(self, index: int, args: str) -> bytes:
        k = self.tool_index.get(index)
        if k is None or not args:
            return b""
        if self.legacy:
            return self._chunk({"function_call": {"arguments": args}}) if k == 0 else b""
        return self._chunk({"tool_calls": [{"index": k, "function": {"arguments": args}}]})

    def error(self, err: ProxyError) -> bytes:
        if self.ended:
            return b""
        self.ended = True
        return b"data: " + orjson.dumps(error_object(err)) + b"\n\n"

    def close(self) -> bytes:
        if self.ended or not self.stopped:
            return b""
        self.ended = True
        out = b""
        if self.include_usage:
            head = self._head()
            head["choices"] = []
            head["usage"] = usage_to_wire(self.usage or ir.Usage())
            out = b"data: " + orjson.dumps(head) + b"\n\n"
        return out + DONE


def _stream_error(err: Any) -> ir.StreamError:
    """An in-stream ``{"error": {...}}`` -> StreamError, keeping its class."""
    msg = err.get("message") if isinstance(err, dict) else err
    message = str(msg or "the upstream reported an error mid-stream")
    what = f"{err.get('type')} {err.get('code')}".lower() if isinstance(err, dict) else ""
    if "rate_limit" in what:
        return ir.StreamError(message=message, kind="rate_limited", status=429)
    if "overloaded" in what or "unavailable" in what:
        return ir.StreamError(message=message, kind="upstream_overloaded", status=529)
    if "timeout" in what:
        return ir.StreamError(message=message, kind="upstream_timeout", status=504)
    return ir.StreamError(message=message)


class _Call:
    """One upstream tool call being assembled."""

    __slots__ = ("id", "name", "args", "block", "custom")

    def __init__(self, call_id: str, name: str, custom: bool) -> None:
        self.id, self.name, self.custom = call_id, name, custom
        self.args: list[str] = []
        self.block: int | None = None  # IR block index once opened

    def complete(self) -> bool:
        """Whether the arguments so far are a whole JSON value (then no fragment
        can legally follow, so a later call may open without interleaving)."""
        if self.custom:
            return False
        try:
            orjson.loads("".join(self.args) or "x")
        except orjson.JSONDecodeError:
            return False
        return True


class ChatStreamDecoder(StreamDecoder):
    """Chat Completions SSE -> IR events.

    Only choice 0 is decoded.  A chunk mixing reasoning, text, tool calls and a
    finish reason is split in that order.  IR blocks never interleave: a new
    tool call opens at once when the open call's arguments already form a whole
    JSON value (the usual, sequential case); otherwise it is buffered and
    emitted whole when the open call completes or the message finishes.
    MessageStop is held until ``[DONE]`` so the usage-only chunk that follows
    the finish chunk is included.
    """

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.started = False
        self.done = False
        self.failed = False
        self.next_block = 0
        self.open: tuple[str, int] | None = None  # ("text"|"reasoning"|"tool", IR index)
        self.open_call: _Call | None = None
        self.calls: dict[Any, _Call] = {}
        self.pending: list[_Call] = []  # tool calls waiting for the open one to finish
        self.finish: str | None = None
        self.refused = False
        self.usage: ir.Usage | None = None
        self.slot = StringSlot()  # the usual text chunk, learned from the stream itself
        self.runs = RunReader(self.slot, pad=_OBFUSCATION)  # runs of padded chunks too

    # -- blocks

    def _close(self, out: list[ir.StreamEvent]) -> None:
        if self.open is not None:
            out.append(ir.PartStop(index=self.open[1]))
            self.open = None
            self.open_call = None

    def _open(self, kind: str, part: ir.Part, out: list[ir.StreamEvent]) -> int:
        self._close(out)
        idx = self.next_block
        self.next_block += 1
        out.append(ir.PartStart(index=idx, part=part))
        self.open = (kind, idx)
        return idx

    def _open_call(self, call: _Call, out: list[ir.StreamEvent]) -> None:
        part = ir.ToolCallPart(id=call.id, name=call.name, arguments="", kind="custom" if call.custom else "function")
        call.block = self._open("tool", part, out)
        self.open_call = call
        if call.args:
            out.append(ir.ToolCallDelta(index=call.block, arguments="".join(call.args)))

    def _flush_pending(self, out: list[ir.StreamEvent], force: bool) -> None:
        while self.pending and (force or self.open_call is None or self.open_call.complete()):
            self._open_call(self.pending.pop(0), out)

    def _text(self, kind: str, text: str, out: list[ir.StreamEvent]) -> None:
        if self.open is None or self.open[0] != kind:
            self._flush_pending(out, force=True)
            part: ir.Part = ir.TextPart(text="") if kind == "text" else ir.ReasoningPart()
            self._open(kind, part, out)
        assert self.open is not None
        if kind == "text":
            out.append(ir.TextDelta(index=self.open[1], text=text))
        else:
            out.append(ir.ReasoningDelta(index=self.open[1], text=text))

    def _tool_delta(self, key: Any, tc: dict[str, Any], out: list[ir.StreamEvent]) -> None:
        custom = tc.get("type") == "custom" or isinstance(tc.get("custom"), dict)
        fn = tc.get("custom" if custom else "function")
        fn = fn if isinstance(fn, dict) else {}
        frag = fn.get("input" if custom else "arguments")
        frag = frag if isinstance(frag, str) else (orjson.dumps(frag).decode() if frag is not None else "")
        call = self.calls.get(key)
        tc_id = tc.get("id") if isinstance(tc.get("id"), str) else None
        if call is not None and tc_id and tc_id != call.id and fn.get("name"):
            call = None  # a server that reuses index 0 for every call: a new id starts a new call
        if call is None:
            call_id = tc_id or new_call_id()
            call = _Call(call_id, str(fn.get("name") or ""), custom)
            self.calls[key] = call
            if frag:
                call.args.append(frag)
            if self.open_call is not None and (self.pending or not self.open_call.complete()):
                self.pending.append(call)  # the open call may still receive fragments
            else:
                self._flush_pending(out, force=True)
                self._open_call(call, out)
            return
        if not frag:
            return
        if call is self.open_call:
            call.args.append(frag)
            out.append(ir.ToolCallDelta(index=call.block, arguments=frag))  # type: ignore[arg-type]
        elif call.block is None:
            call.args.append(frag)  # still pending
        # else: a fragment for a call already closed: its JSON was whole, so this
        # can only be whitespace (or an upstream bug); it is dropped
        if self.pending:
            self._flush_pending(out, force=False)

    # -- frames

    def _content(self, content: str, out: list[ir.StreamEvent]) -> None:
        """A chunk whose only news is this delta ``content``."""
        if content:
            opened = self.open
            if opened is not None and opened[0] == "text":
                out.append(_TextDelta(opened[1], content))
            else:
                self._text("text", content, out)

    def _text_chunk(self, data: dict[str, Any], out: list[ir.StreamEvent], raw: bytes) -> bool:
        """The usual chunk: one choice whose delta holds only "content" (and
        maybe "role"), no finish_reason, no usage, once started.  Done as
        ``_chunk`` would (and learned for ``feed``'s shortcut); False for any
        other chunk."""
        choices = data.get("choices")
        if not self.started or type(choices) is not list or len(choices) != 1 or data.get("usage") is not None:
            return False
        ch = choices[0]
        if type(ch) is not dict or ch.get("finish_reason") or ch.get("index", 0) != 0:
            return False
        delta = ch.get("delta")
        if type(delta) is not dict:
            return False
        content = delta.get("content")
        n = len(delta)
        if type(content) is not str or not (n == 1 or (n == 2 and "role" in delta)):
            return False
        self._content(content, out)
        self.slot.learn(raw, _CONTENT_PATH)
        return True

    def _chunk(self, data: dict[str, Any], out: list[ir.StreamEvent]) -> None:
        choices = data.get("choices")
        # Azure leads with id-less prompt-filter chunks (empty choices): start
        # the message on the first chunk that identifies it or carries choices
        if not self.started and (data.get("id") or choices or data.get("usage")):
            self.started = True
            out.append(ir.MessageStart(id=str(data.get("id") or ""), model=str(data.get("model") or "")))
        if isinstance(choices, list):
            for ch in choices:
                if not isinstance(ch, dict) or ch.get("index", 0) != 0:
                    continue
                delta = ch.get("delta")
                if isinstance(delta, dict):
                    self._delta(delta, out)
                if ch.get("finish_reason"):
                    self.finish = ch["finish_reason"]
                    self._flush_pending(out, force=True)
                    self._close(out)
        usage = usage_from_wire(data.get("usage"))  # any chunk may carry it
        if usage is not None:
            self.usage = usage
            out.append(ir.UsageUpdate(usage=usage))

    def _delta(self, delta: dict[str, Any], out: list[ir.StreamEvent]) -> None:
        rtext = reasoning_text(delta)
        if rtext:
            self._text("reasoning", rtext, out)
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._text("text", content, out)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self.refused = True
            self._text("text", refusal, out)
        tcs = delta.get("tool_calls")
        if isinstance(tcs, list):
            for pos, tc in enumerate(tcs):
                if isinstance(tc, dict):
                    key = tc.get("index")
                    if not isinstance(key, int):
                        # servers that omit the index: key on the id, else the
                        # latest call (fragments carry no id)
                        key = tc.get("id") or (next(reversed(self.calls)) if self.calls else pos)
                    self._tool_delta(key, tc, out)
        fc = delta.get("function_call")
        if isinstance(fc, dict):
            self._tool_delta("function_call", {"function": fc}, out)

    def _frame(self, raw: bytes, out: list[ir.StreamEvent]) -> None:
        """One frame's data, as bytes (``SSEParser.feed_raw``)."""
        if self.done or self.failed:
            return
        if raw[:1] != b"{" and raw.decode("utf-8", errors="replace").strip() == "[DONE]":
            self.done = True
            self._finish(out)
            return
        try:
            obj = load_data(raw)
        except _JSONDecodeError:
            self.failed = True
            out.append(ir.StreamError(message="the upstream sent a malformed stream chunk"))
            return
        if type(obj) is not dict:
            return
        err = obj.get("error")
        if err:
            self.failed = True
            out.append(_stream_error(err))
            return
        if not self._text_chunk(obj, out, raw):
            self._chunk(obj, out)

    def _finish(self, out: list[ir.StreamEvent]) -> None:
        if not self.started:
            self.started = True
            out.append(ir.MessageStart(id="", model=""))
        self._flush_pending(out, force=True)
        self._close(out)
        has_calls = bool(self.calls)
        stop = ir.StopReason.CONTENT_FILTER if self.refused else stop_from_finish(self.finish, has_calls)
        out.append(ir.MessageStop(stop_reason=stop, usage=self.usage))

    def feed(self, chunk: bytes) -> list[ir.StreamEvent]:
        return self.runs.decode(self, chunk)

    def _run_ready(self) -> bool:
        opened = self.open
        return opened is not None and opened[0] == "text" and not self.done and not self.failed

    def _run(self, texts: list[str], literals: list[bytes], out: list[ir.StreamEvent]) -> None:
        """Learned text chunks: what ``_content`` does with each, as one event."""
        out.append(_TextRun(self.open[1], texts, literals))  # type: ignore[index]

    def _feed(self, chunk: bytes, out: list[ir.StreamEvent]) -> None:
        match = self.slot.match
        for _, raw in self.parser.feed_raw(chunk):
            if raw[-2:] == b'"}':
                raw = without_obfuscation(raw)  # also what the text chunk is learned from
            content = None if self.done or self.failed else match(raw)
            if content is None:
                self._frame(raw, out)
            else:
                # the bytes of a learned text chunk around another content
                # string: what _frame -> _text_chunk does with it, unparsed
                self._content(content, out)

    def close(self) -> list[ir.StreamEvent]:
        out: list[ir.StreamEvent] = []
        for _, data in self.parser.close_raw():
            self._frame(data, out)
        if not self.done and not self.failed:
            self.failed = True
            out.append(ir.StreamError(message="the upstream stream ended before [DONE]: the answer was cut"))
        return out
