"""OpenAI's stream padding (``"obfuscation"``, on by default): cut before the
decoder's learned-chunk shortcut only in the exact form OpenAI writes, so
that what the decoder makes of a chunk never changes."""

from __future__ import annotations

import pytest

from cheapproxy import ir
from cheapproxy_openai.stream import ChatStreamDecoder, without_obfuscation

HEAD = b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":'
TAIL = b'},"logprobs":null,"finish_reason":null}],"usage":null'


@pytest.mark.parametrize("value", [b"", b"a", b"ZGF", b"lRK2aBv", b"0wmdEAC"])
def test_the_padding_as_openai_writes_it_is_cut(value: bytes) -> None:
    raw = HEAD + b'"Hi"' + TAIL + b',"obfuscation":"' + value + b'"}'
    assert without_obfuscation(raw) == HEAD + b'"Hi"' + TAIL + b"}"


@pytest.mark.parametrize("raw", [
    HEAD + b'"Hi"' + TAIL + b',"obfuscation":"a-b"}',  # not letters and digits alone
    HEAD + b'"Hi"' + TAIL + b',"obfuscation":"\\u0041"}',  # an escape
    HEAD + b'"Hi"' + TAIL + b',"obfuscation":"a\\q"}',  # not JSON at all
    HEAD + b'"Hi"' + TAIL + b', "obfuscation":"a"}',  # other spacing
    HEAD + b'"Hi"' + TAIL + b',"obfuscation":"a","x":1}',  # not the last member
    b'{"a":{"b":1,"obfuscation":"x"}}',  # not at the top level
    b'{,"obfuscation":"x"}',  # no member before it: the chunk is malformed, cut or not
    b'{"a":1,,"obfuscation":"x"}',
    b'"x,"obfuscation":"y"}',
])
def test_anything_else_is_left_as_it_came(raw: bytes) -> None:
    assert without_obfuscation(raw) == raw


def _events(*chunks: bytes) -> list[ir.StreamEvent]:
    decoder = ChatStreamDecoder()
    return decoder.feed(b"".join(b"data: " + c + b"\n\n" for c in chunks) + b"data: [DONE]\n\n") + decoder.close()


def test_padded_and_plain_chunks_decode_alike_and_a_malformed_one_stays_malformed() -> None:
    padded = [HEAD + b'"' + w + b'"' + TAIL + b',"obfuscation":"' + b"Xy9"[: i % 3 + 1] + b'"}'
              for i, w in enumerate((b"Hi", b" there", b"!", b" How", b" are", b" you"))]
    plain = [HEAD + b'"' + w + b'"' + TAIL + b"}" for w in (b"Hi", b" there", b"!", b" How", b" are", b" you")]
    got = _events(*padded)
    assert got == _events(*plain)
    assert "".join(e.text for e in got if isinstance(e, ir.TextDelta)) == "Hi there! How are you"
    bad = HEAD + b'"Hi"' + TAIL + b',"obfuscation":"a\\q"}'
    events = _events(padded[0], bad)
    assert isinstance(events[-1], ir.StreamError) and "malformed" in events[-1].message
