"""Upstream side, responses: GenerateContentResponse chunks -> IR events.

One state machine (``ChunkFolder``) serves both the streamed and the
non-streamed answer, so they decode the same way.  ``GeminiStreamDecoder``
feeds it from an SSE body (``alt=sse``, CRLF or LF) or from a streamed JSON
array; neither has an end marker, so a body is complete when a chunk with a
``finishReason`` (or a prompt block) went by."""

from __future__ import annotations

import re
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import StreamDecoder
from cheapproxy.sse import SSEParser

from .wire import PROTOCOL, get, kind_for_code, new_call_id, new_response_id, stop_from_wire, usage_from_wire

_TEXT, _REASONING, _OTHER = "text", "reasoning", "other"
_INTERESTING = re.compile(rb'[\\"{}\[\]]')


def error_message(err: Any) -> tuple[str, int]:
    """``{"code", "message", "status"}`` -> (readable message, code)."""
    if not isinstance(err, dict):
        return str(err)[:300], 500
    code = err.get("code") if isinstance(err.get("code"), int) else 500
    msg = str(err.get("message") or "upstream error")[:500]
    status = err.get("status")
    return (f"{status}: {msg}" if isinstance(status, str) and status else msg), code


class ChunkFolder:
    """Turns Gemini response chunks into IR stream events.  Blocks never
    interleave; the block index is a per-stream counter (pitfall 1)."""

    def __init__(self) -> None:
        self.started = False
        self.index = -1
        self.open_kind: str | None = None
        self.open_signed = False  # the open text block already carries a signature
        self.pending_pd: dict[str, Any] = {}
        self.saw_tool_call = False
        self.finish: str | None = None
        self.blocked = False
        self.usage: ir.Usage | None = None
        self.error: ir.StreamError | None = None
        self.model = ""

    # -- block helpers

    def _close(self, out: list[ir.StreamEvent]) -> None:
        if self.open_kind is not None:
            out.append(ir.PartStop(index=self.index, provider_data=self.pending_pd))
            self.open_kind, self.pending_pd, self.open_signed = None, {}, False

    def _open(self, kind: str, part: ir.Part, out: list[ir.StreamEvent]) -> int:
        self._close(out)
        self.index += 1
        self.open_kind = kind
        out.append(ir.PartStart(index=self.index, part=part))
        return self.index

    # -- chunks

    def feed(self, chunk: Any) -> list[ir.StreamEvent]:
        out: list[ir.StreamEvent] = []
        if self.error is not None:
            return out
        if not isinstance(chunk, dict):
            return out
        if "error" in chunk:
            msg, code = error_message(chunk["error"])
            self.error = ir.StreamError(message=msg, kind=kind_for_code(code), status=code if code >= 400 else 502)
            out.append(self.error)
            return out
        if not self.started:
            self.started = True
            self.model = str(get(chunk, "modelVersion", ""))
            out.append(ir.MessageStart(id=str(get(chunk, "responseId", "") or new_response_id()), model=self.model))
        cands = chunk.get("candidates")
        if isinstance(cands, list) and cands and isinstance(cands[0], dict):
            cand = cands[0]
            content = cand.get("content")
            if isinstance(content, dict) and isinstance(content.get("parts"), list):
                for part in content["parts"]:
                    if isinstance(part, dict):
                        self._part(part, out)
            reason = get(cand, "finishReason")
            if isinstance(reason, str) and reason:
                self.finish = reason
                self._close(out)  # content first, then the finish (pitfall 19)
        else:
            fb = get(chunk, "promptFeedback")
            if isinstance(fb, dict) and get(fb, "blockReason"):
                self.blocked = True
        usage = usage_from_wire(get(chunk, "usageMetadata"))
        if usage is not None and usage != self.usage:
            self.usage = usage  # cumulative: the latest wins, never summed
            out.append(ir.UsageUpdate(usage=usage))
        return out

    def _part(self, part: dict[str, Any], out: list[ir.StreamEvent]) -> None:
        sig = get(part, "thoughtSignature")
        sig = sig if isinstance(sig, str) and sig else None
        if "text" in part and isinstance(part["text"], str):
            self._text(part["text"], part.get("thought") is True, sig, out)
            return
        fc = get(part, "functionCall")
        if isinstance(fc, dict):
            # a Gemini function call is always whole: start, full args, stop
            name = str(fc.get("name", ""))
            args = fc.get("args") if isinstance(fc.get("args"), dict) else {}
            wid = fc.get("id")
            cid = wid if isinstance(wid, str) and wid else new_call_id()
            idx = self._open(_OTHER, ir.ToolCallPart(id=cid, name=name, arguments=""), out)
            out.append(ir.ToolCallDelta(index=idx, arguments=orjson.dumps(args).decode()))
            self.pending_pd = {PROTOCOL: {"thoughtSignature": sig}} if sig else {}
            self.saw_tool_call = True
            self._close(out)
            return
        inline = get(part, "inlineData")
        if isinstance(inline, dict):
            mime = get(inline, "mimeType")
            data = str(inline.get("data", ""))
            media: ir.Part = ir.ImagePart(media_type=mime, data=data) if str(mime).startswith("image/") \
                else ir.FilePart(media_type=mime, data=data)
            self._open(_OTHER, media, out)
            self._close(out)
            return
        code = get(part, "executableCode")
        if isinstance(code, dict):
            self._text(f"\n```{str(code.get('language', '')).lower()}\n{code.get('code', '')}\n```\n", False, sig, out)
            return
        result = get(part, "codeExecutionResult")
        if isinstance(result, dict):
            self._text(f"\n```\n{result.get('output', '')}\n```\n", False, sig, out)
            return
        if sig:
            self._text("", False, sig, out)

    def _text(self, text: str, thought: bool, sig: str | None, out: list[ir.StreamEvent]) -> None:
        kind = _REASONING if thought else _TEXT
        if not text and sig and self.open_kind in (_TEXT, _REASONING) and not self.open_signed:
            # a signature on an empty part closes the open block: attach it there
            kind = self.open_kind
        elif self.open_kind != kind or self.open_signed:
            if not text and not sig:
                return
            self._open(kind, ir.ReasoningPart() if thought else ir.TextPart(text=""), out)
        if kind == _REASONING:
            if text or sig:
                out.append(ir.ReasoningDelta(index=self.index, text=text, signature=sig,
                                             signature_protocol=PROTOCOL if sig else None))
            if sig:
                self.open_signed = True
        else:
            if text:
                out.append(ir.TextDelta(index=self.index, text=text))
            if sig:
                self.pending_pd = {PROTOCOL: {"thoughtSignature": sig}}
                self.open_signed = True

    # -- end

    @property
    def complete(self) -> bool:
        return self.finish is not None or self.blocked

    def stop_reason(self) -> ir.StopReason:
        if self.finish is None and self.blocked:
            return ir.StopReason.CONTENT_FILTER
        return stop_from_wire(self.finish or "STOP", self.saw_tool_call)

    def end(self) -> list[ir.StreamEvent]:
        """At end of body: a clean stop when the answer finished, else an error."""
        out: list[ir.StreamEvent] = []
        if self.error is not None:
            return out
        if not self.complete:
            self.error = ir.StreamError(
                message="the gemini upstream stream ended before a finishReason (connection cut)",
                kind="upstream_failed",
                status=502,
            )
            return [self.error]
        if not self.started:
            self.started = True
            out.append(ir.MessageStart(id=new_response_id(), model=self.model))
        self._close(out)
        out.append(ir.MessageStop(stop_reason=self.stop_reason(), usage=self.usage))
        return out


