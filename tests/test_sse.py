"""SSE frame parser: framing rules and chunking independence."""

from hypothesis import given, settings, strategies as st

from cheapproxy.sse import SSEFrame, SSEParser, encode_frame

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
