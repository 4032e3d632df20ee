"""The fast paths of translated streaming give what the plain code gives.

SSEParser has an LF-only path (frames cut by one regex, the data kept as bytes
for orjson); the OpenAI-Chat and Anthropic-Messages stream decoders skip the
JSON parse of a text chunk that repeats a learned one (StringSlot) and have a
short path for the usual text chunk; their encoders build text deltas from
prebuilt bytes.  Each is compared here with a reference: the SSE parser as it
was before those paths (copied below), and the decoders / encoders with every
shortcut turned off (subclasses that go through the general code only, with
the old frame handling copied below).  Inputs: generated upstream streams (text,
reasoning, tool calls, usage, errors, refusals, garbage, invalid UTF-8, other
JSON spellings, LF / CRLF / CR framing, comments, multi-line data, a varying
field per chunk) cut into reads at random places, and at every byte for a
small stream; and generated IR event sequences for the encoders.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, NamedTuple
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cheapproxy import ir, sse
from cheapproxy.protocol import EncodeContext, Inbound
from cheapproxy.relay import UsageTracker
from cheapproxy.sse import SSEFrame, SSEParser, StringSlot
from cheapproxy_anthropic import stream as anthropic_stream
from cheapproxy_anthropic.codec import AnthropicMessagesProtocol
from cheapproxy_anthropic.stream import MessagesStreamDecoder, MessagesStreamEncoder
from cheapproxy_openai import stream as openai_stream
from cheapproxy_openai.codec import OpenAIChatProtocol
from cheapproxy_openai.stream import ChatStreamDecoder, ChatStreamEncoder

SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- the SSE parser as it was


class _OldFrame(NamedTuple):
    event: str | None
    data: str


class ReferenceSSEParser:
    """cheapproxy.sse.SSEParser before the LF fast path and feed_raw (verbatim)."""

    def __init__(self, max_frame_bytes: int = 8 * 2**20) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []
        self.max_frame_bytes = max_frame_bytes
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[_OldFrame]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        buf = self._buf + chunk if self._buf else chunk
        frames: list[_OldFrame] = []
        if b"\r" not in buf:
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
            i_n = buf.find(b"\n", start)
            i_r = buf.find(b"\r", start)
            if i_n < 0 and i_r < 0:
                break
            if i_r >= 0 and (i_n < 0 or i_r < i_n):
                end = i_r
                if i_r + 1 < n:
                    nxt = i_r + 2 if buf[i_r + 1 : i_r + 2] == b"\n" else i_r + 1
                else:
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

    def _line(self, line: bytes, frames: list[_OldFrame]) -> None:
        if not line:
            if self._data or self._event is not None:
                frames.append(_OldFrame(self._event, "\n".join(self._data)))
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

    def close(self) -> list[_OldFrame]:
        frames: list[_OldFrame] = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r"), frames)
            self._buf = b""
        if self._data:
            frames.append(_OldFrame(self._event, "\n".join(self._data)))
            self._event, self._data = None, []
        return frames


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - compared, not hidden
        return ("raised", type(exc).__name__, str(exc))


def parse_both(chunks: list[bytes], max_frame_bytes: int = 8 * 2**20) -> tuple[list[Any], list[Any]]:
    """Per read (and close): the new parser's frames, its raw frames decoded,
    and the old parser's frames; exceptions count as results."""
    new, raw, old = SSEParser(max_frame_bytes), SSEParser(max_frame_bytes), ReferenceSSEParser(max_frame_bytes)
    got, want = [], []
    for c in [*chunks, None]:
        a = _outcome(new.close) if c is None else _outcome(new.feed, c)
        b = _outcome(raw.close_raw) if c is None else _outcome(raw.feed_raw, c)
        o = _outcome(old.close) if c is None else _outcome(old.feed, c)
        if isinstance(b, list):
            b = [SSEFrame(e, d.decode("utf-8", errors="replace")) for e, d in b]
        if isinstance(o, list):
            o = [SSEFrame(*f) for f in o]
        got += [a, b]
        want += [o, o]
        if isinstance(o, tuple):
            break  # the parser raised: the stream is over
    return got, want


def split_at(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(body)})
    out, prev = [], 0
    for p in points:
        out.append(body[prev:p])
        prev = p
    out.append(body[prev:])
    return out


SSE_PIECES = [b"data:", b"data: ", b"data", b"event:", b"event: ", b"event: ping", b"id: 7", b"retry: 1",
              b": comment", b"\n", b"\n", b"\n\n", b"\r", b"\r\n", b"x", b" ", b"{\"a\":1}", b"[DONE]",
              b"\xff", b"\xe2\x82", b"\xac", b"\xed\xa0\x80", "é☃".encode(), b"data: {\"k\":\"v\"}\n\n",
              b"event: e\ndata: d\n\n", b"\t", b"data:  two spaces"]


