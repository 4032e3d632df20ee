"""Server-sent events: an incremental frame parser and writers.  Nothing
protocol-specific lives here.

The parser follows the WHATWG rules that matter for LLM streams: frames end at a
blank line, LF / CRLF / CR line endings, ``data:`` with or without a space,
several ``data:`` lines joined with ``\\n``, comment lines (``:``) ignored, and a
TCP read never assumed to be one event.
"""

from __future__ import annotations

import operator
import re
from io import BytesIO
from itertools import chain, repeat
from typing import Any, NamedTuple, Optional, Tuple

import orjson

_loads = orjson.loads
_dumps = orjson.dumps
_JSONDecodeError = orjson.JSONDecodeError


class SSEFrame(NamedTuple):
    event: str | None
    data: str


RawFrame = Tuple[Optional[str], bytes]
"""``(event, data)`` with the data still bytes (see ``SSEParser.feed_raw``)."""

# The usual frames of LF-only input: blank lines, then "data: ..." alone or
# "event: name" + "data: ...", then a blank line.  One space after a colon is
# dropped.  (Anything else, e.g. two data lines, goes line by line.)
_USUAL = re.compile(rb"\n*+(?:event: ?+(.*+)\n)?data: ?+(.*+)\n\n")  # "." is all but \n

_names: dict[bytes, str] = {}


def _event_name(raw: bytes) -> str:
    """``raw.decode("utf-8", errors="replace")``, remembered (a stream repeats a few names)."""
    name = _names.get(raw)
    if name is None:
        name = raw.decode("utf-8", errors="replace")
        if len(_names) < 256:
            _names[raw] = name
    return name


# A frame not yet ended is kept whole (raw) between reads up to this size; a
# longer one has its complete lines parsed at once so no read rescans it.
_RAW_LIMIT = 64 * 1024


