"""Same-protocol relay: bytes pass unchanged; usage, completion and in-stream
errors are read on the way.

Cost matters here (the relay is benchmarked against a bare proxy), so frames
are not parsed one by one: only the ``event:`` lines of complete frames are
looked at, and JSON is parsed only for the terminal and error frames.
"""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import Passthrough
from cheapproxy.sse import SSEParser

from .common import usage_from_wire
from .response import error_fields

# event names whose frames we must read (the terminal ones and errors)
_TERMINAL_EVENTS = frozenset({b"response.completed", b"response.incomplete", b"response.failed", b"error"})
_STR_MARKERS = tuple(m.decode() for m in _TERMINAL_EVENTS)
# event names that mean model output went by
_OUTPUT_EVENTS = (b"response.output_", b"response.content_part", b"response.reasoning", b"response.function_call",
                  b"response.custom_tool_call", b"response.refusal")
_MAX_PENDING = 64 * 2**20  # a frame bigger than this is not ours to inspect


class ResponsesPassthrough(Passthrough):
    """Taps one relayed response (SSE when ``stream``, else one JSON body)."""

    def __init__(self, *, stream: bool) -> None:
        self.stream = stream
        self.usage: ir.Usage | None = None
        self.complete = False
        self.output_seen = False
        self.error_message: str | None = None
        self._pending = bytearray()  # the unfinished last frame (stream) or the body
        self._ended = False  # a terminal event went by: stop looking
        self._final = False  # it was response.completed, .incomplete or .failed: nothing follows

    def feed(self, chunk: bytes) -> bytes:
        if self._ended or not chunk:
            return chunk
        if not self.stream:
            self._pending += chunk
            return chunk
        pending = self._pending
        sent = len(pending)  # bytes of the region that went out with earlier reads
        if pending:
            pending += chunk
            end = _last_boundary(pending)
            if end < 0:
                if len(pending) > _MAX_PENDING:
                    pending.clear()
                return chunk
            region = bytes(pending[:end])
            del pending[:end]
        else:
            # the usual case: the chunk holds whole frames, nothing is copied
            end = _last_boundary(chunk)
            if end < 0:
                pending += chunk
                return chunk
            region = chunk if end == len(chunk) else chunk[:end]
            if end != len(chunk):
                pending += chunk[end:]
        cut = self._scan(region)
        if cut >= 0:
            # the terminal event went by: what follows its frame is not for
            # the client, and the relay reads no further
            self.ended = True
            pending.clear()
            return chunk[: cut - sent]
        return chunk

    def close(self) -> bytes:
        if self._ended:
            return b""
        if not self.stream:
            self._body(bytes(self._pending))
        elif self._pending:
            self._scan(bytes(self._pending) + b"\n\n")
        self._pending.clear()
        return b""

    # ------------------------------------------------------------ stream

    def _scan(self, region: bytes) -> int:
        """Look at the ``event:`` lines only (a few short finds per frame);
        parse JSON only for terminal and error frames.  The end of the
        terminal event's frame when one went by, else -1."""
        i = region.find(b"event:")
        if i < 0:
            # an upstream without event lines: fall back to looking at the data
            return self._scan_data(region)
        wanted = False
        while i >= 0:
            j = region.find(b"\n", i)
            name = region[i + 6: j if j >= 0 else len(region)].strip()
            if name in _TERMINAL_EVENTS:
                wanted = True
            elif not self.output_seen and name.startswith(_OUTPUT_EVENTS):
                self.output_seen = True
            i = region.find(b"event:", j) if j >= 0 else -1
        return self._parse(region) if wanted else -1

    def _scan_data(self, region: bytes) -> int:
        if not self.output_seen and any(m in region for m in _OUTPUT_EVENTS):
            self.output_seen = True
        if any(m in region for m in _TERMINAL_EVENTS):
            return self._parse(region)
        return -1

    def _parse(self, region: bytes) -> int:
        """Frame by frame (a region that names a terminal event: once a
        stream): the end of the frame that ended the stream, or -1."""
        pos, size = 0, len(region)
        while pos < size:
            end = _next_boundary(region, pos)
            for frame in SSEParser().feed(region[pos:end] + b"\n\n"):
                data = frame.data
                if not any(m in data for m in _STR_MARKERS) or data.startswith("[DONE]"):
                    continue
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    self._event(obj)
                if self._ended:
                    # an error event stops the reading, not the relay: a
                    # response.failed may follow it
                    return end if self._final else -1
            pos = end
        return -1

    def _event(self, obj: dict[str, Any]) -> None:
        # response.failed and error end a Responses stream too: ``complete``
        # says the end marker went by (nothing more will come), while
        # ``error_message`` says it was a failure
        t = obj.get("type")
        if t in ("response.completed", "response.incomplete", "response.failed"):
            resp = obj.get("response") or {}
            usage = usage_from_wire(resp.get("usage"))
            if usage is not None:
                self.usage = usage
            if resp.get("output"):
                self.output_seen = True
            if t == "response.failed":
                self.error_message = error_fields(resp.get("error"))[0]
            self._final = True
        elif t == "error":
            err = obj.get("error") if isinstance(obj.get("error"), dict) else obj
            self.error_message = error_fields(err)[0]
        else:
            return
        self.complete = True
        self._ended = True

    # ------------------------------------------------------------ non-stream

    def _body(self, body: bytes) -> None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        self.usage = usage_from_wire(obj.get("usage"))
        self.output_seen = bool(obj.get("output"))
        if obj.get("status") == "failed" or (isinstance(obj.get("error"), dict) and "output" not in obj):
            self.error_message = error_fields(obj.get("error"))[0]
        self.complete = True  # the whole body arrived
        self._ended = True


def _next_boundary(buf: bytes, pos: int) -> int:
    """End offset of the frame that starts at ``pos`` (the end of ``buf`` when
    no blank line follows)."""
    lf = buf.find(b"\n\n", pos)
    crlf = buf.find(b"\r\n\r\n", pos)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 4
    return lf + 2 if lf >= 0 else len(buf)


def _last_boundary(buf: bytes | bytearray) -> int:
    """End offset of the last complete frame in ``buf`` (-1: none yet)."""
    if buf.endswith(b"\n\n"):
        return len(buf)
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


def usage_from_body(body: bytes) -> ir.Usage | None:
    """Usage of a non-streamed Responses body."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_from_wire(obj.get("usage")) if isinstance(obj, dict) else None
