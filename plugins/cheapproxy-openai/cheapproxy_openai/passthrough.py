"""Same-protocol relay: the client's body goes upstream with only the model
replaced (and ``include_usage`` forced for billing); the answer comes back as
it is, read on the way with cheap byte checks.  Only frames that mention
``"usage"`` with an object value, ``"error"`` or ``[DONE]`` are parsed."""

from __future__ import annotations

import re
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import Inbound, Passthrough, UpstreamRequest
from cheapproxy.sse import SSEParser

from .common import usage_from_wire

_WS = b" \t\r\n"
_USAGE_VALUE = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*[^n \t\r\n]')
# keys whose non-empty value means the model produced output for the client
_STRING_KEYS = (b'"content"', b'"reasoning_content"', b'"reasoning"', b'"refusal"')
_CALL_KEYS = (b'"tool_calls"', b'"function_call"')


def passthrough_request(inbound: Inbound, upstream_model: str) -> UpstreamRequest:
    """The client body with ``model`` replaced; streams always ask for usage."""
    body: dict[str, Any] = dict(inbound.body)
    body["model"] = upstream_model
    path = "/embeddings" if inbound.operation == "embeddings" else "/chat/completions"
    stream = inbound.operation != "embeddings" and body.get("stream") is True
    if stream:
        so = body.get("stream_options")
        so = dict(so) if isinstance(so, dict) else {}
        so["include_usage"] = True
        body["stream_options"] = so
    headers = {"content-type": "application/json"}
    return UpstreamRequest(path=path, body=orjson.dumps(body), headers=headers, stream=stream)


def _value_at(frame: bytes, key: bytes, start: int = 0) -> int:
    """Index of the first byte of ``key``'s value in ``frame``, or -1."""
    i = frame.find(key, start)
    while i >= 0:
        j = i + len(key)
        n = len(frame)
        while j < n and frame[j] in _WS:
            j += 1
        if j < n and frame[j] == 0x3A:  # ':'
            j += 1
            while j < n and frame[j] in _WS:
                j += 1
            return j if j < n else -1
        i = frame.find(key, j)
    return -1


def _has_output(frame: bytes) -> bool:
    for key in _STRING_KEYS:
        j = _value_at(frame, key)
        # a string value that is not empty: '"' followed by anything but '"'
        if j >= 0 and frame[j] == 0x22 and frame[j + 1 : j + 2] not in (b'"', b""):
            return True
    for key in _CALL_KEYS:
        j = _value_at(frame, key)
        if j >= 0 and frame[j] in b"[{" and frame[j + 1 : j + 2] not in (b"]", b"}"):
            return True
    return False


def _single_data(frame: bytes) -> bytes | None:
    """The data of a frame that is one ``data:`` line (nearly every frame),
    else None (the SSE parser's general rules apply)."""
    body = frame.rstrip(b"\n")
    if b"\n" in body or b"\r" in body:
        return None
    if body.startswith(b"data: "):
        return body[6:]
    if body.startswith(b"data:"):
        return body[5:]
    return None


def _is_done(frame: bytes) -> bool:
    """Is this frame the ``[DONE]`` end marker?"""
    data = _single_data(frame)
    if data is not None:
        return data.strip() == b"[DONE]"
    f = SSEParser().feed(frame + b"\n\n")
    return bool(f) and f[0].data.strip() == "[DONE]"


def _frame_around(region: bytes, p: int) -> bytes:
    """The whole LF frame of ``region`` that holds byte ``p``."""
    s = region.rfind(b"\n\n", 0, p)
    e = region.find(b"\n\n", p)
    return region[0 if s < 0 else s + 2 : len(region) if e < 0 else e + 2]


def _frame_json(frame: bytes) -> Any:
    data = _single_data(frame)
    if data is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # e.g. invalid UTF-8: the parser's lossy decoding below decides
    frames = SSEParser().feed(frame if frame.endswith(b"\n\n") else frame + b"\n\n")
    if not frames:
        return None
    try:
        return orjson.loads(frames[0].data)
    except orjson.JSONDecodeError:
        return None


