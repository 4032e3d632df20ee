"""(a) golden native streams: decode -> IR -> client encoder, equal in meaning;
(b) any chunking of an upstream body gives the same IR events."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapproxy import ir

from anthropic_testlib import CODEC, decode_stream, encode_stream, frames, golden, split

GOLDENS = ["thinking_text_tool.sse", "server_tool_stop_sequence.sse", "redacted_thinking.sse",
           "overloaded_midstream.sse"]


def test_thinking_text_tool_decodes_to_exact_ir() -> None:
    events = decode_stream(golden("thinking_text_tool.sse"))
    assert isinstance(events[0], ir.MessageStart)
    assert events[0].id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert events[0].usage == ir.Usage(input_tokens=25, output_tokens=1, cache_read_tokens=2048, cache_write_tokens=1200)
    resp = ir.collect(events)
    thinking, text, call1, call2 = resp.content
    assert thinking == ir.ReasoningPart(
        text="The user wants the weather in Paris. I should call get_weather.",
        signature="EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds+/a9Q==",
        signature_protocol="anthropic-messages")
    assert text.text == "I'll check the weather in Paris \u2014 one moment. \"Quotes\", back\\slash and \u00fcn\u00efcode \U0001f327\n"
    assert (call1.id, call1.name, orjson.loads(call1.arguments)) == (
        "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", {"city": "Paris", "unit": "celsius"})
    assert (call2.name, orjson.loads(call2.arguments)) == ("get_time", {"tz": "Europe/Paris"})
    assert resp.stop_reason is ir.StopReason.TOOL_USE
    assert resp.usage == ir.Usage(input_tokens=25, output_tokens=89, cache_read_tokens=2048, cache_write_tokens=1200)
    # IR blocks never interleave: start/stop pairs in order 0, 1, 2, 3
    opens = [(type(e).__name__, e.index) for e in events if isinstance(e, (ir.PartStart, ir.PartStop))]
    assert opens == [(k, i) for i in range(4) for k in ("PartStart", "PartStop")]


def test_thinking_text_tool_reencodes_frame_for_frame() -> None:
    body = golden("thinking_text_tool.sse")
    original = [f for f in frames(body) if f[0] != "ping"
                # the decoder drops the API's empty leading input_json_delta; nothing is lost
                and not (f[0] == "content_block_delta" and f[1]["delta"].get("partial_json") == "")]
    out = frames(b"".join(encode_stream(decode_stream(body), model="my-claude")))
    assert [e for e, _ in out] == [e for e, _ in original]
    for (event, got), (_, want) in zip(out, original):
        if event == "message_start":
            assert got["message"]["model"] == "my-claude"
            assert got["message"]["id"] == want["message"]["id"]
            assert got["message"]["usage"] == {"input_tokens": 25, "cache_creation_input_tokens": 1200,
                                               "cache_read_input_tokens": 2048, "output_tokens": 1}
            assert got["message"]["content"] == [] and got["message"]["stop_reason"] is None
        elif event == "message_delta":
            assert got["delta"] == want["delta"]
            # cumulative usage with the input side too (clients merging message_delta see final counts)
            assert got["usage"] == {"input_tokens": 25, "cache_creation_input_tokens": 1200,
                                    "cache_read_input_tokens": 2048, "output_tokens": 89}
        else:
            assert got == want


def test_server_tools_dropped_and_blocks_renumbered() -> None:
    events = decode_stream(golden("server_tool_stop_sequence.sse"))
    resp = ir.collect(events)
    assert [type(p).__name__ for p in resp.content] == ["TextPart"]
    assert resp.content[0].text == "It is 18C and sunny."
    assert resp.stop_reason is ir.StopReason.STOP_SEQUENCE and resp.stop_sequence == "END"
    assert resp.usage == ir.Usage(input_tokens=2679, output_tokens=57)
    out = frames(b"".join(encode_stream(events)))
    starts = [d for e, d in out if e == "content_block_start"]
    assert starts == [{"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}]
    delta = [d for e, d in out if e == "message_delta"][0]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert delta["usage"]["output_tokens"] == 57 and delta["usage"]["input_tokens"] == 2679


def test_redacted_thinking_round_trip() -> None:
    events = decode_stream(golden("redacted_thinking.sse"))
    resp = ir.collect(events)
    assert resp.content[0].redacted.startswith("EmwKAhgBEgy3va3p") and resp.content[0].signature_protocol == "anthropic-messages"
    assert resp.usage.reasoning_tokens == 9 and resp.usage.output_tokens == 12 and resp.usage.cache_read_tokens == 300
    out = frames(b"".join(encode_stream(events)))
    assert out[1] == ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
        "type": "redacted_thinking", "data": resp.content[0].redacted}})
    again = ir.collect(decode_stream(b"".join(encode_stream(events))))
    assert again.content == resp.content and again.stop_reason is ir.StopReason.END_TURN


def test_midstream_error_becomes_stream_error_and_error_event() -> None:
    events = decode_stream(golden("overloaded_midstream.sse"))
    assert events[-1] == ir.StreamError(message="Overloaded", kind="upstream_overloaded", status=529)
    assert not any(isinstance(e, ir.MessageStop) for e in events)
    out = frames(b"".join(encode_stream(events)))
    assert out[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert [e for e, _ in out] == ["message_start", "content_block_start", "content_block_delta", "error"]


def test_body_without_message_stop_is_a_cut() -> None:
    body = golden("thinking_text_tool.sse")
    cut = body[: body.index(b"event: message_delta")]
    events = decode_stream(cut)
    assert isinstance(events[-1], ir.StreamError) and "ended before message_stop" in events[-1].message
    assert events[-1].kind == "upstream_failed"


def test_events_after_message_stop_are_ignored() -> None:
    body = golden("redacted_thinking.sse") + b'event: content_block_start\ndata: {"type":"content_block_start","index":5,"content_block":{"type":"text","text":"x"}}\n\n'
    events = decode_stream(body)
    assert isinstance(events[-1], ir.MessageStop)


def test_crlf_and_no_space_framing_decode_the_same() -> None:
    body = golden("thinking_text_tool.sse")
    variant = body.replace(b"\n", b"\r\n").replace(b"data: ", b"data:")
    assert decode_stream(variant) == decode_stream(body)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(GOLDENS), cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
       crlf=st.booleans())
def test_any_chunking_gives_the_same_events(name: str, cuts: list[int], crlf: bool) -> None:
    body = golden(name)
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    assert decode_stream(body, split(body, cuts)) == decode_stream(body)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=60))
def test_byte_at_a_time_and_random_chunks_same_response(cuts: list[int]) -> None:
    body = golden("thinking_text_tool.sse")
    one_by_one = [body[i:i + 1] for i in range(len(body))]
    assert ir.collect(decode_stream(body, one_by_one)) == ir.collect(decode_stream(body, split(body, cuts)))
    assert CODEC.stream_decoder().feed(b"") == []
