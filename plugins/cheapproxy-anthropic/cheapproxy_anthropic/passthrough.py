"""Same-protocol relay: bytes go through untouched; usage, completion and
in-stream errors are read on the way with byte checks, parsing JSON only for
the few frames that carry them (message_start, message_delta, error)."""

from __future__ import annotations

import re
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import Passthrough
from cheapproxy.sse import SSEParser

from .common import usage_from_wire

_MAX_TAIL = 16 * 2**20  # a frame larger than this stops the bookkeeping, never the relay
_LINE = re.compile(rb"[^\r\n]*+(?:\r\n|\r|\n)")  # one line with its ending (CRLF, CR or LF)


def usage_from_body(body: bytes) -> ir.Usage | None:
    """Usage of a non-streamed Messages body, or None."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("usage"), dict):
        return None
    return usage_from_wire(data["usage"])


def _frame_fields(frame: bytes) -> tuple[str | None, bytes]:
    """(event name, data) of one LF-framed SSE frame."""
    event: str | None = None
    data: list[bytes] = []
    for line in frame.split(b"\n"):
        if line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
    return event, b"\n".join(data)


class MessagesPassthrough(Passthrough):
    """One relayed response.  Streams are split on blank lines only when a
    chunk may hold an interesting frame; CR line endings switch to SSEParser."""

    def __init__(self, *, stream: bool) -> None:
        self.stream = stream
        self.usage: ir.Usage | None = None
        self.complete = False
        self.output_seen = False
        self.error_message: str | None = None
        self._tail = b""
        self._parser: SSEParser | None = None
        self._body: list[bytes] = []
        self._gave_up = False

    def feed(self, chunk: bytes) -> bytes:
        if not self.stream:
            self._body.append(chunk)
            return chunk
        if self.complete or self.error_message is not None or self._gave_up or not chunk:
            return chunk
        if self._parser is not None:
            end = self._parse(chunk)
            return chunk if end < 0 else chunk[:end]
        data = self._tail + chunk if self._tail else chunk
        if b"\r" in data:  # CR or CRLF framing: let the full parser take over
            self._parser = SSEParser()
            sent = len(self._tail)  # went out with earlier reads
            self._tail = b""
            end = self._parse(data)
            return chunk if end < 0 else chunk[: end - sent]
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._tail = data
            self._gave_up = len(data) > _MAX_TAIL
            return chunk
        sent = len(self._tail)  # went out with earlier reads
        region, self._tail = data[:cut], data[cut + 2:]
        end = self._scan(region)
        if end >= 0:
            # message_stop went by: what follows its frame is not for the client
            self._tail = b""
            return chunk[: end + 2 - sent]
        return chunk

    def _parse(self, data: bytes) -> int:
        """CR framing (rare), line by line so that the end of each frame is
        known: the offset in ``data`` after the line that ended the
        message_stop frame, else -1.  Nothing after message_stop or an error
        event is read."""
        parser = self._parser
        assert parser is not None
        pos = 0
        for m in _LINE.finditer(data):
            pos = m.end()
            for f in parser.feed(m.group()):
                self._handle(f.event, f.data.encode())
                if self.ended:
                    return pos
                if self.error_message is not None:
                    return -1
        if pos < len(data):
            parser.feed(data[pos:])  # a line not ended yet
        return -1

    def _scan(self, region: bytes) -> int:
        """Read the frames of ``region`` that matter; the end of the
        message_stop frame (before its blank line) if one went by, else -1."""
        if not self.output_seen and b"content_block_" in region:
            self.output_seen = True
        # most chunks are content deltas: two searches and done; otherwise
        # only the frames around the hits are read (a whole answer arriving in
        # one read is fifty frames, three of which matter)
        starts: set[int] = set()
        for needle in (b"message_", b"error"):
            p = region.find(needle)
            while p >= 0:
                s = region.rfind(b"\n\n", 0, p)
                starts.add(0 if s < 0 else s + 2)
                e = region.find(b"\n\n", p)
                if e < 0:
                    break
                p = region.find(needle, e)  # the next frame on
        for s in sorted(starts):
            e = region.find(b"\n\n", s)
            if e < 0:
                e = len(region)
            event, data = _frame_fields(region[s:e])
            self._handle(event, data)
            if self.ended:
                return e
            if self.error_message is not None:
                break  # after an error event nothing more is read, as in later reads
        return -1

    def _handle(self, event: str | None, data: bytes) -> None:
        if not data:
            return
        if event is None:  # frames without an event line: use the JSON type
            if b'"type"' not in data:
                return
            try:
                event = str(orjson.loads(data).get("type"))
            except (orjson.JSONDecodeError, AttributeError):
                return
        if event in ("content_block_start", "content_block_delta"):
            self.output_seen = True
        elif event in ("message_start", "message_delta"):
            obj = self._json(data)
            usage = obj.get("usage") if event == "message_delta" else (obj.get("message") or {}).get("usage")
            if isinstance(usage, dict):
                self.usage = ir.merge_usage(self.usage, usage_from_wire(usage))
        elif event == "message_stop":
            self.complete = self.ended = True
        elif event == "error":
            err = self._json(data).get("error")
            msg = err.get("message") if isinstance(err, dict) else None
            self.error_message = str(msg or "upstream stream error")

    @staticmethod
    def _json(data: bytes) -> dict[str, Any]:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return {}
        return obj if isinstance(obj, dict) else {}

    def close(self) -> bytes:
        if not self.stream:
            body = b"".join(self._body)
            self._body = []
            self.usage = usage_from_body(body)
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict) and data.get("type") == "message":
                self.complete = True
                self.output_seen = bool(data.get("content"))
            elif isinstance(data, dict) and data.get("type") == "error":
                err = data.get("error")
                self.error_message = str(err.get("message") if isinstance(err, dict) else "upstream error")
            return b""
        if self._parser is not None:
            for f in self._parser.close():
                self._handle(f.event, f.data.encode())
        elif self._tail and not (self.complete or self.error_message or self._gave_up):
            self._scan(self._tail.rstrip(b"\n"))
        self._tail = b""
        return b""