class SSEParser:
    """Feed bytes, get complete frames.  ``max_frame_bytes`` bounds one line.

    Two paths give the same frames.  In LF-only input (nearly every upstream)
    the usual frames, ``data: ...`` alone or ``event: ...`` + ``data: ...``, are
    read by one regex match each (no Python call per line), and a frame not yet
    ended waits whole in the buffer for the next read.  Anything else (CR line
    endings, comments, several data lines, other fields) goes line by line
    through ``_line``, as all input once did.
    """

    __slots__ = ("_buf", "_event", "_data", "max_frame_bytes", "_pending_cr")

    def __init__(self, max_frame_bytes: int = 8 * 2**20) -> None:
        # unparsed input, starting at a line start; on the LF path it may hold
        # several complete lines of a frame not yet ended (then _event/_data are empty)
        self._buf = b""
        self._event: str | None = None  # the frame being built line by line
        self._data: list[bytes] = []
        self.max_frame_bytes = max_frame_bytes
        self._pending_cr = False

    def idle(self) -> bool:
        """Whether nothing of a frame is held (the next byte starts a frame)."""
        return not self._buf and not self._data and self._event is None and not self._pending_cr

    def feed(self, chunk: bytes) -> list[SSEFrame]:
        return [SSEFrame(event, data.decode("utf-8", errors="replace")) for event, data in self.feed_raw(chunk)]

    def feed_raw(self, chunk: bytes) -> list[RawFrame]:
        """Like ``feed`` but the data stays bytes, for a caller that hands it to
        orjson (which reads bytes).  ``data.decode("utf-8", errors="replace")``
        is what ``feed`` gives."""
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            return self._feed_lines(buf)
        frames: list[RawFrame] = []
        pos = 0
        if self._event is not None or self._data:
            pos = self._end_frame(buf, frames)  # a frame an earlier read began line by line
            if pos < 0:
                return frames
        find = buf.find
        while True:
            # the usual frames, one regex match each, each anchored where the last ended
            m = None
            for m in iter(_USUAL.scanner(buf, pos).match, None):
                event, data = m.groups()
                if event is not None:
                    event = _names.get(event) or _event_name(event)
                frames.append((event, data))
            if m is not None:
                pos = m.end()
            # something else here: an unusual frame, or one not complete yet
            end = find(b"\n\n", pos)
            if end < 0:
                break
            for line in buf[pos:end].split(b"\n"):  # the unusual frame, line by line
                self._line(line, frames)
            self._line(b"", frames)
            pos = end + 2
        rest = buf[pos:] if pos else buf
        if len(rest) > _RAW_LIMIT:
            cut = rest.rfind(b"\n")
            if cut >= 0:
                for line in rest[:cut].split(b"\n"):
                    self._line(line, frames)
                rest = rest[cut + 1 :]
        self._buf = rest
        if len(rest) - rest.rfind(b"\n") - 1 > self.max_frame_bytes:
            raise ValueError("SSE line too long")
        return frames

    def _end_frame(self, buf: bytes, frames: list[RawFrame]) -> int:
        """Finish, line by line, the frame in ``_event``/``_data``: the offset
        after its blank line, or -1 when ``buf`` does not end it yet."""
        if buf.startswith(b"\n"):
            end = 0
        else:
            end = buf.find(b"\n\n")
            if end < 0:
                cut = buf.rfind(b"\n")
                if cut >= 0:
                    for line in buf[:cut].split(b"\n"):
                        self._line(line, frames)
                self._buf = buf[cut + 1 :]
                if len(self._buf) > self.max_frame_bytes:
                    raise ValueError("SSE line too long")
                return -1
            for line in buf[:end].split(b"\n"):
                self._line(line, frames)
            end += 1
        self._line(b"", frames)
        return end + 1

    def _feed_lines(self, buf: bytes) -> list[RawFrame]:
        """The general path: one line at a time, any line endings."""
        frames: list[RawFrame] = []
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

    def _line(self, line: bytes, frames: list[RawFrame]) -> None:
        if not line:
            if self._data or self._event is not None:
                frames.append((self._event, b"\n".join(self._data)))
            self._event, self._data = None, []
            return
        if line.startswith(b"data:"):
            self._data.append(line[6:] if line[5:6] == b" " else line[5:])
            return
        if line[:1] == b":":
            return
        text = line.decode("utf-8", errors="replace")
        field, sep, value = text.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":  # a bare "data" line (no colon): an empty data line
            self._data.append(value.encode())
        elif field == "event":
            self._event = value
        # id / retry are irrelevant to LLM streams

    def close(self) -> list[SSEFrame]:
        """End of body: flush a final frame that lacked its blank line."""
        return [SSEFrame(event, data.decode("utf-8", errors="replace")) for event, data in self.close_raw()]

    def close_raw(self) -> list[RawFrame]:
        """``close`` with the data as bytes (see ``feed_raw``)."""
        frames: list[RawFrame] = []
        if self._buf:
            # complete lines of a frame kept raw, then the unterminated last line
            *lines, last = self._buf.split(b"\n")
            for line in lines:
                self._line(line, frames)
            if last:
                self._line(last.rstrip(b"\r"), frames)
            self._buf = b""
        if self._data:
            frames.append((self._event, b"\n".join(self._data)))
        self._event, self._data = None, []
        return frames


