"""Golden upstream streams: decode to IR, re-encode for a client, decode again;
plus arbitrary chunkings of the same bodies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_chat_helpers import context, decode_stream, encode_stream, fixture, sse_payloads, summary

from cheapproxy import ir

USAGE_BODY = {
    "model": "client-model",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "hi"}],
}

GOLDEN = {
    "text_usage.sse": {
        "text": "Bonjour à vous 👋",
        "reasoning": "",
        "calls": [],
        "stop": ir.StopReason.END_TURN,
        "usage": ir.Usage(input_tokens=186, output_tokens=6, cache_read_tokens=1024),
    },
    "tool_calls_parallel.sse": {
        "text": "",
        "reasoning": "",
        "calls": [
            ("call_Wm8o1xQd5TgKc2R0a9pLzYvE", "get_weather", {"city": "Paris"}),
            ("call_7fQe2bNn0XkR4sJpUa1cHdLm", "get_time", {"tz": "Europe/Paris"}),
        ],
        "stop": ir.StopReason.TOOL_USE,
        "usage": ir.Usage(input_tokens=56, output_tokens=48, cache_read_tokens=256),
    },
    "reasoning_deepseek.sse": {
        "text": "2 + 2 = **4**",
        "reasoning": "The user asks 2+2. That is 4.",
        "calls": [],
        "stop": ir.StopReason.END_TURN,
        "usage": ir.Usage(input_tokens=20, output_tokens=35, reasoning_tokens=24),
    },
    "combined_crlf.sse": {
        "text": "Sure, here it is.",
        "reasoning": "",
        "calls": [("call_g1", "lookup", {"q": "x"})],
        "stop": ir.StopReason.TOOL_USE,
        "usage": ir.Usage(input_tokens=32, output_tokens=12, cache_read_tokens=8, reasoning_tokens=5),
    },
    "interleaved_tools.sse": {
        "text": "",
        "reasoning": "",
        "calls": [("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_time", {"tz": "UTC"})],
        "stop": ir.StopReason.TOOL_USE,
        "usage": ir.Usage(input_tokens=30, output_tokens=20),
    },
}


def _check_blocks(events: list[ir.StreamEvent]) -> None:
    """IR invariants: MessageStart first, blocks contiguous and never interleaved."""
    assert isinstance(events[0], ir.MessageStart)
    open_idx = None
    expected = 0
    for ev in events:
        if isinstance(ev, ir.PartStart):
            assert open_idx is None, "a block opened while another was open"
            assert ev.index == expected
            open_idx, expected = ev.index, expected + 1
        elif isinstance(ev, (ir.TextDelta, ir.ReasoningDelta, ir.ToolCallDelta)):
            assert ev.index == open_idx
        elif isinstance(ev, ir.PartStop):
            assert ev.index == open_idx
            open_idx = None
    assert open_idx is None


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_decode_and_reencode_round_trip(name: str) -> None:
    events = decode_stream([fixture(name)])
    _check_blocks(events)
    assert isinstance(events[-1], ir.MessageStop)
    first = summary(ir.collect(events))
    assert first == GOLDEN[name]

    wire = encode_stream(events, context(USAGE_BODY))
    again = decode_stream([wire])
    assert summary(ir.collect(again)) == first

    frames = sse_payloads(wire)
    assert frames[-1] == "[DONE]"
    usage_chunk = frames[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == (
        first["usage"].input_tokens + first["usage"].cache_read_tokens
    )
    for f in frames[:-2]:
        assert f["object"] == "chat.completion.chunk" and f["model"] == "client-model" and f["usage"] is None
    # tool-call indices are a per-stream counter 0, 1, ... (never the IR block index)
    heads = [tc for f in frames[:-2] for tc in f["choices"][0]["delta"].get("tool_calls", []) if "id" in tc]
    assert [tc["index"] for tc in heads] == list(range(len(first["calls"])))


def test_reencode_without_include_usage_has_no_usage_anywhere() -> None:
    events = decode_stream([fixture("tool_calls_parallel.sse")])
    body = {"model": "client-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    wire = encode_stream(events, context(body))
    frames = sse_payloads(wire)
    assert frames[-1] == "[DONE]"
    assert all("usage" not in f for f in frames[:-1])
    assert all(f["choices"] for f in frames[:-1])
    assert frames[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_interleaved_fragments_are_buffered_not_merged() -> None:
    events = decode_stream([fixture("interleaved_tools.sse")])
    starts = [e for e in events if isinstance(e, ir.PartStart)]
    assert [s.part.id for s in starts] == ["call_a", "call_b"]  # type: ignore[union-attr]
    # call_b arrived while call_a was incomplete: it is emitted whole after call_a closed
    b_deltas = [e.arguments for e in events if isinstance(e, ir.ToolCallDelta) and e.index == 1]
    assert b_deltas == ['{"tz":"UTC"}']


def test_error_frame_becomes_stream_error_and_nothing_after() -> None:
    events = decode_stream([fixture("error_midstream.sse") + b'data: {"choices":[{"index":0,"delta":{"content":"late"}}]}\n\n'])
    assert isinstance(events[-1], ir.StreamError)
    assert events[-1].message == "The server had an error while processing your request. Sorry about that!"
    assert "".join(e.text for e in events if isinstance(e, ir.TextDelta)) == "Partial"
    wire = encode_stream(events, context(USAGE_BODY))
    frames = sse_payloads(wire)
    assert frames[-1] == {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "[DONE]" not in frames


def test_body_without_done_is_cut() -> None:
    events = decode_stream([fixture("cut.sse")])
    assert not any(isinstance(e, ir.MessageStop) for e in events)
    assert isinstance(events[-1], ir.StreamError)
    assert events[-1].kind == "upstream_failed" and "cut" in events[-1].message


def _split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in points:
        pieces.append(body[prev:p])
        prev = p
    pieces.append(body[prev:])
    return pieces


ALL_FIXTURES = sorted(GOLDEN) + ["error_midstream.sse", "cut.sse"]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(ALL_FIXTURES), cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40))
def test_any_chunking_gives_the_same_events(name: str, cuts: list[int]) -> None:
    body = fixture(name)
    whole = decode_stream([body])
    pieces = _split(body, cuts)
    assert b"".join(pieces) == body
    assert decode_stream(pieces) == whole


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=60))
def test_byte_by_byte_crlf_and_multibyte_utf8(cuts: list[int]) -> None:
    # splits inside CRLF pairs and inside the 4-byte emoji must not change anything
    body = fixture("combined_crlf.sse")
    text_body = fixture("text_usage.sse")
    for b in (body, text_body):
        assert decode_stream(_split(b, cuts)) == decode_stream([b])
    singles = [text_body[i : i + 1] for i in range(len(text_body))]
    assert summary(ir.collect(decode_stream(singles)))["text"] == "Bonjour à vous 👋"


def test_reencoded_stream_is_valid_json_per_frame() -> None:
    events = decode_stream([fixture("reasoning_deepseek.sse")])
    wire = encode_stream(events, context(USAGE_BODY))
    deltas = [f["choices"][0]["delta"] for f in sse_payloads(wire)[:-2]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d.get("reasoning_content") for d in deltas[1:3]] == ["The user asks 2+2.", " That is 4."]
    assert deltas[3:] == [{"content": "2 + 2 = "}, {"content": "**4**"}, {}]