@SETTINGS
@given(pieces=st.lists(st.sampled_from(SSE_PIECES), max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
       limit=st.sampled_from([8 * 2**20, 4, 9, 20]))
def test_sse_parser_matches_the_old_one(pieces: list[bytes], cuts: list[int], limit: int) -> None:
    body = b"".join(pieces)
    got, want = parse_both(split_at(body, cuts), limit)
    assert got == want


@SETTINGS
@given(pieces=st.lists(st.sampled_from(SSE_PIECES), max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_sse_parser_long_unfinished_frame_path(pieces: list[bytes], cuts: list[int]) -> None:
    # a frame longer than _RAW_LIMIT has its lines parsed early: same frames
    with mock.patch.object(sse, "_RAW_LIMIT", 3):
        got, want = parse_both(split_at(b"".join(pieces), cuts))
    assert got == want


@SETTINGS
@given(body=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_sse_parser_arbitrary_bytes(body: bytes, cuts: list[int]) -> None:
    got, want = parse_both(split_at(body, cuts))
    assert got == want


@pytest.mark.parametrize("body", [
    b"event: e\n", b"event: e\ndata: d\n", b"data: a\n", b"data: a", b"event: e", b"\n\n\nevent: e\n\n",
    b"event: e\nevent: f\ndata: d\n\n", b"data: a\nevent: e\n\n", b"event:\ndata:\n\n", b"event:  x\ndata:  y\n\n",
    b"data\n\n", b"event\ndata\n\n", b"data: a\n\ndata: b\n", b": c\ndata: a\n\n", b"id: 1\ndata: x\n\n",
    b"data: \xff\ndata: \xe2\x82\n\n", b"event: \xff\ndata: x\n\n", b"data:x\r\n\r\ndata: y\n\n",
])
def test_sse_parser_edge_cases(body: bytes) -> None:
    for i in range(len(body) + 1):
        got, want = parse_both([body[:i], body[i:]])
        assert got == want, i


def test_sse_parser_every_split_of_a_small_stream() -> None:
    body = (b"event: message_start\ndata: {\"a\":1}\n\n: keep-alive\n\ndata:{\"b\":\"\xc3\xa9\xff\"}\n\n"
            b"event: multi\ndata: l1\ndata: l2\n\n\n\ndata: [DONE]\n\nevent: tail\ndata: end")
    for variant in (body, body.replace(b"\n", b"\r\n"), body.replace(b"\n", b"\r")):
        for i in range(len(variant) + 1):
            got, want = parse_both([variant[:i], variant[i:]])
            assert got == want, (variant, i)
        for i in range(0, len(variant) + 1, 3):
            for j in range(i, len(variant) + 1, 5):
                got, want = parse_both([variant[:i], variant[i:j], variant[j:]])
                assert got == want, (variant, i, j)


# ---------------------------------------------------------------- StringSlot


def test_string_slot_learns_and_matches() -> None:
    slot = StringSlot()
    a = b'{"id":"x","choices":[{"delta":{"content":"Hi"}}],"usage":null}'
    assert slot.match(a) is None  # nothing learned yet
    assert slot.learn(a, ("choices", 0, "delta", "content"))
    assert slot.match(a) == "Hi"
    assert slot.match(b'{"id":"x","choices":[{"delta":{"content":"\\u00e9\\" \\\\ \\n"}}],"usage":null}') == 'é" \\ \n'
    assert slot.match(b'{"id":"x","choices":[{"delta":{"content": "sp" }}],"usage":null}') == "sp"
    for other in (
        b'{"id":"y","choices":[{"delta":{"content":"Hi"}}],"usage":null}',  # another head
        b'{"id":"x","choices":[{"delta":{"content":"Hi"}}],"usage":{}}',  # another tail
        b'{"id":"x","choices":[{"delta":{"content":"Hi"}}],"usage":true}',  # another tail, same length
        b'{"id":"z","choices":[{"delta":{"content":"Hi"}}],"usage":null}',  # another head, same length
        b'{"id":"x","choices":[{"delta":{"content":5}}],"usage":null}',  # not a string
        b'{"id":"x","choices":[{"delta":{"content":"a","x":"b"}}],"usage":null}',  # more than one token
        b'{"id":"x","choices":[{"delta":{"content":"\xff"}}],"usage":null}',  # invalid UTF-8
        b'{"id":"x","choices":[{"delta":{"content":"\x01"}}],"usage":null}',  # a raw control character
        b'{"id":"x","choices":[{"delta":{"content":}}],"usage":null}',
        b'{"id":"x","choices":[{"delta":{"content":"}}],"usage":null}',
    ):
        assert slot.match(other) is None, other


@pytest.mark.parametrize("doc", [
    b'{"choices":[{"delta":{"content":"Hi","content":"Hi"}}]}',  # the first "Hi" is not the value kept
    b'{"choices":[{"delta":{"content":"\\u0048i"}}]}',  # written with another escape: not found
    b'{"x\\"content":"Hi","choices":[{"delta":{"content":"Ho"}}]}',
])
def test_string_slot_learns_only_the_value_itself(doc: bytes) -> None:
    slot = StringSlot()
    if slot.learn(doc, ("choices", 0, "delta", "content")):
        # whatever was learned, a match must agree with a full parse
        probe = slot.head + b'"zz"' + slot.tail
        assert orjson.loads(probe)["choices"][0]["delta"]["content"] == slot.match(probe) == "zz"
    else:
        assert slot.match(doc) is None


def test_string_slot_gives_up_after_its_attempts() -> None:
    slot = StringSlot(learns=2)
    assert not slot.learn(b'{"a":1}', ("a",))
    assert not slot.learn(b"not json", ("a",))
    assert not slot.learn(b'{"a":"x"}', ("a",))  # no attempts left
    assert slot.match(b'{"a":"x"}') is None


# ---------------------------------------------------------------- decoders with no shortcut


class ReferenceChatDecoder(ChatStreamDecoder):
    """The OpenAI-Chat decoder as it was: the old parser, str frames, no slot,
    no short path (the frame handling below is the old code)."""

    def __init__(self) -> None:
        super().__init__()
        self.ref = ReferenceSSEParser()

    def _text_chunk(self, data: dict[str, Any], out: list[ir.StreamEvent], raw: bytes) -> bool:
        return False

    def _old_frame(self, data: str, out: list[ir.StreamEvent]) -> None:
        if self.done or self.failed:
            return
        if data[:1] != "{" and data.strip() == "[DONE]":
            self.done = True
            self._finish(out)
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.failed = True
            out.append(ir.StreamError(message="the upstream sent a malformed stream chunk"))
            return
        if not isinstance(obj, dict):
            return
        err = obj.get("error")
        if err:
            self.failed = True
            out.append(openai_stream._stream_error(err))
            return
        self._chunk(obj, out)

    def feed(self, chunk: bytes) -> list[ir.StreamEvent]:
        out: list[ir.StreamEvent] = []
        for frame in self.ref.feed(chunk):
            self._old_frame(frame.data, out)
        return out

    def close(self) -> list[ir.StreamEvent]:
        out: list[ir.StreamEvent] = []
        for frame in self.ref.close():
            self._old_frame(frame.data, out)
        if not self.done and not self.failed:
            self.failed = True
            out.append(ir.StreamError(message="the upstream stream ended before [DONE]: the answer was cut"))
        return out


class ReferenceMessagesDecoder(MessagesStreamDecoder):
    """The Anthropic-Messages decoder as it was (the frame handling below is
    the old code; _object is the old type dispatch, unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.ref = ReferenceSSEParser()

    def _old_frame(self, frame: _OldFrame, events: list[ir.StreamEvent]) -> None:
        if self.done or not frame.data or frame.event == "ping":
            return
        try:
            obj = orjson.loads(frame.data)
        except orjson.JSONDecodeError:
            self.done = True
            events.append(ir.StreamError(message=f"{anthropic_stream.NAME} upstream sent invalid JSON in its stream"))
            return
        if not isinstance(obj, dict):
            return
        self._object(obj.get("type") or frame.event, obj, events)

    def feed(self, chunk: bytes) -> list[ir.StreamEvent]:
        events: list[ir.StreamEvent] = []
        for frame in self.ref.feed(chunk):
            self._old_frame(frame, events)
        return events

    def close(self) -> list[ir.StreamEvent]:
        events: list[ir.StreamEvent] = []
        for frame in self.ref.close():
            self._old_frame(frame, events)
        if not self.done:
            self.done = True
            events.append(ir.StreamError(message=f"{anthropic_stream.NAME} upstream stream ended before message_stop",
                                         kind="upstream_failed", status=502))
        return events


def _delta_old(index: int, delta: bytes) -> bytes:
    return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":' + str(index).encode()
            + b',"delta":' + delta + b"}\n\n")


class ReferenceMessagesEncoder(MessagesStreamEncoder):
    """The Anthropic encoder with no short path and the old delta builders."""

    def encode(self, event: ir.StreamEvent) -> bytes:
        return self._encode(event)

    @staticmethod
    def _text(blk: Any, text: str) -> bytes:
        return _delta_old(blk.index, b'{"type":"text_delta","text":' + orjson.dumps(text) + b"}")

    @staticmethod
    def _reasoning(blk: Any, text: str, sig: str | None, proto: str | None) -> bytes:
        if sig:
            blk.sig.append(sig)
            blk.sig_protocol = proto or blk.sig_protocol
        if not text:
            return b""
        return _delta_old(blk.index, b'{"type":"thinking_delta","thinking":' + orjson.dumps(text) + b"}")

    @staticmethod
    def _args(blk: Any, frag: str) -> bytes:
        if not frag:
            return b""
        if blk.kind == "custom":
            frag = orjson.dumps(frag).decode()[1:-1]
        return _delta_old(blk.index, b'{"type":"input_json_delta","partial_json":' + orjson.dumps(frag) + b"}")


class ReferenceChatEncoder(ChatStreamEncoder):
    """The OpenAI-Chat encoder with no short path."""

    def encode(self, event: ir.StreamEvent) -> bytes:
        return self._encode(event)


# deterministic ids: the new and the reference code draw the same ones
class _Ids:
    def __init__(self) -> None:
        self.count = itertools.count()

    def call(self) -> str:
        return f"call_{next(self.count):024x}"

    def message(self) -> str:
        return f"msg_{next(self.count):024x}"


def _decode(decoder: Any, chunks: list[bytes]) -> list[Any]:
    """Per read, then close: the events (or the exception)."""
    ids = _Ids()
    with mock.patch.object(openai_stream, "new_call_id", ids.call):
        return [_outcome(decoder.feed, c) for c in chunks] + [_outcome(decoder.close)]


def _ctx(proto: Any, body: dict[str, Any]) -> EncodeContext:
    inbound = Inbound(model=body["model"], stream=True, operation="chat", body=body)
    return EncodeContext(model=inbound.model, request_id="req-eq", created=1_700_000_000,
                         request=proto.decode_request(inbound), inbound=inbound)


OAI, ANTH = OpenAIChatProtocol(), AnthropicMessagesProtocol()
CTXS = {
    "anthropic": _ctx(ANTH, {"model": "m", "max_tokens": 9, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]}),
    "openai-usage": _ctx(OAI, {"model": "m", "stream": True, "stream_options": {"include_usage": True},
                               "messages": [{"role": "user", "content": "hi"}]}),
    "openai": _ctx(OAI, {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    "openai-legacy": _ctx(OAI, {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                                "functions": [{"name": "f", "parameters": {"type": "object"}}]}),
}


def _encode(encoder: Any, events: list[Any]) -> list[Any]:
    ids = _Ids()
    with mock.patch.object(anthropic_stream, "new_message_id", ids.message):
        out = [_outcome(encoder.start)]
        for ev in events:
            out.append(_outcome(encoder.encode, ev))
        out.append(_outcome(encoder.close))
        out.append(_outcome(encoder.error, openai_stream.ProxyError("upstream_failed", "x")))
    return out


def _encoders(name: str) -> tuple[Any, Any]:
    ctx = CTXS[name]
    if name == "anthropic":
        return MessagesStreamEncoder(ctx), ReferenceMessagesEncoder(ctx)
    return ChatStreamEncoder(ctx), ReferenceChatEncoder(ctx)


def _expand(batch: Any) -> Any:
    """A read's events with each TextRun as the TextDeltas it stands for."""
    if not isinstance(batch, list):
        return batch
    out: list[Any] = []
    for ev in batch:
        if isinstance(ev, ir.TextRun):
            assert ev.texts and all(ev.texts) and ev.literals == [orjson.dumps(t) for t in ev.texts]
            out += [ir.TextDelta(ev.index, t) for t in ev.texts]
        else:
            out.append(ev)
    return out


def _encode_runs(encoder: Any, batches: list[Any]) -> tuple[bytes, list[Any]]:
    """What the relay sends for these reads' events (TextRuns through
    encode_text_run): all the bytes, and the failures."""
    ids = _Ids()
    outcomes = []
    with mock.patch.object(anthropic_stream, "new_message_id", ids.message):
        outcomes.append(_outcome(encoder.start))
        for ev in (ev for batch in batches if isinstance(batch, list) for ev in batch):
            outcomes.append(_outcome(encoder.encode_text_run if ev.type == "text_run" else encoder.encode, ev))
        outcomes.append(_outcome(encoder.close))
    return b"".join(o for o in outcomes if isinstance(o, bytes)), [o for o in outcomes if not isinstance(o, bytes)]


def check_stream(new_decoder: Any, ref_decoder: Any, chunks: list[bytes]) -> list[Any]:
    """Decoders agree read by read, also when they give TextRuns (each run
    standing for its TextDeltas); then every client encoder agrees on the
    events, and sends the same bytes for the runs."""
    got = _decode(new_decoder, chunks)
    want = _decode(ref_decoder, chunks)
    assert got == want
    # runs as the relay takes them, and looked for in any read (the
    # thresholds that keep them to big reads lowered)
    runs_decoder = type(new_decoder)()
    runs_decoder.text_runs = True
    assert [_expand(b) for b in _decode(runs_decoder, chunks)] == want
    with mock.patch.object(sse, "_RUN_LEAST", 1), mock.patch.object(sse, "_LEARNING_READ", 0):
        runs_decoder = type(new_decoder)()
        runs_decoder.text_runs = True
        with_runs = _decode(runs_decoder, chunks)
    assert [_expand(b) for b in with_runs] == want
    events = [ev for batch in want if isinstance(batch, list) for ev in batch]
    # what the relay counts for the estimate of an answer cut short
    counts = []
    for batches in (want, with_runs):
        tracker = UsageTracker()
        for ev in (ev for batch in batches if isinstance(batch, list) for ev in batch):
            tracker.see(ev)
        counts.append((tracker.chars, tracker.usage, tracker.stop, tracker.error))
    assert counts[0] == counts[1]
    # and folded into one answer (ir.collect), a run is its deltas
    run_events = [ev for batch in with_runs if isinstance(batch, list) for ev in batch]
    assert _outcome(ir.collect, run_events) == _outcome(ir.collect, events)
    for name in CTXS:
        new_enc, ref_enc = _encoders(name)
        assert _encode(new_enc, events) == _encode(ref_enc, events), name
        run_enc, plain_enc = _encoders(name)
        assert _encode_runs(run_enc, with_runs) == _encode_runs(plain_enc, [events]), name
    return events


# ---------------------------------------------------------------- generated upstream streams

TEXT = st.one_of(
    st.sampled_from(["", "Hi", " there", "é", "☃", "😀", '"', "\\", "\n", "\x01", "a\"b\\c", "</script>", " "]),
    st.text(max_size=12),
)


def _json(obj: Any, style: int) -> bytes:
    """The same JSON in a few spellings upstreams use."""
    if style == 0:
        return orjson.dumps(obj)
    if style == 1:
        return json.dumps(obj, separators=(",", ":")).encode()  # \\uXXXX for non-ASCII
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")).encode()


@st.composite
def chat_stream(draw: Any) -> bytes:
    style = draw(st.integers(0, 2))
    head: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt"}
    if draw(st.booleans()):
        head["system_fingerprint"] = "fp_1"
    usage_null = draw(st.booleans())
    obfuscate = draw(st.booleans())
    frames: list[bytes] = []

    def chunk(choices: list[Any], **extra: Any) -> None:
        obj = dict(head, choices=choices, **extra)
        if usage_null and "usage" not in extra:
            obj["usage"] = None
        if obfuscate:
            # OpenAI's letters and digits (cut before the shortcut), or
            # anything else (parsed as it came)
            obj["obfuscation"] = draw(st.text(alphabet="abcXYZ09" if draw(st.booleans()) else 'aZ0-_ "\\é,{}:',
                                              max_size=6))
        frames.append(_json(obj, style))

    def delta(d: dict[str, Any], finish: Any = None, index: int = 0) -> None:
        chunk([{"index": index, "delta": d, "logprobs": None, "finish_reason": finish}])

    if draw(st.booleans()):
        chunk([])  # an Azure prompt-filter chunk
    if draw(st.booleans()):
        delta({"role": "assistant", "content": "", "refusal": None})
    kinds = st.sampled_from(["text", "text", "text", "role_text", "reasoning", "refusal", "tool", "tool_args",
                             "other_choice", "finish", "usage", "error", "garbage", "not_object", "done",
                             "id_change", "bad_utf8", "mixed", "text_usage", "text_finish", "two_choices"])
    call = 0
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(kinds)
        if kind == "text":
            delta({"content": draw(TEXT)})
        elif kind == "role_text":
            delta({"role": "assistant", "content": draw(TEXT)})
        elif kind == "reasoning":
            delta({"reasoning_content": draw(TEXT)})
        elif kind == "refusal":
            delta({"refusal": draw(TEXT)})
        elif kind == "tool":
            delta({"tool_calls": [{"index": call, "id": f"call_{call}", "type": "function",
                                   "function": {"name": "f", "arguments": draw(st.sampled_from(["", "{", "{}"]))}}]})
            call += 1
        elif kind == "tool_args":
            delta({"tool_calls": [{"index": max(call - 1, 0), "function": {"arguments": draw(st.sampled_from(
                ['"a"', "}", "{", ":1", ""]))}}]})
        elif kind == "other_choice":
            delta({"content": draw(TEXT)}, index=1)
        elif kind == "finish":
            delta({}, finish=draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"])))
        elif kind == "usage":
            chunk([], usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})
        elif kind == "error":
            frames.append(_json({"error": {"message": "boom", "type": draw(st.sampled_from(
                ["rate_limit_error", "server_error", "overloaded"]))}}, style))
        elif kind == "garbage":
            frames.append(draw(st.sampled_from([b"{", b"{\"a\":}", b"null", b"", b" [DONE] ", b"[DONE]\x1f",
                                                "\u2003[DONE]".encode(), b"\x0b[DONE]", b"[DONE]\xff"])))
        elif kind == "not_object":
            frames.append(b"[1,2]")
        elif kind == "done":
            frames.append(b"[DONE]")
        elif kind == "id_change":
            head["id"] = "chatcmpl-2"
        elif kind == "bad_utf8":
            # invalid UTF-8 inside a text: read as U+FFFD, as before
            frames.append(_json(dict(head, choices=[{"index": 0, "delta": {"content": "a☃b"}}]), 0).replace(
                "☃".encode(), draw(st.sampled_from([b"\xff", b"\xe2\x98", b"\xed\xa0\x80"]))))
        elif kind == "mixed":
            delta({"content": draw(TEXT), "reasoning_content": draw(TEXT)})
        elif kind == "text_usage":
            chunk([{"index": 0, "delta": {"content": draw(TEXT)}, "logprobs": None, "finish_reason": None}],
                  usage={"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3})
        elif kind == "text_finish":
            delta({"content": draw(TEXT)}, finish=draw(st.sampled_from(["stop", "length", ""])))
        elif kind == "two_choices":
            chunk([{"index": 0, "delta": {"content": draw(TEXT)}}, {"index": 1, "delta": {"content": "b"}}])
    if draw(st.booleans()):
        delta({}, finish="stop")
        chunk([], usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})
    if draw(st.booleans()):
        frames.append(b"[DONE]")
    return _frame_all(draw, [(None, f) for f in frames])


@st.composite
def messages_stream(draw: Any) -> bytes:
    style = draw(st.integers(0, 2))
    frames: list[tuple[str | None, bytes]] = []

    def ev(obj: dict[str, Any], name: str | None = None) -> None:
        frames.append((name if name is not None else obj.get("type"), _json(obj, style)))

    ev({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "c",
                                             "content": [], "usage": {"input_tokens": 3, "output_tokens": 1}}})
    kinds = st.sampled_from(["text_block", "text", "text", "text", "thinking_block", "thinking", "signature",
                             "tool_block", "json", "server_block", "stop", "ping", "citations", "wrong_index",
                             "message_delta", "error", "garbage", "untyped", "renamed", "bad_utf8"])
    index = 0
    for _ in range(draw(st.integers(0, 16))):
        kind = draw(kinds)
        if kind == "text_block":
            index += 1
            ev({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": draw(TEXT)}})
        elif kind == "text":
            ev({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": draw(TEXT)}})
        elif kind == "thinking_block":
            index += 1
            ev({"type": "content_block_start", "index": index,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
        elif kind == "thinking":
            ev({"type": "content_block_delta", "index": index,
                "delta": {"type": "thinking_delta", "thinking": draw(TEXT)}})
        elif kind == "signature":
            ev({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": "c2ln"}})
        elif kind == "tool_block":
            index += 1
            ev({"type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}})
        elif kind == "json":
            ev({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": draw(st.sampled_from(['{"a"', ":1}", ""]))}})
        elif kind == "server_block":
            index += 1
            ev({"type": "content_block_start", "index": index,
                "content_block": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search"}})
        elif kind == "stop":
            ev({"type": "content_block_stop", "index": index})
        elif kind == "ping":
            ev({"type": "ping"})
        elif kind == "citations":
            ev({"type": "content_block_delta", "index": index, "delta": {"type": "citations_delta", "citation": {}}})
        elif kind == "wrong_index":
            ev({"type": "content_block_delta", "index": 99, "delta": {"type": "text_delta", "text": draw(TEXT)}})
        elif kind == "message_delta":
            ev({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 7}})
        elif kind == "error":
            ev({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        elif kind == "garbage":
            frames.append(("content_block_delta", draw(st.sampled_from([b"{", b"[1]", b"", b"null"]))))
        elif kind == "untyped":  # the type only in the event name
            frames.append((draw(st.sampled_from(["content_block_delta", "content_block_delta", "other"])),
                           _json({"index": index, "delta": {"type": "text_delta", "text": draw(TEXT)}}, style)))
        elif kind == "renamed":  # a ping event name on a text delta: skipped, as before
            ev({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": "x"}},
               name=draw(st.sampled_from(["ping", "other", ""])))
        elif kind == "bad_utf8":
            frames.append(("content_block_delta", _json({"type": "content_block_delta", "index": index, "delta": {
                "type": "text_delta", "text": "a☃b"}}, 0).replace("☃".encode(), draw(st.sampled_from(
                    [b"\xff", b"\xe2\x98"])))))
    if draw(st.booleans()):
        ev({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 9}})
        ev({"type": "message_stop"})
    return _frame_all(draw, frames)


def _frame_all(draw: Any, frames: list[tuple[str | None, bytes]]) -> bytes:
    """SSE framing, in the ways upstreams (and broken ones) write it."""
    space = draw(st.sampled_from([b" ", b""]))
    parts = []
    for name, data in frames:
        extra = draw(st.sampled_from([b"", b"", b"", b": keep-alive\n", b"\n", b"id: 3\n"]))
        if draw(st.integers(0, 9)) == 0 and b',"' in data:
            data = data.replace(b',"', b',\ndata:' + space + b'"', 1)  # two data lines (joined by \n)
        event = b"event:" + space + name.encode() + b"\n" if name is not None else b""
        parts.append(extra + event + b"data:" + space + data + b"\n\n")
    body = b"".join(parts)
    ending = draw(st.sampled_from(["lf", "lf", "lf", "crlf", "cr"]))
    if ending == "crlf":
        body = body.replace(b"\n", b"\r\n")
    elif ending == "cr":
        body = body.replace(b"\n", b"\r")
    if draw(st.integers(0, 5)) == 0:
        body = body[: draw(st.integers(0, len(body)))]  # cut short
    return body


@SETTINGS
@given(body=chat_stream(), cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6))
def test_chat_decoder_and_encoders_match_reference(body: bytes, cuts: list[int]) -> None:
    check_stream(ChatStreamDecoder(), ReferenceChatDecoder(), split_at(body, cuts))


@SETTINGS
@given(body=messages_stream(), cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6))
def test_messages_decoder_and_encoders_match_reference(body: bytes, cuts: list[int]) -> None:
    check_stream(MessagesStreamDecoder(), ReferenceMessagesDecoder(), split_at(body, cuts))


# ---------------------------------------------------------------- the benchmark's streams


def _bench_chat(n: int = 12) -> bytes:
    head = ('{"id":"chatcmpl-B1","object":"chat.completion.chunk","created":1735689600,"model":"gpt-4o-mini",'
            '"service_tier":"default","system_fingerprint":"fp_b","choices":')
    out = [head + '[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,'
           '"finish_reason":null}],"usage":null}']
    for i in range(n):
        out.append(head + '[{"index":0,"delta":{"content":' + orjson.dumps(f" w{i}é\"").decode() + '},"logprobs":null,'
                   '"finish_reason":null}],"usage":null}')
    out.append(head + '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}')
    out.append(head + '[],"usage":{"prompt_tokens":24,"completion_tokens":50,"total_tokens":74}}')
    out.append("[DONE]")
    return "".join(f"data: {x}\n\n" for x in out).encode()


def _bench_messages(n: int = 12) -> bytes:
    frames = [("message_start", {"type": "message_start", "message": {
        "id": "msg_01B", "type": "message", "role": "assistant", "model": "claude", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 24, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"})]
    frames += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": f" w{i}é\""}}) for i in range(n)]
    frames += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": 50}}),
               ("message_stop", {"type": "message_stop"})]
    return b"".join(b"event: " + e.encode() + b"\ndata: " + orjson.dumps(d) + b"\n\n" for e, d in frames)


def _obfuscated(body: bytes, value: Any = lambda i: b"aZ3k9Q"[: i % 6 + 1] + str(i).encode()) -> bytes:
    """``body`` with OpenAI's default padding on every JSON chunk: a last
    ``"obfuscation"`` member, new in each (random letters and digits)."""
    frames = []
    for i, frame in enumerate(body.split(b"\n\n")):
        if frame.startswith(b"data: {"):
            frame = frame[:-1] + b',"obfuscation":"' + value(i) + b'"}'
        frames.append(frame)
    return b"\n\n".join(frames)


def test_obfuscated_chat_streams_take_the_shortcut_and_come_as_runs() -> None:
    """OpenAI pads each chunk with a new ``"obfuscation"`` string unless the
    request says ``include_obfuscation: false``: the decoder learns its text
    chunk without it (else no chunk would ever match the learned one), and a
    stream read whole still comes as one run."""
    body = _obfuscated(_bench_chat(50))
    assert body.count(b'"obfuscation"') == 53
    decoder = ChatStreamDecoder()
    check_stream(decoder, ReferenceChatDecoder(), [body])
    assert decoder.slot.learned and b"obfuscation" not in decoder.slot.tail
    text = body.split(b"\n\n")[5][len(b"data: "):]
    assert b'"obfuscation":"' in text and decoder.slot.match(text) is None
    assert decoder.slot.match(openai_stream.without_obfuscation(text)) == " w4é\""
    runs = ChatStreamDecoder()
    runs.text_runs = True
    got = runs.feed(body)
    assert [len(e.texts) for e in got if isinstance(e, ir.TextRun)] == [49] and runs.runs.misses == 0
    # a run ends before a chunk padded otherwise (not letters and digits), which goes the usual way
    odd = body.replace(b'"obfuscation":"aZ320"', b'"obfuscation":"a-z"')  # frame 20, text w19
    assert odd != body
    runs = ChatStreamDecoder()
    runs.text_runs = True
    got = runs.feed(odd)
    # (the odd chunk is learned as the text chunk, so the next one goes the
    # usual way too and is learned back)
    assert [len(e.texts) for e in got if isinstance(e, ir.TextRun)] == [18, 29]
    for cut in range(0, len(body), 997):
        check_stream(ChatStreamDecoder(), ReferenceChatDecoder(), [body[:cut], body[cut:]])
        check_stream(ChatStreamDecoder(), ReferenceChatDecoder(), [odd[:cut], odd[cut:]])


def test_a_stream_whose_text_chunks_never_repeat_stops_looking_for_runs() -> None:
    """Chunks that begin like the learned one but differ in another field
    every time (here a padding that is not letters and digits, so it stays):
    no run is ever found, and after a few looks the stream stops looking
    (each look used to scan the whole read: a 16 KB read took 16 times as
    long as without runs)."""
    body = _obfuscated(_bench_chat(50), lambda i: b"p-" + str(i).encode())
    runs = ChatStreamDecoder()
    runs.text_runs = True
    got = runs.feed(body)
    assert not any(isinstance(e, ir.TextRun) for e in got) and sum(isinstance(e, ir.TextDelta) for e in got) == 50
    assert runs.runs.misses == sse._RUN_MISSES and runs.runs.least == 1 << 62  # no more looks in this stream
    check_stream(ChatStreamDecoder(), ReferenceChatDecoder(), [body])


@pytest.mark.parametrize("make,new,ref", [
    (_bench_chat, ChatStreamDecoder, ReferenceChatDecoder),
    (_bench_messages, MessagesStreamDecoder, ReferenceMessagesDecoder),
])
def test_bench_streams_take_the_shortcut_and_match(make: Any, new: Any, ref: Any) -> None:
    body = make()
    decoder = new()
    events = check_stream(decoder, ref(), [body])
    assert decoder.slot.size < len(body)  # the text chunks were recognised (the shortcut ran)
    assert sum(isinstance(e, ir.TextDelta) for e in events) == 12
    # empty deltas inside a run say nothing, as one by one
    empty = body.replace(orjson.dumps(" w5é\""), b'""').replace(orjson.dumps(" w9é\""), b'""')
    assert empty != body
    check_stream(new(), ref(), [empty])
    # a stream read whole, with runs asked for: the first text delta teaches
    # the frame, the other 49 come as one TextRun (12 go one by one: too few)
    for n, run in ((50, [49]), (12, [])):
        runs = new()
        runs.text_runs = True
        got = runs.feed(make(n))
        assert [len(e.texts) for e in got if isinstance(e, ir.TextRun)] == run
        assert sum(isinstance(e, ir.TextDelta) for e in got) == n - sum(run)
    small = make(3)
    for i in range(len(small) + 1):  # cut at every byte
        check_stream(new(), ref(), [small[:i], small[i:]])
    for step in (1, 7, 4096):
        check_stream(new(), ref(), [small[i : i + step] for i in range(0, len(small), step)])
    # frames after the end ([DONE], message_stop, an error) change nothing, shortcut or not
    frames = body.split(b"\n\n")
    text_frame = frames[3] + b"\n\n"
    error = b'data: {"error":{"message":"boom"}}\n\n' if new is ChatStreamDecoder else (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"x"}}\n\n')
    check_stream(new(), ref(), [body + text_frame * 2])
    half = b"\n\n".join(frames[:8]) + b"\n\n"
    check_stream(new(), ref(), [half, error, text_frame * 2])


def test_messages_frames_typed_by_their_event_name() -> None:
    # a frame with no "type" takes its event name; a "ping" event name skips any frame
    def frame(event: str | None, text: str, typed: bool) -> bytes:
        obj: dict[str, Any] = {"index": 0, "delta": {"type": "text_delta", "text": text}}
        if typed:
            obj = {"type": "content_block_delta", **obj}
        return (b"event: " + event.encode() + b"\n" if event is not None else b"") + b"data: " + orjson.dumps(obj) + b"\n\n"

    body = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"c"}}\n\n'
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
            b'"content_block":{"type":"text","text":""}}\n\n')
    for event, typed in [("content_block_delta", False), ("other", False), (None, False), ("ping", True),
                         ("other", True), ("content_block_delta", True), ("content_block_delta", False),
                         ("ping", False), ("message_delta", False), ("ping", True), ("other", True)]:
        body += frame(event, f"{event}-{typed}", typed)
    check_stream(MessagesStreamDecoder(), ReferenceMessagesDecoder(), [body])
    for i in range(0, len(body), 11):
        check_stream(MessagesStreamDecoder(), ReferenceMessagesDecoder(), [body[:i], body[i:]])


# ---------------------------------------------------------------- encoders on any event sequence


@st.composite
def ir_events(draw: Any) -> list[Any]:
    parts = st.one_of(
        st.builds(lambda t: ir.TextPart(text=t), TEXT),
        st.builds(lambda t, s: ir.ReasoningPart(text=t, signature=s, signature_protocol=draw(st.sampled_from(
            [None, "anthropic-messages", "gemini"]))), TEXT, st.sampled_from([None, "c2ln"])),
        st.just(ir.ReasoningPart(redacted="cmVk", signature_protocol="anthropic-messages")),
        st.builds(lambda a, k: ir.ToolCallPart(id="toolu_1", name="f", arguments=a, kind=k),
                  st.sampled_from(["", "{}", '{"a":'"1}"]), st.sampled_from(["function", "custom"])),
        st.just(ir.ImagePart(url="http://x/y.png")),
    )
    usage = st.builds(lambda i, o: ir.Usage(input_tokens=i, output_tokens=o), st.integers(0, 9), st.integers(0, 9))
    index = st.integers(0, 3)
    event = st.one_of(
        st.builds(lambda i, t: ir.TextDelta(index=i, text=t), index, TEXT),
        st.builds(lambda i, t: ir.TextDelta(index=i, text=t), index, TEXT),
        st.builds(lambda i, t, s: ir.ReasoningDelta(index=i, text=t, signature=s, signature_protocol="anthropic-messages"
                                                    if s else None), index, TEXT, st.sampled_from([None, "c2ln"])),
        st.builds(lambda i, a: ir.ToolCallDelta(index=i, arguments=a), index, st.sampled_from(['{"a"', ":1}", "", "x"])),
        st.builds(lambda i, p: ir.PartStart(index=i, part=p), index, parts),
        st.builds(lambda i: ir.PartStop(index=i), index),
        st.builds(lambda u: ir.UsageUpdate(usage=u), usage),
        st.builds(lambda m, u: ir.MessageStart(id=m, model="x", usage=u), st.sampled_from(["", "msg_9", "chatcmpl-9"]),
                  st.none() | usage),
        st.builds(lambda r, u: ir.MessageStop(stop_reason=r, usage=u), st.sampled_from(list(ir.StopReason)),
                  st.none() | usage),
        st.just(ir.StreamError(message="cut")),
    )
    return draw(st.lists(event, max_size=25))


@settings(SETTINGS, max_examples=300)
@given(events=ir_events(), client=st.sampled_from(sorted(CTXS)))
def test_encoders_match_reference_on_any_events(events: list[Any], client: str) -> None:
    new_enc, ref_enc = _encoders(client)
    assert _encode(new_enc, events) == _encode(ref_enc, events)


@pytest.mark.parametrize("client", sorted(CTXS))
@pytest.mark.parametrize("end", [ir.StreamError(message="cut"), ir.MessageStop(stop_reason=ir.StopReason.END_TURN),
                                 ir.PartStop(index=0)])
def test_encoders_after_the_end(client: str, end: Any) -> None:
    events = [ir.MessageStart(id="msg_1", model="x"), ir.PartStart(index=0, part=ir.TextPart(text="")),
              ir.TextDelta(index=0, text="a"), end, ir.TextDelta(index=0, text="b"),
              ir.PartStart(index=1, part=ir.TextPart(text="")), ir.TextDelta(index=1, text="c")]
    for cut in range(len(events) + 1):
        new_enc, ref_enc = _encoders(client)
        assert _encode(new_enc, events[cut:]) == _encode(ref_enc, events[cut:])


def test_text_delta_pieces_equal_the_plain_builder() -> None:
    # the encoders' prebuilt text-delta bytes against the general builders
    for index in (0, 1, 9, 10, 123):
        for kind, field in anthropic_stream._DELTA_FIELD.items():
            blk = anthropic_stream._Block(index, kind)
            for text in ("", "a", "é\"\\\n\x00😀"):
                assert blk.head + orjson.dumps(text) + anthropic_stream._TAIL == _delta_old(
                    index, field + orjson.dumps(text) + b"}")
    for name in ("openai", "openai-usage"):
        enc = ChatStreamEncoder(CTXS[name])
        enc.encode(ir.MessageStart(id="chatcmpl-1", model="x"))
        for text in ("a", "é\"\\\n\x00😀"):
            assert enc.encode(ir.TextDelta(index=0, text=text)) == enc._chunk({"content": text})