class StringSlot:
    """Spots a JSON document that is byte for byte a learned one except for one
    string value, and reads only that value: a stream decoder's shortcut for its
    hottest frame (a text delta), whose other bytes repeat in every frame.

    ``learn(raw, path)`` takes a document whose value at ``path`` (keys and list
    indexes) is a string and keeps the bytes before and after that value, once a
    test parse with another string there proves the spot is that value.  Then
    ``match(raw)`` gives the string when ``raw`` is those bytes around one JSON
    string literal, else None.  A match means ``orjson.loads(raw)`` equals the
    learned document with that string at ``path``: JSON parses the same bytes
    around a string token the same way whatever the string.  Bytes orjson would
    refuse (invalid UTF-8) give no match, so the caller's full path sees them.
    """

    __slots__ = ("head", "tail", "size", "start", "stop", "learns")

    def __init__(self, learns: int = 4) -> None:
        self.head = b""
        self.tail = b""  # never empty once learned: the value sits inside an object or list
        self.size = 1 << 62  # len(head) + len(tail): too big to match while nothing is learned
        self.start = 0  # the value's slice: raw[start:stop]
        self.stop = 0
        self.learns = learns  # attempts left: a stream whose frames never repeat stops paying for them

    @property
    def learned(self) -> bool:
        return self.size < 1 << 62

    def match(self, raw: bytes) -> str | None:
        if len(raw) > self.size and raw.startswith(self.head) and raw.endswith(self.tail):
            try:
                value = _loads(raw[self.start : self.stop])
            except _JSONDecodeError:
                return None
            if type(value) is str:
                return value
        return None

    def learn(self, raw: bytes, path: tuple[Any, ...]) -> bool:
        """Whether ``raw`` is now the learned document (else what was learned stays)."""
        if self.learns <= 0:
            return False
        self.learns -= 1
        try:
            doc = _loads(raw)
            holder = doc
            for k in path[:-1]:
                holder = holder[k]
            value = holder[path[-1]]
        except (_JSONDecodeError, LookupError, TypeError):
            return False
        if type(value) is not str:
            return False
        # the value as orjson writes it, right after its key (a value written
        # with other escapes is not found: no shortcut for that upstream)
        key = _dumps(path[-1]) + b":"
        at = raw.find(key + _dumps(value))
        if at < 0:
            return False
        start = at + len(key)
        head, tail = raw[:start], raw[start + len(_dumps(value)) :]
        other = value + "\x00"
        holder[path[-1]] = other
        try:
            ok = _loads(head + _dumps(other) + tail) == doc
        except _JSONDecodeError:
            ok = False
        if ok:
            self.head, self.tail, self.size = head, tail, len(head) + len(tail)
            self.start, self.stop = len(head), -len(tail)
        return ok


_RUN_WINDOW = 32 * 1024  # bytes one attempt at a run looks at (a longer run takes several)
_RUN_LEAST = 16  # frames a read must have room for before a run is looked for (fewer go faster one by one)
_LEARNING_FRAMES = 16  # frames fed one at a time, at most, while a stream's text frame is being learned
_LEARNING_READ = 4096  # a smaller read is fed whole while learning (a run is unlikely in it)
_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ITEM0, _ITEM1, _ITEM2 = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)
_RUN_MISSES = 4  # looks in a row that find no run before a stream stops looking (frames that vary, e.g. obfuscated)


def _first_false(flags: list[bool], limit: int) -> int:
    try:
        return min(flags.index(False), limit)
    except ValueError:
        return limit