class ChatStreamPassthrough(Passthrough):
    """Streamed relay.  Frames are split on raw bytes (blank lines).  When the
    client did not ask for usage, whole frames are forwarded and the usage-only
    chunk (``choices: []``) is dropped; otherwise chunks go out untouched."""

    def __init__(self, strip_usage: bool) -> None:
        self.strip = strip_usage
        self.usage: ir.Usage | None = None
        self.complete = False
        self.ended = False
        self.output_seen = False
        self.error_message: str | None = None
        self._buf = bytearray()
        self._cr = False

    def _boundary(self, start: int) -> tuple[int, int]:
        buf = self._buf
        i = buf.find(b"\n\n", start)
        best, size = i, 2
        if self._cr:
            for sep in (b"\r\n\r\n", b"\r\r"):
                j = buf.find(sep, start)
                if j >= 0 and (best < 0 or j < best):
                    best, size = j, len(sep)
        return best, size

    def _frames(self) -> list[bytes]:
        frames = []
        start = 0
        while True:
            i, size = self._boundary(start)
            if i < 0:
                break
            frames.append(bytes(self._buf[start : i + size]))
            start = i + size
        if start:
            del self._buf[:start]
        return frames

    def _inspect(self, frame: bytes) -> bool:
        """Read what billing needs from one frame; False drops it."""
        if not self.output_seen and _has_output(frame):
            self.output_seen = True
        # fast path: nearly every frame is a delta with at most '"usage":null'
        i = frame.find(b'"usage"')
        if i >= 0 and frame.startswith(b":null", i + 7) and frame.find(b'"usage"', i + 7) < 0:
            i = -1
        # "data: [DONE]" frames are tiny: skip the scan on every other frame
        done = len(frame) < 32 and b"[DONE]" in frame
        if i < 0 and not done and b'"error"' not in frame:
            return True
        if done and _is_done(frame):
            self.complete = self.ended = True
            return True
        j = _value_at(frame, b'"usage"') if i >= 0 else -1
        has_usage = j >= 0 and frame[j] == 0x7B  # '{'
        if not has_usage and b'"error"' not in frame:
            return True
        obj = _frame_json(frame)
        if not isinstance(obj, dict):
            return True
        err = obj.get("error")
        if err:
            msg = err.get("message") if isinstance(err, dict) else err
            self.error_message = str(msg or "the upstream reported an error mid-stream")
        usage = usage_from_wire(obj.get("usage"))
        if usage is not None:
            self.usage = usage
            if self.strip and obj.get("choices") == []:
                return False
        return True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if not self._cr and b"\r" in chunk:
            self._cr = True
        # bytes of the frame in progress that went out with earlier reads
        # (none when usage-only chunks are stripped: whole frames go out then)
        sent = 0 if self.strip else len(self._buf)
        if self._cr:  # CR framing: frame by frame (rare)
            self._buf += chunk
            out: list[bytes] = []
            size = 0
            for f in self._frames():
                size += len(f)
                if self._inspect(f):
                    out.append(f)
                if self.ended:
                    # nothing after the end marker is for the client
                    self._buf.clear()
                    return b"".join(out) if self.strip else chunk[: size - sent]
            return b"".join(out) if self.strip else chunk
        if self._buf:
            self._buf += chunk
            data = bytes(self._buf)
        else:
            data = chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            if not self._buf:
                self._buf += chunk
            return b"" if self.strip else chunk
        region = data[: cut + 2]
        self._buf = bytearray(data[cut + 2 :])
        kept = self._scan(region)
        if self.ended:
            # _scan cut the region after the end marker's frame: what follows
            # it in this read is not for the client
            self._buf.clear()
            return kept if self.strip else kept[sent:]
        return kept if self.strip else chunk

    def _scan(self, region: bytes) -> bytes:
        """Whole LF frames: only the frames that can matter are looked at (the
        first ones until output shows, and those that mention a usage object,
        an error or the end marker), found with byte searches over the whole
        region, so a read of fifty deltas costs a few scans, not fifty."""
        # the first real end marker closes the stream: the frames after it are
        # neither read nor sent
        hits: list[int] = []
        p = region.find(b"[DONE]")
        while p >= 0:
            hits.append(p)
            if _is_done(_frame_around(region, p)):
                region = region[: region.find(b"\n\n", p) + 2]
                break
            p = region.find(b"[DONE]", p + 6)
        start = 0
        while not self.output_seen:
            end = region.find(b"\n\n", start)
            if end < 0:
                break
            if _has_output(region[start : end + 2]):
                self.output_seen = True
            start = end + 2
        # '"usage":null' rides on every delta of an include_usage stream: only
        # a usage with another value (the final object) is looked for
        hits += self._usage_hits(region)
        p = region.find(b'"error"')
        while p >= 0:
            hits.append(p)
            p = region.find(b'"error"', p + 7)
        starts: set[int] = set()
        for p in hits:
            s = region.rfind(b"\n\n", 0, p)
            starts.add(0 if s < 0 else s + 2)
        if not starts:
            return region
        out: list[bytes] = []
        pos = 0
        for s in sorted(starts):
            e = region.find(b"\n\n", s) + 2
            if not self._inspect(region[s:e]):
                out.append(region[pos:s])
                pos = e
        if not pos:
            return region
        out.append(region[pos:])
        return b"".join(out)

    def _usage_hits(self, region: bytes) -> list[int]:
        """Where ``region`` mentions a usage that is not null."""
        if not self.strip:
            # usage is cumulative and the latest wins, so when the last mention
            # holds a value (the usual final chunk) it is the only one that
            # matters: one search from the end instead of a scan of the region
            p = region.rfind(b'"usage"')
            if p < 0:
                return []
            j = _value_at(region, b'"usage"', p)
            if j >= 0 and region[j] != 0x6E:  # not 'n'ull
                return [p]
        # every usage-only chunk is to be dropped (strip), or the last mention
        # is null and an earlier one may hold a value: look at them all
        return [m.start() for m in _USAGE_VALUE.finditer(region)]

    def close(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        if not rest.strip():
            return rest if self.strip else b""
        keep = self._inspect(rest)
        return rest if (self.strip and keep) else b""


class ChatBodyPassthrough(Passthrough):
    """Non-streamed relay: bytes out as they come, usage read at the end."""

    def __init__(self) -> None:
        self.usage: ir.Usage | None = None
        self.complete = False
        self.output_seen = False
        self.error_message: str | None = None
        self._parts: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        if chunk:
            self._parts.append(chunk)
            self.output_seen = True
        return chunk

    def close(self) -> bytes:
        body = b"".join(self._parts)
        self._parts = []
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return b""
        if isinstance(data, dict):
            err = data.get("error")
            if err:
                msg = err.get("message") if isinstance(err, dict) else err
                self.error_message = str(msg or "the upstream reported an error")
            else:
                self.complete = True
            self.usage = usage_from_body(body, data)
        return b""


def usage_from_body(body: bytes, data: Any = None) -> ir.Usage | None:
    """Usage of a non-streamed chat or embeddings body."""
    if data is None:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(data, dict):
        return None
    return usage_from_wire(data.get("usage"))


def make_passthrough(inbound: Inbound, stream: bool) -> Passthrough:
    if not stream:
        return ChatBodyPassthrough()
    so = inbound.body.get("stream_options")
    wants = isinstance(so, dict) and so.get("include_usage") is True
    return ChatStreamPassthrough(strip_usage=not wants)
