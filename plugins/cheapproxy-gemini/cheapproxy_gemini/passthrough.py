"""Same-protocol relay: bytes are forwarded untouched; usage, completion and
errors are read on the way with byte checks.  Only the latest frame that
mentions ``usageMetadata`` is kept, and it is parsed once, when the usage is
read (Gemini repeats cumulative usage on every chunk)."""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import Passthrough

from .decode import JSONArraySplitter, error_message
from .wire import usage_from_wire

_USAGE = b'"usageMetadata"'
_FINISH = b'"finishReason"'
_BLOCK = b'"blockReason"'
_ERROR = b'"error"'
_PARTS = b'"parts"'


def _last_usage(obj: Any) -> ir.Usage | None:
    if isinstance(obj, list):
        for item in reversed(obj):
            u = _last_usage(item)
            if u is not None:
                return u
        return None
    if isinstance(obj, dict):
        meta = obj.get("usageMetadata", obj.get("usage_metadata"))
        return usage_from_wire(meta) if meta is not None else None
    return None


def usage_from_body(body: bytes) -> ir.Usage | None:
    """Usage of a non-streamed body (an object, or a JSON array of chunks)."""
    try:
        return _last_usage(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


def _frame_end(data: bytes, start: int) -> int:
    """Index just past the last complete SSE frame in ``data`` (LF or CRLF
    framing), or -1."""
    a = data.rfind(b"\n\n", start)
    b = data.rfind(b"\n\r\n", start)
    end = max(a + 2 if a >= 0 else -1, b + 3 if b >= 0 else -1)
    return end


class GeminiPassthrough(Passthrough):
    """One relayed response.  Streams are SSE (``alt=sse``) or a JSON array."""

    def __init__(self, *, stream: bool, sse: bool) -> None:
        self.stream = stream
        self.sse = sse
        self._buf = b""
        self._usage_raw: bytes | None = None
        self._usage: ir.Usage | None = None
        self._body: list[bytes] = []
        self._array = JSONArraySplitter() if stream and not sse else None
        self.complete = False
        self.output_seen = False
        self.error_message = None

    @property  # type: ignore[override]
    def usage(self) -> ir.Usage | None:
        if self._body:
            self._finish_body()
        if self._usage_raw is not None:
            self._usage = self._parse_usage(self._usage_raw) or self._usage
            self._usage_raw = None
        return self._usage

    @staticmethod
    def _parse_usage(raw: bytes) -> ir.Usage | None:
        text = raw.strip()
        if text.startswith(b"data:"):
            text = text[5:]
        try:
            return _last_usage(orjson.loads(text))
        except orjson.JSONDecodeError:
            return None

    def feed(self, chunk: bytes) -> bytes:
        if not self.stream:
            self._body.append(chunk)
            return chunk
        if self._array is not None:
            for element in self._array.feed(chunk):
                self._scan(element, [element])
            return chunk
        data = self._buf + chunk if self._buf else chunk
        end = _frame_end(data, 0)
        if end < 0:
            self._buf = data
            return chunk
        region, self._buf = data[:end], data[end:]
        self._scan(region, None)
        return chunk

    def _scan(self, region: bytes, frames: list[bytes] | None) -> None:
        """Cheap checks on complete frames; JSON is parsed only for errors."""
        if not self.output_seen and _PARTS in region:
            self.output_seen = True
        if _FINISH in region or _BLOCK in region:
            self.complete = True
        at = region.rfind(_USAGE)
        if at >= 0:
            if frames is not None:
                self._usage_raw = frames[-1]
            else:
                start = max(region.rfind(b"\n\n", 0, at), region.rfind(b"\n\r\n", 0, at))
                stop = region.find(b"\n", at)
                self._usage_raw = region[start + 1 if start >= 0 else 0:stop if stop >= 0 else len(region)]
        if _ERROR in region and self.error_message is None:
            self._find_error(frames if frames is not None else region.splitlines())

    def _find_error(self, items: list[bytes]) -> None:
        for item in items:
            text = item.strip()
            if text.startswith(b"data:"):
                text = text[5:].strip()
            if not text.startswith(b"{") or _ERROR not in text:
                continue
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "error" in obj:
                self.error_message = error_message(obj["error"])[0]
                return

    def _finish_body(self) -> None:
        body = b"".join(self._body)
        self._body = []
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        self._usage = _last_usage(obj)
        if isinstance(obj, dict) and "error" in obj:
            self.error_message = error_message(obj["error"])[0]
        else:
            self.complete = True
            self.output_seen = True

    def close(self) -> bytes:
        if not self.stream:
            if self._body:
                self._finish_body()
        elif self._buf:
            # a last frame without its blank line
            region, self._buf = self._buf, b""
            self._scan(region, None)
        return b""