def string_run(buf: bytes, pos: int, event: bytes | None, head: bytes, tail: bytes,
               pad: bytes | None = None) -> tuple[list[str], list[bytes], int] | None:
    """The run of whole LF frames at ``buf[pos:]`` that are each an ``event:
    <event>`` line (when ``event`` is not None), then one data line ``head +
    S + tail``, then a blank line, S being a JSON string literal exactly as
    ``orjson.dumps`` writes it: (the strings, their literals, the offset after
    the run), or None when the frame at ``pos`` is not one.  The frames are
    cut into lines and checked by C calls over the whole run (maps, one
    parse), not a Python call per frame.

    With ``pad`` (``b',"obfuscation":"'``: OpenAI's padding), a run may also
    be of frames whose data line is ``head + S + tail[:-1] + pad + P + '"' +
    tail[-1:]``, P letters and digits that change from frame to frame (a
    last member added to the learned object)."""
    # the first frame first, so that a look that finds none costs that frame
    # alone, not the window: it begins with its event line and head, and its
    # data line ends with the tail (or the padded tail)
    first = head if event is None else event + b"\n" + head
    end = buf.find(b"\n", pos + len(first))
    if end < 0 or not buf.startswith(first, pos):
        return None
    padded = False
    if not buf.startswith(tail + b"\n\n", end - len(tail)):
        padded = pad is not None and buf.startswith(b'"' + tail[-1:] + b"\n\n", end - 2) and (
            buf.rfind(pad, pos, end) > pos + len(first))
        if not padded:
            return None
    # BytesIO.readlines finds line ends with memchr: a third of what
    # bytes.split(b"\n") costs, which compares byte by byte (each line keeps
    # its "\n"; the buffer is shared, not copied)
    reader = BytesIO(buf)
    reader.seek(pos)
    lines = reader.readlines(_RUN_WINDOW)
    per = 2 if event is None else 3  # lines a frame takes, its blank line last
    k = len(lines) // per  # frames whose lines were all read (the last may lack its "\n": checked below)
    if k == 0:
        return None
    datas = lines[per - 2 : k * per : per]
    k = _first_false(list(map(bytes.startswith, datas, repeat(head))), k)
    blanks = lines[per - 1 : k * per : per]
    if blanks.count(b"\n") != k:
        k = _first_false(list(map(b"\n".__eq__, blanks)), k)
    if event is not None:
        event_line = event + b"\n"
        events = lines[0 : k * per : per]
        if events.count(event_line) != k:
            k = _first_false(list(map(event_line.__eq__, events)), k)
    afters: list[bytes] = []
    if padded:
        # each data line without its padding, as if it had come without
        assert pad is not None
        parts = list(map(bytes.rpartition, datas[:k], repeat(pad)))
        afters = list(map(_ITEM2, parts))  # P + '"' + tail[-1:] + "\n"
        closing = b'"' + tail[-1:] + b"\n"
        k = _first_false(list(map(closing.__eq__, map(bytes.translate, afters, repeat(None), repeat(_ALNUM)))), k)
        k = _first_false(list(map(bytes.endswith, afters[:k], repeat(closing))), k)
        k = _first_false(list(map(pad.__eq__, map(_ITEM1, parts[:k]))), k)
        datas = list(map(operator.add, map(_ITEM0, parts[:k]), repeat(closing[1:])))
    cut = len(tail) + 1  # the tail and the line's "\n" after the literal
    for _ in range(2):  # the second time with k cut to the frames that hold
        if k == 0:
            return None
        literals = list(map(operator.getitem, datas[:k], repeat(slice(len(head), -cut))))
        try:
            texts = _loads(b"[" + b",".join(literals) + b"]")
            ok = len(texts) == k and set(map(type, texts)) == {str} and list(map(_dumps, texts)) == literals
        except (ValueError, TypeError):  # not JSON, or not as orjson writes it
            ok = False
        if ok:
            # the frames rebuilt from the literals are the bytes read: each
            # frame is the learned one around its literal (this checks the tails)
            if padded:
                run = b"".join(chain.from_iterable(zip(
                    repeat(first), literals, repeat(tail[:-1] + pad), afters[:k], repeat(b"\n"))))  # type: ignore[operator]
            else:
                sep = tail + b"\n\n" + first
                run = first + sep.join(literals) + tail + b"\n\n"
            if buf.startswith(run, pos):
                return texts, literals, pos + len(run)
        # some frame is not the learned one: the run ends before the first such
        k = _first_false(list(map(bytes.endswith, datas[:k], repeat(tail + b"\n"))), k)
        k = _valid_literals(datas[:k], len(head), cut)
    return None


def _valid_literals(datas: list[bytes], h: int, t: int) -> int:
    """How many of ``datas`` in a row hold, between ``h`` and ``-t``, a JSON
    string as orjson writes it."""
    for n, data in enumerate(datas):
        lit = data[h:-t]
        try:
            text = _loads(lit)
            if type(text) is not str or _dumps(text) != lit:
                return n
        except (ValueError, TypeError):
            return n
    return len(datas)