class JSONArraySplitter:
    """Incremental splitter for ``[{...},{...}]`` bodies: yields each complete
    top-level element's bytes.  A regex jumps between the bytes that matter
    (quotes, backslashes, brackets), so long strings cost little."""

    def __init__(self, *, bare_object: bool = False) -> None:
        self.buf = bytearray()
        self.pos = 0
        # 0 = outside the array, 1 = inside it; a bare object body starts "inside"
        self.depth = 1 if bare_object else 0
        self.in_str = False
        self.escape = False  # the chunk ended right after a backslash
        self.start = -1
        self.closed = False

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buf += chunk
        out: list[bytes] = []
        buf, i, n = self.buf, self.pos, len(self.buf)
        if self.escape and i < n:
            i += 1
            self.escape = False
        search = _INTERESTING.search
        while True:
            m = search(buf, i)
            if m is None:
                break
            j = m.start()
            c = buf[j]
            i = j + 1
            if self.in_str:
                if c == 0x5C:  # backslash: the next byte is escaped
                    if i < n:
                        i += 1
                    else:
                        self.escape = True
                elif c == 0x22:
                    self.in_str = False
            elif c == 0x22:
                self.in_str = True
            elif c in (0x7B, 0x5B):  # { [
                if self.depth == 1 and c == 0x7B:
                    self.start = j
                self.depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                self.depth -= 1
                if self.depth == 1 and c == 0x7D and self.start >= 0:
                    out.append(bytes(buf[self.start:j + 1]))
                    self.start = -1
                elif self.depth == 0:
                    self.closed = True
        # drop consumed bytes so memory stays bounded by one element
        keep = self.start if self.start >= 0 else n
        del buf[:keep]
        self.start = 0 if self.start >= 0 else -1
        self.pos = max(i, n) - keep
        return out


