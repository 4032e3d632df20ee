"""Server-sent events: an incremental frame parser and writers.  Nothing
protocol-specific lives here.

The parser follows the WHATWG rules that matter for LLM streams: frames end at a
blank line, LF / CRLF / CR line endings, ``data:`` with or without a space,
several ``data:`` lines joined with ``\\n``, comment lines (``:``) ignored, and a
TCP read never assumed to be one event.
"""

from __future__ import annotations

from typing import NamedTuple


class SSEFrame(NamedTuple):
    event: str | None
    data: str


class SSEParser:
    """Feed bytes, get complete frames.  ``max_frame_bytes`` bounds memory."""

    __slots__ = ("_buf", "_event", "_data", "max_frame_bytes", "_pending_cr")

    def __init__(self, max_frame_bytes: int = 8 * 2**20) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []
        self.max_frame_bytes = max_frame_bytes
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SSEFrame]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        buf = self._buf + chunk if self._buf else chunk
        frames: list[SSEFrame] = []
        if b"\r" not in buf:
            # LF only (nearly every upstream): split every complete line at once
            cut = buf.rfind(b"\n")
            if cut >= 0:
                line = self._line
                for ln in buf[:cut].split(b"\n"):
                    line(ln, frames)
                buf = buf[cut + 1 :]
            self._buf = buf
            if len(buf) > self.max_frame_bytes:
                raise ValueError("SSE line too long")
            return frames
        start = 0
        n = len(buf)
        while start < n:
            # find the next line terminator (\n, \r\n or \r)
            i_n = buf.find(b"\n", start)
            i_r = buf.find(b"\r", start)
            if i_n < 0 and i_r < 0:
                break
            if i_r >= 0 and (i_n < 0 or i_r < i_n):
                end = i_r
                if i_r + 1 < n:
                    nxt = i_r + 2 if buf[i_r + 1 : i_r + 2] == b"\n" else i_r + 1
                else:
                    # a CR at the very end: the LF may come in the next chunk
                    nxt = i_r + 1
                    self._pending_cr = True
            else:
                end = i_n
                nxt = i_n + 1
            line = buf[start:end]
            start = nxt
            self._line(line, frames)
        self._buf = buf[start:]
        if len(self._buf) > self.max_frame_bytes:
            raise ValueError("SSE line too long")
        return frames

    def _line(self, line: bytes, frames: list[SSEFrame]) -> None:
        if not line:
            if self._data or self._event is not None:
                frames.append(SSEFrame(self._event, "\n".join(self._data)))
            self._event, self._data = None, []
            return
        if line.startswith(b"data:"):
            value_b = line[6:] if line[5:6] == b" " else line[5:]
            self._data.append(value_b.decode("utf-8", errors="replace"))
            return
        if line[:1] == b":":
            return
        text = line.decode("utf-8", errors="replace")
        field, sep, value = text.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        # id / retry are irrelevant to LLM streams

    def close(self) -> list[SSEFrame]:
        """End of body: flush a final frame that lacked its blank line."""
        frames: list[SSEFrame] = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r"), frames)
            self._buf = b""
        if self._data:
            frames.append(SSEFrame(self._event, "\n".join(self._data)))
            self._event, self._data = None, []
        return frames


def encode_frame(data: bytes | str, event: str | None = None, *, crlf: bool = False) -> bytes:
    """One SSE frame.  ``data`` must not contain newlines (JSON from orjson does not)."""
    if isinstance(data, str):
        data = data.encode()
    nl = b"\r\n" if crlf else b"\n"
    if event is None:
        return b"data: " + data + nl + nl
    return b"event: " + event.encode() + nl + b"data: " + data + nl + nl


SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
