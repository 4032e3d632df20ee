"""SSE frame parser: framing rules and chunking independence."""

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from cheapproxy.sse import SSEFrame, SSEParser, encode_frame, string_run

BODY = (
    b"event: message_start\ndata: {\"a\":1}\n\n"
    b": comment line\n\n"
    b"data:{\"no\":\"space\"}\n\n"
    b"event: multi\ndata: line1\ndata: line2\n\n"
    b"data: crlf\r\n\r\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEFrame("message_start", '{"a":1}'),
    SSEFrame(None, '{"no":"space"}'),
    SSEFrame("multi", "line1\nline2"),
    SSEFrame(None, "crlf"),
    SSEFrame(None, "[DONE]"),
]


def parse_all(chunks):
    p = SSEParser()
    out = []
    for c in chunks:
        out += p.feed(c)
    return out + p.close()


def test_frames():
    assert parse_all([BODY]) == EXPECTED


def test_cr_only_line_endings_and_missing_final_blank_line():
    assert parse_all([b"data: a\r\rdata: b"]) == [SSEFrame(None, "a"), SSEFrame(None, "b")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(BODY)), max_size=20))
def test_any_chunking_gives_the_same_frames(cuts):
    cuts = sorted(set(cuts))
    chunks, prev = [], 0
    for c in cuts + [len(BODY)]:
        chunks.append(BODY[prev:c])
        prev = c
    assert parse_all(chunks) == EXPECTED


def test_encode_frame_round_trips():
    raw = encode_frame('{"x":1}', "ev") + encode_frame(b"[DONE]") + encode_frame("y", crlf=True)
    assert parse_all([raw]) == [SSEFrame("ev", '{"x":1}'), SSEFrame(None, "[DONE]"), SSEFrame(None, "y")]


# ---------------------------------------------------------------- string_run

HEAD = b'data: {"choices":[{"index":0,"delta":{"content":'
TAIL = b'},"finish_reason":null}]}'
EV = b"event: content_block_delta"


def _frames(*literals: bytes, event: bytes | None = None, tail: bytes = TAIL) -> bytes:
    first = b"" if event is None else event + b"\n"
    return b"".join(first + HEAD + lit + tail + b"\n\n" for lit in literals)


def test_string_run_reads_a_run_of_frames_whole():
    body = _frames(b'"a"', b'"b\\"c"', b'"\\u0001"', b'"\xc3\xa9"')
    texts, literals, end = string_run(body + b"data: [DONE]\n\n", 0, None, HEAD, TAIL)
    assert texts == ["a", 'b"c', "\x01", "é"]
    assert literals == [orjson.dumps(t) for t in texts]
    assert end == len(body)
    # from an offset, with event lines
    body = b"xx" + _frames(b'"a"', b'"b"', event=EV)
    assert string_run(body, 2, EV, HEAD, TAIL) == (["a", "b"], [b'"a"', b'"b"'], len(body))


@pytest.mark.parametrize("odd", [
    b'"\\u00e9"',  # a string, but not as orjson writes it (the encoder reuses the literal)
    b'"\\/"',
    b"12",  # not a string
    b'"a" ',
    b'"open',  # no literal at all
    b'"a\\"',  # with the next frame's bytes it would parse as a string with a comma in it
])
def test_string_run_ends_before_a_frame_whose_value_is_not_a_canonical_string(odd):
    good = _frames(b'"a"', b'"b"')
    body = good + _frames(odd) + _frames(b'","y"', b'"z"')
    texts, literals, end = string_run(body, 0, None, HEAD, TAIL)
    assert (texts, literals, end) == (["a", "b"], [b'"a"', b'"b"'], len(good))
    assert string_run(body, len(good), None, HEAD, TAIL) is None


@pytest.mark.parametrize("other", [
    _frames(b'"x"', tail=b'},"finish_reason":"st"}]}'),  # the same length, another tail
    _frames(b'"x"', event=b"event: content_block_stop"),
    b"data: " + HEAD[6:].replace(b"content", b"refusal") + b'"x"' + TAIL + b"\n\n",
    b"\n" + _frames(b'"x"'),  # an extra blank line
    _frames(b'"x"').replace(b"\n", b"\r\n"),
    _frames(b'"x"')[:-1],  # not ended yet
])
def test_string_run_ends_before_any_other_frame(other):
    event = EV if b"event:" in other else None
    good = _frames(b'"a"', b'"b"', event=event)
    body = good + other + _frames(b'"c"', event=event)
    assert string_run(body, 0, event, HEAD, TAIL) == (["a", "b"], [b'"a"', b'"b"'], len(good))


def test_string_run_none_when_the_first_frame_is_not_one():
    assert string_run(b"data: [DONE]\n\n" + _frames(b'"a"'), 0, None, HEAD, TAIL) is None
    assert string_run(_frames(b'"a"')[:-1], 0, None, HEAD, TAIL) is None
    assert string_run(b"", 0, None, HEAD, TAIL) is None