class RunReader:
    """Feeds a decoder's reads so that runs of its learned text frame
    (``StringSlot``) come out whole (``string_run``) and every other frame
    goes its usual way, frame for frame what the usual way alone would give.

    ``event`` is the learned frame's event name (``content_block_delta`` for
    Anthropic; None for OpenAI, whose frames have no event line).
    Runs are looked for only in LF-framed reads that begin at a frame
    boundary; while nothing is learned, the first frames of a stream go one
    at a time so that a stream read whole still has its run."""

    __slots__ = ("slot", "event", "pad", "learning", "least", "misses", "_learned_head", "_head", "_tail")

    def __init__(self, slot: StringSlot, event: str | None = None, pad: bytes | None = None) -> None:
        self.slot = slot
        self.event = None if event is None else b"event: " + event.encode()
        self.pad = pad  # a padding member the frames may end with (string_run)
        self.learning = _LEARNING_FRAMES
        # a read shorter than this goes the usual way without a look
        # (``decode``): _RUN_LEAST learned frames once learned, _LEARNING_READ
        # while learning, "never" when nothing was learned in time
        self.least = _LEARNING_READ
        self.misses = 0  # looks in a row that found no run
        self._learned_head = b""
        self._head = b""
        self._tail = b""

    def _sync(self) -> bool:
        """Whether a text frame is learned (its run's head and tail kept)."""
        slot = self.slot
        if not slot.learned:
            if self.learning <= 0 or slot.learns <= 0:
                self.least = 1 << 62
            return False
        if slot.head is not self._learned_head:
            self._learned_head = slot.head
            self._head = b"data: " + slot.head
            self._tail = slot.tail
            self.least = _RUN_LEAST * (len(self.event or b"") + 1 + len(self._head) + 2 + len(self._tail) + 2)
        return True

    def decode(self, decoder: Any, chunk: bytes) -> list[Any]:
        """``decoder.feed(chunk)`` for a decoder that has ``text_runs``,
        ``parser``, ``_feed(data, out)`` (its usual way with whole frames, or
        the rest of a read), ``_run_ready()`` (whether its state lets the
        learned frame skip the usual way: its block open, the stream not
        ended) and ``_run(texts, literals, out)`` (a run, no text empty).  A
        read shorter than ``least`` (a frame or so: the usual streaming pace)
        goes the usual way at once, so runs cost nothing where there are none."""
        out: list[Any] = []
        if not decoder.text_runs or len(chunk) < self.least:
            decoder._feed(chunk, out)
            return out
        self._sync()
        if len(chunk) < self.least or b"\r" in chunk:
            decoder._feed(chunk, out)
            return out
        usual, parser = decoder._feed, decoder.parser
        pos, n = 0, len(chunk)
        if not parser.idle():
            # the frame an earlier read began ends first, the usual way
            pos = 1 if chunk[:1] == b"\n" and parser._buf.endswith(b"\n") else _frame_end(chunk, 0)
            usual(chunk[:pos], out)
            if not parser.idle():
                if pos < n:
                    usual(chunk[pos:], out)
                return out
        while pos < n:
            if self._sync():
                if n - pos < self.least:
                    nxt = n
                elif decoder._run_ready():
                    found = string_run(chunk, pos, self.event, self._head, self._tail, self.pad)
                    if found is not None:
                        self.misses = 0
                        texts, literals, pos = found
                        if "" in texts:  # an empty delta says nothing: no event, as the usual way
                            literals = [lit for t, lit in zip(texts, literals) if t]
                            texts = [t for t in texts if t]
                        if texts:
                            decoder._run(texts, literals, out)
                        continue
                    self.misses += 1
                    if self.misses >= _RUN_MISSES:
                        # the learned frame starts frames that are not it
                        # (a field that changes in every frame): each look
                        # cost a scan for nothing, so this stream stops
                        # looking (until another frame is learned)
                        self.least = 1 << 62
                        nxt = n
                    else:
                        nxt = _frame_starting(chunk, self.event or self._head, pos + 1)
                else:
                    nxt = _frame_end(chunk, pos)  # this frame may change the state
            elif self.learning > 0 and self.slot.learns > 0:
                self.learning -= 1
                nxt = _frame_end(chunk, pos)
            else:
                nxt = n
            usual(chunk[pos:nxt] if pos or nxt < n else chunk, out)
            pos = nxt
        return out


def _frame_end(buf: bytes, pos: int) -> int:
    end = buf.find(b"\n\n", pos)
    return len(buf) if end < 0 else end + 2


def _frame_starting(buf: bytes, head: bytes, pos: int) -> int:
    """Offset of the next frame from ``pos`` on that begins with ``head``, or
    the end of ``buf``."""
    i = buf.find(head, pos)
    while i >= 0 and buf[i - 2 : i] != b"\n\n":
        i = buf.find(head, i + 1)
    return len(buf) if i < 0 else i


def load_data(raw: bytes) -> Any:
    """``orjson.loads`` of a frame's data as bytes (``SSEParser.feed_raw``).
    orjson refuses invalid UTF-8 in bytes, so such data is read as text with
    U+FFFD for the bad bytes, as ``SSEParser.feed`` gives it.  Raises
    ``orjson.JSONDecodeError`` for data that is not JSON."""
    try:
        return _loads(raw)
    except _JSONDecodeError:
        return _loads(raw.decode("utf-8", errors="replace"))


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