class GeminiStreamDecoder(StreamDecoder):
    """Native stream bytes (SSE or JSON array, any chunking) -> IR events."""

    def __init__(self) -> None:
        self.folder = ChunkFolder()
        self.sse: SSEParser | None = None
        self.array: JSONArraySplitter | None = None

    def feed(self, chunk: bytes) -> list[ir.StreamEvent]:
        if self.sse is None and self.array is None:
            head = chunk.lstrip()
            if not head:
                return []
            if head[:1] in (b"[", b"{"):
                # a JSON array stream (no alt=sse), or one bare object (an error body)
                self.array = JSONArraySplitter(bare_object=head[:1] == b"{")
            else:
                self.sse = SSEParser()
        out: list[ir.StreamEvent] = []
        if self.array is not None:
            for element in self.array.feed(chunk):
                out.extend(self._load(element))
        else:
            assert self.sse is not None
            for frame in self.sse.feed(chunk):
                out.extend(self._load(frame.data))
        return out

    def _load(self, data: str | bytes) -> list[ir.StreamEvent]:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            if self.folder.error is None:
                self.folder.error = ir.StreamError(message="the gemini upstream sent a malformed stream chunk")
                return [self.folder.error]
            return []
        return self.folder.feed(obj)

    def close(self) -> list[ir.StreamEvent]:
        out: list[ir.StreamEvent] = []
        if self.sse is not None:
            for frame in self.sse.close():
                out.extend(self._load(frame.data))
        out.extend(self.folder.end())
        return out


def decode_body(body: bytes) -> list[ir.StreamEvent]:
    """A whole non-streamed body (one object, or a JSON array of chunks) ->
    events; an error body or a cut answer yields a StreamError."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [ir.StreamError(message="the gemini upstream sent a body that is not JSON")]
    folder = ChunkFolder()
    events: list[ir.StreamEvent] = []
    for chunk in obj if isinstance(obj, list) else [obj]:
        events.extend(folder.feed(chunk))
    if folder.error is None and not folder.complete and folder.started and isinstance(obj, dict):
        # a non-streamed answer is whole by construction even without a reason
        folder.finish = "STOP"
    events.extend(folder.end())
    return events
